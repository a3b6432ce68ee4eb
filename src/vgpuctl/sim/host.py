"""A simulated vGPU host: the mdev core and the rest of a host's sysfs, procfs, /dev, /boot, /lib/modules, /etc.

``SimHost(spec)`` builds the tree of :mod:`vgpuctl.sim.vfs` nodes that a real kernel would show
for the hardware, kernel version, command line and loaded modules in ``spec``. Writes to
``create`` and ``remove`` go through :class:`SimHost` exactly as the kernel's mdev core handles
them (spec kernel-mdev-gvt.md 1.3-1.5).

A host can also boot without the modules that register mdev parents (``HostSpec.defer``), load
and unload them later, and reboot; each is one line written to the control file
``/.vgpuctl-sim-control`` (:meth:`SimHost.control`). The uevents a udev daemon would receive
after boot are kept, one line each, in ``/.vgpuctl-sim-uevents``, so that a test can act as udev.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vgpuctl.backends.gvt_platforms import INTEL_VENDOR_ID, platform_for
from vgpuctl.host import facts
from vgpuctl.host.root import SIM_MARKER, HostRoot
from vgpuctl.sim import sriov_vendors
from vgpuctl.sim.kernel import Kernel
from vgpuctl.sim.presets import DEFERRABLE_MODULES, READY_CMDLINE_FLAGS, HostSpec, check_deferrable, preset
from vgpuctl.sim.vendors import (
    GvtParent,
    MbochsParent,
    MdpyParent,
    MttyParent,
    NvidiaParent,
    Parent,
)
from vgpuctl.sim.vfs import Attr, Blob, CharDev, Dir, Link, Vfs, const, fail

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
UUID_STRING_LEN = 36
IGPU_ADDRESS = "0000:00:02.0"
VFIO_MAJOR = 511  # dynamic char major as commonly seen for /dev/vfio/<group>
IGPU_BAR2_START = 0x4000000000
AMD_VENDOR_ID = 0x1002
# Next to the marker: commands for the simulated host (write-only) and the uevents it emitted.
SIM_CONTROL = "/.vgpuctl-sim-control"
SIM_UEVENTS = "/.vgpuctl-sim-uevents"
MAX_UEVENTS = 4096  # the oldest are dropped beyond this; SEQNUM shows the gap
CONTROL_USAGE = ("reboot [defer=MODULE,...] | load MODULE | unload MODULE | trigger [add|change] | open VF | close VF"
                 " | assign VF | unassign VF | dcgm on|off")
HOST_PATHS = HostRoot()  # only for the well-known paths it names
SYNTH_ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")


@dataclass(frozen=True)
class Uevent:
    """One uevent as udev receives it. KERNEL is udev's %k (the device's name), added for convenience."""

    seqnum: int
    action: str
    devpath: str  # without the /sys prefix, as in the kernel's DEVPATH
    subsystem: str
    env: tuple[tuple[str, str], ...] = ()

    @property
    def kernel(self) -> str:
        return self.devpath.rsplit("/", 1)[-1]

    def line(self) -> str:
        pairs = [("ACTION", self.action), ("DEVPATH", self.devpath), ("SUBSYSTEM", self.subsystem),
                 ("KERNEL", self.kernel), *self.env, ("SEQNUM", str(self.seqnum))]
        return " ".join(f"{key}={value}" for key, value in pairs)


@dataclass
class Kobject:
    """A device udev knows about: what a coldplug "add" (udevadm trigger) reports for it."""

    subsystem: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class MdevDevice:
    uuid: str
    parent: Parent
    type_id: str
    iommu_group: int


class SimHost:
    """One simulated host. Thread-safe: every path operation holds one lock."""

    def __init__(self, spec: HostSpec, preset_name: str = "custom") -> None:
        self.spec = spec
        self.preset_name = preset_name
        self.kernel = Kernel(spec.kernel)
        self.kernel.version  # noqa: B018 - validates the release string early
        self.lock = threading.RLock()
        self.marker_extra: dict[str, Any] = {}
        self.boots = 0
        self.boot_cmdline: str | None = None  # after a reboot with a changed /etc/default/grub
        self.grub_written = ""
        self.vfs = Vfs()
        self.defer = self._check_defer(spec.defer)
        self._boot()

    def _boot(self) -> None:
        """Power on: a fresh kernel (no devices, deferred modules not loaded); then udev's coldplug.

        On a reboot the filesystem stays the same object: everything the kernel made is dropped
        (deepest first, so that a FUSE server hears of each path) and built again; ``/etc`` is
        disk and stays, and so do the simulator's own files at the root.
        """
        rebooting = self.boots > 0
        if rebooting:
            for path in reversed(list(self._kernel_paths())):
                self.vfs.drop(path)
        self.parents: dict[str, Parent] = {}
        self.parent_modules: dict[str, str] = {}  # parent name -> the module that registered it
        self.devices: dict[str, MdevDevice] = {}
        self.iommu_groups: set[int] = set()
        self.kobjects: dict[str, Kobject] = {}  # sysfs path -> device
        self.unloaded: set[str] = set(self.defer)
        self.uevents: list[Uevent] = []
        self.seqnum = 0
        self.booted = False  # events before udevd runs are lost; coldplug replays them as "add"
        self._build(fresh=not rebooting)
        self.boots += 1
        self.booted = True
        self.trigger("add")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SimHost:
        return cls(preset(name).with_overrides(**overrides), preset_name=name)

    # ------------------------------------------------------------------ derived host facts
    @property
    def cmdline(self) -> str:
        if self.boot_cmdline is not None:
            return self.boot_cmdline
        if self.spec.cmdline is not None:
            return self.spec.cmdline.replace("{release}", self.spec.kernel)
        flags = READY_CMDLINE_FLAGS if self.spec.gpu and self.spec.gpu.vendor_id == INTEL_VENDOR_ID else ""
        return f"BOOT_IMAGE=/boot/vmlinuz-{self.spec.kernel} root=/dev/sda1 ro quiet {flags}".strip()

    def cmdline_param(self, key: str) -> str | None:
        return facts.cmdline_param(self.cmdline, key)

    def module_param(self, module: str, name: str) -> str | None:
        """What a module is given for a parameter when it loads: the command line's ``module.name``, else the
        last ``options`` line of /etc/modprobe.d (modprobe passes both, the command line's last)."""
        on_cmdline = self.cmdline_param(f"{module}.{name}")
        if on_cmdline is not None:
            return on_cmdline
        found = None
        for text in self._conf_texts(HOST_PATHS.modprobe_dirs):
            for option_module, option_name, value in facts.parse_modprobe_options(text):
                if (option_module, option_name) == (module, name):
                    found = value
        return found

    def _conf_texts(self, directories: tuple[str, ...]) -> list[str]:
        """The texts of the ``*.conf`` files in effect, chosen as :func:`vgpuctl.host.facts.conf_files` chooses
        them (kmod's and systemd's rule: the first directory wins a file name, a link to /dev/null masks it,
        file-name order), over the simulator's tree; the directories are HostRoot's."""
        texts = []
        for path in facts.conf_files(self.vfs, directories):
            try:
                texts.append(self.vfs.read(path).decode(errors="replace"))
            except OSError:
                continue
        return texts

    def _cmdline_from_grub(self) -> str | None:
        """The command line the next boot gets: /etc/default/grub's, when an administrator changed it.

        The simulated boot loader reads /etc/default/grub as if update-grub had run after each change
        (the simulator has no grub.cfg); an unchanged file keeps the command line the host booted with.
        """
        try:
            text = self.vfs.read("/etc/default/grub").decode(errors="replace")
        except OSError:
            return None
        if text == self.grub_written:
            return None
        from vgpuctl.host.setup import parse_grub_assignments

        values = {a.name: a.value for a in parse_grub_assignments("/etc/default/grub", text) if a.problem is None}
        current = self.cmdline
        prefix = current.split(" ro ", 1)[0] + " ro" if " ro " in f"{current} " else ""
        words = [prefix, values.get("GRUB_CMDLINE_LINUX", ""), values.get("GRUB_CMDLINE_LINUX_DEFAULT", "")]
        return " ".join(w for w in words if w.strip())

    @property
    def kconfig(self) -> dict[str, str]:
        config = {
            "CONFIG_DRM_I915": "m",
            "CONFIG_DRM_I915_GVT": "y",
            "CONFIG_DRM_I915_GVT_KVMGT": "m",
            "CONFIG_VFIO": "m",
            "CONFIG_VFIO_MDEV": "m",
            "CONFIG_VFIO_IOMMU_TYPE1": "m",
            "CONFIG_KVM": "m",
            "CONFIG_KVM_INTEL": "m",
            "CONFIG_KVM_AMD": "m",
            "CONFIG_INTEL_IOMMU": "y",
        }
        if self.spec.kconfig_file == "proc":
            config["CONFIG_IKCONFIG"] = "y"
            config["CONFIG_IKCONFIG_PROC"] = "y"
        if self.kernel.has_vfio_mdev_module:
            config["CONFIG_VFIO_MDEV_DEVICE"] = "m"
        if self.kernel.at_least(6, 6):
            config["CONFIG_VFIO_GROUP"] = "y"
        if self.spec.samples:
            config["CONFIG_SAMPLE_VFIO_MDEV_MTTY"] = "m"
            config["CONFIG_SAMPLE_VFIO_MDEV_MDPY"] = "m"
            config["CONFIG_SAMPLE_VFIO_MDEV_MBOCHS"] = "m"
        config.update(self.spec.kconfig)
        return {k: v for k, v in config.items() if v != "n"}

    @property
    def is_intel(self) -> bool:
        return self.spec.gpu is not None and self.spec.gpu.vendor_id == INTEL_VENDOR_ID

    @property
    def cpu_is_amd(self) -> bool:
        """An AMD GPU at 00:02.0 is an AMD APU's iGPU: the CPU is AMD too (every other host is Intel)."""
        return self.spec.gpu is not None and self.spec.gpu.vendor_id == AMD_VENDOR_ID

    @property
    def kvm_vendor_module(self) -> str:
        return "kvm_amd" if self.cpu_is_amd else "kvm_intel"

    def _gvt_param(self, key: str) -> str | None:
        return self.module_param("i915", key)

    @property
    def enable_gvt(self) -> bool:
        return (self._gvt_param("enable_gvt") or "0").lower() in ("1", "y", "yes", "true", "on")

    @property
    def guc_submission(self) -> bool:
        try:
            return int(self._gvt_param("enable_guc") or "-1") in (1, 3)
        except ValueError:
            return False

    @property
    def gvt_initialises(self) -> bool:
        """Whether i915's GVT-g device init succeeds (independent of kvmgt being loaded)."""
        gpu = self.spec.gpu
        if gpu is None or not self.is_intel or not self.enable_gvt or self.guc_submission:
            return False
        if "CONFIG_DRM_I915_GVT" not in self.kconfig or "CONFIG_DRM_I915_GVT_KVMGT" not in self.kconfig:
            return False
        platform = platform_for(gpu.device_id)
        return platform is not None and platform.gvt_supported_on(self.kernel.version, gpu.device_id)

    @property
    def modules(self) -> list[str]:
        """Loaded modules, in /proc/modules order (less those the kernel refuses: sriov_vendors.refused_modules)."""
        refused = sriov_vendors.refused_modules(self)
        return [m for m in self._boot_modules() if m not in self.unloaded and m not in refused]

    @property
    def _kvmgt_refused(self) -> bool:
        """Up to 5.18 "modprobe kvmgt" fails with ENODEV when i915 did not start GVT."""
        return (self.is_intel and self.spec.modules is None and not self.gvt_initialises
                and not self.kernel.gvt_in_kvmgt)

    def _boot_modules(self) -> list[str]:
        """The modules this host has loaded once booted with nothing deferred."""
        if self.spec.modules is not None:
            return list(dict.fromkeys([*self.spec.modules, *self._modules_load_d()]))
        modules = ["kvm", self.kvm_vendor_module, "vfio", "vfio_iommu_type1"]
        if self.is_intel:
            modules = self.kernel.required_modules
            if self._kvmgt_refused:
                modules.remove("kvmgt")
        if not self.spec.virt:
            # VT-x/AMD-V off in the firmware: kvm_intel/kvm_amd refuse to load ("VMX not supported",
            # "disabled by bios"); kvm.ko, loaded first as their dependency, stays.
            modules = [m for m in modules if m not in ("kvm_intel", "kvm_amd")]
        if self.spec.nvidia_gpus:
            modules += ["nvidia", "nvidia_vgpu_vfio", "mdev"]
        modules += [s for s in self.spec.samples if s == "mtty" or self.kernel.has_mdpy_mbochs]
        if self.spec.samples:
            modules.append("mdev")
        return list(dict.fromkeys(modules))

    def _modules_load_d(self) -> list[str]:
        """What systemd-modules-load adds at boot from /etc/modules-load.d, with the modules each needs;
        kvmgt only where it loads (up to 5.18 it refuses when i915 did not start GVT-g)."""
        modules: list[str] = []
        for text in self._conf_texts(HOST_PATHS.modules_load_dirs):
            for module in facts.parse_modules_load(text):
                if module == "kvmgt":
                    if not self.is_intel or (not self.gvt_initialises and not self.kernel.gvt_in_kvmgt):
                        continue
                    modules += [m for m in self.kernel.required_modules if m not in ("kvmgt", "kvm_intel")]
                elif module == "vfio_iommu_type1":
                    modules.append("vfio")
                modules.append(module)
        return modules

    def loaded(self, module: str) -> bool:
        return module in self.modules

    def _check_defer(self, modules: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        chosen = check_deferrable(modules)
        available = self._boot_modules()
        absent = [m for m in chosen if m not in available and not (m == "kvmgt" and self._kvmgt_refused)]
        if absent:
            raise ValueError(f"cannot defer {', '.join(absent)}: this host does not load it "
                             f"(its modules: {', '.join(available) or 'none'})")
        return chosen

    # ------------------------------------------------------------------ building the tree
    def _kernel_paths(self) -> Iterator[str]:
        """Every path the kernel made (all but /etc and the simulator's files), parents first."""
        kept = {"etc", *(p.lstrip("/") for p in (SIM_MARKER, SIM_CONTROL, SIM_UEVENTS))}
        for name in self.vfs.listdir("/"):
            if name not in kept:
                yield f"/{name}"
                if isinstance(self.vfs.node(f"/{name}"), Dir):
                    yield from self.walk(f"/{name}")

    def _build(self, fresh: bool = True) -> None:
        fs = self.vfs
        release = self.spec.kernel
        if fresh:
            fs.put(SIM_MARKER, Attr(show=self._marker))
            fs.put(SIM_CONTROL, Attr(store=self.control))
            fs.put(SIM_UEVENTS, Attr(show=self._show_uevents))
        fs.put("/proc/cmdline", Attr(show=const(self.cmdline + "\n")))
        fs.put("/proc/sys/kernel/osrelease", Attr(show=const(release + "\n")))
        fs.put("/proc/modules", Attr(show=self._proc_modules))
        fs.put("/proc/cpuinfo", Blob(data=bytearray(self._cpuinfo().encode()), mode=0o444))
        fs.mkdirs("/boot").writable = True  # disk, like /etc: boot loader entries live here
        if self.spec.kconfig_file == "boot":
            fs.put(f"/boot/config-{release}", Blob(data=bytearray(self._config_text().encode()), mode=0o644))
        elif self.spec.kconfig_file == "proc":
            packed = gzip.compress(self._config_text().encode(), mtime=0)
            fs.put("/proc/config.gz", Blob(data=bytearray(packed), mode=0o444))
        self._build_lib_modules()
        if fresh:
            self._build_etc()
        fs.mkdirs("/dev")
        fs.mkdirs("/sys/kernel/iommu_groups")
        fs.mkdirs("/sys/bus/pci/drivers")
        self._build_modules()
        if self.loaded("kvm_intel") or self.loaded("kvm_amd"):
            fs.put("/dev/kvm", CharDev(major=10, minor=232, mode=0o660))
        if self.loaded("vfio"):
            fs.put("/dev/vfio/vfio", CharDev(major=10, minor=196, mode=0o666))
        if self.loaded("mdev"):
            fs.mkdirs("/sys/bus/mdev/devices")
            fs.mkdirs("/sys/bus/mdev/drivers")
        iommu_on = self.cmdline_param("intel_iommu") == "on" and "CONFIG_INTEL_IOMMU" in self.kconfig
        self.iommu_on = iommu_on
        if iommu_on:
            fs.mkdirs("/sys/class/iommu/dmar0")
        self._add_pci_device("0000:00:00.0", "/sys/devices/pci0000:00/0000:00:00.0", 0x8086, 0x3E0F,
                             0x060000, None, iommu_on)
        if self.spec.gpu is not None:
            self._build_igpu(iommu_on)
        for index in range(self.spec.nvidia_gpus):
            self._build_nvidia(index, iommu_on)
        for sample in self.spec.samples:
            if self.loaded(sample):
                self._build_sample(sample)
        # SR-IOV: VFs are runtime state; a boot starts with none (sriov.md 3.2, 8).
        self.pci = sriov_vendors.build(self, self.spec.sriov) if self.spec.sriov is not None else None

    def _marker(self) -> str:
        data = {"preset": self.preset_name, "kernel": self.spec.kernel, "boot": self.boots,
                "defer": list(self.defer), "not_loaded": sorted(self.unloaded), **self.marker_extra}
        if self.pci is not None:
            data["open_vfs"] = self.pci.open_vfs()
        return json.dumps(data) + "\n"

    def _show_uevents(self) -> str:
        return "".join(event.line() + "\n" for event in self.uevents)

    def _config_text(self) -> str:
        lines = [f"# Linux/x86 {self.spec.kernel} Kernel Configuration (simulated)"]
        lines += [f"{key}={value}" for key, value in sorted(self.kconfig.items())]
        return "\n".join(lines) + "\n"

    def _cpuinfo(self, cpus: int = 4) -> str:
        """/proc/cpuinfo: what the doctor reads is vendor_id, model name and the vmx/svm/hypervisor flags."""
        flags = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
                 "sse2 ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid pni "
                 "pclmulqdq monitor ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand "
                 "lahf_lm abm 3dnowprefetch fsgsbase bmi1 avx2 smep bmi2 erms")
        if self.cpu_is_amd:
            vendor, family, model, name = "AuthenticAMD", 25, 80, "AMD Ryzen 7 5700G with Radeon Graphics"
            flags += " svm" if self.spec.virt else ""
            vmx_flags = None
        else:
            igpu = self.spec.gpu.device_id if self.spec.gpu is not None and self.is_intel else None
            vendor, family, (model, name) = "GenuineIntel", 6, _intel_cpu(igpu)
            flags += " vmx" if self.spec.virt else ""
            # 5.9+ prints the VMX features on their own line, when VMX is usable.
            vmx_flags = ("vnmi preemption_timer invvpid ept_x_only ept_ad ept_1gb flexpriority tsc_offset vtpr "
                         "mtf vapic ept vpid unrestricted_guest ple") if self.spec.virt else None
        blocks = []
        for cpu in range(cpus):
            lines = [f"processor\t: {cpu}", f"vendor_id\t: {vendor}", f"cpu family\t: {family}",
                     f"model\t\t: {model}", f"model name\t: {name}", f"siblings\t: {cpus}",
                     f"core id\t\t: {cpu}", f"cpu cores\t: {cpus}", f"flags\t\t: {flags}"]
            if vmx_flags and self.kernel.at_least(5, 9):
                lines.append(f"vmx flags\t: {vmx_flags}")
            blocks.append("\n".join(lines) + "\n")
        return "\n".join(blocks) + "\n"

    def _build_lib_modules(self) -> None:
        """/lib/modules/<release>/modules.builtin and modules.dep for the modules a GVT-g host cares about."""
        config = self.kconfig
        builtin: list[str] = []
        dep: list[str] = []
        for symbol, path, needs in _module_files(self.kernel):
            state = config.get(symbol)
            if state == "y":
                builtin.append(path)
            elif state == "m":
                deps = [p for s, p, _ in _module_files(self.kernel) if s in needs and config.get(s) == "m"]
                dep.append(f"{path}: {' '.join(deps)}".rstrip())
        base = f"/lib/modules/{self.spec.kernel}"
        self.vfs.put(f"{base}/modules.builtin", Blob(data=bytearray("".join(p + "\n" for p in builtin).encode())))
        self.vfs.put(f"{base}/modules.dep", Blob(data=bytearray("".join(d + "\n" for d in dep).encode())))

    def _proc_modules(self) -> str:
        return "".join(f"{m} 65536 0 - Live 0x0000000000000000\n" for m in self.modules)

    def _build_etc(self) -> None:
        etc = self.vfs.mkdirs("/etc")
        etc.writable = True
        for directory in ("/etc/mdevctl.d/scripts.d/callouts", "/etc/mdevctl.d/scripts.d/notifiers",
                          "/etc/modprobe.d", "/etc/default"):
            self.vfs.mkdirs(directory)
        self._mark_writable(etc)
        extra = self.cmdline.split(" ro ", 1)[1] if " ro " in self.cmdline else ""
        grub = f'GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT="{extra}"\nGRUB_CMDLINE_LINUX=""\n'
        self.grub_written = grub
        self.vfs.put("/etc/default/grub", Blob(data=bytearray(grub.encode())))

    def _mark_writable(self, directory: Dir) -> None:
        directory.writable = True
        for child in directory.children.values():
            if isinstance(child, Dir):
                self._mark_writable(child)

    def _build_modules(self) -> None:
        fs = self.vfs
        for module in self.modules:
            fs.mkdirs(f"/sys/module/{module}")
        if self.loaded("i915") and "CONFIG_DRM_I915_GVT" in self.kconfig:
            # Older kernels (before ~5.8 [U]) cleared the global parameter when GVT init failed.
            failed = self.enable_gvt and not self.gvt_initialises and not self.kernel.at_least(5, 8)
            value = "Y" if self.enable_gvt and not failed else "N"
            fs.put("/sys/module/i915/parameters/enable_gvt", Attr(show=const(value + "\n"), mode=0o400))
        if self.loaded("i915"):
            guc = self._gvt_param("enable_guc") or "-1"
            fs.put("/sys/module/i915/parameters/enable_guc", Attr(show=const(guc + "\n"), mode=0o400))
        if self.loaded("kvm"):
            self._bool_param("kvm", "ignore_msrs", self.module_param("kvm", "ignore_msrs"))
            self._bool_param("kvm", "report_ignored_msrs", self.module_param("kvm", "report_ignored_msrs") or "Y")
        if self.loaded("mdev"):
            fs.put("/sys/module/mdev/version", Attr(show=const("0.1\n")))

    def _bool_param(self, module: str, name: str, initial: str | None) -> None:
        state = {"value": (initial or "N").upper() in ("1", "Y", "YES", "TRUE", "ON")}

        def store(text: str) -> None:  # kernel param_set_bool accepts 0/1/y/n/Y/N
            word = text.strip().upper()
            if word not in ("0", "1", "Y", "N"):
                raise fail(errno.EINVAL)
            state["value"] = word in ("1", "Y")

        self.vfs.put(f"/sys/module/{module}/parameters/{name}",
                     Attr(show=lambda: ("Y" if state["value"] else "N") + "\n", store=store, mode=0o644))

    def _add_pci_device(self, address: str, path: str, vendor: int, device: int, pci_class: int,
                        driver: str | None, iommu_on: bool, bar2_mib: int = 0) -> None:
        fs = self.vfs
        fs.mkdirs(path)
        fs.put(f"{path}/vendor", Attr(show=const(f"0x{vendor:04x}\n")))
        fs.put(f"{path}/device", Attr(show=const(f"0x{device:04x}\n")))
        fs.put(f"{path}/class", Attr(show=const(f"0x{pci_class:06x}\n")))
        fs.put(f"{path}/subsystem_vendor", Attr(show=const(f"0x{vendor:04x}\n")))
        fs.put(f"{path}/resource", Attr(show=const(_pci_resource(bar2_mib))))
        fs.put(f"{path}/subsystem", Link(target="/sys/bus/pci"))
        fs.put(f"/sys/bus/pci/devices/{address}", Link(target=path))
        self._add_kobject(path, "pci", _pci_uevent_env(address, vendor, device, pci_class, driver))
        if driver:
            fs.mkdirs(f"/sys/bus/pci/drivers/{driver}")
            fs.put(f"{path}/driver", Link(target=f"/sys/bus/pci/drivers/{driver}"))
            fs.put(f"/sys/bus/pci/drivers/{driver}/{address}", Link(target=path))
        if iommu_on:
            group = self._new_iommu_group()
            fs.put(f"/sys/kernel/iommu_groups/{group}/devices/{address}", Link(target=path))
            fs.put(f"{path}/iommu_group", Link(target=f"/sys/kernel/iommu_groups/{group}"))

    def _build_igpu(self, iommu_on: bool) -> None:
        gpu = self.spec.gpu
        assert gpu is not None
        path = f"/sys/devices/pci0000:00/{IGPU_ADDRESS}"
        driver = ("i915" if self.loaded("i915") else None) if self.is_intel else "amdgpu"
        self._add_pci_device(IGPU_ADDRESS, path, gpu.vendor_id, gpu.device_id, 0x030000, driver, iommu_on,
                             bar2_mib=gpu.aperture_mib)
        if driver:
            # The bound DRM driver's nodes: the primary card and the render node (what OpenGL, e.g. QEMU's
            # egl-headless display, opens).
            for name, minor in (("card0", 0), ("renderD128", 128)):
                self.vfs.mkdirs(f"{path}/drm/{name}")
                self.vfs.put(f"{path}/drm/{name}/dev", Attr(show=const(f"226:{minor}\n")))
                self.vfs.put(f"/sys/class/drm/{name}", Link(target=f"{path}/drm/{name}"))
                self.vfs.put(f"/dev/dri/{name}", CharDev(major=226, minor=minor, mode=0o660 if minor < 128 else 0o666))
        if not (self.gvt_initialises and self.loaded("i915")):
            return
        # GVT device init got far enough to expose the golden-state firmware blob (root only).
        self.vfs.put(f"{path}/gvt_firmware", Attr(show=const(""), mode=0o400, binary=True))
        self._register_gvt()

    def _register_gvt(self) -> None:
        """kvmgt's load registers the iGPU as an mdev parent, if i915 started GVT (spec 4.2)."""
        gpu = self.spec.gpu
        if gpu is None or not (self.gvt_initialises and self.loaded("i915")):
            return
        if self.loaded("kvmgt") and self.loaded("mdev"):
            platform = platform_for(gpu.device_id)
            assert platform is not None
            self._register_parent(GvtParent(
                name=IGPU_ADDRESS, device_path=f"/sys/devices/pci0000:00/{IGPU_ADDRESS}", kernel=self.kernel,
                vendor_driver="intel_vgpu_mdev", graphics_ver=platform.graphics_ver,
                aperture_mib=gpu.aperture_mib, ggtt_mib=gpu.ggtt_mib, fences=gpu.fences,
            ), "kvmgt")

    @staticmethod
    def _nvidia_location(index: int) -> tuple[str, str]:
        bus = 0x3B + index * 0x23  # 3b, 5e, 81, a4, ... as on dual-socket servers
        address = f"0000:{bus:02x}:00.0"
        port = f"0000:00:{index + 3:02x}.0"
        return address, f"/sys/devices/pci0000:00/{port}/{address}"

    def _build_nvidia(self, index: int, iommu_on: bool) -> None:
        address, path = self._nvidia_location(index)
        self._add_pci_device(address, path, 0x10DE, 0x1EB8, 0x030200,
                             "nvidia" if self.loaded("nvidia") else None, iommu_on)
        self._register_nvidia(index)

    def _register_nvidia(self, index: int) -> None:
        if self.loaded("nvidia_vgpu_vfio") and self.loaded("mdev"):
            address, path = self._nvidia_location(index)
            self._register_parent(NvidiaParent(address, path, self.kernel, "nvidia-vgpu-vfio"), "nvidia_vgpu_vfio")

    def _build_sample(self, sample: str) -> None:
        """The sample module's init: its class device, then the mdev parent on it."""
        path = f"/sys/devices/virtual/{sample}/{sample}"
        self.vfs.mkdirs(path)
        self.vfs.put(f"/sys/class/{sample}/{sample}", Link(target=path))
        self._add_kobject(path, sample)
        kinds: dict[str, type[Parent]] = {"mtty": MttyParent, "mdpy": MdpyParent, "mbochs": MbochsParent}
        self._register_parent(kinds[sample](sample, path, self.kernel, sample), sample)

    def _register_parent(self, parent: Parent, module: str) -> None:
        """mdev_register_parent(): the types kset, one directory per type, the mdev_bus class link."""
        fs = self.vfs
        self.parents[parent.name] = parent
        self.parent_modules[parent.name] = module
        types_dir = f"{parent.device_path}/mdev_supported_types"
        fs.mkdirs(types_dir)
        for sim_type in parent.types():
            base = f"{types_dir}/{sim_type.type_id}"
            fs.mkdirs(f"{base}/devices")
            fs.put(f"{base}/create", Attr(store=partial(self.create, parent.name, sim_type.type_id)))
            fs.put(f"{base}/device_api", Attr(show=const(sim_type.device_api + "\n")))
            fs.put(f"{base}/available_instances", Attr(show=partial(_show_available, parent, sim_type.type_id)))
            if sim_type.name is not None:
                fs.put(f"{base}/name", Attr(show=const(sim_type.name + "\n")))
            if sim_type.description is not None:
                fs.put(f"{base}/description", Attr(show=const(sim_type.description)))
        fs.put(f"/sys/class/mdev_bus/{parent.name}", Link(target=parent.device_path))
        driver = self.kernel.mdev_driver(parent.vendor_driver)
        fs.mkdirs(f"/sys/bus/mdev/drivers/{driver}")
        self._emit("change", parent.device_path, {"MDEV_STATE": "registered"})

    def _unregister_parent(self, name: str) -> None:
        """mdev_unregister_parent(): force-remove its mdevs, drop the types and the class link (spec 1.5)."""
        fs = self.vfs
        parent = self.parents[name]
        for device in [d for d in self.devices.values() if d.parent is parent]:
            self._destroy_device(device)
        fs.drop(f"{parent.device_path}/mdev_supported_types")
        fs.drop(f"/sys/class/mdev_bus/{name}")
        del self.parents[name]
        del self.parent_modules[name]
        driver = self.kernel.mdev_driver(parent.vendor_driver)
        if driver == parent.vendor_driver and all(p.vendor_driver != driver for p in self.parents.values()):
            fs.drop(f"/sys/bus/mdev/drivers/{driver}")  # 5.19+: the vendor's mdev driver leaves with it
        self._emit("change", parent.device_path, {"MDEV_STATE": "unregistered"})

    # ------------------------------------------------------------------ uevents
    def _add_kobject(self, path: str, subsystem: str, env: dict[str, str] | None = None) -> None:
        """device_add(): the device's ``uevent`` attribute, and its "add" event."""
        kobject = self.kobjects[path] = Kobject(subsystem, dict(env or {}))
        self.vfs.put(f"{path}/uevent", Attr(show=lambda: "".join(f"{k}={v}\n" for k, v in kobject.env.items()),
                                            store=partial(self._uevent_store, path), mode=0o644))
        self._emit("add", path)

    def _uevent_store(self, path: str, text: str) -> None:
        """A write to a device's ``uevent`` (what udevadm trigger does): a synthetic event (kobject_synth_uevent)."""
        with self.lock:
            words = text.split()
            if not words or words[0] not in SYNTH_ACTIONS:
                raise fail(errno.EINVAL, f"uevent takes one of {', '.join(SYNTH_ACTIONS)}")
            self._emit(words[0], path, {"SYNTH_UUID": "0"})

    def _del_kobject(self, path: str) -> None:
        self._emit("remove", path)
        self.kobjects.pop(path, None)

    def _emit(self, action: str, path: str, extra: dict[str, str] | None = None) -> None:
        """A uevent for the device at sysfs ``path``; before udevd runs (during boot) nobody hears it."""
        if not self.booted:
            return
        kobject = self.kobjects.get(path)
        subsystem = kobject.subsystem if kobject else ""
        env = {**(kobject.env if kobject else {}), **(extra or {})}
        self.seqnum += 1
        self.uevents.append(Uevent(self.seqnum, action, path.removeprefix("/sys"), subsystem, tuple(env.items())))
        del self.uevents[:-MAX_UEVENTS]

    def trigger(self, action: str = "add") -> None:
        """``udevadm trigger --action=ACTION``: ACTION written to every device's ``uevent`` (coldplug at boot)."""
        with self.lock:
            for path in list(self.kobjects):
                self._uevent_store(path, action)

    # ------------------------------------------------------------------ modules, reboot, the control file
    def load_module(self, module: str) -> None:
        """``modprobe MODULE`` for a deferred module: it registers its mdev parents (uevent each)."""
        with self.lock:
            if self.loaded(module):
                return  # modprobe of a loaded module does nothing
            if module not in self.unloaded:
                raise fail(errno.ENOENT, f"module {module} not found (not deferred on this host)")
            if module not in self._boot_modules():
                raise fail(errno.ENODEV, f"modprobe {module}: GVT-g did not initialise in i915")
            self.unloaded.discard(module)
            self.vfs.mkdirs(f"/sys/module/{module}")
            if module == "kvmgt":
                self._register_gvt()
            elif module == "nvidia_vgpu_vfio":
                for index in range(self.spec.nvidia_gpus):
                    self._register_nvidia(index)
            else:
                self._build_sample(module)

    def unload_module(self, module: str) -> None:
        """``rmmod MODULE``: its parents unregister, which force-removes their mdevs."""
        with self.lock:
            if module not in DEFERRABLE_MODULES:
                raise fail(errno.EINVAL, f"the simulator can only unload {', '.join(DEFERRABLE_MODULES)}")
            if not self.loaded(module):
                raise fail(errno.ENOENT, f"module {module} is not currently loaded")
            for name in [n for n, m in self.parent_modules.items() if m == module]:
                self._unregister_parent(name)
            if module in self.spec.samples:
                path = f"/sys/devices/virtual/{module}/{module}"
                self._del_kobject(path)
                self.vfs.drop(f"/sys/devices/virtual/{module}")
                self.vfs.drop(f"/sys/class/{module}")
            self.vfs.drop(f"/sys/module/{module}")
            self.unloaded.add(module)

    def reboot(self, defer: list[str] | None = None) -> None:
        """Every mdev is gone, modules in ``defer`` (default: as at the last boot) are not loaded; /etc stays."""
        with self.lock:
            if defer is not None:
                self.defer = self._check_defer(defer)
            self.boot_cmdline = self._cmdline_from_grub() or self.boot_cmdline
            with contextlib.suppress(OSError):  # what this boot came from: a revert to the first file is a change
                self.grub_written = self.vfs.read("/etc/default/grub").decode(errors="replace")
            self._boot()

    def control(self, text: str) -> None:
        """A write to the control file: one command a line (see CONTROL_USAGE); EINVAL when not understood."""
        with self.lock:
            for line in text.splitlines():
                words = line.split()
                try:
                    match words:
                        case []:
                            continue
                        case ["reboot"]:
                            self.reboot()
                        case ["reboot", arg] if arg.startswith("defer="):
                            self.reboot(arg.removeprefix("defer=").split(","))
                        case ["load", module]:
                            self.load_module(module)
                        case ["unload", module]:
                            self.unload_module(module)
                        case ["trigger"] | ["trigger", "add" | "change"]:
                            self.trigger(words[1] if len(words) > 1 else "add")
                        case ["open" | "close", address] if self.pci is not None:
                            (self.pci.open_vf if words[0] == "open" else self.pci.close_vf)(address)
                        case ["dcgm", "on" | "off"] if self.pci is not None:
                            self.pci.hold(words[1] == "on")
                        case ["assign" | "unassign", address] if self.pci is not None:
                            self.pci.assign(address, words[0] == "assign")
                        case _:
                            raise fail(errno.EINVAL, f"unknown command {line!r}; commands: {CONTROL_USAGE}")
                except ValueError as e:
                    raise fail(errno.EINVAL, str(e)) from None

    def _new_iommu_group(self) -> int:
        group = next(n for n in range(len(self.iommu_groups) + 1) if n not in self.iommu_groups)
        self.iommu_groups.add(group)
        return group

    # ------------------------------------------------------------------ the mdev core
    def create(self, parent_name: str, type_id: str, text: str) -> None:
        """A write of ``text`` to ``<parent>/mdev_supported_types/<type_id>/create``."""
        with self.lock:
            if len(text) not in (UUID_STRING_LEN, UUID_STRING_LEN + 1):
                raise fail(errno.EINVAL, "write a 36-character UUID")
            raw = text[:UUID_STRING_LEN]
            if not UUID_RE.match(raw):
                raise fail(errno.EINVAL, "not a UUID")
            uuid = raw.lower()  # %pUl
            parent = self.parents[parent_name]
            clash = self.devices.get(uuid)
            if clash and (self.kernel.global_uuid_check or clash.parent is parent):
                raise fail(errno.EEXIST, f"{uuid} exists on {clash.parent.name}")
            if clash:
                # 4.10 allowed the same UUID under two parents, but sysfs can't hold two
                # /sys/bus/mdev/devices/<uuid> links: the kernel fails there with EEXIST too.
                raise fail(errno.EEXIST, f"{uuid} exists on {clash.parent.name}")
            extra = parent.allocate(uuid, type_id)
            group = self._new_iommu_group()
            device = MdevDevice(uuid, parent, type_id, group)
            self.devices[uuid] = device
            self._add_device_nodes(device, extra)

    def _add_device_nodes(self, device: MdevDevice, extra: dict[str, Any]) -> None:
        fs = self.vfs
        parent, uuid = device.parent, device.uuid
        path = f"{parent.device_path}/{uuid}"
        type_dir = f"{parent.device_path}/mdev_supported_types/{device.type_id}"
        driver = self.kernel.mdev_driver(parent.vendor_driver)
        fs.mkdirs(path)
        fs.put(f"{path}/remove", Attr(store=partial(self.remove, uuid)))
        fs.put(f"{path}/mdev_type", Link(target=type_dir))
        fs.put(f"{path}/driver", Link(target=f"/sys/bus/mdev/drivers/{driver}"))
        fs.put(f"{path}/subsystem", Link(target="/sys/bus/mdev"))
        fs.put(f"{path}/iommu_group", Link(target=f"/sys/kernel/iommu_groups/{device.iommu_group}"))
        for relative, node in extra.items():
            fs.put(f"{path}/{relative}", node)
        fs.put(f"{type_dir}/devices/{uuid}", Link(target=path))
        fs.put(f"/sys/bus/mdev/devices/{uuid}", Link(target=path))
        fs.put(f"/sys/bus/mdev/drivers/{driver}/{uuid}", Link(target=path))
        fs.put(f"/sys/kernel/iommu_groups/{device.iommu_group}/devices/{uuid}", Link(target=path))
        fs.put(f"/dev/vfio/{device.iommu_group}", CharDev(major=VFIO_MAJOR, minor=device.iommu_group))
        self._add_kobject(path, "mdev", {"DRIVER": driver, "MDEV_TYPE": device.type_id})

    def remove(self, uuid: str, text: str) -> None:
        """A write of ``text`` to ``<device>/remove`` (kstrtoul base 0: non-zero removes)."""
        with self.lock:
            value = _kstrtoul(text)
            if value == 0:
                return
            device = self.devices.get(uuid)
            if device is None:
                raise fail(errno.ENODEV)
            self._destroy_device(device)

    def _destroy_device(self, device: MdevDevice) -> None:
        with self.lock:
            uuid, parent = device.uuid, device.parent
            del self.devices[uuid]
            driver = self.kernel.mdev_driver(parent.vendor_driver)
            fs = self.vfs
            self._del_kobject(f"{parent.device_path}/{uuid}")
            fs.drop(f"{parent.device_path}/{uuid}")
            fs.drop(f"{parent.device_path}/mdev_supported_types/{device.type_id}/devices/{uuid}")
            fs.drop(f"/sys/bus/mdev/devices/{uuid}")
            fs.drop(f"/sys/bus/mdev/drivers/{driver}/{uuid}")
            fs.drop(f"/sys/kernel/iommu_groups/{device.iommu_group}")
            fs.drop(f"/dev/vfio/{device.iommu_group}")
            self.iommu_groups.discard(device.iommu_group)
            parent.release(uuid)

    # ------------------------------------------------------------------ path operations (locked)
    def read(self, path: str, size: int = -1, offset: int = 0) -> bytes:
        with self.lock:
            return self.vfs.read(path, size, offset)

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def write(self, path: str, data: bytes | str, offset: int = 0) -> int:
        with self.lock:
            return self.vfs.write(path, data.encode() if isinstance(data, str) else data, offset)

    def listdir(self, path: str) -> list[str]:
        with self.lock:
            return self.vfs.listdir(path)

    def readlink(self, path: str) -> str:
        with self.lock:
            return self.vfs.readlink(path)

    def exists(self, path: str) -> bool:
        try:
            with self.lock:
                self.vfs.node(path)
        except OSError:
            return False
        return True

    def walk(self, top: str = "/") -> Iterator[str]:
        """Every path under top (not following symlinks), for tests and debugging."""
        for name in self.listdir(top):
            path = f"{top.rstrip('/')}/{name}"
            yield path
            node = self.vfs.node(path)
            if isinstance(node, Dir):
                yield from self.walk(path)


def _show_available(parent: Parent, type_id: str) -> str:
    return f"{parent.available(type_id)}\n"


def _kstrtoul(text: str) -> int:
    """kstrtoul(buf, 0): optional trailing newline, 0x/0 prefixes, nothing else."""
    body = text[:-1] if text.endswith("\n") else text
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", body):
            return int(body, 16)
        if re.fullmatch(r"0[0-7]*", body):
            return int(body, 8)
        if re.fullmatch(r"[1-9][0-9]*", body):
            return int(body)
    except ValueError:
        pass
    raise fail(errno.EINVAL, "remove takes a number")


def _pci_uevent_env(address: str, vendor: int, device: int, pci_class: int, driver: str | None) -> dict[str, str]:
    """What pci_uevent() adds (after the driver core's DRIVER); the simulator has no subsystem device id."""
    env = {"DRIVER": driver} if driver else {}
    env |= {
        "PCI_CLASS": f"{pci_class:X}",
        "PCI_ID": f"{vendor:04X}:{device:04X}",
        "PCI_SUBSYS_ID": f"{vendor:04X}:{device:04X}",
        "PCI_SLOT_NAME": address,
        "MODALIAS": f"pci:v{vendor:08X}d{device:08X}sv{vendor:08X}sd{device:08X}"
                    f"bc{pci_class >> 16:02X}sc{(pci_class >> 8) & 0xFF:02X}i{pci_class & 0xFF:02X}",
    }
    return env


_CPU_BY_PLATFORM = {  # a CPU model of each iGPU platform, for /proc/cpuinfo (family 6)
    "BDW": (61, "Intel(R) Core(TM) i5-5200U CPU @ 2.20GHz"),
    "SKL": (94, "Intel(R) Core(TM) i7-6700 CPU @ 3.40GHz"),
    "KBL": (158, "Intel(R) Core(TM) i7-7700 CPU @ 3.60GHz"),
    "BXT": (92, "Intel(R) Celeron(R) CPU J3455 @ 1.50GHz"),
    "CFL": (158, "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz"),
    "CML": (165, "Intel(R) Core(TM) i7-10700 CPU @ 2.90GHz"),
    "GEMINI": (122, "Intel(R) Celeron(R) J4105 CPU @ 1.50GHz"),
    "ICE": (126, "Intel(R) Core(TM) i7-1065G7 CPU @ 1.30GHz"),
    "TIGER": (140, "11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz"),
    "ALDER": (151, "12th Gen Intel(R) Core(TM) i7-12700K"),
}


def _intel_cpu(igpu_device_id: int | None) -> tuple[int, str]:
    """(model, model name) of an Intel CPU with this iGPU; a Xeon (no iGPU) otherwise."""
    platform = platform_for(igpu_device_id) if igpu_device_id is not None else None
    if platform is not None and platform.short in _CPU_BY_PLATFORM:
        return _CPU_BY_PLATFORM[platform.short]
    return 85, "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz"


def _module_files(kernel: Kernel) -> list[tuple[str, str, tuple[str, ...]]]:
    """(Kconfig symbol, path under /lib/modules/<release>, symbols of the modules it depends on), by era."""
    kvmgt = f"kernel/drivers/gpu/drm/i915/{'' if kernel.gvt_in_kvmgt else 'gvt/'}kvmgt.ko"  # 5.19+: all GVT in kvmgt
    files = [
        ("CONFIG_KVM", "kernel/arch/x86/kvm/kvm.ko", ()),
        ("CONFIG_KVM_INTEL", "kernel/arch/x86/kvm/kvm-intel.ko", ("CONFIG_KVM",)),
        ("CONFIG_KVM_AMD", "kernel/arch/x86/kvm/kvm-amd.ko", ("CONFIG_KVM",)),
        ("CONFIG_VFIO", "kernel/drivers/vfio/vfio.ko", ()),
        ("CONFIG_VFIO_IOMMU_TYPE1", "kernel/drivers/vfio/vfio_iommu_type1.ko", ("CONFIG_VFIO",)),
        ("CONFIG_VFIO_MDEV", "kernel/drivers/vfio/mdev/mdev.ko", ("CONFIG_VFIO",)),
        ("CONFIG_DRM_I915", "kernel/drivers/gpu/drm/i915/i915.ko", ()),
        ("CONFIG_DRM_I915_GVT_KVMGT", kvmgt, ("CONFIG_DRM_I915", "CONFIG_KVM", "CONFIG_VFIO_MDEV", "CONFIG_VFIO")),
        ("CONFIG_SAMPLE_VFIO_MDEV_MTTY", "kernel/samples/vfio-mdev/mtty.ko", ("CONFIG_VFIO_MDEV", "CONFIG_VFIO")),
        ("CONFIG_SAMPLE_VFIO_MDEV_MDPY", "kernel/samples/vfio-mdev/mdpy.ko", ("CONFIG_VFIO_MDEV", "CONFIG_VFIO")),
        ("CONFIG_SAMPLE_VFIO_MDEV_MBOCHS", "kernel/samples/vfio-mdev/mbochs.ko", ("CONFIG_VFIO_MDEV", "CONFIG_VFIO")),
    ]
    if kernel.has_vfio_mdev_module:
        files.insert(6, ("CONFIG_VFIO_MDEV_DEVICE", "kernel/drivers/vfio/mdev/vfio_mdev.ko",
                         ("CONFIG_VFIO_MDEV", "CONFIG_VFIO")))
    return files


def _pci_resource(bar2_mib: int) -> str:
    """The PCI ``resource`` file: 13 lines of start/end/flags; BAR2 is the GVT aperture (GMADR)."""
    lines = ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 13
    lines[0] = "0x00000000f6000000 0x00000000f6ffffff 0x0000000000140204"
    if bar2_mib:
        end = IGPU_BAR2_START + bar2_mib * 1024 * 1024 - 1
        lines[2] = f"0x{IGPU_BAR2_START:016x} 0x{end:016x} 0x000000000014220c"
        lines[4] = "0x000000000000f000 0x000000000000f03f 0x0000000000040101"
    return "\n".join(lines) + "\n"
