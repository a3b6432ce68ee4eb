"""The doctor's checks for Intel SR-IOV VFs (sriov.md 2.2, 2.6, 6): an Intel GPU with the SR-IOV capability and
a driver that makes VFs (i915-sriov-dkms or xe, not the stock i915), i915.max_vfs and GuC submission, and the
VFs on vfio-pci rather than on the host's i915/xe. "Not needed" on hosts without an Intel SR-IOV GPU."""

from __future__ import annotations

from vgpuctl.backends import sriov_intel
from vgpuctl.host import facts
from vgpuctl.host.doctor import GRUB_ADD, Check, CheckSpec, Context, see_param

DKMS_FIX = ("Install i915-sriov-dkms (github.com/strongtz/i915-sriov-dkms: 'dkms install' of its release, or the "
            "distribution's package), keep xe off the iGPU (module_blacklist=xe), then set "
            f"{sriov_intel.SETUP_FLAGS} (vgpuctl setup) and reboot.")


def _pfs(ctx: Context) -> list[sriov_intel.IntelPf]:
    return sriov_intel.intel_pfs(ctx.host.root)


def check_sriov_pf(ctx: Context, c: Check) -> None:
    host = ctx.host
    pfs = _pfs(ctx)
    if not pfs:
        c.not_applicable = "no Intel GPU with SR-IOV"
        c.set("skip", "No Intel GPU with the SR-IOV capability (no sriov_totalvfs on an Intel PCI function): "
                      "Intel SR-IOV VFs are not needed here.")
        return
    bad = []
    for pf in pfs:
        base = host.root.pci_device(pf.address)
        c.see(f"{base}/driver", pf.driver or "none")
        c.see(f"{base}/sriov_totalvfs", pf.pf.total_vfs)
        if pf.driver == "i915":
            param = host.root.module_parameter("i915", "max_vfs")
            c.see(param, "present (i915-sriov-dkms)" if host.exists(param) else "absent: the stock i915")
        if pf.driver is None or pf.driver not in sriov_intel.PF_DRIVERS or (
                pf.problem and "stock" in pf.problem):
            bad.append(pf)
    if bad:
        pf = bad[0]
        fix = DKMS_FIX if pf.driver == "i915" else (
            "Load i915-sriov-dkms (Alder/Raptor Lake, N100) or xe (Battlemage, Panther Lake) for the GPU.")
        c.set("fail", f"{pf.address}: {pf.problem}.", fix)
        return
    c.set("ok", "; ".join(f"{pf.address} under {pf.driver} can make VFs (" + (
        f"up to {pf.pf.total_vfs} allowed now)" if pf.pf.total_vfs else "none allowed now: see sriov-params)")
        for pf in pfs) + ".")


def check_sriov_params(ctx: Context, c: Check) -> None:
    host = ctx.host
    problems = []
    for pf in _pfs(ctx):
        if pf.driver == "i915":
            _, _, max_vfs = see_param(host, c, "i915", "max_vfs")
            _, _, guc = see_param(host, c, "i915", "enable_guc")
            c.see(host.root.module_parameter("i915", "max_vfs"), max_vfs)
            c.see(host.root.module_parameter("i915", "enable_guc"), guc)
            guc_value = facts.as_int(guc)
            if not facts.as_int(max_vfs):
                problems.append("i915.max_vfs is 0: i915 makes no VFs")
            if guc_value is None or guc_value < 0 or not guc_value & 1:
                problems.append(f"GuC submission is off (i915.enable_guc={guc}): the PF cannot run VFs")
        elif pf.pf.total_vfs == 0:
            problems.append(f"{pf.address}: xe allows no VFs (xe.max_vfs=0, or no SR-IOV on this platform)")
        c.see(f"{host.root.pci_device(pf.address)}/sriov_totalvfs", pf.pf.total_vfs)
    if problems:
        # vgpuctl setup writes GVT-g's command line only, not yet these: by hand.
        c.set("fail", "; ".join(problems) + ".", "add them to the kernel command line (with i915-sriov-dkms):\n"
              + GRUB_ADD.format(param=sriov_intel.SETUP_FLAGS))
        return
    c.set("ok", "The PF drivers' parameters allow VFs (i915: max_vfs > 0 and GuC submission; xe: max_vfs).")


def check_sriov_vfs(ctx: Context, c: Check) -> None:
    host = ctx.host
    on_host, ready = [], 0
    for pf in _pfs(ctx):
        c.see(f"{host.root.pci_device(pf.address)}/sriov_numvfs", "?" if pf.pf.num_vfs is None else pf.pf.num_vfs)
        for vf in pf.pf.vfs:
            c.see(f"{host.root.pci_device(vf.address)}/driver", vf.driver or "none")
            if vf.driver in sriov_intel.VFIO_DRIVERS:
                ready += 1
            else:
                on_host.append((pf, vf.address, vf.driver))
    if on_host:
        pf = on_host[0][0]
        c.set("fail", "VFs bound to a host driver instead of vfio-pci (QEMU cannot open them; autoprobe gave them "
                      "to i915/xe): " + ", ".join(f"{a} ({d or 'no driver'})" for _, a, d in on_host) + ".",
              f"vgpuctl vfs enable {pf.address} {len(pf.pf.vfs)} --force  # rebinds every VF to {pf.vfio_driver} "
              "by driver_override")
        return
    ctx.kinds.append("Intel SR-IOV")
    if not ready:
        pf = _pfs(ctx)[0]
        c.set("ok", f"No VFs enabled yet: 'vgpuctl vfs enable {pf.address} N' makes N of them for VMs.")
        return
    c.set("ok", f"{ready} VF{'s' if ready > 1 else ''} on a VFIO driver, ready for VMs ('vgpuctl vfs list').")


CHECKS = (
    CheckSpec("sriov-pf", "Intel GPU with SR-IOV and a driver that makes VFs (i915-sriov-dkms or xe)",
              check_sriov_pf),
    CheckSpec("sriov-params", "i915.max_vfs and GuC submission (i915.enable_guc)", check_sriov_params,
              ("sriov-pf",)),
    CheckSpec("sriov-vfs", "VFs bound to vfio-pci, not to the host's i915/xe", check_sriov_vfs, ("sriov-params",)),
)
