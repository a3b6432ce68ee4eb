"""vGPU backends: what each kind of vGPU knows of itself, behind one protocol.

A backend answers for the parents and types that are its kind — how their capacity is counted and
explained, and what a VM attaching one of its vGPUs needs — so that no other module tests a vendor or a
type-name prefix. Now: Intel GVT-g (:mod:`.gvt`), Intel SR-IOV VFs (:mod:`.sriov_intel`: whole PCI functions,
attached by address) and generic mdev (:mod:`.mdev`: NVIDIA's time-sliced vGPUs, the kernel's sample drivers,
any other mdev vendor driver), which takes whatever no other claims.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from vgpuctl.host import HostRoot
from vgpuctl.mdev.sysfs import MdevType

if TYPE_CHECKING:
    from vgpuctl.host.doctor import CheckSpec
    from vgpuctl.host.setup import SetupWants


# The PCI vendors whose rules live here: Intel (GVT-g, SR-IOV VFs), NVIDIA (vendor-specific VFIO).
INTEL_VENDOR_ID = 0x8086
NVIDIA_VENDOR_ID = 0x10DE


class Capacity(Protocol):
    """How a parent's shared resources are used, beyond the kernel's per-type available_instances."""

    def shortfalls(self, wanted: MdevType) -> dict[str, str]:
        """The resources (pools) that cannot hold one more vGPU of this type: name -> why, in words."""

    def advice(self) -> str:
        """What else, besides removing a vGPU, makes room ("" if nothing)."""


class Attachment(NamedTuple):
    """How QEMU and libvirt attach one vGPU to a VM (a NamedTuple, not a frozen dataclass: the CLI imports it
    at every start, and a frozen dataclass costs ~0.5 ms to make)."""

    qemu_property: tuple[str, str]  # the vfio-pci property naming it: ("sysfsdev", path); a PCI VF: ("host", BDF)
    hostdev: dict[str, str]  # libvirt's <hostdev mode='subsystem'> attributes: type='mdev', managed, model
    address: dict[str, str]  # its <source><address/>: uuid; a PCI VF: domain, bus, slot, function


def mdev_attachment(uuid: str) -> Attachment:
    """An mdev vGPU: by its device in the real host's sysfs, a path QEMU opens (never read through a host root)."""
    return Attachment(("sysfsdev", f"{HostRoot().sys_bus_mdev_devices}/{uuid}"),
                      {"type": "mdev", "managed": "no", "model": "vfio-pci"}, {"uuid": uuid})


def pci_attachment(address: str) -> Attachment:
    """A vGPU that is a whole PCI function (an SR-IOV VF): by its address. libvirt must not manage it:
    managed='yes' would rebind it to vfio-pci, which breaks NVIDIA's VFs (they stay on nvidia)."""
    domain, bus, rest = address.split(":")
    slot, function = rest.split(".")
    return Attachment(("host", address), {"type": "pci", "managed": "no"},
                      {"domain": f"0x{domain}", "bus": f"0x{bus}", "slot": f"0x{slot}", "function": f"0x{function}"})


class BackendDefaults:
    """What a backend says when it has nothing of its own to say (each backend subclasses it and overrides
    what its kind does): nothing to do to a vGPU at VM start or after it, no platform tables, no capacity
    model beyond available_instances, no doctor checks, nothing for ``vgpuctl setup``, nothing more a Windows
    guest needs."""

    windows_guest: str | None = None

    def assign(self, root: HostRoot, address: str, type_id: str) -> None:
        return None

    def release(self, root: HostRoot, address: str) -> None:
        return None

    def platform(self, vendor_id: int | None, device_id: int | None) -> str | None:
        return None

    def capacity(self, root: HostRoot, parent: str, types: list[MdevType]) -> Capacity | None:
        return None

    def doctor_checks(self) -> tuple[CheckSpec, ...]:
        return ()

    def setup_wants(self, root: HostRoot) -> SetupWants | None:
        return None

    def offered_types(self, root: HostRoot, held: Collection[str] = ()) -> list[MdevType]:
        return []

    def vm_vgpu_type(self, type_id: str) -> str | None:
        return None


class VgpuBackend(Protocol):
    @property
    def name(self) -> str: ...

    # A VM with one of these vGPUs: whether the guest may suspend (S3/S4), whether QEMU gives it the IGD
    # OpRegion (the Intel graphics driver's video BIOS tables) by default.
    @property
    def guest_sleep(self) -> bool: ...

    @property
    def igd_opregion(self) -> bool: ...

    # Why QEMU cannot open this kind of vGPU without KVM (e.g. under TCG), None if it can.
    @property
    def without_kvm(self) -> str | None: ...

    # Whether its vGPUs are whole PCI functions (SR-IOV VFs) named by their address, made per PF beforehand
    # (never created or removed for a VM), rather than mdev devices named by UUID.
    @property
    def pci_function(self) -> bool: ...

    # Why its vGPUs have no display of their own (QEMU display=on would fail), None if they have one.
    @property
    def no_display(self) -> str | None: ...

    # What a Windows guest on one of its vGPUs needs besides the OS's own settings (said at start when the spec
    # lacks it), None if nothing.
    @property
    def windows_guest(self) -> str | None: ...

    # The PCI vendor whose devices are this backend's parents, None for any vendor's.
    @property
    def pci_vendor(self) -> int | None: ...

    def attachment(self, uuid: str) -> Attachment:
        """How QEMU and libvirt attach the vGPU ``uuid`` of this kind (a PCI function's: its address)."""

    def claims_type(self, type_id: str) -> bool:
        """Whether ``type_id`` is one of this backend's types."""

    # A pci_function backend: what a VM's start does to the VF (NVIDIA: set its vGPU type), and its release
    # after QEMU has ended (NVIDIA: the type back to 0); nothing for VFs whose type is the PF's (Intel).
    def assign(self, root: HostRoot, address: str, type_id: str) -> None: ...

    def release(self, root: HostRoot, address: str) -> None: ...

    def platform(self, vendor_id: int | None, device_id: int | None) -> str | None:
        """The name of the GPU generation a parent is (e.g. "Coffee Lake"), None when the backend has no tables."""

    def capacity(self, root: HostRoot, parent: str, types: list[MdevType]) -> Capacity | None:
        """The parent's capacity model, None when the kernel's available_instances is all there is."""

    def doctor_checks(self) -> tuple[CheckSpec, ...]:
        """What the doctor checks for this kind of vGPU, in order (each says "not needed" on hosts without it)."""

    def setup_wants(self, root: HostRoot) -> SetupWants | None:
        """What ``vgpuctl setup`` makes of this host's boot configuration for this kind of vGPU (None: the host
        has no GPU of this kind, or it needs nothing)."""

    def offered_types(self, root: HostRoot, held: Collection[str] = ()) -> list[MdevType]:
        """A pci_function backend: what its VFs offer now, as type rows the chooser and ``vgpuctl types`` read
        like an mdev parent's — parent the PF, available_instances its VFs free to take one (``held``: VF
        addresses VMs run on), the description in the kernel's ``k=v`` form with the memory and resolution it
        gives (``memory_mib``/``framebuffer``, ``max_resolution``; ``display=emulated`` when it has no display of
        its own). [] for mdev backends, whose types sysfs lists."""

    def vm_vgpu_type(self, type_id: str) -> str | None:
        """A pci_function backend: what a VM's ``vgpu.type`` (with ``vgpu.vf``) says for this type, None when a VF
        has no type of its own (Intel: the PF's share)."""


# In the order they are asked; the generic one last: it claims every type.
BACKEND_MODULES = ("gvt", "sriov_intel", "sriov_nvidia", "mdev")


def _backends() -> Iterator[VgpuBackend]:
    """The backends, each module imported only when reached: a VM start on a GVT-g vGPU loads GVT-g's alone."""
    for name in BACKEND_MODULES:
        backend: VgpuBackend = importlib.import_module(f"vgpuctl.backends.{name}").BACKEND
        yield backend


def backend_for_type(type_id: str) -> VgpuBackend:
    return next(b for b in _backends() if b.claims_type(type_id))


def backend_for_parent(types: Sequence[MdevType]) -> VgpuBackend:
    """The backend of a parent, judged by its types (a parent with no types is generic mdev)."""
    if types:
        return backend_for_type(types[0].type_id)
    generic: VgpuBackend = importlib.import_module(f"vgpuctl.backends.{BACKEND_MODULES[-1]}").BACKEND
    return generic


def offered_types(root: HostRoot, held: Collection[str] = ()) -> list[MdevType]:
    """What every SR-IOV backend's VFs offer now (see :meth:`VgpuBackend.offered_types`); on a host without SR-IOV
    PFs nothing, without loading the SR-IOV backends."""
    from vgpuctl.host import pci

    if not pci.sriov_pfs(root):
        return []
    return [t for b in _backends() if b.pci_function for t in b.offered_types(root, held)]


def setup_wants(root: HostRoot) -> SetupWants:
    """What ``vgpuctl setup`` plans on this host: the wants of each backend whose GPU it has — GVT-g's for a
    Broadwell ... Comet Lake iGPU, Intel SR-IOV's for an Intel GPU with SR-IOV (an iGPU of Gen12 or later; never
    both on one iGPU: i915.enable_gvt and i915.max_vfs exclude each other, and GVT-g ends with Gen9), NVIDIA
    vendor-VFIO's for an NVIDIA GPU with SR-IOV — merged when there are several (every parameter, module and
    option of each; vgpuctl.host.setup.combined). A root that shows none of them (no sysfs: an image being
    prepared) gets GVT-g's, as before there were others."""
    from vgpuctl.host.setup import combined

    found = [wants for b in _backends() if (wants := b.setup_wants(root)) is not None]
    if not found:
        from vgpuctl.backends.gvt_setup import GVT_SETUP

        return GVT_SETUP
    return combined(found)
