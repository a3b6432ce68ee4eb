"""A VM at run time, seen without starting anything: its files, whether it runs, which vGPU it would get.

Per VM, ``<state-dir>/vms/<name>.toml`` is the spec and ``<state-dir>/vms/<name>/`` holds what
QEMU uses and leaves: the QMP socket, the pidfile (written by QEMU's ``-pidfile``), its log, the
serial console log, the VNC/SPICE sockets and, with OVMF, the VM's own copy of the UEFI variables.
Unix socket paths are limited to 107 bytes; with the default state dir and a 63-character name
they stay below it (:meth:`RuntimePaths.socket_problems` says when a custom state dir does not).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from vgpuctl.base.errors import CapacityError, Conflict, NotFound
from vgpuctl.base.process import cmdline, pids, start_time
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot, facts
from vgpuctl.vm.spec import VmSpec, check_name, vms_dir

if TYPE_CHECKING:
    from vgpuctl.backends import VgpuBackend

SOCKET_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1
# Debian's OVMF (package ovmf): code read-only and shared, variables copied per VM at first start.
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE.fd"
OVMF_VARS_TEMPLATE = "/usr/share/OVMF/OVMF_VARS.fd"
# Secure Boot (Windows 11): the 4 MiB build with SMM and Microsoft's keys enrolled in its variables.
OVMF_SECURE_CODE = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"
OVMF_SECURE_VARS_TEMPLATE = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"


class RuntimePaths(NamedTuple):
    """The files of one VM's QEMU process, all in one directory."""

    directory: Path

    @classmethod
    def for_vm(cls, state: StateDir, name: str) -> RuntimePaths:
        # Absolute: QEMU's command line names its pidfile, and that is how any later command finds it.
        return cls(vms_dir(state).absolute() / check_name(name))

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def log(self) -> Path:
        """Where the lifecycle sends QEMU's stdout and stderr (not an argument of QEMU's)."""
        return self.directory / "qemu.log"

    @property
    def serial_log(self) -> Path:
        return self.directory / "serial.log"

    @property
    def serial_socket(self) -> Path:
        """The serial console's input and output (a unix socket QEMU listens on); its output is also serial_log."""
        return self.directory / "serial.sock"

    @property
    def agent_socket(self) -> Path:
        """The guest agent's channel (spec guest_agent): QEMU listens; a client sends it JSON commands."""
        return self.directory / "qga.sock"

    @property
    def vnc_socket(self) -> Path:
        return self.directory / "vnc.sock"

    @property
    def spice_socket(self) -> Path:
        return self.directory / "spice.sock"

    @property
    def nvram(self) -> Path:
        """The VM's UEFI variables (OVMF): a copy of OVMF_VARS_TEMPLATE the lifecycle makes at first start."""
        return self.directory / "OVMF_VARS.fd"

    @property
    def secure_nvram(self) -> Path:
        """The same with Secure Boot: a copy of OVMF_SECURE_VARS_TEMPLATE (another size: never the other's file)."""
        return self.directory / "OVMF_VARS_4M.ms.fd"

    @property
    def swtpm_socket(self) -> Path:
        """The TPM emulator's control socket (swtpm listens, QEMU connects)."""
        return self.directory / "swtpm.sock"

    @property
    def tpm_state(self) -> Path:
        """The TPM's state (swtpm's --tpmstate dir): the guest's keys, kept from start to start."""
        return self.directory / "tpm"

    @property
    def swtpm_pidfile(self) -> Path:
        """swtpm's --pid file: also how any later command finds the VM's swtpm in /proc (its command line)."""
        return self.directory / "swtpm.pid"

    @property
    def swtpm_log(self) -> Path:
        return self.directory / "swtpm.log"

    def socket_problems(self) -> list[str]:
        return [f"socket path {p} is longer than {SOCKET_PATH_MAX} bytes: use a shorter --state-dir or VM name"
                for p in (self.qmp_socket, self.serial_socket, self.vnc_socket, self.spice_socket,
                          self.swtpm_socket)
                if len(os.fsencode(p)) > SOCKET_PATH_MAX]

    def to_json(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in ("directory", "qmp_socket", "pidfile", "log", "serial_log",
                                                     "serial_socket", "agent_socket", "vnc_socket",
                                                     "spice_socket", "nvram", "swtpm_socket")}


def read_pid(paths: RuntimePaths) -> int | None:
    try:
        text = paths.pidfile.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


# ---------------------------------------------------------------------- the VM's processes, found in /proc


class Process(NamedTuple):
    """One process for good: its pid and start time (/proc/PID/stat field 22, clock ticks since boot),
    so a pid the kernel has since given to another process is never taken for it."""

    pid: int
    start_time: int

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: Any) -> Process | None:
        try:
            return cls(int(data["pid"]), int(data["start_time"]))
        except (TypeError, KeyError, ValueError):
            return None

    def alive(self) -> bool:
        return start_time(self.pid) == self.start_time


def process(pid: int | None) -> Process | None:
    found = start_time(pid) if pid is not None else None
    return Process(pid, found) if pid is not None and found is not None else None


@dataclass
class VmProcesses:
    """What runs for one VM: its QEMU, and the shell a start runs it under (there while QEMU starts,
    runs and just after it ends); a shell forked and not yet QEMU counts as a shell."""

    qemu: Process | None = None
    shells: list[Process] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return self.qemu is not None or bool(self.shells)


def _role(argv: list[bytes], name: str, pidfile: bytes) -> str | None:
    """'qemu' or 'shell' if ``argv`` is the VM's QEMU (or its wrapper shell), else None. QEMU's
    ``-name guest=NAME,...`` with ``-pidfile`` in this VM's runtime directory names one VM of one state
    dir: nothing else has both (the shell has them because QEMU's argv follows its script)."""
    guest = f"guest={name},".encode()
    pairs = set(pairwise(argv))
    if (b"-pidfile", pidfile) not in pairs or not any(a == b"-name" and b.startswith(guest) for a, b in pairs):
        return None
    return "shell" if argv[:2] == [b"/bin/sh", b"-c"] and b"VGPUCTL_EXIT" in argv[2] else "qemu"


def vm_processes(state: StateDir, name: str, known: list[int | None] | None = None) -> VmProcesses:
    """The VM's QEMU and wrapper shell as they run now, whatever the state files say. The pids in
    ``known`` (a run record's) and the pidfile's are looked at first; only if none is the VM's QEMU is
    all of /proc read (~4 ms): a start killed before it wrote anything still leaves a QEMU found here."""
    paths = RuntimePaths.for_vm(state, name)
    pidfile = os.fsencode(paths.pidfile)
    for pid in [*(known or []), read_pid(paths)]:
        found = process(pid)
        if found is not None and _role(cmdline(found.pid), name, pidfile) == "qemu":
            return VmProcesses(qemu=found)
    return all_vm_processes(state).get(name, VmProcesses())


def all_vm_processes(state: StateDir) -> dict[str, VmProcesses]:
    """VM name -> its QEMU and shell, for every VM of this state dir with one running: one pass over /proc."""
    prefix = os.fsencode(vms_dir(state).absolute()) + b"/"
    found: dict[str, VmProcesses] = {}
    for pid in pids():
        argv = cmdline(pid)
        for option, value in pairwise(argv):
            if option == b"-pidfile" and value.startswith(prefix) and value.endswith(b"/qemu.pid"):
                name = os.fsdecode(value[len(prefix):-len(b"/qemu.pid")])
                role = _role(argv, name, value)
                alive = process(pid) if role else None
                if alive is not None:
                    mine = found.setdefault(name, VmProcesses())
                    if role == "qemu":
                        mine.qemu = alive
                    else:
                        mine.shells.append(alive)
                break
    return found


def swtpm_processes(state: StateDir, name: str) -> list[Process]:
    """The VM's swtpm processes as they run now: those whose command line has ``--pid file=<the VM's
    swtpm pidfile>`` (one pass over /proc). Found whatever the state files say, as QEMU is."""
    wanted = b"file=" + os.fsencode(RuntimePaths.for_vm(state, name).swtpm_pidfile)
    found = []
    for pid in pids():
        argv = cmdline(pid)
        if argv and os.path.basename(argv[0]) == b"swtpm" and (b"--pid", wanted) in set(pairwise(argv)):
            alive = process(pid)
            if alive is not None:
                found.append(alive)
    return found


def running_vms(state: StateDir) -> set[str]:
    """The VMs of this state dir whose QEMU runs now (one pass over /proc, for listings)."""
    return {name for name, found in all_vm_processes(state).items() if found.qemu is not None}


def is_running(state: StateDir, name: str) -> bool:
    """True while the VM's QEMU runs (found by its command line, see :func:`vm_processes`)."""
    return vm_processes(state, name).qemu is not None


# ---------------------------------------------------------------------- the vGPU a VM would get


class ResolvedVgpu(NamedTuple):
    """The concrete vGPU for a VM: existing (active or defined) or to be created by the lifecycle."""

    uuid: str
    parent: str
    type_id: str
    resolution: tuple[int, int] | None
    state: str  # "active" (exists now), "defined" (an mdevctl definition, not started), "new" (to create)
    reason: str = ""

    @property
    def backend(self) -> VgpuBackend:
        """What this kind of vGPU needs of a VM (its backend's rules)."""
        from vgpuctl.backends import backend_for_type

        return backend_for_type(self.type_id)

    def describe(self) -> str:
        """E.g. "vGPU <uuid> (i915-GVTg_V5_4 on 0000:00:02.0)", "SR-IOV VF 0000:00:02.1 of 0000:00:02.0"."""
        if self.backend.pci_function:
            return f"SR-IOV VF {self.uuid} of {self.parent}"
        return f"vGPU {self.uuid} ({self.type_id} on {self.parent})"

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "parent": self.parent, "type": self.type_id,
                "resolution": "x".join(map(str, self.resolution)) if self.resolution else None,
                "state": self.state, "reason": self.reason}


def vm_vgpu_uuid(name: str) -> str:
    """The UUID of the vGPU vgpuctl creates for VM ``name``: stable, so a restarted VM (or one whose QEMU
    died) finds its vGPU again, and the command line does not change from start to start."""
    import uuid

    # uuid.uuid5, computed as it does (RFC 4122 name-based, SHA-1), but with CPython's built-in SHA-1:
    # uuid5 takes hashlib's, and loading OpenSSL for it costs ~3 ms of every `vgpuctl vm start`.
    try:
        from _sha1 import sha1  # type: ignore[import-not-found]  # (no stub: a private module)
    except ImportError:  # another Python implementation
        from hashlib import sha1
    digest = sha1(uuid.NAMESPACE_URL.bytes + f"vgpuctl:vm:{check_name(name)}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


# The VFs other VMs run on now, or how to find them: asked for only when a VF may be chosen (finding them can
# take a pass over /proc, which an mdev VM's start does not pay).
Taken = Collection[str] | Callable[[], Collection[str]]


def _taken(taken: Taken) -> Collection[str]:
    return taken() if callable(taken) else taken


def resolve_vgpu(root: HostRoot, spec: VmSpec, taken: Taken = ()) -> ResolvedVgpu | None:
    """Which vGPU the VM gets, read-only: nothing is created, reserved or started here. ``taken``: the vGPUs
    (VF addresses) other VMs run on now, which a VF chosen from a PF must not be."""
    from vgpuctl.mdev import definitions
    from vgpuctl.mdev.choose import choose, mismatch
    from vgpuctl.mdev.sysfs import active_device, parent_names, read_type, read_types

    request = spec.vgpu
    kind = request.kind
    if kind == "none":
        return None
    if kind == "vf":
        assert request.vf
        return resolve_vf(root, request.vf, _taken(taken), request.type)

    def type_of(parent: str, type_id: str) -> tuple[int, int] | None:
        found = next((t for t in read_types(root, parent) if t.type_id == type_id), None)
        return found.resolution if found else None

    if kind == "uuid":
        assert request.uuid
        device = active_device(root, request.uuid)
        if device and request.parent in (None, device.parent):
            return ResolvedVgpu(device.uuid, device.parent, device.type_id, type_of(device.parent, device.type_id),
                                "active", "exists")
        found = definitions.find(root, request.uuid, request.parent)
        if len(found) > 1:
            raise Conflict(f"vGPU {request.uuid} is defined on several parents "
                           f"({', '.join(d.parent for d in found)}); set vgpu.parent")
        if not found:
            where = f" on {request.parent}" if request.parent else ""
            raise NotFound(f"vGPU {request.uuid}{where} neither exists nor is defined; 'vgpuctl list' shows vGPUs")
        d = found[0]
        return ResolvedVgpu(d.uuid, d.parent, d.mdev_type, type_of(d.parent, d.mdev_type), "defined",
                            "defined, not active: started when the VM starts")

    uuid = vm_vgpu_uuid(spec.name)
    requirements = request.requirements()

    # The VM's own vGPU may still exist (a QEMU that died, a VM stopped, the usual restart): reuse it.
    # Only its own type is read then: a restart stays cheap however many types the host has.
    existing = active_device(root, uuid)
    if existing and request.parent in (None, existing.parent):
        mine = read_type(root, existing.parent, existing.type_id)
        fits = request.type == mine.type_id if kind == "type" else mismatch(mine, requirements) is None
        if fits:
            return ResolvedVgpu(uuid, existing.parent, existing.type_id, mine.resolution, "active",
                                "the VM's vGPU from an earlier start still exists")

    offered = _offered_types(root, spec, taken) if kind == "requirements" and not request.largest else []
    pfs = {t.parent for t in offered}
    names = parent_names(root)
    if request.parent and request.parent not in names and request.parent not in pfs:
        raise NotFound(f"no parent device {request.parent!r}; 'vgpuctl gpus' lists them")
    parents = [request.parent] if request.parent else names
    types = [t for p in parents if p in names for t in read_types(root, p)]
    types += [t for t in offered if request.parent in (None, t.parent)]

    if kind == "type":
        matching = [t for t in types if t.type_id == request.type]
        if not matching:
            where = request.parent or "any parent"
            raise NotFound(f"{where} has no vGPU type {request.type!r}; 'vgpuctl types' lists them")
        free = [t for t in matching if t.available_instances > 0]
        if not free:
            raise CapacityError(f"no room for {request.type} ({', '.join(t.parent for t in matching)}); "
                                "remove a vGPU or stop a VM")
        best = max(free, key=lambda t: t.available_instances)
        return ResolvedVgpu(uuid, best.parent, best.type_id, best.resolution, "new",
                            f"type {best.type_id} asked for; {best.available_instances} can be created on "
                            f"{best.parent} now")

    if request.largest:
        suitable = [t for t in types if mismatch(t, requirements) is None]
        free = [t for t in suitable if t.available_instances > 0]
        if not free:
            if suitable:
                raise CapacityError(f"every type that gives {requirements.describe()} is full; remove a vGPU")
            raise NotFound(f"no vGPU type on this host gives {requirements.describe()} "
                           "(no mdev types at all? see 'vgpuctl doctor')")

        def size(t: Any) -> tuple[int, int, int]:
            weight = t.fields.get("weight")
            return (t.memory_mib or 0, weight if isinstance(weight, int) else 0, t.available_instances)

        best = max(free, key=size)
        memory = f"{best.memory_mib} MiB graphics memory" if best.memory_mib else "the most resources"
        return ResolvedVgpu(uuid, best.parent, best.type_id, best.resolution, "new",
                            f"the largest type that fits now ({memory})")

    choice = choose(types, requirements)
    if choice.chosen.parent in pfs:  # an SR-IOV VF: a free one of that PF (NVIDIA: that can take the type)
        from vgpuctl.backends import backend_for_type

        vm_type = backend_for_type(choice.chosen.type_id).vm_vgpu_type(choice.chosen.type_id)
        vf = resolve_vf(root, choice.chosen.parent, _taken(taken), vm_type)
        return vf._replace(reason=f"{choice.reason}; {vf.reason}")
    return ResolvedVgpu(uuid, choice.chosen.parent, choice.chosen.type_id, choice.chosen.resolution, "new",
                        choice.reason)


def _offered_types(root: HostRoot, spec: VmSpec, taken: Taken) -> list[Any]:
    """What the host's SR-IOV PFs' VFs offer the chooser; with ``vgpu_display`` only those with a display of their
    own."""
    from vgpuctl.backends import offered_types
    from vgpuctl.host import pci
    from vgpuctl.mdev.choose import emulated_display

    if not pci.sriov_pfs(root):  # an mdev host: the other VMs' VFs are not looked for
        return []
    return [t for t in offered_types(root, _taken(taken)) if not (spec.vgpu_display and emulated_display(t))]


def resolve_vf(root: HostRoot, address: str, taken: Collection[str] = (), type_id: str | None = None) -> ResolvedVgpu:
    """The SR-IOV VF ``address`` names: that VF, or a free VF (on its VFIO driver, not taken) of that PF."""
    from vgpuctl.backends.vfs import choose_vf  # SR-IOV VMs only

    vf = choose_vf(root, address, taken, type_id)
    return ResolvedVgpu(vf.vf, vf.pf, vf.type_id, None, vf.state, vf.reason)


# ---------------------------------------------------------------------- host requirements


class RequirementStatus(NamedTuple):
    """A host setting the VM needs (e.g. kvm.ignore_msrs=1 for Windows guests), as found on the host."""

    requirement: str  # "kvm.ignore_msrs=1"
    met: bool | None  # None: cannot be read (module not loaded, no permission)
    actual: str | None
    where: str

    def describe(self) -> str:
        if self.met:
            return f"{self.requirement}: met"
        if self.met is None:
            return f"{self.requirement}: cannot tell ({self.where} unreadable or missing)"
        return (f"{self.requirement}: NOT met ({self.where} is {self.actual}); set it with "
                f"'echo {self.requirement.split('=', 1)[1]} > {self.where}' or the kernel command line "
                f"{self.requirement}")


def check_requirements(root: HostRoot, spec: VmSpec) -> list[RequirementStatus]:
    """Each of spec.requires as the host has it now (module parameters under /sys/module)."""
    statuses = []
    for requirement in spec.requires:
        setting, _, wanted = requirement.partition("=")
        module, _, parameter = setting.partition(".")
        where = root.module_parameter(module, parameter)
        try:
            actual: str | None = root.read_value(where).strip()
        except OSError:
            actual = None
        if actual is None:
            met = None
        else:
            as_bool = facts.kstrtobool(actual)  # bool parameters read back as Y/N
            met = actual.lower() == wanted.lower() or (as_bool is not None and as_bool == facts.kstrtobool(wanted))
        statuses.append(RequirementStatus(requirement, met, actual, where))
    return statuses


def guest_warnings(root: HostRoot, spec: VmSpec, accel: str) -> list[str]:
    """What this host lacks for the VM's guest OS, as warnings (the start goes ahead)."""
    if spec.os is None or accel != "kvm":
        return []
    # Windows reads MSRs that KVM does not emulate; KVM injects a #GP and Windows stops (a blue screen).
    where = root.module_parameter("kvm", "ignore_msrs")
    try:
        ignored = facts.kstrtobool(root.read_value(where).strip())  # a bool parameter reads back Y or N
    except OSError:
        return []
    if ignored is not False:
        return []
    return [f"{spec.os} under KVM needs kvm.ignore_msrs=1 ({where} is N: the guest may crash reading an MSR); "
            "'vgpuctl setup' sets it, or add kvm.ignore_msrs=1 to the kernel command line "
            f"(now: echo 1 > {where})"]
