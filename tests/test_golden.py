"""Golden files for what vgpuctl renders about hosts and vGPUs: doctor reports, setup plans, listings.

One file per case under tests/golden/ (see ``golden`` in conftest.py for the regenerate switch). Paths of
the mounted host and the state directory are written as <ROOT> and <STATE>. The doctor is given a QEMU
binary that does not exist, so that its report depends on the simulated host alone (not on how fast this
machine's QEMU answers its probes).
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import GVT_PARENT, GoldenFn, MountFn
from vgpuctl.cli.app import cli
from vgpuctl.host import HostRoot

pytestmark = pytest.mark.fuse

DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
NO_QEMU = "/nonexistent/qemu-system-x86_64"
DOCTOR_PRESETS = ["coffeelake", "coffeelake-bare", "broadwell", "icelake", "alderlake", "amd", "samples",
                  "nvidia-t4"]


def render(root: HostRoot, state: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--root", str(root.root), "--state-dir", str(state), *args],
                                env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    text = result.stdout.replace(str(root.root), "<ROOT>").replace(str(state), "<STATE>")
    return result.exit_code, text


@pytest.fixture
def memlock_8mib() -> Iterator[None]:
    """The doctor reports this process's RLIMIT_MEMLOCK: the same everywhere (8 MiB, Debian's default)."""
    before = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 << 20, 8 << 20))
    yield
    resource.setrlimit(resource.RLIMIT_MEMLOCK, before)


@pytest.mark.parametrize("preset", DOCTOR_PRESETS)
@pytest.mark.usefixtures("memlock_8mib")
def test_doctor_reports(mount_host: MountFn, tmp_path: Path, golden: GoldenFn, preset: str) -> None:
    root = mount_host(preset)
    for suffix, extra in (("txt", []), ("json", ["--json"])):
        code, text = render(root, tmp_path / "state", "doctor", "--no-guest", "--qemu", NO_QEMU, *extra)
        golden(f"doctor/{preset}.{suffix}", f"exit {code}\n{text}")


@pytest.mark.parametrize("preset", ["coffeelake-bare", "adl-sriov-nomaxvfs", "adl-stock-i915", "b60-xe"])
def test_setup_plans(mount_host: MountFn, tmp_path: Path, golden: GoldenFn, preset: str) -> None:
    root = mount_host(preset)
    root.path("/etc/os-release").write_text(DEBIAN)
    tools = tmp_path / "bin"
    tools.mkdir()
    for suffix, extra in (("txt", []), ("json", ["--json"])):
        code, text = render(root, tmp_path / "state", "setup", "plan", "--tools-dir", str(tools), *extra)
        golden(f"setup/debian-{preset}.{suffix}", f"exit {code}\n{text}")


def test_listings(mount_host: MountFn, tmp_path: Path, golden: GoldenFn) -> None:
    root, state = mount_host("coffeelake-1g"), tmp_path / "state"
    for args in (["create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", "11111111-0000-4000-8000-000000000001"],
                 ["define", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8", "-u", "11111111-0000-4000-8000-000000000002",
                  "--auto"]):
        assert render(root, state, *args)[0] == 0
    for command in (["gpus"], ["types"], ["list"], ["list", "-d"]):
        for suffix, extra in (("txt", []), ("json", ["--json"])):
            code, text = render(root, state, *command, *extra)
            golden(f"listings/{'-'.join(command)}.{suffix}", f"exit {code}\n{text}")
