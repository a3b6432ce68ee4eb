"""Benchmark: this tree's CLI start-up and VM start against an older commit's, in one run on one machine.

The restructuring of the vGPU model (backends, device model, one reading of the host) must not make the
commands slower. This runs both trees' code, interleaved round by round, as whole processes:

  import          python -c 'import vgpuctl.cli.app'                (the CLI's start-up)
  list --json     python -m vgpuctl list --json                    (a listing on a mounted simulated host)
  doctor --json   python -m vgpuctl doctor --json --no-guest       (every check; QEMU probed)
  vm start        python -m vgpuctl vm start car --accel tcg        (until QMP says running; then killed)

Each tree gets its own state directory and its own VM (``car-before``, ``car-after``: their own vGPUs),
made by its own ``vm create`` (so each writes the spec format it knows); both use one mounted Coffee Lake
host and this tree's bare-metal test guest. Both trees are byte-compiled first (``compileall``), as an
installed package is: with PYTHONDONTWRITEBYTECODE set (as on this machine) each run would otherwise
compile every module from source, and the tree with more source would pay for it. The accelerator is TCG
(pinned), as everywhere on this KVM-PVM machine.

Run (as root: FUSE): ``git worktree add /tmp/before <commit>`` then
``.venv/bin/python bench/bench_versions.py --before /tmp/before/src [--runs 15]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vgpuctl.sim import mount
from vgpuctl.sim.presets import preset
from vgpuctl.vm.testguest import build_test_guest

AFTER_SRC = Path(__file__).resolve().parents[1] / "src"


class Tree:
    """One source tree's vgpuctl, run as `python -m vgpuctl` with its src on PYTHONPATH."""

    def __init__(self, label: str, src: Path, root: Path) -> None:
        self.label, self.src = label, src
        self.state = Path(tempfile.mkdtemp(prefix=f"vgv-{label[0]}-"))
        self.env = {**os.environ, "PYTHONPATH": str(src), "VGPUCTL_ROOT": str(root),
                    "VGPUCTL_STATE_DIR": str(self.state)}

    @property
    def vm(self) -> str:
        return f"car-{self.label}"

    def compile(self) -> None:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(self.src)], check=True)

    def run(self, *args: str, check: bool = True) -> float:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, *args], env=self.env, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if check and done.returncode != 0:
            raise SystemExit(f"[{self.label}] {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return elapsed

    def vgpuctl(self, *args: str, check: bool = True) -> float:
        return self.run("-m", "vgpuctl", *args, check=check)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the older tree's src directory")
    parser.add_argument("--runs", type=int, default=15)
    options = parser.parse_args()
    guest = build_test_guest()
    directory = Path(tempfile.mkdtemp(prefix="vgpuctl-bench-versions-"))
    mount.mount(preset("coffeelake").with_overrides(aperture_mib=1024).to_json(), directory, "coffeelake")
    trees = [Tree("before", options.before.resolve(), directory), Tree("after", AFTER_SRC, directory)]
    measures = ("import", "list --json", "doctor --json", "vm start")
    times: dict[tuple[str, str], list[float]] = {(t.label, m): [] for t in trees for m in measures}
    try:
        for tree in trees:
            tree.compile()
            tree.vgpuctl("vm", "create", tree.vm, "--profile", "automotive", "--kernel", str(guest), "--boot", "kernel",
                         "--memory", "64", "--cpus", "1", "--display", "vnc")
            tree.vgpuctl("vm", "start", tree.vm, "--accel", "tcg")  # warm-up; the vGPU exists from now on
            tree.vgpuctl("vm", "kill", tree.vm)
        for _ in range(options.runs):
            for tree in trees:
                times[(tree.label, "import")].append(tree.run("-c", "import vgpuctl.cli.app"))
                times[(tree.label, "list --json")].append(tree.vgpuctl("list", "--json"))
                times[(tree.label, "doctor --json")].append(tree.vgpuctl("doctor", "--json", "--no-guest",
                                                                         check=False))
                times[(tree.label, "vm start")].append(tree.vgpuctl("vm", "start", tree.vm, "--accel", "tcg"))
                tree.vgpuctl("vm", "kill", tree.vm)
    finally:
        for tree in trees:
            tree.vgpuctl("vm", "kill", tree.vm, check=False)
            tree.vgpuctl("vm", "rm", tree.vm, check=False)
        mount.umount(directory, lazy=True)
        directory.rmdir()
    print(f"before: {options.before}  after: {AFTER_SRC}  ({options.runs} interleaved rounds, TCG, "
          f"{os.cpu_count()} CPUs, {os.uname().release})")
    print(f"{'what':<15} {'before ms':>10} {'after ms':>10} {'after/before':>13}")
    for measure in measures:
        before = statistics.median(times[("before", measure)])
        after = statistics.median(times[("after", measure)])
        print(f"{measure:<15} {before * 1e3:>10.1f} {after * 1e3:>10.1f} {after / before:>13.2f}")


if __name__ == "__main__":
    main()
