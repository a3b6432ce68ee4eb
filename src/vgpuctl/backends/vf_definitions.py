"""Persistent VF configurations: what ``vgpuctl vfs restore`` puts back at boot (sriov.md 2.6 step 4, 6 pain 4:
"VFs not recreated at boot"; 8: "boot persistence is our job on both vendors").

VFs, their provisioning and NVIDIA's types are runtime state: a reboot forgets them. Every VF configuration
vgpuctl makes (``vfs enable``, ``vfs provision``) is therefore also written as a definition, one file per PF in
the state directory's ``vfs/`` (``vfs/0000:00:02.0.json``: the count, the PF's driver, the VFIO driver, the
provisioning), replaced atomically; ``vfs disable`` writes count 0, and a definition with nothing left to put
back is removed. The definition is the *wanted* configuration: it is written before the host is changed and
put back as it was when the change fails, so a killed command leaves either the old or the new wish on disk,
never a torn file, and the next ``vfs restore`` (or the same command again) makes the host match it.

The ownership journal's ``vfs`` records (:class:`vgpuctl.mdev.state.Journal`) say which VFs on the host *now*
are vgpuctl's; each carries the boot it was made in (:func:`this_boot`), so that VFs another tool enabled at
the next boot are never taken for vgpuctl's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import StateDamaged, VgpuError
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot, pci
from vgpuctl.host.files import atomic_write

DEFINITION_VERSION = 1
# The systemd unit that puts the definitions back at boot (vf_restore renders it); here, light to import, for the
# units that order themselves after it and the doctors that look for it.
UNIT_NAME = "vgpuctl-vfs.service"


def this_boot(root: HostRoot) -> str:
    """The host's boot: the kernel's random boot id (a simulated host: its boot count)."""
    from vgpuctl.base.process import boot_id

    simulation = root.simulation()
    if simulation is not None:
        return f"simulated-{simulation.get('boot', 0)}"
    try:
        return boot_id()
    except OSError:
        return "?"


@dataclass
class VfDefinition:
    """A PF's VF configuration as vgpuctl made it (``vfs/<PF>.json``)."""

    pf: str
    driver: str  # the PF's driver when it was made: i915, xe, nvidia
    count: int = 0  # VFs enabled (NVIDIA: sriov-manage enables them all); 0 = none
    vfio_driver: str | None = None  # what the VFs are bound to (Intel); None: they stay on the PF's driver
    # Intel provisioning: None = the driver's fair shares (auto), else VF number -> resource -> value as read
    # back from the driver (bytes for ggtt/vram, counts for contexts/doorbells).
    provisioning: dict[str, dict[str, int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of later versions, kept on rewrite

    @property
    def empty(self) -> bool:
        return self.count == 0 and not self.provisioning

    def to_json(self) -> bytes:
        body = {"version": DEFINITION_VERSION, **self.extra, **asdict(self)}
        body.pop("extra")
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, text: str) -> VfDefinition:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        known = {"pf", "driver", "count", "vfio_driver", "provisioning"}
        provisioning = data.get("provisioning")
        if provisioning is not None and not (isinstance(provisioning, dict) and all(
                isinstance(v, dict) and all(isinstance(n, int) for n in v.values()) for v in provisioning.values())):
            raise TypeError("provisioning is not VF -> resource -> number")
        found = cls(pci.check_address(str(data["pf"])), str(data["driver"]), int(data.get("count", 0)),
                    data.get("vfio_driver"), provisioning,
                    {k: v for k, v in data.items() if k not in known and k != "version"})
        if found.count < 0:
            raise ValueError("count < 0")
        return found


def directory(state: StateDir) -> Path:
    return state.path / "vfs"


def path(state: StateDir, pf: str) -> Path:
    return directory(state) / f"{pci.check_address(pf)}.json"


def load(state: StateDir, pf: str) -> VfDefinition | None:
    file = path(state, pf)
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None
    try:
        return VfDefinition.parse(text)
    except (ValueError, KeyError, TypeError) as e:
        raise StateDamaged("{path} is damaged ({why}): fix it or remove it (vgpuctl vfs restore skips it until "
                           "then)", what="state", path=str(file), why=f"{type(e).__name__}: {e}") from None


def load_all(state: StateDir) -> tuple[list[VfDefinition], list[StateDamaged]]:
    """Every definition by PF address, and the files that could not be read (each reported, none hiding the rest)."""
    found, damaged = [], []
    base = directory(state)
    for file in sorted(base.glob("*.json")) if base.is_dir() else []:
        try:
            definition = load(state, file.stem)
        except StateDamaged as e:
            damaged.append(e)
            continue
        except VgpuError as e:  # a file name that is no PCI address
            damaged.append(StateDamaged("{path} is not a VF definition ({why}): remove it", what="state",
                                        path=str(file), why=str(e)))
            continue
        if definition is not None:
            found.append(definition)
    return found, damaged


def save(state: StateDir, definition: VfDefinition) -> None:
    """Write (or, when there is nothing left to put back, remove) the PF's definition, atomically."""
    file = path(state, definition.pf)
    if definition.empty:
        with contextlib.suppress(FileNotFoundError):
            file.unlink()
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, definition.to_json())
    crashpoint("vfs-define:written")


def locked(state: StateDir, pf: str) -> contextlib.AbstractContextManager[None]:
    """One change of the PF's definition at a time (held across the host change it goes with)."""
    return state.lock(f"vfs-{pci.check_address(pf).replace(':', '_')}")


@contextlib.contextmanager
def changing(state: StateDir, definition: VfDefinition) -> Iterator[None]:
    """Around a host change that makes ``definition`` true: written first, the previous one put back if the
    change fails (a kill leaves the new one: the next restore or the same command again makes it so)."""
    with locked(state, definition.pf):
        before = load(state, definition.pf)
        save(state, definition)
        try:
            yield
        except BaseException:
            save(state, before or VfDefinition(definition.pf, definition.driver))
            raise
