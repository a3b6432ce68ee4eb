"""Debian's real mdevctl 1.2.0 against a simulated host mounted over FUSE.

Every command runs in a private mount namespace in which the mount's ``sys`` and
``etc/mdevctl.d`` are bind-mounted over ``/sys`` and ``/etc/mdevctl.d``; the host's own
are untouched. Expected texts follow /work/shared/spec/peers.md section 1 (mdevctl 1.2.0:
every listing is printed with ``println!``, so it ends in one extra newline).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import (
    GVT_PARENT,
    MountFn,
    Result,
    available,
    config_bytes,
    in_namespace,
    mdevctl,
    mdevctl_ok,
    new_uuid,
    placement,
    why_mdevctl_cannot_run,
)

pytestmark = pytest.mark.mdevctl


V5_4 = "i915-GVTg_V5_4"
U1 = "11111111-2222-3333-4444-555555555555"
U2 = "22222222-2222-3333-4444-555555555555"
U3 = "33333333-2222-3333-4444-555555555555"



@pytest.fixture(autouse=True)
def _require_mdevctl() -> None:
    problem = why_mdevctl_cannot_run()
    if problem is not None:
        pytest.fail(problem)



def gvt_type(suffix: int, avail: int, low: int, high: int, resolution: str, weight: int) -> str:
    return (
        f"  i915-GVTg_V5_{suffix}\n"
        f"    Available instances: {avail}\n"
        "    Device API: vfio-pci\n"
        f"    Name: GVTg_V5_{suffix}\n"
        f"    Description: low_gm_size: {low}MB, high_gm_size: {high}MB, fence: 4, "
        f"resolution: {resolution}, weight: {weight}\n"
    )


GVT_1024_TYPES = (
    f"{GVT_PARENT}\n"
    + gvt_type(1, 1, 512, 2048, "1920x1200", 16)
    + gvt_type(2, 2, 256, 1024, "1920x1200", 8)
    + gvt_type(4, 5, 128, 512, "1920x1200", 4)
    + gvt_type(8, 7, 64, 384, "1024x768", 2)
    + "\n"
)



# ------------------------------------------------------------------------------ types


def test_types_text_for_gvt_on_1024_mib_aperture(mount_host: MountFn) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    # Types sorted by name, description lines joined by ", ", one extra newline at the end.
    assert mdevctl_ok(mdevctl(host, "types")) == GVT_1024_TYPES
    assert mdevctl_ok(mdevctl(host, "types", "-p", GVT_PARENT)) == GVT_1024_TYPES
    # An unknown parent is no error for `types`: an empty listing (a blank line) or [].
    assert mdevctl_ok(mdevctl(host, "types", "-p", "0000:00:02.1")) == "\n"
    assert mdevctl_ok(mdevctl(host, "types", "-p", "0000:00:02.1", "--dumpjson")) == "[]\n"


def test_types_dumpjson_for_gvt(mount_host: MountFn) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    out = mdevctl_ok(mdevctl(host, "types", "--dumpjson"))
    assert out.startswith("[\n  {\n") and out.endswith("\n]\n")
    expected = {
        "i915-GVTg_V5_1": (1, "low_gm_size: 512MB, high_gm_size: 2048MB, fence: 4, resolution: 1920x1200, weight: 16"),
        "i915-GVTg_V5_2": (2, "low_gm_size: 256MB, high_gm_size: 1024MB, fence: 4, resolution: 1920x1200, weight: 8"),
        "i915-GVTg_V5_4": (5, "low_gm_size: 128MB, high_gm_size: 512MB, fence: 4, resolution: 1920x1200, weight: 4"),
        "i915-GVTg_V5_8": (7, "low_gm_size: 64MB, high_gm_size: 384MB, fence: 4, resolution: 1024x768, weight: 2"),
    }
    assert json.loads(out) == [
        {
            GVT_PARENT: [
                {
                    type_id: {
                        "available_instances": avail,  # a JSON number, not a string
                        "device_api": "vfio-pci",
                        "name": type_id.removeprefix("i915-"),
                        "description": description,
                    }
                }
                for type_id, (avail, description) in expected.items()
            ]
        }
    ]


# ------------------------------------------------------------------------------ transient devices


def test_start_list_stop_a_transient_gvt_device(mount_host: MountFn) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    assert available(host, GVT_PARENT, V5_4) == 5

    uid = new_uuid(mdevctl_ok(mdevctl(host, "start", "-p", GVT_PARENT, "-t", V5_4)))
    device = host.mdev_device_dir(uid)
    assert host.exists(device)
    assert placement(host, uid) == (GVT_PARENT, V5_4)
    assert host.listdir(host.sys_bus_mdev_devices) == [uid]
    assert available(host, GVT_PARENT, V5_4) == 4
    assert "    Available instances: 4\n" in mdevctl_ok(mdevctl(host, "types", "-p", GVT_PARENT))
    assert not host.exists(f"/etc/mdevctl.d/{GVT_PARENT}/{uid}")  # transient: nothing written

    assert mdevctl_ok(mdevctl(host, "list")) == f"{uid} {GVT_PARENT} {V5_4} manual\n\n"
    assert mdevctl_ok(mdevctl(host, "list", "-p", GVT_PARENT)) == f"{uid} {GVT_PARENT} {V5_4} manual\n\n"
    assert mdevctl_ok(mdevctl(host, "list", "-d")) == "\n"  # not defined
    assert json.loads(mdevctl_ok(mdevctl(host, "list", "--dumpjson"))) == [
        {GVT_PARENT: [{uid: {"mdev_type": V5_4, "start": "manual", "attrs": []}}]}
    ]
    # -u with exactly one match: the bare config object.
    assert json.loads(mdevctl_ok(mdevctl(host, "list", "--dumpjson", "-u", uid))) == {
        "mdev_type": V5_4,
        "start": "manual",
        "attrs": [],
    }

    assert mdevctl_ok(mdevctl(host, "stop", "-u", uid)) == ""
    assert not host.exists(device)
    assert host.listdir(host.sys_bus_mdev_devices) == []
    assert available(host, GVT_PARENT, V5_4) == 5
    assert mdevctl_ok(mdevctl(host, "list")) == "\n"  # an empty listing is one blank line
    assert mdevctl_ok(mdevctl(host, "list", "--dumpjson")) == "[]\n"


def test_no_available_instances_once_capacity_is_exhausted(mount_host: MountFn) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    # One namespace, five creates (all fit on 1024 MiB), then a sixth that must fail.
    script = "\n".join([f"mdevctl start -p {GVT_PARENT} -t {V5_4} || exit 9"] * 5)
    uuids = [new_uuid(line + "\n") for line in mdevctl_ok(in_namespace(host, script)).splitlines()]
    assert len(set(uuids)) == 5
    assert host.listdir(host.sys_bus_mdev_devices) == sorted(uuids)
    assert available(host, GVT_PARENT, V5_4) == 0

    failed = mdevctl(host, "start", "-p", GVT_PARENT, "-t", V5_4)
    assert failed == Result(1, "", f"Error: No available instances of {V5_4} on {GVT_PARENT}\n")
    assert host.listdir(host.sys_bus_mdev_devices) == sorted(uuids)  # nothing half-created

    # The other types share the pools: all at 0 now, as both the simulator and mdevctl say.
    types = mdevctl_ok(mdevctl(host, "types"))
    assert types.count("    Available instances: 0\n") == 4
    listed = "".join(f"{u} {GVT_PARENT} {V5_4} manual\n" for u in sorted(uuids))
    assert mdevctl_ok(mdevctl(host, "list")) == listed + "\n"


def test_error_texts_and_exit_codes(mount_host: MountFn) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    assert mdevctl(host, "start", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_3") == Result(
        1, "", f"Error: Parent {GVT_PARENT} does not support mdev type i915-GVTg_V5_3\n"
    )
    assert mdevctl(host, "start", "-p", "0000:00:02.1", "-t", V5_4) == Result(
        1, "", "Error: Unable to find parent device '0000:00:02.1'\n"
    )
    assert mdevctl(host, "stop", "-u", U1) == Result(
        1, "", f"Error: Error removing device {U1}\n\nCaused by:\n    No such file or directory (os error 2)\n"
    )
    assert mdevctl(host, "undefine", "-u", U1) == Result(1, "", "Error: No devices match the specified uuid\n")
    usage = mdevctl(host, "start", "-u", "notauuid")
    assert usage.rc == 2 and usage.out == "" and usage.err.startswith('error: Invalid value "notauuid"')

    mdevctl_ok(mdevctl(host, "start", "-u", U1, "-p", GVT_PARENT, "-t", V5_4))
    assert mdevctl(host, "start", "-u", U1, "-p", GVT_PARENT, "-t", V5_4) == Result(
        1, "", "Error: Device already exists\n"
    )
    assert mdevctl(host, "start", "-u", U1, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8") == Result(
        1, "", "Error: Device exists with different type\n"
    )
    assert host.listdir(host.sys_bus_mdev_devices) == [U1]


# ------------------------------------------------------------------------------ defined devices


def test_define_writes_config_then_start_and_list_defined(mount_host: MountFn) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    parent_dir = f"/etc/mdevctl.d/{GVT_PARENT}"

    uid = new_uuid(mdevctl_ok(mdevctl(host, "define", "-p", GVT_PARENT, "-t", V5_4)))
    assert host.path(f"{parent_dir}/{uid}").read_bytes() == config_bytes(V5_4)
    assert host.listdir(host.sys_bus_mdev_devices) == []  # define does not start
    assert available(host, GVT_PARENT, V5_4) == 5

    assert mdevctl_ok(mdevctl(host, "define", "-u", U1, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8", "--auto")) == ""
    assert host.path(f"{parent_dir}/{U1}").read_bytes() == config_bytes("i915-GVTg_V5_8", "auto")
    assert host.listdir(parent_dir) == sorted([uid, U1])
    assert mdevctl(host, "define", "-u", U1, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8") == Result(
        1, "", f"Error: Device {U1} on {GVT_PARENT} already defined\n"
    )

    # Listings are sorted by UUID within a parent.
    first, second = sorted([(uid, V5_4, "manual"), (U1, "i915-GVTg_V5_8", "auto")])
    lines = {u: f"{u} {GVT_PARENT} {t} {start}" for u, t, start in (first, second)}
    assert mdevctl_ok(mdevctl(host, "list", "-d")) == f"{lines[first[0]]}\n{lines[second[0]]}\n\n"

    assert mdevctl_ok(mdevctl(host, "start", "-u", uid)) == ""  # a given UUID is not printed
    assert host.exists(host.mdev_device_dir(uid))
    assert placement(host, uid) == (GVT_PARENT, V5_4)
    assert available(host, GVT_PARENT, V5_4) == 4
    active = {u: line + (" (active)" if u == uid else "") for u, line in lines.items()}
    assert mdevctl_ok(mdevctl(host, "list", "-d")) == f"{active[first[0]]}\n{active[second[0]]}\n\n"
    assert mdevctl_ok(mdevctl(host, "list")) == f"{uid} {GVT_PARENT} {V5_4} manual (defined)\n\n"

    # Stopping keeps the definition; undefining keeps the running device (here: none left).
    mdevctl_ok(mdevctl(host, "stop", "-u", uid))
    assert not host.exists(host.mdev_device_dir(uid))
    assert mdevctl_ok(mdevctl(host, "list", "-d")) == f"{lines[first[0]]}\n{lines[second[0]]}\n\n"
    assert mdevctl_ok(mdevctl(host, "undefine", "-u", uid)) == ""
    assert host.listdir(parent_dir) == [U1]


def test_define_by_uuid_promotes_a_running_device(mount_host: MountFn) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    uid = new_uuid(mdevctl_ok(mdevctl(host, "start", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_2")))
    # Parent and type are read back from sysfs (the device link's parent, the mdev_type link).
    assert mdevctl_ok(mdevctl(host, "define", "-u", uid)) == ""
    assert host.path(f"/etc/mdevctl.d/{GVT_PARENT}/{uid}").read_bytes() == config_bytes("i915-GVTg_V5_2")
    assert mdevctl_ok(mdevctl(host, "list")) == f"{uid} {GVT_PARENT} i915-GVTg_V5_2 manual (defined)\n\n"
    assert mdevctl_ok(mdevctl(host, "list", "-d")) == f"{uid} {GVT_PARENT} i915-GVTg_V5_2 manual (active)\n\n"


def test_start_parent_mdevs_starts_only_auto_definitions(mount_host: MountFn) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    mdevctl_ok(
        in_namespace(
            host,
            (
                f"mdevctl define -u {U1} -p {GVT_PARENT} -t {V5_4} --auto &&"
                f" mdevctl define -u {U2} -p {GVT_PARENT} -t {V5_4} &&"
                f" mdevctl define -u {U3} -p {GVT_PARENT} -t i915-GVTg_V5_8 --auto"
            ),
        )
    )
    assert mdevctl_ok(mdevctl(host, "start-parent-mdevs", GVT_PARENT)) == ""
    assert host.listdir(host.sys_bus_mdev_devices) == [U1, U3]
    assert mdevctl_ok(mdevctl(host, "list")) == (
        f"{U1} {GVT_PARENT} {V5_4} auto (defined)\n{U3} {GVT_PARENT} i915-GVTg_V5_8 auto (defined)\n\n"
    )


def test_failed_attribute_write_removes_the_device_again(mount_host: MountFn) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    mdevctl_ok(mdevctl(host, "define", "-u", U1, "-p", GVT_PARENT, "-t", V5_4))
    # intel_vgpu/vgpu_id exists but is read-only (0444): writing it fails with EACCES even as root.
    mdevctl_ok(mdevctl(host, "modify", "-u", U1, "--addattr", "intel_vgpu/vgpu_id", "--value", "3"))
    assert mdevctl_ok(mdevctl(host, "list", "-d", "-v")) == (
        f'{U1} {GVT_PARENT} {V5_4} manual\n  Attrs:\n    @{{0}}: {{"intel_vgpu/vgpu_id":"3"}}\n\n'
    )
    assert mdevctl(host, "start", "-u", U1) == Result(
        1,
        "",
        "Error: Failed to write 3 to attribute intel_vgpu/vgpu_id\n\nCaused by:\n    Permission denied (os error 13)\n",
    )
    assert host.listdir(host.sys_bus_mdev_devices) == []
    assert available(host, GVT_PARENT, V5_4) == 5


# ------------------------------------------------------------------------------ other vendors


def test_samples_mtty_types_start_and_list(mount_host: MountFn) -> None:
    host = mount_host("samples")
    # mtty has no description callback, so no Description line.
    assert mdevctl_ok(mdevctl(host, "types", "-p", "mtty")) == (
        "mtty\n"
        "  mtty-1\n    Available instances: 24\n    Device API: vfio-pci\n    Name: Single port serial\n"
        "  mtty-2\n    Available instances: 12\n    Device API: vfio-pci\n    Name: Dual port serial\n"
        "\n"
    )
    assert list(json.loads(mdevctl_ok(mdevctl(host, "types", "--dumpjson")))[0]) == ["mbochs", "mdpy", "mtty"]

    uid = new_uuid(mdevctl_ok(mdevctl(host, "start", "-p", "mtty", "-t", "mtty-2")))
    assert placement(host, uid) == ("mtty", "mtty-2")
    assert available(host, "mtty", "mtty-2") == 11
    assert available(host, "mtty", "mtty-1") == 22  # 24 ports, 2 taken
    mdevctl_ok(mdevctl(host, "start", "-u", U1, "-p", "mdpy", "-t", "mdpy-vga"))
    # Grouped by parent in sorted order.
    assert mdevctl_ok(mdevctl(host, "list")) == f"{U1} mdpy mdpy-vga manual\n{uid} mtty mtty-2 manual\n\n"
    assert mdevctl_ok(mdevctl(host, "list", "-p", "mtty")) == f"{uid} mtty mtty-2 manual\n\n"
    assert "    Available instances: 3\n" in mdevctl_ok(mdevctl(host, "types", "-p", "mdpy"))

    mdevctl_ok(mdevctl(host, "stop", "-u", uid))
    assert not host.exists(host.mdev_device_dir(uid))
    assert available(host, "mtty", "mtty-2") == 12


def test_nvidia_t4_is_homogeneous(mount_host: MountFn) -> None:
    host = mount_host("nvidia-t4")
    (parent,) = host.listdir(host.sys_class_mdev_bus)
    before = {
        type_id: spec["available_instances"]
        for entry in json.loads(mdevctl_ok(mdevctl(host, "types", "--dumpjson")))[0][parent]
        for type_id, spec in entry.items()
    }
    by_name = {
        host.read_value(f"{host.mdev_type_dir(parent, t)}/name"): t for t in host.listdir(host.mdev_types_dir(parent))
    }
    q1, q2 = by_name["GRID T4-1Q"], by_name["GRID T4-2Q"]
    assert before[q1] == 16 and before[q2] == 8

    uid = new_uuid(mdevctl_ok(mdevctl(host, "start", "-p", parent, "-t", q1)))
    assert placement(host, uid) == (parent, q1)
    after = {
        type_id: spec["available_instances"]
        for entry in json.loads(mdevctl_ok(mdevctl(host, "types", "--dumpjson")))[0][parent]
        for type_id, spec in entry.items()
    }
    assert after == {t: (15 if t == q1 else 0) for t in before}
    assert mdevctl(host, "start", "-p", parent, "-t", q2) == Result(
        1, "", f"Error: No available instances of {q2} on {parent}\n"
    )
    assert mdevctl_ok(mdevctl(host, "list")) == f"{uid} {parent} {q1} manual\n\n"

    mdevctl_ok(mdevctl(host, "stop", "-u", uid))
    assert host.listdir(host.sys_bus_mdev_devices) == []
    uid2 = new_uuid(mdevctl_ok(mdevctl(host, "start", "-p", parent, "-t", q2)))  # the GPU is free for any type again
    assert mdevctl_ok(mdevctl(host, "list")) == f"{uid2} {parent} {q2} manual\n\n"
