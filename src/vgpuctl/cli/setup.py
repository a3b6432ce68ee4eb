"""``vgpuctl setup plan|apply|revert``: make the host ready for its vGPUs (GVT-g, Intel SR-IOV, NVIDIA
vendor-VFIO: what vgpuctl.backends.setup_wants finds), show it as a diff, undo it."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from vgpuctl.cli.app import State, die, print_json, say

if TYPE_CHECKING:
    from vgpuctl.base.state import StateDir
    from vgpuctl.host.setup import Plan, Step, Tools

F = TypeVar("F", bound=Callable[..., Any])

# vgpuctl.host.setup.MECHANISMS, spelled here so that the command line does not import it to start.
BOOT_CHOICES = ("auto", "grub", "grubby", "systemd-boot", "kernelstub", "none")

boot_option = click.option(
    "--boot", type=click.Choice(BOOT_CHOICES), default="auto", show_default=True,
    help="How the kernel command line is set: found from the host's files, or named; 'none' leaves it alone.")
tools_option = click.option(
    "--tools-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
    help="Run grubby, update-grub, kernelstub ... from DIR, even under --root (without it they run only "
         "on this machine's own root, and are only shown otherwise).")


def setup_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from vgpuctl.base.errors import VgpuError

        try:
            return command(*args, **kwargs)
        except (VgpuError, OSError) as e:  # the host refused a write (not root ...): said, not a bug
            die(str(e))

    return wrapper  # type: ignore[return-value]


def _state() -> StateDir:
    from vgpuctl.base.state import StateDir

    return StateDir.from_env(State.state_dir)


def _setup_dir() -> Path:
    return _state().path / "setup"


def _tools(tools_dir: Path | None) -> Tools:
    from vgpuctl.host.setup import Tools

    return Tools(State.root, tools_dir.absolute() if tools_dir is not None else None)


def _plan(boot: str, tools: Tools) -> Plan:
    from vgpuctl.backends import setup_wants
    from vgpuctl.host.setup import make_plan, pending_commands

    return make_plan(State.root, tools, setup_wants(State.root), boot, pending=pending_commands(_setup_dir()))


def _epilogue(plan: Plan) -> None:
    for note in plan.notes:
        say(f"note: {note}")
    if plan.reboot:
        say("reboot needed: " + "; ".join(plan.reboot))
    if plan.now:
        say("now, if you like (takes effect at once):")
        for step in plan.now:
            say(f"  {step}")


def _steps(steps: list[Step]) -> None:
    for step in steps:
        say(step.line())


@click.group("setup")
def setup_group() -> None:
    """Make the host ready for its vGPUs (GVT-g, Intel SR-IOV, NVIDIA): command line, modules, module options.

    'plan' shows the changes as a diff, 'apply' makes them (backing up every file it changes under
    the state directory), 'revert' puts the backups back.
    """


@setup_group.command("plan")
@boot_option
@tools_option
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@setup_errors
def setup_plan(boot: str, tools_dir: Path | None, json_output: bool) -> None:
    """Show, as a diff, what would make this host ready (changes nothing)."""
    plan = _plan(boot, _tools(tools_dir))
    if json_output:
        print_json(plan.to_json())
        return
    say(f"boot: {plan.boot.summary} ({plan.boot.detected})")
    if plan.nothing_to_do:
        say("nothing to do: the host is set up")
    else:
        if plan.boot.preview:
            click.echo(plan.boot.preview, nl=False)
        for edit in plan.edits:
            click.echo(edit.diff(), nl=False)
        if plan.commands:
            say("then run:" if plan.runnable else
                f"then run, on that host (vgpuctl does not run them under --root {State.root.root}):")
            for command in plan.commands:
                say(f"  {command}")
    _epilogue(plan)


@setup_group.command("apply")
@boot_option
@tools_option
@setup_errors
def setup_apply(boot: str, tools_dir: Path | None) -> None:
    """Make the changes 'setup plan' shows, with backups; running it again changes nothing."""
    from vgpuctl.host.setup import apply

    tools = _tools(tools_dir)
    with _state().lock("setup"):
        plan = _plan(boot, tools)
        steps = apply(plan, _setup_dir(), tools)
    say(f"boot: {plan.boot.summary} ({plan.boot.detected})")
    if not steps:
        say("nothing to do: the host is set up")
    _steps(steps)
    if plan.edits:
        say(f"backups in {_setup_dir()}: 'vgpuctl setup revert' puts them back")
    _epilogue(plan)
    if any(step.action == "failed" for step in steps):
        sys.exit(1)


@setup_group.command("revert")
@click.option("--force", is_flag=True, help="Also put back files changed since vgpuctl wrote them.")
@tools_option
@setup_errors
def setup_revert(force: bool, tools_dir: Path | None) -> None:
    """Put back what 'setup apply' changed: files it changed (if still as it left them) and command-line edits."""
    from vgpuctl.host.setup import revert

    with _state().lock("setup"):
        steps, reboot = revert(State.root, _setup_dir(), _tools(tools_dir), force=force)
    if not steps:
        say("nothing to revert")
    _steps(steps)
    if reboot:
        say("reboot needed: " + "; ".join(reboot))
    if any(step.action in ("refused", "failed") for step in steps):
        sys.exit(1)
