"""sriov.md's errnos and worked examples (§1, §2.3, §2.4.4, §7; §0.1 first), each through the mounted simulator.

Plain file reads and writes (``open``/``write``, ``sh -c "echo N > sriov_numvfs"``). Where each one is tested
(S = tests/test_sim_sriov.py, V = tests/test_vm_vf.py, here = this file; test names
without their ``test_``; section, errno or example -> test):

1.1     modes and values of the PF files; EACCES writing 0444 -> S pf_attributes_their_modes_and_values
1.1     `sriov_vf_device` lower-case hex without 0x (`46d0`) -> S n100_is_the_same_on_adl_n
1.1     autoprobe kstrtobool, else EINVAL -> S autoprobe_kstrtobool…; here autoprobe_takes_what_kstrtobool_takes
1.1     PF unbound: totalvfs back to the hardware's; "driver left SR-IOV enabled" -> here
        totalvfs_is_the_hardware_s_once_the_pf_driver_is_gone
1.1     stock i915: totalvfs 7, `echo 7` ENOENT -> S enoent_without_a_driver…
1.1     max_vfs above TotalVFs: the driver clamps (pci_sriov_set_totalvfs's EINVAL not reached) -> here
        max_vfs_above_the_hardware_s_is_clamped
1.2.1   kstrtou16(base 0): EINVAL, ERANGE, +, 0x, octal, one newline, NUL, u64 overflow -> S numvfs_parse_errors; here
        numvfs_parse_rules
1.2.1-6 the errnos through sh (dash: "I/O error") and bash (strerror) -> here numvfs_errnos_through_the_shells
1.2.2-3 ERANGE/EINVAL come before the device lock -> not observable: the model checks first, but FUSE serializes
        writes to one file (inode lock)
1.2.3   N == current: success, even without a driver -> S same_count_is_a_no_op…, enoent_without_a_driver…
1.2.4   ENOENT and its message per kernel era, bound and unbound -> S failures_in_the_kernel_log; here
        enoent_message_per_kernel_era
1.2.5   N == 0: the driver's disable errno (i915 EPERM) -> S i915_refuses_to_disable_assigned_vfs
1.2.6   EBUSY + "%d VFs already enabled…"; write 0 then N -> S same_count_is_a_no_op…, the_kernel_log…
1.2.7   "%d VFs requested; only %d enabled" -> not emulated: no simulated driver enables fewer
1.2.8   ENOMEM "not enough MMIO resources for SR-IOV" -> S enomem_when_the_firmware…; here enomem_is_logged
1.2.8   ENOMEM bus out of range / IOV BARs, EINVAL, EIO, ENOSYS -> not emulated (not reachable by a write; §7.1 asks
        only for MMIO)
1.3     routing ID = PF + offset + stride·i: 00:02.1-7, 41:00.4…41:04.3 -> S enable_makes_vfs…,
        sriov_manage_enables_all…
1.3     other offsets: RTX PRO 6000 `virtfn0` = `../0001:04:00.2`; a bus crossed -> here
        vf_addresses_follow_offset_and_stride
1.3     virtfnN 0-based, physfn, VF vendor/device, own IOMMU group each -> S enable_makes_vfs…
1.3     uevents: add per VF, then change on the PF -> here enable_sends_add_per_vf_then_change_on_the_pf
1.3     autoprobe 0: nobody binds; override still probed; blocked probe ENODEV -> S autoprobe…; here
        a_blocked_probe_is_enodev
1.4     disable and reads block while a VF is open; "Relaying device request" -> S disable_and_reads_block…,
        the_kernel_log…
1.4     i915 EPERM for assigned VFs; xe has no such check -> S i915_refuses…; here xe_disables_assigned_vfs
1.5     driver_override, new_id EEXIST, vfio-pci EBUSY on a PF with VFs, bind ENODEV/EBUSY, unbind ENODEV -> S
        autoprobe…, new_id…, vfio_pci_refuses…
1.5     NVIDIA VFs must not be rebound (EINVAL) -> S rebinding_an_nvidia_vf…
0.1     xe-vfio-pci binds only through driver_override -> S xe_sriov_admin_and_xe_vfio_pci; here
        xe_vfio_pci_binds_only_by_override
2.3     i915 ENODEV when not PF mode -> unreachable by a write: totalvfs is 0, ERANGE first (S no_pf_mode…)
2.3     i915 PF status EBUSY (init) / EIO (wedged), "Failed to enable" -> here i915_enable_fails_with_the_pf_status
2.3     i915 ENOSPC, EUCLEAN, ENOKEY, valid config used, "Enabled/Disabled %u VFs" -> S enospc…, provisioning_knobs…,
        the_kernel_log…
2.3     i915 auto off, nothing provisioned: enable trusts late provisioning -> here
        i915_without_auto_provisioning_enables_empty_vfs
2.3     i915 "VF%u FLR" when vfio-pci resets a VF at VM start -> S the_kernel_log…
2.2/7.2 i915-dkms without VF BARs goes native: totalvfs 0, ERANGE -> here i915_without_vf_bars_is_native
2.3     xe ENODEV / N<0 EINVAL / ERANGE -> unreachable / kstrtou16 / S xe_platforms_without_sriov
2.3     xe EBUSY, ENOSPC + "Failed to enable…", "Enabled %u of %u", "Disabled %u" -> S failures_in_the_kernel_log;
        here xe_enable_errors_and_log
2.3     xe EUCLEAN (auto mode, a VF provisioned), custom→auto EBUSY -> not reachable: a quota write switches to custom
        and no file switches back [I]
2.3     xe custom mode keeps provisioning over a disable -> S xe_custom_provisioning…
2.4.4   xe profiles N=1,2,3,4,7 -> S xe_fair_provisioning_in_debugfs
2.4.4   xe profiles N=5…57 (GGTT 56 MiB above 56 VFs; contexts, doorbells) -> here xe_fair_profiles_up_to_63_vfs
2.4.4   estimate wins on an iGPU (3328 MiB free, N=7 → 466 MiB, 4 KiB aligned) -> here xe_estimate_wins_on_an_igpu
2.4.4   Intel's toolkit profiles; admin-only PF -> not kernel behaviour / no admin-only mode in the simulator
7.1     VF directory files; no sriov_* on a VF -> S enable_makes_vfs…; here vf_directory
7.1     driver_override: (null), a name, cut at the first newline/NUL, empty clears, a page EINVAL -> here
        driver_override_is_cut_at_the_first_newline
7.1     ENOMEM, blocked disable, EINTR at the simulator's timeout -> S enomem…, a_blocked_disable_gives_up…
7.1     EACCES reading 0200 / writing 0444 -> S pf_attributes…; here permissions_are_enforced
7.2     PF identity, max_vfs/enable_guc 0400, prelim_iov tree, 7-VF shares 466 MiB/8064/36 -> S prelim_iov_tree,
        fair_shares…, module_parameters…; here permissions_are_enforced
7.2     i915 contexts kept by the PF for T = totalvfs (T=7: 8192; T=4: 13108) -> S prelim_iov_tree; here
        pf_contexts_follow_totalvfs
7.3     max_vfs 4294967295, configfs `unlimited`, EBUSY while bound, read at probe -> S xe_sriov_admin…; here
        xe_configfs_max_vfs_is_read_at_probe
7.3     kernel eras, sriov_admin, brackets, clamps, compat links, unsupported platforms -> S xe_sriov_admin…,
        xe_kernel_eras, xe_platforms_without_sriov; here permissions_are_enforced
7.3     sriov_admin EINVAL, then EPERM/EIO (store), EUCLEAN (show): knobs admin_store/show_errno -> here
        xe_sriov_admin_errors
7.3     variant igpu-xe needs xe.force_probe (knob xe_force_probe); "!id" blocks -> here
        xe_binds_an_igpu_only_with_force_probe, xe_force_probe_can_block_a_supported_platform
7.4     PF identity, raw write EPERM/ENOENT, sriov-manage -e/-d, unbindLock, types, EPERM release -> S nvidia_pf…,
        sriov_manage…, types…, release…, a_gpu_held_by_dcgm…
7.4     nvidia/ modes and zero values; -d clears set types; own IOMMU groups -> here
        nvidia_vf_files_and_a_disable_with_types_set
7.4     EINVAL (not creatable) / EBUSY (another id) [U]: preset knobs -> S types_are_placed…; here
        nvidia_type_errnos_are_knobs
7.5     open/close counted, "VFn FLR" on open, open VFs in the marker -> S disable_and_reads_block…, the_kernel_log…
7.5     `/dev/vfio` fds held by the simulated QEMU -> not emulated: device nodes on a FUSE mount do not open; product
        code reads `open_vfs`
7.5     Intel VF display refused, NVIDIA VF display allowed -> V the_preflight_refuses_a_vf_display… (product side)
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MountFn, write_errno
from vgpuctl.host import HostRoot

pytestmark = pytest.mark.fuse

INTEL_PF = "0000:00:02.0"
XE_PF = "0000:03:00.0"
NVIDIA_PF = "0000:41:00.0"
CONTROL = "/.vgpuctl-sim-control"
MIB = 1024 * 1024
DASH_ERROR = "sh: 1: echo: echo: I/O error\n"  # Debian's sh says this of every failed write


def pci(root: HostRoot, address: str = INTEL_PF) -> Path:
    return root.path(f"/sys/bus/pci/devices/{address}")


def value(path: Path) -> str:
    return path.read_text().removesuffix("\n")


def sh(script: str, shell: str = "sh") -> subprocess.CompletedProcess[str]:
    return subprocess.run([shell, "-c", script], capture_output=True, text=True, timeout=30)


def bash_error(code: int) -> str:
    return f"bash: line 1: echo: write error: {os.strerror(code)}\n"


def virtfns(root: HostRoot, address: str) -> list[str]:
    links = sorted((p for p in pci(root, address).iterdir() if p.name.startswith("virtfn")),
                   key=lambda p: int(p.name.removeprefix("virtfn")))
    return [os.readlink(p).removeprefix("../") for p in links]


def dmesg(root: HostRoot) -> list[str]:
    return root.path("/.vgpuctl-sim-dmesg").read_text().splitlines()


def driver(root: HostRoot, address: str) -> str | None:
    link = pci(root, address) / "driver"
    return os.readlink(link).rsplit("/", 1)[-1] if os.path.lexists(link) else None


def control(root: HostRoot, command: str) -> None:
    root.path(CONTROL).write_text(command + "\n")


# ---------------------------------------------------------------- 1.2: parsing and the errnos of sriov_numvfs


@pytest.mark.parametrize(("text", "code", "enabled"), [
    ("+3", 0, "3"), ("0x3", 0, "3"), ("0X2", 0, "2"), ("03", 0, "3"), ("3\n", 0, "3"), ("3\0junk", 0, "3"),
    ("010", errno.ERANGE, "0"),  # octal 8 > totalvfs 7
    ("08", errno.EINVAL, "0"), ("0x", errno.EINVAL, "0"), (" 3", errno.EINVAL, "0"), ("3 ", errno.EINVAL, "0"),
    ("3\n\n", errno.EINVAL, "0"), ("-0", errno.EINVAL, "0"), ("++3", errno.EINVAL, "0"), ("3.0", errno.EINVAL, "0"),
    ("65535", errno.ERANGE, "0"), ("65536x", errno.EINVAL, "0"),
    ("99999999999999999999x", errno.ERANGE, "0"),  # the digits overflow 64 bits: ERANGE before the garbage
])
def test_numvfs_parse_rules(mount_host: MountFn, text: str, code: int, enabled: str) -> None:
    root = mount_host("adl-sriov")
    assert write_errno(pci(root) / "sriov_numvfs", text) == code
    assert value(pci(root) / "sriov_numvfs") == enabled


# (preset, VFs enabled first, the value echoed, errno); the VFs count must be unchanged after a failure.
SHELL_CASES = [
    ("adl-sriov", 0, "3", 0),
    ("adl-sriov", 0, "8", errno.ERANGE),  # above totalvfs
    ("adl-sriov", 0, "65536", errno.ERANGE),  # above u16
    ("adl-sriov", 0, "three", errno.EINVAL),
    ("adl-sriov", 2, "3", errno.EBUSY),  # write 0 first
    ("adl-sriov-nomaxvfs", 0, "2", errno.ERANGE),  # i915.max_vfs=0: totalvfs 0
    ("adl-stock-i915", 0, "7", errno.ENOENT),  # mainline i915: no sriov_configure
    ("l40s-vfio", 0, "4", errno.EPERM),  # NVIDIA: only sriov-manage enables VFs
]


@pytest.mark.parametrize(("preset_name", "before", "text", "code"), SHELL_CASES)
def test_numvfs_errnos_through_the_shells(mount_host: MountFn, preset_name: str, before: int, text: str,
                                          code: int) -> None:
    root = mount_host(preset_name)
    address = NVIDIA_PF if preset_name == "l40s-vfio" else INTEL_PF
    numvfs = pci(root, address) / "sriov_numvfs"
    if before:
        assert sh(f"echo {before} > {numvfs}").returncode == 0
    dash = sh(f"echo {text} > {numvfs}")
    assert (dash.returncode, dash.stderr) == ((0, "") if code == 0 else (1, DASH_ERROR))
    expected = text if code == 0 else str(before)
    assert value(numvfs) == expected
    if code:
        bash = sh(f"echo {text} > {numvfs}", "bash")
        assert (bash.returncode, bash.stderr) == (1, bash_error(code))
        assert value(numvfs) == expected


@pytest.mark.parametrize(("preset_name", "kernel", "unbind", "line"), [
    ("adl-sriov", "6.8.0", True, "pci 0000:00:02.0: no driver bound to device; cannot configure SR-IOV"),
    ("adl-sriov", "5.15.0", True, "pci 0000:00:02.0: Driver does not support SRIOV configuration via sysfs"),
    ("adl-stock-i915", "6.8.0", False, "i915 0000:00:02.0: Driver does not support SRIOV configuration via sysfs"),
])
def test_enoent_message_per_kernel_era(mount_host: MountFn, preset_name: str, kernel: str, unbind: bool,
                                       line: str) -> None:
    root = mount_host(preset_name, kernel=kernel)
    if unbind:
        assert write_errno(root.path("/sys/bus/pci/drivers/i915/unbind"), INTEL_PF) == 0
    assert write_errno(pci(root) / "sriov_numvfs", "1") == errno.ENOENT
    assert dmesg(root)[-1] == line


def test_enomem_is_logged(mount_host: MountFn) -> None:
    root = mount_host("b60-xe", sriov={"mmio_ok": False})
    assert write_errno(pci(root, XE_PF) / "sriov_numvfs", "2") == errno.ENOMEM
    assert dmesg(root)[-2:] == ["xe 0000:03:00.0: not enough MMIO resources for SR-IOV",
                                "xe 0000:03:00.0: Failed to enable 2 VFs (-ENOMEM)"]


# ---------------------------------------------------------------- 1.1, 1.3-1.5: totalvfs, VFs, binding


def test_totalvfs_is_the_hardware_s_once_the_pf_driver_is_gone(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov-nomaxvfs")  # i915 set totalvfs to 0
    assert value(pci(root) / "sriov_totalvfs") == "0"
    assert write_errno(root.path("/sys/bus/pci/drivers/i915/unbind"), INTEL_PF) == 0
    assert value(pci(root) / "sriov_totalvfs") == "7"  # pci_iov_remove(): the capability's TotalVFs
    assert write_errno(root.path("/sys/bus/pci/drivers/i915/bind"), INTEL_PF) == 0
    assert value(pci(root) / "sriov_totalvfs") == "0"  # probed again: native again
    enabled = mount_host("adl-sriov")
    assert write_errno(pci(enabled) / "sriov_numvfs", "2") == 0
    assert write_errno(enabled.path("/sys/bus/pci/drivers/i915/unbind"), INTEL_PF) == 0
    assert dmesg(enabled)[-1] == "i915 0000:00:02.0: driver left SR-IOV enabled after remove"
    assert value(pci(enabled) / "sriov_numvfs") == "2"


def test_max_vfs_above_the_hardware_s_is_clamped(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov", cmdline="root=/dev/sda1 intel_iommu=on i915.enable_guc=3 i915.max_vfs=9")
    assert value(root.path("/sys/module/i915/parameters/max_vfs")) == "9"
    assert value(pci(root) / "sriov_totalvfs") == "7"  # min(max_vfs, TotalVFs)
    assert dmesg(root) == ["i915 0000:00:02.0: 7 VFs could be associated with this PF"]


@pytest.mark.parametrize(("address", "offset", "stride", "first", "last"), [
    ("0001:04:00.0", 2, 1, "0001:04:00.2", "0001:04:04.1"),  # RTX PRO 6000 Blackwell: virtfn0 -> ../0001:04:00.2
    ("0000:41:00.0", 0xFC, 1, "0000:41:1f.4", "0000:42:03.3"),  # routing IDs past devfn 0xff: the next bus
    ("0000:41:00.0", 8, 2, "0000:41:01.0", "0000:41:08.6"),
])
def test_vf_addresses_follow_offset_and_stride(mount_host: MountFn, address: str, offset: int, stride: int,
                                               first: str, last: str) -> None:
    root = mount_host("l40s-vfio", sriov={"address": address, "offset": offset, "stride": stride})
    assert (value(pci(root, address) / "sriov_offset"), value(pci(root, address) / "sriov_stride")) == (
        str(offset), str(stride))
    done = subprocess.run(["sh", str(root.path("/usr/lib/nvidia/sriov-manage")), "-e", address],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    vfs = virtfns(root, address)
    assert (len(vfs), vfs[0], vfs[-1]) == (32, first, last)
    assert os.readlink(pci(root, address) / "virtfn0") == f"../{first}"
    assert os.readlink(pci(root, last) / "physfn") == f"../{address}"


def test_enable_sends_add_per_vf_then_change_on_the_pf(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    log = root.path("/.vgpuctl-sim-uevents")
    seen = len(log.read_text().splitlines())
    assert write_errno(pci(root) / "sriov_numvfs", "2") == 0
    events = [line.split()[:2] for line in log.read_text().splitlines()[seen:]]
    adds_and_changes = [e for e in events if e[0] in ("ACTION=add", "ACTION=change")]
    assert adds_and_changes == [["ACTION=add", "DEVPATH=/devices/pci0000:00/0000:00:02.1"],
                                ["ACTION=add", "DEVPATH=/devices/pci0000:00/0000:00:02.2"],
                                ["ACTION=change", "DEVPATH=/devices/pci0000:00/0000:00:02.0"]]


def test_a_blocked_probe_is_enodev(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    assert write_errno(pci(root) / "sriov_drivers_autoprobe", "0") == 0
    assert write_errno(pci(root) / "sriov_numvfs", "1") == 0
    bind = root.path("/sys/bus/pci/drivers/i915/bind")
    assert write_errno(bind, "0000:00:02.1") == errno.ENODEV  # matches, but the PF's autoprobe is off
    assert write_errno(pci(root, "0000:00:02.1") / "driver_override", "i915") == 0
    assert write_errno(bind, "0000:00:02.1") == 0  # an override is probed all the same
    assert driver(root, "0000:00:02.1") == "i915"


@pytest.mark.parametrize(("text", "kept"), [
    ("vfio-pci", "vfio-pci"), ("vfio-pci\n", "vfio-pci"), ("vfio-pci\nxe", "vfio-pci"), ("vfio-pci\0xe", "vfio-pci"),
    ("\n", "(null)"), ("\nvfio-pci", "(null)"),
])
def test_driver_override_is_cut_at_the_first_newline(mount_host: MountFn, text: str, kept: str) -> None:
    root = mount_host("adl-sriov")
    assert write_errno(pci(root) / "sriov_numvfs", "1") == 0
    override = pci(root, "0000:00:02.1") / "driver_override"
    assert write_errno(override, "i915") == 0
    assert write_errno(override, text) == 0
    assert value(override) == kept
    assert write_errno(override, "x" * 4095) == errno.EINVAL  # no room for sysfs_emit()'s newline
    assert value(override) == kept


def test_autoprobe_takes_what_kstrtobool_takes(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    autoprobe = pci(root) / "sriov_drivers_autoprobe"
    for text, now in (("no", "0"), ("yes", "1"), ("of", "0"), ("On", "1"), ("0x1", "0"), ("10", "1")):
        assert write_errno(autoprobe, text) == 0, text  # only the first one or two characters count
        assert value(autoprobe) == now, text
    for text in ("o", "true", "2", "\n"):
        assert write_errno(autoprobe, text) == errno.EINVAL, text


def test_vf_directory(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    assert write_errno(pci(root) / "sriov_numvfs", "1") == 0
    vf = pci(root, "0000:00:02.1")
    names = set(os.listdir(vf))
    assert {"vendor", "device", "class", "subsystem_vendor", "subsystem_device", "physfn", "iommu_group",
            "driver", "driver_override", "reset", "config"} <= names
    assert not {n for n in names if n.startswith("sriov_") or n.startswith("virtfn")}
    assert (value(vf / "subsystem_vendor"), value(vf / "subsystem_device")) == ("0x8086", "0x4680")
    assert os.readlink(vf / "iommu_group").startswith("../../../kernel/iommu_groups/")


def test_xe_disables_assigned_vfs(mount_host: MountFn) -> None:
    root = mount_host("b60-xe")
    assert write_errno(pci(root, XE_PF) / "sriov_numvfs", "2") == 0
    control(root, "assign 0000:03:00.1")  # pci_vfs_assigned(): i915 would say EPERM, xe does not look
    assert sh(f"echo 0 > {pci(root, XE_PF) / 'sriov_numvfs'}").returncode == 0
    assert virtfns(root, XE_PF) == []


def test_xe_vfio_pci_binds_only_by_override(mount_host: MountFn) -> None:
    root = mount_host("b60-xe")
    assert write_errno(pci(root, XE_PF) / "sriov_drivers_autoprobe", "0") == 0
    assert write_errno(pci(root, XE_PF) / "sriov_numvfs", "1") == 0
    bind = root.path("/sys/bus/pci/drivers/xe-vfio-pci/bind")
    assert write_errno(bind, "0000:03:00.1") == errno.ENODEV  # PCI_DRIVER_OVERRIDE_DEVICE_VFIO: no id match
    assert write_errno(pci(root, "0000:03:00.1") / "driver_override", "xe-vfio-pci") == 0
    assert write_errno(bind, "0000:03:00.1") == 0
    assert driver(root, "0000:03:00.1") == "xe-vfio-pci"


# ---------------------------------------------------------------- 2.3: the drivers' enable and disable

PRELIM = "/sys/class/drm/card0/prelim_iov"


def i915_quotas(root: HostRoot, vf: int) -> tuple[int, ...]:
    gt = root.path(f"{PRELIM}/vf{vf}/gt0")
    return tuple(int(value(gt / f"{name}_quota")) for name in ("ggtt", "contexts", "doorbells"))


@pytest.mark.parametrize(("code", "name"), [(errno.EBUSY, "EBUSY"), (errno.EIO, "EIO")])
def test_i915_enable_fails_with_the_pf_status(mount_host: MountFn, code: int, name: str) -> None:
    root = mount_host("adl-sriov", sriov={"pf_status_errno": code})
    bash = sh(f"echo 2 > {pci(root) / 'sriov_numvfs'}", "bash")
    assert (bash.returncode, bash.stderr) == (1, bash_error(code))
    assert dmesg(root)[-1] == f"i915 0000:00:02.0: Failed to enable 2 VFs (-{name})"
    assert (virtfns(root, INTEL_PF), i915_quotas(root, 1)) == ([], (0, 0, 0))


def test_i915_without_auto_provisioning_enables_empty_vfs(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov")
    assert write_errno(root.path(f"{PRELIM}/pf/auto_provisioning"), "0") == 0
    assert sh(f"echo 2 > {pci(root) / 'sriov_numvfs'}").returncode == 0  # "trust late provisioning"
    assert (i915_quotas(root, 1), i915_quotas(root, 2)) == ((0, 0, 0), (0, 0, 0))
    assert len(virtfns(root, INTEL_PF)) == 2


def test_i915_without_vf_bars_is_native(mount_host: MountFn) -> None:
    root = mount_host("adl-sriov", sriov={"mmio_ok": False})  # pf_verify_readiness(): "VFs BAR not ready"
    assert value(pci(root) / "sriov_totalvfs") == "0"
    bash = sh(f"echo 1 > {pci(root) / 'sriov_numvfs'}", "bash")
    assert (bash.returncode, bash.stderr) == (1, bash_error(errno.ERANGE))
    assert not root.path(PRELIM).exists()


@pytest.mark.parametrize(("total", "pf_contexts"), [(7, 8192), (4, 13108), (1, 32768)])
def test_pf_contexts_follow_totalvfs(mount_host: MountFn, total: int, pf_contexts: int) -> None:
    # pf_assign_ctxs_for_pf(): the PF keeps 65536 - (65536 // (1 + T)) * T; the 256 spare comes off as well.
    root = mount_host("adl-sriov", cmdline=f"root=/dev/sda1 intel_iommu=on i915.enable_guc=3 i915.max_vfs={total}")
    free = int(value(root.path(f"{PRELIM}/pf/gt0/available/contexts_free")))
    assert free == 65536 - pf_contexts - 256


def test_xe_enable_errors_and_log(mount_host: MountFn) -> None:
    root = mount_host("b60-xe")
    numvfs = pci(root, XE_PF) / "sriov_numvfs"
    assert write_errno(numvfs, "2") == 0
    bash = sh(f"echo 3 > {numvfs}", "bash")
    assert (bash.returncode, bash.stderr) == (1, bash_error(errno.EBUSY))
    assert write_errno(numvfs, "0") == 0
    assert dmesg(root)[1:] == ["xe 0000:03:00.0: Enabled 2 of 24 VFs",
                               "xe 0000:03:00.0: 2 VFs already enabled. Disable before enabling 3 VFs",
                               "xe 0000:03:00.0: Disabled 2 VFs"]
    full = mount_host("b60-xe", sriov={"ggtt_free_mib": 64})  # nothing above the 64 MiB spare: fair GGTT 0
    bash = sh(f"echo 1 > {pci(full, XE_PF) / 'sriov_numvfs'}", "bash")
    assert (bash.returncode, bash.stderr) == (1, bash_error(errno.ENOSPC))
    assert dmesg(full)[-1] == "xe 0000:03:00.0: Failed to enable 1 VF (-ENOSPC)"
    assert virtfns(full, XE_PF) == []


def test_xe_configfs_max_vfs_is_read_at_probe(mount_host: MountFn) -> None:
    root = mount_host("b60-xe")
    configfs = root.path(f"/sys/kernel/config/xe/{XE_PF}/sriov/max_vfs")
    assert write_errno(root.path("/sys/bus/pci/drivers/xe/unbind"), XE_PF) == 0
    assert value(pci(root, XE_PF) / "sriov_totalvfs") == "24"  # the hardware's, with xe gone
    assert write_errno(configfs, "2") == 0  # unbound: accepted
    assert write_errno(root.path("/sys/bus/pci/drivers/xe/bind"), XE_PF) == 0
    assert (value(configfs), value(pci(root, XE_PF) / "sriov_totalvfs")) == ("2", "2")
    assert write_errno(configfs, "unlimited") == errno.EBUSY  # bound again


# ---------------------------------------------------------------- 2.4.4: xe's fair provisioning


def xe_quotas(root: HostRoot, vf: int) -> tuple[int, int, int]:
    gt = root.path(f"/sys/kernel/debug/dri/0/gt0/vf{vf}")
    ggtt, contexts, doorbells = (int(value(gt / f"{name}_quota")) for name in ("ggtt", "contexts", "doorbells"))
    return ggtt, contexts, doorbells


# N -> (GGTT, contexts, doorbells): the profiles win on a B60 with 3968 MiB of GGTT for VFs; the same steps as
# xe's KUnit test (xe_gt_sriov_pf_config_kunit.c: GGTT 56 MiB above 56 VFs, contexts 1K above 31, doorbells 4).
XE_PROFILES = {
    5: (512 * MIB, 8192, 32), 6: (512 * MIB, 8192, 32), 8: (256 * MIB, 4096, 16), 15: (128 * MIB, 4096, 16),
    16: (128 * MIB, 2048, 8), 29: (64 * MIB, 2048, 8), 32: (64 * MIB, 1024, 4), 56: (64 * MIB, 1024, 4),
    57: (56 * MIB, 1024, 4),
}


def test_xe_fair_profiles_up_to_63_vfs(mount_host: MountFn) -> None:
    root = mount_host("b60-xe", sriov={"total_vfs": 63})
    numvfs = pci(root, XE_PF) / "sriov_numvfs"
    shares = {}
    for count in XE_PROFILES:
        assert write_errno(numvfs, str(count)) == 0
        shares[count] = xe_quotas(root, count)
        assert xe_quotas(root, 1) == shares[count]
        assert write_errno(numvfs, "0") == 0
    assert shares == XE_PROFILES


IGPU_XE = {"device_id": 0x4680, "xe_has_sriov": True, "xe_force_probe": True}  # ADL-S under xe (7.3's igpu-xe)


@pytest.mark.parametrize(("count", "shares"), [
    (1, (2048 * MIB, 32768, 128)),  # the profile is smaller than (3328 - 64) MiB
    (7, (488935424, 8192, 32)),  # (3328 - 64) MiB / 7 = 466.3 MiB, 4 KiB aligned: below the 512 MiB profile
])
def test_xe_estimate_wins_on_an_igpu(mount_host: MountFn, count: int, shares: tuple[int, int, int]) -> None:
    # An Alder Lake-S iGPU under xe (sriov.md 7.3's "igpu-xe"; experimental, 0.1): 00:02.0, 7 VFs.
    root = mount_host("mtl-xe", sriov={**IGPU_XE, "ggtt_free_mib": 3328},
                      cmdline="root=/dev/sda1 intel_iommu=on xe.force_probe=4680")
    assert write_errno(pci(root) / "sriov_numvfs", str(count)) == 0
    assert xe_quotas(root, count) == shares


# ---------------------------------------------------------------- 7: files, modes, NVIDIA


def test_permissions_are_enforced(mount_host: MountFn) -> None:
    intel = mount_host("adl-sriov")
    params = intel.path("/sys/module/i915/parameters")
    assert {stat.S_IMODE((params / n).stat().st_mode) for n in ("enable_guc", "max_vfs")} == {0o400}
    with pytest.raises(PermissionError):
        intel.path(f"{PRELIM}/vf1/control").read_text()  # 0200
    assert write_errno(params / "max_vfs", "3") == errno.EACCES
    xe = mount_host("b60-xe")
    priority = pci(xe, XE_PF) / "sriov_admin" / "vf1" / "profile" / "sched_priority"
    assert write_errno(priority, "normal") == errno.EACCES  # 0444 for a VF: only the PF sets priorities
    with pytest.raises(PermissionError):
        (pci(xe, XE_PF) / "sriov_admin" / ".bulk_profile" / "exec_quantum_ms").read_text()  # 0200
    assert xe.path("/sys/kernel/debug/dri/0/gt0/vf1/lmem_quota").read_text() == "0\n"  # compat link to vram_quota


def sriov_manage(root: HostRoot, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(root.path("/usr/lib/nvidia/sriov-manage")), *args], capture_output=True,
                          text=True, timeout=60)


def test_nvidia_vf_files_and_a_disable_with_types_set(mount_host: MountFn) -> None:
    root = mount_host("l40s-vfio")
    assert sriov_manage(root, "-e", "ALL").returncode == 0
    vfs = virtfns(root, NVIDIA_PF)
    files = pci(root, vfs[0]) / "nvidia"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files.iterdir()}
    assert modes == {"creatable_vgpu_types": 0o444, "current_vgpu_type": 0o644, "gpu_instance_id": 0o644,
                     "placement_id": 0o644, "vgpu_params": 0o644, "warm_update": 0o644}
    assert [value(files / n) for n in ("current_vgpu_type", "gpu_instance_id", "placement_id", "warm_update",
                                       "vgpu_params")] == ["0", "0", "0", "0", ""]
    groups = {os.readlink(pci(root, vf) / "iommu_group") for vf in vfs}
    assert len(groups) == 32  # an IOMMU group each
    assert write_errno(files / "current_vgpu_type", "1159") == 0
    assert write_errno(pci(root, vfs[1]) / "nvidia" / "current_vgpu_type", "1159") == 0
    off = sriov_manage(root, "-d", NVIDIA_PF)  # clears every type, then disables
    assert (off.returncode, off.stderr) == (0, "")
    assert virtfns(root, NVIDIA_PF) == []
    assert sriov_manage(root, "-e", NVIDIA_PF).returncode == 0
    assert value(pci(root, vfs[1]) / "nvidia" / "current_vgpu_type") == "0"


@pytest.mark.parametrize(("knobs", "refused", "change"), [
    ({}, errno.EINVAL, errno.EBUSY),
    ({"type_refused_errno": errno.ENOSPC, "type_change_errno": errno.EPERM}, errno.ENOSPC, errno.EPERM),
])
def test_nvidia_type_errnos_are_knobs(mount_host: MountFn, knobs: dict[str, int], refused: int, change: int) -> None:
    root = mount_host("l40s-vfio", sriov=knobs)
    assert sriov_manage(root, "-e", "ALL").returncode == 0
    first, second = (pci(root, vf) / "nvidia" / "current_vgpu_type" for vf in virtfns(root, NVIDIA_PF)[:2])
    assert write_errno(first, "1163") == 0  # 48Q: the whole card
    assert write_errno(second, "1155") == refused
    assert value(second) == "0"
    assert write_errno(first, "1160") == change
    assert value(first) == "1163"


@pytest.mark.parametrize(("force_probe", "bound"), [("", False), ("4680", True), ("*", True), ("46a6,4680", True),
                                                    ("!4680", False)])
def test_xe_binds_an_igpu_only_with_force_probe(mount_host: MountFn, force_probe: str, bound: bool) -> None:
    cmdline = "root=/dev/sda1 intel_iommu=on" + (f" xe.force_probe={force_probe}" if force_probe else "")
    root = mount_host("mtl-xe", sriov=IGPU_XE, cmdline=cmdline)
    assert driver(root, INTEL_PF) == ("xe" if bound else None)
    if bound:
        assert dmesg(root) == ["xe 0000:00:02.0: Running in SR-IOV PF mode"]
        assert write_errno(pci(root) / "sriov_numvfs", "7") == 0
        return
    assert dmesg(root)[:3] == ["xe 0000:00:02.0: Your graphics device 4680 is not officially supported",
                               "by xe driver in this kernel version. To force Xe probe,",
                               "use xe.force_probe='4680' and i915.force_probe='!4680'"]
    assert value(pci(root) / "sriov_totalvfs") == "7"  # the capability's, no driver to lower it
    assert write_errno(pci(root) / "sriov_numvfs", "1") == errno.ENOENT


def test_xe_force_probe_can_block_a_supported_platform(mount_host: MountFn) -> None:
    root = mount_host("b60-xe", cmdline="root=/dev/sda1 intel_iommu=on xe.force_probe=!e211")
    assert driver(root, XE_PF) is None
    assert dmesg(root) == ["xe 0000:03:00.0: Probe blocked for device [8086:e211]."]


@pytest.mark.parametrize(("knobs", "store", "show"), [
    ({}, 0, 0),
    ({"admin_store_errno": errno.EPERM}, errno.EPERM, 0),  # not applicable on this HW/FW
    ({"admin_store_errno": errno.EIO}, errno.EIO, 0),  # the GuC refused
    ({"admin_show_errno": errno.EUCLEAN}, 0, errno.EUCLEAN),  # the GTs' values differ
])
def test_xe_sriov_admin_errors(mount_host: MountFn, knobs: dict[str, int], store: int, show: int) -> None:
    root = mount_host("b60-xe", sriov=knobs)
    admin = pci(root, XE_PF) / "sriov_admin"
    quantum = admin / "vf1" / "profile" / "exec_quantum_ms"
    assert write_errno(quantum, "x") == errno.EINVAL  # malformed: EINVAL whatever the fault
    assert write_errno(quantum, "25") == store
    assert write_errno(admin / ".bulk_profile" / "exec_quantum_ms", "25") == store
    if show:
        with pytest.raises(OSError) as raised:
            quantum.read_text()
        assert raised.value.errno == show
    else:
        assert value(quantum) == ("0" if store else "25")
