"""Autostart that works: vgpuctl's systemd unit and udev rule, installed under a host root.

mdevctl starts ``auto`` definitions only from a udev rule, and Debian's copy of that rule calls
``/usr/sbin/mdevctl``, which the package does not install (spec peers.md 1.6). vgpuctl writes two
files that call the installed program by its real path:

* ``/etc/systemd/system/vgpuctl-autostart.service``: ``vgpuctl autostart`` once at boot, after
  modules load and before libvirt starts VMs;
* ``/etc/udev/rules.d/60-vgpuctl.rules``: ``vgpuctl autostart PARENT`` when a parent registers
  with mdev later (for GVT-g: when kvmgt loads), reported by the kernel as ``change`` with
  ``MDEV_STATE=registered``, or seen as ``add`` at coldplug for a parent that is already registered.

Both events can arrive for one parent, and the boot unit can run at the same time (mdevctl#53:
repeated create attempts that fail). Every run therefore goes through ``flock`` on one lock file,
and ``autostart`` is idempotent: a second run finds each vGPU "already active" and succeeds.

Files carry :data:`HEADER` as their first line; only such files are replaced or removed, unless
the caller says ``force``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import Conflict, InvalidInput, KernelError, NotFound
from vgpuctl.host import HostRoot
from vgpuctl.host.files import atomic_write, clean_temp_files, fsync_dir

PROGRAM_NAME = "vgpuctl"
UNIT_NAME = "vgpuctl-autostart.service"
VM_UNIT_NAME = "vgpuctl-vms.service"
VM_STOP_TIMEOUT_S = 300  # the VMs are powered down one after the other, each given up to 30 s
RULES_NAME = "60-vgpuctl.rules"
WANTED_BY = "multi-user.target"
HEADER = "# Managed by vgpuctl: written by 'vgpuctl install-units', removed by 'vgpuctl uninstall-units'."
FLOCK = "/usr/bin/flock"  # util-linux, Essential on Debian
LOCK_NAME = "vgpuctl-autostart.lock"
LOCK_WAIT_S = 120  # below udev's 180 s event timeout, after which udevd kills the command
# udev splits RUN on spaces and expands % and $; systemd expands % and $ and splits on spaces.
UNSAFE_IN_PROGRAM = re.compile(r"[\s\"'\\%$]")


@dataclass(frozen=True)
class UnitFile:
    host_path: str  # as on the host, e.g. /etc/udev/rules.d/60-vgpuctl.rules
    text: str


@dataclass(frozen=True)
class Step:
    """One thing install/uninstall did (or left alone), for the report."""

    action: str  # wrote, updated, unchanged, enabled, removed, absent, kept, ran, failed, skipped
    target: str  # a local path, or a command
    note: str = ""

    def line(self) -> str:
        return f"{self.action:10} {self.target}" + (f"  ({self.note})" if self.note else "")


def _run(command: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)
    return done.returncode, (done.stdout + done.stderr).strip()


@dataclass(frozen=True)
class System:
    """How install and uninstall reach the running system's tools (tests replace these)."""

    which: Callable[[str], str | None] = shutil.which
    run: Callable[[list[str]], tuple[int, str]] = field(default=_run)


# ---------------------------------------------------------------- the files


def find_program(argv0: str | None = None, which: Callable[[str], str | None] = shutil.which) -> str:
    """The real path of the installed ``vgpuctl`` program: the running console script, else the one on PATH."""
    script = Path(sys.argv[0] if argv0 is None else argv0)
    if script.name == PROGRAM_NAME and script.is_file() and os.access(script, os.X_OK):
        return str(script.resolve())
    found = which(PROGRAM_NAME)
    if found:
        return str(Path(found).resolve())
    raise NotFound("cannot tell where the vgpuctl program is installed (it is not on PATH); "
                   "give it with --program /path/to/vgpuctl")


def check_program(program: str, running_system: bool) -> str:
    """A program path that udev and systemd run as written: absolute, nothing they would split or expand."""
    if not program.startswith("/"):
        raise InvalidInput(f"--program must be an absolute path (udev and systemd need one), got {program!r}")
    if UNSAFE_IN_PROGRAM.search(program):
        raise InvalidInput(f"program path {program!r} contains a space, quote, backslash, % or $, which udev "
                           "and systemd would split or expand; install vgpuctl (or a link to it) elsewhere")
    if running_system and not (os.path.isfile(program) and os.access(program, os.X_OK)):
        raise InvalidInput(f"{program} is not an executable file on this host")
    return program


def lock_file(root: HostRoot) -> str:
    return f"{root.run_dir}/{LOCK_NAME}"


def autostart_command(root: HostRoot, program: str, *args: str) -> str:
    """``vgpuctl autostart ARGS`` serialized with every other autostart run through flock."""
    return " ".join([FLOCK, "-w", str(LOCK_WAIT_S), lock_file(root), program, "autostart", *args])


def unit_path(root: HostRoot, name: str = UNIT_NAME) -> str:
    return f"{root.etc_systemd_system}/{name}"


def rules_path(root: HostRoot) -> str:
    return f"{root.etc_udev_rules_d}/{RULES_NAME}"


def wants_link(root: HostRoot, name: str = UNIT_NAME) -> str:
    """What ``systemctl enable`` creates for ``WantedBy=multi-user.target``."""
    return f"{root.etc_systemd_system}/{WANTED_BY}.wants/{name}"


def render_unit(root: HostRoot, program: str) -> str:
    return f"""{HEADER}
# Starts every vGPU defined to start automatically ("start": "auto" in {root.etc_mdevctl_d}) at boot,
# before libvirt starts VMs. {RULES_NAME} does the same for a parent that registers later.
[Unit]
Description=Start vGPUs (mdev devices) defined to start automatically
After=systemd-modules-load.service
Before=libvirtd.service libvirtd.socket virtqemud.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={autostart_command(root, program)}

[Install]
WantedBy={WANTED_BY}
"""


def render_vm_unit(root: HostRoot, program: str) -> str:
    return f"""{HEADER}
# Starts the VMs marked autostart ('vgpuctl vm edit NAME --autostart'), one after the other in their
# order, once the vGPUs defined to start automatically are there; at shutdown it powers them down in
# the reverse order (ACPI power button, then quit after 30 s), before their vGPUs go away.
[Unit]
Description=Start the VMs marked autostart (vgpuctl), in their order
After={UNIT_NAME} network-online.target
Wants={UNIT_NAME} network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={program} vm autostart
ExecStop={program} vm autostart --stop
TimeoutStopSec={VM_STOP_TIMEOUT_S}

[Install]
WantedBy={WANTED_BY}
"""


def render_rules(root: HostRoot, program: str) -> str:
    run = autostart_command(root, program, "%k")
    definitions = f"{root.etc_mdevctl_d}/$kernel"
    return f"""{HEADER}
# Start the vGPUs defined to start automatically on a parent when it registers with mdev (GVT-g: when
# kvmgt loads), if it has definitions. The kernel reports the registration as "change" with
# MDEV_STATE=registered; "add" covers a parent registered before udevd ran (coldplug) and kernels
# without that event. Both can fire for one parent: runs are serialized by flock, and autostart is
# idempotent, so the later run finds every vGPU already active.
ACTION=="change", ENV{{MDEV_STATE}}=="registered", TEST=="{definitions}", RUN+="{run}"
ACTION=="add", TEST=="mdev_supported_types", TEST=="{definitions}", RUN+="{run}"
"""


def unit_files(root: HostRoot, program: str) -> list[UnitFile]:
    return [UnitFile(unit_path(root), render_unit(root, program)),
            UnitFile(rules_path(root), render_rules(root, program)),
            UnitFile(unit_path(root, VM_UNIT_NAME), render_vm_unit(root, program))]


# ---------------------------------------------------------------- install and uninstall


def is_running_system(root: HostRoot) -> bool:
    """Whether root is this machine's own root, whose systemd and udev the tools talk to."""
    return root.root.resolve() == Path("/")


def written_by_vgpuctl(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, errors="replace") as f:
        return f.readline().rstrip("\n") == HEADER


def install(root: HostRoot, program: str, force: bool = False, system: System | None = None) -> list[Step]:
    """Write both files (atomically, only when they change) and enable the unit."""
    system = system or System()
    running = is_running_system(root)
    program = check_program(program, running)
    if running and not os.access(FLOCK, os.X_OK):
        raise NotFound(f"{FLOCK} not found: install util-linux (the unit and the rule run autostart through it)")
    files = unit_files(root, program)
    plans: list[tuple[Path, bytes, str]] = []
    for unit in files:  # check everything before writing anything
        local = root.path(unit.host_path)
        data = unit.text.encode()
        if not os.path.lexists(local):
            plans.append((local, data, "wrote"))
        elif local.is_file() and not local.is_symlink() and local.read_bytes() == data:
            plans.append((local, data, "unchanged"))
        elif written_by_vgpuctl(local) or force:
            plans.append((local, data, "updated"))
        else:
            raise Conflict(f"{local} exists and was not written by vgpuctl; move it away, or replace it "
                           "with --force")
    steps = []
    for local, data, action in plans:
        if action != "unchanged":
            crashpoint("install-units:before-write")
            atomic_write(local, data)
        steps.append(Step(action, str(local)))
    changed = any(step.action != "unchanged" for step in steps)
    steps += _enable(root, system, running, changed, force)
    if running:
        steps += _reload_udev(system, changed)
    else:
        steps.append(Step("skipped", "systemctl, udevadm", f"{root.root} is not this system's root: "
                                                           "the unit is enabled by its link"))
    return steps


def _systemd_running(root: HostRoot) -> bool:
    return root.exists(root.run_systemd_system)


def _enable(root: HostRoot, system: System, running: bool, changed: bool, force: bool) -> list[Step]:
    steps = []
    systemctl = system.which("systemctl") if running else None
    if systemctl and changed:
        if _systemd_running(root):
            steps.append(_command(system, [systemctl, "daemon-reload"]))
        else:
            steps.append(Step("skipped", "systemctl daemon-reload", "systemd is not running here"))
    for name in (UNIT_NAME, VM_UNIT_NAME):
        steps.append(_enable_unit(root, system, systemctl, running, force, name))
    return steps


def _enable_unit(root: HostRoot, system: System, systemctl: str | None, running: bool, force: bool,
                 name: str) -> Step:
    link = root.path(wants_link(root, name))
    target = unit_path(root, name)
    if link.is_symlink() and os.readlink(link) == target:
        return Step("unchanged", f"{link} -> {target}")
    if os.path.lexists(link) and not link.is_symlink() and not force:
        raise Conflict(f"{link} exists and is not a link to {target}; move it away, or replace it with --force")
    if systemctl:
        code, output = system.run([systemctl, "enable", name])
        if code != 0:
            raise KernelError(f"'systemctl enable {name}' failed: {output or f'exit status {code}'}")
        return Step("enabled", f"systemctl enable {name}")
    crashpoint("install-units:before-link")
    _symlink(target, link)
    note = "systemctl not found: linked as 'systemctl enable' would" if running else ""
    return Step("enabled", f"{link} -> {target}", note)


def _symlink(target: str, link: Path) -> None:
    """Create or replace a symlink atomically (a temporary link renamed over)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    clean_temp_files(link)
    temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def _reload_udev(system: System, changed: bool) -> list[Step]:
    if not changed:
        return []
    udevadm = system.which("udevadm")
    if udevadm is None:
        return [Step("skipped", "udevadm control --reload", "udevadm not found; udevd reads the rules when it starts")]
    return [_command(system, [udevadm, "control", "--reload"])]


def _command(system: System, command: list[str]) -> Step:
    """Run a command whose failure is worth a warning but does not undo the installation."""
    code, output = system.run(command)
    shown = " ".join([Path(command[0]).name, *command[1:]])
    if code == 0:
        return Step("ran", shown)
    return Step("failed", shown, output.splitlines()[-1] if output else f"exit status {code}")


def uninstall(root: HostRoot, force: bool = False, system: System | None = None) -> list[Step]:
    """Disable the unit and remove the files vgpuctl wrote; others stay (and are reported) unless force."""
    system = system or System()
    running = is_running_system(root)
    unit_locals = {name: root.path(unit_path(root, name)) for name in (UNIT_NAME, VM_UNIT_NAME)}
    ours = {local: written_by_vgpuctl(local) or force
            for local in (unit_locals[UNIT_NAME], root.path(rules_path(root)), unit_locals[VM_UNIT_NAME])}
    steps: list[Step] = []
    for name, unit_local in unit_locals.items():
        if ours[unit_local] or not os.path.lexists(unit_local):
            steps += _disable(root, system, running, name)
    removed = False
    for local, owned in ours.items():
        if not os.path.lexists(local):
            steps.append(Step("absent", str(local)))
        elif owned:
            local.unlink()
            clean_temp_files(local)
            fsync_dir(local.parent)
            steps.append(Step("removed", str(local)))
            removed = True
        else:
            steps.append(Step("kept", str(local), "not written by vgpuctl; --force removes it"))
    if running and removed:
        systemctl = system.which("systemctl")
        if systemctl and _systemd_running(root):
            steps.append(_command(system, [systemctl, "daemon-reload"]))
        steps += _reload_udev(system, True)
    return steps


def _disable(root: HostRoot, system: System, running: bool, name: str) -> list[Step]:
    """``systemctl disable`` on the running system; elsewhere (or if that left it) remove the link."""
    steps = []
    link = root.path(wants_link(root, name))
    systemctl = system.which("systemctl") if running else None
    if systemctl and root.exists(unit_path(root, name)):
        steps.append(_command(system, [systemctl, "disable", name]))
    if link.is_symlink() and os.readlink(link) == unit_path(root, name):
        link.unlink()
        clean_temp_files(link)
        fsync_dir(link.parent)
        steps.append(Step("removed", str(link)))
    return steps
