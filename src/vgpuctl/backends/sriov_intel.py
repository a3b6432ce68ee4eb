"""Intel SR-IOV vGPUs: the virtual functions (VFs) of an Intel GPU whose driver makes them (i915-sriov-dkms
on Alder Lake / Raptor Lake / N100 iGPUs, xe on Battlemage and later; sriov.md 2).

A VF is a whole PCI function given to one VM by vfio-pci (``-device vfio-pci,host=BDF``): no mdev type, no
UUID. The "type" is chosen per physical function (PF) by how many VFs are enabled (each gets a fair share),
so VFs are made by ``vgpuctl vfs enable PF N`` (sriov.md 2.6: autoprobe off, write N, bind each VF by
``driver_override``, autoprobe back) and recorded as vgpuctl's in the state directory's ownership journal
(:class:`vgpuctl.mdev.state.Journal`, kind "vfs"). What an errno from ``sriov_numvfs`` means depends on the
PF's driver (sriov.md 2.3): :func:`explain` says it in words.
"""

from __future__ import annotations

import contextlib
import errno as errnos
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vgpuctl.backends import INTEL_VENDOR_ID, Attachment, BackendDefaults, pci_attachment, vf_definitions
from vgpuctl.backends.vf_definitions import VfDefinition, this_boot
from vgpuctl.backends.vfs import VfChoice
from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import CapacityError, Conflict, InvalidInput, KernelError, NotFound, NotOwned
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot, pci
from vgpuctl.mdev.state import Journal, Kind

if TYPE_CHECKING:
    from collections.abc import Collection

    from vgpuctl.host.doctor import CheckSpec
    from vgpuctl.host.setup import SetupWants
    from vgpuctl.mdev.sysfs import MdevType

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
# The platforms whose SR-IOV works through i915-sriov-dkms (its i915_pci.c has_sriov: TGL, ADL-S/P (ADL-N and
# RPL use them), MTL (ARL uses it)); xe's SR-IOV on these iGPUs is experimental or absent (sriov.md 0.1, 2.1).
I915_DKMS_PLATFORMS = ("Tiger Lake", "Alder Lake-S", "Alder Lake-P", "Alder Lake-N", "Raptor Lake-S", "Raptor Lake-P",
                       "Raptor Lake-U", "Meteor Lake", "Arrow Lake")
IGPU_ADDRESS = "0000:00:02.0"  # where every Intel iGPU sits
# The GuC firmware i915 loads per platform: /lib/firmware/i915/<prefix>_guc_<major>[.<minor>.<patch>].bin
# (i915 gt/uc/intel_uc_fw.c INTEL_GUC_FIRMWARE_DEFS: ADL-S and RPL-S take Tiger Lake's, ADL-N/RPL-P/RPL-U
# ADL-P's, ARL Meteor Lake's).
GUC_FIRMWARE_PREFIX = {"Tiger Lake": "tgl", "Alder Lake-S": "tgl", "Raptor Lake-S": "tgl", "Alder Lake-P": "adlp",
                       "Alder Lake-N": "adlp", "Raptor Lake-P": "adlp", "Raptor Lake-U": "adlp", "Meteor Lake": "mtl",
                       "Arrow Lake": "mtl"}
DKMS_NAME = "i915-sriov-dkms"  # its dkms.conf PACKAGE_NAME: /var/lib/dkms/i915-sriov-dkms/<version>/<kernel>/
SRIOV_FIX = ("SR-IOV with i915-sriov-dkms (host): add 'intel_iommu=on i915.enable_guc=3 i915.max_vfs=7 "
             "module_blacklist=xe' to GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub, update-grub, reboot, then: "
             "vgpuctl vfs enable 0000:00:02.0 7  (VFs 0000:00:02.1-02.7, each bound to vfio-pci; a VM takes one "
             "with --vf)")

VFIO_DRIVERS = ("vfio-pci", "xe-vfio-pci")  # what a VF a VM may open is bound to
PF_DRIVERS = ("i915", "xe")  # the Intel drivers with a sriov_configure (i915 only as i915-sriov-dkms)
# Battlemage (e2xx) and Panther Lake (b08x/b09x) VFs go to the VFIO variant driver xe-vfio-pci (sriov.md 0.1).
XE_VFIO_DEVICES = (range(0xE200, 0xE300), range(0xB080, 0xB0A0))
SETUP_FLAGS = "i915.max_vfs=7 i915.enable_guc=3"
KIND: Kind = "vfs"  # the journal's records of the VF configurations vgpuctl made, by PF address


def vfio_driver(device: int | None) -> str:
    """The VFIO driver a VF of this PF device id is bound to."""
    return "xe-vfio-pci" if device is not None and any(device in r for r in XE_VFIO_DEVICES) else "vfio-pci"


@dataclass(frozen=True)
class IntelPf:
    """An Intel GPU with the SR-IOV capability, and whether its driver can make VFs."""

    pf: pci.SriovPf
    problem: str | None  # why VFs cannot be enabled, None if they can
    root: HostRoot | None = None  # the host it was read from (to say more about a refusal)

    @property
    def address(self) -> str:
        return self.pf.address

    @property
    def driver(self) -> str | None:
        return self.pf.function.driver

    @property
    def vfio_driver(self) -> str:
        return vfio_driver(self.pf.function.device)


def pf_problem(root: HostRoot, pf: pci.SriovPf) -> str | None:
    """Why this PF's driver cannot make VFs (None: it can, as far as sysfs tells before a write)."""
    driver = pf.function.driver
    if driver is None:
        return "no driver is bound to the PF: load i915 (i915-sriov-dkms) or xe"
    if driver not in PF_DRIVERS:
        return f"the PF is bound to {driver}, which does not make Intel VFs"
    if driver == "i915" and not root.exists(root.module_parameter("i915", "max_vfs")):
        return "the loaded i915 cannot make VFs: it is the stock driver, not i915-sriov-dkms"
    if pf.total_vfs == 0:
        if driver == "i915":
            return f"i915.max_vfs is 0 (or GuC submission is off): set {SETUP_FLAGS} (vgpuctl setup)"
        return "xe allows no VFs here (xe.max_vfs=0, or this platform has no SR-IOV under xe)"
    return None


def intel_pfs(root: HostRoot) -> list[IntelPf]:
    """Every Intel PCI function with the SR-IOV capability, by address."""
    found = []
    for address in sorted(pci.sriov_pfs(root)):
        function = pci.read_function(root, address)
        if function.vendor != INTEL_VENDOR_ID:
            continue
        pf = pci.read_pf(root, address)
        found.append(IntelPf(pf, pf_problem(root, pf), root))
    return found


def intel_pf(root: HostRoot, address: str) -> IntelPf:
    address = pci.check_address(address)
    if not root.exists(root.pci_device(address)):
        raise NotFound("no PCI device {parent} (vgpuctl vfs list shows the SR-IOV GPUs)", what="PF", parent=address)
    function = pci.read_function(root, address)
    if function.physfn:
        raise InvalidInput("{parent} is a VF of {physfn}: give its PF", what="PF", parent=address,
                           physfn=function.physfn)
    if function.vendor != INTEL_VENDOR_ID or not pci.is_sriov_pf(root, address):
        raise NotFound("{parent} is not an Intel GPU with SR-IOV (vgpuctl vfs list shows them)", what="PF",
                       parent=address)
    pf = pci.read_pf(root, address)
    return IntelPf(pf, pf_problem(root, pf), root)


# ---------------------------------------------------------------------- errnos in the driver's words (2.3)

def explain(pf: IntelPf, error: KernelError, count: int) -> KernelError:
    """The kernel's refusal of ``count`` (0: a disable) on this PF, said for its driver."""
    code, driver = error.errno, pf.driver or "no driver"
    why: str | None = None
    if code == errnos.ERANGE:
        why = (pf.problem if pf.pf.total_vfs == 0 and pf.problem else
               f"{pf.address} allows at most {pf.pf.total_vfs} VFs (sriov_totalvfs)")
    elif code == errnos.ENOENT:
        why = (pf.problem or "the loaded i915 cannot make VFs: it is the stock driver, not i915-sriov-dkms"
               if driver == "i915" else "no driver with SR-IOV support is bound to the PF")
    elif code == errnos.EBUSY:
        why = ("VFs are already enabled (disable them first: the kernel takes 0, then N), or the driver is still "
               "initialising the PF; try again in a moment")
    elif code == errnos.ENOMEM:
        why = ("not enough MMIO space for the VFs' BARs: enable SR-IOV (and above-4G decoding / resizable BAR) in "
               "the firmware setup, or boot with pci=realloc")
    elif code == errnos.ENOSPC:
        why = f"a fair share of the GPU for {count} VFs rounds to nothing: enable fewer VFs"
    elif code == errnos.ENOKEY:
        why = (f"some VFs are half provisioned ({_provisioned(pf, count) or 'prelim_iov quotas set for only some'}): "
               f"provision all {count} (vgpuctl vfs provision {pf.address} --vf 1-{count} ...) or none "
               f"(vgpuctl vfs provision {pf.address} --auto)")
    elif code == errnos.EUCLEAN:
        why = (f"a VF is already provisioned ({_provisioned(pf, count) or 'by hand'}) while the driver is in auto "
               f"mode: disable first and clear it (vgpuctl vfs provision {pf.address} --auto), or provision every "
               f"VF (vgpuctl vfs provision {pf.address} --vf 1-{count} ...)")
    elif code == errnos.ENODEV:
        why = f"{driver} runs this GPU not as an SR-IOV PF (GuC submission off, or {driver} has no PF mode here)"
    elif code == errnos.EPERM:
        why = "VFs are still assigned to a VM (legacy KVM assignment): stop it first"
    elif code == errnos.EIO:
        why = "the GPU is wedged: see dmesg; a reboot is usually needed"
    elif code == errnos.ETIMEDOUT:
        why = "a VM still holds one of the VFs: stop it (the disable waits in the kernel until it lets go)"
    if why is None:
        return error
    action = f"disable the VFs of {pf.address}" if count == 0 else f"enable {count} VFs on {pf.address}"
    return KernelError("cannot {action} ({driver}): {why}", what="PF", parent=pf.address, errno=code, driver=driver,
                       action=action, why=why, path=error.path, count=count)


def _provisioned(pf: IntelPf, count: int) -> str | None:
    from vgpuctl.backends.sriov_intel_provision import describe_missing

    return describe_missing(pf.root, pf, count) if pf.root is not None else None


# ---------------------------------------------------------------------- enable / disable (2.6)

def owned_configuration(state: StateDir, pf: str) -> dict[str, Any] | None:
    return Journal(state).ownership().records(KIND).get(pf)


def settle(root: HostRoot, state: StateDir) -> None:
    """What a killed ``vfs enable``/``disable`` left: its PF's autoprobe back on (the enable turns it off for a
    moment), then the journal settled as the mdev commands settle it (VFs there: vgpuctl's; gone: forgotten)."""
    from vgpuctl.base import process
    from vgpuctl.mdev.report import object_exists

    journal = Journal(state)
    ownership = journal.ownership()
    for intent in ownership.journal:
        if intent.get("kind") == KIND and not process.is_alive(intent.get("by", {})):
            with contextlib.suppress(KernelError, NotFound, InvalidInput):
                pci.set_drivers_autoprobe(root, pci.check_address(intent["key"]), True)
    journal.reconcile(lambda kind, key: object_exists(root, kind, key))
    # A record of another boot: those VFs went with it, and VFs there now were made by someone else (a boot
    # script, sriov-manage's unit) unless vgpuctl's restore claims them again in this boot.
    boot = this_boot(root)
    for pf, record in ownership.vfs.items():
        if record.get("boot", boot) != boot:
            journal.forget(KIND, pf)


def enable(root: HostRoot, state: StateDir, address: str, count: int, *, force: bool = False,
           holders: dict[str, str] | None = None, timeout_s: float = pci.NUMVFS_TIMEOUT_S) -> IntelPf:
    """Enable ``count`` VFs on the PF and give each to its VFIO driver (sriov.md 2.6); recorded as vgpuctl's."""
    settle(root, state)
    pf = intel_pf(root, address)
    if count < 1:
        raise InvalidInput("give at least 1 VF (vgpuctl vfs disable turns them off)", what="count", count=count)
    if pf.driver not in PF_DRIVERS:
        raise Conflict("cannot enable VFs on {parent}: {why}", what="PF", parent=pf.address, why=pf.problem,
                       driver=pf.driver)
    if 0 < pf.pf.total_vfs < count:  # with 0 the kernel's ERANGE is explained (max_vfs, GuC)
        raise InvalidInput("{parent} allows at most {total} VFs (sriov_totalvfs), not {count}", what="count",
                           parent=pf.address, total=pf.pf.total_vfs, count=count)
    journal = Journal(state)
    current = pf.pf.num_vfs
    if current is None:  # the read timed out: a disable is waiting for a VM to let go of a VF
        raise explain(pf, KernelError("timed out", errno=errnos.ETIMEDOUT, path=pf.address), count)
    same = current == count  # only (re)bind the VFs: nothing is turned off
    if current and not same:
        _require_off_allowed(root, state, pf, force, holders or {})
    elif same and not force and owned_configuration(state, pf.address) is None:
        _require_off_allowed(root, state, pf, force, {})  # says they are not vgpuctl's
    before = vf_definitions.load(state, pf.address)
    wanted = VfDefinition(pf.address, pf.driver or "", count, pf.vfio_driver, before.provisioning if before else None,
                          before.extra if before else {})
    record = {"count": count, "driver": pf.driver, "vfio_driver": pf.vfio_driver, "boot": this_boot(root)}
    with vf_definitions.changing(state, wanted), journal.claiming(KIND, pf.address, record):
        if current == 0 and before is not None:  # the quotas it was defined with (a reboot forgot them)
            from vgpuctl.backends.sriov_intel_provision import apply_defined

            apply_defined(root, pf, before, force=force)
        pci.set_drivers_autoprobe(root, pf.address, False)
        crashpoint("vfs-enable:autoprobe-off")
        try:
            if current and not same:
                _write_numvfs(root, pf, 0, timeout_s)
                crashpoint("vfs-enable:disabled")
            if not same:
                _write_numvfs(root, pf, count, timeout_s)
                crashpoint("vfs-enable:enabled")
            done = pci.read_pf(root, pf.address, timeout_s)
            for vf in done.vfs:
                pci.bind(root, vf.address, pf.vfio_driver)
                crashpoint("vfs-enable:bound")
        finally:
            pci.set_drivers_autoprobe(root, pf.address, True)
    return intel_pf(root, pf.address)


def disable(root: HostRoot, state: StateDir, address: str, *, force: bool = False,
            holders: dict[str, str] | None = None, timeout_s: float = pci.NUMVFS_TIMEOUT_S,
            persist: bool = True) -> IntelPf:
    """Turn the PF's VFs off: refused while a VM holds one, or when vgpuctl did not enable them, unless force.
    ``persist``: also none at boot (the definition's count 0); False for a restore that turns them off for a
    moment to change their quotas."""
    settle(root, state)
    pf = intel_pf(root, address)
    journal = Journal(state)
    before = vf_definitions.load(state, pf.address)
    wanted = VfDefinition(pf.address, pf.driver or "", 0, pf.vfio_driver, before.provisioning if before else None,
                          before.extra if before else {})  # the provisioning stays (the driver keeps it too)
    if not pf.pf.num_vfs and not pf.pf.vfs:
        journal.forget(KIND, pf.address)
        if persist and before is not None and before.count:  # none at boot either (a killed enable's wish)
            vf_definitions.save(state, wanted)
        return pf
    _require_off_allowed(root, state, pf, force, holders or {})
    with (vf_definitions.changing(state, wanted) if persist else contextlib.nullcontext()), \
            journal.releasing(KIND, pf.address):
        crashpoint("vfs-disable:releasing")
        _write_numvfs(root, pf, 0, timeout_s)
    return intel_pf(root, pf.address)


def _require_off_allowed(root: HostRoot, state: StateDir, pf: IntelPf, force: bool, holders: dict[str, str]) -> None:
    """``holders``: VF address -> the VM vgpuctl runs on it (the VM layer's records, passed by the caller)."""
    if not force and owned_configuration(state, pf.address) is None:
        raise NotOwned("the VFs of {parent} were not enabled by vgpuctl (another tool or a boot script did it); "
                       "leave them alone, or add --force if you are sure", what="PF", parent=pf.address)
    held = {**pci.vf_openers(root, pf.pf.vfs), **{vf: f"VM {vm}" for vf, vm in holders.items()
                                               if vf in {v.address for v in pf.pf.vfs}}}
    if held and not force:
        raise Conflict("VFs of {parent} are in use ({users}): stop those VMs first (with --force the kernel waits "
                       "for them, and vgpuctl gives up after a timeout)", what="PF", parent=pf.address,
                       holder=", ".join(sorted(held.values())),
                       users=", ".join(f"{vf} by {who}" for vf, who in sorted(held.items())))


def _write_numvfs(root: HostRoot, pf: IntelPf, count: int, timeout_s: float) -> None:
    try:
        pci.set_num_vfs(root, pf.address, count, timeout_s)
    except KernelError as e:
        raise explain(pf, e, count) from e


def choose_vf(root: HostRoot, function: pci.PciFunction, taken: Collection[str],
              type_id: str | None) -> VfChoice:
    """For a VM: the Intel VF ``function`` is, or the first free VF (on its VFIO driver, not taken, not open) of the
    PF it is."""
    if type_id is not None:
        raise InvalidInput("vgpu.type with vgpu.vf is for NVIDIA's VFs: an Intel VF's share is set per PF "
                           "(vgpuctl vfs enable PF N)")
    if function.physfn:
        return VfChoice(function.address, function.physfn, TYPE_ID, "active", "the VF named")
    pf = intel_pf(root, function.address)
    if not pf.pf.vfs:
        raise NotFound("{parent} has no VFs enabled: 'vgpuctl vfs enable {parent} N' first" +
                       (f" ({pf.problem})" if pf.problem else ""), what="VF", parent=pf.address)
    openers = pci.vf_openers(root, pf.pf.vfs)
    free = [vf for vf in pf.pf.vfs if vf.driver in VFIO_DRIVERS and vf.address not in taken
            and vf.address not in openers]
    if not free:
        raise CapacityError("every VF of {parent} is in use or not on a VFIO driver ('vgpuctl vfs list' shows "
                            "them); stop a VM or enable more VFs", what="VF", parent=pf.address)
    return VfChoice(free[0].address, pf.address, TYPE_ID, "active",
                    f"the first free VF of {pf.address} ({len(free)} free)")


# ---------------------------------------------------------------------- the backend

class IntelSriov(BackendDefaults):
    name: str = "sriov-intel"
    guest_sleep: bool = False  # a VF has no PM capability (xe holds a runtime-PM reference for the VFs)
    igd_opregion: bool = False  # a VF has no OpRegion of its own
    without_kvm: str | None = None  # plain vfio-pci: QEMU opens it under TCG too
    pci_function: bool = True
    # sriov.md 5.1: plain vfio-pci has no VFIO_DEVICE_QUERY_GFX_PLANE and a VF has no display engine.
    no_display: str | None = ("an Intel SR-IOV VF has no display of its own (QEMU: \"vfio: device doesn't support "
                              "any (known) display method\"): the picture comes from an emulated adapter (the VM's "
                              "display and video settings) or from streaming inside the guest (RDP, Sunshine)")
    pci_vendor: int | None = INTEL_VENDOR_ID
    # sriov.md 5.1, 6 (i915-sriov-dkms docs/install-windows-guest.md): Intel's Windows driver stops with Code 43
    # on a VF without the GOP driver's option ROM; Proxmox's working set-up also hides KVM (kvm=off).
    windows_guest: str | None = ("a Windows guest on an Intel VF: Intel's driver shows Code 43 without the VF's "
                                 "option ROM — extract the IntelGopDriver ROM from the board's firmware and set "
                                 "vgpu.rom to its path (QEMU romfile=); RDP or in-guest streaming shows the desktop")

    def attachment(self, address: str) -> Attachment:
        return pci_attachment(address)

    def claims_type(self, type_id: str) -> bool:
        return type_id == TYPE_ID

    def doctor_checks(self) -> tuple[CheckSpec, ...]:
        from vgpuctl.backends.sriov_intel_doctor import CHECKS

        return CHECKS

    def offered_types(self, root: HostRoot, held: Collection[str] = ()) -> list[MdevType]:
        from vgpuctl.backends.sriov_intel_quota import offered_types

        return offered_types(root, held)

    def setup_wants(self, root: HostRoot) -> SetupWants | None:
        from vgpuctl.backends.sriov_intel_setup import sriov_wants

        return sriov_wants(root)


TYPE_ID = "intel-sriov-vf"  # the "type" a VM's vGPU on an Intel VF has (VFs have no mdev type)
BACKEND = IntelSriov()
