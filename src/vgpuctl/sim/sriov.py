"""The kernel's generic PCI SR-IOV layer and PCI driver binding, as the simulated host shows them (sriov.md 1, 7.1).

On a physical function (PF): ``sriov_totalvfs``, ``sriov_numvfs``, ``sriov_offset``, ``sriov_stride``,
``sriov_vf_device``, ``sriov_drivers_autoprobe`` (drivers/pci/iov.c); enabling creates the VFs with their
``virtfnN``/``physfn`` links. Every simulated PCI function here has ``config`` (a header with a PCI Express
capability; on a PF the SR-IOV extended capability at 0x100, so that lspci shows it), ``driver_override``
(drivers/pci/pci-sysfs.c) and binding through ``/sys/bus/pci/drivers/<drv>/{bind,unbind,new_id}`` and
``/sys/bus/pci/drivers_probe`` (drivers/pci/pci-driver.c, drivers/base/bus.c). What a PF driver does when
asked for VFs (its ``sriov_configure``) is a :class:`PfDriver`, in :mod:`vgpuctl.sim.sriov_vendors`.

A VF bound to a VFIO driver can be opened by a simulated VM (``open``/``close`` on the control file); a
disable waits, holding the PF's device lock, until every VF is closed (drivers/vfio/pci/vfio_pci_core.c's
request loop), and reads of ``sriov_numvfs`` wait with it.
"""

from __future__ import annotations

import contextlib
import errno
import posixpath
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from vgpuctl.host import facts, pci
from vgpuctl.sim.vfs import Attr, CharDev, Link, const, fail

if TYPE_CHECKING:
    from vgpuctl.sim.host import SimHost

VFIO_DRIVERS = ("vfio-pci", "xe-vfio-pci", "nvidia")  # drivers that give a VF a /dev/vfio node
VFIO_CDEV_MAJOR = 510  # /dev/vfio/devices/vfioN (dynamic, as commonly seen)
VFIO_GROUP_MAJOR = 511
SIM_DMESG = "/.vgpuctl-sim-dmesg"  # the kernel log of this boot, one dev_printk() line each
CONFIG_SIZE = 4096  # PCI Express: lspci reads the extended space only from a 4096-byte config
SRIOV_CAP = 0x100
PAGE_SIZE = 4096


def kstrtou(text: str, bits: int) -> int:
    """kstrtou16/u32/u64(buf, 0) (lib/kstrtox.c): '+', 0x hex, 0 octal, one trailing newline; ERANGE for a
    value over ``bits`` and for digits that overflow 64 bits even before garbage, else EINVAL for garbage."""
    text = text.split("\0", 1)[0]  # a C string: a NUL ends it
    body = text[1:] if text.startswith("+") else text
    if re.match(r"0[xX][0-9a-fA-F]", body):  # _parse_integer_fixup_radix()
        base, digits, body = 16, "0123456789abcdefABCDEF", body[2:]
    else:
        base, digits = (8, "01234567") if body.startswith("0") else (10, "0123456789")
    count = len(body) - len(body.lstrip(digits))
    value = int(body[:count], base) if count else 0
    if value >= 1 << 64:  # _parse_integer() flags the overflow; _kstrtoull() reports it first
        raise fail(errno.ERANGE)
    rest = body[count:]
    if not count or rest not in ("", "\n"):
        raise fail(errno.EINVAL)
    if value >= 1 << bits:
        raise fail(errno.ERANGE)
    return value


def kstrtobool(text: str) -> bool:
    value = facts.kstrtobool(text)
    if value is None:
        raise fail(errno.EINVAL)
    return value


def config_space(vendor: int, device: int, pci_class: int, express_type: int,
                 sriov: tuple[int, int, int, int, int] | None = None) -> bytes:
    """A 4096-byte config space: type 0 header, a PCI Express v2 capability at 0x40 and, for a PF, the SR-IOV
    extended capability at 0x100 (total, initial, num VFs, offset, stride, VF device id: PCIe base spec 9.3.3)."""
    data = bytearray(CONFIG_SIZE)
    struct.pack_into("<HHHH", data, 0, vendor, device, 0x0006, 0x0010)  # memory+master; capability list
    struct.pack_into("<I", data, 8, pci_class << 8)  # revision 0
    struct.pack_into("<HH", data, 0x2C, vendor, device)  # subsystem
    data[0x34] = 0x40
    struct.pack_into("<BBH", data, 0x40, 0x10, 0x00, 0x0002 | express_type << 4)  # PCIe cap v2
    if sriov is not None:
        total, num, offset, stride, vf_device = sriov
        struct.pack_into("<HHI", data, SRIOV_CAP, 0x0010, 0x0001, 0)  # ext cap 0x10 v1, no next; caps
        struct.pack_into("<HH", data, SRIOV_CAP + 8, 0x0011 if num else 0, 0)  # control: VF enable, MSE
        struct.pack_into("<HHHBBHH", data, SRIOV_CAP + 0x0C, total, total, num, 0, 0, offset, stride)
        struct.pack_into("<HH", data, SRIOV_CAP + 0x18, 0, vf_device)
        struct.pack_into("<II", data, SRIOV_CAP + 0x1C, 0x553, 1)  # supported / system page size
    return bytes(data)


@dataclass
class Function:
    """A PCI function the SR-IOV layer manages (a PF or one of its VFs)."""

    address: str
    path: str
    vendor: int
    device: int
    pci_class: int
    driver: str | None = None
    override: str | None = None
    group: int | None = None
    pf: Pf | None = None  # set on a VF
    index: int = 0  # a VF's index (virtfn<index>)
    vfio_minor: int | None = None
    open_count: int = 0
    closed_at: float = 0.0  # monotonic time of the last close
    assigned: bool = False  # PCI_DEV_FLAGS_ASSIGNED (legacy KVM/Xen assignment): pci_vfs_assigned() counts it
    express_type: int = 9  # PCI Express device/port type: 0 endpoint, 9 root complex integrated endpoint


@dataclass
class Pf:
    """One SR-IOV physical function's state (sriov.md 7.1)."""

    function: Function
    hw_total: int
    offset: int
    stride: int
    vf_device: int
    vf_class: int
    driver_limit: int | None = None
    autoprobe: bool = True
    vfs: list[Function] = field(default_factory=list)
    busy: bool = False  # the device lock is held by a write in flight

    @property
    def total(self) -> int:
        """pci_sriov_get_totalvfs(): the driver's limit if it set one, else the capability's TotalVFs."""
        return self.hw_total if self.driver_limit is None else self.driver_limit

    def vf_address(self, index: int) -> str:
        return pci.vf_address(self.function.address, index, self.offset, self.stride)


class PfDriver:
    """A PCI driver as the SR-IOV layer sees it; ``configure`` is its sriov_configure (None: it has none)."""

    name = ""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus
        self.ids: set[tuple[int, int]] = set()  # dynamic ids (new_id)

    def matches(self, function: Function) -> bool:
        """The driver's static id table (dynamic ids are checked by the bus)."""
        return False

    configure: Callable[[Pf, int], None] | None = None

    def probe(self, function: Function) -> None:
        """A driver's probe: raise the errno it returns."""

    def bound(self, function: Function) -> None:
        """After a bind: the nodes the driver adds under the device."""

    def unbound(self, function: Function) -> None:
        """After an unbind: drop what ``bound`` added."""

    def vf_opened(self, function: Function) -> None:
        """As the PF's driver: a VM opened one of its VFs (vfio-pci resets it: a VF FLR)."""

    def vf_rebind(self, function: Function, driver: PfDriver) -> None:
        """As the PF's driver: veto another driver's probe of one of its VFs (raise its errno)."""


class VfioPci(PfDriver):
    name = "vfio-pci"  # drivers/vfio/pci/vfio_pci.c: no static ids; binds through new_id or driver_override

    def probe(self, function: Function) -> None:
        pf = self.bus.pfs.get(function.address)
        if pf is not None and pf.vfs:
            raise fail(errno.EBUSY, "Cannot bind to PF with SR-IOV enabled")  # vfio_pci_core_register_device


class XeVfioPci(PfDriver):
    name = "xe-vfio-pci"  # drivers/vfio/pci/xe: PCI_DRIVER_OVERRIDE_DEVICE_VFIO, binds only by driver_override

    def probe(self, function: Function) -> None:
        if function.pf is None or function.pf.function.driver != "xe":
            raise fail(errno.ENODEV)  # a VF of an xe PF only


class PciBus:
    """The PCI bus of a simulated host: SR-IOV PFs, their VFs and the drivers that bind them."""

    def __init__(self, host: SimHost, block_timeout_s: float, mmio_ok: bool = True) -> None:
        self.host = host
        self.fs = host.vfs
        self.block_timeout_s = block_timeout_s
        self.mmio_ok = mmio_ok
        self.changed = threading.Condition(host.lock)  # waits release the host's lock (an RLock)
        self.functions: dict[str, Function] = {}
        self.pfs: dict[str, Pf] = {}
        self.drivers: dict[str, PfDriver] = {}
        self.next_vfio_minor = 0
        self.held = False  # a client (NVIDIA: DCGM) holds the GPU: a PF driver's unbind lock cannot be had
        self.kmsg: list[str] = []
        self.fs.put(SIM_DMESG, Attr(show=lambda: "".join(line + "\n" for line in self.kmsg)))

    def log(self, function: Function, text: str) -> None:
        """dev_printk(): "<driver or bus> <BDF>: <text>"."""
        self.kmsg.append(f"{function.driver or 'pci'} {function.address}: {text}")

    def hold(self, on: bool) -> None:
        with self.host.lock:
            self.held = on

    # ------------------------------------------------------------------ drivers
    def add_driver(self, driver: PfDriver) -> None:
        self.drivers[driver.name] = driver
        base = f"/sys/bus/pci/drivers/{driver.name}"
        self.fs.mkdirs(base)
        self.fs.put(f"{base}/bind", Attr(store=partial(self._bind_store, driver)))
        self.fs.put(f"{base}/unbind", Attr(store=partial(self._unbind_store, driver)))
        self.fs.put(f"{base}/new_id", Attr(store=partial(self._new_id_store, driver)))
        self.fs.put(f"{base}/remove_id", Attr(store=partial(self._remove_id_store, driver)))
        self.fs.put("/sys/bus/pci/drivers_probe", Attr(store=self._drivers_probe_store))
        self.fs.put("/sys/bus/pci/drivers_autoprobe", Attr(show=const("1\n")))

    def _match(self, driver: PfDriver, function: Function) -> bool:
        """pci_bus_match(): driver_override decides alone when set; else the dynamic ids, then the static table."""
        if function.override is not None:
            return function.override == driver.name
        return (function.vendor, function.device) in driver.ids or driver.matches(function)

    def _can_probe(self, function: Function) -> bool:
        """pci_device_can_probe(): not a VF, or the PF's autoprobe on, or driver_override set."""
        return function.pf is None or function.pf.autoprobe or function.override is not None

    def attach(self, function: Function, driver: PfDriver) -> None:
        """really_probe(): the driver's probe, then the links."""
        if not self._can_probe(function):
            raise fail(errno.ENODEV)
        owner = self.drivers.get(function.pf.function.driver or "") if function.pf is not None else None
        if owner is not None:
            owner.vf_rebind(function, driver)
        driver.probe(function)
        function.driver = driver.name
        self.fs.put(f"{function.path}/driver", Link(target=f"/sys/bus/pci/drivers/{driver.name}"))
        self.fs.put(f"/sys/bus/pci/drivers/{driver.name}/{function.address}", Link(target=function.path))
        if driver.name in VFIO_DRIVERS and function.pf is not None:
            self._add_vfio_nodes(function)
        driver.bound(function)
        self._set_uevent_driver(function, driver.name)
        self.host._emit("bind", function.path)

    def detach(self, function: Function) -> None:
        driver = self.drivers.get(function.driver or "")
        if driver is None:
            return
        driver.unbound(function)
        pf = self.pfs.get(function.address)
        if pf is not None and pf.vfs:  # pci_iov_remove()
            self.log(function, "driver left SR-IOV enabled after remove")
        self._drop_vfio_nodes(function)
        self.fs.drop(f"{function.path}/driver")
        self.fs.drop(f"/sys/bus/pci/drivers/{driver.name}/{function.address}")
        function.driver = None
        if function.address in self.pfs:  # pci_iov_remove(): back to the hardware's TotalVFs
            self.pfs[function.address].driver_limit = None
        self._set_uevent_driver(function, None)
        self.host._emit("unbind", function.path)

    def _set_uevent_driver(self, function: Function, driver: str | None) -> None:
        kobject = self.host.kobjects.get(function.path)
        if kobject is not None:
            kobject.env.pop("DRIVER", None)
            if driver:
                kobject.env = {"DRIVER": driver, **kobject.env}

    def probe_device(self, function: Function) -> None:
        """device_attach(): the first driver that matches and probes successfully; none is no error."""
        if function.driver is not None or not self._can_probe(function):
            return
        for driver in self.drivers.values():
            if self._match(driver, function):
                try:
                    self.attach(function, driver)
                    return
                except OSError:
                    continue

    def _function(self, text: str) -> Function:
        address = text.strip()
        function = self.functions.get(address)
        if function is None:
            raise fail(errno.ENODEV, f"no PCI device {address}")
        return function

    def _bind_store(self, driver: PfDriver, text: str) -> None:
        """bind_store() (drivers/base/bus.c): ENODEV unless it matches, EBUSY if bound [U for the last]."""
        with self.host.lock:
            function = self._function(text)
            if function.driver is not None:
                raise fail(errno.EBUSY, f"{function.address} is bound to {function.driver}")
            if not self._match(driver, function):
                raise fail(errno.ENODEV)
            self.attach(function, driver)

    def _unbind_store(self, driver: PfDriver, text: str) -> None:
        with self.host.lock:
            function = self._function(text)
            if function.driver != driver.name:
                raise fail(errno.ENODEV)
            if function.open_count:
                self._wait(lambda: function.open_count == 0)  # the vfio request loop
            self.detach(function)

    def _new_id_store(self, driver: PfDriver, text: str) -> None:
        """new_id_store() (drivers/pci/pci-driver.c): "vendor device [...]" in hex; EEXIST if known; then attach."""
        with self.host.lock:
            words = text.split()
            try:
                vendor, device = int(words[0], 16), int(words[1], 16)
            except (IndexError, ValueError):
                raise fail(errno.EINVAL) from None
            if (vendor, device) in driver.ids:
                raise fail(errno.EEXIST)
            driver.ids.add((vendor, device))
            for function in list(self.functions.values()):
                if function.driver is None and self._match(driver, function):
                    with contextlib.suppress(OSError):
                        self.attach(function, driver)

    def _remove_id_store(self, driver: PfDriver, text: str) -> None:
        with self.host.lock:
            words = text.split()
            try:
                key = int(words[0], 16), int(words[1], 16)
            except (IndexError, ValueError):
                raise fail(errno.EINVAL) from None
            if key not in driver.ids:
                raise fail(errno.ENODEV)
            driver.ids.discard(key)

    def _drivers_probe_store(self, text: str) -> None:
        """drivers_probe_store(): ENODEV for an unknown device; a device no driver takes is no error."""
        with self.host.lock:
            self.probe_device(self._function(text))

    # ------------------------------------------------------------------ functions
    def add_function(self, function: Function) -> None:
        """The files the SR-IOV layer adds to a PCI device directory (the host made the rest)."""
        self.functions[function.address] = function
        path = function.path
        self.fs.put(f"{path}/config", Attr(show=partial(self._config, function), binary=True, mode=0o644,
                                           store=lambda text: None))
        self.fs.put(f"{path}/irq", Attr(show=const("16\n")))
        self.fs.put(f"{path}/driver_override", Attr(show=partial(self._override_show, function),
                                                    store=partial(self._override_store, function)))
        self.fs.put(f"{path}/subsystem_device", Attr(show=const(f"0x{function.device:04x}\n")))
        self.fs.put(f"{path}/reset", Attr(store=lambda text: None))

    def _config(self, function: Function) -> str:
        pf = self.pfs.get(function.address)
        sriov = None if pf is None else (pf.hw_total, len(pf.vfs), pf.offset, pf.stride, pf.vf_device)
        data = config_space(function.vendor, function.device, function.pci_class, function.express_type, sriov)
        return data.decode("latin-1")

    def _override_show(self, function: Function) -> str:
        return f"{function.override if function.override is not None else '(null)'}\n"

    def _override_store(self, function: Function, text: str) -> None:
        """driver_set_override() (drivers/base/driver.c): cut at a NUL and the first newline; empty clears."""
        with self.host.lock:
            if len(text) >= PAGE_SIZE - 1:
                raise fail(errno.EINVAL)
            value = text.split("\0", 1)[0].split("\n", 1)[0]  # strlen(), then cut at the first newline
            function.override = value or None

    def add_pf(self, pf: Pf) -> None:
        self.pfs[pf.function.address] = pf
        self.add_function(pf.function)
        path = pf.function.path
        self.fs.put(f"{path}/sriov_totalvfs", Attr(show=lambda: f"{pf.total}\n"))
        self.fs.put(f"{path}/sriov_numvfs", Attr(show=partial(self._numvfs_show, pf),
                                                 store=partial(self._numvfs_store, pf)))
        self.fs.put(f"{path}/sriov_offset", Attr(show=const(f"{pf.offset}\n")))
        self.fs.put(f"{path}/sriov_stride", Attr(show=const(f"{pf.stride}\n")))
        self.fs.put(f"{path}/sriov_vf_device", Attr(show=const(f"{pf.vf_device:x}\n")))
        self.fs.put(f"{path}/sriov_vf_total_msix", Attr(show=const("0\n")))
        self.fs.put(f"{path}/sriov_drivers_autoprobe", Attr(show=lambda: f"{int(pf.autoprobe)}\n",
                                                            store=partial(self._autoprobe_store, pf)))

    def _autoprobe_store(self, pf: Pf, text: str) -> None:
        with self.host.lock:
            pf.autoprobe = kstrtobool(text)

    # ------------------------------------------------------------------ sriov_numvfs (drivers/pci/iov.c)
    def _wait(self, done: Callable[[], bool]) -> None:
        """Block (releasing the host's lock) until done(); EINTR after the test timeout (the writer "killed")."""
        deadline = time.monotonic() + self.block_timeout_s
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise fail(errno.EINTR, "still blocked when the simulator's timeout ran out")
            self.changed.wait(left)

    def _numvfs_show(self, pf: Pf) -> str:
        with self.host.lock:
            self._wait(lambda: not pf.busy)  # device_lock()
            return f"{len(pf.vfs)}\n"

    def _numvfs_store(self, pf: Pf, text: str) -> None:
        with self.host.lock:
            count = kstrtou(text, 16)
            if count > pf.total:
                raise fail(errno.ERANGE)
            self._wait(lambda: not pf.busy)  # device_lock()
            pf.busy = True
            try:
                if count == len(pf.vfs):
                    return
                driver = self.drivers.get(pf.function.driver or "")
                if driver is None or driver.configure is None:
                    # One message for both up to ~6.2; later kernels name the unbound case [U: the version].
                    unbound = driver is None and self.host.kernel.at_least(6, 3)
                    self.log(pf.function, "no driver bound to device; cannot configure SR-IOV" if unbound
                             else "Driver does not support SRIOV configuration via sysfs")
                    raise fail(errno.ENOENT)
                if count and pf.vfs:
                    self.log(pf.function, f"{len(pf.vfs)} VFs already enabled. Disable before enabling {count} VFs")
                    raise fail(errno.EBUSY)
                driver.configure(pf, count)
            finally:
                pf.busy = False
                self.changed.notify_all()

    def enable(self, pf: Pf, count: int) -> None:
        """pci_enable_sriov(): the VFs, their links and IOMMU groups; each probed if it may be."""
        if not self.mmio_ok:
            self.log(pf.function, "not enough MMIO resources for SR-IOV")
            raise fail(errno.ENOMEM)
        parent = posixpath.dirname(pf.function.path)
        for index in range(count):
            address = pf.vf_address(index)
            vf = Function(address, f"{parent}/{address}", pf.function.vendor, pf.vf_device, pf.vf_class,
                          pf=pf, index=index, express_type=pf.function.express_type)
            pf.vfs.append(vf)
            self.host._add_pci_device(address, vf.path, vf.vendor, vf.device, vf.pci_class, None,
                                      self.host.iommu_on)
            group = self.fs.readlink(f"{vf.path}/iommu_group") if self.host.iommu_on else None
            vf.group = int(group.rsplit("/", 1)[-1]) if group else None
            self.add_function(vf)
            self.fs.put(f"{vf.path}/physfn", Link(target=pf.function.path))
            self.fs.put(f"{pf.function.path}/virtfn{index}", Link(target=vf.path))
        for vf in pf.vfs:
            self.probe_device(vf)
        self.host._emit("change", pf.function.path)

    def disable(self, pf: Pf) -> None:
        """pci_disable_sriov(): every VF removed; an open VF blocks it until closed."""
        for vf in pf.vfs:
            if vf.open_count:  # vfio_pci_core_request(): the VM is asked to let go
                self.log(vf, "Relaying device request to user (#0)")
        self._wait(lambda: all(vf.open_count == 0 for vf in pf.vfs))
        for vf in reversed(pf.vfs):
            self.detach(vf)
            self.fs.drop(f"{pf.function.path}/virtfn{vf.index}")
            self.host._del_kobject(vf.path)
            self.fs.drop(vf.path)
            self.fs.drop(f"/sys/bus/pci/devices/{vf.address}")
            if vf.group is not None:
                self.fs.drop(f"/sys/kernel/iommu_groups/{vf.group}")
                self.host.iommu_groups.discard(vf.group)
            del self.functions[vf.address]
        pf.vfs.clear()
        self.host._emit("change", pf.function.path)

    # ------------------------------------------------------------------ VFIO nodes and the simulated VM side
    def _add_vfio_nodes(self, function: Function) -> None:
        if function.group is None:
            return
        minor = function.vfio_minor = self.next_vfio_minor
        self.next_vfio_minor += 1
        self.fs.put(f"/dev/vfio/{function.group}", CharDev(major=VFIO_GROUP_MAJOR, minor=function.group))
        self.fs.put(f"/dev/vfio/devices/vfio{minor}", CharDev(major=VFIO_CDEV_MAJOR, minor=minor))
        self.fs.put(f"{function.path}/vfio-dev/vfio{minor}/dev", Attr(show=const(f"{VFIO_CDEV_MAJOR}:{minor}\n")))

    def _drop_vfio_nodes(self, function: Function) -> None:
        if function.vfio_minor is None:
            return
        self.fs.drop(f"/dev/vfio/{function.group}")
        self.fs.drop(f"/dev/vfio/devices/vfio{function.vfio_minor}")
        self.fs.drop(f"{function.path}/vfio-dev")
        function.vfio_minor = None

    def open_vf(self, address: str) -> None:
        """A simulated QEMU opens the VF's VFIO device (ENODEV: no such VF; EINVAL: not bound to a VFIO driver)."""
        with self.host.lock:
            function = self.functions.get(address)
            if function is None or function.pf is None:
                raise fail(errno.ENODEV, f"no VF {address}")
            if function.driver not in VFIO_DRIVERS:
                raise fail(errno.EINVAL, f"{address} is not bound to a VFIO driver ({function.driver})")
            function.open_count += 1
            pf_driver = self.drivers.get(function.pf.function.driver or "")
            if pf_driver is not None:
                pf_driver.vf_opened(function)
            self.changed.notify_all()

    def close_vf(self, address: str) -> None:
        with self.host.lock:
            function = self.functions.get(address)
            if function is None or function.open_count == 0:
                raise fail(errno.EINVAL, f"{address} is not open")
            function.open_count -= 1
            function.closed_at = time.monotonic()
            self.changed.notify_all()

    def assign(self, address: str, on: bool) -> None:
        with self.host.lock:
            function = self.functions.get(address)
            if function is None or function.pf is None:
                raise fail(errno.ENODEV, f"no VF {address}")
            function.assigned = on

    def open_vfs(self) -> list[str]:
        return sorted(f.address for f in self.functions.values() if f.open_count)
