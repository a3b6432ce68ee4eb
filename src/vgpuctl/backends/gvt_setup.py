"""What Intel GVT-g needs of a host's boot configuration (kernel-mdev-gvt spec 4.2, 4.3): ``vgpuctl setup``
plans and applies it (vgpuctl.host.setup, on the one installer).

Parameters: ``i915.enable_gvt=1``, ``kvm.ignore_msrs=1`` (Windows guests), ``intel_iommu=on``; an
``i915.enable_guc`` that requests GuC submission (bit 0: 1, 3) loses that bit (1 -> 0, 3 -> 2: HuC loading
stays), as does ``i915.enable_guc_submission`` (<= 4.15), since GVT-g refuses to start with it. Modules at
boot: kvmgt, vfio_iommu_type1, mdev (and vfio_mdev, its own module up to 5.13).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vgpuctl.base.errors import VgpuError
from vgpuctl.host import facts
from vgpuctl.host.root import HostRoot
from vgpuctl.host.setup import FileEdit

BASE_MODULES = ("kvmgt", "vfio-iommu-type1", "mdev")
OLD_KERNEL_MODULES = ("vfio_mdev",)  # its own module up to 5.13 (spec 4.2)


def _asks_for_submission(param: str, number: int | None) -> bool:
    """Whether i915's enable_guc (a bitmask: 1 submission, 2 HuC) or enable_guc_submission asks for GuC
    submission, which GVT-g refuses ("Graphics virtualization is not yet supported with GuC submission")."""
    if number is None or number <= 0:
        return False
    return param == "enable_guc_submission" or bool(number & 1)


@dataclass(frozen=True)
class GvtSetup:
    subject: str = "Intel GVT-g (KVMGT)"
    params: tuple[str, ...] = ("i915.enable_gvt=1", "kvm.ignore_msrs=1", "intel_iommu=on")
    module_options: tuple[tuple[str, str, str, str], ...] = (("i915", "enable_gvt", "1", "CONFIG_DRM_I915"),
                                                             ("kvm", "ignore_msrs", "1", "CONFIG_KVM"))

    def modules(self, kernel: tuple[int, int] | None) -> list[str]:
        return [*BASE_MODULES, *(OLD_KERNEL_MODULES if kernel is not None and kernel < (5, 14) else ())]

    def cmdline_fix(self, token: str) -> str | None:
        key, number = facts.param_key(token), facts.as_int(facts.param_value(token))
        name = token.partition("=")[0]
        if key == "i915.enable_guc" and _asks_for_submission("enable_guc", number):
            return f"{name}={(number or 0) & ~1}"  # keep HuC loading (bit 1)
        if key == "i915.enable_guc_submission" and _asks_for_submission("enable_guc_submission", number):
            return f"{name}=0"
        return None

    def option_note(self, path: str, module: str, param: str, value: str) -> str | None:
        if module == "i915" and param in ("enable_guc", "enable_guc_submission") \
                and _asks_for_submission(param, facts.as_int(value)):
            return (f"{path} has 'options i915 {param}={value}', which asks for GuC submission: GVT-g then does "
                    "not start; remove it by hand")
        return None

    def reboot_reasons(self, root: HostRoot, edits: Sequence[FileEdit], running: str | None) -> list[str]:
        if any(e.role == "options" and b"i915" in (e.old or b"") + (e.new or b"") for e in edits) \
                and not _gvt_enabled_now(root, running):
            return ["i915 reads enable_gvt only when it loads, at boot"]
        return []

    def cmdline_notes(self, running: str) -> list[str]:
        if facts.cmdline_param(running, "nomodeset") is not None or facts.cmdline_param(running, "i915.modeset") == "0":
            return ["the running kernel has nomodeset or i915.modeset=0: i915 then does not drive the GPU and "
                    "GVT-g cannot start; remove it by hand if nothing needs it"]
        return []


def _gvt_enabled_now(root: HostRoot, running: str | None) -> bool:
    """Whether the running i915 was loaded with enable_gvt on (its parameter is root-only: else the cmdline)."""
    try:
        return facts.param_bool(root.read_value(root.module_parameter("i915", "enable_gvt"))) is True
    except OSError:
        value = facts.cmdline_param(running or "", "i915.enable_gvt")
        return value is not None and facts.param_bool(value or None) is True


GVT_SETUP = GvtSetup()


def gvt_wants(root: HostRoot) -> GvtSetup | None:
    """GVT-g's wants when the host's iGPU is one GVT-g supports (Broadwell ... Comet Lake), else None. An Intel
    SR-IOV iGPU (Gen12 and later) never is: its wants are the SR-IOV backend's."""
    from vgpuctl.backends.gvt_platforms import INTEL_VENDOR_ID, platform_for
    from vgpuctl.backends.sriov_intel import IGPU_ADDRESS
    from vgpuctl.host import pci

    try:
        igpu = pci.read_function(root, IGPU_ADDRESS)
    except VgpuError:
        return None
    platform = platform_for(igpu.device) if igpu.vendor == INTEL_VENDOR_ID and igpu.device is not None else None
    return GVT_SETUP if platform is not None and platform.gvt_supported else None
