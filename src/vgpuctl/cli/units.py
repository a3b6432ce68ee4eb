"""``vgpuctl install-units`` and ``uninstall-units``: autostart at boot and when a parent registers."""

from __future__ import annotations

from typing import Annotated

import typer

from vgpuctl.cli import State, app, die, out
from vgpuctl.mdev.errors import VgpuError

Force = Annotated[bool, typer.Option("--force", help="Also replace or remove files vgpuctl did not write.")]


@app.command("install-units")
def install_units(
    program: Annotated[str | None, typer.Option(
        "--program", help="Program the unit and rule run (default: this vgpuctl's real path).")] = None,
    print_only: Annotated[bool, typer.Option("--print", help="Only show the files; write nothing.")] = False,
    force: Force = False,
) -> None:
    """Install a systemd unit and a udev rule that start every 'auto' vGPU at boot and when its GPU appears.

    Writes /etc/systemd/system/vgpuctl-autostart.service and /etc/udev/rules.d/60-vgpuctl.rules
    under the host root and enables the unit; running it again changes nothing.
    """
    from vgpuctl.mdev import units

    root = State.root
    try:
        chosen = program if program is not None else units.find_program()
        if print_only:
            for index, unit in enumerate(units.unit_files(root, units.check_program(chosen, False))):
                typer.echo(("\n" if index else "") + f"==> {unit.host_path} <==\n{unit.text}", nl=False)
            return
        steps = units.install(root, chosen, force=force)
    except (VgpuError, OSError) as e:
        die(str(e))
    out.print(f"program    {chosen}", highlight=False)
    for step in steps:
        out.print(step.line(), highlight=False)


@app.command("uninstall-units")
def uninstall_units(force: Force = False) -> None:
    """Disable and remove the unit and rule that install-units wrote (files it did not write stay)."""
    from vgpuctl.mdev import units

    try:
        steps = units.uninstall(State.root, force=force)
    except (VgpuError, OSError) as e:
        die(str(e))
    for step in steps:
        out.print(step.line(), highlight=False)
    if any(step.action == "kept" for step in steps):
        raise typer.Exit(1)
