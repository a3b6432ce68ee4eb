"""The doctor's checks for NVIDIA vGPUs on the vendor-specific VFIO framework (sriov.md 3, 6: 11-12): the GPU's
PF under NVIDIA's vGPU host driver (``nvidia`` with ``sriov-manage``), its VFs enabled and each still on
``nvidia`` with its ``nvidia/`` directory (a VF rebound to vfio-pci is broken until SR-IOV is cycled, 3.4) in an
IOMMU group, and something that enables them again at boot (VFs are runtime state, 3.2). "Not needed" on hosts
without an NVIDIA GPU with SR-IOV (time-sliced NVIDIA vGPUs are mdevs: the mdev-parents check)."""

from __future__ import annotations

from vgpuctl.backends import sriov_intel_doctor
from vgpuctl.backends.sriov_nvidia import nvidia_pfs
from vgpuctl.backends.vf_definitions import UNIT_NAME as VF_UNIT
from vgpuctl.host import pci
from vgpuctl.host.doctor import Check, CheckSpec, Context, Host, kernel_param_fix

NOT_APPLICABLE = "no NVIDIA GPU with SR-IOV"
DRIVER_FIX = ("Install NVIDIA's vGPU host driver for KVM (vGPU 17 or later on Linux 6.8+: the '-vgpu-kvm' .run "
              "package, or the distribution's nvidia-vgpu package), which binds the GPU and ships sriov-manage; then "
              "reboot.")
# Units that run sriov-manage -e at boot besides vgpuctl's (Proxmox: pve-nvidia-sriov@ALL.service; sriov.md 3.2).
OTHER_UNITS = ("pve-nvidia-sriov@", "nvidia-sriov-manage@")


def _pfs(ctx: Context) -> list[pci.SriovPf]:
    return ctx.facts(_read_pfs)


def _read_pfs(host: Host) -> list[pci.SriovPf]:
    return nvidia_pfs(host.root)


def _manage(ctx: Context, address: str, flag: str) -> str:
    return f"{ctx.host.root.nvidia_sriov_manage} {flag} {address}"


def check_nvidia_pf(ctx: Context, c: Check) -> None:
    host = ctx.host
    pfs = _pfs(ctx)
    if not pfs:
        c.not_applicable = NOT_APPLICABLE
        c.set("skip", "No NVIDIA GPU with the SR-IOV capability: NVIDIA's vendor-specific VFIO vGPUs are not "
                      "needed here.")
        return
    manage = host.exists(host.root.nvidia_sriov_manage)
    for pf in pfs:
        c.see(f"{host.root.pci_device(pf.address)}/driver", pf.function.driver or "none")
        c.see(f"{host.root.pci_device(pf.address)}/sriov_totalvfs", pf.total_vfs)
    c.see(host.root.nvidia_sriov_manage, "present" if manage else "absent")
    wrong = [pf for pf in pfs if pf.function.driver != "nvidia"]
    if wrong:
        pf = wrong[0]
        bound = f"is bound to {pf.function.driver}" if pf.function.driver else "has no driver"
        c.set("fail", f"{pf.address} {bound}: its vGPUs come from NVIDIA's vGPU host driver (nvidia), which must "
                      "own the PF and its VFs.", DRIVER_FIX)
        return
    if not manage:
        c.set("fail", "nvidia drives the GPU but it is not NVIDIA's vGPU host driver (no sriov-manage): the "
                      "data-center or GeForce driver makes no vGPUs.", DRIVER_FIX)
        return
    c.set("ok", "; ".join(f"{pf.address} under nvidia, up to {pf.total_vfs} VFs" for pf in pfs)
          + " (NVIDIA's vGPU host driver, with sriov-manage).")


def check_nvidia_vfs(ctx: Context, c: Check) -> None:
    host = ctx.host
    off, broken, no_group, ready = [], [], [], 0
    for pf in _pfs(ctx):
        c.see(f"{host.root.pci_device(pf.address)}/sriov_numvfs", "?" if pf.num_vfs is None else pf.num_vfs)
        if not pf.vfs:
            off.append(pf.address)
        for vf in pf.vfs:
            types = f"{host.root.pci_device(vf.address)}/nvidia/creatable_vgpu_types"
            if vf.driver != "nvidia" or not host.exists(types):
                why = "no nvidia/" if vf.driver == "nvidia" else vf.driver or "no driver"
                broken.append(f"{vf.address} ({why})")
            elif vf.iommu_group is None:
                no_group.append(vf.address)
            else:
                ready += 1
        if pf.vfs:
            first = pf.vfs[0]
            c.see(f"{host.root.pci_device(first.address)}/driver", first.driver or "none")
            c.see(f"{host.root.pci_device(first.address)}/nvidia", "present" if host.exists(
                f"{host.root.pci_device(first.address)}/nvidia/current_vgpu_type") else "absent")
    if broken:
        pf = next(p for p in _pfs(ctx) if any(b.startswith(v.address) for v in p.vfs for b in broken))
        c.set("fail", f"VFs not usable for vGPUs: {', '.join(broken[:4])}{' ...' if len(broken) > 4 else ''}. A VF "
                      "must stay on nvidia with its nvidia/ directory; one rebound to vfio-pci (or unbound) stays "
                      "broken until SR-IOV is cycled.",
              f"{_manage(ctx, pf.address, '-d')} && {_manage(ctx, pf.address, '-e')}  # no vGPU may be in use")
        return
    if no_group:
        c.set("fail", f"VFs without an IOMMU group ({', '.join(no_group[:4])}): the IOMMU is off, and QEMU opens a VF "
                      "only through its group.", kernel_param_fix(host, "intel_iommu=on"))
        return
    if off:
        c.set("warn", f"No VFs enabled on {', '.join(off)}: NVIDIA's vGPUs are VFs, so no VM can have one yet.",
              f"{_manage(ctx, off[0], '-e')}  # or ALL; enables every VF the GPU has (vgpuctl vfs enable, where it "
              "handles NVIDIA GPUs, does the same)")
        return
    ctx.kinds.append("NVIDIA vendor-VFIO")
    c.set("ok", f"{ready} VF{'s' if ready != 1 else ''} on nvidia, each with nvidia/ and an IOMMU group: a VM's "
                "vGPU type is set on a free one when it starts.")


def check_nvidia_boot(ctx: Context, c: Check) -> None:
    host = ctx.host
    enabled = [f"{pf.address}: {pf.num_vfs}" for pf in _pfs(ctx) if pf.num_vfs]
    base = host.root.etc_systemd_system
    others = [f"{d}/{n}" for d in host.listdir(base) or [] if d.endswith(".wants")
              for n in host.listdir(f"{base}/{d}") or [] if n.startswith(OTHER_UNITS)]
    if enabled and others:
        c.see(base, ", ".join(others))
        c.set("ok", f"{others[0].split('/')[-1]} enables the VFs again at boot.")
        return
    sriov_intel_doctor.persistence(host, c, enabled, "install vgpuctl's VF boot unit "
                                   f"({VF_UNIT} in {base}), or enable a unit that runs "
                                   f"'{host.root.nvidia_sriov_manage} -e ALL' at boot (Proxmox: systemctl enable "
                                   "pve-nvidia-sriov@ALL.service)")


CHECKS = (
    CheckSpec("nvidia-pf", "NVIDIA GPU with SR-IOV under NVIDIA's vGPU host driver (sriov-manage)", check_nvidia_pf),
    CheckSpec("nvidia-vfs", "VFs enabled, on nvidia, each with nvidia/ and an IOMMU group", check_nvidia_vfs,
              ("nvidia-pf",)),
    CheckSpec("nvidia-boot", "VFs enabled again at boot", check_nvidia_boot, ("nvidia-pf",)),
)
