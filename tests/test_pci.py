"""host/pci.py: what every PCI device has (VF addresses by the kernel's routing-ID arithmetic, addresses)."""

from __future__ import annotations

import pytest

from vgpuctl.base.errors import InvalidInput
from vgpuctl.host import pci


def vf_addresses(pf: str, total: int, offset: int, stride: int) -> list[str]:
    return [pci.vf_address(pf, index, offset, stride) for index in range(total)]


def test_vf_addresses_follow_offset_and_stride_across_devices_and_buses() -> None:
    # Intel iGPU (i915 GEN12_VF_OFFSET/STRIDE = 1/1): functions 1..7 of device 2.
    assert vf_addresses("0000:00:02.0", 7, 1, 1) == [f"0000:00:02.{f}" for f in range(1, 8)]
    # NVIDIA data-centre GPUs start at function 4 and run on into the next device numbers.
    assert vf_addresses("0000:41:00.0", 6, 4, 1) == ["0000:41:00.4", "0000:41:00.5", "0000:41:00.6",
                                                         "0000:41:00.7", "0000:41:01.0", "0000:41:01.1"]
    # A routing ID past devfn 0xff is on the next bus (pci_iov_virtfn_bus).
    assert vf_addresses("0000:03:1f.7", 2, 1, 1) == ["0000:04:00.0", "0000:04:00.1"]
    assert vf_addresses("0001:04:00.0", 2, 2, 2) == ["0001:04:00.2", "0001:04:00.4"]


def test_addresses_are_taken_as_lspci_prints_them_and_nothing_else() -> None:
    assert pci.check_address("0000:00:02.1") == "0000:00:02.1"
    assert pci.check_address("41:00.4") == "0000:41:00.4"
    assert pci.check_address("0000:3B:00.0") == "0000:3b:00.0"
    for bad in ("00:02", "0000:00:02.8", "../00:02.0", "0000:00:02.1/driver", ""):
        with pytest.raises(InvalidInput, match="lspci -D"):
            pci.check_address(bad)


def test_devices_are_described_by_vendor_and_class() -> None:
    assert pci.describe(0x1002, 0x1638, 0x030000) == "a display controller from AMD (1002:1638)"
    assert pci.describe(0x1D0F, 0x1111, 0x0B4000) == "a class 0x0b4000 device from vendor 0x1d0f (1d0f:1111)"
    assert pci.vendor_name(None) == "virtual" and pci.vendor_name(0x10DE) == "NVIDIA"
