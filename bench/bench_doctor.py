"""Benchmark ``vgpuctl doctor`` on this machine: it must never need more than a second.

Run with ``.venv/bin/python bench/bench_doctor.py`` (as root for part C). Measures:

A. whole processes on the real host (root ``/``), each timed with ``perf_counter`` around the spawn:
   ``vgpuctl doctor --json`` (with the tiny KVM guest), ``vgpuctl doctor --json --no-guest``,
   ``vgpuctl doctor`` (human output) and the floor ``python -c 'import vgpuctl.cli.app'``; one warm-up
   round, then ``--runs`` interleaved rounds. The target applies to the slowest run, not the median;
B. in this process: ``run_doctor(HostRoot('/'))`` with and without the guest, and its parts alone: the
   KVM probe with its guest (``probe_kvm``), the QEMU probe (``probe_qemu``), and the file checks with
   both probes replaced by instant stand-ins;
C. a simulated host (the ``skylake`` preset with a 1 GiB aperture, mounted over FUSE; skipped without
   root/FUSE): ``vgpuctl --root DIR doctor --json`` as a process and ``run_doctor`` in process. There the
   KVM probe is not run (a simulated /dev/kvm is not a KVM), the QEMU probe is.

``--markdown`` prints the table for bench/RESULTS.md. Exit status 1 if any whole-process doctor run took
longer than a second (a ``WARNING`` note), or if its output was not the report expected here.

No GPU is involved. KVM is this machine's: on a KVM-PVM machine (the CI kind) the guest stops at once with
"KVM internal error", which is what the report then says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from bench_sim import Row, console, fmt_ms, machine_facts
from vgpuctl.backends.doctor import run_doctor
from vgpuctl.host import HostRoot
from vgpuctl.host.doctor import GUEST_TIMEOUT_S, QEMU_TIMEOUT_S
from vgpuctl.host.kvm import probe_kvm
from vgpuctl.host.qemu import probe_qemu

VENV_BIN = Path(sys.executable).parent
VGPUCTL = str(VENV_BIN / "vgpuctl")
TARGET_S = 1.0
SIM_PRESET = "skylake"


def timed(argv: list[str], expect: Callable[[subprocess.CompletedProcess[str]], str | None] | None = None,
          ) -> tuple[float, str | None]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    return elapsed, expect(done) if expect else (None if done.returncode == 0 else done.stderr.strip())


def json_report(done: subprocess.CompletedProcess[str]) -> str | None:
    """None if the output is a doctor report whose exit status matches its verdict."""
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError:
        return f"not JSON: {done.stdout[:80]!r} {done.stderr[:200]!r}"
    if done.returncode != (0 if data["ready"] else 1):
        return f"exit status {done.returncode} but ready={data['ready']}"
    return None


def human_report(done: subprocess.CompletedProcess[str]) -> str | None:
    last = done.stdout.rstrip("\n").rsplit("\n", 1)[-1]
    if not last.startswith(("READY", "NOT READY")) or done.returncode not in (0, 1):
        return f"unexpected end of output {last!r} (status {done.returncode})"
    return None


def in_process(function: Callable[[], object], runs: int) -> list[float]:
    function()  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return samples


def whole_processes(commands: dict[str, tuple[list[str], Callable[..., str | None] | None]], runs: int,
                    notes: list[str]) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for round_no in range(runs + 1):
        order = list(commands) if round_no % 2 == 0 else list(reversed(commands))
        for name in order:
            argv, expect = commands[name]
            elapsed, problem = timed(argv, expect)
            if problem:
                notes.append(f"WARNING: {name}: {problem}")
            if round_no:  # round 0 is the warm-up
                samples[name].append(elapsed)
    return samples


@contextlib.contextmanager
def simulated_host() -> Iterator[Path | None]:
    from vgpuctl.sim import mount as sim_mount
    from vgpuctl.sim.presets import preset

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="vgpuctl-bench-doctor-") as tmp:
        directory = Path(tmp) / "host"
        directory.mkdir()
        spec = preset(SIM_PRESET).with_overrides(aperture_mib=1024)
        sim_mount.mount(spec.to_json(), directory, SIM_PRESET)
        try:
            yield directory
        finally:
            sim_mount.umount(directory, lazy=True)


def render(rows: list[Row], markdown: bool) -> Table:
    table = Table(title="vgpuctl doctor (times in ms)", box=box.MARKDOWN if markdown else box.SIMPLE_HEAD)
    for column, justify in (("#", "right"), ("measurement", "left"), ("n", "right"), ("median", "right"),
                            ("p95", "right"), ("max", "right"), ("note", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(row.section, row.what, str(row.n), fmt_ms(row.median_ms), fmt_ms(row.pct_ms(95)),
                      fmt_ms(max(row.samples_s) * 1e3), row.note)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="whole-process runs per command (default 15)")
    parser.add_argument("--inproc-runs", type=int, default=20, help="in-process runs (default 20)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 and 3")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    options = parser.parse_args()
    runs, inproc = (3, 3) if options.quick else (options.runs, options.inproc_runs)
    notes: list[str] = []
    rows: list[Row] = []
    real = HostRoot(Path("/"))

    # A. whole processes on this machine
    commands: dict[str, tuple[list[str], Callable[..., str | None] | None]] = {
        "vgpuctl doctor --json": ([VGPUCTL, "doctor", "--json"], json_report),
        "vgpuctl doctor --json --no-guest": ([VGPUCTL, "doctor", "--json", "--no-guest"], json_report),
        "vgpuctl doctor (human output)": ([VGPUCTL, "doctor"], human_report),
        "python -c 'import vgpuctl.cli.app'": ([sys.executable, "-c", "import vgpuctl.cli.app"], None),
    }
    whole = whole_processes(commands, runs, notes)
    for name, samples in whole.items():
        note = "floor: interpreter + CLI imports" if name.startswith("python") else ""
        if name.startswith("vgpuctl") and max(samples) > TARGET_S:
            note = f"over {TARGET_S:g} s"
            notes.append(f"WARNING: {name}: slowest run {max(samples) * 1e3:.0f} ms > {TARGET_S * 1e3:.0f} ms")
        rows.append(Row("A", name, samples, note))

    # B. in this process
    report = run_doctor(real)
    guest = report.check("kvm-guest")
    rows.append(Row("B", "run_doctor('/')", in_process(lambda: run_doctor(real), inproc),
                    f"kvm-guest: {guest.status}; {len(report.failed)} failed"))
    rows.append(Row("B", "run_doctor('/', run_guest=False)",
                    in_process(lambda: run_doctor(real, run_guest=False), inproc)))
    kvm = probe_kvm(real, run_guest=True, timeout_s=GUEST_TIMEOUT_S)
    rows.append(Row("B", "  probe_kvm (tiny guest under KVM)",
                    in_process(lambda: probe_kvm(real, run_guest=True, timeout_s=GUEST_TIMEOUT_S), inproc),
                    f"guest_runs={kvm.guest_runs}, {kvm.guest_error or 'no error'}"[:60]))
    rows.append(Row("B", "  probe_qemu (8 help queries in parallel)",
                    in_process(lambda: probe_qemu(timeout_s=QEMU_TIMEOUT_S), inproc)))

    def stand_in(*args: Any) -> None:
        return None

    rows.append(Row("B", "  the file checks alone (probes stubbed)",
                    in_process(lambda: run_doctor(real, kvm_probe=stand_in, qemu_probe=stand_in), inproc)))

    # C. a simulated host over FUSE
    with simulated_host() as directory:
        if directory is None:
            notes.append("C skipped: needs root and /dev/fuse")
        else:
            sim = HostRoot(directory)
            sim_whole = whole_processes(
                {"sim": ([VGPUCTL, "--root", str(directory), "doctor", "--json"], json_report)}, runs, notes)
            rows.append(Row("C", f"vgpuctl --root SIM doctor --json ({SIM_PRESET}, 1 GiB)", sim_whole["sim"],
                            f"verdict: {run_doctor(sim).verdict[:40]}"))
            rows.append(Row("C", "run_doctor(SIM)", in_process(lambda: run_doctor(sim), inproc)))

    console.print(render(rows, options.markdown))
    for key, value in machine_facts()[:4]:
        console.print(f"{key}: {value}")
    console.print(f"doctor verdict here: {report.verdict}")
    for note in notes:
        console.print(note)
    slowest = max(max(samples) for name, samples in whole.items() if name.startswith("vgpuctl"))
    console.print(f"slowest whole-process doctor run: {slowest * 1e3:.0f} ms (target: at most {TARGET_S * 1e3:.0f} ms)")
    return 1 if any(note.startswith("WARNING") for note in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
