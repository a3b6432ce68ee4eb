"""Profiles: documented sets of defaults for a kind of VM. Every value is a default the user overrides.

``vgpuctl vm create NAME --profile P [options]`` starts from the profile's values and applies the
options on top; the spec records the profile's name and every resulting value, so a later change
of a profile never changes an existing VM. ``vm edit NAME --profile P`` switches profile: the
fields a profile governs (:data:`PROFILE_FIELDS`) are reset to P's values, while the VM's disks,
cdrom, kernel, network, boot device and extra arguments stay.

No profile: 2048 MiB, 2 CPUs, SeaBIOS, user networking, no vGPU, an emulated VGA seen over VNC
on a unix socket.

``streaming`` — a headless VM whose screen is streamed:
    a vGPU of at least 1920x1200 (the chooser takes the smallest type that gives it), shown by QEMU
    (vgpu_display, ramfb for the boot screen), OpenGL through ``egl-headless`` (the dma-buf is
    copied back for the 2-D servers) and VNC on a unix socket in the VM's runtime directory;
    4096 MiB, 2 CPUs.

``gaming`` — one big Windows VM:
    the largest vGPU type that still fits on the host (most graphics memory), shown by QEMU with
    ramfb; SPICE on a local unix socket with OpenGL (view with ``remote-viewer spice+unix://...``);
    8192 MiB, 4 CPUs; Windows-friendly CPU flags
    ``-cpu host,kvm=off,hv_relaxed,hv_spinlocks=0x1fff,hv_vapic,hv_time`` (Hyper-V enlightenments:
    relaxed timing, spinlock retries 8191, virtual APIC, reference TSC clock; ``kvm=off`` hides the
    KVM signature from drivers that refuse to run in a VM); RTC in local time (Windows).
    SeaBIOS, because x-igd-opregion needs it (unmodified OVMF ignores the OpRegion).
    Requires the host setting ``kvm.ignore_msrs=1`` (Windows reads MSRs KVM does not emulate and
    would crash): ``requires`` is checked when the VM starts and shown by ``vm show``.

``automotive`` — several small VMs sharing one GPU (in-car consolidation):
    each a fixed 1024x768 screen: a vGPU of at least 1024x768, which the chooser satisfies with
    the smallest type (GVTg_V5_8 on GVT-g, up to 7 per GPU), and the same resolution as EDID
    xres/yres so the guest uses exactly it; its own local screen (``gtk`` with OpenGL; switch to
    ``sdl``, or to ``vnc``/``dbus`` to stream it); ramfb so the screen shows from power-on;
    fast boot (``-boot menu=off``, no PXE ROM; direct kernel boot when ``--kernel`` is given);
    1024 MiB, 1 CPU; start ``order`` 1 (give each VM its own with ``--order``: lower starts first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from vgpuctl.vm.spec import Display, VgpuRequest, VmSpec

GAMING_CPU = "host,kvm=off,hv_relaxed,hv_spinlocks=0x1fff,hv_vapic,hv_time"

# The fields a profile governs; the others (disks, cdrom, kernel, network, ...) belong to the VM.
PROFILE_FIELDS = ("memory_mib", "cpus", "cpu", "machine", "firmware", "fast_boot", "order", "autostart",
                  "rtc_localtime",
                  "vgpu", "vgpu_display", "ramfb", "igd_opregion", "display", "requires")


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    settings: Callable[[], dict[str, Any]]  # fresh values for some of PROFILE_FIELDS
    requires_note: str = ""


PROFILES: dict[str, Profile] = {
    "streaming": Profile(
        "streaming",
        "headless, streamed: >= 1920x1200 vGPU as the display, egl-headless + VNC on a unix socket",
        lambda: {"memory_mib": 4096, "cpus": 2, "vgpu": VgpuRequest(resolution="1920x1200"),
                 "vgpu_display": True, "ramfb": True, "display": Display(backend="egl-headless")},
    ),
    "gaming": Profile(
        "gaming",
        "one big Windows VM: the largest vGPU that fits, SPICE with OpenGL, Hyper-V CPU flags",
        lambda: {"memory_mib": 8192, "cpus": 4, "cpu": GAMING_CPU, "rtc_localtime": True,
                 "vgpu": VgpuRequest(largest=True), "vgpu_display": True, "ramfb": True,
                 "display": Display(backend="spice"), "requires": ["kvm.ignore_msrs=1"]},
        requires_note="kvm.ignore_msrs=1: Windows reads MSRs that KVM does not emulate",
    ),
    "automotive": Profile(
        "automotive",
        "small VMs sharing one GPU: fixed 1024x768 each, own local screen (gtk), fast boot, started in order",
        lambda: {"memory_mib": 1024, "cpus": 1, "fast_boot": True, "order": 1, "autostart": True,
                 "vgpu": VgpuRequest(resolution="1024x768"), "vgpu_display": True, "ramfb": True,
                 "display": Display(backend="gtk", resolution="1024x768")},
    ),
}


def os_settings(name: str, spec: VmSpec) -> dict[str, Any]:
    """What a guest OS needs, as spec fields (``vm create/edit --os``; the API's ``os``), whatever the profile.

    ``windows10``: Hyper-V enlightenments (``hyperv``: relaxed timing, virtual APIC, spinlock retries, VP
    index, runtime, SynIC and its timers, the reference TSC clock, frequencies), the RTC in local time.
    ``windows11``: those, and what its installer insists on: a TPM 2.0 (``tpm``, swtpm started with the VM),
    UEFI Secure Boot (``secure_boot``: q35 with SMM, Debian's OVMF_CODE_4M.ms.fd and a copy of its
    Microsoft-keyed variables) and at least 4096 MiB. Either way give the virtio-win driver ISO with
    ``drivers_cdrom`` (``--drivers-cdrom``) for the virtio disk and network, and set ``kvm.ignore_msrs=1``
    on the host (the VM's start warns when KVM has it off).
    """
    settings: dict[str, Any] = {"os": name, "hyperv": True, "rtc_localtime": True}
    if name == "windows11":
        settings |= {"machine": "q35", "firmware": "ovmf", "secure_boot": True, "tpm": True,
                     "memory_mib": max(spec.memory_mib, 4096)}
    return settings


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"no profile {name!r}; profiles: {', '.join(PROFILES)}") from None


def apply_profile(spec: VmSpec, name: str | None) -> VmSpec:
    """The spec with every profile-governed field set to profile ``name``'s value (or the base default), and
    its guest OS's settings on top again (a Windows 11 VM keeps its Secure Boot machine)."""
    base = VmSpec(spec.name)
    values = {f.name: getattr(base, f.name) for f in fields(VmSpec) if f.name in PROFILE_FIELDS}
    if name is not None:
        values.update(get(name).settings())
    if spec.os is not None:
        values.update(os_settings(spec.os, replace(spec, **values)))
    return replace(spec, profile=name, **values)


def new_spec(name: str, profile: str | None = None) -> VmSpec:
    return apply_profile(VmSpec(name), profile)
