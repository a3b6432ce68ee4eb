"""Machine-level decisions both renderers need (:mod:`vgpuctl.vm.argv`, :mod:`vgpuctl.vm.libvirt`): made once here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vgpuctl.vm.runtime import ResolvedVgpu
    from vgpuctl.vm.spec import VmSpec


def cpu(spec: VmSpec, accel: str) -> str:
    """QEMU's -cpu: the spec's, else the host's CPU under KVM (libvirt's domain is KVM) and 'max' under TCG."""
    return spec.cpu or ("host" if accel == "kvm" else "max")


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
