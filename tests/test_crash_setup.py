"""Crash tests for the host-wide installers: ``setup apply`` and ``install-units`` killed at each step.

The same method as tests/test_crash.py (crash points learned from a trace, SIGKILL at each): after the
kill, running the command again succeeds, and its undo (``setup revert``, ``uninstall-units``) puts the
host back byte for byte as it was before the first run: no file lost, none half-written, no temp file left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MountFn

DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
PROGRAM = "/usr/local/bin/vgpuctl"


def tree(directory: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and symlink (its target) under ``directory``: what the host holds."""
    found: dict[str, bytes | str] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(directory))] = os.readlink(path)
        elif path.is_file():
            found[str(path.relative_to(directory))] = path.read_bytes()
    return found


def restore(directory: Path, snapshot: dict[str, bytes | str]) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        rel = str(path.relative_to(directory))
        if (path.is_symlink() or path.is_file()) and rel not in snapshot:
            path.unlink()
    for rel, content in snapshot.items():
        path = directory / rel
        if isinstance(content, bytes) and (not path.is_file() or path.read_bytes() != content):
            path.write_bytes(content)


def vgpuctl(root: Path, state: Path, *args: str, **env: str) -> int:
    command = [sys.executable, "-m", "vgpuctl", "--root", str(root), "--state-dir", str(state), *args]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, timeout=120).returncode


def kill_at_each_point(run: Callable[..., int], reset: Callable[[], None], tmp: Path) -> list[str]:
    """Learn the crash points of ``run()``, then kill it at each one, calling ``reset`` before every run."""
    reset()
    trace = tmp / "trace"
    trace.unlink(missing_ok=True)
    assert run(VGPUCTL_CRASH_TRACE=str(trace)) == 0
    seen: dict[str, int] = {}
    points = []
    for name in [line.split()[0] for line in trace.read_text().splitlines()]:
        seen[name] = seen.get(name, 0) + 1
        points.append(f"{name}#{seen[name]}")
    assert len(points) >= 3, points
    if os.environ.get("VGPUCTL_CRASH_REPORT"):
        with open(os.environ["VGPUCTL_CRASH_REPORT"], "a") as f:
            f.write(json.dumps({"crash_points": points}) + "\n")
    return points


@pytest.mark.fuse
def test_setup_apply_killed_at_every_step(mount_host: MountFn, tmp_path: Path) -> None:
    host = mount_host("coffeelake-bare")
    etc = host.root / "etc"
    (etc / "os-release").write_text(DEBIAN)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "update-grub").write_text("#!/bin/sh\nexit 0\n")
    (tools / "update-grub").chmod(0o755)
    original = tree(etc)
    trial = [0]

    def state() -> Path:
        return tmp_path / f"state{trial[0]}"

    def reset() -> None:
        restore(etc, original)
        trial[0] += 1

    def apply(**env: str) -> int:
        return vgpuctl(host.root, state(), "setup", "apply", "--tools-dir", str(tools), **env)

    points = kill_at_each_point(apply, reset, tmp_path)
    assert vgpuctl(host.root, state(), "setup", "revert", "--tools-dir", str(tools)) == 0
    assert tree(etc) == original
    for point in points:
        reset()
        assert apply(VGPUCTL_CRASH_AT=point) == -signal.SIGKILL, point
        assert apply() == 0, point  # the next command succeeds
        assert vgpuctl(host.root, state(), "setup", "revert", "--tools-dir", str(tools)) == 0, point
        assert tree(etc) == original, point  # every file as it was, no temp file left


def test_install_units_killed_at_every_step(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/udev/rules.d").mkdir(parents=True)
    (root / "etc/systemd/system/other.service").write_text("[Unit]\n")  # someone else's: stays
    original = tree(root)
    state = tmp_path / "state"

    def install(**env: str) -> int:
        return vgpuctl(root, state, "install-units", "--program", PROGRAM, **env)

    points = kill_at_each_point(install, lambda: restore(root, original), tmp_path)
    installed = tree(root)
    for point in points:
        restore(root, original)
        assert install(VGPUCTL_CRASH_AT=point) == -signal.SIGKILL, point
        assert install() == 0, point  # the next command succeeds (the files it left are known as its own)
        assert tree(root) == installed, point  # and the result is the uninterrupted one, no temp file left
        assert vgpuctl(root, state, "uninstall-units") == 0, point
        assert tree(root) == original, point
