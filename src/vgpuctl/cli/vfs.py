"""``vgpuctl vfs``: Intel SR-IOV virtual functions — list, enable, disable (the backend does the work)."""

from __future__ import annotations

from typing import Any

import click

from vgpuctl.cli.app import State, print_json, reports_errors, say


def _state() -> Any:
    from vgpuctl.base.state import StateDir

    return StateDir.from_env(State.state_dir)


def _holders(state: Any) -> dict[str, str]:
    """VF address -> the VM vgpuctl runs on it."""
    from vgpuctl.vm.inventory import vf_holders

    return vf_holders(State.root, state)


@click.group("vfs", context_settings={"help_option_names": ["-h", "--help"]})
def vfs_group() -> None:
    """SR-IOV virtual functions (VFs) of Intel GPUs: each VF is a vGPU a VM gets whole."""


@vfs_group.command("list")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@reports_errors
def list_command(json_output: bool) -> None:
    """Intel GPUs with SR-IOV, their VFs, and which VM holds each."""
    from vgpuctl.vm.inventory import vf_listing

    rows = vf_listing(State.root, _state())
    if json_output:
        print_json({"pfs": rows})
        return
    if not rows:
        say("No Intel GPU with SR-IOV on this host.")
        return
    for row in rows:
        enabled = "?" if row["enabled_vfs"] is None else row["enabled_vfs"]
        by = ", enabled by vgpuctl" if row["enabled_by_vgpuctl"] else ""
        vendor = row.get("vendor_id", "8086")
        say(f"{row['pf']}  {row['driver'] or 'no driver'}  {vendor}:{row['device']}  VFs {enabled}/{row['total_vfs']}"
            f"{by}")
        if row["problem"]:
            say(f"  cannot make VFs: {row['problem']}")
        for vf in row["vfs"]:
            held = (f"VM {vf['vm']}" if vf["vm"] else "") or (f"open by {vf['opened_by']}" if vf["opened_by"]
                                                              else "free")
            kind = f"  type {vf['vgpu_type']['id']} ({vf['vgpu_type']['name'] or '?'})" if vf.get("vgpu_type") else ""
            say(f"  {vf['address']}  {vf['driver'] or 'no driver'}  {held}{kind}")


@vfs_group.command("enable")
@click.argument("pf")
@click.argument("count", type=int)
@click.option("--force", is_flag=True, help="Also replace VFs vgpuctl did not enable, or that are in use.")
@reports_errors
def enable_command(pf: str, count: int, force: bool) -> None:
    """Enable COUNT VFs on the GPU PF and give each to vfio-pci (xe-vfio-pci on Battlemage)."""
    from vgpuctl.backends import sriov_intel

    state = _state()
    done = sriov_intel.enable(State.root, state, pf, count, force=force, holders=_holders(state))
    say(f"{done.address}: {len(done.pf.vfs)} VFs enabled, on {done.vfio_driver}: "
        f"{', '.join(vf.address for vf in done.pf.vfs)}")


@vfs_group.command("disable")
@click.argument("pf")
@click.option("--force", is_flag=True, help="Also disable VFs vgpuctl did not enable, or that a VM holds.")
@click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True,
              help="Give up when the kernel has not finished after this many seconds.")
@reports_errors
def disable_command(pf: str, force: bool, timeout_s: float) -> None:
    """Turn off the VFs of the GPU PF (refused while a VM holds one)."""
    from vgpuctl.backends import sriov_intel

    state = _state()
    done = sriov_intel.disable(State.root, state, pf, force=force, holders=_holders(state), timeout_s=timeout_s)
    say(f"{done.address}: VFs disabled")
