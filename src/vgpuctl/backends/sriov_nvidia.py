"""NVIDIA vGPUs on the vendor-specific VFIO framework (Ada and later: L40S, H200; sriov.md 3): a vGPU is a VF
of the GPU, left on the ``nvidia`` driver (never rebound to vfio-pci, 3.4), whose type is set per VF just before
a VM starts (``nvidia/current_vgpu_type``) and released after it ends.

A VM asks for one with ``vgpu.vf`` (a VF, or the PF: a free VF that can take the type) and ``vgpu.type`` (the
numeric type id of ``creatable_vgpu_types``); its type is ``nvidia-vfio:<id>``. VFs are enabled with NVIDIA's
``sriov-manage -e`` (vgpuctl never writes their ``sriov_numvfs``).
"""

from __future__ import annotations

import errno as errnos
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vgpuctl.backends import NVIDIA_VENDOR_ID, Attachment, BackendDefaults, pci_attachment
from vgpuctl.backends.vfs import VfChoice
from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import CapacityError, Conflict, InvalidInput, KernelError, NotFound, NotOwned
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot, pci
from vgpuctl.mdev.state import Journal

if TYPE_CHECKING:
    from vgpuctl.host.doctor import CheckSpec
    from vgpuctl.host.setup import SetupWants
    from vgpuctl.mdev.sysfs import MdevType

RELEASE_ATTEMPTS = 10  # Proxmox's cleanup_pci_devices: up to 10 tries, one second apart
RELEASE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class VgpuType:
    id: int
    name: str  # e.g. "NVIDIA L40S-8Q"


def nvidia_pfs(root: HostRoot) -> list[pci.SriovPf]:
    """Every NVIDIA PCI function with the SR-IOV capability (a GPU of the vendor-specific VFIO framework, whatever
    its driver now; sriov.md 3.1: what NVIDIA's own tools look for)."""
    found = []
    for address in sorted(pci.sriov_pfs(root)):
        if pci.read_function(root, address).vendor == NVIDIA_VENDOR_ID:
            found.append(pci.read_pf(root, address))
    return found


def _nvidia_dir(root: HostRoot, vf: str) -> str:
    return f"{root.pci_device(pci.check_address(vf))}/nvidia"


def is_vendor_vf(root: HostRoot, vf: str) -> bool:
    """A VF of NVIDIA's vendor-specific VFIO: it has ``nvidia/current_vgpu_type`` (sriov.md 8)."""
    return root.exists(f"{_nvidia_dir(root, vf)}/current_vgpu_type")


def parse_creatable(text: str) -> list[VgpuType]:
    """``creatable_vgpu_types``: a header ("ID : vGPU Name"), then ``<id> : <name>`` lines (padding varies; a
    minority prints name then id: both are taken); non-numeric ids are skipped."""
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(":")
        if not sep:
            continue
        left, right = left.strip(), right.strip()
        if left.isdigit():
            found.append(VgpuType(int(left), right))
        elif right.isdigit():
            found.append(VgpuType(int(right), left))
    return found


def creatable_types(root: HostRoot, vf: str) -> list[VgpuType]:
    """The types this VF can take now (capacity-dependent: siblings' choices shrink it)."""
    try:
        return parse_creatable(root.read_text(f"{_nvidia_dir(root, vf)}/creatable_vgpu_types"))
    except FileNotFoundError:
        raise NotFound("{path} is not a VF of NVIDIA's vendor-specific VFIO (no nvidia/creatable_vgpu_types): "
                       "enable VFs with 'sriov-manage -e ALL'", what="VF", path=vf) from None


def current_type(root: HostRoot, vf: str) -> int:
    """The VF's vGPU type id, 0 for none."""
    return int(root.read_value(f"{_nvidia_dir(root, vf)}/current_vgpu_type").strip() or 0)


def _write(root: HostRoot, vf: str, value: int) -> None:
    path = f"{_nvidia_dir(root, vf)}/current_vgpu_type"
    try:
        root.write_text(path, f"{value}\n")
    except OSError as e:
        raise KernelError("{path}: the nvidia driver refused {value}: {strerror}", what="VF", path=path,
                          value=value, errno=e.errno) from e


def assign(root: HostRoot, vf: str, type_id: int) -> None:
    """Give the VF the vGPU type ``type_id`` (sriov.md 3.4: a free VF, write the id, read it back)."""
    now = current_type(root, vf)
    if now == type_id:
        return
    if now != 0:
        raise Conflict("VF {path} already holds vGPU type {now}: release it first", what="VF", path=vf, now=now)
    creatable = creatable_types(root, vf)
    if type_id not in {t.id for t in creatable}:
        offered = ", ".join(f"{t.id} ({t.name})" for t in creatable) or "none: the GPU is full"
        raise CapacityError("VF {path} cannot take vGPU type {type_id} now; creatable: {offered}", what="VF",
                            path=vf, type_id=str(type_id), offered=offered)
    try:
        _write(root, vf, type_id)
    except KernelError as e:
        if e.errno == errnos.EINVAL:  # taken by a sibling in between
            raise CapacityError("VF {path} cannot take vGPU type {type_id}: the driver refused it (EINVAL; "
                                "another VF's type changed what fits)", what="VF", path=vf,
                                type_id=str(type_id)) from e
        raise
    if current_type(root, vf) != type_id:
        raise KernelError("VF {path}: wrote vGPU type {type_id}, read back {back}", what="VF", path=vf,
                          type_id=str(type_id), back=current_type(root, vf), errno=errnos.EIO)


def release(root: HostRoot, vf: str, *, attempts: int = RELEASE_ATTEMPTS, interval_s: float = RELEASE_INTERVAL_S,
            sleep: Callable[[float], None] = time.sleep) -> bool:
    """Write 0 to the VF's type; EPERM while QEMU has it open or just after it closed it is retried
    (sriov.md 3.4). True once the VF reads 0; a KernelError(EPERM) after the last attempt."""
    for attempt in range(attempts):
        if current_type(root, vf) == 0:
            return True
        try:
            _write(root, vf, 0)
        except KernelError as e:
            if e.errno != errnos.EPERM:
                raise
            if attempt == attempts - 1:
                raise KernelError("VF {path} still in use after {attempts} attempts {interval_s:g} s apart (EPERM): "
                                  "is its VM's QEMU still running?", what="VF", path=vf, attempts=attempts,
                                  interval_s=interval_s, errno=errnos.EPERM) from e
            sleep(interval_s)
    return current_type(root, vf) == 0


# ---------------------------------------------------------------------- what a PF's VFs offer (read only)

# A profile name ends in its framebuffer in GB and its series letter: "NVIDIA L40S-8Q" (8 GB, Q), MIG-backed
# "NVIDIA H200X-1-18C" (1 slice, 18 GB, C) (sriov.md 3.3). GB count 1024 MiB each: NVIDIA's tables give 2Q as
# 2048 MB.
_PROFILE = re.compile(r"-(\d+)([A-Z])$")
# The largest virtual display per series, from NVIDIA's vGPU user guide ("Virtual GPU Types"), not from
# sriov.md [U]: Q (workstation) 7680x4320, B (virtual PC) 5120x2880, A (virtual apps) 1280x1024; C (compute)
# has no display.
SERIES_RESOLUTION = {"Q": (7680, 4320), "B": (5120, 2880), "A": (1280, 1024)}


def framebuffer_mib(name: str) -> int | None:
    """The framebuffer of a type, from its name (None when the name does not say)."""
    match = _PROFILE.search(name.strip())
    return int(match[1]) * 1024 if match else None


def max_resolution(name: str) -> tuple[int, int] | None:
    """The largest display of a type, from its series letter (None: a compute type, or a name that does not say)."""
    match = _PROFILE.search(name.strip())
    return SERIES_RESOLUTION.get(match[2]) if match else None


@dataclass(frozen=True)
class VfView:
    """One VF of an NVIDIA vendor-VFIO PF as its ``nvidia/`` files show it now."""

    address: str
    driver: str | None
    current: int  # the vGPU type id set on it, 0 for none
    creatable: list[VgpuType]  # what it can take now (empty once it has a type)


@dataclass(frozen=True)
class NvidiaPf:
    """An NVIDIA GPU with SR-IOV: its VFs and the types they can take (sriov.md 3.1: vendor 0x10de, a PF,
    driver nvidia)."""

    pf: pci.SriovPf
    vfs: list[VfView]
    problem: str | None  # why it has no vendor-VFIO VFs to give, None if it may

    @property
    def address(self) -> str:
        return self.pf.address

    def type_names(self) -> dict[int, str]:
        """Type id -> name, from every VF's list (a configured VF lists nothing: its name comes from a sibling of
        the same PF; ids are card-local, sriov.md 3.3)."""
        return {t.id: t.name for vf in self.vfs for t in vf.creatable}

    def free(self, held: Collection[str]) -> list[VfView]:
        """The VFs without a type that no VM holds (``held``: VF addresses VMs run on or have open)."""
        return [vf for vf in self.vfs if vf.current == 0 and vf.address not in held and vf.driver == "nvidia"]

    def takers(self, held: Collection[str]) -> dict[int, int]:
        """Type id -> how many free VFs could take it now (each VF's own list: siblings share the framebuffer)."""
        free = self.free(held)
        return {type_id: sum(1 for vf in free if type_id in {t.id for t in vf.creatable}) for type_id in
                sorted(self.type_names())}


def _view(root: HostRoot, vf: pci.PciFunction) -> VfView:
    if not is_vendor_vf(root, vf.address):
        return VfView(vf.address, vf.driver, 0, [])
    try:
        creatable = creatable_types(root, vf.address)
        current = current_type(root, vf.address)
    except (OSError, NotFound, ValueError):
        return VfView(vf.address, vf.driver, 0, [])
    return VfView(vf.address, vf.driver, current, creatable)


def pf_problem(pf: pci.SriovPf) -> str | None:
    driver = pf.function.driver
    if driver != "nvidia":
        return (f"the PF is bound to {driver}, not nvidia (NVIDIA's vGPU host driver, 17.0 or later)" if driver
                else "no driver is bound to the PF: load nvidia (NVIDIA's vGPU host driver)")
    if not pf.vfs:
        return f"no VFs enabled: run '/usr/lib/nvidia/sriov-manage -e {pf.address}' (or -e ALL)"
    return None


def nvidia_views(root: HostRoot) -> list[NvidiaPf]:
    """:func:`nvidia_pfs` with each VF's type and what it can take now."""
    return [NvidiaPf(pf, [_view(root, vf) for vf in pf.vfs], pf_problem(pf)) for pf in nvidia_pfs(root)]


def offered_types(root: HostRoot, held: Collection[str]) -> list[MdevType]:
    """What each PF's VFs offer now, one row per PF and type: the VFs free to take it as available_instances
    (siblings share the card's framebuffer: fewer may fit at once, sriov.md 3.3), the framebuffer and largest
    display from the type's name, in the k=v form of NVIDIA's mdev descriptions."""
    from vgpuctl.mdev.sysfs import MdevType

    rows = []
    for pf in nvidia_views(root):
        names = pf.type_names()
        for type_id, takers in pf.takers(set(held) | set(pci.vf_openers(root, pf.pf.vfs))).items():
            name = names[type_id]
            facts = []
            if (framebuffer := framebuffer_mib(name)) is not None:
                facts.append(f"framebuffer={framebuffer}M")
            if (resolution := max_resolution(name)) is not None:
                facts.append(f"max_resolution={resolution[0]}x{resolution[1]}")
            facts.append(f"vfs_with_type={sum(1 for vf in pf.vfs if vf.current == type_id)}")
            rows.append(MdevType(pf.address, type_name(type_id), takers, "vfio-pci", name, ", ".join(facts)))
    return rows


TYPE_PREFIX = "nvidia-vfio:"  # a VM's vGPU type on such a VF: the prefix and the numeric type id


def type_name(type_id: int) -> str:
    return f"{TYPE_PREFIX}{type_id}"


def type_number(type_id: str) -> int:
    return int(type_id.removeprefix(TYPE_PREFIX))


class NvidiaVfio(BackendDefaults):
    name: str = "nvidia-vfio"
    guest_sleep: bool = False
    igd_opregion: bool = False
    without_kvm: str | None = None
    pci_function: bool = True
    no_display: str | None = None
    # None, not NVIDIA's: NVIDIA's mdev parents (time-sliced, before Ada) stay the generic mdev backend's.
    pci_vendor: int | None = None

    def attachment(self, address: str) -> Attachment:
        return pci_attachment(address)

    def claims_type(self, type_id: str) -> bool:
        return type_id.startswith(TYPE_PREFIX)

    def assign(self, root: HostRoot, address: str, type_id: str) -> None:
        assign(root, address, type_number(type_id))

    def release(self, root: HostRoot, address: str) -> None:
        release(root, address)

    def offered_types(self, root: HostRoot, held: Collection[str] = ()) -> list[MdevType]:
        return offered_types(root, held)

    def vm_vgpu_type(self, type_id: str) -> str | None:
        return str(type_number(type_id))

    def doctor_checks(self) -> tuple[CheckSpec, ...]:
        from vgpuctl.backends.sriov_nvidia_doctor import CHECKS

        return CHECKS

    def setup_wants(self, root: HostRoot) -> SetupWants | None:
        """The IOMMU on, for a host with an NVIDIA GPU with SR-IOV (its VFs are VFIO devices, each in an IOMMU
        group, 3.4); nothing else: nvidia loads by itself and its VFs stay on it. On an AMD host intel_iommu= is
        ignored (the AMD IOMMU is on by default)."""
        if not nvidia_pfs(root):
            return None
        from vgpuctl.host.setup import BootWants

        return BootWants("NVIDIA vGPU (vendor-specific VFIO)", ("intel_iommu=on",))


BACKEND = NvidiaVfio()


# ---------------------------------------------------------------------- VFs on and off: sriov-manage (3.2)

SRIOV_MANAGE_TIMEOUT_S = 120.0


def nvidia_pf(root: HostRoot, address: str) -> pci.SriovPf | None:
    """The PF at ``address`` if it is an NVIDIA SR-IOV GPU, else None (the caller tries Intel's)."""
    address = pci.check_address(address)
    if not root.exists(root.pci_device(address)) or not pci.is_sriov_pf(root, address):
        return None
    function = pci.read_function(root, address)
    return pci.read_pf(root, address) if function.vendor == NVIDIA_VENDOR_ID else None


def sriov_manage(root: HostRoot, flag: str, address: str, timeout_s: float = SRIOV_MANAGE_TIMEOUT_S) -> None:
    """``sriov-manage -e|-d BDF``, the one way NVIDIA allows VFs to be made (3.2: "Do NOT try to enable the virtual
    function for the GPU by any other means"). It lives on the host: on this machine's root, or a simulated host's
    stand-in inside the root (which finds its root from its own place)."""
    import subprocess

    program = root.nvidia_sriov_manage
    if not (root.is_this_machine or root.is_simulated):
        raise Conflict("{root} is not this machine's root: run sriov-manage on that host", what="program",
                       root=str(root.root), path=program)
    if not root.exists(program):
        raise NotFound("{path} is missing: install NVIDIA's vGPU host driver (it ships sriov-manage)",
                       what="program", path=program)
    argv = [str(root.path(program)), flag, address]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise KernelError("{path} {flag} {parent} did not finish in {timeout_s:g} s", what="PF", path=program,
                          flag=flag, parent=address, timeout_s=timeout_s, errno=errnos.ETIMEDOUT) from None
    except OSError as e:
        raise KernelError("cannot run {path}: {strerror}", what="program", path=program, errno=e.errno) from e
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        last = said[-1] if said else f"exit status {done.returncode}"
        if "unbindlock" in last.lower():
            why = ("another client holds the GPU (DCGM, nvidia-persistenced, a monitoring agent, or a VM on one of "
                   "its VFs): stop it (e.g. systemctl stop nvidia-dcgm) and try again")
        else:
            why = last
        raise KernelError("sriov-manage {flag} {parent} failed: {why}", what="PF", parent=address, flag=flag,
                          why=why, said=last, errno=errnos.EBUSY if "unbindlock" in last.lower() else errnos.EIO,
                          path=program)


def enable(root: HostRoot, state: StateDir, address: str, *, force: bool = False) -> pci.SriovPf:
    """Every VF of the PF on (``sriov-manage -e``: it enables all, 3.2), recorded as vgpuctl's and persisted."""
    from vgpuctl.backends import sriov_intel, vf_definitions

    sriov_intel.settle(root, state)
    pf = require_pf(root, address)
    journal = Journal(state)
    owned = journal.ownership().vfs.get(pf.address)
    if pf.num_vfs and owned is None and not force:
        raise NotOwned("the VFs of {parent} were not enabled by vgpuctl (another tool or a boot unit such as "
                       "pve-nvidia-sriov@ did it); leave them alone, or add --force to take them over", what="PF",
                       parent=pf.address)
    wanted = vf_definitions.VfDefinition(pf.address, "nvidia", pf.total_vfs, None)
    record = {"count": pf.total_vfs, "driver": "nvidia", "vfio_driver": None,
              "boot": vf_definitions.this_boot(root)}
    with vf_definitions.changing(state, wanted), journal.claiming(sriov_intel.KIND, pf.address, record):
        if not pf.num_vfs:
            sriov_manage(root, "-e", pf.address)
            crashpoint("vfs-enable:enabled")
    return require_pf(root, pf.address)


def disable(root: HostRoot, state: StateDir, address: str, *, force: bool = False,
            holders: dict[str, str] | None = None) -> pci.SriovPf:
    """Every VF off (``sriov-manage -d``, which clears their types first): refused while a VF holds a vGPU type or
    a VM, or when vgpuctl did not enable them, unless force."""
    from vgpuctl.backends import sriov_intel, vf_definitions

    sriov_intel.settle(root, state)
    pf = require_pf(root, address)
    journal = Journal(state)
    if not pf.num_vfs:
        journal.forget(sriov_intel.KIND, pf.address)
        vf_definitions.save(state, vf_definitions.VfDefinition(pf.address, "nvidia"))
        return pf
    if not force and journal.ownership().vfs.get(pf.address) is None:
        raise NotOwned("the VFs of {parent} were not enabled by vgpuctl; leave them alone, or add --force if you "
                       "are sure", what="PF", parent=pf.address)
    vms = holders or {}
    held = {vf.address: f"VM {vms[vf.address]}" for vf in pf.vfs if vf.address in vms}
    for vf in pf.vfs:
        if vf.address not in held and is_vendor_vf(root, vf.address) and current_type(root, vf.address):
            held[vf.address] = f"vGPU type {current_type(root, vf.address)}"
    if held and not force:
        raise Conflict("VFs of {parent} are in use ({users}): stop those VMs first", what="PF", parent=pf.address,
                       users=", ".join(f"{vf} by {who}" for vf, who in sorted(held.items())))
    with vf_definitions.changing(state, vf_definitions.VfDefinition(pf.address, "nvidia")), \
            journal.releasing(sriov_intel.KIND, pf.address):
        crashpoint("vfs-disable:releasing")
        sriov_manage(root, "-d", pf.address)
    return require_pf(root, pf.address)


def require_pf(root: HostRoot, address: str) -> pci.SriovPf:
    found = nvidia_pf(root, address)
    if found is None:
        raise NotFound("{parent} is not an NVIDIA GPU with SR-IOV (vgpuctl vfs list shows them)", what="PF",
                       parent=address)
    return found


def choose_vf(root: HostRoot, function: pci.PciFunction, taken: Collection[str], type_id: str | None) -> VfChoice:
    """For a VM: the NVIDIA VF ``function`` is, or the first of its PF's that is free and can take the type."""
    if type_id is None or not type_id.isdigit():
        raise InvalidInput(f"an NVIDIA VF needs vgpu.type, the numeric id of a type its nvidia/creatable_vgpu_types "
                           f"lists (got {type_id!r})")
    wanted = int(type_id)
    name = type_name(wanted)
    if function.physfn:
        vfs, pf = [function], function.physfn
    else:
        vfs, pf = pci.read_pf(root, function.address).vfs, function.address
    for vf in vfs:
        if vf.address in taken or not is_vendor_vf(root, vf.address):
            continue
        current = current_type(root, vf.address)
        if current == wanted:
            return VfChoice(vf.address, pf, name, "active", f"VF {vf.address} already has type {wanted}")
        if current == 0 and wanted in {t.id for t in creatable_types(root, vf.address)}:
            return VfChoice(vf.address, pf, name, "new", f"VF {vf.address} can take type {wanted}")
    raise CapacityError(f"no VF of {pf} is free and can take vGPU type {wanted} now (sriov-manage -e enables "
                        "them; each VF's nvidia/creatable_vgpu_types says what fits)")
