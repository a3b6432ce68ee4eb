"""systemd units and udev rules, installed with vgpuctl's installer (:mod:`vgpuctl.host.install`).

Files are written only when they change, and each ``wanted_by`` unit is enabled as ``systemctl enable``
does: through systemctl on this machine, else by the link it would make. Uninstall disables and
removes them again. What the files say comes from the layers that know it (mdev: the autostart unit
and rule; vm: the VM unit), so this module knows no unit of its own.

A path is vgpuctl's when its record says vgpuctl put what is there, or when it is a file that starts
with :data:`HEADER`, which every version writes. Earlier versions of install-units kept no record: such a
file, and a link to it, is adopted into the record (as made by vgpuctl, with nothing before it) when
install or uninstall meets it, so a host set up by them is uninstalled as before.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import Conflict, InvalidInput, KernelError
from vgpuctl.host.install import Command, Record, Step, Tools, link_fingerprint, sha256, undo, write_file, write_link
from vgpuctl.host.root import HostRoot

HEADER = "# Managed by vgpuctl: written by 'vgpuctl install-units', removed by 'vgpuctl uninstall-units'."
WANTED_BY = "multi-user.target"
# udev splits RUN on spaces and expands % and $; systemd expands % and $ and splits on spaces.
UNSAFE_IN_PROGRAM = re.compile(r"[\s\"'\\%$]")


@dataclass(frozen=True)
class UnitFile:
    """A file to install: a systemd unit (enabled for ``wanted_by`` if given) or a udev rules file."""

    host_path: str  # as on the host, e.g. /etc/udev/rules.d/60-vgpuctl.rules
    text: str
    wanted_by: str | None = None

    @property
    def name(self) -> str:
        return PurePosixPath(self.host_path).name


def check_program(program: str, on_this_machine: bool) -> str:
    """A program path that udev and systemd run as written: absolute, nothing they would split or expand."""
    if not program.startswith("/"):
        raise InvalidInput("--program must be an absolute path (udev and systemd need one), got {value!r}",
                           what="program", value=program)
    if UNSAFE_IN_PROGRAM.search(program):
        raise InvalidInput("program path {value!r} contains a space, quote, backslash, % or $, which udev and "
                           "systemd would split or expand; install vgpuctl (or a link to it) elsewhere",
                           what="program", value=program)
    if on_this_machine and not (os.path.isfile(program) and os.access(program, os.X_OK)):
        raise InvalidInput("{value} is not an executable file on this host", what="program", value=program)
    return program


def wants_link(root: HostRoot, unit: UnitFile) -> str:
    """What ``systemctl enable`` creates for ``WantedBy=``."""
    return f"{root.etc_systemd_system}/{unit.wanted_by}.wants/{unit.name}"


def _has_header(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, errors="replace") as f:
        return f.readline().rstrip("\n") == HEADER


def _adopt_old(root: HostRoot, record: Record, files: list[UnitFile]) -> None:
    """Record what an older vgpuctl installed without a record: its files (by their header) and the links
    to them."""
    for unit in files:
        if _has_header(root.path(unit.host_path)):
            record.adopt(root, unit.host_path, "file")
        link = root.path(wants_link(root, unit)) if unit.wanted_by else None
        if link is not None and link.is_symlink() and os.readlink(link) == unit.host_path:
            record.adopt(root, wants_link(root, unit), "enable")


def _ours(root: HostRoot, record: Record, host_path: str) -> bool:
    return record.owns(root, host_path) or _has_header(root.path(host_path))


def _record(directory: Path, root: HostRoot) -> Record:
    record = Record(directory)
    record.check_root(root, "uninstall them")
    return record


def install(root: HostRoot, files: list[UnitFile], record_dir: Path, tools: Tools,
            force: bool = False) -> list[Step]:
    """Write the files (atomically, only when they change) and enable the units; everything is checked
    before anything is written, and recorded before it changes."""
    record = _record(record_dir, root)
    _adopt_old(root, record, files)
    writes: list[tuple[UnitFile, str]] = []
    for unit in files:
        local = root.path(unit.host_path)
        if not os.path.lexists(local):
            writes.append((unit, "wrote"))
        elif local.is_file() and not local.is_symlink() and local.read_bytes() == unit.text.encode():
            writes.append((unit, "unchanged"))
        elif _ours(root, record, unit.host_path) or force:
            writes.append((unit, "updated"))
        else:
            raise Conflict("{local} exists and was not written by vgpuctl; move it away, or replace it with --force",
                           what="file", path=unit.host_path, local=str(local))
    links: list[UnitFile] = []
    for unit in (u for u in files if u.wanted_by):
        link = root.path(wants_link(root, unit))
        if link.is_symlink() and os.readlink(link) == unit.host_path:
            continue
        if os.path.lexists(link) and not link.is_symlink() and not force:
            raise Conflict("{local} exists and is not a link to {target}; move it away, or replace it with --force",
                           what="link", path=wants_link(root, unit), local=str(link), target=unit.host_path)
        links.append(unit)
    for unit, action in writes:
        if action != "unchanged":
            record.claim(root, unit.host_path, "file", sha256(unit.text.encode()))
    for unit in links:
        record.claim(root, wants_link(root, unit), "enable", link_fingerprint(unit.host_path))
    record.save()

    steps = []
    for unit, action in writes:
        if action != "unchanged":
            crashpoint("install-units:before-write")
            write_file(root.path(unit.host_path), unit.text.encode())
        steps.append(Step(action, str(root.path(unit.host_path))))
    changed = any(action != "unchanged" for _, action in writes)
    systemctl = tools.find("systemctl") if tools.runnable else None
    if systemctl and changed:
        steps.append(tools.step(Command(("systemctl", "daemon-reload"))) if root.exists(root.run_systemd_system)
                     else Step("skipped", "systemctl daemon-reload", "systemd is not running here"))
    for unit in (u for u in files if u.wanted_by):
        steps.append(_enable(root, tools, systemctl, unit, unit in links))
    if not tools.runnable:
        steps.append(Step("skipped", "systemctl, udevadm", f"{root.root} is not this system's root: the unit is "
                                                           "enabled by its link"))
    elif changed:
        steps.append(_reload_udev(tools))
    return steps


def _enable(root: HostRoot, tools: Tools, systemctl: str | None, unit: UnitFile, needed: bool) -> Step:
    link, target = root.path(wants_link(root, unit)), unit.host_path
    if not needed:
        return Step("unchanged", f"{link} -> {target}")
    if systemctl:
        code, out, err = tools.run(Command(("systemctl", "enable", unit.name)))
        if code != 0:
            output = (out + err).strip()
            raise KernelError("'systemctl enable {name}' failed: {output}", what="unit", name=unit.name,
                              path=target, output=output or f"exit status {code}")
        return Step("enabled", f"systemctl enable {unit.name}")
    crashpoint("install-units:before-link")
    write_link(link, target)
    note = "systemctl not found: linked as 'systemctl enable' would" if tools.runnable else ""
    return Step("enabled", f"{link} -> {target}", note)


def _reload_udev(tools: Tools) -> Step:
    if tools.find("udevadm") is None:
        return Step("skipped", "udevadm control --reload", "udevadm not found; udevd reads the rules when it starts")
    return tools.step(Command(("udevadm", "control", "--reload")))


def uninstall(root: HostRoot, files: list[UnitFile], record_dir: Path, tools: Tools,
              force: bool = False) -> list[Step]:
    """Disable the units and remove the files vgpuctl put there (putting back what it replaced); others
    stay, and are reported, unless ``force``."""
    record = _record(record_dir, root)
    _adopt_old(root, record, files)
    ours = {u.host_path: _ours(root, record, u.host_path) or force for u in files}
    systemctl = tools.find("systemctl") if tools.runnable else None
    steps: list[Step] = []
    for unit in (u for u in files if u.wanted_by):
        if not ours[unit.host_path] and os.path.lexists(root.path(unit.host_path)):
            continue  # someone else's unit: its enablement is not ours to undo
        if systemctl and root.exists(unit.host_path):
            steps.append(tools.step(Command(("systemctl", "disable", unit.name))))
        link = wants_link(root, unit)
        outcome = undo(root, record, link) if link in record.files else "unchanged"
        if outcome in ("removed", "restored"):
            steps.append(Step(outcome, str(root.path(link))))
    changed = False
    for unit in files:
        local = root.path(unit.host_path)
        if not os.path.lexists(local):
            if unit.host_path in record.files:
                undo(root, record, unit.host_path)  # nothing there: forgotten, unless it was someone's file
            steps.append(Step("absent", str(local)))
        elif ours[unit.host_path]:
            record.adopt(root, unit.host_path, "file")  # a file vgpuctl did not write, removed with --force
            steps.append(Step(undo(root, record, unit.host_path, force=True), str(local)))
            changed = True
        else:
            steps.append(Step("kept", str(local), "not written by vgpuctl; --force removes it"))
    record.save()
    if tools.runnable and changed:
        if systemctl and root.exists(root.run_systemd_system):
            steps.append(tools.step(Command(("systemctl", "daemon-reload"))))
        steps.append(_reload_udev(tools))
    return steps
