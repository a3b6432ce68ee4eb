"""vgpuctl's one installer: the files and links it puts on a host outside its state directory, recorded so
that they can be taken back exactly.

Used by ``vgpuctl setup`` (boot command line, modules-load.d, modprobe.d: :mod:`vgpuctl.host.setup`) and
``vgpuctl install-units`` (systemd units, udev rules: :mod:`vgpuctl.host.units`). Each keeps a
:class:`Record` in its own directory of the state directory (setup/, units/), in one format: for every
path vgpuctl changed, what was there before (a copy of the file under backup/, a link's target, or
nothing) and a fingerprint of what vgpuctl put there. The original is recorded *before* the path is
changed, so a killed run leaves nothing unrecorded. :func:`undo` puts a path back only while it still
holds what vgpuctl put there (else it refuses unless forced); a path vgpuctl did not record is never its
to remove. Commands (grubby, update-grub, systemctl ...) run through :class:`Tools`, and every step is
reported as a :class:`Step`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgpuctl.base.errors import Conflict, StateDamaged
from vgpuctl.host.files import atomic_write, clean_temp_files, fsync_dir
from vgpuctl.host.root import HostRoot

TOOL_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass(frozen=True)
class Step:
    """One thing an install or undo did (or did not do), for the report."""

    action: str  # created/wrote, updated, removed, restored, unchanged, refused/kept, ran, failed, not run ...
    target: str
    note: str = ""

    def line(self) -> str:
        return f"{self.action:10} {self.target}" + (f"  ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Command:
    """A program to run on the host, by name (found on PATH or in the tools directory)."""

    argv: tuple[str, ...]

    def __str__(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Tools:
    """Where the host's tools are, and whether vgpuctl may run them.

    On the machine's own root they are found on PATH (and in the sbin directories) and run. With
    ``directory`` they are taken from there only, and run whatever the root (tests put stubs that
    record their arguments there). Under any other root they are looked for in the root's own bin
    directories, to say which one the host has, but never run.
    """

    root: HostRoot
    directory: Path | None = None

    @property
    def runnable(self) -> bool:
        return self.directory is not None or self.root.is_this_machine

    def why_not(self) -> str:
        return (f"{self.root.root} is not this machine's root: run it on that host "
                "(vgpuctl runs commands only on its own root, or from --tools-dir)")

    def find(self, name: str) -> str | None:
        if self.directory is not None:
            candidate = self.directory / name
            return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
        if self.root.is_this_machine:
            return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *TOOL_DIRS]))
        for directory in TOOL_DIRS:
            if os.path.isfile(self.root.path(f"{directory}/{name}")):
                return f"{directory}/{name}"
        return None

    def run(self, command: Command) -> tuple[int, str, str]:
        """(exit status, stdout, stderr); 127 when the program is missing or cannot start."""
        if not self.runnable:
            raise RuntimeError(f"not running {command}: {self.why_not()}")  # callers ask runnable first
        program = self.find(command.argv[0])
        if program is None:
            return 127, "", f"{command.argv[0]}: not found"
        env = dict(os.environ)
        if self.directory is not None:
            env["PATH"] = os.pathsep.join([str(self.directory), env.get("PATH", "")])
        try:
            done = subprocess.run([program, *command.argv[1:]], capture_output=True, text=True, timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            return 127, "", str(e)
        return done.returncode, done.stdout, done.stderr

    def step(self, command: Command) -> Step:
        """Run ``command`` if vgpuctl may: ran, failed (with its last line of output), or not run."""
        if not self.runnable:
            return Step("not run", str(command), self.why_not())
        code, out, err = self.run(command)
        if code == 0:
            return Step("ran", str(command))
        last = (err or out).strip().splitlines()
        return Step("failed", str(command), last[-1] if last else f"exit status {code}")


# ---------------------------------------------------------------- what is at a path


def sha256(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def fingerprint(local: Path) -> str | None:
    """What is at ``local``: the sha256 of a regular file's bytes, ``symlink:TARGET`` for a link, None for nothing."""
    if local.is_symlink():
        return f"symlink:{os.readlink(local)}"
    try:
        return sha256(local.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None


def link_fingerprint(target: str) -> str:
    return f"symlink:{target}"


def write_file(local: Path, data: bytes, mode: int = 0o644) -> None:
    atomic_write(local, data, mode)


def write_link(local: Path, target: str) -> None:
    """Create or replace a symlink atomically (a temporary link renamed over)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    clean_temp_files(local)
    temporary = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, local)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(local.parent)


def remove(local: Path) -> None:
    local.unlink(missing_ok=True)
    clean_temp_files(local)
    fsync_dir(local.parent)


# ---------------------------------------------------------------- the record


class Record:
    """What an installer changed: per host path, its original and the fingerprint of what vgpuctl put there.

    ``DIRECTORY/manifest.json`` (0600): ``{"version": 1, "root": ..., "files": {HOST_PATH: {"existed",
    "mode", "original_sha256", "written_sha256", "role"}}}`` plus the installer's own keys (setup:
    "regenerate", "undo", "pending"); a file's original is copied to ``DIRECTORY/backup/HOST_PATH``. The
    fingerprints are sha256 hex digests, or ``symlink:TARGET`` for a link (records of vgpuctl versions
    before links were recorded hold only digests, and read the same).
    """

    VERSION = 1

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.file = directory / "manifest.json"
        try:
            data = json.loads(self.file.read_text())
            if data.get("version") != self.VERSION or not isinstance(data.get("files"), dict):
                raise ValueError
        except FileNotFoundError:
            data = {"version": self.VERSION, "root": None, "files": {}}
        except (ValueError, AttributeError):
            raise StateDamaged("{path} is damaged: vgpuctl cannot tell what it changed; the originals are in "
                               "{backups}", what="record", path=str(self.file),
                               backups=str(directory / "backup")) from None
        self.data: dict[str, Any] = data

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = self.data["files"]
        return files

    @property
    def empty(self) -> bool:
        return not self.files and not self.data.get("undo") and not self.data.get("pending")

    def check_root(self, root: HostRoot, undo: str) -> None:
        """A record belongs to one root: another root's is refused (``undo`` says how to take it back)."""
        recorded, ours = self.data.get("root"), str(root.root.resolve())
        if recorded and recorded != ours and not self.empty:
            raise Conflict("{path} holds the {what} of root {recorded}, not {root}: {undo} with --root "
                           "{recorded}, or use another --state-dir", what=self.directory.name,
                           path=str(self.directory), recorded=recorded, root=ours, undo=undo)
        self.data["root"] = ours

    def backup(self, host_path: str) -> Path:
        return self.directory / "backup" / host_path.lstrip("/")

    def claim(self, root: HostRoot, host_path: str, role: str, written: str | None) -> None:
        """Record, before ``host_path`` changes, what is there now (the first time only: the original
        stays the one from before vgpuctl) and the fingerprint of what vgpuctl will put there."""
        entry = self.files.get(host_path)
        if entry is None:
            local = root.path(host_path)
            original = fingerprint(local)
            mode = None
            if original is not None and not original.startswith("symlink:"):
                atomic_write(self.backup(host_path), local.read_bytes(), 0o600)
                mode = local.stat().st_mode & 0o7777
            entry = self.files[host_path] = {"existed": original is not None, "mode": mode,
                                             "original_sha256": original, "role": role}
        entry["written_sha256"] = written

    def adopt(self, root: HostRoot, host_path: str, role: str) -> None:
        """Record what is at ``host_path`` as made by vgpuctl, with nothing there before: how a path that an
        older vgpuctl wrote without recording it (a file with its header) becomes recorded."""
        if host_path not in self.files:
            self.files[host_path] = {"existed": False, "mode": None, "original_sha256": None, "role": role,
                                     "written_sha256": fingerprint(root.path(host_path))}

    def owns(self, root: HostRoot, host_path: str) -> bool:
        """Whether ``host_path`` holds what vgpuctl put there."""
        entry = self.files.get(host_path)
        return entry is not None and fingerprint(root.path(host_path)) == entry["written_sha256"]

    def save(self) -> None:
        if self.empty:
            self.file.unlink(missing_ok=True)
            return
        data = json.dumps(self.data, indent=2, sort_keys=True).encode() + b"\n"
        with contextlib.suppress(OSError):
            if self.file.read_bytes() == data:
                return  # a run that changed nothing leaves the record as it was
        atomic_write(self.file, data, 0o600)

    def forget(self, host_path: str) -> None:
        self.files.pop(host_path, None)
        backup = self.backup(host_path)
        backup.unlink(missing_ok=True)
        for directory in backup.parents:  # the now empty directories, up to and with backup/
            if directory == self.directory:
                break
            try:
                directory.rmdir()
            except OSError:
                break


def undo(root: HostRoot, record: Record, host_path: str, force: bool = False) -> str:
    """Put ``host_path`` back as it was before vgpuctl; what happened: "unchanged" (it already is),
    "refused" (it changed since vgpuctl wrote it, and not ``force``), "restored" or "removed". The
    record forgets the path unless refused; the caller saves it."""
    entry = record.files[host_path]
    local = root.path(host_path)
    now = fingerprint(local)
    if now == entry["original_sha256"]:
        record.forget(host_path)
        return "unchanged"
    if now != entry["written_sha256"] and not force:
        return "refused"
    original = entry["original_sha256"]
    if original is None:
        remove(local)
        outcome = "removed"
    elif original.startswith("symlink:"):
        write_link(local, original.removeprefix("symlink:"))
        outcome = "restored"
    else:
        if local.is_symlink():
            local.unlink()
        atomic_write(local, record.backup(host_path).read_bytes(), entry.get("mode") or 0o644)
        outcome = "restored"
    record.forget(host_path)
    return outcome
