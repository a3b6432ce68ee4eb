"""``vgpuctl install-units`` and ``uninstall-units``: autostart at boot and when a parent registers."""

from __future__ import annotations

import sys

import click

from vgpuctl.base.errors import VgpuError
from vgpuctl.cli.app import State, die, say

force_option = click.option("--force", is_flag=True, help="Also replace or remove files vgpuctl did not write.")


@click.command("install-units")
@click.option("--program", help="Program the unit and rule run (default: this vgpuctl's real path).")
@click.option("--print", "print_only", is_flag=True, help="Only show the files; write nothing.")
@force_option
def install_units(program: str | None, print_only: bool, force: bool) -> None:
    """Install systemd units and a udev rule: 'auto' vGPUs at boot and when their GPU appears, then the VMs
    marked autostart, in their order.

    Writes /etc/systemd/system/vgpuctl-autostart.service, /etc/udev/rules.d/60-vgpuctl.rules and
    /etc/systemd/system/vgpuctl-vms.service under the host root and enables both units; running it
    again changes nothing.
    """
    from vgpuctl.mdev import units

    root = State.root
    try:
        chosen = program if program is not None else units.find_program()
        if print_only:
            for index, unit in enumerate(units.unit_files(root, units.check_program(chosen, False))):
                click.echo(("\n" if index else "") + f"==> {unit.host_path} <==\n{unit.text}", nl=False)
            return
        steps = units.install(root, chosen, force=force)
    except (VgpuError, OSError) as e:
        die(str(e))
    say(f"program    {chosen}")
    for step in steps:
        say(step.line())


@click.command("uninstall-units")
@force_option
def uninstall_units(force: bool) -> None:
    """Disable and remove the units and rule that install-units wrote (files it did not write stay)."""
    from vgpuctl.mdev import units

    try:
        steps = units.uninstall(State.root, force=force)
    except (VgpuError, OSError) as e:
        die(str(e))
    for step in steps:
        say(step.line())
    if any(step.action == "kept" for step in steps):
        sys.exit(1)
