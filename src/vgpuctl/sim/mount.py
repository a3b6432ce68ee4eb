"""Mount a simulated host in the background, and unmount it again.

``mount()`` starts a detached server process (``python -m vgpuctl.sim.mount``) and returns once
the filesystem answers; ``umount()`` unmounts it and waits for the server to exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vgpuctl.sim.fuse import FSTYPE

READY_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 10.0


class MountError(Exception):
    """A simulated host could not be mounted or unmounted; the message says what to do."""


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_entry(directory: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(fstype, source) of what is mounted exactly at directory, from /proc/self/mountinfo."""
    target = os.path.abspath(directory)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) > 4 and rest and _unescape(fields[4]) == target:
                found = (rest[0], rest[1] if len(rest) > 1 else "")
    return found  # the last entry wins: it is the one on top


def is_sim_mount(directory: str | os.PathLike[str]) -> bool:
    entry = mount_entry(directory)
    return entry is not None and entry[0] == f"fuse.{FSTYPE}"


def _fuse_available() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE works")
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 not found: install Debian's fuse3 package (apt-get install fuse3)")


def _check_mountpoint(directory: Path) -> None:
    try:
        st = directory.stat()
    except FileNotFoundError:
        raise MountError(f"{directory} does not exist: create it first (mkdir -p {directory})") from None
    except OSError as e:  # ENOTCONN: a simulator that died without unmounting
        raise MountError(
            f"{directory} is a stale mount ({e.strerror}): run 'vgpuctl sim umount {directory}' first"
        ) from None
    if not os.path.isdir(directory) or not st:
        raise MountError(f"{directory} is not a directory")
    entry = mount_entry(directory)
    if entry is not None:
        what = "a simulated host" if entry[0] == f"fuse.{FSTYPE}" else f"a {entry[0]} filesystem"
        raise MountError(f"{directory} is busy: {what} is already mounted there; unmount it first")
    if any(directory.iterdir()):
        raise MountError(f"{directory} is not empty: mount a simulated host on an empty directory")


def mount(spec_json: str, directory: str | os.PathLike[str], preset_name: str) -> int:
    """Start a server for the host described by ``spec_json`` at ``directory``; return its pid."""
    _fuse_available()
    target = Path(directory).absolute()
    _check_mountpoint(target)
    log_dir = Path(tempfile.gettempdir()) / "vgpuctl-sim"
    log_dir.mkdir(exist_ok=True)
    log_path = log_dir / f"{str(target).strip('/').replace('/', '_') or 'root'}.log"
    read_fd, write_fd = os.pipe()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "vgpuctl.sim.mount", str(target), preset_name, spec_json,
             str(write_fd), str(log_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_fd,),
            start_new_session=True,  # keeps serving after the caller (a shell, a test) exits
        )
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        # The server writes "ready" from FUSE's init callback, or exits (closing the pipe) on failure.
        message = ready.read()
    if message != "ready":
        try:
            server.wait(timeout=READY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
        raise MountError(f"the simulator did not start: {log_path.read_text().strip()[-2000:]}")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not is_sim_mount(target):
        if time.monotonic() > deadline or server.poll() is not None:
            raise MountError(f"the simulator did not mount {target}: see {log_path}")
        time.sleep(0.01)
    return server.pid


def umount(directory: str | os.PathLike[str], lazy: bool = False) -> None:
    """Unmount a simulated host and wait for its server to exit."""
    target = Path(directory).absolute()
    if not is_sim_mount(target):
        raise MountError(f"no simulated host is mounted at {target}")
    pid = None
    with contextlib.suppress(OSError, ValueError, KeyError):  # a stale mount has no marker
        pid = int(json.loads((target / ".vgpuctl-sim").read_text())["pid"])
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(target)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 and is_sim_mount(target):
        detail = done.stderr.strip()
        if "busy" in detail.lower():
            raise MountError(
                f"{target} is busy: a process still uses it (see 'fuser -vm {target}'); "
                "close it, or unmount with --lazy"
            )
        raise MountError(f"could not unmount {target}: {detail}")
    if pid is not None:
        _wait_exit(pid)


def _wait_exit(pid: int) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _server_main(argv: list[str]) -> None:
    """The background server: build the host, mount, report readiness, serve."""
    from vgpuctl.sim.fuse import serve
    from vgpuctl.sim.host import SimHost
    from vgpuctl.sim.presets import HostSpec

    mountpoint, preset_name, spec_json, ready_fd, log_path = argv
    spec = HostSpec.from_json(spec_json)
    host = SimHost(spec, preset_name=preset_name)
    host.marker_extra = {"pid": os.getpid(), "mountpoint": mountpoint, "log": log_path}
    fd = int(ready_fd)

    def ready() -> None:
        os.write(fd, b"ready")
        os.close(fd)

    serve(host, mountpoint, on_ready=ready)


if __name__ == "__main__":
    _server_main(sys.argv[1:])
