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

This module says what the two files hold; :mod:`vgpuctl.host.units` installs them (the CLI adds the VM
unit) and takes them back.
"""

from __future__ import annotations

import os

from vgpuctl.base.errors import NotFound
from vgpuctl.host import HostRoot
from vgpuctl.host.units import HEADER, WANTED_BY, UnitFile

UNIT_NAME = "vgpuctl-autostart.service"
RULES_NAME = "60-vgpuctl.rules"
FLOCK = "/usr/bin/flock"  # util-linux, Essential on Debian
LOCK_NAME = "vgpuctl-autostart.lock"
LOCK_WAIT_S = 120  # below udev's 180 s event timeout, after which udevd kills the command


def check_flock(root: HostRoot) -> None:
    """On this machine the unit and the rule need flock (NotFound when it is missing)."""
    if root.is_this_machine and not os.access(FLOCK, os.X_OK):
        raise NotFound("{path} not found: install util-linux (the unit and the rule run autostart through it)",
                       what="program", path=FLOCK)


def lock_file(root: HostRoot) -> str:
    return f"{root.run_dir}/{LOCK_NAME}"


def autostart_command(root: HostRoot, program: str, *args: str) -> str:
    """``vgpuctl autostart ARGS`` serialized with every other autostart run through flock."""
    return " ".join([FLOCK, "-w", str(LOCK_WAIT_S), lock_file(root), program, "autostart", *args])


def unit_path(root: HostRoot) -> str:
    return f"{root.etc_systemd_system}/{UNIT_NAME}"


def rules_path(root: HostRoot) -> str:
    return f"{root.etc_udev_rules_d}/{RULES_NAME}"


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
    """The autostart unit (enabled) and the udev rule."""
    return [UnitFile(unit_path(root), render_unit(root, program), WANTED_BY),
            UnitFile(rules_path(root), render_rules(root, program))]
