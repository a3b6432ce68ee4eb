"""The doctor's engine and its host-wide checks: is this host ready to run vGPUs under KVM, and if not, what
to change. Each vGPU backend adds its own checks (``VgpuBackend.doctor_checks``: GVT-g's iGPU, kernel and
aperture checks in vgpuctl.backends.gvt_doctor); vgpuctl.backends.doctor runs them all.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from vgpuctl.host import facts, pci
from vgpuctl.host.root import THIS_PROCESS_STATUS, HostRoot

if TYPE_CHECKING:
    from vgpuctl.host.kvm import KvmReport
    from vgpuctl.host.qemu import QemuReport

Status = Literal["ok", "warn", "fail", "skip"]
MARKS: dict[str, str] = {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}

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
GRUB_ADD = "sed -i 's/^GRUB_CMDLINE_LINUX_DEFAULT=\"/&{param} /' /etc/default/grub && update-grub && reboot"


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
    kinds: list[str] = field(default_factory=list)  # the kinds of vGPU the host can serve

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
            return f"READY: this host can run {' and '.join(self.kinds) or 'VMs, but no'} vGPUs{notes}"
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
        return facts.kernel_release(self.root)

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
        base = self.root.lib_modules(self.release)
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
        return facts.parse_proc_modules(self.read(self.root.proc_modules) or "")

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
        return self.value(self.root.proc_cmdline) or ""

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
        for line in (self.read(self.root.proc_cpuinfo) or "").splitlines():
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
        base = self.root.pci_device(address)
        vendor, device, pci_class = (facts.as_int(self.value(f"{base}/{name}"))
                                     for name in ("vendor", "device", "class"))
        if vendor is None or device is None:
            return None
        return vendor, device, pci_class or 0

    def mdev_parents(self) -> list[tuple[str, int | None, str]]:
        """(parent, PCI vendor id, what drives it) of every mdev parent: a GPU's driver (i915's GVT-g, NVIDIA's
        vGPU driver for time-sliced vGPUs before Ada), or one of the kernel's sample drivers (their own parents,
        with no PCI vendor and no driver link)."""
        found = []
        for parent in self.listdir(self.root.sys_class_mdev_bus) or []:
            base = f"{self.root.sys_class_mdev_bus}/{parent}"
            vendor = facts.as_int(self.value(f"{base}/vendor"))
            try:
                driver = os.path.basename(self.root.readlink(f"{base}/driver"))
            except OSError:
                driver = f"the {parent} sample driver" if vendor is None else "its vendor's driver"
            found.append((parent, vendor, driver))
        return found


def describe_pci(ids: tuple[int, int, int]) -> str:
    """E.g. "a display controller from AMD (1002:1638)"."""
    return pci.describe(*ids)


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
    # The kinds of vGPU the checks found this host able to serve (e.g. "GVT-g"), for the verdict.
    kinds: list[str] = field(default_factory=list)
    _facts: dict[Callable[[Host], Any], Any] = field(default_factory=dict)

    @property
    def simulated(self) -> bool:
        return self.host.simulation is not None

    def facts(self, kind: Callable[[Host], FactsT]) -> FactsT:
        """A backend's own reading of the host (``kind(host)``), made once per run and shared by its checks."""
        if kind not in self._facts:
            self._facts[kind] = kind(self.host)
        found: FactsT = self._facts[kind]
        return found

    def kvm_report(self) -> KvmReport | None:
        return self.kvm.get() if self.kvm else None

    def qemu_report(self) -> QemuReport | None:
        return self.qemu.get() if self.qemu else None


CheckFn = Callable[[Context, Check], None]
FactsT = TypeVar("FactsT")


def kernel_param_fix(host: Host, param: str) -> str:
    """Exact commands that put a parameter on the kernel command line: vgpuctl's own, or by hand for GRUB."""
    return ("vgpuctl setup plan && vgpuctl setup apply  # any boot loader; backed up, 'setup revert' undoes it\n"
            "or add it to the kernel command line by hand:\n" + GRUB_ADD.format(param=param))


def see_param(host: Host, c: Check, module: str, param: str) -> tuple[str | None, tuple[str, str] | None, str | None]:
    """A module parameter's sources as evidence (command line, modprobe.d); returns them and the running value."""
    cmd, modprobe = host.param_sources(module, param)
    c.see(host.root.proc_cmdline, f"{module}.{param}={cmd}" if cmd is not None else f"no {module}.{param}")
    if modprobe:
        c.see(modprobe[1], f"options {module} {param}={modprobe[0]}")
    return cmd, modprobe, host.value(host.root.module_parameter(module, param))


def check_ignore_msrs(ctx: Context, c: Check) -> None:
    host = ctx.host
    sysfs_path = host.root.module_parameter("kvm", "ignore_msrs")
    cmd, modprobe, runtime = see_param(host, c, "kvm", "ignore_msrs")
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
    present = host.exists(host.root.dev_kvm)
    module = _kvm_vendor_module(host)
    if ctx.simulated:
        c.see(host.root.dev_kvm, "present (simulated)" if present else "absent")
        if not present:
            c.see(host.root.proc_modules, f"{module}: {'loaded' if module in host.loaded else 'not loaded'}")
            c.set("fail", f"No /dev/kvm: {module} is not loaded, so there is no KVM. GVT-g needs KVM "
                          "('KVM is required to use Intel vGPU').", _no_kvm_fix(host))
        else:
            c.set("skip", "simulated /dev/kvm: not probed (the simulated host's device node is not a real KVM).")
        return
    report = ctx.kvm_report()
    if report is None:
        problem = ctx.kvm.error if ctx.kvm else None
        c.see(host.root.dev_kvm, "present" if present else "absent")
        c.set("fail" if not present else "skip",
              "No /dev/kvm." if not present else f"KVM probe not available ({problem or 'vgpuctl.host.kvm missing'}).",
              _no_kvm_fix(host) if not present else None)
        return
    c.see(host.root.dev_kvm, "present" if report.device_present else "absent")
    if host.exists(host.root.sys_module("kvm_pvm")):
        c.see(host.root.sys_module("kvm_pvm"), "present: /dev/kvm is KVM-PVM")
    if not report.device_present:
        c.set("fail", f"No /dev/kvm: KVM is not loaded ({module}). GVT-g needs KVM. {report.detail}".strip(),
              _no_kvm_fix(host))
        return
    c.see("open(/dev/kvm, O_RDWR)", {True: "ok", False: "refused", None: "not tried"}[report.device_opens])
    if report.device_opens is False:
        c.set("fail", f"{host.root.dev_kvm} exists but cannot be opened by this user. {report.detail}".strip(),
              "usermod -aG kvm $USER  # then log in again (or run as root)")
        return
    c.see("ioctl(KVM_GET_API_VERSION)", report.api_version)
    if report.api_version is not None and report.api_version != KVM_API_VERSION:
        c.set("warn", f"{host.root.dev_kvm} answers API version {report.api_version}, not {KVM_API_VERSION}.")
        return
    c.set("ok", f"{host.root.dev_kvm} opens, KVM API version {report.api_version}.")


def check_cpu_virt(ctx: Context, c: Check) -> None:
    host = ctx.host
    flags = host.cpu_flags
    if not flags:
        c.see(host.root.proc_cpuinfo, "unreadable")
        c.set("warn", "Cannot read the CPU flags.")
        return
    found = sorted({"vmx", "svm"} & flags)
    nested = "hypervisor" in flags
    c.see(f"{host.root.proc_cpuinfo} model name", host.cpuinfo.get("model name", "?"))
    c.see(f"{host.root.proc_cpuinfo} flags", " ".join(found + (["hypervisor"] if nested else [])) or "no vmx, no svm")
    pvm = host.exists(host.root.sys_module("kvm_pvm"))
    if pvm:
        c.see(host.root.sys_module("kvm_pvm"), "present")
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
        kind = "KVM-PVM (kvm_pvm)" if host.exists(host.root.sys_module("kvm_pvm")) else (
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
    path = ctx.host.root.dev_vfio_container
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
                      "to a VM.", "Build the kernel with CONFIG_VFIO=m, CONFIG_VFIO_IOMMU_TYPE1=m, CONFIG_VFIO_PCI=m"
                                    + (" and CONFIG_VFIO_GROUP=y" if host.at_least(6, 6) else "")
                                    + ", install it and reboot.")
    else:
        c.set("fail", f"No {path}: the vfio module is not loaded.", "modprobe -a vfio vfio_iommu_type1")


def _cap_ipc_lock() -> bool | None:
    """Whether this process holds CAP_IPC_LOCK (its own status, not the host's: not under the root)."""
    try:
        with open(THIS_PROCESS_STATUS) as f:
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
    c.see(f"{THIS_PROCESS_STATUS} CapEff", f"CAP_IPC_LOCK {'yes' if capable else 'no' if capable is False else '?'}")
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
    render = [n for n in ctx.host.listdir(ctx.host.root.dev_dri) or [] if n.startswith("renderD")]
    c.see(ctx.host.root.dev_dri, ", ".join(render) or "no render node")
    if gl and not render:
        c.set("warn", f"This QEMU has OpenGL displays ({', '.join(gl)}), but the host has no DRM render node "
                      "(/dev/dri/renderD*): they cannot start ('egl: no drm render node available'), so vfio-pci "
                      "display=on cannot show the vGPU.",
              "modprobe i915  # the iGPU's driver creates /dev/dri/renderD128")
    elif gl:
        remote = " VNC too (with egl-headless it shows the vGPU remotely)." if report.vnc else ""
        c.set("ok", f"Displays that can show a vGPU's dma-buf screen (OpenGL): {', '.join(gl)}, on "
                    f"{ctx.host.root.dev_dri}/{render[0]}.{remote}")
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


# The checks every host needs, after the vGPU backends' own (vgpuctl.backends.doctor puts them together).
HOST_CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("ignore-msrs", "kvm.ignore_msrs=1 (Windows guests)", check_ignore_msrs),
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
    checks: Sequence[CheckSpec],
    run_guest: bool = True,
    qemu: str | None = None,
    kvm_probe: Callable[[HostRoot, str | None, bool], Any] | None = None,
    qemu_probe: Callable[[str | None], Any] | None = None,
) -> Report:
    """Every check of ``checks``, in order. ``kvm_probe``/``qemu_probe`` replace the real probes (tests)."""
    host = Host(root)
    ctx = Context(host=host, run_guest=run_guest)
    ctx.qemu_binary = _find_qemu(qemu)
    qemu_probe = qemu_probe or _default_qemu_probe
    ctx.qemu = _Background(lambda: qemu_probe(qemu))  # each probe makes the same choice from ``qemu``
    if not ctx.simulated:
        kvm_probe = kvm_probe or _default_kvm_probe
        ctx.kvm = _Background(lambda: kvm_probe(root, qemu, run_guest))
    for spec in checks:
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
    return Report(list(ctx.checks.values()), str(root.root), host.release, ctx.simulated, ctx.kinds)
