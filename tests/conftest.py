"""Shared fixtures: simulated hosts in-process and mounted over FUSE."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from vgpuctl.host import HostRoot
from vgpuctl.sim import mount as sim_mount
from vgpuctl.sim.presets import preset
from vgpuctl.vm.linuxguest import LinuxGuest, build_linux_guest

GVT_PARENT = "0000:00:02.0"
FUSE_OK = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None and os.geteuid() == 0


MountFn = Callable[..., HostRoot]


@pytest.fixture
def mount_host(tmp_path: Path) -> Iterator[MountFn]:
    """Mount simulated hosts under tmp_path; all are unmounted at the end of the test."""
    if not FUSE_OK:
        pytest.fail("FUSE is required: run as root with /dev/fuse and fuse3 installed (make test does)")
    mounted: list[Path] = []

    def _mount(preset_name: str = "coffeelake", **overrides: object) -> HostRoot:
        directory = tmp_path / f"host{len(mounted)}"
        directory.mkdir()
        spec = preset(preset_name).with_overrides(**overrides)  # type: ignore[arg-type]
        sim_mount.mount(spec.to_json(), directory, preset_name)
        mounted.append(directory)
        return HostRoot(directory)

    yield _mount
    for directory in mounted:
        if sim_mount.is_sim_mount(directory):
            sim_mount.umount(directory, lazy=True)


class Cli:
    """vgpuctl in-process (click's runner) against one host root and one state dir."""

    def __init__(self, root: HostRoot, state: Path) -> None:
        self.root, self.state = root, state
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True) -> tuple[int, str, str]:
        from vgpuctl.cli.app import cli

        result = self.runner.invoke(cli, ["--root", str(self.root.root), "--state-dir", str(self.state), *args])
        if ok:
            assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
        return result.exit_code, result.stdout, result.stderr

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json")[1])


@pytest.fixture
def gvt(mount_host: MountFn, tmp_path: Path) -> Cli:
    """vgpuctl on a mounted Coffee Lake host with a 1 GiB aperture, with a state dir of its own."""
    return Cli(mount_host("coffeelake", aperture_mib=1024), tmp_path / "state")


# ------------------------------------------------------------------ golden files
# Every rendered output (argv, XML, reports, listings, plans) is pinned by a file under tests/golden/,
# compared byte for byte. VGPUCTL_REGEN_GOLDEN=1 rewrites them from the current code instead: review the
# diff (git diff tests/golden) before committing it, as mdevctl's tests do with their fixtures.
GOLDEN_DIR = Path(__file__).parent / "golden"
REGEN_GOLDEN = os.environ.get("VGPUCTL_REGEN_GOLDEN") == "1"

GoldenFn = Callable[[str, str], None]


@pytest.fixture
def golden() -> GoldenFn:
    def check(name: str, text: str) -> None:
        path = GOLDEN_DIR / name
        if REGEN_GOLDEN:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        assert path.exists(), f"no golden file {path}: make one with VGPUCTL_REGEN_GOLDEN=1 and review it"
        assert text == path.read_text(), f"output differs from {path} (VGPUCTL_REGEN_GOLDEN=1 rewrites it)"

    return check


@pytest.fixture(scope="session")
def linux_guest() -> LinuxGuest:
    """Debian's kernel with vgpuctl's busybox initramfs (vgpuctl.vm.linuxguest), built once and cached.

    Fails, never skips, when the kernel package cannot be had: the devices' tests must run.
    """
    return build_linux_guest()
