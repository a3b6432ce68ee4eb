"""The click group, global options and output helpers shared by the command modules.

rich is imported only when something is printed for a person, never on the ``--json`` paths.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from vgpuctl.host import HostRoot

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


class State:
    root: HostRoot = HostRoot()
    state_dir: str | None = None


@functools.cache
def out() -> Console:
    from rich.console import Console

    # Tables keep their columns when piped (rich would squeeze them into 80).
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200, highlight=False)


def say(text: str) -> None:
    """A plain line on stdout (no markup, no colour)."""
    click.echo(text)


def die(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def reports_errors(command: F) -> F:
    """Turn vgpuctl's errors (and the host's refusals, OSError) into one clear line on stderr and exit status 1.
    Any other exception is a bug in vgpuctl, shown as one: its traceback, and a line that says so."""
    from vgpuctl.base.errors import VgpuError

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except VgpuError as e:
            die(str(e))
        except OSError as e:  # the host or the state directory refused (not root, read-only ...), as the API says
            die(f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own: usage errors, ctx.exit()
        except Exception as e:
            import traceback

            traceback.print_exc()
            die(f"internal error, a bug in vgpuctl ({type(e).__name__}: {e}); please report it with the traceback "
                "above")

    return wrapper  # type: ignore[return-value]


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# Each command's module is imported only when that command runs, so that e.g. `vgpuctl list --json`
# does not pay for the VM, doctor or simulator code (the lazy-group pattern from click's docs).
COMMANDS = {
    "gpus": "vgpus:gpus",
    "types": "vgpus:types_command",
    "list": "vgpus:list_command",
    "create": "vgpus:create",
    "remove": "vgpus:remove",
    "define": "vgpus:define",
    "undefine": "vgpus:undefine",
    "modify": "vgpus:modify",
    "start": "vgpus:start",
    "stop": "vgpus:stop",
    "autostart": "vgpus:autostart",
    "install-units": "units:install_units",
    "uninstall-units": "units:uninstall_units",
    "vm": "vm:vm",
    "vfs": "vfs:vfs_group",
    "doctor": "doctor:doctor",
    "setup": "setup:setup_group",
    "sim": "sim:sim_group",
    "demo": "sim:demo",
    "serve": "serve:serve",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        import importlib

        module, attribute = COMMANDS[cmd_name].split(":")
        command: click.Command = getattr(importlib.import_module(f"vgpuctl.cli.{module}"), attribute)
        return command


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.option("--root", envvar="VGPUCTL_ROOT", metavar="DIR", help="Host root directory (default /).")
@click.option("--state-dir", envvar="VGPUCTL_STATE_DIR", metavar="DIR",
              help="vgpuctl's own state (default /var/lib/vgpuctl).")
def cli(root: str | None, state_dir: str | None) -> None:
    """Run virtual machines on shared GPUs (Intel GVT-g and other mdev vGPUs) with KVM."""
    State.root = HostRoot.from_env(root)
    State.state_dir = state_dir


@cli.command("mdevctl", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def mdevctl_command(args: tuple[str, ...]) -> None:
    """Act as mdevctl 1.2.0: its options, output, files and exit codes (e.g. vgpuctl mdevctl list -d)."""
    from vgpuctl.cli.mdevctl import run_as_mdevctl

    sys.exit(run_as_mdevctl(["mdevctl", *args], root=State.root, state_dir=State.state_dir))
