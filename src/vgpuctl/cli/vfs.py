"""``vgpuctl vfs``: SR-IOV virtual functions — list, enable, disable, provision (Intel), restore (at boot); the
backends do the work (sriov_intel, sriov_intel_provision, sriov_nvidia, vf_restore).

Every VF configuration vgpuctl makes is persistent: ``enable`` and ``provision`` write the PF's definition in
the state directory (vfs/<PF>.json) and ``vgpuctl-vfs.service`` (``vgpuctl install-units``) runs ``vfs restore``
at boot; ``disable`` sets the definition's count to 0 (Intel quotas stay defined until ``provision --auto``).
"""

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
    """SR-IOV virtual functions (VFs) of Intel and NVIDIA GPUs: each VF is a vGPU a VM gets whole."""


def _size(value: int, resource: str) -> str:
    from vgpuctl.backends.sriov_intel_provision import SIZE_RESOURCES, format_size

    return format_size(value) if resource in SIZE_RESOURCES else str(value)


def _quota_text(quota: dict[str, int] | None) -> str:
    if not quota or not any(quota.values()):
        return ""
    return "  " + " ".join(f"{r}={_size(v, r)}" for r, v in quota.items() if v)


@vfs_group.command("list")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
@reports_errors
def list_command(json_output: bool) -> None:
    """GPUs with SR-IOV, their VFs (quotas, NVIDIA type), which VM holds each, and what restore puts back."""
    from vgpuctl.vm.inventory import vf_listing

    rows = vf_listing(State.root, _state())
    if json_output:
        print_json({"pfs": rows})
        return
    if not rows:
        say("No GPU with SR-IOV on this host.")
        return
    for row in rows:
        enabled = "?" if row["enabled_vfs"] is None else row["enabled_vfs"]
        by = ", enabled by vgpuctl" if row["enabled_by_vgpuctl"] else ""
        vendor = row["vendor_id"]
        say(f"{row['pf']}  {row['driver'] or 'no driver'}  {vendor}:{row['device']}  VFs {enabled}/{row['total_vfs']}"
            f"{by}")
        if row["problem"]:
            say(f"  cannot make VFs: {row['problem']}")
        definition = row["definition"]
        if definition is not None:
            provisioned = definition["provisioned"]
            count = f"{definition['count']} VFs" if definition["count"] else "no VFs"
            quotas = f", quotas of VF{'s' if len(provisioned) > 1 else ''} {', '.join(provisioned)}" if provisioned \
                else ""
            say(f"  at boot: {count}{quotas}")
        if row["quotas"] and not row["vfs"]:  # only Intel PFs have quotas
            for number, quota in row["quotas"].items():
                say(f"  VF {number} (off){_quota_text(quota)}")
        for vf in row["vfs"]:
            held = (f"VM {vf['vm']}" if vf["vm"] else "") or (f"open by {vf['opened_by']}" if vf["opened_by"]
                                                              else "free")
            kind = f"  type {vf['vgpu_type']['id']} ({vf['vgpu_type']['name'] or '?'})" if vf.get("vgpu_type") else ""
            say(f"  {vf['address']}  {vf['driver'] or 'no driver'}  {held}{kind}{_quota_text(vf.get('quota'))}")


@vfs_group.command("enable")
@click.argument("pf")
@click.argument("count", type=int, required=False)
@click.option("--force", is_flag=True, help="Also replace VFs vgpuctl did not enable, or that are in use.")
@reports_errors
def enable_command(pf: str, count: int | None, force: bool) -> None:
    """Enable COUNT VFs on the GPU PF and give each to vfio-pci (xe-vfio-pci on Battlemage); on an NVIDIA GPU
    every VF, by sriov-manage -e (give no COUNT). Put back at boot by 'vgpuctl vfs restore'."""
    from vgpuctl.backends import vfs

    state = _state()
    done = vfs.enable(State.root, state, pf, count, force=force, holders=_holders(state))
    if done.by == "sriov-manage":
        say(f"{done.address}: {len(done.vfs)} VFs enabled by sriov-manage, on nvidia")
    else:
        say(f"{done.address}: {len(done.vfs)} VFs enabled, on {done.driver}: {', '.join(done.vfs)}")


@vfs_group.command("disable")
@click.argument("pf")
@click.option("--force", is_flag=True, help="Also disable VFs vgpuctl did not enable, or that a VM holds.")
@click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True,
              help="Give up when the kernel has not finished after this many seconds.")
@reports_errors
def disable_command(pf: str, force: bool, timeout_s: float) -> None:
    """Turn off the VFs of the GPU PF (refused while a VM holds one); none are put back at boot."""
    from vgpuctl.backends import vfs

    state = _state()
    address, by = vfs.disable(State.root, state, pf, force=force, holders=_holders(state), timeout_s=timeout_s)
    say(f"{address}: VFs disabled" + (" by sriov-manage" if by == "sriov-manage" else ""))


@vfs_group.command("provision")
@click.argument("pf")
@click.option("--vf", "vfs", multiple=True, metavar="N|N-M",
              help="The VFs to provision (repeatable; default: every VF of the PF).")
@click.option("--ggtt", metavar="SIZE", help="GGTT per VF (bytes, or with K/M/G).")
@click.option("--vram", "--lmem", "vram", metavar="SIZE",
              help="VRAM (local memory) per VF, discrete GPUs (bytes, or K/M/G).")
@click.option("--contexts", type=click.IntRange(min=0), help="GuC contexts per VF.")
@click.option("--doorbells", type=click.IntRange(min=0), help="GuC doorbells per VF.")
@click.option("--auto", "auto_shares", is_flag=True,
              help="Clear every quota: the driver gives each VF a fair share at enable (i915: auto_provisioning).")
@click.option("--force", is_flag=True, help="Also replace quotas vgpuctl did not set.")
@reports_errors
def provision_command(pf: str, vfs: tuple[str, ...], ggtt: str | None, vram: str | None, contexts: int | None,
                      doorbells: int | None, auto_shares: bool, force: bool) -> None:
    """Set the Intel VFs' shares of the GPU by hand, while the VFs are off (then: vgpuctl vfs enable PF N, which
    needs VFs 1..N all provisioned). Kept in the PF's definition and put back at boot by 'vgpuctl vfs restore'."""
    from vgpuctl.backends import sriov_intel_provision

    quotas = sriov_intel_provision.request(State.root, _state(), pf, vfs, ggtt=ggtt, vram=vram, contexts=contexts,
                                           doorbells=doorbells, auto_shares=auto_shares, force=force)
    if quotas is None:
        say(f"{pf}: quotas cleared; each VF gets the driver's fair share at enable")
        return
    for number, quota in quotas.items():
        if any(quota.values()):
            say(f"{pf} VF {number}:{_quota_text(quota)}")


@vfs_group.command("restore")
@click.option("--wait", "wait_s", type=float, default=0.0, show_default=True,
              help="Wait this many seconds for each PF's driver to bind (at boot, udev may still be loading it).")
@click.option("--force", is_flag=True, help="Also replace VFs and quotas vgpuctl did not make.")
@reports_errors
def restore_command(wait_s: float, force: bool) -> None:
    """Put back every VF configuration vgpuctl made (at boot: vgpuctl-vfs.service); already as defined: left
    alone. Exit status 1 when one could not be put back (the others still are)."""
    import sys

    from vgpuctl.backends import vf_restore

    state = _state()
    results = vf_restore.restore(State.root, state, force=force, wait_s=wait_s, holders=_holders(state))
    if not results:
        say("no VF definitions (vgpuctl vfs enable and vfs provision make them)")
    for result in results:
        say(result.line)
    if any(r.outcome == "failed" for r in results):
        sys.exit(1)
