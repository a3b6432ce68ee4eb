"""The ``vgpuctl`` command line. This module stays tiny: it only picks the entry point, so that
``vgpuctl ... --json`` and the mdevctl stand-in start fast (every import here is paid per call)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    # Installed (linked) as mdevctl or lsmdev, vgpuctl stands in for mdevctl (e.g. for libvirt).
    if os.path.basename(sys.argv[0]) in ("mdevctl", "lsmdev"):
        from vgpuctl.cli.mdevctl import run_as_mdevctl

        sys.exit(run_as_mdevctl(sys.argv))
    from vgpuctl.cli.app import cli

    cli()
