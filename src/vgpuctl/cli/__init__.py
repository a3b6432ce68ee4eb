"""The ``vgpuctl`` command line. This module stays tiny: it only picks the entry point, so that
``vgpuctl ... --json`` and the mdevctl stand-in start fast (every import here is paid per call)."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs ~5 ms to import; this entry point stays bare
if TYPE_CHECKING:
    from typing import NoReturn


def main() -> None:
    try:
        # Installed (linked) as mdevctl or lsmdev, vgpuctl stands in for mdevctl (e.g. for libvirt).
        if os.path.basename(sys.argv[0]) in ("mdevctl", "lsmdev"):
            from vgpuctl.cli.mdevctl import run_as_mdevctl

            sys.exit(run_as_mdevctl(sys.argv))
        from vgpuctl.cli.app import cli

        cli()
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


def exit_now(code: int | str | None) -> NoReturn:
    """Exit without the interpreter's teardown. Freeing every imported module (click, asyncio, ...)
    costs 15-30 ms per call on these machines, a third of a `list --json`; the command's work is
    finished and flushed by now, and vgpuctl registers no atexit handlers and leaves no non-daemon
    threads that would need them."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 (contextlib is one more import)
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`vgpuctl list | head`): nothing left to say
            pass
    os._exit(code or 0)
