"""NVIDIA vGPUs on the vendor-specific VFIO framework (Ada and later: L40S, H200; sriov.md 3): a vGPU is a VF
of the GPU, left on the ``nvidia`` driver (never rebound to vfio-pci, 3.4), whose type is set per VF just before
a VM starts (``nvidia/current_vgpu_type``) and released after it ends.

A VM asks for one with ``vgpu.vf`` (a VF, or the PF: a free VF that can take the type) and ``vgpu.type`` (the
numeric type id of ``creatable_vgpu_types``); its type is ``nvidia-vfio:<id>``. VFs are enabled with NVIDIA's
``sriov-manage -e`` (vgpuctl never writes their ``sriov_numvfs``).
"""

from __future__ import annotations

import errno as errnos
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vgpuctl.backends import NVIDIA_VENDOR_ID, Attachment, BackendDefaults, pci_attachment
from vgpuctl.base.errors import CapacityError, Conflict, KernelError, NotFound
from vgpuctl.host import HostRoot, pci

if TYPE_CHECKING:
    from vgpuctl.host.doctor import CheckSpec
    from vgpuctl.host.setup import SetupWants

RELEASE_ATTEMPTS = 10  # Proxmox's cleanup_pci_devices: up to 10 tries, one second apart
RELEASE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class VgpuType:
    id: int
    name: str  # e.g. "NVIDIA L40S-8Q"


def nvidia_pfs(root: HostRoot) -> list[pci.SriovPf]:
    """Every NVIDIA PCI function with the SR-IOV capability (a GPU of the vendor-specific VFIO framework, whatever
    its driver now; sriov.md 3.1: what NVIDIA's own tools look for)."""
    found = []
    for address in sorted(pci.sriov_pfs(root)):
        if pci.read_function(root, address).vendor == NVIDIA_VENDOR_ID:
            found.append(pci.read_pf(root, address))
    return found


def _nvidia_dir(root: HostRoot, vf: str) -> str:
    return f"{root.pci_device(pci.check_address(vf))}/nvidia"


def is_vendor_vf(root: HostRoot, vf: str) -> bool:
    """A VF of NVIDIA's vendor-specific VFIO: it has ``nvidia/current_vgpu_type`` (sriov.md 8)."""
    return root.exists(f"{_nvidia_dir(root, vf)}/current_vgpu_type")


def parse_creatable(text: str) -> list[VgpuType]:
    """``creatable_vgpu_types``: a header ("ID : vGPU Name"), then ``<id> : <name>`` lines (padding varies; a
    minority prints name then id: both are taken); non-numeric ids are skipped."""
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(":")
        if not sep:
            continue
        left, right = left.strip(), right.strip()
        if left.isdigit():
            found.append(VgpuType(int(left), right))
        elif right.isdigit():
            found.append(VgpuType(int(right), left))
    return found


def creatable_types(root: HostRoot, vf: str) -> list[VgpuType]:
    """The types this VF can take now (capacity-dependent: siblings' choices shrink it)."""
    try:
        return parse_creatable(root.read_text(f"{_nvidia_dir(root, vf)}/creatable_vgpu_types"))
    except FileNotFoundError:
        raise NotFound("{path} is not a VF of NVIDIA's vendor-specific VFIO (no nvidia/creatable_vgpu_types): "
                       "enable VFs with 'sriov-manage -e ALL'", what="VF", path=vf) from None


def current_type(root: HostRoot, vf: str) -> int:
    """The VF's vGPU type id, 0 for none."""
    return int(root.read_value(f"{_nvidia_dir(root, vf)}/current_vgpu_type").strip() or 0)


def _write(root: HostRoot, vf: str, value: int) -> None:
    path = f"{_nvidia_dir(root, vf)}/current_vgpu_type"
    try:
        root.write_text(path, f"{value}\n")
    except OSError as e:
        raise KernelError("{path}: the nvidia driver refused {value}: {strerror}", what="VF", path=path,
                          value=value, errno=e.errno) from e


def assign(root: HostRoot, vf: str, type_id: int) -> None:
    """Give the VF the vGPU type ``type_id`` (sriov.md 3.4: a free VF, write the id, read it back)."""
    now = current_type(root, vf)
    if now == type_id:
        return
    if now != 0:
        raise Conflict("VF {path} already holds vGPU type {now}: release it first", what="VF", path=vf, now=now)
    creatable = creatable_types(root, vf)
    if type_id not in {t.id for t in creatable}:
        offered = ", ".join(f"{t.id} ({t.name})" for t in creatable) or "none: the GPU is full"
        raise CapacityError("VF {path} cannot take vGPU type {type_id} now; creatable: {offered}", what="VF",
                            path=vf, type_id=str(type_id), offered=offered)
    try:
        _write(root, vf, type_id)
    except KernelError as e:
        if e.errno == errnos.EINVAL:  # taken by a sibling in between
            raise CapacityError("VF {path} cannot take vGPU type {type_id}: the driver refused it (EINVAL; "
                                "another VF's type changed what fits)", what="VF", path=vf,
                                type_id=str(type_id)) from e
        raise
    if current_type(root, vf) != type_id:
        raise KernelError("VF {path}: wrote vGPU type {type_id}, read back {back}", what="VF", path=vf,
                          type_id=str(type_id), back=current_type(root, vf), errno=errnos.EIO)


def release(root: HostRoot, vf: str, *, attempts: int = RELEASE_ATTEMPTS, interval_s: float = RELEASE_INTERVAL_S,
            sleep: Callable[[float], None] = time.sleep) -> bool:
    """Write 0 to the VF's type; EPERM while QEMU has it open or just after it closed it is retried
    (sriov.md 3.4). True once the VF reads 0; a KernelError(EPERM) after the last attempt."""
    for attempt in range(attempts):
        if current_type(root, vf) == 0:
            return True
        try:
            _write(root, vf, 0)
        except KernelError as e:
            if e.errno != errnos.EPERM:
                raise
            if attempt == attempts - 1:
                raise KernelError("VF {path} still in use after {attempts} attempts {interval_s:g} s apart (EPERM): "
                                  "is its VM's QEMU still running?", what="VF", path=vf, attempts=attempts,
                                  interval_s=interval_s, errno=errnos.EPERM) from e
            sleep(interval_s)
    return current_type(root, vf) == 0


TYPE_PREFIX = "nvidia-vfio:"  # a VM's vGPU type on such a VF: the prefix and the numeric type id


def type_name(type_id: int) -> str:
    return f"{TYPE_PREFIX}{type_id}"


def type_number(type_id: str) -> int:
    return int(type_id.removeprefix(TYPE_PREFIX))


class NvidiaVfio(BackendDefaults):
    name: str = "nvidia-vfio"
    guest_sleep: bool = False
    igd_opregion: bool = False
    without_kvm: str | None = None
    pci_function: bool = True
    no_display: str | None = None
    # None, not NVIDIA's: NVIDIA's mdev parents (time-sliced, before Ada) stay the generic mdev backend's.
    pci_vendor: int | None = None

    def attachment(self, address: str) -> Attachment:
        return pci_attachment(address)

    def claims_type(self, type_id: str) -> bool:
        return type_id.startswith(TYPE_PREFIX)

    def assign(self, root: HostRoot, address: str, type_id: str) -> None:
        assign(root, address, type_number(type_id))

    def release(self, root: HostRoot, address: str) -> None:
        release(root, address)

    def doctor_checks(self) -> tuple[CheckSpec, ...]:
        from vgpuctl.backends.sriov_nvidia_doctor import CHECKS

        return CHECKS

    def setup_wants(self, root: HostRoot) -> SetupWants | None:
        """The IOMMU on, for a host with an NVIDIA GPU with SR-IOV (its VFs are VFIO devices, each in an IOMMU
        group, 3.4); nothing else: nvidia loads by itself and its VFs stay on it. On an AMD host intel_iommu= is
        ignored (the AMD IOMMU is on by default)."""
        if not nvidia_pfs(root):
            return None
        from vgpuctl.host.setup import BootWants

        return BootWants("NVIDIA vGPU (vendor-specific VFIO)", ("intel_iommu=on",))


BACKEND = NvidiaVfio()
