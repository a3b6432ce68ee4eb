"""Autostart that works: install-units, the simulated reboot and late kvmgt load, and the udev rule end to end.

The end-to-end tests act as udev: they read the uevents the simulated host emitted, match them
against the rule file vgpuctl installed under the host root, and run the rule's command as udev
would (``%k`` substituted), with VGPUCTL_ROOT and VGPUCTL_STATE_DIR pointing at the mount.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import GVT_PARENT, MountFn
from vgpuctl.backends.vf_definitions import UNIT_NAME as VF_UNIT_NAME
from vgpuctl.base.errors import Conflict, InvalidInput, NotFound
from vgpuctl.base.state import StateDir
from vgpuctl.cli import units as cli_units
from vgpuctl.cli.app import cli as app
from vgpuctl.host import HostRoot
from vgpuctl.host.install import Command, Step, Tools
from vgpuctl.mdev import units
from vgpuctl.sim.host import SIM_CONTROL, SIM_UEVENTS, SimHost
from vgpuctl.sim.presets import HostSpec, preset
from vgpuctl.vm.units import VM_UNIT_NAME, render_vm_unit

PROGRAM = "/usr/local/bin/vgpuctl"
VGPUCTL_BIN = Path(sys.executable).parent / "vgpuctl"  # the console script pip installed in this venv
UNIT = "/etc/systemd/system/vgpuctl-autostart.service"
RULES = "/etc/udev/rules.d/60-vgpuctl.rules"
WANTS = "/etc/systemd/system/multi-user.target.wants/vgpuctl-autostart.service"
VM_UNIT = "/etc/systemd/system/vgpuctl-vms.service"
VF_UNIT = "/etc/systemd/system/vgpuctl-vfs.service"
VF_WANTS = "/etc/systemd/system/multi-user.target.wants/vgpuctl-vfs.service"
VM_WANTS = "/etc/systemd/system/multi-user.target.wants/vgpuctl-vms.service"
TYPES = f"/sys/class/mdev_bus/{GVT_PARENT}/mdev_supported_types"
IGPU = f"/devices/pci0000:00/{GVT_PARENT}"
# What the iGPU's uevents carry (pci_uevent()), as in its /sys/.../uevent file.
IGPU_ENV = ("DRIVER=i915 PCI_CLASS=30000 PCI_ID=8086:3E92 PCI_SUBSYS_ID=8086:3E92 PCI_SLOT_NAME=0000:00:02.0 "
            "MODALIAS=pci:v00008086d00003E92sv00008086sd00003E92bc03sc00i00")

EXPECTED_UNIT = """\
# Managed by vgpuctl: written by 'vgpuctl install-units', removed by 'vgpuctl uninstall-units'.
# Starts every vGPU defined to start automatically ("start": "auto" in /etc/mdevctl.d) at boot,
# before libvirt starts VMs. 60-vgpuctl.rules does the same for a parent that registers later.
[Unit]
Description=Start vGPUs (mdev devices) defined to start automatically
After=systemd-modules-load.service
Before=libvirtd.service libvirtd.socket virtqemud.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/flock -w 120 /run/vgpuctl-autostart.lock /usr/local/bin/vgpuctl autostart

[Install]
WantedBy=multi-user.target
"""

EXPECTED_RULES = """\
# Managed by vgpuctl: written by 'vgpuctl install-units', removed by 'vgpuctl uninstall-units'.
# Start the vGPUs defined to start automatically on a parent when it registers with mdev (GVT-g: when
# kvmgt loads), if it has definitions. The kernel reports the registration as "change" with
# MDEV_STATE=registered; "add" covers a parent registered before udevd ran (coldplug) and kernels
# without that event. Both can fire for one parent: runs are serialized by flock, and autostart is
# idempotent, so the later run finds every vGPU already active.
ACTION=="change", ENV{MDEV_STATE}=="registered", TEST=="/etc/mdevctl.d/$kernel", \
RUN+="/usr/bin/flock -w 120 /run/vgpuctl-autostart.lock /usr/local/bin/vgpuctl autostart %k"
ACTION=="add", TEST=="mdev_supported_types", TEST=="/etc/mdevctl.d/$kernel", \
RUN+="/usr/bin/flock -w 120 /run/vgpuctl-autostart.lock /usr/local/bin/vgpuctl autostart %k"
"""


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """vgpuctl's record of what it installed, outside the host root (the tests compare the root's files)."""
    monkeypatch.setenv("VGPUCTL_STATE_DIR", str(tmp_path_factory.mktemp("state")))


def cli(*args: str, code: int = 0) -> str:
    """vgpuctl in-process; returns stdout (and stderr after it, when it must fail)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (args, result.stdout, result.stderr)
    return result.stdout if code == 0 else result.stdout + result.stderr


def install(root: HostRoot, program: str, force: bool = False, tools: Tools | None = None) -> list[Step]:
    return cli_units.install(root, StateDir.from_env(), program, force, tools)


def uninstall(root: HostRoot, force: bool = False, tools: Tools | None = None) -> list[Step]:
    return cli_units.uninstall(root, StateDir.from_env(), force, tools)


@dataclass(frozen=True)
class FakeTools(Tools):
    """systemctl and udevadm as recorded calls on 'this machine'; 'systemctl enable/disable' do what the real
    ones do."""

    names: tuple[str, ...] = ("systemctl", "udevadm")
    calls: list[str] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return True

    def find(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.names else None

    def run(self, command: Command) -> tuple[int, str, str]:
        argv = list(command.argv)
        self.calls.append(" ".join(argv))
        if argv[1:2] in (["enable"], ["disable"]) and argv[2] in (units.UNIT_NAME, VM_UNIT_NAME, VF_UNIT_NAME):
            link = self.root.path(f"/etc/systemd/system/multi-user.target.wants/{argv[2]}")
            if argv[1] == "enable":
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f"/etc/systemd/system/{argv[2]}")
            else:
                link.unlink(missing_ok=True)
        return 0, "", ""


# ------------------------------------------------------------------------------ the files


EXPECTED_VM_UNIT = """\
# Managed by vgpuctl: written by 'vgpuctl install-units', removed by 'vgpuctl uninstall-units'.
# Starts the VMs marked autostart ('vgpuctl vm edit NAME --autostart'), one after the other in their
# order, once the SR-IOV VFs and the vGPUs defined to start automatically are there; at shutdown it
# powers them down in the reverse order (ACPI power button, then quit after 30 s), before their vGPUs
# go away.
[Unit]
Description=Start the VMs marked autostart (vgpuctl), in their order
After=vgpuctl-vfs.service vgpuctl-autostart.service network-online.target
Wants=vgpuctl-vfs.service vgpuctl-autostart.service network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/bin/vgpuctl vm autostart
ExecStop=/usr/local/bin/vgpuctl vm autostart --stop
TimeoutStopSec=300

[Install]
WantedBy=multi-user.target
"""


def test_unit_and_rule_text() -> None:
    root = HostRoot(Path("/"))
    assert units.render_unit(root, PROGRAM) == EXPECTED_UNIT
    assert units.render_rules(root, PROGRAM) == EXPECTED_RULES
    assert render_vm_unit(PROGRAM) == EXPECTED_VM_UNIT
    assert [f.host_path for f in cli_units.unit_files(root, PROGRAM)] == [VF_UNIT, UNIT, RULES, VM_UNIT]


def test_install_writes_both_files_enables_the_unit_and_is_idempotent(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    first = cli("--root", str(tmp_path), "install-units", "--program", PROGRAM)
    assert first.splitlines() == [
        f"program    {PROGRAM}",
        f"wrote      {tmp_path}{VF_UNIT}",
        f"wrote      {tmp_path}{UNIT}",
        f"wrote      {tmp_path}{RULES}",
        f"wrote      {tmp_path}{VM_UNIT}",
        f"enabled    {tmp_path}{VF_WANTS} -> {VF_UNIT}",
        f"enabled    {tmp_path}{WANTS} -> {UNIT}",
        f"enabled    {tmp_path}{VM_WANTS} -> {VM_UNIT}",
        f"skipped    systemctl, udevadm  ({tmp_path} is not this system's root: the unit is enabled by its link)",
    ]
    assert root.path(UNIT).read_text() == EXPECTED_UNIT
    assert root.path(VM_UNIT).read_text() == EXPECTED_VM_UNIT
    assert os.readlink(root.path(VM_WANTS)) == VM_UNIT
    assert root.path(RULES).read_text() == EXPECTED_RULES
    assert root.path(UNIT).stat().st_mode & 0o777 == 0o644
    assert os.readlink(root.path(WANTS)) == UNIT  # absolute, as 'systemctl enable' links
    before = {p: p.lstat().st_mtime_ns for p in tmp_path.rglob("*")}

    again = cli("--root", str(tmp_path), "install-units", "--program", PROGRAM)
    assert [line.split()[0] for line in again.splitlines()] == ["program", *["unchanged"] * 7, "skipped"]
    assert {p: p.lstat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing rewritten, no temp files


def test_install_updates_its_own_files_but_not_others(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    install(root, PROGRAM)
    # Its own file with other contents (an older program path): replaced.
    root.path(UNIT).write_text(EXPECTED_UNIT.replace(PROGRAM, "/opt/old/vgpuctl"))
    steps = install(root, PROGRAM)
    assert [s.action for s in steps][:3] == ["unchanged", "updated", "unchanged"]
    assert root.path(UNIT).read_text() == EXPECTED_UNIT

    # Someone else's rule file of that name: refused, and nothing at all is written.
    root.path(RULES).write_text('ACTION=="add", RUN+="/bin/true"\n')
    root.path(UNIT).write_text(EXPECTED_UNIT.replace(PROGRAM, "/opt/old/vgpuctl"))
    with pytest.raises(Conflict, match="was not written by vgpuctl"):
        install(root, PROGRAM)
    assert "/opt/old/vgpuctl" in root.path(UNIT).read_text()
    assert "not written by vgpuctl" in cli("--root", str(tmp_path), "install-units", "--program", PROGRAM, code=1)

    steps = install(root, PROGRAM, force=True)
    assert [s.action for s in steps][1:3] == ["updated", "updated"]
    assert root.path(RULES).read_text() == EXPECTED_RULES


def test_uninstall_removes_only_what_vgpuctl_wrote(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    install(root, PROGRAM)
    foreign = '# my own rule\nACTION=="add", RUN+="/bin/true"\n'
    root.path(RULES).write_text(foreign)

    out = cli("--root", str(tmp_path), "uninstall-units", code=1)
    assert "not written by vgpuctl; --force removes it" in out
    assert not os.path.lexists(root.path(WANTS)) and not root.path(UNIT).exists()
    assert root.path(RULES).read_text() == foreign  # kept

    assert cli("--root", str(tmp_path), "uninstall-units", "--force").splitlines() == [
        f"absent     {tmp_path}{VF_UNIT}",
        f"absent     {tmp_path}{UNIT}",
        f"removed    {tmp_path}{RULES}",
        f"absent     {tmp_path}{VM_UNIT}",
    ]
    assert cli("--root", str(tmp_path), "uninstall-units").splitlines() == [
        f"absent     {tmp_path}{VF_UNIT}",
        f"absent     {tmp_path}{UNIT}",
        f"absent     {tmp_path}{RULES}",
        f"absent     {tmp_path}{VM_UNIT}",
    ]


def test_uninstall_keeps_a_foreign_unit_enabled(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    install(root, PROGRAM)
    root.path(UNIT).write_text("[Service]\nExecStart=/bin/true\n")
    steps = uninstall(root)
    assert [(s.action, s.target) for s in steps] == [
        ("removed", f"{tmp_path}{VF_WANTS}"), ("removed", f"{tmp_path}{VM_WANTS}"),  # ours: disabled, removed
        ("removed", f"{tmp_path}{VF_UNIT}"), ("kept", f"{tmp_path}{UNIT}"), ("removed", f"{tmp_path}{RULES}"),
        ("removed", f"{tmp_path}{VM_UNIT}")]
    assert os.readlink(root.path(WANTS)) == UNIT  # its enablement is not ours to undo


def old_installation(root: HostRoot) -> None:
    """What install-units left before it kept a record (commit 15080c8): the files with the header, the links."""
    for unit in cli_units.unit_files(root, PROGRAM):
        root.path(unit.host_path).parent.mkdir(parents=True, exist_ok=True)
        root.path(unit.host_path).write_text(unit.text)
    for link, target in ((VF_WANTS, VF_UNIT), (WANTS, UNIT), (VM_WANTS, VM_UNIT)):
        root.path(link).parent.mkdir(parents=True, exist_ok=True)
        root.path(link).symlink_to(target)


def test_a_host_set_up_by_an_earlier_vgpuctl_uninstalls_cleanly(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    old_installation(root)
    assert cli("--root", str(tmp_path), "uninstall-units").splitlines() == [
        f"removed    {tmp_path}{VF_WANTS}", f"removed    {tmp_path}{WANTS}", f"removed    {tmp_path}{VM_WANTS}",
        f"removed    {tmp_path}{VF_UNIT}", f"removed    {tmp_path}{UNIT}", f"removed    {tmp_path}{RULES}",
        f"removed    {tmp_path}{VM_UNIT}"]
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []

    # Installed again over it by this version: nothing to change, and the old files are now recorded.
    old_installation(root)
    assert [s.action for s in install(root, PROGRAM)] == ["unchanged"] * 7 + ["skipped"]
    assert [s.action for s in uninstall(root)] == ["removed"] * 7
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []


def test_forced_over_a_file_of_someone_else_uninstall_puts_it_back(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    theirs = '# my own rule\nACTION=="add", RUN+="/bin/true"\n'
    root.path(RULES).parent.mkdir(parents=True)
    root.path(RULES).write_text(theirs)
    root.path(WANTS).parent.mkdir(parents=True)
    root.path(WANTS).symlink_to("/etc/systemd/system/elsewhere.service")  # a link of theirs, replaced
    install(root, PROGRAM, force=True)
    assert root.path(RULES).read_text() == EXPECTED_RULES and os.readlink(root.path(WANTS)) == UNIT
    assert [s.line() for s in uninstall(root)] == [
        f"removed    {tmp_path}{VF_WANTS}", f"restored   {tmp_path}{WANTS}", f"removed    {tmp_path}{VM_WANTS}",
        f"removed    {tmp_path}{VF_UNIT}", f"removed    {tmp_path}{UNIT}", f"restored   {tmp_path}{RULES}",
        f"removed    {tmp_path}{VM_UNIT}"]
    assert root.path(RULES).read_text() == theirs
    assert os.readlink(root.path(WANTS)) == "/etc/systemd/system/elsewhere.service"


def test_print_shows_the_files_and_writes_nothing(tmp_path: Path) -> None:
    shown = cli("--root", str(tmp_path), "install-units", "--program", PROGRAM, "--print")
    vf_unit = cli_units.unit_files(HostRoot(tmp_path), PROGRAM)[0].text  # pinned by tests/golden/units/
    assert shown == (f"==> {VF_UNIT} <==\n{vf_unit}\n==> {UNIT} <==\n{EXPECTED_UNIT}\n"
                     f"==> {RULES} <==\n{EXPECTED_RULES}\n==> {VM_UNIT} <==\n{EXPECTED_VM_UNIT}")
    assert list(tmp_path.iterdir()) == []


def test_the_program_is_the_installed_console_script(tmp_path: Path) -> None:
    if not VGPUCTL_BIN.is_file():
        pytest.fail(f"{VGPUCTL_BIN} is missing: install vgpuctl into the venv (make deps)")
    real = str(VGPUCTL_BIN.resolve())
    assert cli_units.find_program(str(VGPUCTL_BIN)) == real
    # Run as "python -m vgpuctl": the one on PATH; none there: say how to give it.
    assert cli_units.find_program("/x/vgpuctl/__main__.py", which=lambda name: str(VGPUCTL_BIN)) == real
    with pytest.raises(NotFound, match="--program"):
        cli_units.find_program("/x/vgpuctl/__main__.py", which=lambda name: None)

    done = subprocess.run([str(VGPUCTL_BIN), "--root", str(tmp_path), "install-units"], capture_output=True,
                          text=True, env={**os.environ, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"program    {real}"
    assert f" {real} autostart %k\"\n" in HostRoot(tmp_path).path(RULES).read_text()


def test_systemd_accepts_the_unit_and_enabling_links_as_systemctl_does(tmp_path: Path) -> None:
    """systemd's own tools (Debian's mdevctl pulls in udev, and udev systemd) on the written unit."""
    for tool in ("systemctl", "systemd-analyze"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: install Debian's systemd (mdevctl, which 'make test' installs, needs it)")
    ours, theirs = HostRoot(tmp_path / "ours"), HostRoot(tmp_path / "theirs")
    install(ours, str(VGPUCTL_BIN.resolve()))
    theirs.path(UNIT).parent.mkdir(parents=True)
    shutil.copy(ours.path(UNIT), theirs.path(UNIT))
    done = subprocess.run(["systemctl", f"--root={theirs.root}", "enable", units.UNIT_NAME], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert os.readlink(theirs.path(WANTS)) == os.readlink(ours.path(WANTS)) == UNIT
    checked = subprocess.run(["systemd-analyze", "verify", str(ours.path(VF_UNIT)), str(ours.path(UNIT)),
                              str(ours.path(VM_UNIT))],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert all(name not in checked.stderr for name in (units.UNIT_NAME, VM_UNIT_NAME, VF_UNIT_NAME)), checked.stderr


@pytest.mark.parametrize("program", ["vgpuctl", "bin/vgpuctl", "/opt/my tools/vgpuctl", "/opt/100%/vgpuctl",
                                     "/opt/$HOME/vgpuctl", '/opt/"x"/vgpuctl'])
def test_program_paths_udev_or_systemd_would_mangle_are_refused(tmp_path: Path, program: str) -> None:
    with pytest.raises(InvalidInput):
        install(HostRoot(tmp_path), program)
    assert list(tmp_path.iterdir()) == []


def test_on_the_running_system_systemctl_and_udevadm_are_called(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine's own root, played by tmp_path: nothing here touches the real /etc.
    monkeypatch.setattr(HostRoot, "is_this_machine", property(lambda self: True))
    root = HostRoot(tmp_path)
    root.path("/run/systemd/system").mkdir(parents=True)  # systemd is the running init
    program = str(VGPUCTL_BIN.resolve())
    fake = FakeTools(root)

    steps = install(root, program, tools=fake)
    assert [s.line() for s in steps][4:] == ["ran        systemctl daemon-reload",
                                             "enabled    systemctl enable vgpuctl-vfs.service",
                                             "enabled    systemctl enable vgpuctl-autostart.service",
                                             "enabled    systemctl enable vgpuctl-vms.service",
                                             "ran        udevadm control --reload"]
    assert fake.calls == ["systemctl daemon-reload", "systemctl enable vgpuctl-vfs.service",
                          "systemctl enable vgpuctl-autostart.service",
                          "systemctl enable vgpuctl-vms.service", "udevadm control --reload"]
    fake.calls.clear()
    assert [s.action for s in install(root, program, tools=fake)] == ["unchanged"] * 7
    assert fake.calls == []  # nothing changed: nothing to reload or enable

    assert [s.line() for s in uninstall(root, tools=fake)] == [
        "ran        systemctl disable vgpuctl-vfs.service",
        "ran        systemctl disable vgpuctl-autostart.service",
        "ran        systemctl disable vgpuctl-vms.service",
        f"removed    {tmp_path}{VF_UNIT}", f"removed    {tmp_path}{UNIT}", f"removed    {tmp_path}{RULES}",
        f"removed    {tmp_path}{VM_UNIT}",
        "ran        systemctl daemon-reload", "ran        udevadm control --reload",
    ]
    assert not os.path.lexists(root.path(WANTS))

    # Neither tool installed (or systemd not running): enabled by the link, and said so.
    bare = FakeTools(root, names=())
    steps = install(root, program, tools=bare)
    assert [s.line() for s in steps][4:] == [
        f"enabled    {tmp_path}{VF_WANTS} -> {VF_UNIT}  (systemctl not found: linked as 'systemctl enable' would)",
        f"enabled    {tmp_path}{WANTS} -> {UNIT}  (systemctl not found: linked as 'systemctl enable' would)",
        f"enabled    {tmp_path}{VM_WANTS} -> {VM_UNIT}  (systemctl not found: linked as 'systemctl enable' would)",
        "skipped    udevadm control --reload  (udevadm not found; udevd reads the rules when it starts)",
    ]
    assert bare.calls == [] and os.readlink(root.path(WANTS)) == UNIT
    with pytest.raises(InvalidInput, match="not an executable"):
        install(root, "/nonexistent/vgpuctl", tools=bare)
    monkeypatch.setattr(units, "FLOCK", "/nonexistent/flock")
    with pytest.raises(NotFound, match="install util-linux"):
        install(root, program, tools=bare)


# ------------------------------------------------------------------------------ the simulator: reboot, modules


def uevent_fields(line: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in line.split())


def test_reboot_forgets_every_vgpu_and_keeps_etc() -> None:
    host = SimHost.from_preset("coffeelake", aperture_mib=1024)
    host.write(f"{TYPES}/i915-GVTg_V5_4/create", "00000000-0000-0000-0000-000000000001")
    host.vfs.create("/etc/mdevctl.d/kept", 0o644)
    host.write("/etc/mdevctl.d/kept", "disk")
    host.write(SIM_CONTROL, "reboot\n")
    assert host.listdir("/sys/bus/mdev/devices") == [] and host.devices == {}
    assert host.read_text(f"{TYPES}/i915-GVTg_V5_4/available_instances") == "5\n"
    assert host.read_text("/etc/mdevctl.d/kept") == "disk"
    assert json.loads(host.read_text("/.vgpuctl-sim"))["boot"] == 2
    # A fresh boot's log: the coldplug adds udev replays, nothing from before.
    assert [uevent_fields(line)["ACTION"] for line in host.read_text(SIM_UEVENTS).splitlines()] == ["add", "add"]


def test_deferred_kvmgt_registers_the_parent_when_loaded() -> None:
    host = SimHost.from_preset("coffeelake", defer=["kvmgt"])
    assert "kvmgt" not in host.read_text("/proc/modules") and not host.exists("/sys/module/kvmgt")
    assert not host.exists(TYPES) and not host.exists("/sys/class/mdev_bus")
    # After boot udev's coldplug writes "add" to every device's uevent file: synthetic events.
    assert [(e["ACTION"], e["KERNEL"], e["SYNTH_UUID"]) for e in map(uevent_fields, host.read_text(
        SIM_UEVENTS).splitlines())] == [("add", "0000:00:00.0", "0"), ("add", GVT_PARENT, "0")]
    host.write(SIM_CONTROL, "load kvmgt\n")
    assert "kvmgt 65536" in host.read_text("/proc/modules") and host.exists("/sys/module/kvmgt")
    assert host.listdir(TYPES) == ["i915-GVTg_V5_4", "i915-GVTg_V5_8"]
    assert host.readlink(f"/sys/class/mdev_bus/{GVT_PARENT}") == f"../../devices/pci0000:00/{GVT_PARENT}"
    assert host.read_text(SIM_UEVENTS).splitlines()[-1] == (
        f"ACTION=change DEVPATH={IGPU} SUBSYSTEM=pci KERNEL={GVT_PARENT} {IGPU_ENV} MDEV_STATE=registered SEQNUM=3"
    )
    host.write(SIM_CONTROL, "load kvmgt\n")  # modprobe of a loaded module: nothing happens
    assert len(host.uevents) == 3
    # The next reboot holds kvmgt back again; "reboot defer=" boots with everything.
    host.write(SIM_CONTROL, "reboot")
    assert not host.exists(TYPES)
    host.write(SIM_CONTROL, "reboot defer=")
    assert host.exists(TYPES) and json.loads(host.read_text("/.vgpuctl-sim"))["defer"] == []


def test_unloading_kvmgt_removes_its_vgpus_and_unregisters() -> None:
    host = SimHost.from_preset("coffeelake", aperture_mib=1024)
    uuid = "00000000-0000-0000-0000-000000000001"
    host.write(f"{TYPES}/i915-GVTg_V5_4/create", uuid)
    host.write(SIM_CONTROL, "unload kvmgt")
    assert not host.exists(TYPES) and host.listdir("/sys/bus/mdev/devices") == []
    assert not host.exists("/dev/vfio/1") and not host.exists("/sys/bus/mdev/drivers/intel_vgpu_mdev")
    assert [(e.action, e.kernel, dict(e.env).get("MDEV_STATE")) for e in host.uevents[-3:]] == [
        ("add", uuid, None), ("remove", uuid, None), ("change", GVT_PARENT, "unregistered")]
    host.write(SIM_CONTROL, "load kvmgt")
    assert host.read_text(f"{TYPES}/i915-GVTg_V5_4/available_instances") == "5\n"


def test_deferred_sample_driver_appears_with_its_class_device() -> None:
    host = SimHost.from_preset("samples", defer=["mtty"])
    assert host.listdir("/sys/class/mdev_bus") == ["mbochs", "mdpy"] and not host.exists("/sys/class/mtty")
    host.load_module("mtty")
    assert host.listdir("/sys/class/mdev_bus") == ["mbochs", "mdpy", "mtty"]
    assert [(e.action, e.devpath, e.subsystem) for e in host.uevents[-2:]] == [
        ("add", "/devices/virtual/mtty/mtty", "mtty"), ("change", "/devices/virtual/mtty/mtty", "mtty")]
    host.unload_module("mtty")
    assert not host.exists("/sys/class/mtty") and host.uevents[-1].action == "remove"


def test_a_write_to_a_uevent_file_is_a_synthetic_event() -> None:
    host = SimHost.from_preset("coffeelake")
    assert host.read_text(f"/sys{IGPU}/uevent") == IGPU_ENV.replace(" ", "\n") + "\n"
    host.write(f"/sys{IGPU}/uevent", "change\n")  # udevadm trigger --action=change
    assert host.read_text(SIM_UEVENTS).splitlines()[-1] == (
        f"ACTION=change DEVPATH={IGPU} SUBSYSTEM=pci KERNEL={GVT_PARENT} {IGPU_ENV} SYNTH_UUID=0 SEQNUM=3")
    with pytest.raises(OSError) as info:
        host.write(f"/sys{IGPU}/uevent", "frob")
    assert info.value.errno == errno.EINVAL
    uuid = "00000000-0000-0000-0000-000000000001"
    host.write(f"{TYPES}/i915-GVTg_V5_4/create", uuid)
    assert host.read_text(f"/sys/bus/mdev/devices/{uuid}/uevent") == (
        "DRIVER=intel_vgpu_mdev\nMDEV_TYPE=i915-GVTg_V5_4\n")


def test_control_file_errors() -> None:
    host = SimHost.from_preset("coffeelake", defer=["kvmgt"])
    for command, code in [("frobnicate", errno.EINVAL), ("load", errno.EINVAL), ("load mtty", errno.ENOENT),
                          ("unload i915", errno.EINVAL), ("unload mtty", errno.ENOENT),
                          ("unload kvmgt", errno.ENOENT), ("reboot defer=i915", errno.EINVAL)]:
        with pytest.raises(OSError) as info:
            host.write(SIM_CONTROL, command)
        assert info.value.errno == code, command
    with pytest.raises(OSError) as info:
        host.read(SIM_CONTROL)
    assert info.value.errno == errno.EACCES  # write-only
    # Up to 5.18 kvmgt refuses to load when i915 did not start GVT-g.
    old = SimHost.from_preset("coffeelake", kernel="5.4.0", cmdline="ro quiet", defer=["kvmgt"])
    with pytest.raises(OSError) as info:
        old.load_module("kvmgt")
    assert info.value.errno == errno.ENODEV
    with pytest.raises(ValueError, match="only modules that register mdev parents"):
        preset("coffeelake").with_overrides(defer=["i915"])
    with pytest.raises(ValueError, match="does not load it"):
        SimHost.from_preset("coffeelake", defer=["mtty"])


def test_spec_json_keeps_defer_and_reads_older_json() -> None:
    spec = preset("coffeelake").with_overrides(defer=["kvmgt"])
    assert HostSpec.from_json(spec.to_json()) == spec
    older = json.loads(spec.to_json())
    del older["defer"]
    assert HostSpec.from_json(json.dumps(older)).defer == ()


# ------------------------------------------------------------------------------ acting as udev on a mounted host

RULE_KEY = re.compile(r'\s*([A-Z]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


@dataclass
class Rule:
    line: str
    matches: list[tuple[str, str, str, str]] = field(default_factory=list)  # key, attribute, operator, value
    run: list[str] = field(default_factory=list)


def parse_rules(text: str) -> list[Rule]:
    """udev rule lines: comma-separated KEY[{attr}]OP"value" pairs (continuation lines joined)."""
    rules = []
    for line in text.replace("\\\n", "").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rule, position = Rule(line), 0
        while position < len(line):
            match = RULE_KEY.match(line, position)
            assert match, f"cannot parse rule at {line[position:]!r}"
            key, attribute, operator, value = match.groups()
            if key == "RUN":
                rule.run.append(value)
            else:
                rule.matches.append((key, attribute or "", operator, value))
            position = match.end()
        rules.append(rule)
    return rules


def substitute(value: str, event: dict[str, str]) -> str:
    return value.replace("%k", event["KERNEL"]).replace("$kernel", event["KERNEL"])


def rule_matches(rule: Rule, event: dict[str, str], root: HostRoot) -> bool:
    for key, attribute, operator, value in rule.matches:
        if key == "TEST":
            path = substitute(value, event)
            path = path if path.startswith("/") else f"/sys{event['DEVPATH']}/{path}"
            found = root.exists(path)
        else:
            actual = {"ACTION": event["ACTION"], "KERNEL": event["KERNEL"], "SUBSYSTEM": event["SUBSYSTEM"],
                      "ENV": event.get(attribute, "")}.get(key)
            assert actual is not None, f"this test's udev does not know the key {key}"
            found = any(fnmatch.fnmatchcase(actual, pattern) for pattern in value.split("|"))
        if found != (operator == "=="):
            return False
    return True


def uevents(root: HostRoot, after: int = 0) -> list[dict[str, str]]:
    events = [uevent_fields(line) for line in root.read_text(SIM_UEVENTS).splitlines()]
    return [e for e in events if int(e["SEQNUM"]) > after]


def udev_commands(root: HostRoot, events: list[dict[str, str]]) -> list[tuple[dict[str, str], list[str]]]:
    """The RUN commands the installed rule file gives each event, %k substituted, in event order."""
    rules = parse_rules(root.path(RULES).read_text())
    return [(event, shlex.split(substitute(command, event)))
            for event in events for rule in rules if rule_matches(rule, event, root) for command in rule.run]


@dataclass
class Host:
    root: HostRoot
    state: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "VGPUCTL_ROOT": str(self.root.root), "VGPUCTL_STATE_DIR": str(self.state)}

    def run(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=120)

    def vgpuctl(self, *args: str) -> str:
        done = self.run([str(VGPUCTL_BIN), *args])
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def ctl(self, command: str) -> None:
        self.root.write_text(SIM_CONTROL, command + "\n")

    def active(self) -> set[str]:
        return set(self.root.listdir(self.root.sys_bus_mdev_devices))


@pytest.fixture
def host(mount_host: MountFn, tmp_path: Path) -> Host:
    if not VGPUCTL_BIN.is_file():
        pytest.fail(f"{VGPUCTL_BIN} is missing: install vgpuctl into the venv (make deps)")
    return Host(mount_host("coffeelake", aperture_mib=1024), tmp_path / "state")


def mdevctl_define(root: HostRoot, *args: str) -> None:
    """Debian's real mdevctl writing a definition into the mount (as in test_mdevctl.py)."""
    if shutil.which("mdevctl") is None or shutil.which("unshare") is None:
        pytest.fail("mdevctl and unshare are needed: run 'make test', which installs them")
    where = shlex.quote(str(root.root))
    script = (f"mount --bind {where}/sys /sys && mount --bind {where}/etc/mdevctl.d /etc/mdevctl.d && "
              + shlex.join(["mdevctl", "define", *args]))
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == "", done


A1 = "10000000-0000-4000-8000-000000000001"  # auto, vgpuctl, GVTg_V5_2
A2 = "20000000-0000-4000-8000-000000000002"  # auto, vgpuctl, GVTg_V5_1: no room once A1 runs
X1 = "30000000-0000-4000-8000-000000000003"  # auto, mdevctl, GVTg_V5_4
M1 = "40000000-0000-4000-8000-000000000004"  # manual, vgpuctl, GVTg_V5_4
X2 = "50000000-0000-4000-8000-000000000005"  # manual, mdevctl, GVTg_V5_8


@pytest.mark.fuse
@pytest.mark.mdevctl
def test_auto_vgpus_come_back_when_kvmgt_loads_after_a_reboot(host: Host) -> None:
    root = host.root
    installed = host.vgpuctl("install-units")
    program = str(VGPUCTL_BIN.resolve())
    assert installed.splitlines()[0] == f"program    {program}"
    host.vgpuctl("define", "-u", A1, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_2", "--auto")
    host.vgpuctl("define", "-u", A2, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_1", "--auto")
    host.vgpuctl("define", "-u", M1, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4")
    mdevctl_define(root, "-u", X1, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "--auto")
    mdevctl_define(root, "-u", X2, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8")
    host.vgpuctl("start", "-u", M1)
    host.vgpuctl("start", "-u", A1)
    assert host.active() == {M1, A1}

    # Reboot with kvmgt loaded late (as from /etc/modules-load.d after udev started).
    shown = host.vgpuctl("sim", "ctl", str(root.root), "reboot", "defer=kvmgt")
    assert shown.splitlines()[0] == "reboot defer=kvmgt: done (boot 2; modules not loaded: kvmgt)"
    assert host.active() == set() and not root.exists(f"/sys/class/mdev_bus/{GVT_PARENT}")
    assert "kvmgt" not in root.read_text("/proc/modules") and not root.exists("/sys/module/kvmgt")
    assert root.path(f"/etc/mdevctl.d/{GVT_PARENT}/{X1}").is_file() and root.path(RULES).is_file()
    boot = uevents(root)
    assert [e["ACTION"] for e in boot] == ["add", "add"]
    assert udev_commands(root, boot) == []  # 00:02.0 is not a parent yet: the "add" rule stays quiet

    host.ctl("load kvmgt")
    (registered,) = uevents(root, after=int(boot[-1]["SEQNUM"]))
    assert registered == {"ACTION": "change", "DEVPATH": IGPU, "SUBSYSTEM": "pci", "KERNEL": GVT_PARENT,
                          **uevent_fields(IGPU_ENV), "MDEV_STATE": "registered", "SEQNUM": "3"}
    ((_, command),) = udev_commands(root, [registered])  # exactly one rule fires, once
    assert command == ["/usr/bin/flock", "-w", "120", "/run/vgpuctl-autostart.lock", program, "autostart",
                       GVT_PARENT]

    first = host.run(command)
    assert first.returncode == 1, first  # one definition failed, and says so
    lines = first.stdout.splitlines()
    assert lines[0] == f"{A1} {GVT_PARENT} i915-GVTg_V5_2: started"
    assert lines[1].startswith(f"{A2} {GVT_PARENT} i915-GVTg_V5_1: failed (no room for i915-GVTg_V5_1")
    assert lines[2:] == [f"{X1} {GVT_PARENT} i915-GVTg_V5_4: started"]  # the failure did not stop it
    assert host.active() == {A1, X1}  # every auto that fits is back; manual ones are not
    listed = {d["uuid"]: d for d in json.loads(host.vgpuctl("list", "--json"))}
    assert listed[X1]["active"] and listed[X1]["start"] == "auto" and not listed[X2]["active"]
    # The vGPUs autostart created make uevents of their own; no rule fires for them.
    assert udev_commands(root, uevents(root, after=int(registered["SEQNUM"]))) == []

    again = host.run(command)
    assert again.returncode == 1 and again.stdout.splitlines()[0] == f"{A1} {GVT_PARENT} i915-GVTg_V5_2: already active"
    assert again.stdout.splitlines()[2] == f"{X1} {GVT_PARENT} i915-GVTg_V5_4: already active"
    assert host.active() == {A1, X1}

    # The systemd unit's ExecStart does the same for every parent.
    (exec_start,) = [line.removeprefix("ExecStart=") for line in root.path(UNIT).read_text().splitlines()
                     if line.startswith("ExecStart=")]
    boot_run = host.run(shlex.split(exec_start))
    assert boot_run.returncode == 1 and boot_run.stdout == again.stdout
    assert host.active() == {A1, X1}


@pytest.mark.fuse
def test_change_and_coldplug_add_for_one_parent_do_not_collide(host: Host) -> None:
    """mdevctl#53: both rules fire for one parent; run at once, one starts each vGPU, the other finds it active."""
    root = host.root
    host.vgpuctl("install-units")
    autos = [f"6000000{i}-0000-4000-8000-00000000000{i}" for i in range(1, 5)]
    for uuid in autos:
        host.vgpuctl("define", "-u", uuid, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8", "--auto")
    host.ctl("reboot defer=kvmgt")
    host.ctl("load kvmgt")  # the kernel's "change"
    host.ctl("trigger")  # then udev's coldplug "add" replays every device, now a registered parent
    fired = udev_commands(root, uevents(root, after=2))
    assert [(event["ACTION"], event["KERNEL"]) for event, _ in fired] == [("change", GVT_PARENT), ("add", GVT_PARENT)]

    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=host.env)
               for _, command in fired]
    outputs = [process.communicate(timeout=120) for process in running]
    assert [process.returncode for process in running] == [0, 0], outputs
    lines = sorted(line for out, _ in outputs for line in out.splitlines())
    assert lines == sorted([f"{u} {GVT_PARENT} i915-GVTg_V5_8: started" for u in autos]
                           + [f"{u} {GVT_PARENT} i915-GVTg_V5_8: already active" for u in autos])
    assert host.active() == set(autos)


@pytest.mark.fuse
def test_sim_ctl_and_a_parent_without_definitions(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("coffeelake", defer=["kvmgt"])
    host = Host(root, tmp_path / "state")
    host.vgpuctl("install-units", "--program", PROGRAM)
    assert (root.simulation() or {})["not_loaded"] == ["kvmgt"]
    shown = host.vgpuctl("sim", "ctl", str(root.root), "load", "kvmgt")
    assert shown.splitlines() == [
        "load kvmgt: done (boot 1; modules not loaded: none)",
        f"  uevent ACTION=change DEVPATH={IGPU} SUBSYSTEM=pci KERNEL={GVT_PARENT} {IGPU_ENV} "
        "MDEV_STATE=registered SEQNUM=3",
    ]
    assert root.exists(f"{TYPES}/i915-GVTg_V5_4/create")
    # Nothing is defined for this parent: the rule's TEST keeps udev from running anything.
    assert udev_commands(root, uevents(root)) == []

    for args, message in [(["load", "mtty"], "neither loaded nor deferred"),
                          (["frobnicate"], "does not understand 'frobnicate'"),
                          (["unload", "mtty"], "mtty is not loaded")]:
        done = host.run([str(VGPUCTL_BIN), "sim", "ctl", str(root.root), *args])
        assert done.returncode == 1 and message in done.stderr, (args, done.stderr)
    done = host.run([str(VGPUCTL_BIN), "sim", "ctl", str(tmp_path), "reboot"])
    assert done.returncode == 1 and "no simulated host is mounted" in done.stderr
