"""``vgpuctl doctor``: is this host ready to run Intel GVT-g vGPUs under KVM, and if not, what to change.

Every check of the spec's readiness list (kernel-mdev-gvt.md 4.4) and more, in order. Each one
gives a status (ok / warn / fail / skip), the evidence it read (a file and its value) and, when
something is wrong, the fix: an exact command or file change. A check that depends on an earlier
one that failed is skipped and says which. The report ends with a one-line verdict; the host is
ready when no check failed.

Everything is read through a :class:`~vgpuctl.host.HostRoot`, so a simulated host is judged like a
real one, with two exceptions: the KVM device and a test guest are this machine's, not the
simulated host's, so those are not probed there; QEMU is this machine's binary in both cases.
The slow parts (a tiny KVM guest, QEMU's own answers about its devices) run in background threads
while the files are read.
"""

from __future__ import annotations

import os
import re
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from vgpuctl.host import facts
from vgpuctl.host.platforms import (
    DEFAULT_FENCES,
    DEFAULT_GGTT_MIB,
    HOST_FENCES,
    HOST_HIGH_GM_MIB,
    HOST_LOW_GM_MIB,
    INTEL_VENDOR_ID,
    MAX_VGPUS_PER_GPU,
    Platform,
    gvt_types,
    platform_for,
)
from vgpuctl.host.root import HostRoot

if TYPE_CHECKING:
    from vgpuctl.host.kvm import KvmReport
    from vgpuctl.host.qemu import QemuReport

Status = Literal["ok", "warn", "fail", "skip"]
MARKS: dict[str, str] = {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}

IGPU = "0000:00:02.0"
IGPU_DIR = f"/sys/bus/pci/devices/{IGPU}"
KVM_API_VERSION = 12  # KVM_GET_API_VERSION has answered 12 since 2.6.22
# Budgets that keep the whole doctor within a second on a real host (bench/bench_doctor.py).
GUEST_TIMEOUT_S = 0.7
QEMU_TIMEOUT_S = 0.7
# RLIMIT_MEMLOCK a GVT-g guest needs is not verified anywhere (spec 4.4 item 7 [U]). vfio type1
# charges every page the vGPU pins to the QEMU process; we assume what libvirt sets for any VM with
# a VFIO device: guest RAM + 1 GiB, for a 4 GiB guest.
ASSUMED_GUEST_MIB = 4096
MEMLOCK_NEEDED_MIB = ASSUMED_GUEST_MIB + 1024
CAP_IPC_LOCK = 14
APERTURE_ADVICE_MIB = 1024  # the aperture that fits the most small vGPUs (7) with a 4 GiB GGTT
# gvt-linux issue #216: GVT-g init on Comet Lake broke in 5.19.x
GVT_INIT_HINT = ("GVT-g device init failed inside i915: look for 'Fail to init GVT device' or "
                 "'Unsupported device' with: dmesg | grep -iE 'gvt|kvmgt' (5.19.x on Comet Lake: "
                 "'assign a handler to a non-tracked mmio 4ab8', gvt-linux #216)")

GRUB_ADD = "sed -i 's/^GRUB_CMDLINE_LINUX_DEFAULT=\"/&{param} /' /etc/default/grub && update-grub && reboot"

VENDORS = {0x8086: "Intel", 0x1002: "AMD", 0x10DE: "NVIDIA", 0x1AF4: "Red Hat (virtio)", 0x1B36: "Red Hat (QEMU)",
           0x1234: "QEMU (Bochs)", 0x15AD: "VMware", 0x1013: "Cirrus Logic", 0x102B: "Matrox", 0x1A03: "ASPEED"}
PCI_CLASSES = {0x00: "unclassified device", 0x01: "storage controller", 0x02: "network controller",
               0x03: "display controller", 0x04: "multimedia controller", 0x05: "memory controller",
               0x06: "bridge", 0x07: "communication controller", 0x08: "system peripheral", 0x0C: "serial bus"}

# Gen11+ Intel graphics: whether SR-IOV replaces GVT-g there, and through which driver (spec sriov.md 2.1).
_SRIOV_DKMS_OR_XE = "the out-of-tree i915-sriov-dkms module, or the xe driver (xe.force_probe=<id>)"
SRIOV_BY_PLATFORM: dict[str, str | None] = {
    "Tiger Lake": _SRIOV_DKMS_OR_XE,
    "Alder Lake-S": _SRIOV_DKMS_OR_XE,
    "Alder Lake-P": _SRIOV_DKMS_OR_XE,
    "Alder Lake-N": _SRIOV_DKMS_OR_XE,
    "Raptor Lake-S": _SRIOV_DKMS_OR_XE,
    "Raptor Lake-P": _SRIOV_DKMS_OR_XE,
    "Raptor Lake-U": _SRIOV_DKMS_OR_XE,
    "Meteor Lake": "the out-of-tree i915-sriov-dkms module (xe has no SR-IOV for it)",
    "Arrow Lake": "the out-of-tree i915-sriov-dkms module (xe has no SR-IOV for it)",
    "ATS-M": "the xe driver (xe.force_probe=<id>)",
    "Battlemage": "the xe driver, on Arc Pro B50/B60 only (consumer B580 cards lack the capability)",
    "Panther Lake": "the xe driver (PF mode on by default since 6.17)",
    "Ice Lake": None,
    "Elkhart Lake": None,
    "Jasper Lake": None,
    "Rocket Lake": None,
    "DG1": None,
    "DG2 / Arc A-series": None,
    "Lunar Lake": None,
}
SRIOV_FIX = ("SR-IOV with i915-sriov-dkms (host): add 'intel_iommu=on i915.enable_guc=3 i915.max_vfs=7 "
             "module_blacklist=xe' to GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub, update-grub, reboot, then: "
             f"echo 7 > {IGPU_DIR}/sriov_numvfs  (VFs 0000:00:02.1-02.7, each bound to vfio-pci and given to one VM)")
GVTD_FIX = (f"No vGPU sharing on this GPU. Only GVT-d is left: bind {IGPU} to vfio-pci and pass the whole iGPU "
            "to one VM (the host loses it).")


# ====================================================================== the report


@dataclass
class Check:
    """One check: what was found (evidence: host path or probe, and the value read) and what to do."""

    id: str
    title: str
    status: Status = "ok"
    evidence: list[tuple[str, str]] = field(default_factory=list)
    fix: str | None = None
    detail: str = ""
    blocked_by: str | None = None  # the earlier check whose failure made this one skip
    # Why a check (and so the ones that need it) does not apply to this host, e.g. GVT-g's checks on a host
    # whose vGPUs come from NVIDIA's driver.
    not_applicable: str | None = None

    def see(self, path: str, value: object) -> None:
        self.evidence.append((path, str(value)))

    def set(self, status: Status, detail: str, fix: str | None = None) -> None:
        self.status, self.detail, self.fix = status, detail, fix

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "status": self.status, "detail": self.detail,
                "evidence": [{"path": p, "value": v} for p, v in self.evidence], "fix": self.fix,
                "blocked_by": self.blocked_by}


@dataclass
class Report:
    checks: list[Check]
    root: str
    kernel: str | None
    simulated: bool

    def check(self, check_id: str) -> Check:
        return next(c for c in self.checks if c.id == check_id)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]

    @property
    def ready(self) -> bool:
        return not self.failed

    @property
    def verdict(self) -> str:
        warned = self.warnings
        notes = ""
        if warned:
            notes = f" ({len(warned)} warning{'s' * (len(warned) != 1)}: {', '.join(c.id for c in warned)})"
        if self.ready:
            return f"READY: this host can run GVT-g vGPUs{notes}"
        failed = self.failed
        first = failed[0].detail.split(". ")[0].rstrip(".")
        return (f"NOT READY: {len(failed)} check{'s' * (len(failed) != 1)} failed "
                f"({', '.join(c.id for c in failed)}); first: {first}")

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "verdict": self.verdict, "root": self.root, "kernel": self.kernel,
                "simulated": self.simulated, "checks": [c.to_json() for c in self.checks]}


# ====================================================================== what the host shows


class Host:
    """The facts the checks share, each read once and only when a check asks."""

    def __init__(self, root: HostRoot) -> None:
        self.root = root

    def read(self, path: str) -> str | None:
        """A file's text, or None when it is absent or unreadable (see :meth:`denied`)."""
        try:
            return self.root.read_text(path)
        except (OSError, UnicodeDecodeError):
            return None

    def denied(self, path: str) -> bool:
        try:
            self.root.read_text(path)
        except PermissionError:
            return True
        except OSError:
            return False
        return False

    def value(self, path: str) -> str | None:
        text = self.read(path)
        return text.strip() if text is not None else None

    def exists(self, path: str) -> bool:
        return self.root.exists(path)

    def listdir(self, path: str) -> list[str] | None:
        try:
            return self.root.listdir(path)
        except OSError:
            return None

    @cached_property
    def simulation(self) -> dict[str, Any] | None:
        return self.root.simulation()

    # ---- kernel
    @cached_property
    def release(self) -> str | None:
        return self.value("/proc/sys/kernel/osrelease")

    @cached_property
    def version(self) -> tuple[int, int] | None:
        match = re.match(r"(\d+)\.(\d+)", self.release or "")
        return (int(match[1]), int(match[2])) if match else None

    def at_least(self, major: int, minor: int) -> bool:
        """Kernel version comparison; an unknown kernel counts as a current one."""
        return self.version is None or self.version >= (major, minor)

    @cached_property
    def kconfig(self) -> tuple[str, dict[str, str]] | None:
        """(where it was read, symbol -> y/m/n/value): /boot/config-<release>, else /proc/config.gz."""
        return facts.kernel_config(self.root, self.release)

    def kconfig_value(self, symbol: str) -> str | None:
        return self.kconfig[1].get(symbol) if self.kconfig else None

    @cached_property
    def module_files(self) -> tuple[dict[str, str], dict[str, str]] | None:
        """(built-in module -> modules.builtin path, loadable module -> modules.dep path), or None."""
        if not self.release:
            return None
        base = f"/lib/modules/{self.release}"
        builtin_text, dep_text = self.read(f"{base}/modules.builtin"), self.read(f"{base}/modules.dep")
        if builtin_text is None and dep_text is None:
            return None
        builtin = {facts.module_name(line.strip()): line.strip()
                   for line in (builtin_text or "").splitlines() if line.strip()}
        dep = {facts.module_name(line.split(":", 1)[0]): line.split(":", 1)[0]
               for line in (dep_text or "").splitlines() if ":" in line}
        return builtin, dep

    @cached_property
    def loaded(self) -> list[str]:
        text = self.read("/proc/modules") or ""
        return [line.split()[0] for line in text.splitlines() if line.strip()]

    def builtin(self, module: str, symbol: str | None = None) -> bool:
        if symbol and self.kconfig_value(symbol) == "y":
            return True
        return bool(self.module_files and module in self.module_files[0])

    def has_module(self, module: str, symbol: str | None = None) -> bool:
        """Loaded now, or built into the kernel."""
        return module in self.loaded or self.builtin(module, symbol)

    # ---- boot parameters
    @cached_property
    def cmdline(self) -> str:
        return self.value("/proc/cmdline") or ""

    def cmdline_param(self, name: str) -> str | None:
        """The value of name=value on the kernel command line (the last one wins); "" for a bare flag."""
        return facts.cmdline_param(self.cmdline, name)

    @cached_property
    def modprobe_options(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(module, parameter) -> (value, file) as modprobe applies them (the last one wins)."""
        return {(module, name): (value, path) for path, module, name, value in facts.modprobe_options(self.root)}

    def param_sources(self, module: str, name: str) -> tuple[str | None, tuple[str, str] | None]:
        """(value on the command line, (value, file) in modprobe.d) of a module parameter."""
        return self.cmdline_param(f"{module}.{name}"), self.modprobe_options.get((module, name))

    # ---- hardware
    @cached_property
    def cpuinfo(self) -> dict[str, str]:
        """The first processor's fields of /proc/cpuinfo."""
        fields: dict[str, str] = {}
        for line in (self.read("/proc/cpuinfo") or "").splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        return fields

    @cached_property
    def cpu_flags(self) -> set[str]:
        return set(self.cpuinfo.get("flags", "").split())

    def pci_id(self, address: str) -> tuple[int, int, int] | None:
        base = f"/sys/bus/pci/devices/{address}"
        vendor, device, pci_class = (facts.as_int(self.value(f"{base}/{name}"))
                                     for name in ("vendor", "device", "class"))
        if vendor is None or device is None:
            return None
        return vendor, device, pci_class or 0

    @cached_property
    def igpu(self) -> tuple[int, int, int] | None:
        return self.pci_id(IGPU)

    @cached_property
    def platform(self) -> Platform | None:
        if self.igpu is None or self.igpu[0] != INTEL_VENDOR_ID:
            return None
        return platform_for(self.igpu[1])

    @cached_property
    def aperture_mib(self) -> int | None:
        """BIOS aperture = size of BAR2 (GMADR), the third line of the PCI ``resource`` file."""
        lines = (self.read(f"{IGPU_DIR}/resource") or "").splitlines()
        if len(lines) < 3:
            return None
        try:
            start, end = (int(x, 16) for x in lines[2].split()[:2])
        except ValueError:
            return None
        return (end - start + 1) // (1024 * 1024) if end > start else None

    @cached_property
    def mdev_types(self) -> dict[str, int | None] | None:
        """The iGPU's mdev types and their available_instances; None without mdev_supported_types."""
        base = f"{IGPU_DIR}/mdev_supported_types"
        names = self.listdir(base)
        if names is None:
            return None
        return {name: facts.as_int(self.value(f"{base}/{name}/available_instances")) for name in names}


def _describe_pci(ids: tuple[int, int, int]) -> str:
    """E.g. "a display controller from AMD (1002:1638)"."""
    vendor, device, pci_class = ids
    kind = PCI_CLASSES.get(pci_class >> 16, f"class 0x{pci_class:06x} device")
    return f"a {kind} from {VENDORS.get(vendor, f'vendor 0x{vendor:04x}')} ({vendor:04x}:{device:04x})"


def gvt_allows(aperture_mib: int, kernel: tuple[int, int] | None, graphics_ver: int) -> list[tuple[str, int]]:
    """The GVT-g types a fresh iGPU with this aperture registers, and how many of each fit (spec 2.1, 2.4)."""
    version = kernel or (6, 0)
    low, high, fences = (aperture_mib - HOST_LOW_GM_MIB, DEFAULT_GGTT_MIB - aperture_mib - HOST_HIGH_GM_MIB,
                         DEFAULT_FENCES - HOST_FENCES)
    allowed = []
    for spec in gvt_types(version):
        if version >= (4, 11) and low // spec.low_gm_mib < 1:
            break  # registration stops at the first type whose low GM does not fit
        count = min(max(low, 0) // spec.low_gm_mib, max(high, 0) // spec.high_gm_mib, fences // spec.fences)
        if version < (4, 11):
            count = min(count, int(spec.suffix))  # 4.10: capped by the type's max_instance
        allowed.append((f"i915-{spec.name(graphics_ver)}", count))
    return allowed


def _max_vgpus(allowed: list[tuple[str, int]]) -> int:
    return min(max((count for _, count in allowed), default=0), MAX_VGPUS_PER_GPU)


def _allows_text(allowed: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in allowed) or "no type"


# ====================================================================== the checks


class _Background:
    """A probe running in a thread; its result, or the exception it raised."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self.thread.start()

    def _run(self, function: Callable[[], Any]) -> None:
        try:
            self.result = function()
        except Exception as e:  # a probe that breaks must not break the report
            self.error = e

    def get(self) -> Any:
        self.thread.join()
        return self.result


@dataclass
class Context:
    host: Host
    run_guest: bool
    checks: dict[str, Check] = field(default_factory=dict)
    kvm: _Background | None = None
    qemu: _Background | None = None
    qemu_binary: str | None = None

    @property
    def simulated(self) -> bool:
        return self.host.simulation is not None

    def kvm_report(self) -> KvmReport | None:
        return self.kvm.get() if self.kvm else None

    def qemu_report(self) -> QemuReport | None:
        return self.qemu.get() if self.qemu else None


CheckFn = Callable[[Context, Check], None]


def check_igpu(ctx: Context, c: Check) -> None:
    host = ctx.host
    ids = host.igpu
    others = other_mdev_parents(host)
    if (ids is None or ids[0] != INTEL_VENDOR_ID) and others:
        c.see(IGPU_DIR, "absent" if ids is None else _describe_pci(ids))
        c.see(host.root.sys_class_mdev_bus, ", ".join(f"{p} ({d})" for p, d in others))
        c.not_applicable = f"no Intel iGPU; this host's vGPUs come from {', '.join(sorted({d for _, d in others}))}"
        c.set("skip", f"No Intel iGPU, so no GVT-g: not needed here, this host's vGPUs come from other mdev "
                      f"parents ({', '.join(f'{p}: {d}' for p, d in others)}; see mdev-parents).")
        return

    def other_gpus() -> None:
        found = []
        for address in host.listdir("/sys/bus/pci/devices") or []:
            pci = host.pci_id(address)
            if pci and pci[2] >> 16 == 0x03:
                found.append(f"{address} {_describe_pci(pci)}")
        c.see("/sys/bus/pci/devices/*/class", "display controllers: " + ("; ".join(found) or "none"))

    if ids is None:
        c.see(IGPU_DIR, "absent")
        other_gpus()
        c.set("fail", f"No Intel iGPU: there is no PCI device at {IGPU}, where Intel iGPUs sit. GVT-g needs an "
                      "Intel CPU with integrated graphics from Broadwell (5th gen Core) to Comet Lake (10th gen).",
              "No software fix: run vgpuctl on a host with a Broadwell ... Comet Lake Intel iGPU.")
        return
    vendor, device, pci_class = ids
    c.see(f"{IGPU_DIR}/vendor", f"0x{vendor:04x}")
    c.see(f"{IGPU_DIR}/device", f"0x{device:04x}")
    c.see(f"{IGPU_DIR}/class", f"0x{pci_class:06x}")
    if vendor != INTEL_VENDOR_ID:
        other_gpus()
        c.set("fail", f"No Intel iGPU: {IGPU} is {_describe_pci(ids)}. GVT-g needs an Intel iGPU from "
                      "Broadwell (5th gen Core) to Comet Lake (10th gen).",
              "No software fix: run vgpuctl on a host with a Broadwell ... Comet Lake Intel iGPU.")
        return
    platform = host.platform
    if platform is None:
        c.set("fail", f"Intel device 0x{device:04x} at {IGPU} is not a GPU that GVT-g knows: it is "
                      f"{_describe_pci(ids)}.",
              "No software fix: GVT-g supports Broadwell, Skylake, Apollo Lake, Kaby Lake, Coffee Lake and "
              "Comet Lake iGPUs only.")
        return
    name = platform.name.split(" (")[0]
    c.see("platform (gvt-platforms.json)", f"{name}, graphics version {platform.graphics_ver}")
    release = host.release or "unknown"
    c.see("/proc/sys/kernel/osrelease", release)
    if not platform.gvt_supported:
        if platform.graphics_ver >= 11:
            route = SRIOV_BY_PLATFORM.get(name)
            if route:
                c.set("fail", f"{name} (Gen{platform.graphics_ver}) has no GVT-g: GVT-g ends with Comet Lake "
                              f"(Gen9), and Intel's vGPU for Gen{platform.graphics_ver} is SR-IOV instead. The "
                              "iGPU offers up to 7 virtual functions (PCI 0000:00:02.1-02.7), each a whole PCI "
                              "device given to one VM with vfio-pci: no mdev, no mdev types. Upstream i915 has no "
                              f"SR-IOV for client iGPUs; it comes from {route}.", SRIOV_FIX)
            else:
                c.set("fail", f"{name} (Gen{platform.graphics_ver}) has no GVT-g (it ends with Comet Lake, Gen9) "
                              "and no SR-IOV either.", GVTD_FIX)
        else:
            c.set("fail", f"{name} is not supported by GVT-g: i915's is_supported_device() accepts only "
                          "Broadwell, Skylake, Broxton/Apollo Lake, Kaby Lake, Coffee Lake and Comet Lake.",
                  "No software fix on this iGPU.")
        return
    since = platform.gvt_since
    assert since is not None
    if host.version is not None and not platform.gvt_supported_on(host.version, device):
        needs = ".".join(map(str, since))
        partial = ""
        if platform.gvt_partial and host.version >= platform.gvt_partial[0]:
            ids_text = ", ".join(f"0x{i:04X}" for i in sorted(platform.gvt_partial[1]))
            partial = f" (Linux {platform.gvt_partial[0][0]}.{platform.gvt_partial[0][1]} accepts only {ids_text})"
        c.set("fail", f"{name} is supported by GVT-g from Linux {needs}; this kernel is {release}{partial}, whose "
                      f"i915 refuses GVT-g on 0x{device:04x}.",
              f"Boot a kernel >= {needs} built with the GVT-g options (see kernel-config), e.g. a distribution "
              "kernel of Linux 6.1 or later with CONFIG_DRM_I915_GVT_KVMGT=m.")
        return
    prefix = "GVTg_V4" if platform.graphics_ver == 8 else "GVTg_V5"
    detail = (f"{name} (Gen{platform.graphics_ver}) iGPU, supported by GVT-g since Linux "
              f"{since[0]}.{since[1]}; its vGPU types are i915-{prefix}_*.")
    if host.version is None:
        c.set("warn", detail + " The running kernel's version is unknown (no /proc/sys/kernel/osrelease).")
    elif host.version < (4, 16):
        c.set("warn", detail + f" But Linux {release} predates the vGPU display (dma-buf, QEMU display=on, "
                               "Linux 4.16): guests run, their screen cannot be shown by QEMU.",
              "Boot a kernel >= 4.16 (any current distribution kernel with the GVT-g options).")
    else:
        c.set("ok", detail)


def other_mdev_parents(host: Host) -> list[tuple[str, str]]:
    """(parent, what drives it) of every mdev parent that is not an Intel GVT-g iGPU: NVIDIA's vGPU driver
    (time-sliced vGPUs, before Ada), the kernel's sample drivers, other vendors' mdev drivers."""
    found = []
    for parent in host.listdir(host.root.sys_class_mdev_bus) or []:
        base = f"{host.root.sys_class_mdev_bus}/{parent}"
        vendor = facts.as_int(host.value(f"{base}/vendor"))
        if vendor == INTEL_VENDOR_ID:
            continue
        try:
            driver = os.path.basename(host.root.readlink(f"{base}/driver"))
        except OSError:
            # The kernel's sample drivers (samples/vfio-mdev) are their own parents, with no driver link.
            driver = f"the {parent} sample driver" if vendor is None else "its vendor's driver"
        found.append((parent, driver))
    return found


def check_mdev_parents(ctx: Context, c: Check) -> None:
    host = ctx.host
    others = other_mdev_parents(host)
    if not others:
        c.set("skip", "No mdev parent other than an Intel iGPU (GVT-g's are checked above).")
        return
    for parent, driver in others:
        types_dir = f"{host.root.sys_class_mdev_bus}/{parent}/mdev_supported_types"
        types = host.listdir(types_dir) or []
        free = sum(facts.as_int(host.value(f"{types_dir}/{t}/available_instances")) or 0 for t in types)
        c.see(types_dir, f"{len(types)} types, {free} instances available ({driver})")
    empty = [p for p, _ in others
             if not host.listdir(f"{host.root.sys_class_mdev_bus}/{p}/mdev_supported_types")]
    if empty:
        c.set("fail", f"{', '.join(empty)} registered with mdev but offer no vGPU type: its driver did not set up "
                      "vGPUs (for NVIDIA: the vGPU host driver, not the ordinary one, and a licensed vGPU type).",
              "Check the driver's log (dmesg) and its documentation; 'vgpuctl types' lists what it offers.")
        return
    c.set("ok", f"{len(others)} mdev parent{'s' if len(others) > 1 else ''} with vGPU types: "
                f"{', '.join(f'{p} ({d})' for p, d in others)}; 'vgpuctl types' lists them.")


def kconfig_required(host: Host) -> list[tuple[str, str]]:
    """(symbol, accepted values) a GVT-g host kernel needs, by era (spec 4.1)."""
    required = [("CONFIG_DRM_I915", "my"), ("CONFIG_DRM_I915_GVT", "y"), ("CONFIG_DRM_I915_GVT_KVMGT", "my"),
                ("CONFIG_VFIO", "my"), ("CONFIG_VFIO_IOMMU_TYPE1", "my"), ("CONFIG_VFIO_MDEV", "my")]
    if not host.at_least(5, 14):
        required.append(("CONFIG_VFIO_MDEV_DEVICE", "my"))
    required += [("CONFIG_KVM", "my"), ("CONFIG_KVM_INTEL", "my")]
    return required


def kconfig_fragment(host: Host) -> str:
    """The Kconfig lines that give this kernel era a GVT-g host (spec 4.1)."""
    era = host.release or "this kernel"
    lines = [f"# gvt.config: Intel GVT-g (KVMGT) host, Linux {era}", "CONFIG_DRM_I915=m"]
    if host.at_least(5, 19):
        lines.append("CONFIG_DRM_I915_GVT_KVMGT=m  # selects DRM_I915_GVT (hidden since 5.19)")
    else:
        lines += ["CONFIG_DRM_I915_GVT=y", "CONFIG_DRM_I915_GVT_KVMGT=m"]
    lines += ["CONFIG_VFIO=m"]
    if host.at_least(6, 6):
        lines.append("CONFIG_VFIO_GROUP=y")
    lines += ["CONFIG_VFIO_IOMMU_TYPE1=m", "CONFIG_VFIO_MDEV=m"]
    if not host.at_least(5, 14):
        lines.append("CONFIG_VFIO_MDEV_DEVICE=m")
    lines += ["CONFIG_KVM=m", "CONFIG_KVM_INTEL=m", "CONFIG_INTEL_IOMMU=y"]
    return "\n".join(lines)


def kconfig_fix(host: Host) -> str:
    return ("Build the kernel with this fragment (in the kernel tree: scripts/kconfig/merge_config.sh .config "
            "gvt.config && make olddefconfig && make -j$(nproc) bindeb-pkg), install it and reboot:\n"
            + kconfig_fragment(host))


def required_modules(host: Host) -> list[tuple[str, str]]:
    """(module, its Kconfig symbol) a GVT-g host has loaded or built in, by era (spec 4.2)."""
    modules = [("i915", "CONFIG_DRM_I915"), ("kvmgt", "CONFIG_DRM_I915_GVT_KVMGT"), ("mdev", "CONFIG_VFIO_MDEV")]
    if not host.at_least(5, 14):
        modules.append(("vfio_mdev", "CONFIG_VFIO_MDEV_DEVICE"))
    modules += [("vfio", "CONFIG_VFIO"), ("vfio_iommu_type1", "CONFIG_VFIO_IOMMU_TYPE1"), ("kvm", "CONFIG_KVM"),
                ("kvm_intel", "CONFIG_KVM_INTEL")]
    return modules


def check_kernel_config(ctx: Context, c: Check) -> None:
    host = ctx.host
    if host.kconfig is not None:
        source, config = host.kconfig
        missing = []
        for symbol, accepted in kconfig_required(host):
            value = config.get(symbol)
            c.see(source, f"{symbol}={value}" if value not in (None, "n") else f"{symbol} is not set")
            if value is None or value not in accepted:
                missing.append(symbol)
        if host.at_least(6, 6) and config.get("CONFIG_VFIO_GROUP") == "n":
            c.see(source, "CONFIG_VFIO_GROUP is not set")
            missing.append("CONFIG_VFIO_GROUP")  # no /dev/vfio/<group>, which QEMU's vfio-pci opens
        if missing:
            c.set("fail", f"The kernel {host.release} lacks {', '.join(missing)} (read from {source}).",
                  kconfig_fix(host))
        else:
            c.set("ok", f"The kernel has GVT-g, KVMGT, VFIO, mdev and KVM for Intel (read from {source}).")
        return
    files = host.module_files
    base = f"/lib/modules/{host.release}"
    if files is None:
        c.see(f"/boot/config-{host.release}", "absent")
        c.see("/proc/config.gz", "absent")
        c.see(f"{base}/modules.dep", "absent")
        c.set("warn", "Cannot tell how the kernel was configured: there is no kernel config file and no "
                      "module list for it.", "Check that your kernel has these options:\n" + kconfig_fragment(host))
        return
    builtin, dep = files
    missing = []
    for module, _symbol in required_modules(host):
        if module in builtin:
            c.see(f"{base}/modules.builtin", f"{module}: {builtin[module]}")
        elif module in dep:
            c.see(f"{base}/modules.dep", f"{module}: {dep[module]}")
        else:
            c.see(f"{base}/modules.dep", f"{module}: absent")
            missing.append(module)
    detail = (f"No kernel config to read (/boot/config-{host.release}, /proc/config.gz); judged from the "
              "kernel's module files.")
    if missing:
        c.set("fail", f"The kernel {host.release} has no {', '.join(missing)} module. " + detail, kconfig_fix(host))
    else:
        c.set("ok", "The kernel has every module GVT-g needs. " + detail)


def _kernel_param_fix(host: Host, param: str) -> str:
    """Exact commands that put a parameter on the kernel command line: vgpuctl's own, or by hand for GRUB."""
    return ("vgpuctl setup plan && vgpuctl setup apply  # any boot loader; backed up, 'setup revert' undoes it\n"
            "or add it to the kernel command line by hand:\n" + GRUB_ADD.format(param=param))


def _see_param(host: Host, c: Check, module: str, param: str) -> tuple[str | None, tuple[str, str] | None, str | None]:
    """A module parameter's sources as evidence (command line, modprobe.d); returns them and the running value."""
    cmd, modprobe = host.param_sources(module, param)
    c.see("/proc/cmdline", f"{module}.{param}={cmd}" if cmd is not None else f"no {module}.{param}")
    if modprobe:
        c.see(modprobe[1], f"options {module} {param}={modprobe[0]}")
    return cmd, modprobe, host.value(host.root.module_parameter(module, param))


def check_enable_gvt(ctx: Context, c: Check) -> None:
    host = ctx.host
    sysfs_path = "/sys/module/i915/parameters/enable_gvt"
    cmd, modprobe, runtime = _see_param(host, c, "i915", "enable_gvt")
    if runtime is not None:
        c.see(sysfs_path, runtime)
    elif host.denied(sysfs_path):
        c.see(sysfs_path, "(root only: run as root to read it)")
    elif "i915" in host.loaded:
        c.see(sysfs_path, "absent: i915 built without CONFIG_DRM_I915_GVT")
    else:
        c.see(sysfs_path, "absent: i915 not loaded")
    configured = facts.kstrtobool(cmd) or (modprobe is not None and facts.kstrtobool(modprobe[0]))
    persist = (_kernel_param_fix(host, "i915.enable_gvt=1")
               + "\nor: echo 'options i915 enable_gvt=1' > /etc/modprobe.d/i915-gvt.conf && update-initramfs -u && "
               "reboot")
    on_now = facts.kstrtobool(runtime)
    if configured and on_now is not False:
        tail = "" if on_now else " (i915 not loaded, or the parameter is not readable: not confirmed in effect)"
        c.set("ok", "i915.enable_gvt=1 is set" + tail + ".")
    elif configured:
        if cmd is not None and facts.kstrtobool(cmd) and not host.at_least(5, 8):
            c.set("fail", "i915.enable_gvt=1 is on the command line, but i915 reset it to N: on this kernel that "
                          "means GVT-g init failed.", "dmesg | grep -iE 'gvt|i915'  # then fix what it reports")
        else:
            c.set("fail", f"i915.enable_gvt=1 is configured in {modprobe[1] if modprobe else '/proc/cmdline'} but "
                          "not in effect: i915 was loaded without it (e.g. from an initramfs made before).",
                  "update-initramfs -u && reboot")
    elif on_now:
        c.set("warn", "GVT-g is enabled in the running i915 but not configured anywhere: lost at the next boot.",
              persist)
    else:
        c.set("fail", "i915.enable_gvt=1 is not set: i915 does not start GVT-g (the parameter defaults to off and "
                      "cannot be changed while i915 is loaded).", persist)


def check_guc(ctx: Context, c: Check) -> None:
    host = ctx.host
    sysfs_path = "/sys/module/i915/parameters/enable_guc"
    cmd, modprobe, runtime = _see_param(host, c, "i915", "enable_guc")
    if runtime is not None:
        c.see(sysfs_path, runtime)
    legacy = host.cmdline_param("i915.enable_guc_submission")
    if legacy is not None:
        c.see("/proc/cmdline", f"i915.enable_guc_submission={legacy}")
    # What i915 uses: the running value, else what it will be given at the next load.
    value = facts.as_int(runtime) if runtime is not None else facts.as_int(cmd) if cmd is not None else (
        facts.as_int(modprobe[0]) if modprobe else None)
    submission = value is not None and value > 0 and bool(value & 1)
    if legacy is not None and (facts.kstrtobool(legacy) or (facts.as_int(legacy) or 0) > 0):
        submission = True
    if not submission:
        shown = "auto: no GuC submission before Gen12" if value in (None, -1) else f"{value}"
        c.set("ok", f"GuC submission is not requested (enable_guc={shown}).")
        return
    where = modprobe[1] if modprobe and cmd is None else "/etc/default/grub"
    if where == "/etc/default/grub":
        fix = ("sed -i -e 's/i915.enable_guc=[0-9-]*/i915.enable_guc=0/' -e 's/i915.enable_guc_submission=[^ \"]*//' "
               "/etc/default/grub && update-grub && reboot  # or enable_guc=2 to keep loading the HuC")
    else:
        fix = f"sed -i 's/enable_guc=[0-9-]*/enable_guc=0/' {where} && update-initramfs -u && reboot"
    c.set("fail", f"GuC submission is requested (enable_guc={value if value is not None else legacy}); GVT-g "
                  "refuses to start with it ('Graphics virtualization is not yet supported with GuC submission'). "
                  "Bit 1 (value 1 or 3) asks for submission; 2 (HuC loading only) is fine.", fix)


def check_ignore_msrs(ctx: Context, c: Check) -> None:
    host = ctx.host
    sysfs_path = "/sys/module/kvm/parameters/ignore_msrs"
    cmd, modprobe, runtime = _see_param(host, c, "kvm", "ignore_msrs")
    c.see(sysfs_path, runtime if runtime is not None else "absent: kvm not loaded")
    persistent = bool(facts.kstrtobool(cmd)) or (modprobe is not None and bool(facts.kstrtobool(modprobe[0])))
    now = facts.kstrtobool(runtime)
    why = ("Windows guests with Intel's graphics driver read MSRs that KVM does not emulate (RAPL/energy: 0x606, "
           "0x611, 0x639, 0x641) and crash (blue screen) when KVM answers with #GP.")
    persist = "echo 'options kvm ignore_msrs=1 report_ignored_msrs=0' > /etc/modprobe.d/kvm-ignore-msrs.conf"
    runtime_fix = f"echo 1 > {sysfs_path}"
    if now and persistent:
        c.set("ok", "kvm.ignore_msrs=1: unknown MSRs read as 0 (Windows guests need it).")
    elif now:
        c.set("warn", "kvm.ignore_msrs is on now but not configured: lost at the next boot. " + why, persist)
    elif persistent and runtime is not None:
        c.set("warn", "kvm.ignore_msrs=1 is configured but not in effect (kvm was loaded before). " + why,
              runtime_fix)
    elif persistent:
        c.set("ok", "kvm.ignore_msrs=1 is configured (kvm not loaded yet).")
    else:
        c.set("warn", "kvm.ignore_msrs is off. " + why, f"{runtime_fix}\n{persist}")


def check_iommu(ctx: Context, c: Check) -> None:
    host = ctx.host
    cmd = host.cmdline_param("intel_iommu")
    units = host.listdir("/sys/class/iommu") or []
    c.see("/proc/cmdline", f"intel_iommu={cmd}" if cmd is not None else "no intel_iommu")
    c.see("/sys/class/iommu", " ".join(units) or "empty")
    note = ("Recommended by Intel's and ArchWiki's GVT-g guides, not required: mdevs get an emulated IOMMU group and "
            "GVT-g maps guest pages through the DMA API.")
    if units:
        c.set("ok", f"The IOMMU is on ({', '.join(units)}).")
    elif cmd is not None and cmd.split(",")[0] == "on":
        c.set("warn", "intel_iommu=on is given but no IOMMU is active: VT-d is off in the firmware, or the kernel "
                      "lacks CONFIG_INTEL_IOMMU. " + note,
              "Enable 'VT-d' (Intel Virtualization Technology for Directed I/O) in the firmware setup.")
    else:
        c.set("warn", "The IOMMU (VT-d) is off. " + note, _kernel_param_fix(host, "intel_iommu=on"))


def check_modules(ctx: Context, c: Check) -> None:
    host = ctx.host
    missing = []
    for module, symbol in required_modules(host):
        if module in host.loaded:
            state = "loaded"
        elif host.builtin(module, symbol):
            state = "built in"
        else:
            state = "not loaded"
            missing.append(module)
        c.see("/proc/modules", f"{module}: {state}")
    if not missing:
        c.set("ok", "Every module GVT-g needs is loaded or built in: "
                    + ", ".join(m for m, _ in required_modules(host)) + ".")
        return
    notes = []
    if "kvmgt" in missing and not host.at_least(5, 19):
        notes.append("On this kernel 'modprobe kvmgt' fails with 'No such device' until i915 has started GVT-g "
                     "(i915.enable_gvt=1, no GuC submission).")
    kvm_vendor = "kvm_intel"
    if kvm_vendor in missing and "vmx" not in host.cpu_flags:
        notes.append("kvm_intel cannot load without VT-x (no vmx in /proc/cpuinfo: see cpu-virt).")
    names = " ".join(m for m in missing if m != "i915")  # udev loads i915 for the iGPU by itself
    fixes = ["modprobe i915 enable_gvt=1"] if "i915" in missing else []
    if names:
        fixes += [f"modprobe -a {names}",
                  f"printf '%s\\n' {names} > /etc/modules-load.d/vgpuctl.conf  # load them at every boot"]
    fix = "\n".join(fixes)
    c.set("fail", f"Not loaded: {', '.join(missing)}. " + " ".join(notes), fix)


def check_mdev_types(ctx: Context, c: Check) -> None:
    host = ctx.host
    base = f"{IGPU_DIR}/mdev_supported_types"
    types = host.mdev_types
    if types:
        for name, available in types.items():
            c.see(f"{base}/{name}/available_instances", available if available is not None else "unreadable")
        class_link = f"/sys/class/mdev_bus/{IGPU}"
        c.see(class_link, "present" if host.exists(class_link) else "absent")
        c.set("ok", f"kvmgt registered {len(types)} vGPU type{'s' * (len(types) != 1)}: {', '.join(types)}.")
        return
    c.see(base, "empty" if types is not None else "absent")
    if "kvmgt" not in host.loaded and not host.builtin("kvmgt", "CONFIG_DRM_I915_GVT_KVMGT"):
        c.see("/proc/modules", "kvmgt: not loaded")
        c.blocked_by = "modules"
        c.set("skip", "Skipped: kvmgt is not loaded (see modules), and it is kvmgt that registers the mdev types.")
        return
    c.see("/proc/modules", "kvmgt: loaded")
    causes: list[tuple[str, str | None]] = []
    enable, guc = ctx.checks.get("enable-gvt"), ctx.checks.get("guc")
    if enable and enable.status == "fail":
        causes.append(("i915.enable_gvt=1 is not in effect (see enable-gvt)", enable.fix))
    if guc and guc.status == "fail":
        causes.append(("GuC submission is requested (see guc)", guc.fix))
    aperture = host.aperture_mib
    if aperture is not None and host.platform and not gvt_allows(aperture, host.version, host.platform.graphics_ver):
        causes.append((f"the BIOS aperture is {aperture} MiB: GVT-g keeps {HOST_LOW_GM_MIB} MiB for the host, so no "
                       "vGPU type fits (see aperture)", _aperture_fix(host)))
    causes.append((GVT_INIT_HINT, "dmesg | grep -iE 'gvt|kvmgt'"))
    listed = "; ".join(f"({n}) {text}" for n, (text, _) in enumerate(causes, 1))
    c.set("fail", f"kvmgt is loaded but registered no mdev types, so no vGPU can be created. Likely causes: {listed}.",
          causes[0][1])


def _aperture_fix(host: Host) -> str:
    graphics_ver = host.platform.graphics_ver if host.platform else 9
    better = gvt_allows(APERTURE_ADVICE_MIB, host.version, graphics_ver)
    return (f"In the firmware setup (often Chipset > Graphics Configuration), set 'Aperture Size' to "
            f"{APERTURE_ADVICE_MIB} MiB: then {_allows_text(better)} (at most {_max_vgpus(better)} vGPUs).")


def check_aperture(ctx: Context, c: Check) -> None:
    host = ctx.host
    aperture = host.aperture_mib
    if aperture is None:
        c.see(f"{IGPU_DIR}/resource", "no BAR2 (line 3)")
        c.set("warn", "Cannot read the iGPU's aperture (BAR2 size): the vGPU capacity is unknown.",
              f"lspci -vv -s {IGPU} | grep 'Region 2'  # the size=... shown is the aperture")
        return
    graphics_ver = host.platform.graphics_ver if host.platform else 9
    allowed = gvt_allows(aperture, host.version, graphics_ver)
    most = _max_vgpus(allowed)
    c.see(f"{IGPU_DIR}/resource", f"BAR2 {aperture} MiB")
    c.see(f"GVT-g types at {aperture} MiB (spec 2.4)", _allows_text(allowed))
    types = host.mdev_types or {}
    for name, available in types.items():
        c.see(f"{IGPU_DIR}/mdev_supported_types/{name}/available_instances", available)
    fit = f"{aperture} MiB aperture: {_allows_text(allowed)} on an idle GPU"
    if not allowed:
        c.set("fail", f"{fit}. GVT-g keeps {HOST_LOW_GM_MIB} MiB of the aperture for the host and the smallest "
                      "vGPU needs 64 MiB more, so no vGPU type is registered.", _aperture_fix(host))
    elif most <= 2:
        c.set("warn", f"{fit}: at most {most} vGPU{'s' * (most != 1)} at once. A larger aperture allows more.",
              _aperture_fix(host))
    elif types and all(available == 0 for available in types.values()):
        c.set("warn", f"{fit}; every type shows available_instances 0 now: the vGPUs in use hold all of it.",
              "vgpuctl list  # remove vGPUs you no longer need, or raise the aperture: " + _aperture_fix(host))
    else:
        extra = ""
        if aperture >= 2048:
            extra = (" A 2 GiB aperture shrinks the hidden pool: the largest type is listed but fits 0 times; "
                     f"{APERTURE_ADVICE_MIB} MiB gives the most vGPUs.")
        c.set("ok", f"{fit}: up to {most} vGPUs.{extra}")


def _kvm_vendor_module(host: Host) -> str:
    return "kvm_amd" if host.cpuinfo.get("vendor_id") == "AuthenticAMD" else "kvm_intel"


def _no_kvm_fix(host: Host) -> str:
    module = _kvm_vendor_module(host)
    if not ({"vmx", "svm"} & host.cpu_flags) and "hypervisor" not in host.cpu_flags:
        return (f"Enable 'Intel Virtualization Technology' (VT-x) or AMD-V (SVM) in the firmware setup, then: "
                f"modprobe {module}")
    return f"modprobe {module}"


def check_kvm_device(ctx: Context, c: Check) -> None:
    host = ctx.host
    present = host.exists("/dev/kvm")
    module = _kvm_vendor_module(host)
    if ctx.simulated:
        c.see("/dev/kvm", "present (simulated)" if present else "absent")
        if not present:
            c.see("/proc/modules", f"{module}: {'loaded' if module in host.loaded else 'not loaded'}")
            c.set("fail", f"No /dev/kvm: {module} is not loaded, so there is no KVM. GVT-g needs KVM "
                          "('KVM is required to use Intel vGPU').", _no_kvm_fix(host))
        else:
            c.set("skip", "simulated /dev/kvm: not probed (the simulated host's device node is not a real KVM).")
        return
    report = ctx.kvm_report()
    if report is None:
        problem = ctx.kvm.error if ctx.kvm else None
        c.see("/dev/kvm", "present" if present else "absent")
        c.set("fail" if not present else "skip",
              "No /dev/kvm." if not present else f"KVM probe not available ({problem or 'vgpuctl.host.kvm missing'}).",
              _no_kvm_fix(host) if not present else None)
        return
    c.see("/dev/kvm", "present" if report.device_present else "absent")
    if host.exists("/sys/module/kvm_pvm"):
        c.see("/sys/module/kvm_pvm", "present: /dev/kvm is KVM-PVM")
    if not report.device_present:
        c.set("fail", f"No /dev/kvm: KVM is not loaded ({module}). GVT-g needs KVM. {report.detail}".strip(),
              _no_kvm_fix(host))
        return
    c.see("open(/dev/kvm, O_RDWR)", {True: "ok", False: "refused", None: "not tried"}[report.device_opens])
    if report.device_opens is False:
        c.set("fail", f"/dev/kvm exists but cannot be opened by this user. {report.detail}".strip(),
              "usermod -aG kvm $USER  # then log in again (or run as root)")
        return
    c.see("ioctl(KVM_GET_API_VERSION)", report.api_version)
    if report.api_version is not None and report.api_version != KVM_API_VERSION:
        c.set("warn", f"/dev/kvm answers API version {report.api_version}, not {KVM_API_VERSION}.")
        return
    c.set("ok", f"/dev/kvm opens, KVM API version {report.api_version}.")


def check_cpu_virt(ctx: Context, c: Check) -> None:
    host = ctx.host
    flags = host.cpu_flags
    if not flags:
        c.see("/proc/cpuinfo", "unreadable")
        c.set("warn", "Cannot read the CPU flags.")
        return
    found = sorted({"vmx", "svm"} & flags)
    nested = "hypervisor" in flags
    c.see("/proc/cpuinfo model name", host.cpuinfo.get("model name", "?"))
    c.see("/proc/cpuinfo flags", " ".join(found + (["hypervisor"] if nested else [])) or "no vmx, no svm")
    pvm = host.exists("/sys/module/kvm_pvm")
    if pvm:
        c.see("/sys/module/kvm_pvm", "present")
    if found:
        where = " inside a virtual machine (nested virtualization)" if nested else ""
        c.set("ok", f"The CPU offers hardware virtualization ({'/'.join(found)}){where}.")
        return
    if nested:
        detail = ("No vmx/svm: this is a virtual machine whose hypervisor does not pass VT-x/AMD-V through "
                  "(no nested virtualization), so kvm_intel cannot load and GVT-g (which needs it) cannot work.")
        if pvm:
            detail += (" The /dev/kvm here comes from KVM-PVM (kvm_pvm), a paravirtualized KVM that needs no VT-x "
                       "but cannot run ordinary guests (see kvm-guest).")
        c.set("fail", detail, "Run on bare metal, or enable nested virtualization on the outer host "
                              "(KVM: modprobe kvm_intel nested=1, and start this VM with -cpu host).")
    else:
        c.set("fail", "No vmx/svm in /proc/cpuinfo: VT-x/AMD-V is off in the firmware (or the CPU lacks it), so "
                      "KVM cannot run.", "Enable 'Intel Virtualization Technology' (VT-x) in the firmware setup.")


def check_kvm_guest(ctx: Context, c: Check) -> None:
    if ctx.simulated:
        c.set("skip", "Simulated host: a test guest would run on this machine's KVM, not the simulated one's.")
        return
    if not ctx.run_guest:
        c.set("skip", "Not run (--no-guest).")
        return
    report = ctx.kvm_report()
    if report is None:
        problem = ctx.kvm.error if ctx.kvm else None
        c.set("skip", f"KVM probe not available ({problem or 'vgpuctl.host.kvm missing'}).")
        return
    c.see("tiny KVM guest", "ran" if report.guest_runs else "failed" if report.guest_runs is False else "not run")
    if report.guest_error:
        c.see("guest error", report.guest_error)
    if report.guest_runs:
        c.set("ok", "A tiny guest ran under KVM: KVM is really usable.")
        return
    if report.guest_runs is None:
        c.set("skip", f"The test guest could not be started: {report.guest_error or report.detail}".rstrip(": "))
        return
    error = report.guest_error or ""
    host = ctx.host
    if error.startswith("no result within"):
        c.set("warn", f"The test guest gave no answer in time ({error}; a busy machine?): whether KVM runs "
                      "guests here is unknown.", "vgpuctl doctor  # again, on a quieter machine")
        return
    if "internal error" in error.lower() or "emulation failure" in error.lower():
        kind = "KVM-PVM (kvm_pvm)" if host.exists("/sys/module/kvm_pvm") else (
            "nested virtualization without VT-x" if report.nested_hypervisor else "this KVM")
        c.set("fail", "KVM cannot run ordinary guests here: /dev/kvm is present, but a standard guest stops at "
                      f"once with '{error or 'KVM internal error. Suberror: 1'}' (an emulation failure). This is "
                      f"{kind}: QEMU must fall back to TCG (-accel tcg), which is far slower, "
                      "and GVT-g, which needs a KVM VM, cannot be used.",
              "No fix inside this machine: run on bare metal or in a VM with nested VT-x (outer KVM host: modprobe "
              "kvm_intel nested=1, and this VM started with -cpu host). Meanwhile run guests with -accel tcg.")
    else:
        c.set("fail", f"KVM is present but a test guest failed: {error or report.detail}",
              "dmesg | grep -i kvm  # then fix what it reports")


def check_vfio_device(ctx: Context, c: Check) -> None:
    host = ctx.host
    path = "/dev/vfio/vfio"
    if host.exists(path):
        c.see(path, "present")
        if not ctx.simulated and not os.access(host.root.path(path), os.R_OK | os.W_OK):
            c.set("warn", f"{path} is present but this user cannot open it.", f"chmod 0666 {path}  # as udev does")
        else:
            c.set("ok", "The VFIO container device is there.")
        return
    c.see(path, "absent")
    setting = host.kconfig_value("CONFIG_VFIO")
    if host.kconfig is not None:
        c.see(host.kconfig[0], f"CONFIG_VFIO={setting}" if setting not in (None, "n") else "CONFIG_VFIO is not set")
    if host.kconfig is not None and setting in (None, "n"):
        c.set("fail", f"No {path}: the kernel is built without VFIO (CONFIG_VFIO), which QEMU needs to give a vGPU "
                      "to a VM.", kconfig_fix(host))
    else:
        c.set("fail", f"No {path}: the vfio module is not loaded.", "modprobe -a vfio vfio_iommu_type1")


def _cap_ipc_lock() -> bool | None:
    """Whether this process holds CAP_IPC_LOCK (its own status, not the host's: not under the root)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memlock(ctx: Context, c: Check) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def mib(value: int) -> str:
        return "unlimited" if value == resource.RLIM_INFINITY else f"{value // (1024 * 1024)} MiB"

    c.see("getrlimit(RLIMIT_MEMLOCK)", f"soft {mib(soft)}, hard {mib(hard)}")
    capable = _cap_ipc_lock()
    c.see("/proc/self/status CapEff", f"CAP_IPC_LOCK {'yes' if capable else 'no' if capable is False else '?'}")
    assumption = (f"A GVT-g guest's pinned pages are charged to QEMU's RLIMIT_MEMLOCK; assumed need (unverified): "
                  f"guest RAM + 1 GiB, as libvirt sets for VFIO devices, i.e. {MEMLOCK_NEEDED_MIB} MiB for a "
                  f"{ASSUMED_GUEST_MIB // 1024} GiB guest.")
    needed = MEMLOCK_NEEDED_MIB * 1024 * 1024
    if soft == resource.RLIM_INFINITY or soft >= needed:
        c.set("ok", f"QEMU started from here may lock {mib(soft)}. " + assumption)
    elif capable:
        c.set("ok", f"RLIMIT_MEMLOCK is {mib(soft)}, but this process has CAP_IPC_LOCK (root), which VFIO's "
                    "accounting exempts: QEMU started from here is not limited. " + assumption)
    else:
        c.set("warn", f"RLIMIT_MEMLOCK is {mib(soft)}: QEMU started by this user fails to pin a vGPU guest's "
                      "memory ('RLIMIT_MEMLOCK exceeded' from vfio_iommu_type1). " + assumption,
              "ulimit -l unlimited  # in the shell that starts QEMU (needs a hard limit that allows it), or for good:\n"
              "printf '%s\\n' '* soft memlock unlimited' '* hard memlock unlimited' > "
              "/etc/security/limits.d/vgpuctl-memlock.conf  # systemd services: LimitMEMLOCK=infinity")


QEMU_INSTALL = "apt-get install qemu-system-x86  # Debian/Ubuntu; Fedora: dnf install qemu-system-x86-core"


def _version_tuple(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match[1]), int(match[2])) if match else None


def check_qemu(ctx: Context, c: Check) -> None:
    report = ctx.qemu_report()
    if report is None:
        problem = ctx.qemu.error if ctx.qemu else None
        c.see("qemu-system-x86_64", ctx.qemu_binary or "not found")
        c.set("skip", f"QEMU probe not available ({problem or 'vgpuctl.host.qemu missing'}).")
        return
    c.see("QEMU binary", report.binary or "not found")
    for error in report.errors:
        c.see("QEMU probe", error)
    if report.binary is None:
        c.set("fail", "No QEMU binary (qemu-system-x86_64): nothing can run the VMs.", QEMU_INSTALL)
        return
    c.see(f"{report.binary} -version", report.version or "unknown")
    version = _version_tuple(report.version)
    if version is None and report.errors:
        c.set("fail", f"QEMU at {report.binary} does not answer as QEMU does: {report.errors[0]}.",
              f"{report.binary} -version  # by hand, to see what is wrong; or: {QEMU_INSTALL}")
    elif version is None:
        c.set("warn", f"QEMU at {report.binary} did not tell its version.")
    elif version < (2, 12):
        c.set("warn", f"QEMU {report.version} is older than 2.12, the first with vfio-pci display=on for vGPUs.",
              QEMU_INSTALL)
    else:
        c.set("ok", f"QEMU {report.version} at {report.binary}.")


def _qemu_report(ctx: Context, c: Check) -> QemuReport | None:
    report = ctx.qemu_report()
    if report is None or report.binary is None:
        c.set("skip", "Skipped: no QEMU probe (see qemu).")
        return None
    return report


def check_qemu_kvm(ctx: Context, c: Check) -> None:
    report = _qemu_report(ctx, c)
    if report is None:
        return
    c.see(f"{report.binary} -accel help", ", ".join(report.accelerators) or "none")
    if "kvm" not in report.accelerators:
        c.set("fail", "This QEMU has no KVM accelerator.", QEMU_INSTALL)
        return
    guest = ctx.checks.get("kvm-guest")
    if guest is not None and guest.status == "ok":
        c.set("ok", "QEMU has the KVM accelerator, and KVM runs guests here.")
    else:
        c.set("ok", "QEMU has the KVM accelerator (whether KVM runs guests here: see kvm-guest).")


def check_qemu_vfio(ctx: Context, c: Check) -> None:
    report = _qemu_report(ctx, c)
    if report is None:
        return
    props = report.vfio_pci_properties
    wanted = ("sysfsdev", "display", "x-igd-opregion")
    c.see(f"{report.binary} -device vfio-pci,help",
          ", ".join(f"{p}={props[p]}" if p in props else f"{p}: absent" for p in wanted) if props else "no vfio-pci")
    if not props:
        c.set("fail", "This QEMU has no vfio-pci device: it cannot give a vGPU to a VM.", QEMU_INSTALL)
        return
    if "sysfsdev" not in props:
        c.set("fail", "vfio-pci has no sysfsdev property: it cannot open an mdev vGPU.", QEMU_INSTALL)
        return
    missing = [p for p in wanted if p not in props]
    if missing:
        c.set("warn", f"vfio-pci lacks {', '.join(missing)}: no vGPU display (display=on) or no OpRegion for the "
                      "guest's Intel driver (x-igd-opregion=on).", QEMU_INSTALL)
    else:
        c.set("ok", "vfio-pci takes sysfsdev (the vGPU), display (its dma-buf screen) and x-igd-opregion.")


def check_qemu_ramfb(ctx: Context, c: Check) -> None:
    report = _qemu_report(ctx, c)
    if report is None:
        return
    c.see(f"{report.binary} -device vfio-pci-nohotplug,help",
          "ramfb" if report.ramfb else "present, no ramfb" if report.vfio_pci_nohotplug else "no vfio-pci-nohotplug")
    if report.vfio_pci_nohotplug and report.ramfb:
        c.set("ok", "vfio-pci-nohotplug takes ramfb=on: the guest's firmware and boot screen are visible.")
    else:
        c.set("warn", "No vfio-pci-nohotplug with ramfb (QEMU >= 3.0): the screen stays black until the guest's "
                      "Intel driver loads.", QEMU_INSTALL)


GL_DISPLAYS = ("egl-headless", "gtk", "sdl", "dbus", "spice-app")


def check_qemu_display(ctx: Context, c: Check) -> None:
    report = _qemu_report(ctx, c)
    if report is None:
        return
    c.see(f"{report.binary} -display help", ", ".join(report.displays) or "none")
    c.see("SPICE", "yes" if report.spice else "no")
    c.see("VNC", "yes" if report.vnc else "no")
    gl = [d for d in GL_DISPLAYS if d in report.displays] + (["spice (gl=on)"] if report.spice else [])
    render = [n for n in ctx.host.listdir("/dev/dri") or [] if n.startswith("renderD")]
    c.see("/dev/dri", ", ".join(render) or "no render node")
    if gl and not render:
        c.set("warn", f"This QEMU has OpenGL displays ({', '.join(gl)}), but the host has no DRM render node "
                      "(/dev/dri/renderD*): they cannot start ('egl: no drm render node available'), so vfio-pci "
                      "display=on cannot show the vGPU.",
              "modprobe i915  # the iGPU's driver creates /dev/dri/renderD128")
    elif gl:
        remote = " VNC too (with egl-headless it shows the vGPU remotely)." if report.vnc else ""
        c.set("ok", f"Displays that can show a vGPU's dma-buf screen (OpenGL): {', '.join(gl)}, on "
                    f"/dev/dri/{render[0]}.{remote}")
    else:
        c.set("warn", "No OpenGL display in this QEMU (egl-headless, gtk/sdl gl=on, SPICE gl=on, dbus): vfio-pci "
                      "display=on fails with 'opengl not available'; use display=off and a remote desktop in the "
                      "guest.", "apt-get install qemu-system-gui  # Debian: gtk, sdl and egl-headless modules")


@dataclass(frozen=True)
class CheckSpec:
    id: str
    title: str
    run: CheckFn
    needs: tuple[str, ...] = ()


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("igpu", "Intel iGPU supported by GVT-g on this kernel", check_igpu),
    CheckSpec("kernel-config", "Kernel built with GVT-g, KVMGT, VFIO, mdev, KVM", check_kernel_config, ("igpu",)),
    CheckSpec("enable-gvt", "i915.enable_gvt=1", check_enable_gvt, ("igpu",)),
    CheckSpec("guc", "No GuC submission (i915.enable_guc)", check_guc, ("igpu",)),
    CheckSpec("ignore-msrs", "kvm.ignore_msrs=1 (Windows guests)", check_ignore_msrs),
    CheckSpec("iommu", "IOMMU on (intel_iommu=on, recommended)", check_iommu, ("igpu",)),
    CheckSpec("modules", "Modules loaded (kvmgt, mdev, vfio, kvm)", check_modules, ("igpu", "kernel-config")),
    CheckSpec("mdev-types", "mdev types registered by kvmgt", check_mdev_types, ("igpu", "kernel-config")),
    CheckSpec("aperture", "BIOS aperture and the vGPUs it allows", check_aperture, ("igpu",)),
    CheckSpec("mdev-parents", "Other mdev parents (NVIDIA vGPU, sample drivers)", check_mdev_parents),
    CheckSpec("kvm-device", "/dev/kvm opens", check_kvm_device),
    CheckSpec("cpu-virt", "CPU virtualization (vmx/svm)", check_cpu_virt),
    CheckSpec("kvm-guest", "A tiny KVM guest runs", check_kvm_guest, ("kvm-device",)),
    CheckSpec("vfio-device", "/dev/vfio/vfio", check_vfio_device),
    CheckSpec("memlock", "RLIMIT_MEMLOCK for QEMU", check_memlock),
    CheckSpec("qemu", "QEMU binary and version", check_qemu),
    CheckSpec("qemu-kvm", "QEMU with KVM", check_qemu_kvm, ("qemu", "kvm-guest")),
    CheckSpec("qemu-vfio", "QEMU vfio-pci: sysfsdev, display, x-igd-opregion", check_qemu_vfio, ("qemu",)),
    CheckSpec("qemu-ramfb", "QEMU vfio-pci-nohotplug with ramfb", check_qemu_ramfb, ("qemu",)),
    CheckSpec("qemu-display", "QEMU display backends", check_qemu_display, ("qemu",)),
)


# ====================================================================== running them


def _default_kvm_probe(root: HostRoot, qemu_binary: str | None, run_guest: bool) -> Any:
    from vgpuctl.host.kvm import probe_kvm

    return probe_kvm(root, qemu_binary=qemu_binary, run_guest=run_guest, timeout_s=GUEST_TIMEOUT_S)


def _default_qemu_probe(binary: str | None) -> Any:
    from vgpuctl.host.qemu import probe_qemu

    return probe_qemu(binary, timeout_s=QEMU_TIMEOUT_S)


def _find_qemu(explicit: str | None) -> str | None:
    try:
        from vgpuctl.host.qemu import find_qemu
    except ImportError:
        return explicit
    return find_qemu(explicit)


def run_doctor(
    root: HostRoot,
    run_guest: bool = True,
    qemu: str | None = None,
    kvm_probe: Callable[[HostRoot, str | None, bool], Any] | None = None,
    qemu_probe: Callable[[str | None], Any] | None = None,
) -> Report:
    """Every check, in order. ``kvm_probe``/``qemu_probe`` replace the real probes (tests)."""
    host = Host(root)
    ctx = Context(host=host, run_guest=run_guest)
    ctx.qemu_binary = _find_qemu(qemu)
    qemu_probe = qemu_probe or _default_qemu_probe
    ctx.qemu = _Background(lambda: qemu_probe(qemu))  # each probe makes the same choice from ``qemu``
    if not ctx.simulated:
        kvm_probe = kvm_probe or _default_kvm_probe
        ctx.kvm = _Background(lambda: kvm_probe(root, qemu, run_guest))
    for spec in CHECKS:
        check = Check(spec.id, spec.title)
        ctx.checks[spec.id] = check
        not_needed = next((ctx.checks[n] for n in spec.needs if ctx.checks[n].not_applicable), None)
        if not_needed is not None:
            check.not_applicable = not_needed.not_applicable
            check.set("skip", f"Not needed on this host: {not_needed.not_applicable}.")
            continue
        blocker = next((ctx.checks[n] for n in spec.needs
                        if ctx.checks[n].status == "fail" or ctx.checks[n].blocked_by), None)
        if blocker is not None:
            check.blocked_by = blocker.id
            why = "failed" if blocker.status == "fail" else f"was skipped (needs {blocker.blocked_by})"
            check.set("skip", f"Skipped: needs {blocker.id} ({blocker.title}), which {why}.")
            continue
        try:
            spec.run(ctx, check)
        except Exception as e:  # one broken reading must not lose the rest of the report
            check.set("warn", f"Could not check: {type(e).__name__}: {e}")
    return Report(list(ctx.checks.values()), str(root.root), host.release, ctx.simulated)
