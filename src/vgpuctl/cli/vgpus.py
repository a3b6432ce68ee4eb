"""vGPU commands: gpus, types, list, create/remove, define/undefine/modify, start/stop, autostart."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from vgpuctl.base.errors import InvalidInput
from vgpuctl.cli.app import State, out, print_json, reports_errors, say

if TYPE_CHECKING:
    from rich.table import Table

    from vgpuctl.mdev.lifecycle import Manager
    from vgpuctl.mdev.report import GpuRow
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
    from vgpuctl.base.state import StateDir
    from vgpuctl.mdev.lifecycle import Manager

    return Manager(State.root, StateDir.from_env(State.state_dir), force=force)


def parse_attrs(items: tuple[str, ...]) -> list[tuple[str, str]]:
    attrs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidInput("attribute must look like NAME=VALUE, got {value!r}", what="attribute", value=item)
        attrs.append((name, value))
    return attrs


# ---------------------------------------------------------------- seeing the host


def types_table(types: list[MdevType]) -> Table:
    from rich.table import Table

    table = Table("parent", "type", "name", "available", "memory", "resolution", "details")
    for t in types:
        details = ", ".join(f"{k}={v}" for k, v in t.fields.items()
                            if k not in ("low_gm_mib", "high_gm_mib", "resolution", "max_resolution",
                                         "framebuffer_mib", "video_memory_mib", "memory_mib"))
        table.add_row(t.parent, t.type_id, t.name or "-", str(t.available_instances),
                      f"{t.memory_mib} MiB" if t.memory_mib else "-",
                      "x".join(map(str, t.resolution)) if t.resolution else
                      "emulated" if t.fields.get("display") == "emulated" else "-", details)
    return table


@click.command()
@json_option
@reports_errors
def gpus(json_output: bool) -> None:
    """Each mdev-capable GPU (address, vendor, platform, aperture, GVT-g pools, active vGPUs), then each SR-IOV
    GPU (VFs enabled, bound to VFIO, free; Intel's VF quotas, NVIDIA's types)."""
    from vgpuctl.mdev.report import gpus_rows

    every = gpus_rows(State.root, _held())
    if json_output:
        print_json(every)
        return
    rows = [row for row in every if "sriov" not in row]
    sriov = [row for row in every if "sriov" in row]
    if not every:
        say("no mdev-capable GPU on this host; 'vgpuctl doctor' says why")
        return
    if rows:
        _mdev_table(rows)
    if sriov:
        _sriov_table(sriov, bool(rows))


def _mdev_table(rows: list[GpuRow]) -> None:
    from rich.table import Table

    table = Table("parent", "vendor", "platform", "aperture", "low GM free", "high GM free", "fences free",
                  "vGPU ids free", "types", "active")
    for row in rows:
        pools = (row["pools"] or {}).values()
        free = [f"{p['free']}/{p['total']}{' ' + p['unit'] if p['unit'] else ''}" for p in pools] or ["-"] * 4
        device = f" {row['device_id']}" if row["device_id"] is not None else ""
        aperture = row["aperture_mib"]
        table.add_row(row["parent"], row["vendor"] + device, row["platform"] or "-",
                      f"{aperture} MiB" if aperture else "-", *free, str(row["types"]), str(len(row["active_vgpus"])))
    out().print(table)


def _held() -> set[str]:
    """The VFs VMs of vgpuctl's run on (a running VM's VF is not free even before QEMU opens it)."""
    from vgpuctl.base.state import StateDir
    from vgpuctl.vm.inventory import vf_holders

    return set(vf_holders(State.root, StateDir.from_env(State.state_dir)))


def _sriov_table(rows: list[GpuRow], after_mdev: bool) -> None:
    """The SR-IOV GPUs, after the mdev ones (printed at the end: the mdev table stays what it was)."""
    from rich.table import Table

    table = Table("PF", "vendor", "driver", "VFs", "on VFIO", "free", "held", "each VF / types", "problem",
                  title="SR-IOV GPUs" if after_mdev else None)
    for row in rows:
        info = row["sriov"]
        enabled = "?" if info["enabled_vfs"] is None else str(info["enabled_vfs"])
        if info["types"] is not None:
            offers = f"{len(info['types'])} types ({sum(1 for t in info['types'] if t['free_vfs'])} creatable now)"
        else:
            quotas = info["quotas"] or []
            first = quotas[0] if quotas else None
            same = all({k: v for k, v in q.items() if k != "vf"} == {k: v for k, v in first.items() if k != "vf"}
                       for q in quotas) if first else False
            parts = [f"{label} {first[key]}{unit}" for key, label, unit in
                     (("lmem_mib", "LMEM", " MiB"), ("ggtt_mib", "GGTT", " MiB"), ("contexts", "contexts", ""),
                      ("doorbells", "doorbells", "")) if first and first[key]]
            offers = (", ".join(parts) + ("" if same else " (VF1; others differ)")) if parts else "-"
        device = f" {row['device_id']}" if row["device_id"] is not None else ""
        table.add_row(row["parent"], row["vendor"] + device, f"{info['driver'] or '-'} → {info['vfio_driver']}",
                      f"{enabled}/{info['total_vfs']}", str(info["vfio_bound"]), str(info["free"]),
                      str(len(info["held"])), offers, info["problem"] or "-")
    if after_mdev:
        out().print()
    out().print(table)


@click.command("types")
@parent_option
@json_option
@reports_errors
def types_command(parent: str | None, json_output: bool) -> None:
    """Every vGPU type with its available instances and its description as fields."""
    from vgpuctl.mdev.report import read_all_types, type_row

    found = read_all_types(State.root, parent, _held())
    if json_output:
        print_json([type_row(t) for t in found])
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
    from vgpuctl.base.state import StateDir
    from vgpuctl.mdev.report import vgpu_listing

    selected, problems = vgpu_listing(State.root, StateDir.from_env(State.state_dir), defined_only=defined,
                                      active_only=active_only, parent=parent, uuid=uuid)
    for bad in problems:  # on stderr: the listing itself (and its JSON) stays what it was
        click.echo(f"warning: {bad.path} cannot be read ({bad.error}); fix or remove the file", err=True)
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
    from vgpuctl.mdev.choose import Request, choose_on_host, parse_resolution, require_creatable

    choosing = resolution is not None or min_memory is not None or weight is not None
    if choosing and (parent or type_id):
        raise InvalidInput("give either -p/-t or a request (--resolution/--min-memory/--weight), not both")
    if not choosing and not (parent and type_id):
        raise InvalidInput("say what to create: -p PARENT -t TYPE, or --resolution WxH [--min-memory MiB]")
    reason = None
    if choosing:
        request = Request(parse_resolution(resolution) if resolution else None, min_memory, weight)
        choice = choose_on_host(State.root, request, parent, _held())
        parent, type_id, reason = choice.chosen.parent, choice.chosen.type_id, choice.reason
        if not json_output:
            say(f"chose {type_id} on {parent}: {reason}")
        if dry_run:
            if json_output:
                print_json({"parent": parent, "type": type_id, "reason": reason, "rejected": choice.rejected})
            return
        require_creatable(choice)
    elif dry_run:
        raise InvalidInput("--dry-run only applies when vgpuctl chooses (--resolution/--min-memory/--weight)")
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
        raise InvalidInput("--auto and --manual are mutually exclusive")
    if addattr is not None and value is None:
        raise InvalidInput("--addattr needs --value")
    if not (auto or manual or addattr or delattr or type_id):
        raise InvalidInput("nothing to modify: give -t, --auto/--manual, --addattr/--value or --delattr")
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
