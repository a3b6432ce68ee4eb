"""VM specs, profiles, the QEMU command line, libvirt XML and the vm commands — nothing boots.

The argv tests assert exact fragments of what libvirt emits for an mdev (spec/peers.md §2.1);
the XML is checked by libvirt's own ``virt-xml-validate`` (Debian: libvirt-clients + libxml2-utils);
the CLI runs in-process against a mounted simulated Coffee Lake host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import typing
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from tests.conftest import GVT_PARENT, Cli, GoldenFn, MountFn, validate_xml
from vgpuctl.base.errors import InvalidInput
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.vm import spec as specs
from vgpuctl.vm.argv import QemuCommand, build_argv, build_command, default_mac
from vgpuctl.vm.inventory import spec_from_fields
from vgpuctl.vm.libvirt import domain_xml
from vgpuctl.vm.profiles import GAMING_CPU, PROFILES, apply_profile, new_spec
from vgpuctl.vm.runtime import (
    ResolvedVgpu,
    RuntimePaths,
    check_requirements,
    guest_warnings,
    is_running,
    vm_vgpu_uuid,
)
from vgpuctl.vm.spec import Disk, Display, Network, VgpuRequest, VmSpec

UUID = "6f1b1a52-6d2a-4a4c-9a62-1fb3c7d43c1a"
SYSFS = f"/sys/bus/mdev/devices/{UUID}"
V54 = ResolvedVgpu(UUID, GVT_PARENT, "i915-GVTg_V5_4", (1920, 1200), "active")
V58 = ResolvedVgpu(UUID, GVT_PARENT, "i915-GVTg_V5_8", (1024, 768), "active")
MDPY = ResolvedVgpu(UUID, "mdpy", "mdpy-hd", (1920, 1080), "active")
RUN = Path("/run/vgpuctl-test/vm1")
PROFILE_NAMES = [None, *PROFILES]


def command(spec: VmSpec, vgpu: ResolvedVgpu | None = V54, *, simulated: bool = False, accel: str = "kvm",
            vhost_net: bool = False) -> QemuCommand:
    if spec.vgpu.kind == "none":
        vgpu = None
    return build_command(spec, vgpu, qemu="qemu-system-x86_64", accel=accel, runtime_dir=RUN,
                         simulated=simulated, vhost_net=vhost_net)


def values(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (e.g. all -device arguments), in order."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def fake_qemu(pidfile: Path) -> subprocess.Popen[bytes]:
    """A process whose command line names the VM and its pidfile, as QEMU's does (-name guest=NAME,...
    -pidfile PATH), once it has exec'd."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                "-name", f"guest={pidfile.parent.name},debug-threads=on", "-pidfile", str(pidfile)])
    for _ in range(500):
        try:
            if str(pidfile).encode() in Path(f"/proc/{process.pid}/cmdline").read_bytes():
                break
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    pidfile.write_text(f"{process.pid}\n")
    return process


def vgpu_device(argv: list[str]) -> str:
    (device,) = [d for d in values(argv, "-device") if "id=hostdev0" in d]
    return device


# ---------------------------------------------------------------------- specs: TOML round trip and refusals


def full_spec() -> VmSpec:
    return VmSpec(
        name="full-1", profile="gaming", memory_mib=3000, cpus=3, cpu="host,hv_relaxed", machine="q35",
        firmware="ovmf", boot="cdrom", fast_boot=True, order=4, rtc_localtime=True,
        disks=[Disk("/srv/a.qcow2", "20G"), Disk("/srv/b.raw", None, "raw")], cdrom="/srv/install.iso",
        kernel="/boot/vmlinuz", initrd="/boot/initrd.img", append="console=ttyS0 quiet",
        network=Network(mode="bridge", bridge="br0", vhost=False, mac="52:54:00:aa:bb:cc"),
        vgpu=VgpuRequest(parent=GVT_PARENT, resolution="1920x1080", min_memory_mib=512, weight=4),
        vgpu_display=True, ramfb=True, igd_opregion=False,
        display=Display(backend="dbus", rendernode="/dev/dri/renderD128", resolution="1280x720",
                        options={"p2p": "yes"}),
        requires=["kvm.ignore_msrs=1"], extra_args=["-S", "-device", "isa-debug-exit"])


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_every_profile_round_trips_through_toml(profile: str | None, tmp_path: Path) -> None:
    spec = new_spec("vm1", profile)
    text = spec.to_toml()
    assert VmSpec.from_toml(text, "vm1.toml") == spec
    state = StateDir(tmp_path)
    path = specs.save(state, spec, new=True)
    assert path == tmp_path / "vms" / "vm1.toml" and specs.load(state, "vm1") == spec
    assert specs.names(state) == ["vm1"]


def test_a_full_spec_round_trips_and_none_is_left_out(tmp_path: Path) -> None:
    spec = full_spec().validate()
    text = spec.to_toml()
    assert VmSpec.from_toml(text, "x") == spec
    assert "null" not in text and "None" not in text
    bare = VmSpec("bare")
    assert "[vgpu]" not in bare.to_toml() and "cdrom" not in bare.to_toml()
    assert VmSpec.from_toml(bare.to_toml(), "x") == bare
    # Written atomically; a second create of the same name is refused.
    state = StateDir(tmp_path)
    specs.save(state, spec, new=True)
    with pytest.raises(Exception, match="already exists"):
        specs.save(state, spec, new=True)
    assert [p.name for p in (tmp_path / "vms").iterdir()] == ["full-1.toml"]


BAD_SPECS = [
    ('memory_mib = "lots"', "memory_mib must be a positive integer (MiB), got 'lots'"),
    ("memory_mib = 0", "memory_mib must be a positive integer (MiB), got 0"),
    ("memory_mib = true", "memory_mib must be a positive integer (MiB), got true"),
    ("vgpu = {min_memory_mib = 1.5}", "vgpu.min_memory_mib must be a positive integer (MiB), got 1.5"),
    ("cpus = 0", "cpus must be a positive integer up to 255, got 0"),
    ('firmware = "uefi"', "firmware must be one of seabios, ovmf, got 'uefi'"),
    ('machine = "virt"', "machine must be one of pc, q35, got 'virt'"),
    ('boot = "kernel"', "boot = 'kernel' needs kernel"),
    ('boot = "cdrom"', "boot = 'cdrom' needs cdrom"),
    ('initrd = "/boot/initrd"', "initrd and append need kernel"),
    ('colour = "red"', "unknown field 'colour'"),
    ('profile = "racing"', "profile must be one of streaming, gaming, automotive, got 'racing'"),
    ('disks = [{path = "disk.qcow2"}]', "disks[0].path must be an absolute path, got 'disk.qcow2'"),
    ('disks = [{path = "/d", format = "vmdk"}]', "disks[0].format must be one of qcow2, raw, got 'vmdk'"),
    ('disks = [{path = "/d", size = "lots"}]', "disks[0].size must be a size such as 20G"),
    ('disks = [{size = "1G"}]', "disks[0].path is missing"),
    ('disks = [{path = "/d"}, {path = "/d"}]', "disks: /d is given twice"),
    ('cdrom = "x.iso"', "cdrom must be an absolute path"),
    ('network = {mode = "bridge"}', "network.mode = 'bridge' needs network.bridge"),
    ('network = {mode = "slirp"}', "network.mode must be one of none, user, tap, bridge, got 'slirp'"),
    ('network = {mode = "user", mac = "52:54:00:zz:00:00"}', "network.mac must look like 52:54:00:12:34:56"),
    ('network = {mode = "user", speed = 1}', "unknown field 'network.speed'"),
    ('vgpu = {uuid = "nope"}', "vgpu.uuid must be a UUID, got 'nope'"),
    (f'vgpu = {{uuid = "{UUID.upper()}"}}', f"vgpu.uuid must be written in lower case with hyphens: {UUID}"),
    (f'vgpu = {{uuid = "{UUID}", type = "i915-GVTg_V5_4"}}', "vgpu: give either uuid, or type, or requirements"),
    ('vgpu = {type = "i915-GVTg_V5_4", resolution = "1920x1200"}',
     "vgpu: give either type or requirements, not type with resolution"),
    ('vgpu = {resolution = "big"}', "vgpu.resolution must look like 1920x1200, got 'big'"),
    ("vgpu = {weight = 17}", "vgpu.weight must be a positive integer up to 16, got 17"),
    ('vgpu = {parent = "0000:00:02.0"}', "vgpu.parent alone says nothing"),
    ("vgpu_display = true", "vgpu_display = true needs a vGPU"),
    ('vgpu_display = true\nvgpu = {type = "t"}\ndisplay = {backend = "none"}',
     "vgpu_display = true needs an OpenGL display backend"),
    ('ramfb = true\nvgpu = {type = "t"}', "ramfb = true needs vgpu_display = true"),
    ('display = {backend = "rdp"}', "display.backend must be one of vnc, spice, egl-headless, dbus, gtk, sdl, none"),
    ('display = {backend = "spice", vnc_socket = "/x.sock"}', "display.vnc_socket needs display.backend vnc"),
    ('display = {resolution = "800"}', "display.resolution must look like 1920x1200"),
    ('display = {options = {gl = "on,x"}}', "display.options.gl must be a value without ','"),
    # Nothing in a spec opens a listener or a file through the display's options (VNC websocket, SPICE port).
    ('display = {options = {websocket = "5700"}}', "display.options.websocket is not allowed (only options"),
    ('display = {options = {to = "99"}}', "display.options.to is not allowed"),
    ('display = {backend = "spice", options = {port = "5930"}}', "display.options.port is not allowed"),
    ('display = {backend = "dbus", options = {addr = "unix:path=/x"}}', "display.options.addr is not allowed"),
    ('display = {options = {share = "ignore"}}', "allowed (only options that cannot open a listener or a file: gl,"),
    # Integers beyond sensible (and TOML's) range.
    ("memory_mib = 9223372036854775807",
     "memory_mib must be a positive integer (MiB) up to 16777216, got 9223372036854775807"),
    ("cpus = 256", "cpus must be a positive integer up to 255, got 256"),
    ("order = 10000", "order must be an integer from 0 to 9999, got 10000"),
    ("order = true", "order must be an integer from 0 to 9999, got true"),
    ("vgpu = {min_memory_mib = 9223372036854775807}",
     "vgpu.min_memory_mib must be a positive integer (MiB) up to 16777216"),
    ('requires = ["ignore_msrs"]', "requires[0] must look like MODULE.PARAMETER=VALUE"),
    ("extra_args = [1]", "extra_args must be a list of strings"),
    ("disks = 3", "disks must be a list of tables"),
    ("order = -1", "order must be an integer from 0 to 9999"),
]


@pytest.mark.parametrize(("line", "message"), BAD_SPECS)
def test_bad_specs_are_refused_naming_the_field(line: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "vms" / "x.toml"
    path.parent.mkdir()
    path.write_text(f'name = "x"\n{line}\n')
    with pytest.raises(InvalidInput) as error:
        specs.load(StateDir(tmp_path), "x")
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_bad_names_files_and_toml(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    for name in ("Upper", "-dash", "a" * 64, "a/b", "", "under_score"):
        with pytest.raises(InvalidInput, match="VM name must be"):
            specs.spec_path(state, name)
    path = tmp_path / "vms" / "y.toml"
    path.parent.mkdir()
    path.write_text("name = \n")
    with pytest.raises(InvalidInput, match="not valid TOML"):
        specs.load(state, "y")
    path.write_text('name = "z"\n')
    with pytest.raises(InvalidInput, match="name is 'z' but the file is named for 'y'"):
        specs.load(state, "y")
    path.write_text("memory_mib = 1\n")
    with pytest.raises(InvalidInput, match="name is missing"):
        specs.load(state, "y")
    with pytest.raises(Exception, match="no VM 'nothing'"):
        specs.load(state, "nothing")


# ---------------------------------------------------------------------- profiles


def test_profile_defaults() -> None:
    base = new_spec("b")
    assert (base.profile, base.memory_mib, base.cpus, base.firmware, base.network.mode) == (None, 2048, 2, "seabios",
                                                                                            "user")
    assert base.vgpu.kind == "none" and not base.vgpu_display and base.display.backend == "vnc"

    streaming = new_spec("s", "streaming")
    assert streaming.vgpu == VgpuRequest(resolution="1920x1200")
    assert streaming.vgpu_display and streaming.ramfb and streaming.display.backend == "egl-headless"
    assert streaming.memory_mib == 4096 and streaming.requires == []

    gaming = new_spec("g", "gaming")
    assert gaming.vgpu == VgpuRequest(largest=True) and gaming.vgpu.kind == "requirements"
    assert gaming.cpu == GAMING_CPU == "host,kvm=off,hv_relaxed,hv_spinlocks=0x1fff,hv_vapic,hv_time"
    assert gaming.requires == ["kvm.ignore_msrs=1"] and gaming.rtc_localtime
    assert gaming.display.backend == "spice" and gaming.vgpu_display and gaming.ramfb
    assert (gaming.memory_mib, gaming.cpus, gaming.firmware) == (8192, 4, "seabios")

    car = new_spec("c", "automotive")
    assert car.vgpu == VgpuRequest(resolution="1024x768") and car.display.resolution == "1024x768"
    assert car.display.backend == "gtk" and car.fast_boot and car.order == 1
    assert (car.memory_mib, car.cpus) == (1024, 1)


def test_switching_profile_keeps_the_vms_own_fields() -> None:
    spec = replace(new_spec("v", "gaming"), disks=[Disk("/d.qcow2")], extra_args=["-S"],
                   network=Network(mode="tap"), memory_mib=1234)
    switched = apply_profile(spec, "streaming")
    assert switched.profile == "streaming" and switched.memory_mib == 4096 and switched.cpu is None
    assert switched.requires == [] and not switched.rtc_localtime
    assert switched.disks == [Disk("/d.qcow2")] and switched.extra_args == ["-S"] and switched.network.mode == "tap"
    assert apply_profile(switched, None).vgpu.kind == "none"


# ---------------------------------------------------------------------- argv on a real host (a given vGPU)


def test_base_vm_argv_exactly() -> None:
    spec = replace(new_spec("vm1"), disks=[Disk("/srv/vm1.qcow2", "10G")])
    argv = build_argv(spec, None, qemu="/usr/bin/qemu-system-x86_64", accel="kvm", runtime_dir=RUN, simulated=False)
    mac = default_mac("vm1")
    assert argv == [
        "/usr/bin/qemu-system-x86_64", "-name", "guest=vm1,debug-threads=on", "-machine", "pc", "-accel", "kvm",
        "-cpu", "host", "-m", "2048", "-smp", "2", "-no-user-config", "-nodefaults", "-msg", "timestamp=on",
        "-qmp", f"unix:{RUN}/qmp.sock,server=on,wait=off", "-pidfile", f"{RUN}/qemu.pid",
        "-chardev", f"socket,id=serial0,path={RUN}/serial.sock,server=on,wait=off,logfile={RUN}/serial.log",
        "-serial", "chardev:serial0", "-boot", "order=c",
        "-drive", "file=/srv/vm1.qcow2,if=virtio,format=qcow2",
        "-device", "qemu-xhci,id=usb", "-device", "usb-tablet,id=input0,bus=usb.0",
        "-netdev", "user,id=n0", "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
        "-device", "VGA,id=video0", "-display", "none", "-vnc", f"unix:{RUN}/vnc.sock",
    ]
    assert "-daemonize" not in argv
    assert mac.startswith("52:54:00:") and mac != default_mac("vm2")


@pytest.mark.parametrize("profile", list(PROFILES))
def test_profile_argv_on_a_real_host(profile: str) -> None:
    cmd = command(new_spec("vm1", profile))
    argv = cmd.argv
    device = vgpu_device(argv)
    # ramfb (every profile has it) means the non-hotpluggable driver; display explicit; OpRegion for GVT-g.
    assert device == f"vfio-pci-nohotplug,id=hostdev0,sysfsdev={SYSFS},display=on,ramfb=on,x-igd-opregion=on" + (
        ",xres=1024,yres=768" if profile == "automotive" else "")
    assert values(argv, "-vga") == ["none"]
    assert not any(d.startswith("VGA") for d in values(argv, "-device"))
    assert values(argv, "-global") == ["PIIX4_PM.disable_s3=1", "PIIX4_PM.disable_s4=1"]
    assert values(argv, "-qmp") == [f"unix:{RUN}/qmp.sock,server=on,wait=off"]
    assert cmd.notes == [] and cmd.replaced_vgpu is None
    if profile == "streaming":
        assert values(argv, "-display") == ["egl-headless"] and values(argv, "-vnc") == [f"unix:{RUN}/vnc.sock"]
        assert values(argv, "-m") == ["4096"]
    elif profile == "gaming":
        assert values(argv, "-cpu") == [GAMING_CPU] and values(argv, "-rtc") == ["base=localtime"]
        assert values(argv, "-display") == ["none"]
        assert values(argv, "-spice") == [f"unix=on,addr={RUN}/spice.sock,disable-ticketing=on,gl=on"]
    else:
        assert values(argv, "-display") == ["gtk,gl=on"] and values(argv, "-boot") == ["order=c,menu=off"]
        assert values(argv, "-smp") == ["1"] and values(argv, "-m") == ["1024"]
        assert f"virtio-net-pci,netdev=n0,mac={default_mac('vm1')},romfile=" in values(argv, "-device")


GL_DISPLAYS = {
    "vnc": (["egl-headless"], [f"unix:{RUN}/vnc.sock"], []),
    "egl-headless": (["egl-headless"], [f"unix:{RUN}/vnc.sock"], []),
    "spice": (["none"], [], [f"unix=on,addr={RUN}/spice.sock,disable-ticketing=on,gl=on"]),
    "dbus": (["dbus,p2p=yes,gl=on"], [], []),
    "gtk": (["gtk,gl=on"], [], []),
    "sdl": (["sdl,gl=on"], [], []),
}
PLAIN_DISPLAYS = {
    "vnc": (["none"], [f"unix:{RUN}/vnc.sock"], []),
    "egl-headless": (["egl-headless"], [f"unix:{RUN}/vnc.sock"], []),
    "spice": (["none"], [], [f"unix=on,addr={RUN}/spice.sock,disable-ticketing=on"]),
    "dbus": (["dbus,p2p=yes"], [], []),
    "gtk": (["gtk"], [], []),
    "sdl": (["sdl"], [], []),
    "none": (["none"], [], []),
}


@pytest.mark.parametrize("backend", list(GL_DISPLAYS))
def test_every_display_with_the_vgpu_as_the_display_uses_opengl(backend: str) -> None:
    spec = replace(new_spec("vm1"), vgpu=VgpuRequest(type="i915-GVTg_V5_4"), vgpu_display=True,
                   display=Display(backend=backend))
    argv = command(spec).argv
    assert vgpu_device(argv) == f"vfio-pci,id=hostdev0,sysfsdev={SYSFS},display=on,x-igd-opregion=on"
    assert values(argv, "-vga") == ["none"]
    assert (values(argv, "-display"), values(argv, "-vnc"), values(argv, "-spice")) == GL_DISPLAYS[backend]


@pytest.mark.parametrize("backend", list(PLAIN_DISPLAYS))
def test_every_display_with_the_vgpu_not_shown(backend: str) -> None:
    spec = replace(new_spec("vm1"), vgpu=VgpuRequest(type="i915-GVTg_V5_4"), display=Display(backend=backend))
    argv = command(spec).argv
    assert vgpu_device(argv) == f"vfio-pci,id=hostdev0,sysfsdev={SYSFS},display=off,x-igd-opregion=on"
    assert "-vga" not in argv and "VGA,id=video0" in values(argv, "-device")
    assert (values(argv, "-display"), values(argv, "-vnc"), values(argv, "-spice")) == PLAIN_DISPLAYS[backend]
    assert ("usb-tablet,id=input0,bus=usb.0" in values(argv, "-device")) == (backend != "none")


def test_opregion_only_for_gvt_types_unless_asked_and_display_options() -> None:
    spec = replace(new_spec("vm1"), vgpu=VgpuRequest(type="mdpy-hd"), vgpu_display=True,
                   display=Display(backend="egl-headless", rendernode="/dev/dri/renderD129", vnc_socket="/v/s.sock",
                                   options={"lossy": "on"}))
    argv = command(spec, MDPY).argv
    assert vgpu_device(argv) == f"vfio-pci,id=hostdev0,sysfsdev={SYSFS},display=on"
    assert "-global" not in argv  # the S3/S4 globals are for GVT-g
    assert values(argv, "-display") == ["egl-headless,rendernode=/dev/dri/renderD129,lossy=on"]
    assert values(argv, "-vnc") == ["unix:/v/s.sock"]
    forced = command(replace(spec, igd_opregion=True), MDPY).argv
    assert vgpu_device(forced).endswith(",display=on,x-igd-opregion=on")
    off = command(replace(spec, vgpu=VgpuRequest(type="i915-GVTg_V5_4"), igd_opregion=False)).argv
    assert "x-igd-opregion" not in vgpu_device(off)
    dbus = command(replace(spec, display=Display(backend="dbus", options={"p2p": "no"}))).argv
    assert values(dbus, "-display") == ["dbus,gl=on,p2p=no"]


def test_firmware_boot_disks_network_and_extra_args() -> None:
    spec = replace(new_spec("vm1"), firmware="ovmf", machine="q35", boot="cdrom",
                   disks=[Disk("/srv/a,b.qcow2"), Disk("/srv/c.img", format="raw")], cdrom="/iso/x.iso",
                   network=Network(mode="tap", ifname="tap7"), extra_args=["-S", "-device", "isa-debug-exit"],
                   vgpu=VgpuRequest(type="i915-GVTg_V5_4"))
    cmd = command(spec, vhost_net=True)
    argv = cmd.argv
    assert values(argv, "-drive") == [
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
        f"if=pflash,format=raw,unit=1,file={RUN}/OVMF_VARS.fd",
        "file=/srv/a,,b.qcow2,if=virtio,format=qcow2",  # QEMU's comma escape
        "file=/srv/c.img,if=virtio,format=raw",
        "file=/iso/x.iso,if=ide,media=cdrom,readonly=on",
    ]
    assert cmd.paths.nvram == RUN / "OVMF_VARS.fd"
    assert values(argv, "-boot") == ["order=dc"] and values(argv, "-machine") == ["q35"]
    assert values(argv, "-global") == ["ICH9-LPC.disable_s3=1", "ICH9-LPC.disable_s4=1"]
    assert values(argv, "-netdev") == ["tap,id=n0,ifname=tap7,script=no,downscript=no,vhost=on"]
    assert argv[-3:] == ["-S", "-device", "isa-debug-exit"]
    no_vhost = command(spec, vhost_net=False)
    assert values(no_vhost.argv, "-netdev") == ["tap,id=n0,ifname=tap7,script=no,downscript=no"]
    assert any("no /dev/vhost-net" in n for n in no_vhost.notes)
    bridge = command(replace(spec, network=Network(mode="bridge", bridge="br0", mac="52:54:00:01:02:03")),
                     vhost_net=True).argv
    assert values(bridge, "-netdev") == ["tap,id=n0,br=br0,helper=/usr/lib/qemu/qemu-bridge-helper,vhost=on"]
    assert "virtio-net-pci,netdev=n0,mac=52:54:00:01:02:03" in values(bridge, "-device")
    assert "-netdev" not in command(replace(spec, network=Network(mode="none"))).argv
    kernel = replace(spec, boot="kernel", kernel="/k/vmlinuz", initrd="/k/initrd", append="console=ttyS0 quiet")
    argv = command(kernel).argv
    assert argv[argv.index("-kernel"):argv.index("-kernel") + 6] == [
        "-kernel", "/k/vmlinuz", "-initrd", "/k/initrd", "-append", "console=ttyS0 quiet"]
    assert "-boot" not in argv
    disk_first = command(replace(spec, boot="disk")).argv
    assert values(disk_first, "-boot") == ["order=cd"]  # an empty new disk falls through to the installer


def test_tcg_and_gvt_notes() -> None:
    cmd = command(new_spec("vm1", "gaming"), accel="tcg")
    assert values(cmd.argv, "-cpu") == ["max,kvm=off,hv_relaxed,hv_spinlocks=0x1fff,hv_vapic,hv_time"]
    assert values(cmd.argv, "-accel") == ["tcg"]
    assert any("TCG has no 'host' CPU model" in n for n in cmd.notes)
    assert any("GVT-g needs KVM" in n for n in cmd.notes)
    with pytest.raises(ValueError, match="accelerator"):
        command(new_spec("vm1"), accel="hvf")
    with pytest.raises(ValueError, match="asks for"):
        build_argv(new_spec("vm1", "gaming"), None, qemu="q", accel="kvm", runtime_dir=RUN, simulated=False)
    ovmf = command(replace(new_spec("vm1", "streaming"), firmware="ovmf"))
    assert any("unmodified OVMF" in n for n in ovmf.notes)
    long = build_command(new_spec("vm1"), None, qemu="q", accel="kvm", runtime_dir=Path("/" + "x" * 120),
                         simulated=False)
    assert any("longer than 107 bytes" in n for n in long.notes)


# ---------------------------------------------------------------------- argv on a simulated host (replacement)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_simulated_host_replaces_the_vgpu_with_an_emulated_adapter(profile: str) -> None:
    vgpu = V58 if profile == "automotive" else V54
    cmd = command(new_spec("vm1", profile), vgpu, simulated=True)
    argv = cmd.argv
    size = (1024, 768) if profile == "automotive" else (1920, 1200)
    assert vgpu_device(argv) == f"VGA,id=hostdev0,xres={size[0]},yres={size[1]}"
    assert values(argv, "-vga") == ["none"] and cmd.replaced_vgpu == size
    assert not any("vfio" in a or "sysfsdev" in a or "gl=on" in a or "egl-headless" in a for a in argv)
    assert any(n.startswith(f"simulated host: QEMU cannot open the simulated vGPU {UUID} ({vgpu.type_id}")
               and f"at {size[0]}x{size[1]}" in n for n in cmd.notes)
    # Everything else is the same VM.
    real = command(new_spec("vm1", profile), vgpu).argv
    assert values(argv, "-m") == values(real, "-m") and values(argv, "-netdev") == values(real, "-netdev")


def test_simulated_host_without_the_vgpu_display_adds_a_secondary_adapter() -> None:
    spec = replace(new_spec("vm1"), vgpu=VgpuRequest(type="i915-GVTg_V5_4"))
    cmd = command(spec, simulated=True)
    assert values(cmd.argv, "-device")[-2:] == ["VGA,id=video0", "bochs-display,id=hostdev0,xres=1920,yres=1200"]
    unknown = command(spec, ResolvedVgpu(UUID, "mtty", "mtty-1", None, "active"), simulated=True)
    assert vgpu_device(unknown.argv) == "bochs-display,id=hostdev0,xres=1024,yres=768"
    assert any("gives no resolution" in n for n in unknown.notes)


def test_qemu_accepts_the_emulated_adapters() -> None:
    """Debian's QEMU knows xres/yres on both adapters the simulated host uses (a help query, no VM)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 is required (Debian: qemu-system-x86)")
    for device in ("VGA", "bochs-display"):
        text = subprocess.run([qemu, "-device", f"{device},help"], capture_output=True, text=True, timeout=30).stdout
        assert "xres=<uint32>" in text and "yres=<uint32>" in text


# ---------------------------------------------------------------------- libvirt XML



XML_SPECS = {
    "base": lambda: new_spec("vm1"),
    "streaming": lambda: new_spec("vm1", "streaming"),
    "gaming": lambda: replace(new_spec("vm1", "gaming"), disks=[Disk("/srv/win.qcow2", "64G")]),
    "automotive": lambda: replace(new_spec("vm1", "automotive"), kernel="/k/bzImage", initrd="/k/initrd",
                                  append="quiet", boot="kernel"),
    "full": lambda: replace(full_spec(), profile=None, cpu="host,hv_relaxed,+avx2"),
    "sdl-tap-vnc-off": lambda: replace(new_spec("vm1"), vgpu=VgpuRequest(uuid=UUID),
                                       network=Network(mode="tap", ifname="tap0"),
                                       display=Display(backend="sdl", resolution="800x600")),
    "spice-nodisplay": lambda: replace(new_spec("vm1"), display=Display(backend="spice"), cpu="max"),
    "gtk-cdrom-q35": lambda: replace(new_spec("vm1", "automotive"), machine="q35", cdrom="/iso/x.iso",
                                     firmware="ovmf"),
    "headless": lambda: replace(new_spec("vm1"), network=Network(mode="none"), display=Display(backend="none"),
                                cpu="Skylake-Client"),
    # Windows on a vGPU, as 'vm create --os': a gaming Windows 10 and a streamed Windows 11.
    "windows10": lambda: specs.merge(new_spec("vm1", "gaming"), {
        "os": "windows10", "disks": [{"path": "/srv/win10.qcow2", "size": "64G"}], "cdrom": "/iso/Win10.iso",
        "drivers_cdrom": "/iso/virtio-win.iso"}, "windows10"),
    "windows11": lambda: specs.merge(new_spec("vm1", "streaming"), {
        "os": "windows11", "disks": [{"path": "/srv/win11.qcow2", "size": "64G"}], "cdrom": "/iso/Win11.iso",
        "drivers_cdrom": "/iso/virtio-win.iso"}, "windows11"),
}


@pytest.mark.parametrize("name", list(XML_SPECS))
def test_domain_xml_is_valid_for_libvirt(name: str, tmp_path: Path) -> None:
    spec = XML_SPECS[name]()
    vgpu = None if spec.vgpu.kind == "none" else V54
    validate_xml(domain_xml(spec, vgpu), tmp_path, name)
    validate_xml(domain_xml(spec, vgpu, paths=RuntimePaths(RUN), emulator="/usr/bin/qemu-system-x86_64"),
                 tmp_path, name + "-paths")


# Each case with a GVT-g vGPU and with a generic mdev one (the kernel's mdpy sample); once if it has no vGPU.
GOLDEN_CASES = [(name, vgpu) for name in XML_SPECS for vgpu in (V54, MDPY)
                if XML_SPECS[name]().vgpu.kind != "none" or vgpu is V54]


@pytest.mark.parametrize(("name", "vgpu"), GOLDEN_CASES,
                         ids=[f"{n}-{'gvt' if v is V54 else 'mdpy'}" for n, v in GOLDEN_CASES])
def test_argv_and_xml_golden(name: str, vgpu: ResolvedVgpu, golden: GoldenFn) -> None:
    """The exact QEMU command line (an argument a line) and libvirt XML of each case, on a real host."""
    spec = XML_SPECS[name]()
    given = None if spec.vgpu.kind == "none" else vgpu
    cmd = command(spec, given)
    case = f"{name}-{'mdpy' if vgpu is MDPY else 'gvt'}"
    golden(f"vm/{case}.argv", "".join(f"{arg}\n" for arg in cmd.argv) + "".join(f"# {n}\n" for n in cmd.notes))
    golden(f"vm/{case}.xml", domain_xml(spec, given, paths=RuntimePaths(RUN), emulator="/usr/bin/qemu-system-x86_64"))


def test_domain_xml_contents() -> None:
    text = domain_xml(new_spec("vm1", "streaming"), V54, paths=RuntimePaths(RUN))
    assert text.startswith('<domain xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0" type="kvm">')
    assert ('<hostdev mode="subsystem" type="mdev" managed="no" model="vfio-pci" display="on" ramfb="on">'
            in text)
    assert f'<address uuid="{UUID}" />' in text and '<model type="none" />' in text
    assert '<graphics type="egl-headless" />' in text and f'<graphics type="vnc" socket="{RUN}/vnc.sock" />' in text
    assert '<qemu:property name="x-igd-opregion" type="bool" value="true" />' in text
    assert '<memory unit="MiB">4096</memory>' in text and "<suspend-to-mem enabled=\"no\" />" in text
    gaming = domain_xml(new_spec("vm1", "gaming"), V54)
    for fragment in ('<cpu mode="host-passthrough" />', '<relaxed state="on" />', '<vapic state="on" />',
                     '<spinlocks state="on" retries="8191" />', '<hidden state="on" />',
                     '<timer name="hypervclock" present="yes" />', '<clock offset="localtime">',
                     '<listen type="none" />', '<gl enable="yes" />'):
        assert fragment in gaming
    assert "qemu:commandline" not in gaming
    car = domain_xml(new_spec("vm1", "automotive"), V58)
    for fragment in ('<qemu:arg value="gtk,gl=on" />', '<graphics type="egl-headless" />',
                     '<qemu:property name="xres" type="unsigned" value="1024" />', '<bootmenu enable="no" />',
                     '<rom enabled="no" />'):
        assert fragment in car
    plain = domain_xml(new_spec("vm1"), None)
    assert "hostdev" not in plain and '<model type="vga"' in plain and "qemu:" not in plain.split(">", 1)[1]


# ---------------------------------------------------------------------- runtime: running, requirements


def test_is_running_follows_the_pidfile_and_the_process(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    paths = RuntimePaths.for_vm(state, "vm1")
    assert paths.directory == tmp_path / "vms" / "vm1"
    assert not is_running(state, "vm1")
    paths.directory.mkdir(parents=True)
    paths.pidfile.write_text("999999999\n")
    assert not is_running(state, "vm1")  # no such process
    # A process whose command line names the pidfile stands in for QEMU (-pidfile PATH).
    process = fake_qemu(paths.pidfile)
    try:
        assert is_running(state, "vm1")
        other = RuntimePaths.for_vm(state, "vm2")
        other.directory.mkdir()
        other.pidfile.write_text(f"{process.pid}\n")  # a live pid that is not that VM's QEMU
        assert not is_running(state, "vm2")
    finally:
        process.kill()
        process.wait()
    assert not is_running(state, "vm1")


def test_vm_vgpu_uuid_is_stable_per_name() -> None:
    assert vm_vgpu_uuid("car1") == vm_vgpu_uuid("car1") != vm_vgpu_uuid("car2")
    assert len(vm_vgpu_uuid("car1")) == 36
    assert vm_vgpu_uuid("car1") == "bab8b75e-33ea-5f6e-a052-2f693c445fa1"  # pinned: existing vGPUs keep it


@given(st.from_regex(specs.NAME_PATTERN, fullmatch=True))
def test_vm_vgpu_uuid_is_uuid5_of_the_name(name: str) -> None:
    # computed without hashlib (start-up cost), it must stay the UUID earlier versions gave the VM's vGPU
    assert vm_vgpu_uuid(name) == str(uuid.uuid5(uuid.NAMESPACE_URL, f"vgpuctl:vm:{name}"))


# ---------------------------------------------------------------------- the vm commands on a simulated host




@pytest.fixture
def gvt(mount_host: MountFn, tmp_path: Path) -> Cli:
    return Cli(mount_host("coffeelake", aperture_mib=1024), tmp_path / "state")


@pytest.mark.fuse
def test_vm_create_list_show_edit_rm(gvt: Cli, tmp_path: Path) -> None:
    _, out, _ = gvt("vm", "create", "s1", "--profile", "streaming", "--disk", "/srv/s1.qcow2:10G")
    assert f"created VM s1 (profile streaming): {gvt.state}/vms/s1.toml" in out
    _, out, _ = gvt("vm", "create", "g1", "--profile", "gaming", "--memory", "6144", "--cdrom", "/iso/win.iso",
                    "--disk", "/srv/g1.qcow2:64G")
    assert "requires (checked when it starts): kvm.ignore_msrs=1" in out
    gvt("vm", "create", "car1", "--profile", "automotive", "--kernel", "/k/bzImage", "--append", "quiet",
        "--order", "2", "--display", "sdl")
    gvt("vm", "create", "plain", "--network", "bridge:br0", "--no-vhost-net")
    code, _, err = gvt("vm", "create", "s1", ok=False)
    assert code == 1 and "VM 's1' already exists" in err
    code, _, err = gvt("vm", "create", "Bad", ok=False)
    assert code == 1 and "VM name must be" in err
    code, _, err = gvt("vm", "create", "x", "--memory", "0", ok=False)
    assert code == 1 and "memory_mib must be a positive integer (MiB), got 0" in err
    code, _, err = gvt("vm", "create", "x", "--vgpu-display", ok=False)
    assert code == 1 and "vgpu_display = true needs a vGPU" in err

    rows = gvt.json("vm", "list")
    assert isinstance(rows, list)
    assert [r["name"] for r in rows] == ["car1", "g1", "plain", "s1"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["g1"] == {"name": "g1", "profile": "gaming", "memory_mib": 6144, "cpus": 4,
                             "vgpu": "a new vGPU: the largest type that fits", "vgpu_display": True,
                             "display": "spice", "order": None, "autostart": False, "running": False}
    assert by_name["car1"]["order"] == 2 and by_name["car1"]["display"] == "sdl"
    assert by_name["car1"]["autostart"] is True  # the automotive profile starts its VMs in order
    assert by_name["plain"]["vgpu"] is None
    assert "a new vGPU: >= 1920x1200 [display, ramfb]" in gvt("vm", "list")[1]

    shown = gvt.json("vm", "show", "g1")
    assert isinstance(shown, dict)
    assert shown["spec"]["memory_mib"] == 6144 and shown["spec"]["cdrom"] == "/iso/win.iso"
    assert shown["spec"]["disks"] == [{"path": "/srv/g1.qcow2", "size": "64G", "format": "qcow2"}]
    assert shown["requires"] == [{"requirement": "kvm.ignore_msrs=1", "met": True, "actual": "Y",
                                  "where": "/sys/module/kvm/parameters/ignore_msrs"}]
    assert shown["paths"]["qmp_socket"] == f"{gvt.state}/vms/g1/qmp.sock" and shown["running"] is False
    gvt.root.write_text("/sys/module/kvm/parameters/ignore_msrs", "N")
    _, out, _ = gvt("vm", "show", "g1")
    assert "requires      kvm.ignore_msrs=1: NOT met (/sys/module/kvm/parameters/ignore_msrs is N)" in out
    assert "checked when the VM starts" in out and "profile       gaming: one big Windows VM" in out
    car = gvt.json("vm", "show", "car1")
    assert isinstance(car, dict)
    assert car["spec"]["boot"] == "kernel" and car["spec"]["kernel"] == "/k/bzImage"
    plain = gvt.json("vm", "show", "plain")
    assert isinstance(plain, dict) and plain["spec"]["network"] == {"mode": "bridge", "bridge": "br0",
                                                                    "vhost": False, "mac": default_mac("plain")}

    # edit: options on top of the spec; --profile switches the profile but keeps disks and boot.
    _, out, _ = gvt("vm", "edit", "s1", "--cpus", "3", "--no-ramfb", "--display", "dbus",
                    "--display-option", "p2p=no")
    spec = specs.load(StateDir(gvt.state), "s1")
    assert spec.cpus == 3 and not spec.ramfb and spec.display == Display(backend="dbus", options={"p2p": "no"})
    gvt("vm", "edit", "s1", "--no-vgpu")
    spec = specs.load(StateDir(gvt.state), "s1")
    assert spec.vgpu.kind == "none" and not spec.vgpu_display and not spec.ramfb
    gvt("vm", "edit", "s1", "--profile", "gaming")
    spec = specs.load(StateDir(gvt.state), "s1")
    assert spec.profile == "gaming" and spec.cpu == GAMING_CPU and spec.disks == [Disk("/srv/s1.qcow2", "10G")]
    gvt("vm", "edit", "s1", "--type", "i915-GVTg_V5_2", "-p", GVT_PARENT, "--qemu-arg=-S", "--cdrom", "none")
    spec = specs.load(StateDir(gvt.state), "s1")
    assert spec.vgpu == VgpuRequest(type="i915-GVTg_V5_2", parent=GVT_PARENT) and spec.extra_args == ["-S"]
    code, _, err = gvt("vm", "edit", "s1", "--display", "none", ok=False)
    assert code == 1 and "needs an OpenGL display backend" in err
    code, _, err = gvt("vm", "edit", "nothing", "--cpus", "1", ok=False)
    assert code == 1 and "no VM 'nothing'" in err

    # rm: refused while running, then the spec and runtime directory go, disks stay.
    paths = RuntimePaths.for_vm(StateDir(gvt.state), "s1")
    paths.directory.mkdir(parents=True)
    process = fake_qemu(paths.pidfile)
    try:
        code, _, err = gvt("vm", "rm", "s1", ok=False)
        assert code == 1 and "VM s1 is running; stop it first" in err
        assert gvt.json("vm", "show", "s1")["running"] is True  # type: ignore[index]
    finally:
        process.kill()
        process.wait()
    _, out, _ = gvt("vm", "rm", "s1")
    assert out.strip() == "removed VM s1; disk images kept: /srv/s1.qcow2"
    assert not paths.directory.exists() and not (gvt.state / "vms" / "s1.toml").exists()
    code, _, err = gvt("vm", "rm", "s1", ok=False)
    assert code == 1 and "no VM 's1'" in err


@pytest.mark.fuse
def test_vm_argv_resolves_the_vgpu_and_marks_the_simulated_replacement(gvt: Cli) -> None:
    gvt("vm", "create", "s1", "--profile", "streaming", "--disk", "/srv/s1.qcow2")
    gvt("vm", "create", "car1", "--profile", "automotive")
    gvt("vm", "create", "g1", "--profile", "gaming")
    _, out, _ = gvt("vm", "argv", "s1", "--accel", "tcg", "--qemu", "/usr/bin/qemu-system-x86_64")
    lines = out.splitlines()
    uuid = vm_vgpu_uuid("s1")
    assert lines[0] == (f"# would create vGPU {uuid} (i915-GVTg_V5_4 on {GVT_PARENT}) at start: the smallest type "
                        "that gives >= 1920x1200 (640 MiB graphics memory); 5 can be created there now; also possible: "
                        f"{GVT_PARENT} i915-GVTg_V5_1, {GVT_PARENT} i915-GVTg_V5_2")
    assert any(line.startswith("# simulated host: QEMU cannot open the simulated vGPU") for line in lines)
    command_line = lines[-1]
    assert command_line.startswith("/usr/bin/qemu-system-x86_64 -name guest=s1,debug-threads=on -machine pc "
                                   "-accel tcg -cpu max -m 4096")
    assert "-vga none -device VGA,id=hostdev0,xres=1920,yres=1200 -display none -vnc unix:" in command_line

    data = gvt.json("vm", "argv", "car1", "--accel", "kvm")
    assert isinstance(data, dict)
    assert data["vgpu"]["type"] == "i915-GVTg_V5_8" and data["vgpu"]["state"] == "new"
    assert data["simulated_replacement"] == "1024x768" and data["accel"] == "kvm"
    assert "VGA,id=hostdev0,xres=1024,yres=768" in data["argv"]
    assert data["paths"]["pidfile"] == f"{gvt.state}/vms/car1/qemu.pid"
    gaming = gvt.json("vm", "argv", "g1", "--accel", "kvm")
    assert isinstance(gaming, dict) and gaming["vgpu"]["type"] == "i915-GVTg_V5_1"  # the largest that fits
    assert "the largest type that fits now (2560 MiB graphics memory)" in gaming["vgpu"]["reason"]

    # An existing vGPU by UUID; the VM's own vGPU from an earlier start is found again.
    other = "11111111-0000-4000-8000-000000000001"
    gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_2", "-u", other)
    gvt("vm", "edit", "s1", "--vgpu", other)
    data = gvt.json("vm", "argv", "s1", "--accel", "kvm")
    assert isinstance(data, dict) and data["vgpu"] == {"uuid": other, "parent": GVT_PARENT, "type": "i915-GVTg_V5_2",
                                                       "resolution": "1920x1200", "state": "active",
                                                       "reason": "exists"}
    assert not any(n.startswith("would") for n in data["notes"])
    gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8", "-u", vm_vgpu_uuid("car1"))
    data = gvt.json("vm", "argv", "car1", "--accel", "kvm")
    assert isinstance(data, dict) and data["vgpu"]["state"] == "active"
    missing = "22222222-0000-4000-8000-000000000002"
    gvt("vm", "edit", "s1", "--vgpu", missing)
    code, _, err = gvt("vm", "argv", "s1", "--accel", "kvm", ok=False)
    assert code == 1 and f"vGPU {missing} neither exists nor is defined" in err
    gvt("define", "-u", missing, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4")
    _, out, _ = gvt("vm", "argv", "s1", "--accel", "kvm")
    assert f"# would start the defined vGPU {missing} (i915-GVTg_V5_4 on {GVT_PARENT}) at start" in out


@pytest.mark.fuse
def test_vm_argv_auto_accel_uses_the_kvm_probe(gvt: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from vgpuctl.host import kvm

    seen: list[HostRoot] = []

    def fake_probe(root: HostRoot, qemu_binary: str | None = None, run_guest: bool = True,
                   timeout_s: float = 3.0) -> kvm.KvmReport:
        seen.append(root)
        return kvm.KvmReport(True, True, 12, None, True, False, "KVM internal error. Suberror: 1",
                             "an ordinary guest cannot run under KVM")

    monkeypatch.setattr(kvm, "probe_kvm", fake_probe)
    gvt("vm", "create", "plain")
    _, out, _ = gvt("vm", "argv", "plain")
    assert "# accelerator tcg: an ordinary guest cannot run under KVM" in out and "-accel tcg -cpu max" in out
    assert seen == [HostRoot(Path("/"))]  # QEMU runs on this machine, not in the simulated host


@pytest.mark.fuse
def test_vm_xml_command(gvt: Cli, tmp_path: Path) -> None:
    gvt("vm", "create", "g1", "--profile", "gaming", "--disk", "/srv/g1.qcow2")
    _, out, err = gvt("vm", "xml", "g1")
    assert out.startswith("<domain ") and f"<address uuid=\"{vm_vgpu_uuid('g1')}\" />" in out
    assert "does not exist yet: create it first" in err and "simulated host" in err
    validate_xml(out, tmp_path, "cli")
    target = tmp_path / "out" / "g1.xml"
    target.parent.mkdir()
    _, out, _ = gvt("vm", "xml", "g1", "-o", str(target))
    assert out.startswith(f"wrote {target}") and target.read_text().startswith("<domain ")
    assert target.read_text() == gvt("vm", "xml", "g1")[1]


def test_check_requirements_reads_module_parameters(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    params = tmp_path / "sys/module/kvm/parameters"
    params.mkdir(parents=True)
    spec = new_spec("g", "gaming")
    (status,) = check_requirements(root, spec)
    assert status.met is None and "cannot tell" in status.describe()
    (params / "ignore_msrs").write_text("Y\n")
    assert check_requirements(root, spec)[0].met is True
    (params / "ignore_msrs").write_text("N\n")
    (status,) = check_requirements(root, spec)
    assert status.met is False and status.actual == "N"
    assert "echo 1 > /sys/module/kvm/parameters/ignore_msrs" in status.describe()


def test_the_profile_names_the_spec_checks_are_the_profiles() -> None:
    from vgpuctl.vm import spec

    assert tuple(PROFILES) == spec.PROFILE_NAMES


@pytest.mark.fuse
def test_autostart_and_keep_vgpu_from_the_command_line(gvt: Cli) -> None:
    gvt("vm", "create", "tmp1", "--type", "i915-GVTg_V5_4", "--release-vgpu", "--autostart", "--order", "3")
    spec = specs.load(StateDir(gvt.state), "tmp1")
    assert spec.vgpu.keep is False and spec.autostart is True and spec.order == 3
    gvt("vm", "edit", "tmp1", "--keep-vgpu", "--no-autostart")
    spec = specs.load(StateDir(gvt.state), "tmp1")
    assert spec.vgpu.keep is True and spec.autostart is False
    assert "keep" not in specs.spec_path(StateDir(gvt.state), "tmp1").read_text()  # the default is not written
    code, out, _ = gvt("vm", "autostart")
    assert code == 0 and "no VM is marked autostart" in out


# ---------------------------------------------------------------------- one bad file hides nothing


def break_some_specs(state: Path) -> dict[str, str]:
    """Next to good VMs: bad TOML, a bad field, a directory named like a spec, a file that is not a VM name."""
    vms = state / "vms"
    (vms / "bad-toml.toml").write_text("name = \n")
    (vms / "bad-field.toml").write_text('name = "bad-field"\nmemory_mib = "lots"\n')
    (vms / "dir.toml").mkdir()
    (vms / "Not A Name.toml").write_text('name = "x"\n')
    return {"bad-toml": "not valid TOML", "bad-field": "memory_mib must be a positive integer",
            "dir": "cannot be read as a spec", "Not A Name": "is not a VM name"}


@pytest.mark.fuse
def test_a_bad_spec_file_is_listed_with_its_error_and_the_others_still_work(gvt: Cli) -> None:
    gvt("vm", "create", "good1", "--profile", "automotive", "--no-autostart")
    gvt("vm", "create", "good2", "--profile", "streaming")
    rows_before = gvt.json("vm", "list")
    expected = break_some_specs(gvt.state)

    rows = gvt.json("vm", "list")  # exit status 0: the listing itself worked
    assert isinstance(rows, list) and isinstance(rows_before, list)
    good = [r for r in rows if "error" not in r]
    assert good == rows_before  # the good VMs' rows, unchanged in shape and content
    bad = {r["name"]: r for r in rows if "error" in r}
    assert set(bad) == set(expected)
    for name, message in expected.items():
        assert set(bad[name]) == {"name", "file", "error"} and bad[name]["file"] == f"{gvt.state}/vms/{name}.toml"
        assert message in bad[name]["error"] and bad[name]["file"] in bad[name]["error"]

    code, out, err = gvt("vm", "list")
    assert code == 0 and "good1" in out and "good2" in out and "bad spec" in out
    for name, message in expected.items():
        assert f"{gvt.state}/vms/{name}.toml" in err and message in err

    # (test_vm_lifecycle's autostart test starts good VMs beside a bad file.)
    code, out, _ = gvt("vm", "autostart", "--json", ok=False)
    results = {r["name"]: r for r in json.loads(out)}
    assert code == 1 and set(results) == set(expected) and {r["outcome"] for r in results.values()} == {"failed"}
    assert "cannot be read" in results["dir"]["detail"]


@pytest.mark.fuse
def test_the_service_lists_the_good_vms_and_each_bad_spec(mount_host: MountFn, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from vgpuctl.service.app import create_app

    host, state = mount_host("coffeelake", aperture_mib=1024), StateDir(tmp_path / "state")
    specs.save(state, new_spec("good1", "streaming"), new=True)
    expected = break_some_specs(state.path)
    with TestClient(create_app(host, state, token="t" * 32), base_url="http://127.0.0.1",
                    headers={"Authorization": "Bearer " + "t" * 32}) as client:
        answer = client.get("/api/v1/vms")
    assert answer.status_code == 200, answer.text
    rows = {r["name"]: r for r in answer.json()}
    assert rows["good1"]["state"] == "stopped" and rows["good1"]["spec"]["name"] == "good1"
    for name, message in expected.items():
        assert rows[name]["state"] == "error" and message in rows[name]["error"]
        assert rows[name]["file"] == str(state.path / "vms" / f"{name}.toml")


@pytest.mark.fuse
def test_commands_on_a_vm_that_does_not_exist_make_no_lock_file(gvt: Cli, tmp_path: Path) -> None:
    gvt("vm", "create", "real", "--profile", "automotive")
    for command in ("status", "start", "stop", "kill", "rm", "release-vgpu", "console"):
        code, _, err = gvt("vm", command, "nosuchvm", ok=False)
        assert code == 1 and "no VM 'nosuchvm'" in err, (command, err)
    assert not (gvt.state / "locks" / "vm-nosuchvm.lock").exists()


def test_temp_files_of_killed_spec_writes_are_cleaned_at_the_next_write(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    spec = new_spec("vm1")
    path = specs.save(state, spec, new=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that ran and is no more, as a writer killed mid-write
    stale = path.parent / f".vm1.toml.{gone.pid}.123.tmp"
    live = path.parent / f".vm1.toml.{os.getpid()}.456.tmp"  # a writer that still runs: its own to finish
    other = path.parent / f".vm2.toml.{gone.pid}.789.tmp"  # another VM's: left for that VM's next write
    for temp in (stale, live, other):
        temp.write_text("half")
    specs.save(state, replace(spec, cpus=3))
    assert not stale.exists() and live.exists() and other.exists()
    assert specs.load(state, "vm1").cpus == 3


@pytest.mark.fuse
def test_out_of_range_numbers_and_listening_display_options_are_refused_by_the_cli(gvt: Cli) -> None:
    for option, message in ((["--memory", str(2**63)], "memory_mib must be a positive integer (MiB) up to"),
                            (["--order", str(2**63)], "order must be an integer from 0 to 9999"),
                            (["--display-option", "websocket=5700"], "display.options.websocket is not allowed")):
        code, _, err = gvt("vm", "create", "x", *option, ok=False)
        assert code == 1 and message in err, (option, err)
    assert not (gvt.state / "vms" / "x.toml").exists()


def test_a_pid_in_the_vms_files_that_now_names_another_process_is_not_its_qemu(tmp_path: Path) -> None:
    from vgpuctl.vm import lifecycle

    state = StateDir(tmp_path / "state")
    specs.save(state, new_spec("vm1"), new=True)
    paths = RuntimePaths.for_vm(state, "vm1")
    paths.directory.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a pid reused by another
    try:
        paths.pidfile.write_text(f"{other.pid}\n")
        (paths.directory / "run.json").write_text(json.dumps(
            {"run_id": 1, "argv": [], "shell": None, "qemu": {"pid": other.pid, "start_time": 1}}))
        now = lifecycle.status(HostRoot(tmp_path), state, "vm1")
        assert now.pid is None and now.state != "running"
        assert not is_running(state, "vm1")
    finally:
        other.kill()
        other.wait()


def test_a_spec_field_is_settable_everywhere_it_is_declared() -> None:
    """The spec's fields are the machine's and each device's; the fields an API or CLI create may set, the
    API's models and the CLI's options must not drift from them."""
    from dataclasses import fields

    from vgpuctl.cli.vm import NO_OPTION_FIELDS, OPTION_FIELDS, OTHER_OPTION_FIELDS, create
    from vgpuctl.service.api import VmCreate
    from vgpuctl.vm.devices import KINDS, TABLES
    from vgpuctl.vm.devices.base import DeviceKind
    from vgpuctl.vm.inventory import SPEC_FIELDS
    from vgpuctl.vm.spec import PROFILE_NAMES, Machine, VmSpec

    spec_fields = {f.name for f in fields(VmSpec)} - {"name", "profile"}
    assert all(isinstance(kind, DeviceKind) for kind in KINDS)
    owned = [f.name for f in fields(Machine)] + [f.name for kind in KINDS for f in fields(kind.Fields)]
    assert sorted(owned) == sorted(f.name for f in fields(VmSpec))  # each field is the machine's or one device's
    assert set(SPEC_FIELDS) == spec_fields
    assert set(VmCreate.model_fields) - {"name", "profile"} == spec_fields
    assert typing.get_args(typing.get_args(VmCreate.model_fields["profile"].annotation)[0]) == PROFILE_NAMES

    def model_in(annotation: typing.Any) -> type[BaseModel]:
        """The pydantic model in ``X | None`` or ``list[X] | None``."""
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return next(model_in(a) for a in typing.get_args(annotation) if a is not type(None))

    tables = {f.name: TABLES[str(f.type).removeprefix("list[").removesuffix("]")] for f in fields(VmSpec)
              if str(f.type).removeprefix("list[").removesuffix("]") in TABLES}
    for name, table in tables.items():
        assert set(model_in(VmCreate.model_fields[name].annotation).model_fields) == {f.name for f in fields(table)}

    cli_fields = set(OPTION_FIELDS.values()) | {path for paths in OTHER_OPTION_FIELDS.values() for path in paths}
    table_fields = {f"{name}.{f.name}" for name, table in tables.items() if name != "disks" for f in fields(table)}
    assert cli_fields | set(NO_OPTION_FIELDS) == (spec_fields - set(tables)) | table_fields | {"disks", "vgpu"}
    params = {p.name for p in create.params} - {"name", "profile"}
    assert params == set(OPTION_FIELDS) | set(OTHER_OPTION_FIELDS)


# ---------------------------------------------------------------------- Windows guests


def test_os_windows_from_the_command_line_and_the_api_alike(gvt: Cli) -> None:
    code, _, err = gvt("vm", "create", "win11", "--os", "windows11", "--type", "i915-GVTg_V5_4", "--vgpu-display",
                         "--drivers-cdrom", "/iso/virtio-win.iso", "--memory", "8192")
    assert code == 0, err
    spec = specs.load(StateDir(gvt.state), "win11")
    assert (spec.os, spec.hyperv, spec.rtc_localtime, spec.tpm, spec.secure_boot) == ("windows11", True, True, True,
                                                                                      True)
    assert (spec.machine, spec.firmware, spec.memory_mib, spec.drivers_cdrom) == ("q35", "ovmf", 8192,
                                                                                  "/iso/virtio-win.iso")
    api = spec_from_fields("win11", None, {"os": "windows11", "vgpu": {"type": "i915-GVTg_V5_4"},
                                           "vgpu_display": True, "drivers_cdrom": "/iso/virtio-win.iso",
                                           "memory_mib": 8192})
    assert replace(api, network=replace(api.network, mac=spec.network.mac)) == spec  # (a new VM's MAC is saved)
    ten = spec_from_fields("win10", "gaming", {"os": "windows10"})
    assert ten.hyperv and not ten.tpm and not ten.secure_boot and ten.machine == "pc"
    code, _, _ = gvt("vm", "edit", "win11", "--no-tpm", "--drivers-cdrom", "none")
    spec = specs.load(StateDir(gvt.state), "win11")
    assert code == 0 and not spec.tpm and spec.drivers_cdrom is None and spec.secure_boot


def test_secure_boot_needs_q35_and_ovmf_and_hyperv_is_kvms() -> None:
    with pytest.raises(InvalidInput, match="secure_boot = true needs firmware = 'ovmf' and machine = 'q35'"):
        replace(new_spec("vm1"), secure_boot=True).validate()
    spec = replace(new_spec("vm1"), hyperv=True, cpu="host,hv_relaxed")
    argv = command(spec).argv
    assert argv[argv.index("-cpu") + 1] == ("host,hv_relaxed,hv_vapic,hv_spinlocks=0x1fff,hv_vpindex,"
                                                     "hv_runtime,hv_synic,hv_stimer,hv_time,hv_frequencies")
    tcg = command(spec, accel="tcg")
    assert tcg.argv[tcg.argv.index("-cpu") + 1] == "max,hv_relaxed"
    assert "TCG: no Hyper-V enlightenments (KVM provides them)" in tcg.notes


def test_windows_under_kvm_warns_when_ignore_msrs_is_off(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    params = tmp_path / "sys/module/kvm/parameters"
    params.mkdir(parents=True)
    windows = spec_from_fields("win", None, {"os": "windows10"})
    assert guest_warnings(root, windows, "kvm") == []  # cannot tell: no warning
    (params / "ignore_msrs").write_text("N\n")
    (warning,) = guest_warnings(root, windows, "kvm")
    assert "windows10 under KVM needs kvm.ignore_msrs=1" in warning and "'vgpuctl setup'" in warning
    assert guest_warnings(root, windows, "tcg") == [] and guest_warnings(root, new_spec("linux"), "kvm") == []
    (params / "ignore_msrs").write_text("Y\n")
    assert guest_warnings(root, windows, "kvm") == []


def test_switching_profile_keeps_what_the_guest_os_needs() -> None:
    win11 = spec_from_fields("win11", None, {"os": "windows11"})
    gaming = apply_profile(win11, "gaming").validate()
    assert (gaming.profile, gaming.machine, gaming.firmware, gaming.secure_boot, gaming.memory_mib) == (
        "gaming", "q35", "ovmf", True, 8192)


def test_spec_records_construct_compare_and_show_as_dataclasses_do() -> None:
    from dataclasses import asdict

    disk = Disk("/srv/a.qcow2", format="qcow2")
    assert disk == Disk(path="/srv/a.qcow2") and disk != Disk("/srv/b.qcow2") and disk != "/srv/a.qcow2"
    assert replace(disk, size="8G").size == "8G" and asdict(disk)["path"] == "/srv/a.qcow2"
    assert repr(Disk("/x")).startswith("Disk(path='/x', size=None")
    for bad, message in ((lambda: Disk(), "needs 'path'"), (lambda: Disk("/x", path="/y"), "twice"),
                         (lambda: Disk("/x", colour="red"), "unexpected 'colour'"),
                         (lambda: Disk("/x", None, "raw", "extra", "more"), "arguments")):
        with pytest.raises(TypeError, match=message):
            bad()
    a, b = VmSpec("x"), VmSpec("x")
    assert a == b and a.disks is not b.disks  # default factories: one list each
    with pytest.raises(TypeError):
        hash(a)
