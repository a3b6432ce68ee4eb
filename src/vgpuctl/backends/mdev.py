"""Generic mdev vGPUs: NVIDIA's time-sliced vGPUs (before Ada), the kernel's sample drivers, other vendors.

Their vendor drivers keep their accounting to themselves: available_instances is all there is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vgpuctl.backends import Attachment, BackendDefaults, mdev_attachment
from vgpuctl.host import facts

if TYPE_CHECKING:
    from vgpuctl.host.doctor import Check, CheckSpec, Context, Host


class GenericMdev(BackendDefaults):
    name: str = "mdev"
    guest_sleep: bool = True
    igd_opregion: bool = False
    without_kvm: str | None = None
    pci_function: bool = False  # mdev devices, by UUID
    no_display: str | None = None
    pci_vendor: int | None = None  # any vendor's

    def attachment(self, uuid: str) -> Attachment:
        return mdev_attachment(uuid)

    def claims_type(self, type_id: str) -> bool:
        return True

    def doctor_checks(self) -> tuple[CheckSpec, ...]:
        from vgpuctl.host.doctor import CheckSpec

        return (CheckSpec("mdev-parents", "Other mdev parents (NVIDIA vGPU, sample drivers)", check_mdev_parents),)


BACKEND = GenericMdev()


def _generic_parents(host: Host) -> list[tuple[str, str]]:
    """(parent, what drives it) of the mdev parents that no vendor's own backend claims: NVIDIA's vGPU driver
    (time-sliced vGPUs, before Ada), the kernel's sample drivers, other vendors' mdev drivers."""
    from vgpuctl.backends import _backends

    claimed = {b.pci_vendor for b in _backends() if b.pci_vendor is not None}
    return [(parent, driver) for parent, vendor, driver in host.mdev_parents() if vendor not in claimed]


def check_mdev_parents(ctx: Context, c: Check) -> None:
    host = ctx.host
    others = _generic_parents(host)
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
    ctx.kinds.append(f"mdev ({', '.join(sorted({d for _, d in others}))})")
    c.set("ok", f"{len(others)} mdev parent{'s' if len(others) > 1 else ''} with vGPU types: "
                f"{', '.join(f'{p} ({d})' for p, d in others)}; 'vgpuctl types' lists them.")

