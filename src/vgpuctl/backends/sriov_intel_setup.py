"""What Intel SR-IOV VFs need of a host's boot configuration (sriov.md 2.1, 2.2, 2.6): ``vgpuctl setup`` plans
and applies it as it does GVT-g's (vgpuctl.host.setup, on the one installer).

An iGPU whose SR-IOV comes from i915-sriov-dkms (Tiger Lake ... Arrow Lake, N100: :data:`I915_DKMS_PLATFORMS`;
xe's SR-IOV there is experimental or absent, sriov.md 0.1) gets i915-sriov-dkms's README line:
``intel_iommu=on i915.enable_guc=3 i915.max_vfs=7 module_blacklist=xe`` (i915_params.c: ``max_vfs`` defaults
to 0, no VFs; ``enable_guc`` is a bitmask, 1 GuC submission, which a PF needs, 2 HuC loading); the two i915
options also in modprobe.d, where an i915 reloaded after ``dkms install`` (no reboot) finds them; and
vfio-pci at boot, the VFs' driver. A discrete GPU under xe (Arc Pro B50/B60: ``xe.max_vfs`` defaults to
unlimited) needs only ``intel_iommu=on`` and its VFs' VFIO driver (xe-vfio-pci on Battlemage and Panther
Lake, sriov.md 0.1).

Keeping the host's i915/xe off the VFs is not boot configuration: the kernel has no per-VF switch at boot,
and matching VFs by id (``vfio-pci.ids=``, a udev rule) catches the PF too, as a VF's device id is its PF's
(sriov.md 1.5). ``vgpuctl vfs enable`` does it at each enable (``sriov_drivers_autoprobe=0``, then
``driver_override`` per VF, 2.6); the VF boot unit repeats that at boot. ``iommu=pt`` is not set: none of
sriov.md's sources asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vgpuctl.backends.sriov_intel import I915_DKMS_PLATFORMS, IGPU_ADDRESS, intel_pfs
from vgpuctl.host import facts, pci
from vgpuctl.host.root import HostRoot
from vgpuctl.host.setup import BootWants, FileEdit

I915_PARAMS = ("intel_iommu=on", "i915.enable_guc=3", "i915.max_vfs=7", "module_blacklist=xe")
XE_PARAMS = ("intel_iommu=on",)
I915_OPTIONS = (("i915", "max_vfs", "7", "CONFIG_DRM_I915"), ("i915", "enable_guc", "3", "CONFIG_DRM_I915"))
STOCK_I915_NOTE = ("the loaded i915 is the stock one (no max_vfs parameter): these settings make VFs only once "
                   "i915-sriov-dkms is installed for this kernel (see 'vgpuctl doctor', sriov-dkms)")


@dataclass(frozen=True)
class IntelSriovSetup(BootWants):
    """i915-sriov-dkms's parameters and options (``i915``), or xe's (a dGPU's: the IOMMU only)."""

    i915: bool = True

    def cmdline_fix(self, token: str) -> str | None:
        """``module_blacklist`` naming i915 keeps i915-sriov-dkms from loading: i915 out, xe in."""
        if not self.i915 or facts.param_key(token) != "module_blacklist":
            return None
        names = [n for n in (facts.param_value(token) or "").split(",") if n]
        if "i915" not in names:
            return None
        kept = [n for n in names if n != "i915"]
        return f"{token.partition('=')[0]}={','.join([*kept, *(['xe'] if 'xe' not in kept else [])])}"

    def option_note(self, path: str, module: str, param: str, value: str) -> str | None:
        if module == "xe" and param == "max_vfs" and facts.as_int(value) == 0:
            return f"{path} has 'options xe max_vfs=0', which leaves xe no VFs to make; remove it by hand"
        return None

    def reboot_reasons(self, root: HostRoot, edits: Sequence[FileEdit], running: str | None) -> list[str]:
        if not self.i915 or not any(e.role == "options" for e in edits):
            return []
        try:
            now = root.read_value(root.module_parameter("i915", "max_vfs"))
        except OSError:
            now = None
        if facts.as_int(now) == 7:
            return []
        return ["i915 reads max_vfs and enable_guc only when it loads, at boot"]


def sriov_wants(root: HostRoot) -> IntelSriovSetup | None:
    """The wants of this host's Intel SR-IOV GPUs, None if it has none: i915-sriov-dkms's when an iGPU of its
    platforms is there (with or without the SR-IOV files: the stock i915 or no driver), else xe's."""
    from vgpuctl.backends.gvt_platforms import INTEL_VENDOR_ID, platform_for
    from vgpuctl.base.errors import VgpuError

    pfs = intel_pfs(root)
    try:
        igpu = pci.read_function(root, IGPU_ADDRESS)
    except VgpuError:
        igpu = None
    platform = platform_for(igpu.device) if igpu and igpu.vendor == INTEL_VENDOR_ID and igpu.device else None
    dkms_igpu = platform is not None and platform.name.split(" (")[0] in I915_DKMS_PLATFORMS
    if dkms_igpu:
        stock = root.exists(root.sys_module("i915")) and not root.exists(root.module_parameter("i915", "max_vfs"))
        return IntelSriovSetup("Intel SR-IOV VFs (i915-sriov-dkms)", I915_PARAMS, I915_OPTIONS, ("vfio-pci",),
                               (STOCK_I915_NOTE,) if stock else ())
    if not pfs:
        return None
    drivers = sorted({pf.vfio_driver for pf in pfs}, key=lambda d: d != "vfio-pci")
    return IntelSriovSetup("Intel SR-IOV VFs (xe)", XE_PARAMS, (), tuple(drivers), i915=False)
