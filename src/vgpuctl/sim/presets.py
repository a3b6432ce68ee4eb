"""What a simulated host is made of, and the named presets ``vgpuctl sim mount --preset`` offers."""

from __future__ import annotations

import errno
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vgpuctl.backends.gvt_platforms import DEFAULT_FENCES, DEFAULT_GGTT_MIB, INTEL_VENDOR_ID
from vgpuctl.sim.kernel import DEFAULT_KERNEL

APERTURES_MIB = (128, 256, 512, 1024, 2048)  # common BIOS "Aperture Size" options
READY_CMDLINE_FLAGS = "intel_iommu=on i915.enable_gvt=1 kvm.ignore_msrs=1"
# Modules whose loading registers mdev parents: the ones a host can boot without and load later
# (as when kvmgt is loaded from /etc/modules-load.d after udev has started).
DEFERRABLE_MODULES = ("kvmgt", "nvidia_vgpu_vfio", "mtty", "mdpy", "mbochs")
KCONFIG_FILES = ("boot", "proc", "none")


@dataclass(frozen=True)
class GpuSpec:
    """The GPU at 0000:00:02.0 (an Intel iGPU, or something else on a non-Intel host)."""

    vendor_id: int = INTEL_VENDOR_ID
    device_id: int = 0x3E92
    aperture_mib: int = 256
    ggtt_mib: int = DEFAULT_GGTT_MIB
    fences: int = DEFAULT_FENCES


@dataclass(frozen=True)
class SriovSpec:
    """An SR-IOV capable GPU and the [U] behaviours of its simulation (sriov.md 7).

    ``kind``: "i915" (i915-sriov-dkms on the iGPU: the PF is ``HostSpec.gpu`` at 0000:00:02.0), "i915-stock"
    (the same hardware under mainline i915: no sriov_configure), "nvidia" (vendor-specific VFIO, e.g. L40S).
    """

    kind: str  # (and "xe": the upstream xe driver on a dGPU, e.g. Arc Pro B60)
    address: str = "0000:00:02.0"
    device_id: int = 0  # 0: the iGPU's (HostSpec.gpu)
    vf_device_id: int = 0  # 0: the PF's (Intel VFs carry the PF's device id)
    pci_class: int = 0x030000
    vf_class: int = 0x038000  # "Display controller" [U: VF class codes]
    total_vfs: int = 7
    offset: int = 1
    stride: int = 1
    mmio_ok: bool = True  # False: pci_enable_sriov() fails ENOMEM "not enough MMIO resources for SR-IOV"
    block_timeout_s: float = 10.0  # a disable blocked by an open VF gives up with EINTR after this
    ggtt_free_mib: int = 3328  # i915: largest free GGTT hole before the 64 MiB spare (Intel's iGPU figure)
    pf_status_errno: int = 0  # i915: an enable fails with the PF's status: EBUSY (init in progress), EIO (wedged)
    numvfs_errno: int = errno.EPERM  # nvidia: a raw sriov_numvfs write without the unbind lock [U]
    release_delay_s: float = 0.3  # nvidia: current_vgpu_type=0 stays EPERM this long after the VF closes
    type_refused_errno: int = errno.EINVAL  # nvidia: current_vgpu_type = an id not creatable on the VF [U]
    type_change_errno: int = errno.EBUSY  # nvidia: current_vgpu_type = another id over a set one [U]
    model: str = ""  # nvidia: the vGPU type catalogue ("L40S", "H200")
    xe_has_sriov: bool = True  # xe: the platform's has_sriov (MTL/LNL: no)
    admin_store_errno: int = 0  # xe: what a well-formed sriov_admin profile write fails with (EPERM, EIO)
    admin_show_errno: int = 0  # xe: what a sriov_admin profile read fails with (EUCLEAN: the GTs disagree)
    # xe on a dGPU: its VRAM, and what pf_estimate_fair_lmem() keeps back for the PF before the fair shares
    # (xe_gt_sriov_pf_config.c: (VRAM - spare) / N, 2 MiB aligned) [U: the spare's default]; 0: no LMEM (iGPU)
    vram_mib: int = 0
    lmem_spare_mib: int = 128
    xe_force_probe: bool = False  # xe: the platform has require_force_probe (TGL, ADL, MTL): xe.force_probe=<id>

    # ---- what goes wrong around the driver (sriov.md 6: 1, 3, 8, 10), for the doctor; i915 kinds only.
    # [U] how each shows on a real host is modelled in sim/sriov_vendors.py (host_files, refused_modules).
    # dkms: "built" (i915-sriov-dkms for the running kernel), "missing" (built for an older kernel only, as after
    # a kernel update DKMS could not build for: the stock i915 loads), "wrong-kernel" (the running kernel's
    # updates/dkms holds a module of another kernel's vermagic: modprobe refuses it, no i915 at all).
    dkms: str = "built"
    secure_boot: bool = False  # the firmware's SecureBoot variable (efivarfs)
    # module_key: "enrolled" (signed with DKMS's key, enrolled as a MOK), "not-enrolled", "unsigned"; with
    # Secure Boot on, anything but "enrolled" is refused by the kernel ("Key was rejected by service").
    module_key: str = "enrolled"
    guc_firmware: bool = True  # /lib/firmware/i915/<platform>_guc_70.bin; without it: no GuC submission
    vgpu_driver: bool = True  # nvidia: NVIDIA's vGPU host driver (sriov-manage); False: a driver without vGPU


@dataclass(frozen=True)
class HostSpec:
    """Everything a simulated host is derived from. ``None`` fields are derived from the rest."""

    description: str
    kernel: str = DEFAULT_KERNEL
    gpu: GpuSpec | None = field(default_factory=GpuSpec)
    nvidia_gpus: int = 0
    samples: tuple[str, ...] = ()  # "mtty", "mdpy", "mbochs"
    cmdline: str | None = None
    modules: tuple[str, ...] | None = None
    # Kconfig symbols to force ("CONFIG_DRM_I915_GVT_KVMGT": "n"), on top of a GVT-ready config.
    kconfig: tuple[tuple[str, str], ...] = ()
    # Modules not loaded at boot, to be loaded later through the control file ("load kvmgt").
    defer: tuple[str, ...] = ()
    # VT-x / AMD-V enabled in the firmware: the CPU shows vmx/svm and kvm_intel/kvm_amd loads.
    virt: bool = True
    # Where the kernel configuration can be read: "boot" (/boot/config-<release>, Debian),
    # "proc" (/proc/config.gz, CONFIG_IKCONFIG_PROC) or "none" (only /lib/modules/<release>/modules.*).
    kconfig_file: str = "boot"
    sriov: SriovSpec | None = None

    def with_overrides(
        self,
        kernel: str | None = None,
        pci_id: str | None = None,
        aperture_mib: int | None = None,
        cmdline: str | None = None,
        modules: list[str] | None = None,
        kconfig: list[str] | None = None,
        defer: list[str] | None = None,
        virt: bool | None = None,
        kconfig_file: str | None = None,
        sriov: dict[str, Any] | None = None,
    ) -> HostSpec:
        spec = self
        if sriov:
            if spec.sriov is None:
                raise ValueError("this host has no SR-IOV GPU to override")
            spec = replace(spec, sriov=replace(spec.sriov, **sriov))
        if kernel is not None:
            spec = replace(spec, kernel=kernel)
        if pci_id is not None or aperture_mib is not None:
            gpu = spec.gpu or GpuSpec()
            if pci_id is not None:
                vendor_id, device_id = parse_pci_id(pci_id)
                gpu = replace(gpu, vendor_id=vendor_id, device_id=device_id)
            if aperture_mib is not None:
                if aperture_mib <= 0 or aperture_mib & (aperture_mib - 1):
                    raise ValueError(f"aperture must be a power of two in MiB (e.g. 256), got {aperture_mib}")
                gpu = replace(gpu, aperture_mib=aperture_mib)
            spec = replace(spec, gpu=gpu)
        if cmdline is not None:
            spec = replace(spec, cmdline=cmdline)
        if modules is not None:
            spec = replace(spec, modules=tuple(m for m in modules if m))
        if kconfig:
            pairs = []
            for item in kconfig:
                key, sep, value = item.partition("=")
                if not sep or not key.startswith("CONFIG_"):
                    raise ValueError(f"kconfig override must look like CONFIG_NAME=y|m|n, got {item!r}")
                pairs.append((key, value))
            spec = replace(spec, kconfig=spec.kconfig + tuple(pairs))
        if defer is not None:
            spec = replace(spec, defer=check_deferrable(defer))
        if virt is not None:
            spec = replace(spec, virt=virt)
        if kconfig_file is not None:
            if kconfig_file not in KCONFIG_FILES:
                raise ValueError(f"kconfig file must be one of {', '.join(KCONFIG_FILES)}, got {kconfig_file!r}")
            spec = replace(spec, kconfig_file=kconfig_file)
        return spec

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HostSpec:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            description=raw["description"],
            kernel=raw["kernel"],
            gpu=GpuSpec(**raw["gpu"]) if raw["gpu"] else None,
            nvidia_gpus=raw["nvidia_gpus"],
            samples=tuple(raw["samples"]),
            cmdline=raw["cmdline"],
            modules=tuple(raw["modules"]) if raw["modules"] is not None else None,
            kconfig=tuple((k, v) for k, v in raw["kconfig"]),
            defer=tuple(raw.get("defer", ())),
            virt=raw.get("virt", True),
            kconfig_file=raw.get("kconfig_file", "boot"),
            sriov=SriovSpec(**raw["sriov"]) if raw.get("sriov") else None,
        )


def check_deferrable(modules: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The modules to hold back at boot, each one that registers mdev parents when it loads."""
    chosen = tuple(dict.fromkeys(m.strip() for m in modules if m.strip()))
    wrong = [m for m in chosen if m not in DEFERRABLE_MODULES]
    if wrong:
        raise ValueError(f"cannot defer {', '.join(wrong)}: only modules that register mdev parents can be "
                         f"loaded later ({', '.join(DEFERRABLE_MODULES)})")
    return chosen


def parse_pci_id(text: str) -> tuple[int, int]:
    """``8086:3e92``, ``0x3E92`` or ``3e92`` (Intel assumed) -> (vendor, device)."""
    vendor, sep, device = text.partition(":")
    if not sep:
        vendor, device = f"{INTEL_VENDOR_ID:04x}", vendor
    try:
        return int(vendor, 16), int(device, 16)
    except ValueError:
        raise ValueError(f"PCI id must look like 8086:3e92 or 0x3e92, got {text!r}") from None


def _intel(device_id: int, description: str, aperture_mib: int = 256) -> HostSpec:
    return HostSpec(description, gpu=GpuSpec(device_id=device_id, aperture_mib=aperture_mib))


SRIOV_CMDLINE = "BOOT_IMAGE=/boot/vmlinuz-{release} root=/dev/sda1 ro quiet intel_iommu=on"
I915_SRIOV_FLAGS = "i915.enable_guc=3 i915.max_vfs=7 module_blacklist=xe"  # i915-sriov-dkms's README
SRIOV_MODULES = ("kvm", "kvm_intel", "vfio", "vfio_iommu_type1", "vfio_pci")


def _i915_sriov(device_id: int, description: str, kind: str = "i915", flags: str = I915_SRIOV_FLAGS) -> HostSpec:
    return HostSpec(description, gpu=GpuSpec(device_id=device_id), cmdline=f"{SRIOV_CMDLINE} {flags}",
                    modules=("i915", *SRIOV_MODULES), sriov=SriovSpec(kind))


def _nvidia_vfio(device_id: int, model: str, description: str) -> HostSpec:
    modules = (*SRIOV_MODULES, "nvidia", "nvidia_vgpu_vfio")
    return HostSpec(description, gpu=None, cmdline=SRIOV_CMDLINE, modules=modules,
                    sriov=SriovSpec("nvidia", address="0000:41:00.0", device_id=device_id, vf_device_id=device_id,
                                    pci_class=0x030200, vf_class=0x030200, total_vfs=32, offset=4, model=model))


def _xe(device_id: int, description: str, kernel: str = "6.19.0", total_vfs: int = 24, has_sriov: bool = True,
        address: str = "0000:03:00.0") -> HostSpec:
    modules = ("xe", *SRIOV_MODULES, "xe_vfio_pci")
    return HostSpec(description, kernel=kernel, gpu=None, cmdline=SRIOV_CMDLINE, modules=modules,
                    sriov=SriovSpec("xe", address=address, device_id=device_id, total_vfs=total_vfs,
                                    ggtt_free_mib=4032, xe_has_sriov=has_sriov,
                                    vram_mib=24576 if address != "0000:00:02.0" else 0))


PRESETS: dict[str, HostSpec] = {
    "coffeelake": _intel(0x3E92, "Coffee Lake UHD 630 (8086:3e92), 256 MiB aperture, GVT-g ready"),
    "coffeelake-1g": _intel(0x3E92, "Coffee Lake UHD 630, 1 GiB aperture: room for 7 small vGPUs", 1024),
    "coffeelake-bare": replace(
        _intel(0x3E92, "Coffee Lake before setup: no i915.enable_gvt, kvmgt not loaded"),
        cmdline="BOOT_IMAGE=/boot/vmlinuz-{release} root=/dev/sda1 ro quiet",
        modules=("i915", "kvm", "kvm_intel", "vfio"),
    ),
    "broadwell": _intel(0x1616, "Broadwell HD 5500 (8086:1616): GVTg_V4 types"),
    "skylake": _intel(0x1912, "Skylake HD 530 (8086:1912)"),
    "kabylake": _intel(0x5912, "Kaby Lake HD 630 (8086:5912)"),
    "cometlake": _intel(0x9BC5, "Comet Lake UHD 630 (8086:9bc5)"),
    "apollolake": _intel(0x5A85, "Apollo Lake HD 500 (8086:5a85)"),
    "geminilake": _intel(0x3185, "Gemini Lake UHD 600 (8086:3185): not supported by GVT-g"),
    "icelake": _intel(0x8A52, "Ice Lake Iris Plus (8086:8a52): not supported by GVT-g"),
    "tigerlake": _intel(0x9A49, "Tiger Lake Iris Xe (8086:9a49): not supported (SR-IOV generation)"),
    "alderlake": _intel(0x4680, "Alder Lake-S UHD 770 (8086:4680): not supported (SR-IOV generation)"),
    "amd": HostSpec(
        "AMD Radeon iGPU (1002:1638) at 0000:00:02.0 slot: no mdev types",
        gpu=GpuSpec(vendor_id=0x1002, device_id=0x1638),
    ),
    "samples": HostSpec(
        "the kernel's sample mdev drivers mtty, mdpy and mbochs, no GPU", gpu=None,
        samples=("mtty", "mdpy", "mbochs"),
    ),
    "nvidia-t4": HostSpec("one NVIDIA Tesla T4 with GRID T4-* types (time-sliced)", gpu=None, nvidia_gpus=1),
    "large": HostSpec(
        "8 NVIDIA Tesla T4 and a 1 GiB-aperture Coffee Lake (7 vGPUs): for benchmarks",
        gpu=GpuSpec(device_id=0x3E92, aperture_mib=1024),
        nvidia_gpus=8,
    ),
    "adl-sriov": _i915_sriov(0x4680, "Alder Lake-S UHD 770 (8086:4680) with i915-sriov-dkms: 7 VFs (00:02.1-7)"),
    "adl-sriov-noguc": _i915_sriov(0x4680, "Alder Lake-S with i915-sriov-dkms but no GuC submission: totalvfs 0",
                                   flags="i915.max_vfs=7 module_blacklist=xe"),
    "adl-sriov-nomaxvfs": _i915_sriov(0x4680, "Alder Lake-S with i915-sriov-dkms, i915.max_vfs unset: totalvfs 0",
                                      flags="i915.enable_guc=3 module_blacklist=xe"),
    "adl-stock-i915": _i915_sriov(0x4680, "Alder Lake-S under mainline i915: totalvfs 7, every write ENOENT",
                                  kind="i915-stock", flags="i915.enable_guc=3"),
    # Pains the doctor explains (sriov.md 6), on the ADL-S host of adl-sriov:
    "adl-sriov-newkernel": replace(_i915_sriov(0x4680, "Alder Lake-S after a kernel update DKMS did not build "
                                               "i915-sriov-dkms for: the stock i915 is loaded"),
                                   sriov=SriovSpec("i915", dkms="missing")),
    "adl-sriov-secureboot": replace(_i915_sriov(0x4680, "Alder Lake-S with Secure Boot on and i915-sriov-dkms "
                                                "unsigned: the kernel refuses it, no i915"),
                                    sriov=SriovSpec("i915", secure_boot=True, module_key="unsigned")),
    "n100-sriov": _i915_sriov(0x46D0, "Alder Lake-N (N100, 8086:46d0) with i915-sriov-dkms: 7 VFs"),
    "l40s-vfio": _nvidia_vfio(0x26B9, "L40S", "NVIDIA L40S (10de:26b9) on vendor-specific VFIO: 32 VFs, sriov-manage"),
    "h200-vfio": _nvidia_vfio(0x2335, "H200", "NVIDIA H200 (10de:2335) on vendor-specific VFIO: 32 VFs, sriov-manage"),
    "b60-xe": _xe(0xE211, "Intel Arc Pro B60 (8086:e211) under xe on 6.19: 24 VFs [U], sriov_admin, xe-vfio-pci"),
    "b580-xe": _xe(0xE20B, "Intel Arc B580 (8086:e20b) under xe: no SR-IOV capability, no sriov_* files",
                   total_vfs=0),
    "mtl-xe": _xe(0x7D55, "Meteor Lake (8086:7d55) under xe: 'Support for SR-IOV is not available', totalvfs 0",
                  total_vfs=7, has_sriov=False, address="0000:00:02.0"),
}
DEFAULT_PRESET = "coffeelake"


def preset(name: str) -> HostSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
