"""What a simulated host is made of, and the named presets ``vgpuctl sim mount --preset`` offers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vgpuctl.host.platforms import DEFAULT_FENCES, DEFAULT_GGTT_MIB, INTEL_VENDOR_ID
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
    ) -> HostSpec:
        spec = self
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
}
DEFAULT_PRESET = "coffeelake"


def preset(name: str) -> HostSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
