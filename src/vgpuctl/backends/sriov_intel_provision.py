"""Provisioning Intel VFs by hand: each VF's share of GGTT, GuC contexts, doorbells and (dGPU) VRAM, set while the
VFs are off and used when they are enabled (sriov.md 2.4, 2.6 step 2).

Two interfaces, one per driver:

* i915-sriov-dkms: ``/sys/bus/pci/devices/<PF>/drm/card<N>/prelim_iov/`` (i915_sriov_sysfs.c,
  intel_iov_sysfs.c): ``pf/auto_provisioning`` (turned off before any quota is written: with it on, an enable
  finding a provisioned VF fails EUCLEAN; turning it back on while a quota is set fails ESTALE) and
  ``vfN/gt0/{ggtt,contexts,doorbells}_quota``. At enable, VFs 1..N must be all provisioned or all empty
  (else ENOKEY).
* xe: debugfs ``/sys/kernel/debug/dri/<BDF>/sriov/vfN/tile0/{ggtt,vram}_quota`` and
  ``.../tile0/gt0/{contexts,doorbells}_quota`` (xe_gt_sriov_pf_debugfs.c, xe_tile_sriov_pf_debugfs.c: the only
  place for GGTT, contexts and doorbells), VRAM through ``sriov_admin/vfN/profile/vram_quota`` where the kernel
  has it (7.0). Writing a quota puts xe in ``custom`` provisioning mode: nothing is released at disable, and no
  fair shares are given at enable (xe_sriov_pf_provision.c).

What vgpuctl wrote is in the PF's definition (:mod:`vgpuctl.backends.vf_definitions`); quotas on the host that
the definition does not account for are another tool's and are changed only with ``force``.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import re
from collections.abc import Callable
from dataclasses import dataclass

from vgpuctl.backends import sriov_intel, vf_definitions
from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import Conflict, InvalidInput, KernelError, NotFound, NotOwned
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot

RESOURCES = ("ggtt", "contexts", "doorbells", "vram")
SIZE_RESOURCES = ("ggtt", "vram")  # in bytes; the others are counts
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``466MiB``, ``4096`` (bytes): binary units, as the drivers count."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if match is None:
        raise InvalidInput("{value!r} is not a size: give bytes or a number with K, M, G (binary: 1G = 1024M)",
                           what="size", value=text)
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_size(value: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value / (1 << 20):.1f}M" if value >= 1 << 20 else str(value)


def parse_vfs(specs: tuple[str, ...], total: int) -> list[int]:
    """``--vf`` values: ``3``, ``1-4``, ``1,3``; none means every VF (1..totalvfs)."""
    if not specs:
        return list(range(1, total + 1))
    chosen: set[int] = set()
    for spec in specs:
        for part in spec.split(","):
            first, sep, last = part.strip().partition("-")
            try:
                numbers = range(int(first), int(last if sep else first) + 1)
            except ValueError:
                raise InvalidInput("--vf {value!r}: give VF numbers (1..{total}) like 2, 1-3 or 1,4", what="VF",
                                   value=spec, total=total) from None
            if not numbers or numbers.start < 1 or numbers.stop - 1 > total:
                raise InvalidInput("--vf {value!r}: this PF has VFs 1..{total}", what="VF", value=spec, total=total)
            chosen.update(numbers)
    return sorted(chosen)


# ---------------------------------------------------------------------- the driver's files

@dataclass(frozen=True)
class Interface:
    """Where one PF's provisioning is read and written."""

    driver: str
    total: int
    quota_files: dict[int, dict[str, str]]  # VF number -> resource -> file
    auto_file: str | None  # i915's auto_provisioning; xe has none
    available: dict[str, str]  # resource -> file with what is left for VFs (i915)

    def resources(self) -> tuple[str, ...]:
        return tuple(r for r in RESOURCES if self.quota_files and r in self.quota_files[1])


def interface(root: HostRoot, pf: sriov_intel.IntelPf) -> Interface:
    """The PF's provisioning files; NotFound when its driver has none (no PF mode, stock i915, xe before PF mode)."""
    total, base = pf.pf.total_vfs, root.pci_device(pf.address)
    if pf.driver == "i915":
        for card in _cards(root, pf.address):
            prelim = f"{base}/drm/{card}/prelim_iov"
            if root.exists(f"{prelim}/pf/auto_provisioning"):
                files = {n: {r: f"{prelim}/vf{n}/gt0/{name}" for r, name in
                             (("ggtt", "ggtt_quota"), ("contexts", "contexts_quota"), ("doorbells", "doorbells_quota"),
                              ("vram", "lmem_quota")) if root.exists(f"{prelim}/vf{n}/gt0/{name}")}
                         for n in range(1, total + 1)}
                available = {r: f"{prelim}/pf/gt0/available/{r}_max_quota" for r in ("ggtt", "contexts", "doorbells")
                             if root.exists(f"{prelim}/pf/gt0/available/{r}_max_quota")}
                return Interface("i915", total, files, f"{prelim}/pf/auto_provisioning", available)
    elif pf.driver == "xe":
        for name in (pf.address, *(card.removeprefix("card") for card in _cards(root, pf.address))):
            sriov = f"{root.debugfs_dri(name)}/sriov"
            if root.exists(f"{sriov}/vf1"):
                files = {}
                for n in range(1, total + 1):
                    tile = f"{sriov}/vf{n}/tile0"
                    admin_vram = f"{base}/sriov_admin/vf{n}/profile/vram_quota"
                    files[n] = {"ggtt": f"{tile}/ggtt_quota", "contexts": f"{tile}/gt0/contexts_quota",
                                "doorbells": f"{tile}/gt0/doorbells_quota",
                                "vram": admin_vram if root.exists(admin_vram) else f"{tile}/vram_quota"}
                return Interface("xe", total, files, None, {})
    raise NotFound("{parent} has no provisioning interface ({driver}: {why})", what="PF", parent=pf.address,
                   driver=pf.driver or "no driver",
                   why=pf.problem or ("prelim_iov is missing: is debugfs mounted, is this i915-sriov-dkms?"
                                      if pf.driver == "i915" else "debugfs is not mounted, or xe is not in PF mode"))


def _cards(root: HostRoot, address: str) -> list[str]:
    drm = f"{root.pci_device(address)}/drm"
    return [n for n in (root.listdir(drm) if root.exists(drm) else []) if re.fullmatch(r"card\d+", n)]


def read_quotas(root: HostRoot, iface: Interface) -> dict[int, dict[str, int]]:
    """VF number -> resource -> value now (0: none)."""
    found = {}
    for vf, files in iface.quota_files.items():
        found[vf] = {r: _read_int(root, path) for r, path in files.items()}
    return found


def auto_mode(root: HostRoot, iface: Interface) -> bool | None:
    """i915's auto_provisioning; None for xe (its mode is not shown in sysfs)."""
    return None if iface.auto_file is None else root.read_value(iface.auto_file).strip() == "1"


def _read_int(root: HostRoot, path: str) -> int:
    try:
        return int(root.read_value(path).strip() or 0)
    except (OSError, ValueError):
        return 0


def quotas_of(root: HostRoot, pf: sriov_intel.IntelPf) -> dict[int, dict[str, int]] | None:
    """The PF's quotas per VF, None when the driver shows none (for listings)."""
    try:
        return read_quotas(root, interface(root, pf))
    except NotFound:
        return None


# ---------------------------------------------------------------------- errnos of a quota write (2.4)

def explain_write(pf: sriov_intel.IntelPf, error: KernelError, what: str) -> KernelError:
    code = error.errno
    why = {
        errnos.EINVAL: "not a value this driver takes here (i915: GGTT spare below 64 MiB; a malformed number)",
        errnos.ERANGE: "too large for the field (contexts and doorbells are 16-bit counts)",
        errnos.ENOSPC: "there is not that much left on the GPU: give less, or free it from the other VFs first",
        errnos.EDQUOT: "there is not that much left on the GPU: give less, or free it from the other VFs first",
        errnos.ESTALE: ("a VF still has quotas of its own, so the driver cannot go back to fair shares: clear them "
                        "(vgpuctl vfs provision PF --auto clears and then turns it on)"),
        errnos.EUCLEAN: "a VF is already provisioned: disable the VFs first",
        errnos.EPERM: "the firmware does not allow this change on this GPU",
        errnos.EBUSY: "the VFs are enabled: disable them first (quotas change while the VFs are off)",
        errnos.EIO: "the GuC refused it: see dmesg",
        errnos.EACCES: "the file is read-only (debugfs needs root; VF priorities belong to the PF)",
    }.get(code or 0)
    if why is None:
        return error
    return KernelError("cannot set {item} on {parent} ({driver}): {why}", what="PF", parent=pf.address,
                       driver=pf.driver, item=what, why=why, errno=code, path=error.path)


def _write(root: HostRoot, pf: sriov_intel.IntelPf, path: str, value: int, what: str) -> None:
    try:
        root.write_text(path, f"{value}\n")
    except OSError as e:
        raise explain_write(pf, KernelError("{path}: {strerror}", what="PF", path=path, errno=e.errno), what) from e


# ---------------------------------------------------------------------- provision / back to auto

def foreign_quotas(definition: vf_definitions.VfDefinition | None,
                   quotas: dict[int, dict[str, int]]) -> list[int]:
    """VFs holding quotas on the host that vgpuctl's definition does not list as its own (another tool's). A VF
    listed is vgpuctl's whatever its values: a killed provision leaves some written and some not."""
    ours = (definition.provisioning if definition else None) or {}
    return [vf for vf, values in quotas.items() if any(values.values()) and str(vf) not in ours]


def _check_off(root: HostRoot, pf: sriov_intel.IntelPf) -> None:
    if pf.pf.num_vfs is None:
        raise sriov_intel.explain(pf, KernelError("timed out", errno=errnos.ETIMEDOUT, path=pf.address), 0)
    if pf.pf.num_vfs:
        raise Conflict("the VFs of {parent} are enabled ({count}): quotas are set while they are off (sriov.md "
                       "2.6: provision, then enable). vgpuctl vfs disable {parent} first, then provision, then "
                       "vgpuctl vfs enable {parent} N", what="PF", parent=pf.address, count=pf.pf.num_vfs)


def provision(root: HostRoot, state: StateDir, address: str, vfs: tuple[str, ...], values: dict[str, int], *,
              force: bool = False) -> dict[int, dict[str, int]]:
    """Set ``values`` (resource -> number) on the chosen VFs of a PF whose VFs are off; recorded in its
    definition. Returns every VF's quotas as the driver then reads them."""
    sriov_intel.settle(root, state)
    pf = sriov_intel.intel_pf(root, address)
    iface = interface(root, pf)
    if not values:
        raise InvalidInput("give at least one of --ggtt, --contexts, --doorbells, --vram (or --auto)", what="quota")
    unknown = [r for r in values if r not in iface.resources()]
    if unknown:
        raise InvalidInput("{driver} on {parent} has no {names} quota (it has: {known})", what="quota",
                           driver=iface.driver, parent=pf.address, names=", ".join(unknown),
                           known=", ".join(iface.resources()))
    chosen = parse_vfs(vfs, iface.total)
    before, definition = _own_quotas(root, state, pf, iface, force)
    _check_room(root, pf, iface, before, chosen, values)
    wanted = {vf: {**before[vf], **(values if vf in chosen else {})} for vf in before}
    provisioned = {str(vf): q for vf, q in wanted.items() if any(q.values())}
    new = vf_definitions.VfDefinition(pf.address, iface.driver, definition.count if definition else 0,
                                      definition.vfio_driver if definition else pf.vfio_driver, provisioned,
                                      definition.extra if definition else {})
    with vf_definitions.locked(state, pf.address):
        _recording(root, state, iface, new, lambda: apply(root, pf, iface, wanted))
    return read_quotas(root, iface)


def _own_quotas(root: HostRoot, state: StateDir, pf: sriov_intel.IntelPf, iface: Interface,
                force: bool) -> tuple[dict[int, dict[str, int]], vf_definitions.VfDefinition | None]:
    """The PF's quotas now and its definition, once its VFs are off and every quota set is vgpuctl's (or force)."""
    _check_off(root, pf)
    before = read_quotas(root, iface)
    definition = vf_definitions.load(state, pf.address)
    foreign = foreign_quotas(definition, before)
    if foreign and not force:
        raise NotOwned("VFs {vfs} of {parent} hold quotas vgpuctl did not set (another tool or a boot script did); "
                       "leave them, or add --force to replace them", what="PF", parent=pf.address,
                       vfs=", ".join(map(str, foreign)))
    return before, definition


def _recording(root: HostRoot, state: StateDir, iface: Interface, definition: vf_definitions.VfDefinition,
               change: Callable[[], None]) -> None:
    """The definition lists every VF the change may write before it writes one (a kill leaves them listed, so
    vgpuctl's own), then, done or failed half-way, exactly the quotas the driver has (it may round)."""
    vf_definitions.save(state, definition)
    try:
        change()
    finally:
        definition.provisioning = {str(vf): q for vf, q in read_quotas(root, iface).items() if any(q.values())} or None
        vf_definitions.save(state, definition)


def defined_target(definition: vf_definitions.VfDefinition,
                   now: dict[int, dict[str, int]]) -> dict[int, dict[str, int]] | None:
    """Every VF's quotas as the definition has them (None: it leaves them to the driver's fair shares)."""
    wanted = definition.provisioning
    if not wanted:
        return None
    return {vf: {r: int(wanted.get(str(vf), {}).get(r, 0)) for r in q} for vf, q in now.items()}


def differs(root: HostRoot, pf: sriov_intel.IntelPf, definition: vf_definitions.VfDefinition) -> bool:
    """Whether the host's quotas are not the definition's (a reboot forgot them, say)."""
    if not definition.provisioning:
        return False
    now = read_quotas(root, interface(root, pf))
    return defined_target(definition, now) != now


def apply_defined(root: HostRoot, pf: sriov_intel.IntelPf, definition: vf_definitions.VfDefinition, *,
                  force: bool = False) -> bool:
    """Write the definition's quotas where the host differs (VFs off); True if anything was written. Quotas of
    VFs the definition does not list are another tool's: refused unless force."""
    if not definition.provisioning:
        return False
    iface = interface(root, pf)
    now = read_quotas(root, iface)
    target = defined_target(definition, now)
    if target is None or target == now:
        return False
    foreign = foreign_quotas(definition, now)
    if foreign and not force:
        raise NotOwned("VFs {vfs} of {parent} hold quotas vgpuctl did not set (its definition has others): left "
                       "alone; --force replaces them", what="PF", parent=pf.address, vfs=", ".join(map(str, foreign)))
    _check_off(root, pf)
    apply(root, pf, iface, target)
    return True


def apply(root: HostRoot, pf: sriov_intel.IntelPf, iface: Interface, wanted: dict[int, dict[str, int]]) -> None:
    """Write the quotas that differ (auto provisioning off first on i915; sriov.md 2.6 step 2)."""
    now = read_quotas(root, iface)
    if iface.auto_file is not None and auto_mode(root, iface) and any(any(q.values()) for q in wanted.values()):
        _write(root, pf, iface.auto_file, 0, "auto_provisioning")
        crashpoint("vfs-provision:auto-off")
    for vf, quotas in sorted(wanted.items()):
        for resource, value in quotas.items():
            if now.get(vf, {}).get(resource) != value and resource in iface.quota_files[vf]:
                _write(root, pf, iface.quota_files[vf][resource], value, f"VF {vf}'s {resource} quota")
                crashpoint("vfs-provision:written")


def _check_room(root: HostRoot, pf: sriov_intel.IntelPf, iface: Interface, before: dict[int, dict[str, int]],
                chosen: list[int], values: dict[str, int]) -> None:
    """i915 shows what is left for VFs (available/*_max_quota): refuse what cannot fit before writing anything."""
    for resource, file in iface.available.items():
        if resource not in values:
            continue
        free = _read_int(root, file)
        needed = sum(values[resource] - before[vf].get(resource, 0) for vf in chosen)
        if needed > free:
            shown = format_size if resource in SIZE_RESOURCES else str
            raise KernelError("cannot give {vfs} of {parent} {value} of {resource} each: {free} is left for VFs "
                              "({needed} more needed); give less, or fewer VFs", what="PF", parent=pf.address,
                              errno=errnos.ENOSPC, path=file, vfs=_vf_list(chosen).rsplit(" ", 1)[0],
                              resource=resource,
                              value=shown(values[resource]), free=shown(free), needed=shown(needed))


def auto(root: HostRoot, state: StateDir, address: str, *, force: bool = False) -> None:
    """Back to the driver's fair shares: every quota cleared (VFs off), then i915's auto_provisioning on."""
    sriov_intel.settle(root, state)
    pf = sriov_intel.intel_pf(root, address)
    iface = interface(root, pf)
    before, definition = _own_quotas(root, state, pf, iface, force)
    if iface.auto_file is None and any(any(q.values()) for q in before.values()):
        raise Conflict("xe on {parent} has no way back to fair shares while it is loaded (writing a quota put it in "
                       "custom provisioning mode until the driver is reloaded or the host reboots): give every VF "
                       "you enable its quotas instead, or reboot and enable without provisioning", what="PF",
                       parent=pf.address)
    keep = vf_definitions.VfDefinition(pf.address, iface.driver, definition.count if definition else 0,
                                       definition.vfio_driver if definition else pf.vfio_driver,
                                       {str(vf): q for vf, q in before.items() if any(q.values())} or None,
                                       definition.extra if definition else {})
    with vf_definitions.locked(state, pf.address):
        _recording(root, state, iface, keep, lambda: clear_to_auto(root, pf, iface))


def clear_to_auto(root: HostRoot, pf: sriov_intel.IntelPf, iface: Interface) -> None:
    apply(root, pf, iface, {vf: dict.fromkeys(q, 0) for vf, q in read_quotas(root, iface).items()})
    if iface.auto_file is not None and not auto_mode(root, iface):
        _write(root, pf, iface.auto_file, 1, "auto_provisioning")
        crashpoint("vfs-provision:auto-on")


def describe_missing(root: HostRoot, pf: sriov_intel.IntelPf, count: int) -> str | None:
    """For ENOKEY/EUCLEAN at enable: which of VFs 1..count are provisioned and which are not."""
    with contextlib.suppress(NotFound, OSError):
        quotas = read_quotas(root, interface(root, pf))
        done = [vf for vf in range(1, count + 1) if any(quotas.get(vf, {}).values())]
        if done:
            missing = [vf for vf in range(1, count + 1) if vf not in done]
            return f"{_vf_list(done)} provisioned" + (f", {_vf_list(missing)} not" if missing else "")
    return None


def _vf_list(vfs: list[int]) -> str:
    return f"VF {vfs[0]} is" if len(vfs) == 1 else f"VFs {', '.join(map(str, vfs))} are"


def request(root: HostRoot, state: StateDir, address: str, vfs: tuple[str, ...] = (), *, ggtt: str | None = None,
            vram: str | None = None, contexts: int | None = None, doorbells: int | None = None,
            auto_shares: bool = False, force: bool = False) -> dict[int, dict[str, int]] | None:
    """What ``vgpuctl vfs provision`` and the API ask for: quotas as the user writes them (sizes with K/M/G) on the
    chosen VFs, or ``auto_shares`` (every quota cleared: the driver's fair shares). The VFs' quotas as the driver
    then reads them; None after ``auto_shares``."""
    values: dict[str, int] = {}
    if ggtt is not None:
        values["ggtt"] = parse_size(ggtt)
    if vram is not None:
        values["vram"] = parse_size(vram)
    if contexts is not None:
        values["contexts"] = contexts
    if doorbells is not None:
        values["doorbells"] = doorbells
    if auto_shares:
        if values or vfs:
            raise InvalidInput("auto clears every VF's quotas: give it without VFs and quotas", what="quota")
        auto(root, state, address, force=force)
        return None
    return provision(root, state, address, vfs, values, force=force)
