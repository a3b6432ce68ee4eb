"""The simulator's model in-process: GVT-g accounting, the mdev core's errnos, kernel eras, vendors."""

from __future__ import annotations

import errno

import pytest

from vgpuctl.backends.gvt_platforms import worked_examples
from vgpuctl.sim.host import SimHost

TYPES = "/sys/class/mdev_bus/0000:00:02.0/mdev_supported_types"
U1 = "11111111-2222-3333-4444-555555555555"
U2 = "11111111-2222-3333-4444-666666666666"


def available(host: SimHost, parent_types: str = TYPES) -> dict[str, int]:
    return {
        t.removeprefix("i915-"): int(host.read_text(f"{parent_types}/{t}/available_instances"))
        for t in host.listdir(parent_types)
    }


def create(host: SimHost, type_id: str, uuid: str, parent_types: str = TYPES) -> None:
    host.write(f"{parent_types}/{type_id}/create", uuid + "\n")


def errno_of(call: object) -> int:
    assert callable(call)
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno is not None
    return info.value.errno


@pytest.mark.parametrize("aperture", [128, 256, 512, 1024, 2048])
def test_available_instances_match_the_spec_worked_examples(aperture: int) -> None:
    expected = worked_examples()["by_aperture_MiB"][str(aperture)]
    host = SimHost.from_preset("coffeelake", aperture_mib=aperture)
    assert sorted(host.listdir(TYPES)) == sorted(f"i915-{t}" for t in expected["types"])
    assert available(host) == expected["available"]


@pytest.mark.parametrize("example", worked_examples()["after_create"], ids=lambda e: str(e["created"]))
def test_available_instances_after_creates_match_the_spec(example: dict[str, object]) -> None:
    host = SimHost.from_preset("coffeelake", aperture_mib=example["aperture_MiB"])
    created = example["created"]
    assert isinstance(created, list)
    for index, name in enumerate(created):
        create(host, f"i915-{name}", f"00000000-0000-0000-0000-{index:012d}")
    assert available(host) == example["available"]


def test_seven_vgpu_cap_then_enospc_and_remove_gives_resources_back() -> None:
    host = SimHost.from_preset("coffeelake", aperture_mib=1024)
    uuids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(8)]
    for uuid in uuids[:7]:
        create(host, "i915-GVTg_V5_8", uuid)
    assert available(host) == {"GVTg_V5_8": 0, "GVTg_V5_4": 0, "GVTg_V5_2": 0, "GVTg_V5_1": 0}
    assert errno_of(lambda: create(host, "i915-GVTg_V5_8", uuids[7])) == errno.ENOSPC
    ids = sorted(int(host.read_text(f"/sys/bus/mdev/devices/{u}/intel_vgpu/vgpu_id")) for u in uuids[:7])
    assert ids == [1, 2, 3, 4, 5, 6, 7]
    host.write(f"/sys/bus/mdev/devices/{uuids[3]}/remove", "1\n")
    assert available(host)["GVTg_V5_8"] == 1
    create(host, "i915-GVTg_V5_8", uuids[7])  # the freed id 4 is reused
    assert host.read_text(f"/sys/bus/mdev/devices/{uuids[7]}/intel_vgpu/vgpu_id") == "4\n"


def test_id_cap_is_enforced_even_when_pools_have_room() -> None:
    host = SimHost.from_preset("coffeelake", aperture_mib=1024)
    host.parents["0000:00:02.0"].fences = 64  # type: ignore[attr-defined]  # lift the fence cap
    for i in range(7):
        create(host, "i915-GVTg_V5_8", f"00000000-0000-0000-0000-{i:012d}")
    assert errno_of(lambda: create(host, "i915-GVTg_V5_8", U1)) == errno.ENOSPC


@pytest.mark.parametrize(
    "text",
    ["", "1234", U1[:-1], U1 + "\n\n", U1.replace("-", "x"), "g" + U1[1:], U1[:8] + U1[9:] + "0"],
)
def test_create_rejects_bad_uuids_with_einval(text: str) -> None:
    host = SimHost.from_preset("coffeelake")
    assert errno_of(lambda: host.write(f"{TYPES}/i915-GVTg_V5_8/create", text)) == errno.EINVAL
    assert host.listdir("/sys/bus/mdev/devices") == []


def test_upper_case_uuid_is_created_lower_case_and_without_newline() -> None:
    host = SimHost.from_preset("coffeelake")
    host.write(f"{TYPES}/i915-GVTg_V5_8/create", U1.upper())
    assert host.listdir("/sys/bus/mdev/devices") == [U1]


def test_duplicate_uuid_is_eexist_across_parents_on_6x_and_per_parent_on_4_10() -> None:
    for kernel in ("6.8.0", "4.10.10"):
        host = SimHost.from_preset("samples", kernel=kernel)
        mtty = "/sys/class/mdev_bus/mtty/mdev_supported_types"
        create(host, "mtty-1", U1, mtty)
        assert errno_of(lambda h=host, m=mtty: create(h, "mtty-2", U1.upper(), m)) == errno.EEXIST


def test_duplicate_uuid_on_another_parent() -> None:
    host = SimHost.from_preset("samples")
    create(host, "mtty-1", U1, "/sys/class/mdev_bus/mtty/mdev_supported_types")
    mbochs = "/sys/class/mdev_bus/mbochs/mdev_supported_types"
    assert errno_of(lambda: create(host, "mbochs-small", U1, mbochs)) == errno.EEXIST


@pytest.mark.parametrize("text", ["x", "1x", "-1", "", "0x", "1 2"])
def test_remove_rejects_non_numbers(text: str) -> None:
    host = SimHost.from_preset("coffeelake")
    create(host, "i915-GVTg_V5_8", U1)
    assert errno_of(lambda: host.write(f"/sys/bus/mdev/devices/{U1}/remove", text)) == errno.EINVAL
    assert host.exists(f"/sys/bus/mdev/devices/{U1}")


def test_remove_zero_is_a_no_op_and_nonzero_destroys_everything() -> None:
    host = SimHost.from_preset("coffeelake")
    create(host, "i915-GVTg_V5_8", U1)
    group = host.readlink(f"/sys/bus/mdev/devices/{U1}/iommu_group").rsplit("/", 1)[1]
    assert host.exists(f"/dev/vfio/{group}")
    host.write(f"/sys/bus/mdev/devices/{U1}/remove", "0\n")
    assert host.exists(f"/sys/bus/mdev/devices/{U1}")
    host.write(f"/sys/bus/mdev/devices/{U1}/remove", "0x1")
    for path in (f"/sys/bus/mdev/devices/{U1}", f"{TYPES}/i915-GVTg_V5_8/devices/{U1}",
                 f"/dev/vfio/{group}", f"/sys/kernel/iommu_groups/{group}",
                 f"/sys/devices/pci0000:00/0000:00:02.0/{U1}"):
        assert not host.exists(path), path
    assert available(host) == {"GVTg_V5_8": 2, "GVTg_V5_4": 1}


def test_device_directory_and_links() -> None:
    host = SimHost.from_preset("coffeelake")
    create(host, "i915-GVTg_V5_4", U1)
    dev = f"/sys/bus/mdev/devices/{U1}"
    assert host.readlink(dev) == f"../../../devices/pci0000:00/0000:00:02.0/{U1}"
    assert host.readlink(f"{dev}/mdev_type") == "../mdev_supported_types/i915-GVTg_V5_4"
    assert host.readlink(f"{dev}/driver").endswith("bus/mdev/drivers/intel_vgpu_mdev")
    assert host.readlink(f"{TYPES}/i915-GVTg_V5_4/devices/{U1}") == f"../../../{U1}"
    assert host.readlink("/sys/class/mdev_bus/0000:00:02.0") == "../../devices/pci0000:00/0000:00:02.0"
    assert set(host.listdir(dev)) >= {"remove", "mdev_type", "driver", "iommu_group", "intel_vgpu"}
    assert host.read_text(f"{dev}/intel_vgpu/vgpu_id") == "1\n"
    # Through the symlinked parent directory, as tools such as mdevctl walk it.
    assert host.read_text(f"{dev}/mdev_type/available_instances") == "0\n"


def test_first_mdev_group_follows_the_pci_groups() -> None:
    with_iommu = SimHost.from_preset("coffeelake")
    create(with_iommu, "i915-GVTg_V5_8", U1)
    assert with_iommu.readlink(f"/sys/bus/mdev/devices/{U1}/iommu_group").endswith("iommu_groups/2")
    without = SimHost.from_preset("coffeelake", cmdline="root=/dev/sda1 ro i915.enable_gvt=1")
    create(without, "i915-GVTg_V5_8", U1)
    assert without.readlink(f"/sys/bus/mdev/devices/{U1}/iommu_group").endswith("iommu_groups/0")


def test_type_attributes_text_and_modes() -> None:
    host = SimHost.from_preset("coffeelake")
    base = f"{TYPES}/i915-GVTg_V5_4"
    assert host.read_text(f"{base}/description") == (
        "low_gm_size: 128MB\nhigh_gm_size: 512MB\nfence: 4\nresolution: 1920x1200\nweight: 4\n"
    )
    assert host.read_text(f"{base}/name") == "GVTg_V5_4\n"
    assert host.read_text(f"{base}/device_api") == "vfio-pci\n"
    assert host.vfs.stat(f"{base}/create")["st_mode"] & 0o777 == 0o200
    assert host.vfs.stat(f"{base}/available_instances")["st_mode"] & 0o777 == 0o444
    assert errno_of(lambda: host.read(f"{base}/create")) == errno.EACCES
    assert errno_of(lambda: host.write(f"{base}/available_instances", "3")) == errno.EACCES


def test_broadwell_types_are_v4() -> None:
    host = SimHost.from_preset("broadwell")
    assert host.listdir(TYPES) == ["i915-GVTg_V4_4", "i915-GVTg_V4_8"]


@pytest.mark.parametrize("name", ["geminilake", "icelake", "tigerlake", "alderlake", "amd"])
def test_unsupported_gpus_expose_no_mdev_types(name: str) -> None:
    host = SimHost.from_preset(name)
    assert not host.exists(TYPES)
    assert not host.exists("/sys/class/mdev_bus/0000:00:02.0")
    assert host.exists("/sys/bus/pci/devices/0000:00:02.0/device")


def test_unsupported_gpu_on_old_kernel_cannot_load_kvmgt() -> None:
    assert "kvmgt" not in SimHost.from_preset("icelake", kernel="5.15.0").modules  # ENODEV on <= 5.18
    assert "kvmgt" in SimHost.from_preset("icelake", kernel="6.8.0").modules  # loads, registers nothing


@pytest.mark.parametrize(
    ("kernel", "lines", "has_name", "driver", "vfio_mdev_module"),
    [
        ("4.10.10", 3, False, "vfio_mdev", True),
        ("4.11.0", 4, False, "vfio_mdev", True),
        ("4.14.0", 5, False, "vfio_mdev", True),
        ("5.13.0", 5, False, "vfio_mdev", True),
        ("5.15.0", 5, False, "vfio_mdev", False),
        ("5.19.0", 5, True, "intel_vgpu_mdev", False),
        ("6.8.0", 5, True, "intel_vgpu_mdev", False),
    ],
)
def test_kernel_eras(kernel: str, lines: int, has_name: bool, driver: str, vfio_mdev_module: bool) -> None:
    host = SimHost.from_preset("skylake", kernel=kernel)
    type_id = host.listdir(TYPES)[0]
    assert host.read_text(f"{TYPES}/{type_id}/description").count("\n") == lines
    assert host.exists(f"{TYPES}/{type_id}/name") == has_name
    create(host, type_id, U1)
    assert host.readlink(f"/sys/bus/mdev/devices/{U1}/driver").endswith(f"/{driver}")
    assert ("vfio_mdev" in host.read_text("/proc/modules")) == vfio_mdev_module


def test_4_10_type_scheme() -> None:
    host = SimHost.from_preset("skylake", kernel="4.10.10", aperture_mib=512)
    assert host.listdir(TYPES) == ["i915-GVTg_V5_1", "i915-GVTg_V5_2", "i915-GVTg_V5_4"]
    assert host.read_text(f"{TYPES}/i915-GVTg_V5_4/description") == (
        "low_gm_size: 32MB\nhigh_gm_size: 96MB\nfence: 4\n"
    )
    assert available(host)["GVTg_V5_4"] == 4  # capped by max_instance


def test_platform_support_by_kernel() -> None:
    assert not SimHost.from_preset("coffeelake", kernel="4.19.0").exists(TYPES)  # CFL needs 5.1
    assert SimHost.from_preset("coffeelake", kernel="5.4.0").exists(TYPES)
    assert not SimHost.from_preset("kabylake", kernel="4.12.0").exists(TYPES)
    assert SimHost.from_preset("kabylake", kernel="4.12.0", pci_id="8086:591d").exists(TYPES)


def test_pre_6_1_available_is_cached_without_fence_term_until_first_change() -> None:
    host = SimHost.from_preset("coffeelake", kernel="5.15.0", aperture_mib=1024)
    gvt = host.parents["0000:00:02.0"]
    gvt.fences = 12  # type: ignore[attr-defined]  # 8 usable fences: 2 vGPUs by fences
    assert available(host)["GVTg_V5_8"] == 7  # boot value ignores fences
    create(host, "i915-GVTg_V5_8", U1)
    assert available(host)["GVTg_V5_8"] == 1  # recomputed with all three terms


def test_mtty_ports_budget() -> None:
    host = SimHost.from_preset("samples")
    mtty = "/sys/class/mdev_bus/mtty/mdev_supported_types"
    assert available(host, mtty) == {"mtty-1": 24, "mtty-2": 12}
    assert not host.exists(f"{mtty}/mtty-1/description")
    assert host.read_text(f"{mtty}/mtty-2/name") == "Dual port serial\n"
    create(host, "mtty-2", U1, mtty)
    assert available(host, mtty) == {"mtty-1": 22, "mtty-2": 11}
    assert host.read_text(f"/sys/bus/mdev/devices/{U1}/vendor/sample_mdev_dev") == f"This is MDEV {U1}\n"
    assert host.readlink(f"/sys/bus/mdev/devices/{U1}") == f"../../../devices/virtual/mtty/mtty/{U1}"


@pytest.mark.parametrize(("kernel", "code"), [("6.8.0", errno.EUSERS), ("5.15.0", errno.ENOMEM)])
def test_mdpy_count_exhausted(kernel: str, code: int) -> None:
    host = SimHost.from_preset("samples", kernel=kernel)
    mdpy = "/sys/class/mdev_bus/mdpy/mdev_supported_types"
    for i in range(4):
        create(host, "mdpy-vga", f"00000000-0000-0000-0000-{i:012d}", mdpy)
    assert available(host, mdpy) == {"mdpy-hd": 0, "mdpy-vga": 0, "mdpy-xga": 0}
    assert errno_of(lambda: create(host, "mdpy-hd", U1, mdpy)) == code
    assert host.read_text(f"{mdpy}/mdpy-hd/description") == "virtual display, 1920x1080 framebuffer"


def test_mbochs_memory_budget() -> None:
    host = SimHost.from_preset("samples")
    mbochs = "/sys/class/mdev_bus/mbochs/mdev_supported_types"
    assert available(host, mbochs) == {"mbochs-large": 4, "mbochs-medium": 16, "mbochs-small": 64}
    for i in range(4):
        create(host, "mbochs-large", f"00000000-0000-0000-0000-{i:012d}", mbochs)
    assert errno_of(lambda: create(host, "mbochs-small", U1, mbochs)) == errno.ENOSPC


def test_nvidia_time_sliced_gpu_is_homogeneous() -> None:
    host = SimHost.from_preset("nvidia-t4")
    (parent,) = host.listdir("/sys/class/mdev_bus")
    types = f"/sys/class/mdev_bus/{parent}/mdev_supported_types"
    assert host.read_text(f"{types}/nvidia-231/name") == "GRID T4-2Q\n"
    assert available(host, types)["nvidia-231"] == 8
    assert available(host, types)["nvidia-234"] == 1
    create(host, "nvidia-231", U1, types)
    counts = available(host, types)
    assert counts["nvidia-231"] == 7
    assert all(v == 0 for k, v in counts.items() if k != "nvidia-231")
    assert errno_of(lambda: create(host, "nvidia-230", U2, types)) == errno.ENOSPC
    host.write(f"/sys/bus/mdev/devices/{U1}/remove", "1")
    assert available(host, types)["nvidia-230"] == 16


def test_host_facts_follow_the_preset_and_overrides() -> None:
    ready = SimHost.from_preset("coffeelake")
    assert "i915.enable_gvt=1" in ready.read_text("/proc/cmdline")
    assert ready.read_text("/sys/module/i915/parameters/enable_gvt") == "Y\n"
    assert ready.read_text("/sys/module/kvm/parameters/ignore_msrs") == "Y\n"
    assert "CONFIG_DRM_I915_GVT_KVMGT=m" in ready.read_text("/boot/config-6.8.0")
    assert ready.read_text("/proc/sys/kernel/osrelease") == "6.8.0\n"
    assert ready.read_text("/sys/bus/pci/devices/0000:00:02.0/vendor") == "0x8086\n"
    assert ready.read_text("/sys/bus/pci/devices/0000:00:02.0/device") == "0x3e92\n"
    bar2 = ready.read_text("/sys/bus/pci/devices/0000:00:02.0/resource").splitlines()[2].split()
    assert int(bar2[1], 16) - int(bar2[0], 16) + 1 == 256 * 1024 * 1024
    assert ready.exists("/dev/kvm") and ready.exists("/dev/vfio/vfio")

    bare = SimHost.from_preset("coffeelake-bare")
    assert "kvmgt" not in bare.read_text("/proc/modules")
    assert bare.read_text("/sys/module/i915/parameters/enable_gvt") == "N\n"
    assert not bare.exists(TYPES)

    no_kvmgt = SimHost.from_preset("coffeelake", modules=["i915", "mdev", "vfio", "kvm", "kvm_intel"])
    assert not no_kvmgt.exists(TYPES) and no_kvmgt.exists("/sys/bus/pci/devices/0000:00:02.0/gvt_firmware")
    no_config = SimHost.from_preset("coffeelake", kconfig=["CONFIG_DRM_I915_GVT_KVMGT=n"])
    assert "KVMGT" not in no_config.read_text("/boot/config-6.8.0") and not no_config.exists(TYPES)
    guc = SimHost.from_preset("coffeelake", cmdline="ro i915.enable_gvt=1 i915.enable_guc=1")
    assert not guc.exists(TYPES) and guc.read_text("/sys/module/i915/parameters/enable_guc") == "1\n"


def test_kvm_ignore_msrs_is_writable_at_runtime_like_the_real_param() -> None:
    host = SimHost.from_preset("coffeelake", cmdline="ro i915.enable_gvt=1")
    param = "/sys/module/kvm/parameters/ignore_msrs"
    assert host.read_text(param) == "N\n"
    host.write(param, "1\n")
    assert host.read_text(param) == "Y\n"
    assert errno_of(lambda: host.write(param, "maybe")) == errno.EINVAL


@pytest.mark.parametrize("bad", [{"kernel": "six"}, {"pci_id": "zz"}, {"aperture_mib": 300},
                                 {"kconfig": ["VFIO=n"]}])
def test_bad_overrides_say_what_to_do(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"e\.g\.|must"):
        SimHost.from_preset("coffeelake", **bad)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ValueError, match="coffeelake"):
        SimHost.from_preset("nope")


def test_etc_is_plain_writable_storage_but_sys_is_not() -> None:
    host = SimHost.from_preset("coffeelake")
    host.vfs.mkdir("/etc/mdevctl.d/0000:00:02.0", 0o755)
    host.vfs.create(f"/etc/mdevctl.d/0000:00:02.0/.{U1}.tmp", 0o644)
    host.write(f"/etc/mdevctl.d/0000:00:02.0/.{U1}.tmp", b"{}")
    host.vfs.rename(f"/etc/mdevctl.d/0000:00:02.0/.{U1}.tmp", f"/etc/mdevctl.d/0000:00:02.0/{U1}")
    assert host.read(f"/etc/mdevctl.d/0000:00:02.0/{U1}") == b"{}"
    assert errno_of(lambda: host.vfs.create("/sys/bus/mdev/devices/x", 0o644)) == errno.EPERM
    assert errno_of(lambda: host.vfs.unlink(f"{TYPES}/i915-GVTg_V5_4/create")) == errno.EACCES
