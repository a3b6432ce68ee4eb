"""Intel GVT-g vGPUs (``i915-GVTg_*`` types of a Broadwell ... Comet Lake iGPU): their backend.

What a GVT-g vGPU needs of a VM (KVM, the OpRegion, no guest sleep) is here; its capacity model (the shared
pools, :mod:`.gvt_capacity`), its PCI id tables (:mod:`.gvt_platforms`), doctor checks and setup are modules
of their own, loaded when asked for: a VM start on a GVT-g vGPU needs none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vgpuctl.backends import INTEL_VENDOR_ID, Attachment, BackendDefaults, Capacity, mdev_attachment
from vgpuctl.host import HostRoot
from vgpuctl.mdev.sysfs import MdevType

if TYPE_CHECKING:
    from vgpuctl.host.doctor import CheckSpec
    from vgpuctl.host.setup import SetupWants


TYPE_PREFIX = "i915-GVTg_"  # i915's gvt/kvmgt.c names its types "i915-" + the GVT type name (GVTg_V5_4 ...)


class GvtG(BackendDefaults):
    name: str = "gvt-g"
    guest_sleep: bool = False  # as Intel's GVT-g guides: no guest S3/S4
    igd_opregion: bool = True  # the guest's Intel driver wants the OpRegion
    # kvmgt attaches a vGPU to its VM through KVM (i915's gvt/kvmgt.c): no KVM, no vGPU.
    without_kvm: str | None = ("GVT-g needs KVM: under TCG QEMU cannot open the vGPU (\"KVM is required to use "
                               "Intel vGPU\")")
    pci_function: bool = False  # mdev devices, by UUID
    no_display: str | None = None
    pci_vendor: int | None = INTEL_VENDOR_ID  # its parents are Intel iGPUs

    def attachment(self, uuid: str) -> Attachment:
        return mdev_attachment(uuid)

    def claims_type(self, type_id: str) -> bool:
        return type_id.startswith(TYPE_PREFIX)

    def platform(self, vendor_id: int | None, device_id: int | None) -> str | None:
        if vendor_id != self.pci_vendor or device_id is None:
            return None
        from vgpuctl.backends.gvt_platforms import platform_for  # loads the PCI id tables: only when asked

        found = platform_for(device_id)
        return found.name.split(" (")[0] if found else None

    def capacity(self, root: HostRoot, parent: str, types: list[MdevType]) -> Capacity | None:
        from vgpuctl.backends.gvt_capacity import gvt_capacity

        return gvt_capacity(root, parent, types)

    def doctor_checks(self) -> tuple[CheckSpec, ...]:
        from vgpuctl.backends.gvt_doctor import CHECKS

        return CHECKS

    def setup_wants(self, root: HostRoot) -> SetupWants | None:
        from vgpuctl.backends.gvt_setup import gvt_wants

        return gvt_wants(root)


BACKEND = GvtG()
