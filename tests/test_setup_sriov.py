"""``vgpuctl setup`` on SR-IOV hosts: what each backend present on the host wants of the boot configuration
(vgpuctl.backends.setup_wants), and the proof that it is enough: after ``setup apply`` and a simulated reboot
(the simulator boots from the /etc/default/grub it finds) the doctor passes sriov-params; ``setup revert`` and
another reboot bring the failure back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import MountFn
from vgpuctl.backends import setup_wants
from vgpuctl.backends.gvt_setup import GVT_SETUP
from vgpuctl.backends.sriov_intel_setup import IntelSriovSetup
from vgpuctl.cli.app import cli
from vgpuctl.host import HostRoot
from vgpuctl.host.setup import BootWants, CombinedWants, combined, needed_change
from vgpuctl.sim.host import SIM_CONTROL

DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
NO_QEMU = "/nonexistent/qemu-system-x86_64"
SRIOV_WANTS = "intel_iommu=on i915.enable_guc=3 i915.max_vfs=7 module_blacklist=xe"


def run(root: HostRoot, state: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--root", str(root.root), "--state-dir", str(state), *args])
    assert result.exit_code == code, (args, result.output, result.exception)
    return result.stdout


def doctor(root: HostRoot, state: Path) -> dict[str, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["--root", str(root.root), "--state-dir", str(state), "doctor", "--json",
                                      "--no-guest", "--qemu", NO_QEMU])
    return {c["id"]: c for c in json.loads(result.stdout)["checks"]}


def debian(root: HostRoot, tmp_path: Path) -> Path:
    root.path("/etc/os-release").write_text(DEBIAN)
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    (tools / "update-grub").write_text("#!/bin/sh\nexit 0\n")
    (tools / "update-grub").chmod(0o755)
    return tools


@pytest.mark.fuse
@pytest.mark.parametrize(("preset", "missing"), [("adl-sriov-nomaxvfs", "i915.max_vfs=7"),
                                                 ("adl-sriov-noguc", "i915.enable_guc=3")])
def test_apply_and_a_reboot_make_sriov_params_pass_and_revert_undoes_it(mount_host: MountFn, tmp_path: Path,
                                                                         preset: str, missing: str) -> None:
    root, state = mount_host(preset), tmp_path / "state"
    tools = debian(root, tmp_path)
    assert doctor(root, state)["sriov-params"]["status"] == "fail"
    plan = json.loads(run(root, state, "setup", "plan", "--json", "--tools-dir", str(tools)))
    assert plan["boot"]["add"] == [missing]
    assert [(f["path"], f["action"]) for f in plan["files"]] == [
        ("/etc/default/grub", "modify"), ("/etc/modules-load.d/vgpuctl.conf", "create"),
        ("/etc/modprobe.d/vgpuctl.conf", "create")]
    assert "+options i915 max_vfs=7\n+options i915 enable_guc=3\n" in plan["files"][2]["diff"]
    assert "+vfio-pci\n" in plan["files"][1]["diff"]
    run(root, state, "setup", "apply", "--tools-dir", str(tools))

    root.write_text(SIM_CONTROL, "reboot\n")
    checks = doctor(root, state)
    assert checks["sriov-params"]["status"] == "ok", checks["sriov-params"]
    assert checks["sriov-pf"]["detail"] == "0000:00:02.0 under i915 can make VFs (up to 7 allowed now)."
    assert missing in root.read_text("/proc/cmdline")
    assert "nothing to do" in run(root, state, "setup", "plan", "--tools-dir", str(tools))

    run(root, state, "setup", "revert", "--tools-dir", str(tools))
    root.write_text(SIM_CONTROL, "reboot\n")
    assert missing not in root.read_text("/proc/cmdline")
    assert doctor(root, state)["sriov-params"]["status"] == "fail"


@pytest.mark.fuse
def test_the_wants_are_the_backends_present_on_the_host(mount_host: MountFn, tmp_path: Path) -> None:
    gvt = setup_wants(mount_host("coffeelake-bare"))
    assert gvt is GVT_SETUP
    sriov = setup_wants(mount_host("adl-sriov"))
    assert isinstance(sriov, IntelSriovSetup) and " ".join(sriov.params) == SRIOV_WANTS
    assert setup_wants(mount_host("alderlake")).params == sriov.params  # a Gen12 iGPU: SR-IOV's, never GVT-g's
    stock = setup_wants(mount_host("adl-stock-i915"))
    assert "the loaded i915 is the stock one" in stock.cmdline_notes("")[0]
    xe = setup_wants(mount_host("b60-xe"))
    assert isinstance(xe, IntelSriovSetup) and xe.params == ("intel_iommu=on",)
    assert xe.modules(None) == ["xe-vfio-pci"] and xe.module_options == ()
    nvidia = setup_wants(mount_host("l40s-vfio"))
    assert isinstance(nvidia, BootWants) and nvidia.params == ("intel_iommu=on",) and nvidia.modules(None) == []
    assert setup_wants(HostRoot(tmp_path)) is GVT_SETUP  # a root without sysfs: GVT-g's, as before
    both = setup_wants(mount_host("l40s-vfio", pci_id="8086:3e92"))  # a Coffee Lake iGPU next to an L40S
    assert isinstance(both, CombinedWants) and both.parts == (GVT_SETUP, nvidia)
    # The simulated NVIDIA host is already set up.
    root = mount_host("l40s-vfio")
    tools = debian(root, tmp_path)
    assert "nothing to do" in run(root, tmp_path / "s", "setup", "plan", "--tools-dir", str(tools))


def test_several_kinds_are_combined() -> None:
    nvidia = BootWants("NVIDIA vGPU", ("intel_iommu=on",), boot_modules=("vfio-pci",))
    both = combined([GVT_SETUP, nvidia])
    assert isinstance(both, CombinedWants) and both.subject == "Intel GVT-g (KVMGT) and NVIDIA vGPU"
    assert both.params == ("i915.enable_gvt=1", "kvm.ignore_msrs=1", "intel_iommu=on")
    assert both.modules((6, 8)) == ["kvmgt", "vfio-iommu-type1", "mdev", "vfio-pci"]
    assert both.cmdline_fix("i915.enable_guc=3") == "i915.enable_guc=2"  # GVT-g's
    assert combined([nvidia]) is nvidia


def test_sriov_command_lines() -> None:
    sriov = IntelSriovSetup("Intel SR-IOV", tuple(SRIOV_WANTS.split()))

    def change(line: str) -> str:
        return needed_change(line.split(), sriov).words()

    assert change(SRIOV_WANTS) == ""
    # max_vfs and enable_guc are numbers: a wrong one is replaced in place; module_blacklist is a list whose
    # last token is in effect: xe is added to it; i915 in it would keep i915-sriov-dkms from loading.
    assert change("intel_iommu=on i915.max_vfs=0 i915.enable_guc=2 module_blacklist=nouveau") == (
        "replace i915.enable_guc=2 with i915.enable_guc=3; replace i915.max_vfs=0 with i915.max_vfs=7; "
        "replace module_blacklist=nouveau with module_blacklist=nouveau,xe")
    assert change("intel_iommu=on i915.max_vfs=7 i915.enable_guc=3 module_blacklist=i915") == (
        "replace module_blacklist=i915 with module_blacklist=xe")
    assert change("module_blacklist=xe module_blacklist=nouveau intel_iommu=on i915.max_vfs=7 i915.enable_guc=3") \
        == "replace module_blacklist=nouveau with module_blacklist=nouveau,xe"
