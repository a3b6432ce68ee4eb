"""Benchmark the simulated vGPU host: reads, create/remove, and Debian's mdevctl over the FUSE mount.

Run as root (FUSE, unshare, bind mounts) with ``make bench`` or ``.venv/bin/python bench/bench_sim.py``.
Mounts the ``large`` preset (8 NVIDIA Tesla T4 + a Coffee Lake iGPU with a 1 GiB aperture) in a
temporary directory and measures:

1. open/read/close of ``available_instances``, ``description`` and ``name`` of every type of every
   parent through the mount (via ``/sys/class/mdev_bus/...`` as tools do, and via the resolved
   ``/sys/devices/...`` path), with one FUSE round trip (``pread`` of an open attribute) for scale;
2. create/remove of a GVT vGPU through the mount (write a UUID to ``create``, ``1`` to ``remove``);
3. the same reads and create/remove against the in-process model (``SimHost``): the FUSE overhead;
4. ``mdevctl types`` and ``mdevctl list`` (7 GVT + 16 NVIDIA devices active) in a private mount
   namespace with the mount bound over ``/sys`` and ``/etc/mdevctl.d``, against the same commands on a
   plain on-disk copy of that tree; the unshare + bind-mount cost is timed on its own and subtracted.

No accelerator, GPU, KVM or QEMU is involved: everything is the simulator and the kernel's FUSE.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import os
import platform
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich import box
from rich.console import Console
from rich.table import Table

from vgpuctl.sim import mount as sim_mount
from vgpuctl.sim.host import SimHost
from vgpuctl.sim.presets import preset

PRESET = "large"
GVT_PARENT = "0000:00:02.0"
GVT_TYPE = "i915-GVTg_V5_8"  # the smallest GVT type: 7 fit a 1 GiB aperture
GVT_ACTIVE = 7
NVIDIA_TYPE = "nvidia-222"  # GRID T4-1B: 16 per T4
NVIDIA_PER_PARENT = 2  # 2 on each of the 8 T4s: 16 NVIDIA vGPUs
ATTRS = ("available_instances", "description", "name")
MDEVCTL = "/usr/bin/mdevctl"
MDEV_BUS = "/sys/class/mdev_bus"
TARGET_MEDIAN_MS = 1.0

console = Console(width=None if sys.stdout.isatty() else 150)  # make/CI pipes: no 80-column wrapping


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    section: str
    what: str
    samples_s: list[float]
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.samples_s)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_s) * 1e3

    def pct_ms(self, p: int) -> float:
        if len(self.samples_s) < 2:
            return self.samples_s[0] * 1e3
        return statistics.quantiles(self.samples_s, n=100, method="inclusive")[p - 1] * 1e3


def fmt_ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def render(rows: Sequence[Row], markdown: bool) -> Table:
    table = Table(title=f"vgpuctl simulated host, preset {PRESET!r} (times in ms)",
                  box=box.MARKDOWN if markdown else box.SIMPLE_HEAD)
    table.add_column("#", justify="right")
    table.add_column("measurement")
    table.add_column("n", justify="right")
    table.add_column("median", justify="right")
    table.add_column("p95", justify="right")
    table.add_column("p99", justify="right")
    table.add_column("note")
    for row in rows:
        table.add_row(row.section, row.what, str(row.n), fmt_ms(row.median_ms), fmt_ms(row.pct_ms(95)),
                      fmt_ms(row.pct_ms(99)), row.note)
    return table


# ---------------------------------------------------------------------------------------------- machine
def machine_facts() -> list[tuple[str, str]]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not found"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"

    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    uname = platform.uname()
    return [
        ("CPUs", f"{os.cpu_count()} online, {len(os.sched_getaffinity(0))} usable by this process ({model})"),
        ("kernel", f"{uname.system} {uname.release} {uname.machine}"),
        ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("mfusepy / libfuse", f"{dist('mfusepy')} / {version(['fusermount3', '-V'])}"),
        ("mdevctl", f"{MDEVCTL}: {version([MDEVCTL, '--version'])}"),
        ("FUSE options", fuse_options()),
    ]


def fuse_options() -> str:
    """What the simulator asks the kernel to cache (read from vgpuctl.sim.fuse, which changes over time)."""
    try:
        from vgpuctl.sim import fuse
    except Exception as e:  # e.g. libfuse3 missing: the mount will say so itself
        return f"? (vgpuctl.sim.fuse: {e})"
    seconds = getattr(fuse, "CACHE_SECONDS", 0)
    if not seconds:
        return "direct_io, entry/attr/negative timeout 0 (every lookup and getattr reaches the server)"
    return (f"direct_io, entry/attr timeout {seconds} s with explicit invalidation, negative timeout 0 "
            "(cached lookups and getattrs do not reach the server; readdir, readlink, open/read do)")


# ---------------------------------------------------------------------------------------------- helpers
def attribute_paths(listdir: Callable[[str], list[str]]) -> list[str]:
    """Host paths of the benchmarked attributes of every type of every parent (class paths)."""
    paths = []
    for parent in listdir(MDEV_BUS):
        types_dir = f"{MDEV_BUS}/{parent}/mdev_supported_types"
        for type_id in listdir(types_dir):
            paths += [f"{types_dir}/{type_id}/{attr}" for attr in ATTRS]
    return paths


def timed_reads(paths: Sequence[str], rounds: int) -> list[float]:
    """open/read/close of every path, rounds times; one warm-up pass first (not recorded)."""
    samples: list[float] = []
    clock = time.perf_counter
    for round_index in range(rounds + 1):
        for path in paths:
            start = clock()
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.read(fd, 4096)
            finally:
                os.close(fd)
            elapsed = clock() - start
            if not data:
                raise RuntimeError(f"empty read from {path}")
            if round_index:
                samples.append(elapsed)
    return samples


def timed_round_trip(path: str, count: int) -> list[float]:
    """One FUSE READ round trip per call (direct_io: never served from the page cache): the per-request
    floor. (An fstat was used while attr_timeout was 0; with cached attributes it no longer reaches the server.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            os.pread(fd, 4096, 0)
            samples.append(time.perf_counter() - start)
    finally:
        os.close(fd)
    return samples


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def create_remove(write: Callable[[str, bytes], object], exists: Callable[[str], bool], count: int,
                  ) -> tuple[list[float], list[float]]:
    """Create then remove a GVT vGPU count times (one warm-up pair first); per-create and per-remove times."""
    create = f"{MDEV_BUS}/{GVT_PARENT}/mdev_supported_types/{GVT_TYPE}/create"
    creates: list[float] = []
    removes: list[float] = []
    for index in range(count + 1):
        name = str(uuid.uuid4())
        device = f"/sys/bus/mdev/devices/{name}"
        start = time.perf_counter()
        write(create, name.encode())
        created = time.perf_counter() - start
        if not exists(device):
            raise RuntimeError(f"{device} missing after writing {name} to {create}")
        start = time.perf_counter()
        write(f"{device}/remove", b"1")
        removed = time.perf_counter() - start
        if exists(device):
            raise RuntimeError(f"{device} still there after writing 1 to its remove")
        if index:
            creates.append(created)
            removes.append(removed)
    return creates, removes


def populate(root: Path) -> int:
    """7 GVT + 16 NVIDIA vGPUs, created through the mount; returns how many are active."""
    bus = root / MDEV_BUS.lstrip("/")
    for _ in range(GVT_ACTIVE):
        write_file(str(bus / GVT_PARENT / "mdev_supported_types" / GVT_TYPE / "create"), str(uuid.uuid4()).encode())
    for parent in sorted(os.listdir(bus)):
        if parent == GVT_PARENT:
            continue
        for _ in range(NVIDIA_PER_PARENT):
            write_file(str(bus / parent / "mdev_supported_types" / NVIDIA_TYPE / "create"),
                       str(uuid.uuid4()).encode())
    return len(os.listdir(root / "sys/bus/mdev/devices"))


def static_copy(src: Path, dst: Path) -> tuple[int, int]:
    """``cp -a`` of a tree (symlinks kept as symlinks), except that a file that cannot be read —
    sysfs' write-only ``create``/``remove`` refuse even root with EACCES — becomes an empty file of
    the same mode (``cp -a`` would fail on it and leave it out). Returns (entries, placeholders)."""
    entries = placeholders = 0
    dst.mkdir(mode=src.stat().st_mode & 0o7777)
    for dirpath, dirnames, filenames in os.walk(src):  # followlinks=False: never enters a symlinked dir
        out = dst / os.path.relpath(dirpath, src)
        for name in dirnames + filenames:
            source, target = os.path.join(dirpath, name), out / name
            mode = os.lstat(source).st_mode
            entries += 1
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(source), target)
                continue
            if stat.S_ISDIR(mode):
                target.mkdir()
            else:
                try:
                    with open(source, "rb") as f:
                        data = f.read()
                except PermissionError:
                    data, placeholders = b"", placeholders + 1
                target.write_bytes(data)
            os.chmod(target, stat.S_IMODE(mode))
    return entries, placeholders


def in_namespace(sys_dir: Path, etc_dir: Path, command: str) -> list[str]:
    script = (f"mount --bind {shlex.quote(str(sys_dir))} /sys && "
              f"mount --bind {shlex.quote(str(etc_dir))} /etc/mdevctl.d && {command}")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script]


def run_timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed, done.stdout


def mdevctl_ready() -> str | None:
    """Why the mdevctl part cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root (unshare -m and bind mounts need root)"
    if not os.access(MDEVCTL, os.X_OK):
        return f"{MDEVCTL} not found (apt-get install mdevctl)"
    if shutil.which("unshare") is None:
        return "unshare not found (util-linux)"
    if not os.path.isdir("/etc/mdevctl.d"):
        return "/etc/mdevctl.d does not exist (nothing to bind over)"
    return None


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Options:
    read_rounds: int
    model_rounds: int
    round_trips: int
    create_remove: int
    mdevctl_runs: int
    markdown: bool


def bench(root: Path, work: Path, opts: Options, rows: list[Row], notes: list[str]) -> None:
    host = SimHost.from_preset(PRESET)
    paths = attribute_paths(host.listdir)
    mounted_class = [str(root) + p for p in paths]
    mounted_device = [os.path.realpath(p) for p in mounted_class]
    listed = attribute_paths(lambda p: sorted(os.listdir(str(root) + p)))
    if listed != paths:
        notes.append("WARNING: the mount and the in-process model list different attributes")
    notes.append(f"{len(paths)} attributes: {len(ATTRS)} per type, "
                 f"{len(host.listdir(MDEV_BUS))} parents, {len(paths) // len(ATTRS)} types")

    # 1. reads through the mount
    step(f"1. reads through the mount: {opts.read_rounds} rounds x {len(paths)} attributes")
    class_reads = timed_reads(mounted_class, opts.read_rounds)
    device_reads = timed_reads(mounted_device, opts.read_rounds)
    round_trips = timed_round_trip(mounted_class[0], opts.round_trips)

    # 3. the same reads in-process
    step(f"3. reads in-process: {opts.model_rounds} rounds x {len(paths)} attributes")
    model_reads: list[float] = []
    clock = time.perf_counter
    for round_index in range(opts.model_rounds + 1):
        for path in paths:
            start = clock()
            data = host.read(path)
            elapsed = clock() - start
            if not data:
                raise RuntimeError(f"empty in-process read from {path}")
            if round_index:
                model_reads.append(elapsed)

    # 2. create/remove through the mount and in-process
    step(f"2. create/remove of a {GVT_TYPE} vGPU: {opts.create_remove} pairs, mount and in-process")
    fuse_create, fuse_remove = create_remove(lambda p, d: write_file(str(root) + p, d),
                                             lambda p: os.path.lexists(str(root) + p), opts.create_remove)
    model_create, model_remove = create_remove(host.write, host.exists, opts.create_remove)

    model_median = statistics.median(model_reads)
    class_row = Row("1", "read attr via mount, /sys/class/mdev_bus/… path", class_reads,
                    f"{statistics.median(class_reads) / model_median:.0f}× in-process")
    rows += [
        class_row,
        Row("1", "read attr via mount, resolved /sys/devices/… path", device_reads,
            f"{statistics.median(device_reads) / model_median:.0f}× in-process"),
        Row("1", "one FUSE round trip (pread of an open attr)", round_trips, "per-request floor"),
        Row("2", f"create {GVT_TYPE} via mount (write UUID)", fuse_create,
            f"{statistics.median(fuse_create) / statistics.median(model_create):.0f}× in-process"),
        Row("2", "remove via mount (write 1)", fuse_remove,
            f"{statistics.median(fuse_remove) / statistics.median(model_remove):.0f}× in-process"),
        Row("3", "read attr in-process (SimHost.read)", model_reads, "same paths, no FUSE"),
        Row("3", "create in-process (SimHost.write)", model_create),
        Row("3", "remove in-process (SimHost.write)", model_remove),
    ]
    verdict = "meets" if class_row.median_ms < TARGET_MEDIAN_MS else "MISSES"
    notes.append(f"median read through the mount {class_row.median_ms:.3f} ms {verdict} the "
                 f"< {TARGET_MEDIAN_MS:g} ms target")

    # 4. mdevctl against the mount and against a static copy
    why_not = mdevctl_ready()
    if why_not:
        notes.append(f"mdevctl part skipped: {why_not}")
        return
    active = populate(root)
    step(f"4. mdevctl: {active} vGPUs active; copying sys/ and etc/mdevctl.d to disk")
    start = time.perf_counter()
    entries, placeholders = static_copy(root / "sys", work / "static-sys")
    static_copy(root / "etc/mdevctl.d", work / "static-mdevctl.d")
    notes.append(f"static copy of sys/: {entries} entries ({placeholders} write-only attributes as empty "
                 f"files) in {time.perf_counter() - start:.1f} s; {active} vGPUs active for mdevctl")
    trees = {
        "mount": (root / "sys", root / "etc/mdevctl.d"),
        "static": (work / "static-sys", work / "static-mdevctl.d"),
    }
    commands = {"ns": "true", "types": f"{MDEVCTL} types", "list": f"{MDEVCTL} list"}
    samples: dict[tuple[str, str], list[float]] = {(t, c): [] for t in trees for c in commands}
    outputs: dict[tuple[str, str], str] = {}
    step(f"4. mdevctl types/list: {opts.mdevctl_runs} runs each on the mount and on the copy (interleaved)")
    for _ in range(opts.mdevctl_runs + 1):  # the first round warms up and is not recorded
        for tree, (sys_dir, etc_dir) in trees.items():
            for command, text in commands.items():
                elapsed, out = run_timed(in_namespace(sys_dir, etc_dir, text))
                if (tree, command) in outputs:
                    samples[tree, command].append(elapsed)
                else:
                    outputs[tree, command] = out
    for command in ("types", "list"):
        if outputs["mount", command] != outputs["static", command]:
            notes.append(f"WARNING: mdevctl {command} prints different output on the mount and on the copy")
    listed_devices = sum(1 for line in outputs["mount", "list"].splitlines() if line.strip())
    if listed_devices != active:
        notes.append(f"WARNING: mdevctl list shows {listed_devices} devices, {active} are active")
    type_count = sum(1 for line in outputs["mount", "types"].splitlines() if line.startswith("  ")
                     and not line.startswith("    "))
    notes.append(f"mdevctl types lists {type_count} types; mdevctl list {listed_devices} devices")

    ns = {tree: statistics.median(samples[tree, "ns"]) for tree in trees}
    for tree in trees:
        rows.append(Row("4", f"unshare -m + 2 bind mounts + true ({tree})", samples[tree, "ns"],
                        "overhead, subtracted below"))
    for command in ("types", "list"):
        net = {tree: statistics.median(samples[tree, command]) - ns[tree] for tree in trees}
        for tree in trees:
            note = f"net of ns: {net[tree] * 1e3:.1f} ms"
            if tree == "mount":
                raw = statistics.median(samples["mount", command]) / statistics.median(samples["static", command])
                ratio = f"{net['mount'] / net['static']:.0f}×" if net["static"] > 0 else "n/a"
                note += f"; mount/static {ratio} net, {raw:.1f}× raw"
            rows.append(Row("4", f"mdevctl {command} ({tree})", samples[tree, command], note))


def step(message: str) -> None:
    console.print(f"[dim]… {message}[/dim]")


def parse(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--read-rounds", type=int, default=10, help="passes over all attributes through the mount")
    parser.add_argument("--model-rounds", type=int, default=50, help="passes over all attributes in-process")
    parser.add_argument("--round-trips", "--fstat", dest="round_trips", type=int, default=2000,
                        help="single FUSE round trips (pread of an open attribute)")
    parser.add_argument("--create-remove", type=int, default=100, help="create/remove pairs")
    parser.add_argument("--mdevctl-runs", type=int, default=15, help="runs of each mdevctl command per tree")
    parser.add_argument("--quick", action="store_true", help="few iterations (seconds): a smoke run, not numbers")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.quick:
        return Options(1, 5, 200, 10, 2, args.markdown)
    counts = (args.read_rounds, args.model_rounds, args.round_trips, args.create_remove, args.mdevctl_runs)
    if min(counts) < 1:
        parser.error("iteration counts must be at least 1")
    return Options(*counts, markdown=args.markdown)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: unmount, remove temp files


def run_on_mounted_host(prefix: str, work_fn: Callable[[Path, Path], None], notes: list[str]) -> None:
    """Mount PRESET in a fresh temp dir, run work_fn(root, work), and always unmount and clean up."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    root = work / "host"
    root.mkdir()
    load_start, cpus = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load_start > 0.5 * cpus:
        notes.append(f"busy machine: 1-min load {load_start:.2f} at the start on {cpus} CPUs; expect noisy numbers")
    try:
        step(f"mounting preset {PRESET!r} at {root}")
        sim_mount.mount(preset(PRESET).to_json(), root, PRESET)
        work_fn(root, work)
    finally:
        unmounted = True
        if sim_mount.is_sim_mount(root):
            try:
                sim_mount.umount(root)
            except sim_mount.MountError as e:
                console.print(f"[yellow]{e}; unmounting lazily[/yellow]")
                with contextlib.suppress(sim_mount.MountError):
                    sim_mount.umount(root, lazy=True)
            unmounted = not sim_mount.is_sim_mount(root)
        if unmounted:
            shutil.rmtree(work, ignore_errors=True)
        else:
            console.print(f"[red]could not unmount {root}; left {work} in place[/red]")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    facts = machine_facts()
    for key, value in facts:
        console.print(f"[bold]{key}:[/bold] {value}")
    console.print(f"[bold]date:[/bold] {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    rows: list[Row] = []
    notes: list[str] = []
    started = time.perf_counter()
    run_on_mounted_host("vgpuctl-bench-", lambda root, work: bench(root, work, opts, rows, notes), notes)
    console.print(render(rows, opts.markdown))
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
