"""Generic mdev vGPUs: NVIDIA's time-sliced vGPUs (before Ada), the kernel's sample drivers, other vendors.

Their vendor drivers keep their accounting to themselves: available_instances is all there is.
"""

from __future__ import annotations

from dataclasses import dataclass

from vgpuctl.backends import Capacity
from vgpuctl.host import HostRoot
from vgpuctl.mdev.sysfs import MdevType


@dataclass(frozen=True)
class GenericMdev:
    name: str = "mdev"
    guest_sleep: bool = True
    igd_opregion: bool = False
    without_kvm: str | None = None

    def claims_type(self, type_id: str) -> bool:
        return True

    def capacity(self, root: HostRoot, parent: str, types: list[MdevType]) -> Capacity | None:
        return None


BACKEND = GenericMdev()
