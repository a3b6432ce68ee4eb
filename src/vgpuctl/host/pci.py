"""PCI functions and SR-IOV, read and written under the host root: the kernel's ABI of drivers/pci/iov.c
(``sriov_*`` on a physical function, ``virtfnN``/``physfn`` links), drivers/pci/pci-sysfs.c and
drivers/pci/pci-driver.c (``driver_override``, ``drivers_probe``, bind/unbind).

Vendor rules (which driver configures VFs, what an errno means on that driver, how VFs are provisioned)
live in the vGPU backends; this module only knows what every PCI device has. Two kernel behaviours shape
it: a read of ``sriov_numvfs`` takes the device lock and so blocks while a disable waits for an open VF
(drivers/vfio/pci: the request loop), hence every such read and write has a timeout; and a VF's device id
equals its PF's on Intel GPUs, hence VFs are bound to a driver by ``driver_override`` per address, never
by id (``new_id`` would catch the PF too).
"""

from __future__ import annotations

import errno as errnos
import os
import re
import threading
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from vgpuctl.base.errors import InvalidInput, KernelError, NotFound
from vgpuctl.host import facts
from vgpuctl.host.root import HostRoot, path_name

# Names for the vendors and classes a vGPU host shows (the PCI ID repository's spellings, shortened).
VENDOR_NAMES = {0x8086: "Intel", 0x1002: "AMD", 0x10DE: "NVIDIA", 0x1AF4: "Red Hat (virtio)", 0x1B36: "Red Hat (QEMU)",
                0x1234: "QEMU (Bochs)", 0x15AD: "VMware", 0x1013: "Cirrus Logic", 0x102B: "Matrox", 0x1A03: "ASPEED"}
CLASS_NAMES = {0x00: "unclassified device", 0x01: "storage controller", 0x02: "network controller",
               0x03: "display controller", 0x04: "multimedia controller", 0x05: "memory controller",
               0x06: "bridge", 0x07: "communication controller", 0x08: "system peripheral", 0x0C: "serial bus"}
DISPLAY_CLASS = 0x03  # PCI base class of VGA, XGA, 3D and other display controllers

NUMVFS_TIMEOUT_S = 5.0  # a disable blocked by an open VF never returns: give up and say why
_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
T = TypeVar("T")


class PciFunction(NamedTuple):  # NamedTuples: read at every VM start on a VF (a dataclass costs ~0.5 ms)
    """One PCI function as sysfs shows it."""

    address: str
    vendor: int | None
    device: int | None
    pci_class: int | None
    driver: str | None  # the bound driver's name, None when unbound
    driver_override: str | None  # None when unset (sysfs shows "(null)")
    iommu_group: str | None
    physfn: str | None = None  # a VF's PF


class SriovPf(NamedTuple):
    """A physical function with the SR-IOV capability, and its enabled VFs."""

    function: PciFunction
    total_vfs: int  # the driver's limit if it set one (i915's max_vfs), else the hardware's TotalVFs
    num_vfs: int | None  # None: the read did not return in time (a disable waits for an open VF)
    offset: int
    stride: int
    vf_device: int | None
    drivers_autoprobe: bool
    vfs: list[PciFunction]  # by VF index (virtfn0 first)

    @property
    def address(self) -> str:
        return self.function.address


def vendor_name(vendor: int | None) -> str:
    """E.g. "Intel"; "virtual" for a device with no PCI vendor (the kernel's sample mdev parents)."""
    return "virtual" if vendor is None else VENDOR_NAMES.get(vendor, f"0x{vendor:04x}")


def describe(vendor: int, device: int, pci_class: int) -> str:
    """E.g. "a display controller from AMD (1002:1638)"."""
    kind = CLASS_NAMES.get(pci_class >> 16, f"class 0x{pci_class:06x} device")
    return f"a {kind} from {VENDOR_NAMES.get(vendor, f'vendor 0x{vendor:04x}')} ({vendor:04x}:{device:04x})"


def check_address(text: str) -> str:
    """A PCI address as sysfs names it (domain:bus:device.function, lower case)."""
    address = text.strip().lower()
    if len(address) == 7:  # "02:00.0" as lspci prints it: domain 0000
        address = f"0000:{address}"
    if not _ADDRESS.fullmatch(address):
        raise InvalidInput(f"{text!r} is not a PCI address: give it as lspci -D shows it, e.g. 0000:00:02.1")
    return address


def _optional(root: HostRoot, host_path: str) -> str | None:
    try:
        return root.read_value(host_path)
    except OSError:
        return None


def _link_name(root: HostRoot, host_path: str) -> str | None:
    try:
        return os.path.basename(root.readlink(host_path))
    except OSError:
        return None


def read_function(root: HostRoot, address: str) -> PciFunction:
    base = root.pci_device(path_name(address, "PCI address"))
    if not root.exists(base):
        raise NotFound(f"no PCI device {address} (ls {root.sys_bus_pci_devices})")
    override = _optional(root, f"{base}/driver_override")
    return PciFunction(
        address=address,
        vendor=facts.as_int(_optional(root, f"{base}/vendor")),
        device=facts.as_int(_optional(root, f"{base}/device")),
        pci_class=facts.as_int(_optional(root, f"{base}/class")),
        driver=_link_name(root, f"{base}/driver"),
        driver_override=None if override in (None, "", "(null)") else override,
        iommu_group=_link_name(root, f"{base}/iommu_group"),
        physfn=_link_name(root, f"{base}/physfn"),
    )


def _within(timeout_s: float, action: Callable[[], T], what: str) -> T:
    """``action()`` in a thread, or KernelError(ETIMEDOUT) if it has not returned in time (the thread stays
    blocked in the kernel; the process can still exit, it is a daemon)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(action())
        except BaseException as e:  # handed to the caller below
            failure.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise KernelError("{action} did not return within {timeout_s:g} s: the kernel holds the device lock, "
                          "usually because a disable waits for a VM to release one of its VFs", what="PCI device",
                          action=what, timeout_s=timeout_s, errno=errnos.ETIMEDOUT)
    if failure:
        raise failure[0]
    return result[0]


def is_sriov_pf(root: HostRoot, address: str) -> bool:
    return root.exists(f"{root.pci_device(address)}/sriov_totalvfs")


def read_pf(root: HostRoot, address: str, timeout_s: float = NUMVFS_TIMEOUT_S) -> SriovPf:
    base = root.pci_device(path_name(address, "PCI address"))
    function = read_function(root, address)
    if not root.exists(f"{base}/sriov_totalvfs"):
        raise NotFound(f"{address} has no SR-IOV capability (no sriov_totalvfs): it cannot have VFs")
    try:
        num_vfs: int | None = facts.as_int(
            _within(timeout_s, lambda: root.read_value(f"{base}/sriov_numvfs"), f"reading {base}/sriov_numvfs"))
    except KernelError:
        num_vfs = None
    links = sorted((int(name[len("virtfn"):]), name) for name in _names(root, base)
                   if name.startswith("virtfn") and name[len("virtfn"):].isdigit())
    vfs = [read_function(root, vf) for _, link in links if (vf := _link_name(root, f"{base}/{link}"))]
    return SriovPf(
        function=function,
        total_vfs=facts.as_int(_optional(root, f"{base}/sriov_totalvfs")) or 0,
        num_vfs=num_vfs,
        offset=facts.as_int(_optional(root, f"{base}/sriov_offset")) or 0,
        stride=facts.as_int(_optional(root, f"{base}/sriov_stride")) or 0,
        vf_device=_hex(_optional(root, f"{base}/sriov_vf_device")),
        drivers_autoprobe=bool(facts.kstrtobool(_optional(root, f"{base}/sriov_drivers_autoprobe"))),
        vfs=vfs,
    )


def _hex(text: str | None) -> int | None:
    """``sriov_vf_device`` is printed with %x: hex without 0x."""
    try:
        return int(text or "", 16)
    except ValueError:
        return None


def _names(root: HostRoot, host_path: str) -> list[str]:
    try:
        return root.listdir(host_path)
    except OSError:
        return []


def sriov_pfs(root: HostRoot) -> list[str]:
    """The addresses of every PCI function with the SR-IOV capability."""
    devices = root.sys_bus_pci_devices
    return [address for address in _names(root, devices) if root.exists(f"{devices}/{address}/sriov_totalvfs")]


def vf_address(pf: str, index: int, offset: int, stride: int) -> str:
    """The address of VF ``index`` (0-based, as virtfnN counts): routing ID = PF's + offset + stride * index
    (drivers/pci/iov.c pci_iov_virtfn_bus/devfn), bus = routing ID >> 8, devfn = routing ID & 0xff. vgpuctl
    reads a PF's VFs from its virtfnN links; the simulator places them by this rule."""
    domain, bus, rest = pf.split(":")
    slot, function = rest.split(".")
    rid = (int(bus, 16) << 8 | int(slot, 16) << 3 | int(function)) + offset + stride * index
    return f"{domain}:{rid >> 8:02x}:{(rid & 0xFF) >> 3:02x}.{rid & 7}"


def _write(root: HostRoot, host_path: str, value: str, timeout_s: float) -> None:
    """One write() of ``value``; an OSError becomes KernelError with the path and errno."""
    def attempt() -> None:
        root.write_text(host_path, value)

    try:
        _within(timeout_s, attempt, f"writing {value.strip()!r} to {host_path}")
    except OSError as e:
        raise KernelError("{path}: the kernel refused {value!r}: {strerror} ({code})", what="PCI device",
                          path=host_path, value=value.strip(), errno=e.errno,
                          code=errnos.errorcode.get(e.errno or 0, e.errno)) from e


def set_num_vfs(root: HostRoot, pf: str, count: int, timeout_s: float = NUMVFS_TIMEOUT_S) -> None:
    """Write ``count`` to the PF's ``sriov_numvfs`` (the kernel takes 0, or N when none are enabled)."""
    _write(root, f"{root.pci_device(pf)}/sriov_numvfs", f"{count}\n", timeout_s)


def set_drivers_autoprobe(root: HostRoot, pf: str, on: bool) -> None:
    _write(root, f"{root.pci_device(pf)}/sriov_drivers_autoprobe", "1\n" if on else "0\n", NUMVFS_TIMEOUT_S)


def bind(root: HostRoot, address: str, driver: str) -> None:
    """Give the function to ``driver`` by ``driver_override`` (scoped to this address), then probe it."""
    base = root.pci_device(path_name(address, "PCI address"))
    path_name(driver, "driver name")
    current = _link_name(root, f"{base}/driver")
    if current == driver:
        return
    _write(root, f"{base}/driver_override", f"{driver}\n", NUMVFS_TIMEOUT_S)
    if current is not None:
        _write(root, f"{root.pci_driver(current)}/unbind", address, NUMVFS_TIMEOUT_S)
    _write(root, root.pci_drivers_probe, address, NUMVFS_TIMEOUT_S)


def vf_openers(root: HostRoot, vfs: list[PciFunction]) -> dict[str, str]:
    """VF address -> who has its VFIO device open ("pid N (comm)"; on a simulated host "a simulated VM"): the
    /proc fds that point at its VFIO group or device node, whatever the vendor."""
    if not vfs:
        return {}
    simulation = root.simulation()
    if simulation is not None:
        opened = set(simulation.get("open_vfs", []))
        return {vf.address: "a simulated VM" for vf in vfs if vf.address in opened}
    nodes: dict[str, str] = {}
    for vf in vfs:
        if vf.iommu_group:
            nodes[root.dev_vfio_group(vf.iommu_group)] = vf.address
        base = f"{root.pci_device(vf.address)}/vfio-dev"
        for name in (root.listdir(base) if root.exists(base) else []):
            nodes[root.dev_vfio_device(name)] = vf.address
    found: dict[str, str] = {}
    proc = root.path(root.proc)
    for pid in (p for p in _listdir(proc) if p.isdigit()):
        for fd in _listdir(proc / pid / "fd"):
            try:
                target = os.readlink(proc / pid / "fd" / fd)
            except OSError:
                continue
            if target in nodes:
                try:
                    comm = (proc / pid / "comm").read_text().strip()
                except OSError:
                    comm = "?"
                found.setdefault(nodes[target], f"pid {pid} ({comm})")
    return found


def _listdir(path: str | os.PathLike[str]) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
