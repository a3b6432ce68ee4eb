"""Benchmark vgpuctl's command line against Debian's mdevctl on the same simulated host: whole-process wall time.

Run as root (FUSE, unshare, bind mounts) with ``.venv/bin/python bench/bench_cli.py``. Mounts the ``large``
preset (8 NVIDIA Tesla T4 + a Coffee Lake iGPU with a 1 GiB aperture), makes 7 GVT + 16 NVIDIA vGPUs active
and defines 12 (4 of them active ones, 8 defined only; 4 through ``vgpuctl define``, 8 as mdevctl-format
files), then measures:

A. whole processes, every one started the same way: ``unshare -m --propagation private sh -c 'mount --bind
   DIR/sys /sys && mount --bind DIR/etc/mdevctl.d /etc/mdevctl.d && exec CMD'``, so that ``vgpuctl`` (default
   root ``/``) and ``mdevctl`` see the same host at the same namespace cost. CMD is ``vgpuctl list --json`` /
   ``mdevctl list --dumpjson``, ``vgpuctl types --json`` / ``mdevctl types --dumpjson``, plus floors:
   ``true`` (the namespace), ``python -c pass`` and ``python -c 'import vgpuctl.cli.app'`` (the CLI's start);
   runs are interleaved, one warm-up round first. Targets: each vgpuctl command within 2x of mdevctl;
B. the same two queries in this process (``active_devices`` + ``definitions.load_all``; ``read_types`` over
   ``parent_names``) through the mount: target at least 20x faster than spawning mdevctl;
C. ``python -X importtime -c 'import vgpuctl.cli.app'``: the total and the 10 biggest cumulative imports; and
   ``-X importtime`` of a whole ``vgpuctl list --json`` (imports made after the CLI module, e.g. at parsing);
D. a peer (``--no-static`` skips it): A's pairs and B's queries on a plain on-disk copy of the mounted
   ``sys/`` and ``etc/mdevctl.d`` (as bench_sim.py makes it), where file I/O costs what it costs on a real
   sysfs rather than a FUSE round trip to the Python simulator per request.

Run it again after CLI changes (e.g. the start-up path); ``--quick`` is a smoke run, ``--markdown`` prints
the table for bench/RESULTS.md. Exit status 1 if a consistency check failed (a ``WARNING`` note), 2 if it
cannot run here.

No accelerator, GPU, KVM or QEMU is involved: everything is the simulator, the kernel's FUSE and processes.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from bench_sim import (
    GVT_PARENT,
    MDEVCTL,
    PRESET,
    Row,
    console,
    fmt_ms,
    machine_facts,
    mdevctl_ready,
    populate,
    run_on_mounted_host,
    static_copy,
    step,
)
from vgpuctl.host import HostRoot
from vgpuctl.mdev import definitions
from vgpuctl.mdev.sysfs import active_devices, parent_names, read_types

TARGET_CLI_RATIO = 2.0  # vgpuctl / mdevctl wall time, at most
TARGET_INPROC_RATIO = 20.0  # mdevctl spawn / in-process query, at least
TOP_IMPORTS = 10
PYTHON = str(Path(sys.executable).parent / "python")  # the venv's interpreter (not resolved: keeps the venv)
VGPUCTL = str(Path(sys.executable).parent / "vgpuctl")  # its console script

# (key, label, shell command inside the namespace); {state} is the state directory
COMMANDS: list[tuple[str, str, str]] = [
    ("ns", "unshare -m + 2 bind mounts + exec true", "exec true"),
    ("pass", "… + exec python -c pass", f"exec {PYTHON} -c pass"),
    ("import", "… + exec python -c 'import vgpuctl.cli.app'", f"exec {PYTHON} -c 'import vgpuctl.cli.app'"),
    ("v-list", "vgpuctl list --json", f"exec {VGPUCTL} --state-dir {{state}} list --json"),
    ("m-list", "mdevctl list --dumpjson", f"exec {MDEVCTL} list --dumpjson"),
    ("m-list-d", "mdevctl list --defined --dumpjson", f"exec {MDEVCTL} list --defined --dumpjson"),
    ("v-types", "vgpuctl types --json", f"exec {VGPUCTL} types --json"),
    ("m-types", "mdevctl types --dumpjson", f"exec {MDEVCTL} types --dumpjson"),
    # vgpuctl's mdevctl stand-in (console script linked as mdevctl): the same Python, argparse instead of click
    ("s-list", "vgpuctl as mdevctl: list --dumpjson", "exec {link} list --dumpjson"),
    ("s-types", "vgpuctl as mdevctl: types --dumpjson", "exec {link} types --dumpjson"),
]
PAIRS = (("list", "v-list", "m-list"), ("types", "v-types", "m-types"))
STATIC_KEYS = ("ns", "v-list", "m-list", "v-types", "m-types")  # what also runs on the static copy
TYPES = 132  # 8 T4 x 16 + 4 GVT-g


@dataclass
class Options:
    runs: int
    inproc_runs: int
    importtime_runs: int
    static: bool
    markdown: bool


# ---------------------------------------------------------------------------------------------- setup
def define_devices(root: Path, state: Path) -> tuple[int, list[str]]:
    """12 definitions: 4 of the active NVIDIA vGPUs (auto), 4 defined-only as mdevctl-format files,
    4 defined-only through ``vgpuctl define`` (recorded as vgpuctl's). Returns (count, warnings)."""
    warnings: list[str] = []
    host = HostRoot(root)
    nvidia = [d for d in active_devices(host) if d.parent != GVT_PARENT]
    files: list[tuple[str, str, str, str, list[dict[str, str]]]] = [
        (d.uuid, d.parent, d.type_id, "auto", []) for d in nvidia[:4]
    ]
    files += [(str(uuid.uuid4()), GVT_PARENT, "i915-GVTg_V5_4", "manual", []) for _ in range(2)]
    files += [(str(uuid.uuid4()), nvidia[-1].parent, "nvidia-230", "manual", [{"frame_rate_limiter": "0"}])
              for _ in range(2)]
    for name, parent, type_id, start, attrs in files:
        directory = root / "etc/mdevctl.d" / parent
        directory.mkdir(parents=True, exist_ok=True)
        # mdevctl's own format: serde_json pretty print, 2-space indent, no trailing newline
        (directory / name).write_text(json.dumps({"mdev_type": type_id, "start": start, "attrs": attrs}, indent=2))
    count = len(files)
    by_cli = [(nvidia[0].parent, "nvidia-223", ["--auto"]), (nvidia[0].parent, "nvidia-223", []),
              (GVT_PARENT, "i915-GVTg_V5_2", []), (GVT_PARENT, "i915-GVTg_V5_8", ["--auto"])]
    for parent, type_id, extra in by_cli:
        argv = [VGPUCTL, "--root", str(root), "--state-dir", str(state), "define", "-p", parent, "-t", type_id, *extra]
        done = subprocess.run(argv, capture_output=True, text=True, env=child_env())
        if done.returncode == 0:
            count += 1
        else:
            warnings.append(f"WARNING: {shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return count, warnings


def child_env() -> dict[str, str]:
    """This environment without vgpuctl's own variables: the command line alone says root and state."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VGPUCTL_")}


def in_namespace(root: Path, command: str) -> list[str]:
    script = (f"mount --bind {shlex.quote(str(root / 'sys'))} /sys && "
              f"mount --bind {shlex.quote(str(root / 'etc/mdevctl.d'))} /etc/mdevctl.d && {command}")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script]


def run_timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env())
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return elapsed, done.stdout


# ---------------------------------------------------------------------------------------------- checks
def mdevctl_uuids(text: str) -> set[tuple[str, str]]:
    """(parent, uuid) of every device in ``mdevctl list --dumpjson``: [{parent: [{uuid: config}]}]."""
    return {(parent, name) for block in json.loads(text or "[]") for parent, devices in block.items()
            for device in devices for name in device}


def mdevctl_types(text: str) -> dict[tuple[str, str], int]:
    """(parent, type) -> available_instances from ``mdevctl types --dumpjson``."""
    return {(parent, type_id): int(info["available_instances"]) for block in json.loads(text)
            for parent, types in block.items() for entry in types for type_id, info in entry.items()}


def labels_of(key: str) -> str:
    return next(label for k, label, _ in COMMANDS if k == key)


def check_outputs(outputs: dict[str, str], active: int, defined: int) -> list[str]:
    notes: list[str] = []
    rows: list[dict[str, Any]] = json.loads(outputs["v-list"])
    v_active = {(r["parent"], r["uuid"]) for r in rows if r["active"]}
    v_defined = {(r["parent"], r["uuid"]) for r in rows if r["defined"]}
    m_active, m_defined = mdevctl_uuids(outputs["m-list"]), mdevctl_uuids(outputs["m-list-d"])
    if v_active != m_active or len(m_active) != active:
        notes.append(f"WARNING: active vGPUs: vgpuctl {len(v_active)}, mdevctl {len(m_active)}, created {active}")
    if v_defined != m_defined or len(m_defined) != defined:
        notes.append(f"WARNING: defined vGPUs: vgpuctl {len(v_defined)}, mdevctl {len(m_defined)}, made {defined}")
    v_types = {(t["parent"], t["type"]): int(t["available_instances"]) for t in json.loads(outputs["v-types"])}
    m_types = mdevctl_types(outputs["m-types"])
    if v_types != m_types:
        notes.append(f"WARNING: types differ: vgpuctl {len(v_types)}, mdevctl {len(m_types)} "
                     f"({len(set(v_types.items()) ^ set(m_types.items()))} differing entries)")
    owned = sum(1 for r in rows if r.get("owner") == "vgpuctl")
    notes.append(f"outputs agree: vgpuctl list has {len(rows)} rows ({len(v_active)} active, {len(v_defined)} "
                 f"defined, {len(v_active & v_defined)} both, {owned} owned by vgpuctl) = mdevctl list "
                 f"{len(m_active)} + list --defined {len(m_defined)}; {len(v_types)} types, same "
                 f"available_instances" if not notes else "outputs checked (see warnings)")
    return notes


# ---------------------------------------------------------------------------------------------- measuring
def whole_processes(trees: dict[str, Path], state: Path, link: Path, runs: int,
                    ) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], str]]:
    """Every command on every tree runs+1 times, interleaved (order reversed every other round); round 0 is a
    warm-up, whose output is kept for the checks. On the static copy only the namespace floor and the pairs."""
    argvs: dict[tuple[str, str], list[str]] = {}
    for tree, root in trees.items():
        for command, _, text in COMMANDS:
            if tree == "mount" or command in STATIC_KEYS:
                argvs[tree, command] = in_namespace(root, text.format(state=shlex.quote(str(state)),
                                                                      link=shlex.quote(str(link))))
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in argvs}
    outputs: dict[tuple[str, str], str] = {}
    for round_index in range(runs + 1):
        order = list(argvs) if round_index % 2 == 0 else list(reversed(argvs))
        for key in order:
            elapsed, out = run_timed(argvs[key])
            if round_index:
                samples[key].append(elapsed)
            else:
                outputs[key] = out
    return samples, outputs


def bare_python(runs: int) -> list[float]:
    """``python -c pass`` of the venv outside any namespace: the interpreter's floor."""
    run_timed([PYTHON, "-c", "pass"])
    return [run_timed([PYTHON, "-c", "pass"])[0] for _ in range(runs)]


def in_process(query: Callable[[], object], runs: int) -> list[float]:
    query()  # warm-up (imports done, kernel dentry/attr caches filled)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        query()
        samples.append(time.perf_counter() - start)
    return samples


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)$", re.MULTILINE)


@dataclass
class Imports:
    """``-X importtime`` over several runs: per module its nesting depth and cumulative seconds per run."""

    depth: dict[str, int]
    cumulative: dict[str, list[float]]

    def top(self, count: int, depth: int | None = None, skip: Sequence[str] = ()) -> list[str]:
        names = [m for m in self.cumulative if m not in skip and (depth is None or self.depth[m] == depth)]
        return sorted(names, key=lambda m: statistics.median(self.cumulative[m]), reverse=True)[:count]

    def total(self) -> list[float]:
        """Per run, the sum of the top-level imports: all import time of the process."""
        top_level = [self.cumulative[m] for m in self.cumulative if self.depth[m] == 0]
        return [sum(values) for values in zip(*top_level, strict=False)] if top_level else []


def import_times(argv: list[str], runs: int) -> Imports:
    """Run argv (which has ``-X importtime``) runs+1 times, the first as a warm-up; parse its stderr."""
    imports = Imports({}, {})
    for round_index in range(runs + 1):
        done = subprocess.run(argv, capture_output=True, text=True, env=child_env())
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed: {done.stderr.strip()[-2000:]}")
        if not round_index:
            continue
        this_run: dict[str, float] = {}
        for match in _IMPORT_LINE.finditer(done.stderr):
            module = match[4]
            # a module can show twice when a failed import is retried: keep the larger
            this_run[module] = max(this_run.get(module, 0.0), int(match[2]) * 1e-6)
            imports.depth.setdefault(module, len(match[3]) // 2)
        for module, seconds in this_run.items():
            imports.cumulative.setdefault(module, []).append(seconds)
    # modules seen in only some runs would skew the per-run total: keep those seen in every run
    imports.cumulative = {m: v for m, v in imports.cumulative.items() if len(v) == runs}
    return imports


# ---------------------------------------------------------------------------------------------- the run
def bench(root: Path, work: Path, opts: Options, rows: list[Row], notes: list[str]) -> None:
    state = work / "state"
    state.mkdir()
    active = populate(root)
    defined, warnings = define_devices(root, state)
    notes += warnings
    trees = {"mount": root}
    if opts.static:
        step("copying the mounted sys/ and etc/mdevctl.d to disk (the static peer)")
        static = work / "static"
        (static / "etc").mkdir(parents=True)
        start = time.perf_counter()
        entries, _ = static_copy(root / "sys", static / "sys")
        static_copy(root / "etc/mdevctl.d", static / "etc/mdevctl.d")
        notes.append(f"static copy: {entries} entries of sys/ and etc/mdevctl.d copied in "
                     f"{time.perf_counter() - start:.1f} s (write-only create/remove as empty files)")
        trees["static"] = static

    step(f"A. {len(COMMANDS)} commands x {opts.runs} runs (+1 warm-up) in a private mount namespace"
         f"{', 5 of them also on the static copy' if opts.static else ''}; {active} vGPUs active, {defined} defined")
    link = work / "bin/mdevctl"  # vgpuctl stands in for mdevctl when invoked by that name
    link.parent.mkdir()
    link.symlink_to(VGPUCTL)
    samples, outputs = whole_processes(trees, state, link, opts.runs)
    for stand_in, real in (("s-list", "m-list"), ("s-types", "m-types")):
        if outputs["mount", stand_in] != outputs["mount", real]:
            notes.append(f"WARNING: vgpuctl as mdevctl and mdevctl differ ({labels_of(stand_in)})")
    notes += check_outputs({key: out for (tree, key), out in outputs.items() if tree == "mount"}, active, defined)
    if opts.static:
        differ = [key for (tree, key), out in outputs.items() if tree == "static" and out != outputs["mount", key]]
        if differ:
            notes.append(f"WARNING: the static copy gives different output for {', '.join(differ)}")
    bare = bare_python(opts.runs)
    step(f"B. in-process queries x {opts.inproc_runs} per tree")
    inproc: dict[tuple[str, str], list[float]] = {}
    for tree, tree_root in trees.items():
        host = HostRoot(tree_root)

        def list_query(host: HostRoot = host) -> tuple[list[Any], list[Any]]:
            return active_devices(host), definitions.load_all(host)

        def types_query(host: HostRoot = host) -> list[Any]:
            return [t for p in parent_names(host) for t in read_types(host, p)]

        inproc[tree, "list"] = in_process(list_query, opts.inproc_runs)
        inproc[tree, "types"] = in_process(types_query, opts.inproc_runs)
        got_active, got_defined = list_query()
        if len(got_active) != active or len(got_defined) != defined or len(types_query()) != TYPES:
            notes.append(f"WARNING: in-process queries on the {tree} found {len(got_active)} active, "
                         f"{len(got_defined)} defined, {len(types_query())} types")
    step(f"C. python -X importtime: import vgpuctl.cli, and vgpuctl list --json, x {opts.importtime_runs}")
    cli_imports = import_times([PYTHON, "-X", "importtime", "-c", "import vgpuctl.cli.app"], opts.importtime_runs)
    list_text = f"exec {PYTHON} -X importtime {VGPUCTL} --state-dir {shlex.quote(str(state))} list --json"
    run_imports = import_times(in_namespace(root, list_text), opts.importtime_runs)

    med = {key: statistics.median(values) for key, values in samples.items()}
    labels = {key: label for key, label, _ in COMMANDS}
    rows.append(Row("A", "python -c pass (venv, no namespace)", bare, "interpreter floor"))
    rows.append(Row("A", labels["ns"], samples["mount", "ns"], "namespace floor, in every row below"))
    rows.append(Row("A", labels["pass"], samples["mount", "pass"],
                    f"interpreter: +{(med['mount', 'pass'] - med['mount', 'ns']) * 1e3:.1f} ms"))
    rows.append(Row("A", labels["import"], samples["mount", "import"],
                    f"CLI imports: +{(med['mount', 'import'] - med['mount', 'pass']) * 1e3:.1f} ms over "
                    "python -c pass"))
    verdicts: list[str] = []
    for tree in trees:
        section = "A" if tree == "mount" else "D"
        if tree == "static":
            rows.append(Row(section, f"{labels['ns']} (static)", samples[tree, "ns"], "namespace floor"))
        suffix = "" if tree == "mount" else " (static)"
        for what, v_key, m_key in PAIRS:
            v, m, ns = med[tree, v_key], med[tree, m_key], med[tree, "ns"]
            ratio = v / m
            net = f"{(v - ns) / (m - ns):.2f}×" if m - ns >= 1e-3 else "n/a (mdevctl < 1 ms net)"
            note = f"vgpuctl/mdevctl {ratio:.2f}×, net of ns {net}"
            if tree == "mount":
                note += (f" (target ≤ {TARGET_CLI_RATIO:g}×: {'holds' if ratio <= TARGET_CLI_RATIO else 'MISSED'})"
                         f"; {(v - med['mount', 'import']) * 1e3:.0f} ms after import vgpuctl.cli")
                verdicts.append(f"target: vgpuctl {what} --json within {TARGET_CLI_RATIO:g}× of mdevctl's wall "
                                f"time: {'HOLDS' if ratio <= TARGET_CLI_RATIO else 'MISSED'} ({ratio:.2f}×, "
                                f"{v * 1e3:.0f} vs {m * 1e3:.0f} ms)")
            rows.append(Row(section, labels[v_key] + suffix, samples[tree, v_key], note))
            rows.append(Row(section, labels[m_key] + suffix, samples[tree, m_key],
                            f"net of ns {(m - ns) * 1e3:.1f} ms"))
            if tree == "mount" and what == "list":
                rows.append(Row(section, labels["m-list-d"], samples[tree, "m-list-d"],
                                f"the defined half (vgpuctl list shows both); net of ns "
                                f"{(med[tree, 'm-list-d'] - ns) * 1e3:.1f} ms"))
            if tree == "mount":
                stand_in = f"s-{what}"
                rows.append(Row(section, labels[stand_in], samples[tree, stand_in],
                                f"stand-in/mdevctl {med[tree, stand_in] / m:.2f}×, same stdout: no click "
                                f"(~{(med['mount', 'import'] - med['mount', 'pass']) * 1e3:.0f} ms of CLI imports)"))
    queries = {"list": "list query in-process (active_devices + load_all)",
               "types": "types query in-process (read_types × parent_names)"}
    for tree in trees:
        section = "B" if tree == "mount" else "D"
        suffix = "" if tree == "mount" else " (static)"
        for what, v_key, m_key in PAIRS:
            query = statistics.median(inproc[tree, what])
            speedup = med[tree, m_key] / query
            note = f"spawning mdevctl / this: {times(speedup)}"
            if tree == "mount":
                ok = speedup >= TARGET_INPROC_RATIO
                note += f" (target ≥ {TARGET_INPROC_RATIO:g}×: {'holds' if ok else 'MISSED'})"
                verdicts.append(f"target: {what} query in-process ≥ {TARGET_INPROC_RATIO:g}× faster than spawning "
                                f"mdevctl: {'HOLDS' if ok else 'MISSED'} ({times(speedup)})")
            note += f"; spawning vgpuctl / this: {times(med[tree, v_key] / query)}"
            rows.append(Row(section, queries[what] + suffix, inproc[tree, what], note))
    rows.append(Row("C", "import vgpuctl.cli: all imports (-X importtime)", cli_imports.total(),
                    "sum of top-level cumulative times; -X importtime adds its own overhead"))
    for module in cli_imports.top(TOP_IMPORTS, skip=("vgpuctl.cli.app",)):
        level = cli_imports.depth[module]
        rows.append(Row("C", f"{'  ' * level}{module}", cli_imports.cumulative[module],
                        f"cumulative, nesting depth {level}"))
    rows.append(Row("C", "vgpuctl list --json: all imports (-X importtime)", run_imports.total(),
                    "the whole process, in the namespace"))
    for module in run_imports.top(5, depth=0):
        rows.append(Row("C", f"  {module}", run_imports.cumulative[module],
                        "top-level import of the process" + (", made after import vgpuctl.cli"
                                                              if module not in cli_imports.cumulative else "")))
    notes += verdicts


def times(ratio: float) -> str:
    return f"{ratio:.1f}×" if ratio < 10 else f"{ratio:.0f}×"


def render(rows: Sequence[Row], markdown: bool) -> Table:
    table = Table(title=f"vgpuctl CLI vs mdevctl 1.2.0, simulated host preset {PRESET!r} (times in ms)",
                  box=box.MARKDOWN if markdown else box.SIMPLE_HEAD)
    for column, justify in (("#", "right"), ("measurement", "left"), ("n", "right"), ("median", "right"),
                            ("p95", "right"), ("note", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(row.section, row.what, str(row.n), fmt_ms(row.median_ms), fmt_ms(row.pct_ms(95)), row.note)
    return table


def parse(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="whole-process runs of each command")
    parser.add_argument("--inproc-runs", type=int, default=50, help="in-process runs of each query")
    parser.add_argument("--importtime-runs", type=int, default=5, help="runs of python -X importtime")
    parser.add_argument("--no-static", action="store_true", help="skip the peer on a static on-disk copy")
    parser.add_argument("--quick", action="store_true", help="few iterations (seconds): a smoke run, not numbers")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.quick:
        return Options(3, 5, 1, not args.no_static, args.markdown)
    if min(args.runs, args.inproc_runs, args.importtime_runs) < 1:
        parser.error("iteration counts must be at least 1")
    return Options(args.runs, args.inproc_runs, args.importtime_runs, not args.no_static, args.markdown)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: unmount, remove temp files


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    why_not = mdevctl_ready()
    if why_not:
        console.print(f"[red]cannot run: {why_not}[/red]")
        return 2
    if not os.access(VGPUCTL, os.X_OK):
        console.print(f"[red]cannot run: {VGPUCTL} not found (run with the venv's python after make deps)[/red]")
        return 2
    for key, value in machine_facts():
        console.print(f"[bold]{key}:[/bold] {value}")
    console.print(f"[bold]date:[/bold] {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    rows: list[Row] = []
    notes: list[str] = []
    started = time.perf_counter()
    run_on_mounted_host("vgpuctl-bench-cli-", lambda root, work: bench(root, work, opts, rows, notes), notes)
    # Markdown rows must not wrap (one table row per line): print them on a console as wide as needed.
    (Console(width=1000) if opts.markdown else console).print(render(rows, opts.markdown))
    for note in notes:
        console.print(f"- {note}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    console.print(f"- total {time.perf_counter() - started:.1f} s; load average at the end {load}")
    return 1 if any(note.startswith("WARNING") for note in notes) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as e:
        if e.errno == errno.EACCES and os.geteuid() != 0:
            sys.exit(f"{e}: run as root (FUSE with allow_other, unshare, bind mounts)")
        raise
