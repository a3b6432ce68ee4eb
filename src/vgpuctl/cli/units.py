"""``vgpuctl install-units`` and ``uninstall-units``: autostart at boot and when a parent registers.

The files come from the layers that know them (mdev: the vGPUs' autostart unit and udev rule; vm: the VM
unit); host/units.py installs them with vgpuctl's installer, recorded in the state directory's units/.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vgpuctl.base.errors import VgpuError
from vgpuctl.cli.app import State, die, say

if TYPE_CHECKING:
    from vgpuctl.base.state import StateDir
    from vgpuctl.host import HostRoot
    from vgpuctl.host.install import Step, Tools
    from vgpuctl.host.units import UnitFile

PROGRAM_NAME = "vgpuctl"

force_option = click.option("--force", is_flag=True, help="Also replace or remove files vgpuctl did not write.")


def find_program(argv0: str | None = None, which: Callable[[str], str | None] = shutil.which) -> str:
    """The real path of the installed ``vgpuctl`` program: the running console script, else the one on PATH."""
    from vgpuctl.base.errors import NotFound

    script = Path(sys.argv[0] if argv0 is None else argv0)
    if script.name == PROGRAM_NAME and script.is_file() and os.access(script, os.X_OK):
        return str(script.resolve())
    found = which(PROGRAM_NAME)
    if found:
        return str(Path(found).resolve())
    raise NotFound("cannot tell where the vgpuctl program is installed (it is not on PATH); give it with "
                   "--program /path/to/vgpuctl", what="program")


def unit_files(root: HostRoot, program: str) -> list[UnitFile]:
    """What install-units writes, in boot order: the VF unit (before the other two), the vGPUs' autostart unit
    and its udev rule, the VM unit."""
    from vgpuctl.backends import vf_restore
    from vgpuctl.mdev import units
    from vgpuctl.vm.units import VM_UNIT_NAME, vm_unit_file

    return [vf_restore.unit_file(root, program, (units.UNIT_NAME, VM_UNIT_NAME)), *units.unit_files(root, program),
            vm_unit_file(root, program)]


def install(root: HostRoot, state: StateDir, program: str, force: bool = False,
            tools: Tools | None = None) -> list[Step]:
    """Check the program (and flock), then install the units; ``tools`` default to the host's."""
    from vgpuctl.host import units as host_units
    from vgpuctl.host.install import Tools
    from vgpuctl.mdev.units import check_flock

    program = host_units.check_program(program, root.is_this_machine)
    check_flock(root)
    with state.lock("units"):
        return host_units.install(root, unit_files(root, program), state.path / "units", tools or Tools(root),
                                  force)


def uninstall(root: HostRoot, state: StateDir, force: bool = False, tools: Tools | None = None) -> list[Step]:
    from vgpuctl.host import units as host_units
    from vgpuctl.host.install import Tools

    with state.lock("units"):  # the files' paths: their contents do not matter here
        return host_units.uninstall(root, unit_files(root, f"/{PROGRAM_NAME}"), state.path / "units",
                                    tools or Tools(root), force)


def _state() -> StateDir:
    from vgpuctl.base.state import StateDir

    return StateDir.from_env(State.state_dir)


@click.command("install-units")
@click.option("--program", help="Program the unit and rule run (default: this vgpuctl's real path).")
@click.option("--print", "print_only", is_flag=True, help="Only show the files; write nothing.")
@force_option
def install_units(program: str | None, print_only: bool, force: bool) -> None:
    """Install systemd units and a udev rule: SR-IOV VFs vgpuctl made put back at boot, 'auto' vGPUs at boot and
    when their GPU appears, then the VMs marked autostart, in their order.

    Writes /etc/systemd/system/vgpuctl-vfs.service, /etc/systemd/system/vgpuctl-autostart.service,
    /etc/udev/rules.d/60-vgpuctl.rules and /etc/systemd/system/vgpuctl-vms.service under the host root and
    enables the units; running it again changes nothing. What it wrote is recorded in the state directory
    (units/).
    """
    from vgpuctl.host.units import check_program

    root = State.root
    try:
        chosen = program if program is not None else find_program()
        if print_only:
            for index, unit in enumerate(unit_files(root, check_program(chosen, False))):
                click.echo(("\n" if index else "") + f"==> {unit.host_path} <==\n{unit.text}", nl=False)
            return
        steps = install(root, _state(), chosen, force=force)
    except (VgpuError, OSError) as e:  # OSError: the host refused a write (not root ...): said, not a bug
        die(str(e))
    say(f"program    {chosen}")
    for step in steps:
        say(step.line())


@click.command("uninstall-units")
@force_option
def uninstall_units(force: bool) -> None:
    """Disable and remove the units and rule that install-units wrote (files it did not write stay)."""
    try:
        steps = uninstall(State.root, _state(), force=force)
    except (VgpuError, OSError) as e:
        die(str(e))
    for step in steps:
        say(step.line())
    if any(step.action == "kept" for step in steps):
        sys.exit(1)
