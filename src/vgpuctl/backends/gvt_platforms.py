"""What the kernel knows about Intel iGPUs and GVT-g: platforms by PCI id, the vGPU type table.

The data lives in ``data/gvt-platforms.json`` (a copy of the project's spec file, with its
sources); this module gives it types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from vgpuctl.backends import INTEL_VENDOR_ID

__all__ = ["INTEL_VENDOR_ID"]  # for the simulator, which builds Intel devices from these tables
# GVT-g host reservations and limits (drivers/gpu/drm/i915/gvt/gvt.h): compile-time constants.
HOST_LOW_GM_MIB = 128
HOST_HIGH_GM_MIB = 384
HOST_FENCES = 4
MAX_VGPUS_PER_GPU = 7  # idr ids 1..7; id 0 is the idle vGPU
DEFAULT_GGTT_MIB = 4096
DEFAULT_FENCES = 32


@dataclass(frozen=True)
class GvtTypeSpec:
    """One row of GVT-g's fixed vGPU type table (vgpu.c)."""

    suffix: str
    low_gm_mib: int
    high_gm_mib: int
    fences: int
    weight: int | None
    resolution: str | None

    def name(self, graphics_ver: int) -> str:
        return f"GVTg_V{4 if graphics_ver == 8 else 5}_{self.suffix}"


@dataclass(frozen=True)
class Platform:
    """An Intel graphics platform and whether (and since which kernel) GVT-g supports it."""

    name: str
    short: str
    graphics_ver: int
    gvt_supported: bool
    pci_ids: frozenset[int]
    # First kernel whose GVT-g accepts this platform (None: never).
    gvt_since: tuple[int, int] | None = None
    # Kaby Lake on 4.12 accepted one id only.
    gvt_partial: tuple[tuple[int, int], frozenset[int]] | None = None

    def gvt_supported_on(self, kernel: tuple[int, int], pci_id: int) -> bool:
        if not self.gvt_supported or self.gvt_since is None:
            return False
        if kernel >= self.gvt_since:
            return True
        if self.gvt_partial and kernel >= self.gvt_partial[0]:
            return pci_id in self.gvt_partial[1]
        return False


# Release in which intel_gvt.c's is_supported_device() gained each platform
# (spec: kernel-mdev-gvt.md 3.1; BXT "~4.17" and CML are unverified there).
_GVT_SINCE: dict[str, tuple[int, int]] = {
    "IS_BROADWELL": (4, 10),
    "IS_SKYLAKE": (4, 10),
    "IS_KABYLAKE": (4, 13),
    "IS_BROXTON": (4, 17),
    "IS_COFFEELAKE": (5, 1),
    "IS_COMETLAKE": (5, 5),
}
_SHORT = {
    "IS_BROADWELL": "BDW",
    "IS_SKYLAKE": "SKL",
    "IS_KABYLAKE": "KBL",
    "IS_BROXTON": "BXT",
    "IS_COFFEELAKE": "CFL",
    "IS_COMETLAKE": "CML",
}


@cache
def _data() -> dict[str, Any]:
    from importlib import resources  # on first use: importlib.resources is slow to import

    text = resources.files("vgpuctl").joinpath("data/gvt-platforms.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def _ids(raw: list[str]) -> frozenset[int]:
    return frozenset(int(x, 16) for x in raw)


@cache
def platforms() -> tuple[Platform, ...]:
    data = _data()
    found: list[Platform] = []
    for entry in data["platforms_supported"]:
        macro = entry["i915_macro"]
        partial = ((4, 12), frozenset({0x591D})) if macro == "IS_KABYLAKE" else None
        found.append(
            Platform(
                name=entry["platform"],
                short=_SHORT[macro],
                graphics_ver=entry["graphics_ver"],
                gvt_supported=True,
                pci_ids=_ids(entry["pci_ids"]),
                gvt_since=_GVT_SINCE[macro],
                gvt_partial=partial,
            )
        )
    for entry in data["platforms_not_supported"]:
        found.append(
            Platform(
                name=entry["platform"],
                short=entry["platform"].split(" ")[0].upper(),
                graphics_ver=entry["graphics_ver"],
                gvt_supported=False,
                pci_ids=_ids(entry["pci_ids"]),
            )
        )
    return tuple(found)


def platform_for(pci_device_id: int) -> Platform | None:
    """The Intel platform of a PCI device id, or None if the id is not an Intel iGPU we know."""
    for platform in platforms():
        if pci_device_id in platform.pci_ids:
            return platform
    return None


@cache
def gvt_types(kernel: tuple[int, int] = (6, 0)) -> tuple[GvtTypeSpec, ...]:
    """GVT-g's type table as a kernel of that version has it (4.10 had another scheme)."""
    data = _data()
    if kernel < (4, 11):
        return tuple(
            GvtTypeSpec(
                suffix=t["name"].rsplit("_", 1)[1],
                low_gm_mib=t["low_gm_MiB"],
                high_gm_mib=t["high_gm_MiB"],
                fences=t["fence"],
                weight=None,
                resolution=None,
            )
            for t in data["vgpu_type_scheme_4_10"]["types"]
        )
    return tuple(
        GvtTypeSpec(
            suffix=t["suffix"],
            low_gm_mib=t["low_gm_MiB"],
            high_gm_mib=t["high_gm_MiB"],
            fences=t["fence"],
            weight=t["weight"] if kernel >= (4, 12) else None,
            resolution=t["resolution"],
        )
        for t in data["vgpu_type_table"]["types"]
    )


def gvt_description(spec: GvtTypeSpec) -> str:
    """The exact ``description`` text of a GVT-g type (3, 4 or 5 lines by kernel era)."""
    lines = [
        f"low_gm_size: {spec.low_gm_mib}MB",
        f"high_gm_size: {spec.high_gm_mib}MB",
        f"fence: {spec.fences}",
    ]
    if spec.resolution is not None:
        lines.append(f"resolution: {spec.resolution}")
    if spec.weight is not None:
        lines.append(f"weight: {spec.weight}")
    return "".join(line + "\n" for line in lines)


def worked_examples() -> dict[str, Any]:
    """The spec's worked examples of available_instances (used by tests)."""
    examples: dict[str, Any] = _data()["worked_examples"]
    return examples
