"""vGPU commands: gpus, types, list, create/remove, define/undefine/modify, start/stop, autostart."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from vgpuctl.cli.app import State, out, print_json, reports_errors, say

if TYPE_CHECKING:
    from rich.table import Table

    from vgpuctl.mdev.lifecycle import Manager
    from vgpuctl.mdev.sysfs import MdevType

uuid_option = click.option("-u", "--uuid", help="vGPU UUID.")
required_uuid = click.option("-u", "--uuid", required=True, help="vGPU UUID.")
parent_option = click.option("-p", "--parent", help="Parent device, e.g. 0000:00:02.0.")
type_option = click.option("-t", "--type", "type_id", help="mdev type, e.g. i915-GVTg_V5_4.")
json_option = click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
force_option = click.option("--force", is_flag=True, help="Also act on vGPUs vgpuctl did not create.")
attr_option = click.option("--attr", multiple=True, metavar="NAME=VALUE",
                           help="Device attribute, repeatable, in order.")


def manager(force: bool = False) -> Manager:
    from vgpuctl.mdev.lifecycle import Manager
    from vgpuctl.mdev.state import StateDir

    return Manager(State.root, StateDir.from_env(State.state_dir), force=force)


def parse_attrs(items: tuple[str, ...]) -> list[tuple[str, str]]:
    attrs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"attribute must look like NAME=VALUE, got {item!r}")
        attrs.append((name, value))
    return attrs


# ---------------------------------------------------------------- seeing the host


def type_json(t: MdevType) -> dict[str, Any]:
    return {"parent": t.parent, "type": t.type_id, "name": t.name, "available_instances": t.available_instances,
            "device_api": t.device_api, "description": t.description, "fields": t.fields,
            "memory_mib": t.memory_mib, "resolution": "x".join(map(str, t.resolution)) if t.resolution else None}


def types_table(types: list[MdevType]) -> Table:
    from rich.table import Table

    table = Table("parent", "type", "name", "available", "memory", "resolution", "details")
    for t in types:
        details = ", ".join(f"{k}={v}" for k, v in t.fields.items()
                            if k not in ("low_gm_mib", "high_gm_mib", "resolution", "max_resolution",
                                         "framebuffer_mib", "video_memory_mib"))
        table.add_row(t.parent, t.type_id, t.name or "-", str(t.available_instances),
                      f"{t.memory_mib} MiB" if t.memory_mib else "-",
                      "x".join(map(str, t.resolution)) if t.resolution else "-", details)
    return table


@click.command()
@json_option
@reports_errors
def gpus(json_output: bool) -> None:
    """Each mdev-capable GPU: address, vendor, platform, aperture, GVT-g pools, active vGPUs."""
    from rich.table import Table

    from vgpuctl.mdev.capacity import gvt_capacity
    from vgpuctl.mdev.sysfs import active_devices, aperture_mib, read_parents

    root = State.root
    active = active_devices(root)
    rows: list[dict[str, Any]] = []
    table = Table("parent", "vendor", "platform", "aperture", "low GM free", "high GM free", "fences free",
                  "vGPU ids free", "types", "active")
    for parent in read_parents(root):
        capacity = gvt_capacity(root, parent.name, parent.types)
        vgpus = [d.uuid for d in active if d.parent == parent.name]
        aperture = aperture_mib(root, parent.name) if capacity else None
        rows.append({
            "parent": parent.name,
            "vendor": parent.vendor,
            "vendor_id": f"0x{parent.vendor_id:04x}" if parent.vendor_id is not None else None,
            "device_id": f"0x{parent.device_id:04x}" if parent.device_id is not None else None,
            "platform": parent.platform,
            "aperture_mib": aperture,
            "pools": {p.name: {"total": p.total, "used": p.used, "free": p.free, "unit": p.unit}
                      for p in capacity.pools} if capacity else None,
            "types": len(parent.types),
            "active_vgpus": vgpus,
        })
        pools = capacity.pools if capacity else []
        free = [f"{p.free}/{p.total}{' ' + p.unit if p.unit else ''}" for p in pools] or ["-"] * 4
        device = f" 0x{parent.device_id:04x}" if parent.device_id is not None else ""
        table.add_row(parent.name, parent.vendor + device, parent.platform or "-",
                      f"{aperture} MiB" if aperture else "-", *free, str(len(parent.types)), str(len(vgpus)))
    if json_output:
        print_json(rows)
    elif rows:
        out().print(table)
    else:
        say("no mdev-capable GPU on this host; 'vgpuctl doctor' says why")


@click.command("types")
@parent_option
@json_option
@reports_errors
def types_command(parent: str | None, json_output: bool) -> None:
    """Every vGPU type with its available instances and its description as fields."""
    from vgpuctl.mdev.sysfs import parent_names, read_types

    root = State.root
    if parent:
        manager().check_parent(parent)
    found = [t for p in ([parent] if parent else parent_names(root)) for t in read_types(root, p)]
    if json_output:
        print_json([type_json(t) for t in found])
    elif found:
        out().print(types_table(found))
    else:
        say("no vGPU types on this host; 'vgpuctl doctor' says why")


@click.command("list")
@click.option("-d", "--defined", is_flag=True, help="Only defined vGPUs.")
@click.option("--active", "active_only", is_flag=True, help="Only active vGPUs.")
@parent_option
@uuid_option
@json_option
@reports_errors
def list_command(defined: bool, active_only: bool, parent: str | None, uuid: str | None, json_output: bool) -> None:
    """Active and defined vGPUs with parent, type, start mode and owner."""
    from vgpuctl.mdev import definitions
    from vgpuctl.mdev.state import StateDir
    from vgpuctl.mdev.sysfs import active_devices

    root = State.root
    owned = StateDir.from_env(State.state_dir).owned()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    if not defined:
        for d in active_devices(root):
            rows[(d.parent, d.uuid)] = {"uuid": d.uuid, "parent": d.parent, "type": d.type_id, "active": True,
                                        "defined": False, "start": None, "attrs": []}
    if not active_only:
        for definition in definitions.load_all(root):
            key = (definition.parent, definition.uuid)
            row = rows.get(key)
            if row is None:
                row = rows[key] = {"uuid": definition.uuid, "parent": definition.parent,
                                   "type": definition.mdev_type, "active": False, "defined": True}
            row.update(defined=True, start=definition.start,
                       attrs=[{k: v} for k, v in definition.attrs], defined_type=definition.mdev_type)
        if defined:
            active = {d.uuid: d for d in active_devices(root)}
            for row in rows.values():
                running = active.get(row["uuid"])
                row["active"] = bool(running and running.parent == row["parent"])
    for row in rows.values():
        row["owner"] = "vgpuctl" if row["uuid"] in owned else "other"
        row.setdefault("start", None)
        row.setdefault("attrs", [])
        row.pop("defined_type", None)
    selected = [r for key, r in sorted(rows.items())
                if (parent is None or r["parent"] == parent) and (uuid is None or r["uuid"] == uuid)]
    if json_output:
        print_json(selected)
        return
    if not selected:
        say("no vGPUs" + (" defined" if defined else ""))
        return
    from rich.table import Table

    table = Table("uuid", "parent", "type", "state", "start", "owner", "attrs")
    for r in selected:
        state = " + ".join(s for s, on in (("active", r["active"]), ("defined", r["defined"])) if on)
        attrs = ", ".join(f"{k}={v}" for a in r["attrs"] for k, v in a.items())
        table.add_row(r["uuid"], r["parent"], r["type"], state, r["start"] or "-", r["owner"], attrs or "-")
    out().print(table)


# ---------------------------------------------------------------- transient vGPUs


@click.command()
@uuid_option
@parent_option
@type_option
@attr_option
@click.option("--resolution", metavar="WxH", help="Pick a type that gives at least this resolution.")
@click.option("--min-memory", type=int, metavar="MIB", help="Pick a type with at least this much graphics memory.")
@click.option("--weight", type=int, help="Pick a type with at least this scheduler weight (GVT-g).")
@click.option("--dry-run", is_flag=True, help="Only show what would be chosen.")
@json_option
@reports_errors
def create(uuid: str | None, parent: str | None, type_id: str | None, attr: tuple[str, ...], resolution: str | None,
           min_memory: int | None, weight: int | None, dry_run: bool, json_output: bool) -> None:
    """Create an active (transient) vGPU, or let vgpuctl choose parent and type for a request."""
    from vgpuctl.mdev.choose import Request, choose, parse_resolution
    from vgpuctl.mdev.sysfs import parent_names, read_types

    choosing = resolution is not None or min_memory is not None or weight is not None
    if choosing and (parent or type_id):
        raise ValueError("give either -p/-t or a request (--resolution/--min-memory/--weight), not both")
    if not choosing and not (parent and type_id):
        raise ValueError("say what to create: -p PARENT -t TYPE, or --resolution WxH [--min-memory MiB]")
    reason = None
    if choosing:
        request = Request(parse_resolution(resolution) if resolution else None, min_memory, weight)
        types = [t for p in parent_names(State.root) for t in read_types(State.root, p)]
        if parent:
            types = [t for t in types if t.parent == parent]
        choice = choose(types, request)
        parent, type_id, reason = choice.chosen.parent, choice.chosen.type_id, choice.reason
        if not json_output:
            say(f"chose {type_id} on {parent}: {reason}")
        if dry_run:
            if json_output:
                print_json({"parent": parent, "type": type_id, "reason": reason, "rejected": choice.rejected})
            return
    elif dry_run:
        raise ValueError("--dry-run only applies when vgpuctl chooses (--resolution/--min-memory/--weight)")
    assert parent and type_id
    new = manager().create(parent, type_id, uuid, parse_attrs(attr))
    if json_output:
        print_json({"uuid": new, "parent": parent, "type": type_id, "reason": reason})
    else:
        say(new)


@click.command()
@required_uuid
@force_option
@reports_errors
def remove(uuid: str, force: bool) -> None:
    """Remove an active vGPU (only one vgpuctl created, unless --force)."""
    manager(force).remove(uuid)


# ---------------------------------------------------------------- definitions


@click.command()
@uuid_option
@parent_option
@type_option
@click.option("-a", "--auto", is_flag=True, help="Start automatically at boot.")
@attr_option
@reports_errors
def define(uuid: str | None, parent: str | None, type_id: str | None, auto: bool, attr: tuple[str, ...]) -> None:
    """Define a persistent vGPU in mdevctl's format (prints the UUID when none is given)."""
    definition = manager().define(uuid, parent, type_id, auto, parse_attrs(attr))
    if uuid is None:
        say(definition.uuid)


@click.command()
@required_uuid
@parent_option
@force_option
@reports_errors
def undefine(uuid: str, parent: str | None, force: bool) -> None:
    """Remove a definition (only one vgpuctl created, unless --force); active devices stay."""
    manager(force).undefine(uuid, parent)


@click.command()
@required_uuid
@parent_option
@type_option
@click.option("-a", "--auto", is_flag=True, help="Start automatically at boot.")
@click.option("-m", "--manual", is_flag=True, help="Start only when asked.")
@click.option("--addattr", metavar="NAME", help="Add an attribute (with --value; at --index, else last).")
@click.option("--value", help="Value of the attribute --addattr adds.")
@click.option("--delattr", is_flag=True, help="Delete the attribute at --index, else the last.")
@click.option("-i", "--index", type=int, help="Attribute position for --addattr/--delattr.")
@force_option
@reports_errors
def modify(uuid: str, parent: str | None, type_id: str | None, auto: bool, manual: bool, addattr: str | None,
           value: str | None, delattr: bool, index: int | None, force: bool) -> None:
    """Change a definition: type, start mode, attributes (mdevctl's semantics)."""
    if auto and manual:
        raise ValueError("--auto and --manual are mutually exclusive")
    if addattr is not None and value is None:
        raise ValueError("--addattr needs --value")
    if not (auto or manual or addattr or delattr or type_id):
        raise ValueError("nothing to modify: give -t, --auto/--manual, --addattr/--value or --delattr")
    manager(force).modify(uuid, parent, type_id, "auto" if auto else "manual" if manual else None,
                          (addattr, value) if addattr is not None and value is not None else None, delattr, index)


@click.command()
@uuid_option
@parent_option
@type_option
@reports_errors
def start(uuid: str | None, parent: str | None, type_id: str | None) -> None:
    """Start a defined vGPU (-u), or a transient one (-p -t); prints the UUID when none is given."""
    new = manager().start(uuid, parent, type_id)
    if uuid is None:
        say(new)


@click.command()
@required_uuid
@force_option
@reports_errors
def stop(uuid: str, force: bool) -> None:
    """Stop (remove) an active vGPU; its definition stays."""
    manager(force).stop(uuid)


@click.command()
@click.argument("parent", required=False)
@json_option
@reports_errors
def autostart(parent: str | None, json_output: bool) -> None:
    """Start every 'auto' definition (of PARENT, as udev passes it); already-active ones count as success."""
    results = manager().autostart(parent)
    if json_output:
        print_json([r.__dict__ for r in results])
    else:
        for r in results:
            line = f"{r.uuid} {r.parent} {r.type_id}: {r.status}" + (f" ({r.message})" if r.message else "")
            say(line)
    if any(r.status == "failed" for r in results):
        sys.exit(1)
