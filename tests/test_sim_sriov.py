"""The simulated SR-IOV hosts, mounted over FUSE and driven by plain reads and writes (sriov.md 1, 2.3, 2.4.1, 7).

The shells' error texts are pinned too: Debian's sh (dash) reports every failed write as "I/O error", bash
prints the errno's text.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import MountFn, write_errno
from vgpuctl.host import HostRoot

pytestmark = pytest.mark.fuse

INTEL_PF = "0000:00:02.0"
INTEL_VFS = [f"0000:00:02.{n}" for n in range(1, 8)]
NVIDIA_PF = "0000:41:00.0"
MIB = 1024 * 1024
CONTROL = "/.vgpuctl-sim-control"


def dev(root: HostRoot, address: str = INTEL_PF) -> Path:
    return root.path(f"/sys/bus/pci/devices/{address}")


def read(path: Path) -> str:
    return path.read_text().removesuffix("\n")


def shell(shell_name: str, script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shell_name, "-c", script], capture_output=True, text=True, timeout=timeout)


def echo(value: str, path: Path) -> subprocess.CompletedProcess[str]:
    return shell("sh", f"echo {value} > {path}")


def control(root: HostRoot, command: str) -> None:
    root.path(CONTROL).write_text(command + "\n")


def vf_addresses(root: HostRoot, address: str = INTEL_PF) -> list[str]:
    base = dev(root, address)
    links = sorted((p for p in base.iterdir() if p.name.startswith("virtfn")), key=lambda p: int(p.name[6:]))
    return [os.readlink(p).removeprefix("../") for p in links]


def driver_of(root: HostRoot, address: str) -> str | None:
    link = dev(root, address) / "driver"
    return os.readlink(link).rsplit("/", 1)[-1] if os.path.lexists(link) else None


# ---------------------------------------------------------------- the generic layer (sriov.md 1.1-1.3, 7.1)


def test_pf_attributes_their_modes_and_values(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    pf = dev(root)
    expected = {"sriov_totalvfs": ("7", 0o444), "sriov_numvfs": ("0", 0o644), "sriov_offset": ("1", 0o444),
                "sriov_stride": ("1", 0o444), "sriov_vf_device": ("4680", 0o444),
                "sriov_drivers_autoprobe": ("1", 0o644), "sriov_vf_total_msix": ("0", 0o444),
                "driver_override": ("(null)", 0o644)}
    for name, (value, mode) in expected.items():
        assert (read(pf / name), stat.S_IMODE((pf / name).stat().st_mode)) == (value, mode), name
    assert (read(pf / "vendor"), read(pf / "device"), read(pf / "class")) == ("0x8086", "0x4680", "0x030000")
    assert driver_of(root, INTEL_PF) == "i915"
    assert vf_addresses(root) == []
    assert write_errno(pf / "sriov_totalvfs", "3") == errno.EACCES  # 0444, even for root


@pytest.mark.parametrize(("value", "code"), [
    ("abc", errno.EINVAL), ("-1", errno.EINVAL), ("7 7", errno.EINVAL), ("", errno.EINVAL),
    ("65536", errno.ERANGE), ("99999999999", errno.ERANGE), ("8", errno.ERANGE), ("0x8", errno.ERANGE),
])
def test_numvfs_parse_errors(mount_host: MountFn, value: str, code: int) -> None:
    root = mount_host("adl-sriov")
    assert write_errno(dev(root) / "sriov_numvfs", value + "\n") == code
    assert read(dev(root) / "sriov_numvfs") == "0"


def test_enable_makes_vfs_with_links_ids_and_groups(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    done = echo("7", dev(root) / "sriov_numvfs")
    assert (done.returncode, done.stderr) == (0, "")
    assert read(dev(root) / "sriov_numvfs") == "7"
    assert vf_addresses(root) == INTEL_VFS  # routing ID = PF's + offset 1 + stride 1 * i
    assert os.readlink(dev(root) / "virtfn0") == "../0000:00:02.1"
    groups = set()
    for address in INTEL_VFS:
        vf = dev(root, address)
        assert os.readlink(vf / "physfn") == "../0000:00:02.0"
        assert (read(vf / "vendor"), read(vf / "device"), read(vf / "class")) == ("0x8086", "0x4680", "0x038000")
        assert read(vf / "driver_override") == "(null)"
        assert not any(p.name.startswith("sriov_") for p in vf.iterdir())  # no sriov_* on a VF
        link = os.readlink(vf / "iommu_group")
        group = link.removeprefix("../../../kernel/iommu_groups/")
        assert group.isdigit(), link
        groups.add(group)
        assert root.path(f"/sys/kernel/iommu_groups/{group}/devices/{address}").exists()
        assert driver_of(root, address) == "i915"  # the host's i915 takes them (autoprobe on)
    assert len(groups) == 7  # one IOMMU group per VF
    assert len((dev(root, INTEL_VFS[0]) / "config").read_bytes()) == 4096
    assert (root.path("/dev/dri/card7").exists(), root.path("/dev/dri/renderD135").exists()) == (True, True)
    uevents = root.path("/.vgpuctl-sim-uevents").read_text()
    assert "ACTION=add DEVPATH=/devices/pci0000:00/0000:00:02.7 SUBSYSTEM=pci" in uevents


def test_same_count_is_a_no_op_other_counts_busy_until_zero(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    numvfs = dev(root) / "sriov_numvfs"
    assert write_errno(numvfs, "0") == 0  # N == current: nothing happens
    assert echo("7", numvfs).returncode == 0
    assert write_errno(numvfs, "7\n") == 0
    assert write_errno(numvfs, "3\n") == errno.EBUSY
    busy = shell("bash", f"echo 3 > {numvfs}")
    assert (busy.returncode, busy.stderr) == (1, "bash: line 1: echo: write error: Device or resource busy\n")
    dash = echo("3", numvfs)
    assert (dash.returncode, dash.stderr) == (1, "sh: 1: echo: echo: I/O error\n")
    assert shell("sh", f"echo 0 > {numvfs} && echo 3 > {numvfs}").returncode == 0
    assert vf_addresses(root) == INTEL_VFS[:3]
    assert not dev(root, INTEL_VFS[3]).exists()


def test_range_and_garbage_texts_from_the_shells(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    numvfs = dev(root) / "sriov_numvfs"
    assert shell("bash", f"echo 8 > {numvfs}").stderr.endswith("write error: Numerical result out of range\n")
    assert shell("bash", f"echo x > {numvfs}").stderr.endswith("write error: Invalid argument\n")


def test_enomem_when_the_firmware_left_no_mmio_for_vf_bars(mount_host: MountFn) -> None:
    # xe does not check the VF BARs at probe: pci_enable_sriov() finds them missing (i915-dkms goes native).
    root = mount_host("b60-xe", sriov={"mmio_ok": False})
    done = shell("bash", f"echo 7 > {dev(root, '0000:03:00.0') / 'sriov_numvfs'}")
    assert done.stderr.endswith("write error: Cannot allocate memory\n")
    assert vf_addresses(root, "0000:03:00.0") == []
    assert read(root.path("/sys/kernel/debug/dri/0/gt0/vf1/ggtt_quota")) == "0"  # shares taken back


def test_enoent_without_a_driver_or_without_sriov_configure(mount_host: MountFn) -> None:
    stock = mount_host("adl-stock-i915")  # mainline i915: bound, no sriov_configure; totalvfs stays 7
    assert read(dev(stock) / "sriov_totalvfs") == "7"
    assert not stock.path("/sys/module/i915/parameters/max_vfs").exists()
    assert shell("bash", f"echo 7 > {dev(stock) / 'sriov_numvfs'}").stderr.endswith(
        "write error: No such file or directory\n")
    root = mount_host("adl-sriov")
    assert write_errno(root.path("/sys/bus/pci/drivers/i915/unbind"), INTEL_PF) == 0
    assert driver_of(root, INTEL_PF) is None
    assert write_errno(dev(root) / "sriov_numvfs", "1") == errno.ENOENT
    assert write_errno(dev(root) / "sriov_numvfs", "0") == 0  # N == current wins over the driver check


def test_autoprobe_kstrtobool_and_binding_by_override(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    pf = dev(root)
    for bad in ("2", "x", "-", "\n"):
        assert write_errno(pf / "sriov_drivers_autoprobe", bad) == errno.EINVAL, bad
    for text, value in (("on", "1"), ("n", "0"), ("Y", "1"), ("off\n", "0")):
        assert write_errno(pf / "sriov_drivers_autoprobe", text) == 0
        assert read(pf / "sriov_drivers_autoprobe") == value
    assert echo("2", pf / "sriov_numvfs").returncode == 0
    assert [driver_of(root, a) for a in INTEL_VFS[:2]] == [None, None]  # autoprobe 0: nobody binds
    vf = dev(root, INTEL_VFS[0])
    probe = root.path("/sys/bus/pci/drivers_probe")
    assert write_errno(probe, INTEL_VFS[1]) == 0  # no driver may take it: no error, still unbound
    assert driver_of(root, INTEL_VFS[1]) is None
    assert write_errno(root.path("/sys/bus/pci/drivers/vfio-pci/bind"), INTEL_VFS[0]) == errno.ENODEV  # no match
    assert echo("vfio-pci", vf / "driver_override").returncode == 0
    assert read(vf / "driver_override") == "vfio-pci"
    assert write_errno(probe, INTEL_VFS[0]) == 0
    assert driver_of(root, INTEL_VFS[0]) == "vfio-pci"
    assert os.readlink(root.path(f"/sys/bus/pci/drivers/vfio-pci/{INTEL_VFS[0]}")).endswith("/0000:00:02.1")
    group = os.readlink(vf / "iommu_group").rsplit("/", 1)[-1]
    assert stat.S_ISCHR(os.lstat(root.path(f"/dev/vfio/{group}")).st_mode)
    (cdev,) = os.listdir(vf / "vfio-dev")
    assert read(vf / "vfio-dev" / cdev / "dev").startswith("510:")
    assert stat.S_ISCHR(os.lstat(root.path(f"/dev/vfio/devices/{cdev}")).st_mode)
    assert write_errno(root.path("/sys/bus/pci/drivers/i915/unbind"), INTEL_VFS[0]) == errno.ENODEV  # not i915's
    assert write_errno(root.path("/sys/bus/pci/drivers/vfio-pci/unbind"), INTEL_VFS[0]) == 0
    assert not root.path(f"/dev/vfio/{group}").exists()
    assert write_errno(vf / "driver_override", "\n") == 0  # a bare newline clears it
    assert read(vf / "driver_override") == "(null)"
    assert write_errno(probe, "0000:00:09.0") == errno.ENODEV


def test_new_id_binds_unbound_matches_and_refuses_a_duplicate(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    assert echo("2", dev(root) / "sriov_numvfs").returncode == 0
    assert write_errno(root.path("/sys/bus/pci/drivers/i915/unbind"), INTEL_VFS[1]) == 0
    new_id = root.path("/sys/bus/pci/drivers/vfio-pci/new_id")
    assert echo("'8086 4680'", new_id).returncode == 0
    # The VF's id is the PF's: the id catches every unbound function with it (the PF is held by i915).
    assert [driver_of(root, a) for a in (INTEL_PF, *INTEL_VFS[:2])] == ["i915", "i915", "vfio-pci"]
    assert write_errno(new_id, "8086 4680") == errno.EEXIST
    assert write_errno(new_id, "zz") == errno.EINVAL


def test_vfio_pci_refuses_a_pf_with_vfs_enabled(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    assert echo("1", dev(root) / "sriov_numvfs").returncode == 0
    assert write_errno(root.path("/sys/bus/pci/drivers/i915/unbind"), INTEL_PF) == 0
    assert write_errno(dev(root) / "driver_override", "vfio-pci") == 0
    bind = root.path("/sys/bus/pci/drivers/vfio-pci/bind")
    assert write_errno(bind, INTEL_PF) == errno.EBUSY
    assert write_errno(bind, INTEL_VFS[0]) == errno.EBUSY  # bound to i915 already
    assert write_errno(bind, "0000:00:09.0") == errno.ENODEV


# ---------------------------------------------------------------- the VM side: an open VF blocks a disable (1.4, 7.5)


def _vfio_vf(root: HostRoot, address: str = INTEL_VFS[0]) -> None:
    pf = dev(root)
    assert write_errno(pf / "sriov_drivers_autoprobe", "0") == 0
    assert echo("2", pf / "sriov_numvfs").returncode == 0
    assert write_errno(dev(root, address) / "driver_override", "vfio-pci") == 0
    assert write_errno(root.path("/sys/bus/pci/drivers_probe"), address) == 0


def test_disable_and_reads_block_while_a_vf_is_open(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    _vfio_vf(root)
    assert write_errno(root.path(CONTROL), "open 0000:00:02.2") == errno.EINVAL  # not on a VFIO driver
    assert write_errno(root.path(CONTROL), "open 0000:00:09.0") == errno.ENODEV
    control(root, f"open {INTEL_VFS[0]}")
    assert json.loads(root.path("/.vgpuctl-sim").read_text())["open_vfs"] == [INTEL_VFS[0]]
    numvfs = dev(root) / "sriov_numvfs"
    disable = subprocess.Popen(["sh", "-c", f"echo 0 > {numvfs}"], stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    assert disable.poll() is None  # blocked in the vfio request loop
    reads: list[str] = []
    reader = threading.Thread(target=lambda: reads.append(read(numvfs)))
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive() and reads == []  # the read waits for the device lock too
    assert read(dev(root, INTEL_VFS[1]) / "vendor") == "0x8086"  # the rest of the host still answers
    control(root, f"close {INTEL_VFS[0]}")
    assert disable.wait(10) == 0
    reader.join(10)
    assert reads == ["0"]
    assert vf_addresses(root) == []
    assert write_errno(root.path(CONTROL), f"close {INTEL_VFS[0]}") == errno.EINVAL


def test_a_blocked_disable_gives_up_after_the_test_timeout(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov", sriov={"block_timeout_s": 0.5})
    _vfio_vf(root)
    control(root, f"open {INTEL_VFS[0]}")
    started = time.monotonic()
    done = shell("bash", f"echo 0 > {dev(root) / 'sriov_numvfs'}")
    assert 0.4 < time.monotonic() - started < 5
    assert done.stderr.endswith("write error: Interrupted system call\n")
    assert read(dev(root) / "sriov_numvfs") == "2"


# ---------------------------------------------------------------- Intel i915-sriov-dkms (2.2-2.4.1, 7.2)


@pytest.mark.parametrize("preset_name", ["adl-sriov-nomaxvfs", "adl-sriov-noguc"])
def test_no_pf_mode_without_max_vfs_or_guc_gives_erange(mount_host: MountFn, preset_name: str) -> None:
    root = mount_host(preset_name)
    assert read(dev(root) / "sriov_totalvfs") == "0"
    assert shell("bash", f"echo 2 > {dev(root) / 'sriov_numvfs'}").stderr.endswith(
        "write error: Numerical result out of range\n")
    assert not root.path("/sys/class/drm/card0/prelim_iov").exists()


def test_module_parameters_and_a_reboot_from_modprobe_d(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov-nomaxvfs")
    params = root.path("/sys/module/i915/parameters")
    assert (read(params / "max_vfs"), read(params / "enable_guc")) == ("0", "3")
    assert stat.S_IMODE((params / "max_vfs").stat().st_mode) == 0o400
    root.path("/etc/modprobe.d/i915-sriov.conf").write_text("options i915 max_vfs=4\n")
    control(root, "reboot")
    assert (read(params / "max_vfs"), read(dev(root) / "sriov_totalvfs")) == ("4", "4")
    assert echo("4", dev(root) / "sriov_numvfs").returncode == 0
    control(root, "reboot")
    assert (read(dev(root) / "sriov_numvfs"), vf_addresses(root)) == ("0", [])  # VFs do not survive a boot
    assert not dev(root, INTEL_VFS[0]).exists()


PRELIM = "/sys/class/drm/card0/prelim_iov"


def quotas(root: HostRoot, vf: int) -> tuple[int, int, int]:
    gt = root.path(f"{PRELIM}/vf{vf}/gt0")
    return tuple(int(read(gt / f"{n}_quota")) for n in ("ggtt", "contexts", "doorbells"))  # type: ignore[return-value]


def test_prelim_iov_tree(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    base = root.path(PRELIM)
    assert read(base / "mode") == "SR-IOV PF"
    assert sorted(p.name for p in base.iterdir()) == ["mode", "pf", *[f"vf{n}" for n in range(1, 8)]]
    assert os.path.realpath(base / "pf" / "device") == str(root.path("/sys/devices/pci0000:00/0000:00:02.0"))
    assert read(base / "pf" / "auto_provisioning") == "1"
    assert read(base / "vf3" / "id") == "3"
    assert stat.S_IMODE((base / "vf1" / "control").stat().st_mode) == 0o200
    assert stat.S_IMODE((base / "vf1" / "gt0" / "state").stat().st_mode) == 0o600
    assert not os.path.lexists(base / "vf1" / "device")  # only while the VF is enabled
    available = base / "pf" / "gt0" / "available"
    assert int(read(available / "ggtt_free")) == (3328 - 64) * MIB
    assert int(read(available / "contexts_free")) == 65536 - 8192 - 256
    assert int(read(available / "doorbells_free")) == 256


@pytest.mark.parametrize(("count", "shares"), [
    (7, (488935424, 8064, 36)),  # (3328 - 64) MiB / 7, 4 KiB aligned ~ 466 MiB; (65536 - 8192 - 256)/7 -> 128s
    (2, (1711276032, 28544, 128)),
    (1, (3422552064, 57088, 256)),
])
def test_fair_shares_at_enable_and_released_at_disable(mount_host: MountFn, count: int,
                                                       shares: tuple[int, int, int]) -> None:
    root = mount_host("adl-sriov")
    assert echo(str(count), dev(root) / "sriov_numvfs").returncode == 0
    assert [quotas(root, n) for n in range(1, count + 1)] == [shares] * count
    assert all(quotas(root, n) == (0, 0, 0) for n in range(count + 1, 8))
    assert os.readlink(root.path(f"{PRELIM}/vf{count}/device")).endswith(f"/0000:00:02.{count}")
    assert echo("0", dev(root) / "sriov_numvfs").returncode == 0
    assert quotas(root, 1) == (0, 0, 0)
    assert not os.path.lexists(root.path(f"{PRELIM}/vf1/device"))


def test_enospc_when_a_fair_share_rounds_to_zero(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov", sriov={"ggtt_free_mib": 64})  # nothing left above the spare
    assert shell("bash", f"echo 7 > {dev(root) / 'sriov_numvfs'}").stderr.endswith(
        "write error: No space left on device\n")
    assert vf_addresses(root) == []


def test_provisioning_knobs_and_their_errors(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    pf, vf1 = root.path(f"{PRELIM}/pf"), root.path(f"{PRELIM}/vf1")
    numvfs = dev(root) / "sriov_numvfs"
    assert write_errno(vf1 / "gt0" / "contexts_quota", "65536") == errno.ERANGE  # u16
    assert write_errno(vf1 / "gt0" / "ggtt_quota", "lots") == errno.EINVAL
    assert write_errno(vf1 / "control", "explode") == errno.EINVAL
    assert write_errno(vf1 / "control", "stop\n") == 0
    assert write_errno(pf / "gt0" / "ggtt_spare", str(MIB)) == errno.EINVAL  # below 64 MiB
    assert write_errno(pf / "gt0" / "contexts_spare", "100") == errno.EINVAL
    assert write_errno(pf / "auto_provisioning", "maybe") == errno.EINVAL
    # A quota set while auto-provisioning is on: the enable finds a provisioned VF.
    assert write_errno(vf1 / "gt0" / "ggtt_quota", str(256 * MIB)) == 0
    assert shell("bash", f"echo 2 > {numvfs}").stderr.endswith("write error: Structure needs cleaning\n")
    assert write_errno(pf / "auto_provisioning", "0") == 0  # 1 -> 0 always
    assert write_errno(pf / "auto_provisioning", "1") == errno.ESTALE  # 0 -> 1 with a quota set
    # Auto off, VF1 only half provisioned (no contexts): ENOKEY.
    assert shell("bash", f"echo 1 > {numvfs}").stderr.endswith("write error: Required key not available\n")
    assert write_errno(vf1 / "gt0" / "contexts_quota", "1024") == 0
    assert write_errno(numvfs, "1") == 0  # all valid: the given provisioning is used
    assert quotas(root, 1) == (256 * MIB, 1024, 0)
    assert write_errno(numvfs, "0") == 0
    assert quotas(root, 1) == (256 * MIB, 1024, 0)  # not auto-provisioned: kept


def test_n100_is_the_same_on_adl_n(mount_host: MountFn) -> None:
    root = mount_host("n100-sriov")
    assert (read(dev(root) / "device"), read(dev(root) / "sriov_vf_device")) == ("0x46d0", "46d0")
    assert echo("7", dev(root) / "sriov_numvfs").returncode == 0
    assert vf_addresses(root) == INTEL_VFS
    assert read(dev(root, INTEL_VFS[6]) / "device") == "0x46d0"


# ---------------------------------------------------------------- NVIDIA vendor-specific VFIO (3.2-3.4, 7.4)


def sriov_manage(root: HostRoot, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(root.path("/usr/lib/nvidia/sriov-manage")), *args], capture_output=True,
                          text=True, timeout=60)


def nv(root: HostRoot, vf: int) -> Path:
    return dev(root, vf_addresses(root, NVIDIA_PF)[vf]) / "nvidia"


def creatable(root: HostRoot, vf: int) -> list[str]:
    lines = (nv(root, vf) / "creatable_vgpu_types").read_text().splitlines()
    assert lines[0] == "ID    : vGPU Name"
    return lines[1:]


def test_nvidia_pf_and_the_refused_raw_write(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    pf = dev(root, NVIDIA_PF)
    assert (read(pf / "vendor"), read(pf / "device"), read(pf / "class")) == ("0x10de", "0x26b9", "0x030200")
    assert (read(pf / "sriov_totalvfs"), read(pf / "sriov_offset"), read(pf / "sriov_stride")) == ("32", "4", "1")
    assert driver_of(root, NVIDIA_PF) == "nvidia" and not (pf / "nvidia").exists()
    assert shell("bash", f"echo 4 > {pf / 'sriov_numvfs'}").stderr.endswith("write error: Operation not permitted\n")
    other = mount_host("l40s-vfio", sriov={"numvfs_errno": errno.ENOENT})
    assert write_errno(dev(other, NVIDIA_PF) / "sriov_numvfs", "4") == errno.ENOENT


def test_sriov_manage_enables_all_vfs_on_nvidia(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    done = sriov_manage(root, "-e", "ALL")
    assert (done.returncode, done.stdout, done.stderr) == (0, "Enabling VFs on 0000:41:00.0\n", "")
    vfs = vf_addresses(root, NVIDIA_PF)
    assert len(vfs) == 32
    assert vfs[:5] == ["0000:41:00.4", "0000:41:00.5", "0000:41:00.6", "0000:41:00.7", "0000:41:01.0"]
    assert vfs[-1] == "0000:41:04.3"
    assert sriov_manage(root, "-e", NVIDIA_PF).returncode == 0  # idempotent
    for address in (vfs[0], vfs[31]):
        assert driver_of(root, address) == "nvidia"
        assert sorted(os.listdir(dev(root, address) / "nvidia")) == [
            "creatable_vgpu_types", "current_vgpu_type", "gpu_instance_id", "placement_id", "vgpu_params",
            "warm_update"]
        (cdev,) = os.listdir(dev(root, address) / "vfio-dev")
        assert root.path(f"/dev/vfio/devices/{cdev}").exists()
    assert read(nv(root, 0) / "current_vgpu_type") == "0"
    assert sriov_manage(root, "-x", "ALL").returncode == 1
    off = sriov_manage(root, "-d", "ALL")
    assert (off.returncode, off.stdout) == (0, "Disabling VFs on 0000:41:00.0\n")
    assert vf_addresses(root, NVIDIA_PF) == []


def test_types_are_placed_homogeneously(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    assert sriov_manage(root, "-e", "ALL").returncode == 0
    assert "1163 : NVIDIA L40S-48Q" in creatable(root, 0) and "1155 : NVIDIA L40S-1Q" in creatable(root, 0)
    assert len(creatable(root, 0)) == 16
    assert write_errno(nv(root, 0) / "current_vgpu_type", "1163") == 0  # 48Q takes the card
    assert (read(nv(root, 0) / "current_vgpu_type"), creatable(root, 0), creatable(root, 1)) == ("1163", [], [])
    assert write_errno(nv(root, 1) / "current_vgpu_type", "1155") == errno.EINVAL
    assert read(nv(root, 1) / "current_vgpu_type") == "0"
    assert write_errno(nv(root, 0) / "current_vgpu_type", "1160") == errno.EBUSY  # another id: write 0 first
    assert write_errno(nv(root, 0) / "current_vgpu_type", "0") == 0
    assert write_errno(nv(root, 0) / "current_vgpu_type", "1159") == 0  # 8Q: siblings keep 8 GiB types only
    assert creatable(root, 1) == ["1159 : NVIDIA L40S-8Q", "1172 : NVIDIA L40S-8C"]
    assert write_errno(nv(root, 0) / "current_vgpu_type", "junk") == errno.EINVAL
    assert write_errno(nv(root, 0) / "vgpu_params", "frame_rate_limiter=0") == 0
    assert read(nv(root, 0) / "vgpu_params") == "frame_rate_limiter=0"
    assert write_errno(nv(root, 1) / "vgpu_params", "frame_rate_limiter=0") == errno.EBUSY  # no type yet


def test_release_is_refused_while_open_and_shortly_after(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    assert sriov_manage(root, "-e", "ALL").returncode == 0
    vf = vf_addresses(root, NVIDIA_PF)[0]
    current = nv(root, 0) / "current_vgpu_type"
    assert write_errno(current, "1159") == 0
    control(root, f"open {vf}")
    release = shell("bash", f"echo 0 > {current}")
    assert release.stderr.endswith("write error: Operation not permitted\n")
    refused = sriov_manage(root, "-d", "ALL")
    assert (refused.returncode, refused.stderr) == (1, "Cannot obtain unbindLock for 0000:41:00.0\n")
    control(root, f"close {vf}")
    assert write_errno(current, "0") == errno.EPERM  # still releasing (0.3 s by default)
    deadline = time.monotonic() + 5
    while write_errno(current, "0") == errno.EPERM:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert read(current) == "0"
    assert sriov_manage(root, "-d", "ALL").returncode == 0


def test_a_gpu_held_by_dcgm_keeps_its_unbind_lock(mount_host: MountFn) -> None:
    root = mount_host("h200-vfio")
    control(root, "dcgm on")
    done = sriov_manage(root, "-e", "ALL")
    assert (done.returncode, done.stderr) == (1, "Cannot obtain unbindLock for 0000:41:00.0\n")
    control(root, "dcgm off")
    assert sriov_manage(root, "-e", "ALL").returncode == 0
    assert creatable(root, 0)[0] == "1428 : NVIDIA H200X-141C"


def test_rebinding_an_nvidia_vf_breaks_it_until_sriov_is_cycled(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    assert sriov_manage(root, "-e", "ALL").returncode == 0
    vf = vf_addresses(root, NVIDIA_PF)[0]
    assert write_errno(root.path("/sys/bus/pci/drivers/nvidia/unbind"), vf) == 0
    assert write_errno(dev(root, vf) / "driver_override", "vfio-pci") == 0
    assert write_errno(root.path("/sys/bus/pci/drivers/vfio-pci/bind"), vf) == errno.EINVAL
    assert write_errno(dev(root, vf) / "driver_override", "nvidia") == 0
    assert write_errno(root.path("/sys/bus/pci/drivers/nvidia/bind"), vf) == errno.EINVAL
    assert driver_of(root, vf) is None
    assert sriov_manage(root, "-d", "ALL").returncode == 0
    assert sriov_manage(root, "-e", "ALL").returncode == 0
    assert driver_of(root, vf) == "nvidia" and read(nv(root, 0) / "current_vgpu_type") == "0"


def test_modprobe_d_in_name_order_later_wins_and_a_dev_null_link_masks(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov-nomaxvfs")
    conf = root.path("/etc/modprobe.d")
    (conf / "a-sriov.conf").write_text("options i915 max_vfs=2\n")
    (conf / "b-sriov.conf").write_text("options i915 max_vfs=5\n")
    (conf / "c-notes.txt").write_text("options i915 max_vfs=1\n")  # not a .conf: not read
    control(root, "reboot")
    assert read(dev(root) / "sriov_totalvfs") == "5"
    (conf / "b-sriov.conf").unlink()
    (conf / "b-sriov.conf").symlink_to("/dev/null")
    control(root, "reboot")
    assert read(dev(root) / "sriov_totalvfs") == "2"


# ---------------------------------------------------------------- Intel xe (2.2-2.4.4, 7.3)

XE_PF = "0000:03:00.0"
DRI = "/sys/kernel/debug/dri/0"


@pytest.mark.parametrize(("count", "shares"), [
    (1, (2048 * MIB, 32768, 128)), (2, (1024 * MIB, 16384, 64)), (3, (1024 * MIB, 16384, 64)),
    (4, (512 * MIB, 8192, 32)), (7, (512 * MIB, 8192, 32)),
])
def test_xe_fair_provisioning_in_debugfs(mount_host: MountFn, count: int, shares: tuple[int, int, int]) -> None:
    root = mount_host("b60-xe")
    assert read(dev(root, XE_PF) / "sriov_totalvfs") == "24"
    assert read(root.path("/sys/module/xe/parameters/max_vfs")) == "4294967295"
    assert echo(str(count), dev(root, XE_PF) / "sriov_numvfs").returncode == 0
    for vf in (1, count):
        gt = root.path(f"{DRI}/gt0/vf{vf}")  # the compat link into sriov/vfN/tile0/gt0
        assert tuple(int(read(gt / f"{n}_quota")) for n in ("ggtt", "contexts", "doorbells")) == shares
        # LMEM (pf_estimate_fair_lmem): 24 GiB less the PF's 128 MiB spare, split, 2 MiB aligned
        assert int(read(gt / "lmem_quota")) == 24448 * MIB // count // (2 * MIB) * (2 * MIB)
    assert read(root.path(f"{DRI}/gt0/vf{count + 1}/ggtt_quota")) == "0"
    assert echo("0", dev(root, XE_PF) / "sriov_numvfs").returncode == 0
    assert read(root.path(f"{DRI}/gt0/vf1/ggtt_quota")) == "0"  # auto mode: released
    assert read(root.path(f"{DRI}/gt0/vf1/lmem_quota")) == "0"


def test_xe_sriov_admin_and_xe_vfio_pci(mount_host: MountFn) -> None:
    root = mount_host("b60-xe")
    admin = dev(root, XE_PF) / "sriov_admin"
    assert "vf24" in os.listdir(admin) and ".bulk_profile" in os.listdir(admin)
    assert shell("sh", f"ls {admin}").stdout.split() == sorted(["pf", *[f"vf{n}" for n in range(1, 25)]])
    assert read(admin / "pf" / "profile" / "sched_priority") == "[low] normal high"
    assert read(admin / "vf1" / "profile" / "sched_priority") == "[low] normal"
    assert stat.S_IMODE((admin / "vf1" / "profile" / "sched_priority").stat().st_mode) == 0o444
    assert write_errno(admin / ".bulk_profile" / "sched_priority", "high") == errno.EINVAL
    assert write_errno(admin / "pf" / "profile" / "sched_priority", "normal") == 0
    assert read(admin / "vf1" / "profile" / "sched_priority") == "low [normal]"
    assert write_errno(admin / "vf2" / "profile" / "exec_quantum_ms", "999999") == 0
    assert read(admin / "vf2" / "profile" / "exec_quantum_ms") == "100000"  # silently clamped
    assert write_errno(admin / ".bulk_profile" / "preempt_timeout_us", "x") == errno.EINVAL
    assert not os.path.lexists(admin / "vf1" / "device")
    configfs = root.path(f"/sys/kernel/config/xe/{XE_PF}/sriov/max_vfs")
    assert (read(configfs), write_errno(configfs, "2")) == ("unlimited", errno.EBUSY)  # bound: EBUSY
    assert write_errno(dev(root, XE_PF) / "sriov_drivers_autoprobe", "0") == 0
    assert echo("2", dev(root, XE_PF) / "sriov_numvfs").returncode == 0
    vf = "0000:03:00.1"
    assert os.path.realpath(admin / "vf1" / "device") == os.path.realpath(dev(root, vf))
    assert driver_of(root, vf) is None
    assert write_errno(dev(root, vf) / "driver_override", "xe-vfio-pci") == 0
    assert write_errno(root.path("/sys/bus/pci/drivers_probe"), vf) == 0
    assert driver_of(root, vf) == "xe-vfio-pci"
    assert os.listdir(dev(root, vf) / "vfio-dev")


def test_xe_kernel_eras(mount_host: MountFn) -> None:
    old = mount_host("b60-xe", kernel="6.18.0")  # PF by default, but no sriov_admin before 6.19
    assert read(dev(old, XE_PF) / "sriov_totalvfs") == "24"
    assert not (dev(old, XE_PF) / "sriov_admin").exists()
    assert old.path(f"{DRI}/gt0/vf1/ggtt_quota").exists()
    older = mount_host("b60-xe", kernel="6.16.0")  # BMG not a PF before 6.17
    assert read(dev(older, XE_PF) / "sriov_totalvfs") == "0"
    new = mount_host("b60-xe", kernel="7.0.0")
    assert (dev(new, XE_PF) / "sriov_admin" / "vf1" / "profile" / "vram_quota").exists()


def test_xe_custom_provisioning_is_kept_over_a_disable(mount_host: MountFn) -> None:
    root = mount_host("b60-xe")
    quota = root.path(f"{DRI}/gt0/vf1/ggtt_quota")
    assert write_errno(quota, str(256 * MIB)) == 0  # by hand: custom mode, no auto-provisioning
    assert echo("1", dev(root, XE_PF) / "sriov_numvfs").returncode == 0
    assert read(quota) == str(256 * MIB)
    assert read(root.path(f"{DRI}/gt0/vf1/contexts_quota")) == "0"
    assert echo("0", dev(root, XE_PF) / "sriov_numvfs").returncode == 0
    assert read(quota) == str(256 * MIB)


def test_xe_platforms_without_sriov(mount_host: MountFn) -> None:
    b580 = mount_host("b580-xe")  # no SR-IOV capability at all
    assert driver_of(b580, XE_PF) == "xe"
    assert not any(name.startswith("sriov_") for name in os.listdir(dev(b580, XE_PF)))
    mtl = mount_host("mtl-xe")  # capability, but xe's platform lacks has_sriov
    assert read(dev(mtl, INTEL_PF) / "sriov_totalvfs") == "0"
    assert write_errno(dev(mtl, INTEL_PF) / "sriov_numvfs", "1") == errno.ERANGE


# ---------------------------------------------------------------- the kernel log and legacy assignment


def dmesg(root: HostRoot) -> list[str]:
    return root.path("/.vgpuctl-sim-dmesg").read_text().splitlines()


def test_the_kernel_log_of_enable_disable_and_a_blocked_disable(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    assert dmesg(root) == ["i915 0000:00:02.0: 7 VFs could be associated with this PF"]
    _vfio_vf(root)
    assert write_errno(dev(root) / "sriov_numvfs", "3") == errno.EBUSY
    control(root, f"open {INTEL_VFS[0]}")
    disable = subprocess.Popen(["sh", "-c", f"echo 0 > {dev(root) / 'sriov_numvfs'}"])
    time.sleep(0.2)
    control(root, f"close {INTEL_VFS[0]}")
    assert disable.wait(10) == 0
    assert dmesg(root)[1:] == [
        "i915 0000:00:02.0: Enabled 2 VFs",
        "i915 0000:00:02.0: 2 VFs already enabled. Disable before enabling 3 VFs",
        "i915 0000:00:02.0: VF1 FLR",
        "vfio-pci 0000:00:02.1: Relaying device request to user (#0)",
        "i915 0000:00:02.0: Disabled 2 VFs",
    ]
    control(root, "reboot")
    assert dmesg(root) == ["i915 0000:00:02.0: 7 VFs could be associated with this PF"]  # a new boot's log


def test_failures_in_the_kernel_log(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov", sriov={"ggtt_free_mib": 64})
    assert write_errno(dev(root) / "sriov_numvfs", "7") == errno.ENOSPC
    assert dmesg(root)[-1] == "i915 0000:00:02.0: Failed to enable 7 VFs (-ENOSPC)"
    assert write_errno(root.path("/sys/bus/pci/drivers/i915/unbind"), INTEL_PF) == 0
    assert write_errno(dev(root) / "sriov_numvfs", "1") == errno.ENOENT
    assert dmesg(root)[-1] == "pci 0000:00:02.0: no driver bound to device; cannot configure SR-IOV"
    old = mount_host("adl-stock-i915", kernel="5.15.0")
    assert write_errno(dev(old) / "sriov_numvfs", "1") == errno.ENOENT
    assert dmesg(old)[-1] == "i915 0000:00:02.0: Driver does not support SRIOV configuration via sysfs"
    xe = mount_host("b60-xe")
    assert echo("2", dev(xe, XE_PF) / "sriov_numvfs").returncode == 0
    assert dmesg(xe) == ["xe 0000:03:00.0: Running in SR-IOV PF mode", "xe 0000:03:00.0: Enabled 2 of 24 VFs"]
    assert dmesg(mount_host("mtl-xe")) == ["xe 0000:00:02.0: Support for SR-IOV is not available"]


def test_i915_refuses_to_disable_assigned_vfs(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    assert echo("2", dev(root) / "sriov_numvfs").returncode == 0
    control(root, f"assign {INTEL_VFS[1]}")
    assert shell("bash", f"echo 0 > {dev(root) / 'sriov_numvfs'}").stderr.endswith(
        "write error: Operation not permitted\n")
    assert dmesg(root)[-1] == "i915 0000:00:02.0: Can't disable 2 VFs, 1 are still assigned"
    control(root, f"unassign {INTEL_VFS[1]}")
    assert write_errno(dev(root) / "sriov_numvfs", "0") == 0
