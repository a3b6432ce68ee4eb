"""Machine-level decisions both renderers need (:mod:`vgpuctl.vm.argv`, :mod:`vgpuctl.vm.libvirt`): made once here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vgpuctl.vm.runtime import OVMF_CODE, OVMF_SECURE_CODE, OVMF_SECURE_VARS_TEMPLATE, OVMF_VARS_TEMPLATE

if TYPE_CHECKING:
    from vgpuctl.vm.runtime import ResolvedVgpu, RuntimePaths
    from vgpuctl.vm.spec import VmSpec


# Hyper-V enlightenments for Windows guests (QEMU's spelling; docs/system/i386/hyperv.rst): relaxed timing,
# virtual APIC, spinlock retries, VP index, runtime, SynIC and its timers, the reference TSC clock, frequencies.
HYPERV_FLAGS = ("hv_relaxed", "hv_vapic", "hv_spinlocks=0x1fff", "hv_vpindex", "hv_runtime", "hv_synic",
                "hv_stimer", "hv_time", "hv_frequencies")


def cpu(spec: VmSpec, accel: str) -> str:
    """QEMU's -cpu: the spec's, else the host's CPU under KVM (libvirt's domain is KVM) and 'max' under TCG;
    with ``hyperv`` under KVM the enlightenments the value does not already have (they are KVM's: under TCG
    QEMU refuses hv_vpindex)."""
    value = spec.cpu or ("host" if accel == "kvm" else "max")
    if spec.hyperv and accel == "kvm":
        have = {flag.partition("=")[0].replace("-", "_") for flag in value.split(",")[1:]}
        value += "".join(f",{flag}" for flag in HYPERV_FLAGS if flag.partition("=")[0] not in have)
    return value


def ovmf(spec: VmSpec) -> tuple[str, str]:
    """OVMF's code and its variables' template: the Secure Boot build or the plain one."""
    return (OVMF_SECURE_CODE, OVMF_SECURE_VARS_TEMPLATE) if spec.secure_boot else (OVMF_CODE, OVMF_VARS_TEMPLATE)


def nvram(spec: VmSpec, paths: RuntimePaths) -> Path:
    """The VM's copy of its OVMF variables (the lifecycle makes it from the template at first start)."""
    return paths.secure_nvram if spec.secure_boot else paths.nvram


def boot_order(spec: VmSpec) -> list[str]:
    """The firmware's boot devices in order ("disk", "cdrom"): a fresh empty disk falls through to the cdrom.
    Empty for a direct kernel boot."""
    if spec.boot == "disk":
        return ["disk", "cdrom"] if spec.cdrom else ["disk"]
    if spec.boot == "cdrom":
        return ["cdrom", "disk"] if spec.disks else ["cdrom"]
    return []


def guest_may_sleep(vgpu: ResolvedVgpu | None) -> bool:
    """Whether the guest may suspend (S3/S4): its vGPU's backend says (Intel's GVT-g guides disable both)."""
    return vgpu is None or vgpu.backend.guest_sleep
