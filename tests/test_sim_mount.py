"""The simulator mounted over FUSE: plain file reads and writes, shell writes, errnos, lifecycle."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GVT_PARENT, MountFn
from vgpuctl.backends.gvt_platforms import worked_examples
from vgpuctl.host import HostRoot
from vgpuctl.sim import mount as sim_mount
from vgpuctl.sim.presets import preset

pytestmark = pytest.mark.fuse

U1 = "aaaaaaaa-bbbb-cccc-dddd-000000000001"
U2 = "aaaaaaaa-bbbb-cccc-dddd-000000000002"
VGPUCTL = [sys.executable, "-m", "vgpuctl"]


def types_dir(root: HostRoot, parent: str = GVT_PARENT) -> Path:
    return root.path(f"/sys/class/mdev_bus/{parent}/mdev_supported_types")


def read_available(root: HostRoot, parent: str = GVT_PARENT) -> dict[str, int]:
    base = types_dir(root, parent)
    return {p.name.removeprefix("i915-"): int((p / "available_instances").read_text()) for p in base.iterdir()}


def write_errno(path: Path, data: bytes) -> int:
    """errno of one write() to path (0 on success), the way a program sees it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)
    return 0


def sh(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("aperture", [128, 256, 512, 1024, 2048])
def test_worked_examples_through_the_mount(mount_host: MountFn, aperture: int) -> None:
    expected = worked_examples()["by_aperture_MiB"][str(aperture)]
    root = mount_host("coffeelake", aperture_mib=aperture)
    assert sorted(p.name for p in types_dir(root).iterdir()) == sorted(f"i915-{t}" for t in expected["types"])
    assert read_available(root) == expected["available"]


def test_worked_examples_after_creates_through_the_mount(mount_host: MountFn) -> None:
    for example in worked_examples()["after_create"]:
        root = mount_host("coffeelake", aperture_mib=example["aperture_MiB"])
        for index, name in enumerate(example["created"]):
            (types_dir(root) / f"i915-{name}" / "create").write_text(f"00000000-0000-0000-0000-{index:012d}\n")
        assert read_available(root) == example["available"]


def test_shell_echo_creates_and_removes_with_the_kernels_errors(mount_host: MountFn) -> None:
    root = mount_host("coffeelake")  # 256 MiB: two GVTg_V5_8
    create = types_dir(root) / "i915-GVTg_V5_8" / "create"
    devices = root.path("/sys/bus/mdev/devices")
    done = sh(f"echo {U1.upper()} > {create} && echo {U2} > {create}")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(devices)) == [U1, U2]
    full = sh(f"echo {U1[:-1]}3 > {create}")
    assert full.returncode == 1 and "No space left on device" in full.stderr
    dup = sh(f"echo {U1} > {types_dir(root) / 'i915-GVTg_V5_4' / 'create'}")
    assert "File exists" in dup.stderr
    bad = sh(f"echo not-a-uuid > {create}")
    assert "Invalid argument" in bad.stderr
    assert sh(f"echo 0 > {devices / U1 / 'remove'}").returncode == 0
    assert (devices / U1).exists()
    assert "Invalid argument" in sh(f"echo yes > {devices / U1 / 'remove'}").stderr
    assert sh(f"echo 1 > {devices / U1 / 'remove'}").returncode == 0
    assert not (devices / U1).exists()
    assert read_available(root) == {"GVTg_V5_8": 1, "GVTg_V5_4": 0}


def test_every_errno_case_through_plain_writes(mount_host: MountFn) -> None:
    gvt = mount_host("coffeelake", aperture_mib=1024)
    create = types_dir(gvt) / "i915-GVTg_V5_8" / "create"
    assert write_errno(create, b"1234") == errno.EINVAL  # bad length
    assert write_errno(create, (U1[:8] + "_" + U1[9:]).encode()) == errno.EINVAL  # malformed
    assert write_errno(create, U1.encode()) == 0
    assert write_errno(types_dir(gvt) / "i915-GVTg_V5_4" / "create", U1.upper().encode()) == errno.EEXIST
    for i in range(6):
        assert write_errno(create, f"00000000-0000-0000-0000-{i:012d}".encode()) == 0
    assert write_errno(create, U2.encode()) == errno.ENOSPC  # 7-vGPU cap
    remove = gvt.path(f"/sys/bus/mdev/devices/{U1}/remove")
    assert write_errno(remove, b"x") == errno.EINVAL
    assert write_errno(remove, b"0") == 0 and remove.exists()
    assert write_errno(remove, b"1") == 0 and not remove.exists()

    samples = mount_host("samples")
    mdpy = types_dir(samples, "mdpy")
    for i in range(4):
        assert write_errno(mdpy / "mdpy-vga" / "create", f"00000000-0000-0000-0000-{i:012d}".encode()) == 0
    assert write_errno(mdpy / "mdpy-hd" / "create", U2.encode()) == errno.EUSERS
    mtty_create = types_dir(samples, "mtty") / "mtty-1" / "create"
    assert write_errno(mtty_create, b"00000000-0000-0000-0000-000000000000\n") == errno.EEXIST  # global


def test_device_entries_links_and_dev_nodes(mount_host: MountFn) -> None:
    root = mount_host("coffeelake")
    (types_dir(root) / "i915-GVTg_V5_4" / "create").write_text(U1)
    device = root.path(f"/sys/bus/mdev/devices/{U1}")
    assert device.resolve() == root.path(f"/sys/devices/pci0000:00/{GVT_PARENT}/{U1}")
    assert os.readlink(device / "mdev_type") == "../mdev_supported_types/i915-GVTg_V5_4"
    assert (device / "mdev_type").resolve().name == "i915-GVTg_V5_4"
    assert (device / "driver").resolve().name == "intel_vgpu_mdev"
    assert (device / "intel_vgpu" / "vgpu_id").read_text() == "1\n"
    group = (device / "iommu_group").resolve().name
    node = os.stat(root.path(f"/dev/vfio/{group}"))
    assert stat.S_ISCHR(node.st_mode)
    assert stat.S_ISCHR(os.stat(root.path("/dev/kvm")).st_mode)
    assert (types_dir(root) / "i915-GVTg_V5_4" / "devices" / U1).resolve() == device.resolve()
    assert root.path(f"/sys/class/mdev_bus/{GVT_PARENT}").resolve() == device.resolve().parent
    # A simulated device node must never reach a real driver (the mount is nodev).
    with pytest.raises(OSError):
        os.open(root.path("/dev/kvm"), os.O_RDWR)


def test_sysfs_permissions_hold_even_for_root(mount_host: MountFn) -> None:
    root = mount_host("coffeelake")
    base = types_dir(root) / "i915-GVTg_V5_4"
    assert stat.S_IMODE(os.stat(base / "create").st_mode) == 0o200
    assert stat.S_IMODE(os.stat(base / "available_instances").st_mode) == 0o444
    with pytest.raises(PermissionError):
        (base / "create").read_text()
    with pytest.raises(PermissionError):
        (base / "available_instances").write_text("9")
    with pytest.raises(PermissionError):
        root.path("/sys/module/i915/parameters/enable_gvt").write_text("N")


def test_non_root_users_get_the_modes_checked_by_the_kernel() -> None:
    # pytest's tmp_path is private to root: mount where another user can reach.
    target = Path(tempfile.mkdtemp(prefix="vgpuctl-test-"))
    target.chmod(0o755)
    sim_mount.mount(preset("coffeelake").to_json(), target, "coffeelake")
    try:
        _check_as_nobody(HostRoot(target))
    finally:
        sim_mount.umount(target, lazy=True)
        target.rmdir()


def _check_as_nobody(root: HostRoot) -> None:
    base = types_dir(root) / "i915-GVTg_V5_4"
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"]
    read = subprocess.run([*as_nobody, f"cat {base / 'available_instances'}"], capture_output=True, text=True)
    assert read.returncode == 0 and read.stdout == "1\n"
    write = subprocess.run([*as_nobody, f"echo {U1} > {base / 'create'}"], capture_output=True, text=True)
    assert write.returncode != 0 and "Permission denied" in write.stderr
    secret = subprocess.run([*as_nobody, f"cat {root.path('/sys/module/i915/parameters/enable_gvt')}"],
                            capture_output=True, text=True)
    assert secret.returncode != 0  # 0400: root only, as on a real host
    assert not root.path(f"/sys/bus/mdev/devices/{U1}").exists()


def test_etc_is_plain_storage_with_atomic_rename(mount_host: MountFn) -> None:
    root = mount_host("coffeelake")
    etc = root.path("/etc/mdevctl.d")
    assert sorted(os.listdir(etc / "scripts.d")) == ["callouts", "notifiers"]
    parent = etc / GVT_PARENT
    parent.mkdir()
    tmp = parent / f".{U1}.tmp"
    tmp.write_text('{\n  "mdev_type": "i915-GVTg_V5_4"\n}')
    os.replace(tmp, parent / U1)
    assert os.listdir(parent) == [U1]
    assert json.loads((parent / U1).read_text()) == {"mdev_type": "i915-GVTg_V5_4"}
    with open(parent / U1, "r+") as f:
        f.truncate(3)
    assert (parent / U1).read_text() == '{\n '
    (parent / U1).unlink()
    parent.rmdir()
    with pytest.raises(OSError):
        root.path("/sys/bus/mdev/devices/new-file").write_text("x")


def test_marker_tells_a_simulated_host(mount_host: MountFn) -> None:
    root = mount_host("nvidia-t4")
    assert root.is_simulated
    info = root.simulation()
    assert info is not None and info["preset"] == "nvidia-t4" and info["kernel"] == "6.8.0"
    assert os.path.exists(f"/proc/{info['pid']}")
    assert not HostRoot(Path("/")).is_simulated


def test_bad_input_never_crashes_the_server(mount_host: MountFn) -> None:
    root = mount_host("coffeelake")
    create = types_dir(root) / "i915-GVTg_V5_8" / "create"
    for junk in (b"\xff\xfe" * 18, b"\0" * 36, b"x" * 100_000, b"-" * 37):
        assert write_errno(create, junk) == errno.EINVAL
    with pytest.raises(PermissionError):
        root.path("/proc/cmdline").write_text("x")
    with pytest.raises(OSError):
        os.listdir(root.path("/proc/cmdline"))
    with pytest.raises(FileNotFoundError):
        (root.root / "sys/nope/../nope").read_text()  # a raw path: the root object refuses ".."
    assert write_errno(create, U1.encode()) == 0  # still serving, still correct


def test_sigterm_unmounts_cleanly(mount_host: MountFn) -> None:
    root = mount_host("coffeelake")
    info = root.simulation()
    assert info is not None
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while sim_mount.is_sim_mount(root.root) or os.path.exists(f"/proc/{info['pid']}/stat"):
        assert time.monotonic() < deadline, "server did not exit on SIGTERM"
        time.sleep(0.05)
        _reap(info["pid"])
    assert os.listdir(root.root) == []


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # ours only if this process started it
        os.waitpid(pid, os.WNOHANG)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VGPUCTL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_cli_mount_and_umount_with_clear_errors(tmp_path: Path) -> None:
    target = tmp_path / "host"
    missing = run_cli("sim", "mount", str(target))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    target.mkdir()
    bad = run_cli("sim", "mount", "--preset", "nope", str(target))
    assert bad.returncode == 1 and "coffeelake" in bad.stderr
    bad_id = run_cli("sim", "mount", "--pci-id", "zz", str(target))
    assert bad_id.returncode == 1 and "8086:3e92" in bad_id.stderr
    done = run_cli("sim", "mount", "--preset", "kabylake", "--kernel", "5.15.0", "--modules",
                   "i915,kvm,kvm_intel", str(target))
    assert done.returncode == 0, done.stderr
    try:
        assert (target / "proc/modules").read_text().split("\n")[0].startswith("i915 ")
        assert not (target / "sys/bus/mdev").exists()
        busy = run_cli("sim", "mount", str(target))
        assert busy.returncode == 1 and "already mounted" in busy.stderr
        in_use = subprocess.Popen(["sleep", "30"], cwd=target / "proc")
        try:
            refused = run_cli("sim", "umount", str(target))
            assert refused.returncode == 1 and "busy" in refused.stderr and "--lazy" in refused.stderr
        finally:
            in_use.kill()
            in_use.wait()
    finally:
        done = run_cli("sim", "umount", str(target))
    assert done.returncode == 0, done.stderr
    assert os.listdir(target) == []
    again = run_cli("sim", "umount", str(target))
    assert again.returncode == 1 and "no simulated host" in again.stderr


def test_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    refused = run_cli("sim", "mount", str(tmp_path))
    assert refused.returncode == 1 and "not empty" in refused.stderr


def test_stale_mount_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    target = tmp_path / "host"
    target.mkdir()
    pid = sim_mount.mount(preset("coffeelake").to_json(), target, "coffeelake")
    os.kill(pid, signal.SIGKILL)  # a server that dies without unmounting
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}/stat") and time.monotonic() < deadline:
        time.sleep(0.02)
        _reap(pid)
    stale = run_cli("sim", "mount", str(target))
    assert stale.returncode == 1 and "stale" in stale.stderr and "umount" in stale.stderr
    cleaned = run_cli("sim", "umount", str(target))
    assert cleaned.returncode == 0, cleaned.stderr
    assert not sim_mount.is_sim_mount(target)


def test_presets_command_lists_every_preset_a_line_each() -> None:
    listed = run_cli("sim", "presets")
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(sim_mount_presets())


def sim_mount_presets() -> list[str]:
    from vgpuctl.sim.presets import PRESETS

    return list(PRESETS)


def test_demo_tours_the_host_and_leaves_nothing_mounted() -> None:
    before = Path("/proc/self/mountinfo").read_text().count("fuse.vgpuctl-sim")
    tour = run_cli("demo")
    assert tour.returncode == 0, tour.stderr
    assert "No space left on device" in tour.stdout
    assert tour.stdout.count("created vGPU") == 7
    assert "vm start demo   -> running under" in tour.stdout and "vm stop demo   -> stopped" in tour.stdout
    # the SR-IOV host: the kernel's ERANGE, two VFs on vfio-pci, a VM holding one, then all off again
    assert "Numerical result out of range (errno 34)" in tour.stdout
    assert tour.stdout.count("vfio-pci  free") >= 3 and "0000:00:02.1  vfio-pci  VM demo-vf" in tour.stdout
    assert "vm stop demo-vf   -> stopped" in tour.stdout and "-> sriov_numvfs 0" in tour.stdout
    assert Path("/proc/self/mountinfo").read_text().count("fuse.vgpuctl-sim") == before


def test_removed_devices_vanish_at_once_despite_kernel_caching(mount_host: MountFn) -> None:
    root = mount_host("coffeelake")
    create = types_dir(root) / "i915-GVTg_V5_8" / "create"
    link = root.path(f"/sys/bus/mdev/devices/{U1}")
    real = root.path(f"/sys/devices/pci0000:00/{GVT_PARENT}/{U1}")
    for _ in range(2):  # remove, then the same UUID again: no stale view either way
        create.write_text(U1)
        assert (link / "intel_vgpu" / "vgpu_id").read_text() == "1\n"  # fills the dentry/attr caches
        assert os.stat(real / "remove") and os.lstat(link)
        (link / "remove").write_text("1")
        assert not os.path.lexists(link)
        assert not os.path.exists(real) and not os.path.exists(real / "remove")
        assert not os.path.exists(types_dir(root) / "i915-GVTg_V5_8" / "devices" / U1)
        assert U1 not in os.listdir(root.path("/sys/bus/mdev/devices"))


def test_cached_symlinks_follow_a_device_recreated_elsewhere(mount_host: MountFn) -> None:
    # The kernel caches symlink targets (FUSE_CAP_CACHE_SYMLINKS); a device removed and created again
    # under the same UUID, on another parent and of another type, must show its new links at once.
    root = mount_host("samples")
    link = root.path(f"/sys/bus/mdev/devices/{U1}")
    seen = []
    for parent, type_id in (("mtty", "mtty-2"), ("mdpy", "mdpy-vga"), ("mtty", "mtty-1")):
        (types_dir(root, parent) / type_id / "create").write_text(U1)
        for _ in range(2):  # the second readlink comes from the cache
            seen.append((os.path.basename(os.path.dirname(os.readlink(link))),
                         os.path.basename(os.readlink(link / "mdev_type"))))
        (link / "remove").write_text("1")
    assert seen == [("mtty", "mtty-2")] * 2 + [("mdpy", "mdpy-vga")] * 2 + [("mtty", "mtty-1")] * 2


def test_demo_serve_runs_three_vms_behind_the_service_until_interrupted() -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = Path("/proc/self/mountinfo").read_text().count("fuse.vgpuctl-sim")
    demo = subprocess.Popen([*VGPUCTL, "demo", "--serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        token = None
        deadline = time.monotonic() + 120
        assert demo.stdout is not None
        while token is None and time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, demo.stderr.read() if demo.stderr else "demo ended early"
            if line.startswith("token "):
                token = line.split()[1]
        assert token, "the demo printed no token"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/vms",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            vms = json.loads(answer.read())
        assert sorted((vm["name"], vm["state"]) for vm in vms) == [
            ("car1", "running"), ("car2", "running"), ("stream1", "running")]
        # The streaming VM runs a real OS: its guest agent says which, once it has booted.
        status: dict[str, Any] = {}
        while time.monotonic() < deadline + 120 and not (status.get("guest") or {}).get("agent"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/vms/stream1/status",
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                status = json.loads(answer.read())
        assert status["guest"]["os"] == "vgpuctl Linux test guest (busybox)", status
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0
    assert "stopped the VMs and unmounted the simulated host" in out
    assert Path("/proc/self/mountinfo").read_text().count("fuse.vgpuctl-sim") == before
