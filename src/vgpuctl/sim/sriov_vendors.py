"""PF drivers of simulated SR-IOV GPUs: i915-sriov-dkms on an Intel iGPU and NVIDIA's vendor-specific VFIO.

i915 (sriov.md 2.2-2.4.1, 7.2; i915_sriov.c, i915_sriov_sysfs.c, intel_iov_provisioning.c): PF mode iff
``i915.max_vfs`` > 0 and GuC submission (``enable_guc`` bit 0), else totalvfs 0; the ``prelim_iov`` tree with
fair shares provisioned at enable. NVIDIA (3.2-3.4, 7.4): raw ``sriov_numvfs`` writes refused unless the
driver's unbind lock is held (what the stand-in ``/usr/lib/nvidia/sriov-manage`` takes), per-VF ``nvidia/``.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from vgpuctl.host import facts
from vgpuctl.sim.presets import SriovSpec
from vgpuctl.sim.sriov import Function, PciBus, Pf, PfDriver, VfioPci, XeVfioPci, kstrtobool, kstrtou
from vgpuctl.sim.vfs import Attr, Blob, CharDev, Link, const, fail

if TYPE_CHECKING:
    from vgpuctl.sim.host import SimHost

MIB = 1024 * 1024
NVIDIA_VENDOR_ID = 0x10DE
SRIOV_MANAGE = "/usr/lib/nvidia/sriov-manage"


def build(host: SimHost, spec: SriovSpec) -> PciBus:
    """The PCI bus of an SR-IOV host: its drivers, the PF (made by the host for the iGPU, here for NVIDIA)."""
    bus = PciBus(host, spec.block_timeout_s, spec.mmio_ok)
    host_bridge = "0000:00:00.0"
    bus.add_function(Function(host_bridge, f"/sys/devices/pci0000:00/{host_bridge}", 0x8086, 0x3E0F, 0x060000,
                              express_type=4))
    if host.loaded("vfio_pci"):
        bus.add_driver(VfioPci(bus))
    if spec.kind in ("i915", "i915-stock"):
        gpu = host.spec.gpu
        assert gpu is not None, "an i915 SR-IOV host needs its iGPU (HostSpec.gpu)"
        function = Function(spec.address, f"/sys/devices/pci0000:00/{spec.address}", gpu.vendor_id,
                            gpu.device_id, spec.pci_class, express_type=9)
        pf = Pf(function, spec.total_vfs, spec.offset, spec.stride, spec.vf_device_id or gpu.device_id, spec.vf_class)
        bus.add_pf(pf)
        host_files(host, spec)
        if host.loaded("i915"):
            i915 = I915(bus, host, spec, pf)
            bus.add_driver(i915)
            i915.probe_pf()
    elif spec.kind == "nvidia":
        path = f"/sys/devices/pci0000:40/0000:40:01.1/{spec.address}"
        function = Function(spec.address, path, NVIDIA_VENDOR_ID, spec.device_id, spec.pci_class, express_type=0)
        host._add_pci_device(spec.address, path, NVIDIA_VENDOR_ID, spec.device_id, spec.pci_class, None,
                             host.iommu_on)
        pf = Pf(function, spec.total_vfs, spec.offset, spec.stride, spec.vf_device_id or spec.device_id,
                spec.vf_class)
        bus.add_pf(pf)
        if host.loaded("nvidia"):
            nvidia = Nvidia(bus, host, spec, pf)
            bus.add_driver(nvidia)
            bus.attach(function, nvidia)
        if spec.vgpu_driver:  # NVIDIA's vGPU host driver ships it
            host.vfs.put(SRIOV_MANAGE, Blob(data=bytearray(SRIOV_MANAGE_SCRIPT.encode()), mode=0o755))
    elif spec.kind == "xe":
        port = "" if spec.address.startswith("0000:00:") else "0000:00:01.0/"  # a dGPU behind a root port
        path = f"/sys/devices/pci0000:00/{port}{spec.address}"
        function = Function(spec.address, path, 0x8086, spec.device_id, spec.pci_class, express_type=0)
        host._add_pci_device(spec.address, path, 0x8086, spec.device_id, spec.pci_class, None, host.iommu_on)
        xe_pf = None
        if spec.total_vfs:  # B580: no SR-IOV capability, no sriov_* files
            xe_pf = Pf(function, spec.total_vfs, spec.offset, spec.stride, spec.vf_device_id or spec.device_id,
                       spec.vf_class)
            bus.add_pf(xe_pf)
        else:
            bus.add_function(function)
        if host.loaded("xe_vfio_pci"):
            bus.add_driver(XeVfioPci(bus))
        if host.loaded("xe"):
            xe = Xe(bus, host, spec, xe_pf)
            bus.add_driver(xe)
            bus.probe_device(function)  # xe may refuse it (force_probe)
            if function.driver == xe.name:
                for name, minor in (("card0", 0), ("renderD128", 128)):
                    host.vfs.put(f"{path}/drm/{name}/dev", Attr(show=const(f"226:{minor}\n")))
                    host.vfs.put(f"/sys/class/drm/{name}", Link(target=f"{path}/drm/{name}"))
    else:
        raise ValueError(f"unknown SR-IOV kind {spec.kind!r}")
    return bus


# ---------------------------------------------------------------- Intel i915-sriov-dkms


THRESHOLDS = ("cat_error_count", "engine_reset_count", "page_fault_count", "h2g_time_us", "irq_time_us",
              "doorbell_time_us")


@dataclass
class VfConfig:
    """One VF's provisioning on gt0 (prelim_iov/vfN/gt0)."""

    ggtt: int = 0
    contexts: int = 0
    doorbells: int = 0
    exec_quantum_ms: int = 0
    preempt_timeout_us: int = 0
    thresholds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(THRESHOLDS, 0))

    @property
    def empty(self) -> bool:
        return not (self.ggtt or self.contexts or self.doorbells)

    @property
    def valid(self) -> bool:
        return self.ggtt > 0 and self.contexts > 0


GUC_CONTEXTS = 65536
GUC_DOORBELLS = 256
GGTT_SPARE = 64 * MIB
LMEM_ALIGN = 2 * MIB  # pf_get_lmem_alignment(): SZ_2M
CONTEXTS_SPARE = 256


class I915(PfDriver):
    """i915-sriov-dkms bound to the iGPU; its id table takes the PF and (same device id) the VFs."""

    name = "i915"

    def __init__(self, bus: PciBus, host: SimHost, spec: SriovSpec, pf: Pf) -> None:
        super().__init__(bus)
        self.host, self.spec, self.pf = host, spec, pf
        self.stock = spec.kind == "i915-stock" or spec.dkms == "missing"  # "missing": the stock i915 loaded instead
        max_vfs = facts.as_int(host.module_param("i915", "max_vfs")) or 0
        guc = facts.as_int(host.module_param("i915", "enable_guc"))
        self.guc_submission = guc is not None and guc > 0 and bool(guc & 1) and spec.guc_firmware
        # pf_verify_readiness(): max_vfs, GuC submission, then the VF BARs ("VFs BAR not ready": native, totalvfs 0)
        self.pf_mode = not self.stock and max_vfs > 0 and self.guc_submission and bus.mmio_ok
        self.configure = None if self.stock else self._configure
        if not self.stock:  # i915_params.c: 0400, default 0
            host.vfs.put("/sys/module/i915/parameters/max_vfs", Attr(show=const(f"{max_vfs}\n"), mode=0o400))
        self.max_vfs = max_vfs
        self.auto = True
        self.auto_applied = False
        self.vf_configs = [VfConfig() for _ in range(pf.hw_total)]
        self.ggtt_spare = GGTT_SPARE
        self.contexts_spare = CONTEXTS_SPARE
        self.doorbells_spare = 0
        self.pf_values = {"exec_quantum_ms": 0, "preempt_timeout_us": 0}
        self.policies = {"sched_if_idle": False, "engine_reset": False, "sample_period_ms": 0}

    def matches(self, function: Function) -> bool:
        return (function.vendor, function.device) == (self.pf.function.vendor, self.pf.function.device)

    def probe_pf(self) -> None:
        """The PF's probe at boot (i915_sriov_probe, pf_verify_readiness): PF mode, or native with totalvfs 0."""
        function = self.pf.function
        function.driver = self.name  # the host linked it already
        self.host.vfs.put(f"/sys/bus/pci/drivers/{self.name}/{function.address}", Link(target=function.path))
        if self.stock:
            return
        if not self.pf_mode:
            self.pf.driver_limit = 0
            return
        self.pf.driver_limit = min(self.max_vfs, self.pf.hw_total)
        self.bus.log(function, f"{self.pf.driver_limit} VFs could be associated with this PF")
        self._build_prelim_iov()

    def probe(self, function: Function) -> None:
        if function.pf is not None and not self.guc_submission:
            raise fail(errno.ENODEV, "GuC submission disabled")  # a VF needs GuC submission

    def bound(self, function: Function) -> None:
        """A VF taken by the host's i915 ("Running in SR-IOV VF mode"): a DRM card and render node each; the PF
        bound again is probed again (its readiness sets totalvfs anew)."""
        if function is self.pf.function:
            self.probe_pf()
        if function.pf is None:
            return
        card, render = function.index + 1, 129 + function.index
        for name, minor in ((f"card{card}", card), (f"renderD{render}", render)):
            self.host.vfs.mkdirs(f"{function.path}/drm/{name}")
            self.host.vfs.put(f"{function.path}/drm/{name}/dev", Attr(show=const(f"226:{minor}\n")))
            self.host.vfs.put(f"/sys/class/drm/{name}", Link(target=f"{function.path}/drm/{name}"))
            self.host.vfs.put(f"/dev/dri/{name}", CharDev(major=226, minor=minor, mode=0o660 if minor < 128 else 0o666))

    def vf_opened(self, function: Function) -> None:
        self.bus.log(self.pf.function, f"VF{function.index + 1} FLR")

    def unbound(self, function: Function) -> None:
        if function.pf is None:
            return
        for name in (f"card{function.index + 1}", f"renderD{129 + function.index}"):
            self.host.vfs.drop(f"/sys/class/drm/{name}")
            self.host.vfs.drop(f"/dev/dri/{name}")
        self.host.vfs.drop(f"{function.path}/drm")

    # ---- enable / disable (i915_pci_sriov_configure, i915_sriov_pf_enable_vfs)
    def _configure(self, pf: Pf, count: int) -> None:
        if not self.pf_mode:
            raise fail(errno.ENODEV)
        if count == 0:
            assigned = sum(vf.assigned for vf in pf.vfs)
            if assigned:
                self.bus.log(pf.function, f"Can't disable {len(pf.vfs)} VFs, {assigned} are still assigned")
                raise fail(errno.EPERM)
            enabled = len(pf.vfs)
            self.bus.disable(pf)
            self.bus.log(pf.function, f"Disabled {enabled} VFs")
            for index in range(1, pf.total + 1):
                self.host.vfs.drop(f"{self.prelim}/vf{index}/device")
            if self.auto_applied:  # what auto-provisioning gave is released
                for config in self.vf_configs:
                    config.ggtt = config.contexts = config.doorbells = 0
                self.auto_applied = False
            return
        try:
            self._enable(pf, count)
        except OSError as e:
            self.bus.log(pf.function, f"Failed to enable {count} VFs (-{errno.errorcode.get(e.errno or 0, e.errno)})")
            raise
        self.bus.log(pf.function, f"Enabled {count} VFs")

    def _enable(self, pf: Pf, count: int) -> None:
        if self.spec.pf_status_errno:  # i915_sriov_pf_enable_vfs(): pf_get_status() < 0
            raise fail(self.spec.pf_status_errno, "the PF is not ready")
        configs = self.vf_configs[:count]
        if self.auto:
            if not all(c.empty for c in configs):
                raise fail(errno.EUCLEAN, "a VF is already provisioned")
            shares = self.fair_shares(count)
            if not all(shares):
                raise fail(errno.ENOSPC, "a fair share rounds to 0")
        else:
            shares = None
            if not (all(c.empty for c in configs) or all(c.valid for c in configs)):
                raise fail(errno.ENOKEY, "some VFs are only partly provisioned")  # [U: valid and empty mixed]
        if shares is not None:
            for config in configs:
                config.ggtt, config.contexts, config.doorbells = shares
        try:
            self.bus.enable(pf, count)
        except OSError:
            if shares is not None:
                for config in configs:
                    config.ggtt = config.contexts = config.doorbells = 0
            raise
        self.auto_applied = shares is not None
        for vf in pf.vfs:
            self.host.vfs.put(f"{self.prelim}/vf{vf.index + 1}/device", Link(target=vf.path))

    # ---- provisioning arithmetic (intel_iov_provisioning.c, pf_assign_ctxs_for_pf)
    def pf_contexts(self) -> int:
        total = self.pf.total
        return GUC_CONTEXTS - (GUC_CONTEXTS // (1 + total)) * total

    def ggtt_free(self) -> int:
        return self.spec.ggtt_free_mib * MIB - self.ggtt_spare - sum(c.ggtt for c in self.vf_configs)

    def contexts_free(self) -> int:
        used = sum(c.contexts for c in self.vf_configs)
        return GUC_CONTEXTS - self.pf_contexts() - self.contexts_spare - used

    def doorbells_free(self) -> int:
        return GUC_DOORBELLS - self.doorbells_spare - sum(c.doorbells for c in self.vf_configs)

    def fair_shares(self, count: int) -> tuple[int, int, int]:
        """(GGTT bytes aligned down to 4 KiB, contexts aligned down to 128, doorbells) per VF."""
        ggtt = max(self.ggtt_free(), 0) // count // 4096 * 4096
        contexts = max(self.contexts_free(), 0) // count // 128 * 128
        doorbells = max(self.doorbells_free(), 0) // count
        return ggtt, contexts, doorbells

    # ---- /sys/class/drm/card0/prelim_iov (i915_sriov_sysfs.c, intel_iov_sysfs.c)
    @property
    def prelim(self) -> str:
        return f"{self.pf.function.path}/drm/card0/prelim_iov"

    def _build_prelim_iov(self) -> None:
        fs, base = self.host.vfs, self.prelim
        fs.put(f"{base}/mode", Attr(show=const("SR-IOV PF\n")))
        fs.put(f"{base}/pf/auto_provisioning", Attr(show=lambda: f"{int(self.auto)}\n", store=self._auto_store))
        fs.put(f"{base}/pf/device", Link(target=self.pf.function.path))
        gt = f"{base}/pf/gt0"
        for name in self.pf_values:
            fs.put(f"{gt}/{name}", self._number(partial(self.pf_values.__getitem__, name),
                                                partial(self.pf_values.__setitem__, name), 32))
        fs.put(f"{gt}/ggtt_spare", self._number(lambda: self.ggtt_spare, self._ggtt_spare_store, 64))
        fs.put(f"{gt}/contexts_spare", self._number(lambda: self.contexts_spare, self._contexts_spare_store, 16))
        fs.put(f"{gt}/doorbells_spare", self._number(lambda: self.doorbells_spare, self._doorbells_spare_store, 16))
        available = {"ggtt_free": self.ggtt_free, "ggtt_max_quota": self.ggtt_free,
                     "contexts_free": self.contexts_free, "contexts_max_quota": self.contexts_free,
                     "doorbells_free": self.doorbells_free, "doorbells_max_quota": self.doorbells_free}
        for name, value in available.items():
            fs.put(f"{gt}/available/{name}", Attr(show=partial(_show_number, value)))
        for name in self.policies:
            fs.put(f"{gt}/policies/{name}", Attr(show=partial(self._policy_show, name),
                                                  store=partial(self._policy_store, name)))
        for index, config in enumerate(self.vf_configs[: self.pf.total], start=1):
            vf = f"{base}/vf{index}"
            fs.put(f"{vf}/id", Attr(show=const(f"{index}\n")))
            fs.put(f"{vf}/control", Attr(store=partial(self._control_store, config)))
            for name, bits in (("ggtt_quota", 64), ("contexts_quota", 16), ("doorbells_quota", 16),
                               ("exec_quantum_ms", 32), ("preempt_timeout_us", 32)):
                attr = name.removesuffix("_quota")
                fs.put(f"{vf}/gt0/{name}", self._number(partial(getattr, config, attr),
                                                        partial(setattr, config, attr), bits))
            fs.put(f"{vf}/gt0/state", Attr(show=const("\0" * 4096), store=lambda text: None, mode=0o600,
                                           binary=True))
            for name in THRESHOLDS:
                fs.put(f"{vf}/gt0/threshold/{name}", self._number(partial(config.thresholds.__getitem__, name),
                                                                  partial(config.thresholds.__setitem__, name), 32))

    def _number(self, get: Callable[[], int], set_: Callable[[int], None], bits: int) -> Attr:
        """A decimal attribute parsed as kstrtou<bits> (EINVAL, ERANGE), then checked by set_."""

        def store(text: str) -> None:
            with self.host.lock:
                set_(kstrtou(text, bits))

        return Attr(show=lambda: f"{get()}\n", store=store)

    def _auto_store(self, text: str) -> None:
        with self.host.lock:
            value = kstrtobool(text)
            if value and not self.auto and not all(c.empty for c in self.vf_configs):
                raise fail(errno.ESTALE, "VFs are provisioned")
            self.auto = value

    def _ggtt_spare_store(self, value: int) -> None:
        if value and value < GGTT_SPARE:
            raise fail(errno.EINVAL)
        self.ggtt_spare = -(-value // 4096) * 4096 if value else GGTT_SPARE

    def _contexts_spare_store(self, value: int) -> None:
        if 0 < value < CONTEXTS_SPARE:
            raise fail(errno.EINVAL)
        self.contexts_spare = value or CONTEXTS_SPARE

    def _doorbells_spare_store(self, value: int) -> None:
        if value > GUC_DOORBELLS:
            raise fail(errno.EINVAL)
        self.doorbells_spare = value

    def _policy_show(self, name: str) -> str:
        value = self.policies[name]
        return f"{int(value)}\n"

    def _policy_store(self, name: str, text: str) -> None:
        with self.host.lock:
            self.policies[name] = kstrtobool(text) if name != "sample_period_ms" else kstrtou(text, 32)

    def _control_store(self, config: VfConfig, text: str) -> None:
        word = text.strip()
        if word not in ("stop", "pause", "resume", "clear"):
            raise fail(errno.EINVAL)
        if word == "clear":  # [U] clear = the VF's provisioning released
            with self.host.lock:
                config.ggtt = config.contexts = config.doorbells = 0


def _show_number(value: object) -> str:
    assert callable(value)
    return f"{value()}\n"


# ---------------------------------------------------------------- NVIDIA vendor-specific VFIO


@dataclass(frozen=True)
class VgpuType:
    type_id: int
    name: str
    framebuffer_mib: int


def _catalogue(prefix: str, sizes: tuple[int, ...], first_id: int, suffix: str) -> list[VgpuType]:
    return [VgpuType(first_id + i, f"NVIDIA {prefix}-{gib}{suffix}", gib * 1024) for i, gib in enumerate(sizes)]


# Type ids are card-local and these are stand-ins [U], except H200X-141C = 1428 (sriov.md 3.3).
CATALOGUES: dict[str, tuple[int, list[VgpuType]]] = {
    "L40S": (48 * 1024, [*_catalogue("L40S", (1, 2, 4, 6, 8, 12, 16, 24, 48), 1155, "Q"),
                         *_catalogue("L40S", (4, 6, 8, 12, 16, 24, 48), 1170, "C")]),
    "H200": (141 * 1024, [VgpuType(1428, "NVIDIA H200X-141C", 141 * 1024),
                          *_catalogue("H200X", (70, 35, 17), 1429, "C")]),
}
CREATABLE_HEADER = "ID    : vGPU Name\n"


@dataclass
class VfState:
    current: int = 0
    params: list[str] = field(default_factory=list)
    gpu_instance_id: int = 0
    placement_id: int = 0
    warm_update: int = 0


class Nvidia(PfDriver):
    """nvidia.ko with vGPU 17+ on an Ada/Hopper PF: VFs stay on nvidia, each with ``nvidia/`` (sriov.md 3.3)."""

    name = "nvidia"

    def __init__(self, bus: PciBus, host: SimHost, spec: SriovSpec, pf: Pf) -> None:
        super().__init__(bus)
        self.host, self.spec, self.pf = host, spec, pf
        self.total_mib, self.types = CATALOGUES[spec.model]
        self.by_id = {t.type_id: t for t in self.types}
        self.vf_state: dict[str, VfState] = {}
        self.unbind_lock = False
        self.heterogeneous = False
        self.broken: set[str] = set()  # VFs rebound away from nvidia: unusable until SR-IOV is cycled
        self.configure = self._configure
        lock = f"/proc/driver/nvidia/gpus/{pf.function.address}/unbindLock"
        host.vfs.put(lock, Attr(show=lambda: f"{int(self.unbind_lock)}\n", store=self._unbind_lock_store,
                                mode=0o644))

    def matches(self, function: Function) -> bool:
        return function.vendor == NVIDIA_VENDOR_ID and function.pci_class >> 16 == 0x03

    def _unbind_lock_store(self, text: str) -> None:
        """Write 1 to try for the lock (read back 1 if granted), 0 to release it."""
        with self.host.lock:
            want = kstrtou(text, 32) != 0
            self.unbind_lock = want and not self.bus.held and not any(vf.open_count for vf in self.pf.vfs)

    def _configure(self, pf: Pf, count: int) -> None:
        if not self.unbind_lock:
            raise fail(self.spec.numvfs_errno, "use sriov-manage")
        if count == 0:
            self.bus.disable(pf)
            self.vf_state.clear()
            self.broken.clear()
            self.heterogeneous = False
        else:
            self.bus.enable(pf, count)

    def probe(self, function: Function) -> None:
        if function.pf is not None and function.address in self.broken:
            raise fail(errno.EINVAL, "vfio_pci_core_device not found")

    def bound(self, function: Function) -> None:
        if function.pf is None:
            return
        state = self.vf_state.setdefault(function.address, VfState())
        base = f"{function.path}/nvidia"
        fs = self.host.vfs
        fs.put(f"{base}/creatable_vgpu_types", Attr(show=partial(self._creatable_show, function)))
        fs.put(f"{base}/current_vgpu_type", Attr(show=lambda: f"{state.current}\n",
                                                 store=partial(self._current_store, function)))
        for name in ("gpu_instance_id", "placement_id", "warm_update"):
            fs.put(f"{base}/{name}", Attr(show=partial(_show_attr, state, name),
                                          store=partial(self._int_store, state, name)))
        fs.put(f"{base}/vgpu_params", Attr(show=lambda: "".join(p + "\n" for p in state.params),
                                           store=partial(self._params_store, function)))

    def unbound(self, function: Function) -> None:
        if function.pf is not None:
            self.host.vfs.drop(f"{function.path}/nvidia")
            self.vf_state.pop(function.address, None)
            self.broken.add(function.address)  # nvidia-vgpu-vfio's registration is gone

    def vf_rebind(self, function: Function, driver: PfDriver) -> None:
        if driver is not self:
            raise fail(errno.EINVAL, "NVIDIA vGPU VFs must stay on nvidia")

    # ---- types and placement (homogeneous unless heterogeneous mode)
    def _used(self) -> list[VgpuType]:
        return [self.by_id[s.current] for s in self.vf_state.values() if s.current]

    def creatable(self, function: Function) -> list[VgpuType]:
        state = self.vf_state.get(function.address)
        if state is None or state.current:
            return []
        used = self._used()
        free = self.total_mib - sum(t.framebuffer_mib for t in used)
        sizes = {t.framebuffer_mib for t in used}
        return [t for t in self.types if t.framebuffer_mib <= free
                and (self.heterogeneous or not sizes or t.framebuffer_mib in sizes)]

    def _creatable_show(self, function: Function) -> str:
        with self.host.lock:
            return CREATABLE_HEADER + "".join(f"{t.type_id} : {t.name}\n" for t in self.creatable(function))

    def _current_store(self, function: Function, text: str) -> None:
        """0 releases (EPERM while open and release_delay_s after); an id not creatable here EINVAL; a
        different id over a set one EBUSY [U errnos but EPERM]."""
        with self.host.lock:
            try:
                value = int(text.strip(), 0)
            except ValueError:
                raise fail(errno.EINVAL) from None
            state = self.vf_state[function.address]
            if value == state.current:
                return
            if value == 0:
                recently = time.monotonic() - function.closed_at < self.spec.release_delay_s
                if function.open_count or recently:
                    raise fail(errno.EPERM, "the vGPU is in use")
                state.current, state.params = 0, []
                return
            if state.current:
                raise fail(self.spec.type_change_errno, "write 0 first")
            if value not in {t.type_id for t in self.creatable(function)}:
                raise fail(self.spec.type_refused_errno, f"type {value} cannot be created on this VF now")
            state.current = value

    def _int_store(self, state: VfState, name: str, text: str) -> None:
        try:
            setattr(state, name, int(text.strip(), 0))
        except ValueError:
            raise fail(errno.EINVAL) from None

    def _params_store(self, function: Function, text: str) -> None:
        with self.host.lock:
            state = self.vf_state[function.address]
            if "=" not in text:
                raise fail(errno.EINVAL)
            if not state.current or function.open_count:
                raise fail(errno.EBUSY, "set a type first, with the VF closed")  # [U]
            state.params.append(text.strip())


def _show_attr(state: object, name: str) -> str:
    return f"{getattr(state, name)}\n"


SRIOV_MANAGE_SCRIPT = r"""#!/bin/sh
# A stand-in for NVIDIA's sriov-manage on vgpuctl's simulated host: enables (-e) or disables (-d) every VF
# of an NVIDIA PF through the driver's unbind lock. The root is found from the script's own place, so it
# works on the mounted simulator as well (sh <root>/usr/lib/nvidia/sriov-manage -e ALL).
root=$(cd "$(dirname "$0")/../../.." && pwd); root=${root%/}
usage() { echo "Usage: sriov-manage <-e|-d> <ssss:bb:dd.f|ALL>" >&2; exit 1; }
[ $# -eq 2 ] || usage
case "$1" in -e) mode=enable ;; -d) mode=disable ;; *) usage ;; esac
if [ "$2" = ALL ]; then gpus=$(ls "$root/proc/driver/nvidia/gpus"); else gpus=$2; fi
rc=0
for gpu in $gpus; do
    dev=$root/sys/bus/pci/devices/$gpu
    lock=$root/proc/driver/nvidia/gpus/$gpu/unbindLock
    if [ ! -e "$dev/sriov_totalvfs" ] || [ ! -e "$lock" ]; then
        echo "$gpu is not an SR-IOV capable NVIDIA GPU" >&2; rc=1; continue
    fi
    if [ $mode = disable ]; then
        for vf in "$dev"/virtfn*; do
            [ -e "$vf/nvidia/current_vgpu_type" ] && echo 0 > "$vf/nvidia/current_vgpu_type" 2>/dev/null
        done
    fi
    echo 1 > "$lock"
    if [ "$(cat "$lock")" != 1 ]; then
        echo "Cannot obtain unbindLock for $gpu" >&2; rc=1; continue
    fi
    if [ $mode = enable ]; then
        echo "Enabling VFs on $gpu"
        if [ "$(cat "$dev/sriov_numvfs")" = 0 ]; then cat "$dev/sriov_totalvfs" > "$dev/sriov_numvfs" || rc=1; fi
    else
        echo "Disabling VFs on $gpu"
        echo 0 > "$dev/sriov_numvfs" || rc=1
    fi
    echo 0 > "$lock"
done
exit $rc
"""


# ---------------------------------------------------------------- Intel xe (2.2, 2.3, 2.4.2-2.4.4, 7.3)

XE_UNLIMITED = 4294967295  # xe.max_vfs default ~0, as a uint
XE_GGTT_PROFILE = 3584 * MIB  # 0xFEE00000 aligned down to 512 MiB
XE_CLAMPS = {"exec_quantum_ms": 100000, "preempt_timeout_us": 100000000}  # "GuC will silently clamp"
PRIORITIES = ("low", "normal", "high")


def _pow2_floor(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 0


@dataclass
class XeVf:
    ggtt: int = 0
    contexts: int = 0
    doorbells: int = 0
    vram: int = 0
    profile: dict[str, int] = field(default_factory=lambda: {"exec_quantum_ms": 0, "preempt_timeout_us": 0})

    @property
    def empty(self) -> bool:
        return not (self.ggtt or self.contexts or self.doorbells or self.vram)


class Xe(PfDriver):
    """The upstream xe driver on a Battlemage (Arc Pro B60) PF, or on a platform without has_sriov."""

    name = "xe"

    def __init__(self, bus: PciBus, host: SimHost, spec: SriovSpec, pf: Pf | None) -> None:
        super().__init__(bus)
        self.host, self.spec, self.pf = host, spec, pf
        self.configure = self._configure
        param = facts.as_int(host.module_param("xe", "max_vfs"))
        self.max_vfs = XE_UNLIMITED if param is None else param
        host.vfs.put("/sys/module/xe/parameters/max_vfs", Attr(show=const(f"{self.max_vfs}\n"), mode=0o400))
        self.configfs_max_vfs: int | None = None  # None: "unlimited"
        self.custom = False  # provisioning mode: auto until a quota is written by hand
        self.vfs = [XeVf() for _ in range(pf.hw_total if pf else 0)]
        self.pf_priority = "low"

    @property
    def is_pf(self) -> bool:
        """xe_sriov_pf_readiness: has_sriov (and for BMG a 6.17+ kernel), max_vfs > 0."""
        limit = self.max_vfs if self.configfs_max_vfs is None else self.configfs_max_vfs
        return self.pf is not None and self.spec.xe_has_sriov and self.host.kernel.at_least(6, 17) and limit > 0

    @property
    def base(self) -> str:
        assert self.pf is not None
        return self.pf.function.path

    def matches(self, function: Function) -> bool:
        return function.vendor == 0x8086 and function.device == self.spec.device_id  # PF and (same id) VFs

    def probe(self, function: Function) -> None:
        """xe_pci_probe(): a require_force_probe platform needs xe.force_probe=<id> (or *); "!<id>" blocks."""
        tokens = (self.host.module_param("xe", "force_probe") or "").split(",")
        device = f"{function.device:04x}"
        if self.spec.xe_force_probe and not ({"*", device} & set(tokens)):
            self.bus.kmsg.append(
                f"xe {function.address}: Your graphics device {device} is not officially supported\n"
                f"by xe driver in this kernel version. To force Xe probe,\n"
                f"use xe.force_probe='{device}' and i915.force_probe='!{device}'\n"
                f"module parameters or CONFIG_DRM_XE_FORCE_PROBE='{device}' and\n"
                f"CONFIG_DRM_I915_FORCE_PROBE='!{device}' configuration options.")
            raise fail(errno.ENODEV)
        if {"!*", f"!{device}"} & set(tokens):
            self.bus.kmsg.append(f"xe {function.address}: Probe blocked for device [8086:{device}].")
            raise fail(errno.ENODEV)

    def probe_pf(self) -> None:
        """xe's probe of the PF (at boot, or a bind after an unbind): PF mode, or totalvfs 0."""
        if self.pf is None:
            return
        fs = self.host.vfs
        fs.put(f"/sys/kernel/config/xe/{self.pf.function.address}/sriov/max_vfs",
               Attr(show=self._configfs_show, store=self._configfs_store))
        if not self.is_pf:
            self.pf.driver_limit = 0
            self.bus.log(self.pf.function, "Support for SR-IOV is not available" if not self.spec.xe_has_sriov
                         else "all VFs disabled")
            return
        self.bus.log(self.pf.function, "Running in SR-IOV PF mode")
        limit = self.max_vfs if self.configfs_max_vfs is None else self.configfs_max_vfs
        self.pf.driver_limit = min(limit, self.pf.hw_total)
        if self.host.kernel.at_least(6, 19):
            self._build_sriov_admin()
        self._build_debugfs()

    def bound(self, function: Function) -> None:
        if function is (self.pf.function if self.pf else None):
            self.probe_pf()

    def unbound(self, function: Function) -> None:
        if self.pf is not None and function is self.pf.function:
            self.host.vfs.drop(f"{self.base}/sriov_admin")
            self.host.vfs.drop(f"/sys/kernel/debug/dri/{function.address}")
            self.host.vfs.drop("/sys/kernel/debug/dri/0")

    def _configfs_show(self) -> str:
        return "unlimited\n" if self.configfs_max_vfs is None else f"{self.configfs_max_vfs}\n"

    def _configfs_store(self, text: str) -> None:
        """xe_configfs.c: a number or "unlimited", read at probe only; EBUSY while the device is bound."""
        with self.host.lock:
            assert self.pf is not None
            if self.pf.function.driver == self.name:
                raise fail(errno.EBUSY)
            self.configfs_max_vfs = None if text.strip() == "unlimited" else kstrtou(text, 32)

    # ---- enable / disable (xe_pci_sriov_configure, xe_sriov_pf_provision.c)
    def _configure(self, pf: Pf, count: int) -> None:
        if not self.is_pf:
            raise fail(errno.ENODEV)
        if count == 0:
            enabled = len(pf.vfs)
            self.bus.disable(pf)
            self.bus.log(pf.function, f"Disabled {enabled} VF{'s' if enabled > 1 else ''}")
            for index in range(1, pf.total + 1):
                self.host.vfs.drop(f"{self.base}/sriov_admin/vf{index}/device")
            if not self.custom:
                for vf in self.vfs:
                    vf.ggtt = vf.contexts = vf.doorbells = vf.vram = 0
            return
        try:
            self._enable(pf, count)
        except OSError as e:
            plural = "s" if count > 1 else ""
            self.bus.log(pf.function, f"Failed to enable {count} VF{plural} (-{errno.errorcode.get(e.errno or 0)})")
            raise
        self.bus.log(pf.function, f"Enabled {count} of {pf.total} VF{'s' if count > 1 else ''}")

    def _enable(self, pf: Pf, count: int) -> None:
        chosen = self.vfs[:count]
        if not self.custom:
            if not all(vf.empty for vf in chosen):
                raise fail(errno.EUCLEAN, "VFs are already provisioned")
            ggtt, contexts, doorbells = self.fair_shares(count)
            vram = self.fair_lmem(count)
            if not ggtt:
                raise fail(errno.ENOSPC)
            for vf in chosen:
                vf.ggtt, vf.contexts, vf.doorbells, vf.vram = ggtt, contexts, doorbells, vram
        try:
            self.bus.enable(pf, count)
        except OSError:
            if not self.custom:
                for vf in chosen:
                    vf.ggtt = vf.contexts = vf.doorbells = vf.vram = 0
            raise
        if self.host.kernel.at_least(6, 19):
            for vf_function in pf.vfs:
                self.host.vfs.put(f"{self.base}/sriov_admin/vf{vf_function.index + 1}/device",
                                  Link(target=vf_function.path))

    def fair_shares(self, count: int) -> tuple[int, int, int]:
        """2.4.4: min(estimate, profile) for GGTT, contexts and doorbells."""
        profile = 56 * MIB if count > 56 else _pow2_floor(XE_GGTT_PROFILE // count // MIB) * MIB
        # pf_get_ggtt_alignment(): 64 KiB on a dGPU with XE_VRAM_FLAGS_NEED64K [U for BMG], 4 KiB on an iGPU
        align = 4096 if self.spec.address.startswith("0000:00:") else 65536
        estimate = max(self.spec.ggtt_free_mib * MIB - GGTT_SPARE, 0) // count // align * align
        contexts = min(_pow2_floor(65535 // count), (GUC_CONTEXTS - CONTEXTS_SPARE) // count)
        doorbells = min(_pow2_floor(GUC_DOORBELLS // (count + 1)), GUC_DOORBELLS // count)
        return min(estimate, profile), contexts, doorbells

    def fair_lmem(self, count: int) -> int:
        """pf_estimate_fair_lmem() (xe_gt_sriov_pf_config.c): the VRAM left after the PF's spare, split evenly,
        2 MiB aligned (current kernels: no power-of-two rounding, no 2 GiB cap); 0 without VRAM (an iGPU)."""
        if not self.spec.vram_mib:
            return 0
        available = max(self.spec.vram_mib - self.spec.lmem_spare_mib, 0) * MIB // LMEM_ALIGN * LMEM_ALIGN
        return available // count // LMEM_ALIGN * LMEM_ALIGN

    # ---- sysfs sriov_admin (6.19+, xe_sriov_pf_sysfs.c)
    def _build_sriov_admin(self) -> None:
        assert self.pf is not None
        fs, admin = self.host.vfs, f"{self.base}/sriov_admin"
        vram = self.host.kernel.at_least(7, 0)
        bulk = f"{admin}/.bulk_profile"
        for name in XE_CLAMPS:
            fs.put(f"{bulk}/{name}", Attr(store=partial(self._bulk_store, name)))
        fs.put(f"{bulk}/sched_priority", Attr(store=self._bulk_priority_store))
        if vram:
            fs.put(f"{bulk}/vram_quota", Attr(store=partial(self._bulk_store, "vram_quota")))
        fs.put(f"{admin}/pf/device", Link(target=self.base))
        pf_profile = {"exec_quantum_ms": 0, "preempt_timeout_us": 0}
        for name in XE_CLAMPS:
            fs.put(f"{admin}/pf/profile/{name}", self._profile_attr(pf_profile, name))
        fs.put(f"{admin}/pf/profile/sched_priority", Attr(show=lambda: _priorities(self.pf_priority, 3),
                                                          store=self._pf_priority_store))
        for index, vf in enumerate(self.vfs[: self.pf.total], start=1):
            base = f"{admin}/vf{index}"
            fs.put(f"{base}/stop", Attr(store=self._stop_store))
            for name in XE_CLAMPS:
                fs.put(f"{base}/profile/{name}", self._profile_attr(vf.profile, name))
            fs.put(f"{base}/profile/sched_priority", Attr(show=lambda: _priorities(self.pf_priority, 2)))
            if vram:
                fs.put(f"{base}/profile/vram_quota", Attr(show=partial(_show_attr, vf, "vram"),
                                                          store=partial(self._quota_store, vf, "vram", 64)))

    def _profile_attr(self, values: dict[str, int], name: str) -> Attr:
        def store(text: str) -> None:
            with self.host.lock:
                value = min(kstrtou(text, 32), XE_CLAMPS[name])
                self._admin_fault(self.spec.admin_store_errno)
                values[name] = value

        def show() -> str:
            self._admin_fault(self.spec.admin_show_errno)
            return f"{values[name]}\n"

        return Attr(show=show, store=store)

    def _admin_fault(self, code: int) -> None:
        """sriov_admin's errors past parsing (sriov.md 2.4.2): EPERM not applicable, EIO the GuC refused (a
        store); EUCLEAN the GTs' values differ (a show)."""
        if code:
            raise fail(code)

    def _bulk_store(self, name: str, text: str) -> None:
        with self.host.lock:
            if name == "vram_quota":
                value = kstrtou(text, 64)
                for vf in self.vfs:
                    vf.vram = value
                self.custom = True
                return
            value = min(kstrtou(text, 32), XE_CLAMPS[name])
            self._admin_fault(self.spec.admin_store_errno)
            for vf in self.vfs:
                vf.profile[name] = value

    def _bulk_priority_store(self, text: str) -> None:
        if text.strip() not in PRIORITIES[:2]:  # "high" is for the PF alone
            raise fail(errno.EINVAL)
        self.pf_priority = text.strip()

    def _pf_priority_store(self, text: str) -> None:
        if text.strip() not in PRIORITIES:
            raise fail(errno.EINVAL)
        self.pf_priority = text.strip()

    def _stop_store(self, text: str) -> None:
        if not kstrtobool(text):
            raise fail(errno.EINVAL)  # [U] only "stop" is an action

    def _quota_store(self, vf: XeVf, attr: str, bits: int, text: str) -> None:
        with self.host.lock:
            setattr(vf, attr, kstrtou(text, bits))
            self.custom = True  # an admin provisions by hand: custom mode, nothing released on disable

    # ---- debugfs (xe_gt_sriov_pf_debugfs.c, xe_tile_sriov_pf_debugfs.c): /sys/kernel/debug/dri/<BDF>
    def _build_debugfs(self) -> None:
        assert self.pf is not None
        fs = self.host.vfs
        dri = f"/sys/kernel/debug/dri/{self.pf.function.address}"
        fs.put("/sys/kernel/debug/dri/0", Link(target=dri))  # [U] which one is the link
        fs.put(f"{dri}/sriov/pf/tile0/ggtt_spare", Attr(show=const(f"{GGTT_SPARE}\n")))
        fs.put(f"{dri}/sriov/pf/tile0/gt0/contexts_spare", Attr(show=const(f"{CONTEXTS_SPARE}\n")))
        fs.put(f"{dri}/gt0/pf", Link(target=f"{dri}/sriov/pf/tile0/gt0"))
        for index, vf in enumerate(self.vfs[: self.pf.total], start=1):
            tile = f"{dri}/sriov/vf{index}/tile0"
            for attr, path, bits in (("ggtt", f"{tile}/ggtt_quota", 64), ("vram", f"{tile}/vram_quota", 64),
                                     ("contexts", f"{tile}/gt0/contexts_quota", 32),
                                     ("doorbells", f"{tile}/gt0/doorbells_quota", 32)):
                fs.put(path, Attr(show=partial(_show_attr, vf, attr), store=partial(self._quota_store, vf, attr, bits),
                                  mode=0o644))
            fs.put(f"{tile}/gt0/ggtt_quota", Link(target=f"{tile}/ggtt_quota"))
            fs.put(f"{tile}/gt0/lmem_quota", Link(target=f"{tile}/vram_quota"))
            fs.put(f"{dri}/gt0/vf{index}", Link(target=f"{tile}/gt0"))


def _priorities(current: str, allowed: int) -> str:
    return " ".join(f"[{p}]" if p == current else p for p in PRIORITIES[:allowed]) + "\n"


# ---------------------------------------------------------------- around the driver: DKMS, Secure Boot, firmware
# (sriov.md 6: 1, 3, 8, 10) [U: modelled, not observed]. A DKMS module is a file of NUL-separated modinfo strings
# (what an uncompressed .ko's .modinfo section holds, so facts.parse_modinfo reads a real one alike), ending in
# the kernel's "~Module signature appended~\n" marker when signed; dkms's tree has a directory per kernel it built
# for. The firmware's SecureBoot variable is efivarfs's: 4 attribute bytes, then the value.

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-e0c0a0d3f9b9"
MODULE_SIGNATURE = b"~Module signature appended~\n"
DKMS_VERSION = "2026.05.06"


def older_kernel(release: str) -> str:
    """The kernel before an update: one minor version down (6.8.0 -> 6.7.0)."""
    major, minor, *_ = [*release.split("-")[0].split("."), "0", "0"]
    return f"{major}.{max(int(minor) - 1, 0)}.0" if int(minor) else f"{int(major) - 1}.19.0"


def dkms_module(vermagic: str, signed: bool) -> bytes:
    modinfo = [f"version={DKMS_VERSION}", "license=GPL and additional rights", "name=i915",
               f"vermagic={vermagic} SMP preempt mod_unload modversions "]
    return b"\x7fELF" + b"\0".join(s.encode() for s in modinfo) + b"\0" + (MODULE_SIGNATURE if signed else b"")


def refused_modules(host: SimHost) -> tuple[str, ...]:
    """Modules that fail to load: i915-sriov-dkms of another kernel's vermagic ("Exec format error"), or unsigned
    / signed with a key the firmware does not trust while Secure Boot is on ("Key was rejected by service")."""
    spec = host.spec.sriov
    if spec is None or spec.kind != "i915" or spec.dkms == "missing":
        return ()
    if spec.dkms == "wrong-kernel" or (spec.secure_boot and spec.module_key != "enrolled"):
        return ("i915",)
    return ()


def host_files(host: SimHost, spec: SriovSpec) -> None:
    """What an i915 SR-IOV host has on disk around the driver: i915-sriov-dkms's module and dkms tree (for the
    running kernel, or for the one before), DKMS's signing key, the SecureBoot variable, the GuC firmware."""
    from vgpuctl.backends.gvt_platforms import platform_for
    from vgpuctl.backends.sriov_intel import GUC_FIRMWARE_PREFIX

    fs, release = host.vfs, host.spec.kernel
    value = b"\x06\x00\x00\x00" + (b"\x01" if spec.secure_boot else b"\x00")
    fs.put(f"/sys/firmware/efi/efivars/SecureBoot-{EFI_GLOBAL}", Blob(data=bytearray(value), mode=0o644))
    gpu = host.spec.gpu
    platform = platform_for(gpu.device_id) if gpu is not None else None
    prefix = GUC_FIRMWARE_PREFIX.get(platform.name.split(" (")[0]) if platform else None
    if prefix and spec.guc_firmware:
        fs.put(f"/lib/firmware/i915/{prefix}_guc_70.bin", Blob(data=bytearray(b"GuC"), mode=0o644))
    if spec.kind != "i915":
        return
    built_for = release if spec.dkms == "built" else older_kernel(release)
    signed = spec.module_key != "unsigned"
    fs.put(f"/var/lib/dkms/i915-sriov-dkms/{DKMS_VERSION}/{built_for}/x86_64/module/i915.ko",
           Blob(data=bytearray(dkms_module(built_for, signed)), mode=0o644))
    module_release = release if spec.dkms in ("built", "wrong-kernel") else built_for
    fs.put(f"/lib/modules/{module_release}/updates/dkms/i915.ko",
           Blob(data=bytearray(dkms_module(built_for, signed)), mode=0o644))
    if signed:
        fs.put("/var/lib/dkms/mok.pub", Blob(data=bytearray(b"0\x82 DKMS signing key"), mode=0o644))
