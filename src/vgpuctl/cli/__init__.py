"""The ``vgpuctl`` command line: one typer app, a module per command group."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from vgpuctl.host import HostRoot

app = typer.Typer(help="Run virtual machines on shared GPUs (Intel GVT-g and other mdev vGPUs) with KVM.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

# Tables keep their columns when piped (rich would squeeze them into 80).
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


class State:
    root: HostRoot = HostRoot()
    state_dir: str | None = None


def die(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.callback()
def _global(
    root: Annotated[str | None, typer.Option("--root", envvar="VGPUCTL_ROOT",
                                             help="Host root directory (default /).")] = None,
    state_dir: Annotated[str | None, typer.Option("--state-dir", envvar="VGPUCTL_STATE_DIR",
                                                  help="vgpuctl's own state (default /var/lib/vgpuctl).")] = None,
) -> None:
    State.root = HostRoot.from_env(root)
    State.state_dir = state_dir


def _register() -> None:
    # Imported here so that each module can use `app` and the helpers above.
    from vgpuctl.cli import sim, units, vgpus  # noqa: F401


_register()


@app.command("mdevctl", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def _mdevctl(ctx: typer.Context) -> None:
    """Act as mdevctl 1.2.0: its options, output, files and exit codes (e.g. vgpuctl mdevctl list -d)."""
    from vgpuctl.cli.mdevctl import run_as_mdevctl

    raise typer.Exit(run_as_mdevctl(["mdevctl", *ctx.args], root=State.root, state_dir=State.state_dir))


def main() -> None:
    # Installed (linked) as mdevctl or lsmdev, vgpuctl stands in for mdevctl (e.g. for libvirt).
    if os.path.basename(sys.argv[0]) in ("mdevctl", "lsmdev"):
        from vgpuctl.cli.mdevctl import run_as_mdevctl

        sys.exit(run_as_mdevctl(sys.argv))
    app()
