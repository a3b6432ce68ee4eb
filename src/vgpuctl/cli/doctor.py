"""``vgpuctl doctor``: the host's readiness for GVT-g vGPUs, check by check, with the fix for each."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from vgpuctl.cli.app import State, print_json, reports_errors, say

if TYPE_CHECKING:
    from vgpuctl.host.doctor import Check, Report

COLOURS = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "bright_black"}


def _indent(text: str, first: str, rest: str) -> list[str]:
    lines = text.splitlines() or [""]
    return [first + lines[0], *(rest + line for line in lines[1:])]


def check_lines(check: Check, colour: bool) -> list[str]:
    from vgpuctl.host.doctor import MARKS

    mark = MARKS[check.status]
    head = f"{mark} {check.id:<13} {check.title}"
    if colour:
        head = click.style(f"{mark} {check.id:<13}", fg=COLOURS[check.status], bold=check.status == "fail") + \
            f" {check.title}"
    pad = " " * 16
    lines = [head]
    if check.detail:
        lines += _indent(check.detail, pad, pad)
    for path, value in check.evidence:
        lines += _indent(f"{path}: {value}", pad + "· ", pad + "  ")
    if check.fix:
        lines += _indent(check.fix, pad + "fix: ", pad + "     ")
    return lines


def print_report(report: Report) -> None:
    colour = sys.stdout.isatty()
    where = f"simulated host at {report.root}" if report.simulated else f"host {report.root}"
    say(f"vgpuctl doctor: {where}, Linux {report.kernel or 'unknown'}")
    for check in report.checks:
        say("")
        say("\n".join(check_lines(check, colour)))
    say("")
    verdict = report.verdict
    say(click.style(verdict, fg="green" if report.ready else "red", bold=True) if colour else verdict)


@click.command()
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@click.option("--no-guest", is_flag=True, help="Do not start a tiny KVM guest to prove that KVM runs guests.")
@click.option("--qemu", "qemu_binary", metavar="PATH", help="The QEMU binary to probe (default: found in PATH).")
@reports_errors
def doctor(json_output: bool, no_guest: bool, qemu_binary: str | None) -> None:
    """Is this host ready for GVT-g vGPUs? Every check with its evidence and fix; exit 0 ready, 1 not."""
    from vgpuctl.backends.doctor import run_doctor

    report = run_doctor(State.root, run_guest=not no_guest, qemu=qemu_binary)
    if json_output:
        print_json(report.to_json())
    else:
        print_report(report)
    sys.exit(0 if report.ready else 1)
