"""VMs on an Intel SR-IOV VF: the spec, QEMU's and libvirt's attachment, the preflight, and two VMs on two VFs
of a simulated Alder Lake on real QEMU (TCG), the VFs shown as held while they run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import Cli, GoldenFn, MountFn, new_vm, validate_xml
from vgpuctl.backends import sriov_intel
from vgpuctl.base.errors import CapacityError, InvalidInput, NotFound
from vgpuctl.base.state import StateDir
from vgpuctl.vm import lifecycle
from vgpuctl.vm import spec as specs
from vgpuctl.vm.argv import build_command
from vgpuctl.vm.libvirt import domain_xml
from vgpuctl.vm.profiles import new_spec, os_settings
from vgpuctl.vm.runtime import ResolvedVgpu, RuntimePaths, resolve_vgpu
from vgpuctl.vm.spec import VgpuRequest, VmSpec

pytestmark = pytest.mark.fuse

PF = "0000:00:02.0"
VF1, VF2 = "0000:00:02.1", "0000:00:02.2"
VF = ResolvedVgpu(VF1, PF, sriov_intel.TYPE_ID, None, "active")
RUN = Path("/run/vgpuctl-test/vm1")
CASES = {
    "base": lambda: new_spec("vm1"),
    "gaming": lambda: replace(new_spec("vm1", "gaming"), vgpu_display=False, ramfb=False),
    "windows": lambda: windows(),
}
ROM = "/var/lib/vgpuctl/roms/IntelGopDriver.rom"


def windows() -> VmSpec:
    spec = new_spec("vm1")
    return replace(spec, **os_settings("windows10", spec))


def on_vf(spec: VmSpec, vf: str = VF1) -> VmSpec:
    spec.vgpu = VgpuRequest(vf=vf, rom=ROM if spec.os else None)
    return spec


@pytest.mark.parametrize("name", list(CASES))
def test_argv_and_xml_golden_on_a_vf(name: str, golden: GoldenFn, tmp_path: Path) -> None:
    spec = on_vf(CASES[name]())
    spec.validate()
    cmd = build_command(spec, VF, qemu="qemu-system-x86_64", accel="kvm", runtime_dir=RUN, simulated=False)
    device = cmd.argv[cmd.argv.index("-device", cmd.argv.index("-vga") if "-vga" in cmd.argv else 0):]
    assert f"vfio-pci,id=hostdev0,host={VF1}" + (f",romfile={ROM}" if spec.os else "") in cmd.argv
    assert "display=on" not in " ".join(device)
    assert not any("sysfsdev" in a for a in cmd.argv)
    assert any("no display of its own" in n for n in cmd.notes)
    golden(f"vm/{name}-sriov-vf.argv", "".join(f"{arg}\n" for arg in cmd.argv) + "".join(f"# {n}\n" for n in cmd.notes))
    xml = domain_xml(spec, VF, paths=RuntimePaths(RUN), emulator="/usr/bin/qemu-system-x86_64")
    assert '<hostdev mode="subsystem" type="pci" managed="no">' in xml
    assert '<address domain="0x0000" bus="0x00" slot="0x02" function="0x1" />' in xml
    golden(f"vm/{name}-sriov-vf.xml", xml)
    validate_xml(xml, tmp_path, name)


def test_windows_on_an_intel_vf_is_told_of_the_option_rom_and_gets_it() -> None:
    spec = on_vf(windows())
    cmd = build_command(spec, VF, qemu="qemu-system-x86_64", accel="kvm", runtime_dir=RUN, simulated=False)
    assert f"vfio-pci,id=hostdev0,host={VF1},romfile={ROM}" in cmd.argv
    assert not any("Code 43" in n for n in cmd.notes)
    assert f'<rom file="{ROM}" />' in domain_xml(spec, VF, paths=RuntimePaths(RUN))
    spec.vgpu.rom = None
    cmd = build_command(spec, VF, qemu="qemu-system-x86_64", accel="kvm", runtime_dir=RUN, simulated=False)
    assert any("Code 43" in n and "vgpu.rom" in n for n in cmd.notes)
    cmd = build_command(on_vf(new_spec("vm1")), VF, qemu="qemu-system-x86_64", accel="kvm", runtime_dir=RUN,
                        simulated=False)
    assert not any("Code 43" in n for n in cmd.notes)  # a Linux guest needs no ROM
    with pytest.raises(InvalidInput, match=r"it goes with vgpu\.vf"):
        replace(new_spec("vm1"), vgpu=VgpuRequest(type="i915-GVTg_V5_4", rom=ROM)).validate()
    with pytest.raises(InvalidInput, match=r"vgpu\.rom must be an absolute path"):
        replace(spec, vgpu=VgpuRequest(vf=VF1, rom="roms/gop.rom")).validate()


def test_the_cli_sets_and_clears_the_rom(mount_host: MountFn, state: StateDir) -> None:
    cli = Cli(mount_host("adl-sriov"), state.path)
    cli("vm", "create", "win", "--os", "windows10", "--vf", PF, "--vgpu-rom", ROM)
    assert specs.load(state, "win").vgpu == VgpuRequest(vf=PF, rom=ROM)
    cli("vm", "edit", "win", "--vgpu-rom", "none")
    assert specs.load(state, "win").vgpu == VgpuRequest(vf=PF)
    code, _, err = cli("vm", "create", "mdev", "--type", "i915-GVTg_V5_4", "--vgpu-rom", ROM, ok=False)
    assert code != 0 and "it goes with vgpu.vf" in err


def test_the_spec_names_a_vf_alone_and_as_lspci_writes_it() -> None:
    spec = on_vf(new_spec("vm1"))
    assert spec.vgpu.kind == "vf" and spec.vgpu.describe() == f"SR-IOV VF {VF1}"
    with pytest.raises(InvalidInput, match="not with uuid, resolution"):
        replace(spec, vgpu=VgpuRequest(vf=VF1, uuid="6f1b1a52-6d2a-4a4c-9a62-1fb3c7d43c1a",
                                       resolution="1920x1080")).validate()
    with pytest.raises(InvalidInput, match=r"as lspci -D shows it: 0000:00:02.1"):
        replace(spec, vgpu=VgpuRequest(vf="00:02.1")).validate()
    text = spec.to_toml()
    assert f'vf = "{VF1}"' in text and VmSpec.from_toml(text, "x").vgpu == spec.vgpu


def test_a_simulated_host_replaces_the_vf_by_an_emulated_adapter() -> None:
    spec = on_vf(new_spec("vm1"))
    cmd = build_command(spec, VF, qemu="qemu-system-x86_64", accel="tcg", runtime_dir=RUN, simulated=True)
    assert "bochs-display,id=hostdev0,xres=1024,yres=768" in cmd.argv
    assert not any("vfio-pci" in a for a in cmd.argv)
    assert any(f"simulated SR-IOV VF {VF1} of {PF}" in n for n in cmd.notes)


def test_resolving_a_pf_takes_a_free_vf(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("adl-sriov")
    spec = on_vf(new_spec("vm1"), PF)
    with pytest.raises(NotFound, match=r"has no VFs enabled: 'vgpuctl vfs enable 0000:00:02.0 N' first"):
        resolve_vgpu(root, spec)
    sriov_intel.enable(root, StateDir(tmp_path / "s"), PF, 2)
    assert resolve_vgpu(root, spec) == ResolvedVgpu(VF1, PF, sriov_intel.TYPE_ID, None, "active",
                                                     f"the first free VF of {PF} (2 free)")
    assert resolve_vgpu(root, spec, taken={VF1}).uuid == VF2
    with pytest.raises(CapacityError, match=r"every VF of 0000:00:02.0 is in use"):
        resolve_vgpu(root, spec, taken={VF1, VF2})
    assert resolve_vgpu(root, on_vf(new_spec("vm1"), VF2)).uuid == VF2
    with pytest.raises(InvalidInput, match=r"for NVIDIA's VFs: an Intel VF's share is set per PF"):
        resolve_vgpu(root, replace(spec, vgpu=VgpuRequest(vf=PF, type="1159")))


def test_two_vms_on_two_vfs_run_and_are_shown_as_holders(mount_host: MountFn, state: StateDir, guest: Path,
                                                          tmp_path: Path) -> None:
    root = mount_host("adl-sriov")
    cli = Cli(root, state.path)
    cli("vfs", "enable", PF, "2")
    for name in ("vf-a", "vf-b"):
        new_vm(state, name, guest)
        spec = specs.load(state, name)
        spec.vgpu, spec.vgpu_display, spec.ramfb = VgpuRequest(vf=PF), False, False
        specs.save(state, spec)
    try:
        a = lifecycle.start(root, state, "vf-a", accel="tcg")
        b = lifecycle.start(root, state, "vf-b", accel="tcg")
        assert (a.state, b.state) == ("running", "running") and {a.vgpu, b.vgpu} == {VF1, VF2}
        listed = cli.json("vfs", "list")
        assert isinstance(listed, dict)
        assert {vf["address"]: vf["vm"] for vf in listed["pfs"][0]["vfs"]} == {a.vgpu: "vf-a", b.vgpu: "vf-b"}
        assert "VM vf-a" in cli("vfs", "list")[1]
        code, _, err = cli("vfs", "disable", PF, ok=False)
        assert code == 1 and "by VM vf-a" in err and "stop those VMs" in err
        new_vm(state, "vf-c", guest)
        spec = specs.load(state, "vf-c")
        spec.vgpu, spec.vgpu_display, spec.ramfb = VgpuRequest(vf=PF), False, False
        specs.save(state, spec)
        with pytest.raises(CapacityError, match=r"every VF of 0000:00:02.0 is in use"):
            lifecycle.start(root, state, "vf-c", accel="tcg")
    finally:
        for name in ("vf-a", "vf-b"):
            if lifecycle.status(root, state, name).state != "stopped":
                lifecycle.stop(root, state, name, timeout_s=10)
    listed = cli.json("vfs", "list")
    assert isinstance(listed, dict) and all(vf["vm"] is None for vf in listed["pfs"][0]["vfs"])
    cli("vfs", "disable", PF)


def test_the_preflight_refuses_a_vf_display_and_a_vf_on_the_host_driver(mount_host: MountFn, state: StateDir,
                                                                        guest: Path) -> None:
    root = mount_host("adl-sriov")
    root.path(f"/sys/bus/pci/devices/{PF}/sriov_numvfs").write_text("1\n")  # autoprobe on: i915 takes the VF
    new_vm(state, "vm1", guest)
    spec = specs.load(state, "vm1")
    spec.vgpu, spec.vgpu_display, spec.ramfb = VgpuRequest(vf=VF1), True, False
    specs.save(state, spec)
    with pytest.raises(lifecycle.VmError) as caught:
        lifecycle.start(root, state, "vm1", accel="tcg")
    message = str(caught.value)
    assert "an Intel SR-IOV VF has no display of its own" in message and "emulated adapter" in message
    assert f"VF {VF1} is bound to i915, not to vfio-pci" in message
