"""vgpuctl's vGPU commands against mounted simulated hosts: GVT-g, samples, NVIDIA, both kernel eras."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import GVT_PARENT, Cli, MountFn
from vgpuctl.mdev import definitions
from vgpuctl.mdev.definitions import Definition, atomic_write

pytestmark = pytest.mark.fuse

U1 = "11111111-0000-4000-8000-000000000001"
U2 = "11111111-0000-4000-8000-000000000002"




def available(cli: Cli, type_id: str) -> int:
    rows = cli.json("types", "-p", GVT_PARENT)
    assert isinstance(rows, list)
    return next(int(r["available_instances"]) for r in rows if r["type"] == type_id)


@pytest.mark.parametrize("kernel", ["6.8.0", "5.15.0"])
def test_types_and_gpus_on_gvt(mount_host: MountFn, tmp_path: Path, kernel: str) -> None:
    cli = Cli(mount_host("coffeelake", aperture_mib=1024, kernel=kernel), tmp_path / "state")
    rows = cli.json("types")
    assert isinstance(rows, list)
    by_type = {r["type"]: r for r in rows}
    v54 = by_type["i915-GVTg_V5_4"]
    assert v54["available_instances"] == 5
    assert v54["fields"] == {"low_gm_mib": 128, "high_gm_mib": 512, "fences": 4, "resolution": "1920x1200",
                             "weight": 4}
    assert v54["memory_mib"] == 640 and v54["resolution"] == "1920x1200"
    assert v54["name"] == ("GVTg_V5_4" if kernel == "6.8.0" else None)  # no name file before 5.19
    text = cli("types")[1]
    assert "i915-GVTg_V5_8" in text and "1024x768" in text

    gpus = cli.json("gpus")
    assert isinstance(gpus, list)
    (gpu,) = gpus
    assert gpu["parent"] == GVT_PARENT and gpu["vendor"] == "Intel" and gpu["platform"] == "Coffee Lake"
    assert gpu["aperture_mib"] == 1024
    assert gpu["pools"]["low GM (aperture)"] == {"total": 896, "used": 0, "free": 896, "unit": "MiB"}
    cli("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", U1)
    gpus = cli.json("gpus")
    assert isinstance(gpus, list)
    pools = gpus[0]["pools"]
    assert (pools["low GM (aperture)"]["free"], pools["high GM"]["free"]) == (768, 2176)
    assert (pools["fences"]["free"], pools["vGPU ids"]["free"]) == (24, 6)
    assert gpus[0]["active_vgpus"] == [U1]
    assert "Coffee Lake" in cli("gpus")[1]


def test_create_remove_and_kernel_errors_in_words(gvt: Cli) -> None:
    code, out, _ = gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4")
    new = out.strip()
    assert gvt.root.exists(f"/sys/bus/mdev/devices/{new}")
    assert available(gvt, "i915-GVTg_V5_4") == 4
    # EEXIST names the parent that holds the UUID.
    code, _, err = gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8", "-u", new.upper(), ok=False)
    assert code == 1 and f"{new} is already active on {GVT_PARENT}" in err
    # A missing parent or type lists what exists.
    code, _, err = gvt("create", "-p", "0000:00:02.1", "-t", "i915-GVTg_V5_4", ok=False)
    assert code == 1 and f"mdev parents on this host: {GVT_PARENT}" in err
    code, _, err = gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_3", ok=False)
    assert code == 1 and "i915-GVTg_V5_1, i915-GVTg_V5_2, i915-GVTg_V5_4, i915-GVTg_V5_8" in err
    code, _, err = gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", "not-a-uuid", ok=False)
    assert code == 1 and "not a UUID" in err
    # ENOSPC names the exhausted pool and what still fits.
    gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_2")
    code, _, err = gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_1", ok=False)
    assert code == 1
    assert "(high GM: 1152 MiB free, i915-GVTg_V5_1 needs 2048)" in err
    assert "types that still fit: i915-GVTg_V5_2 (1), i915-GVTg_V5_4 (2), i915-GVTg_V5_8 (3)" in err
    gvt("remove", "-u", new)
    assert not gvt.root.exists(f"/sys/bus/mdev/devices/{new}")
    code, _, err = gvt("remove", "-u", new, ok=False)
    assert code == 1 and "no active vGPU" in err


def test_vgpu_id_cap_is_explained(gvt: Cli) -> None:
    for _ in range(7):
        gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8")
    code, _, err = gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8", ok=False)
    assert code == 1 and "vGPU ids: 0 free, i915-GVTg_V5_8 needs 1" in err
    assert "fences: 0 free, i915-GVTg_V5_8 needs 4" in err and "no type fits any more" in err


def test_attributes_are_written_in_order_and_a_failure_removes_the_device(gvt: Cli) -> None:
    code, _, err = gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", U1,
                       "--attr", "intel_vgpu/vgpu_id=3", ok=False)
    assert code == 1 and "attribute 'intel_vgpu/vgpu_id'" in err and "removed again" in err
    assert not gvt.root.exists(f"/sys/bus/mdev/devices/{U1}")
    assert available(gvt, "i915-GVTg_V5_4") == 5
    assert gvt.json("list") == []


def test_choosing_parent_and_type_for_a_request(gvt: Cli) -> None:
    _, out, _ = gvt("create", "--resolution", "1920x1200", "--dry-run")
    assert "chose i915-GVTg_V5_4 on 0000:00:02.0" in out
    assert gvt.json("list") == []
    choice = gvt.json("create", "--resolution", "1024x768", "--dry-run")
    assert isinstance(choice, dict) and choice["type"] == "i915-GVTg_V5_8"
    choice = gvt.json("create", "--weight", "16", "--dry-run")
    assert isinstance(choice, dict) and choice["type"] == "i915-GVTg_V5_1"
    choice = gvt.json("create", "--min-memory", "1000")
    assert isinstance(choice, dict) and choice["type"] == "i915-GVTg_V5_2"
    assert gvt.root.exists(f"/sys/bus/mdev/devices/{choice['uuid']}")
    code, _, err = gvt("create", "--resolution", "3840x2160", ok=False)
    assert code == 1 and "no vGPU type on this host gives >= 3840x2160" in err and "max 1920x1200" in err
    code, _, err = gvt("create", "--min-memory", "2000", ok=False)  # V5_1 no longer fits beside the V5_2
    assert code == 1 and "is full (0000:00:02.0 i915-GVTg_V5_1)" in err
    code, _, err = gvt("create", "--resolution", "big", ok=False)
    assert code == 1 and "1920x1200" in err


def test_define_start_stop_undefine_modify_in_mdevctl_format(gvt: Cli) -> None:
    _, out, _ = gvt("define", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "--auto", "--attr", "a=1")
    uuid = out.strip()
    path = gvt.root.path(f"/etc/mdevctl.d/{GVT_PARENT}/{uuid}")
    assert path.read_bytes() == (
        b'{\n  "mdev_type": "i915-GVTg_V5_4",\n  "start": "auto",\n  "attrs": [\n    {\n      "a": "1"\n'
        b"    }\n  ]\n}"
    )
    gvt("modify", "-u", uuid, "--delattr")
    gvt("modify", "-u", uuid, "--manual", "--addattr", "b", "--value", "2")
    gvt("modify", "-u", uuid, "--addattr", "c", "--value", "3", "--index", "0")
    assert json.loads(path.read_text()) == {"mdev_type": "i915-GVTg_V5_4", "start": "manual",
                                            "attrs": [{"c": "3"}, {"b": "2"}]}
    code, _, err = gvt("modify", "-u", uuid, "--delattr", "--index", "5", ok=False)
    assert code == 1 and "index 5 is invalid" in err
    code, _, err = gvt("modify", "-u", uuid, "--auto", "--manual", ok=False)
    assert code == 1 and "mutually exclusive" in err
    gvt("modify", "-u", uuid, "--delattr")
    gvt("modify", "-u", uuid, "--delattr")
    assert gvt("start", "-u", uuid)[1] == ""
    rows = gvt.json("list")
    assert rows == [{"uuid": uuid, "parent": GVT_PARENT, "type": "i915-GVTg_V5_4", "active": True,
                     "defined": True, "start": "manual", "attrs": [], "owner": "vgpuctl"}]
    gvt("stop", "-u", uuid)
    assert not gvt.root.exists(f"/sys/bus/mdev/devices/{uuid}") and path.exists()
    assert gvt.json("list", "--active") == []
    code, _, err = gvt("define", "-u", uuid, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", ok=False)
    assert code == 1 and "already defined" in err
    gvt("undefine", "-u", uuid)
    assert not path.exists()
    assert gvt.json("list") == []
    assert not (gvt.state / "owned.json").read_text().count(uuid)


def test_define_promotes_an_active_device_and_start_makes_transients(gvt: Cli) -> None:
    _, out, _ = gvt("start", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8")
    uuid = out.strip()
    gvt("define", "-u", uuid)
    assert definitions.find(gvt.root, uuid)[0].mdev_type == "i915-GVTg_V5_8"
    code, _, err = gvt("start", "-u", U2, ok=False)
    assert code == 1 and "-p and -t" in err
    rows = gvt.json("list", "-d")
    assert isinstance(rows, list) and rows[0]["active"] and rows[0]["defined"]


def test_never_touch_what_vgpuctl_did_not_create(gvt: Cli) -> None:
    # A vGPU and a definition made by another tool (plain writes, as mdevctl does).
    gvt.root.write_text(f"/sys/class/mdev_bus/{GVT_PARENT}/mdev_supported_types/i915-GVTg_V5_8/create", U1)
    definitions.write(gvt.root, Definition(U2, GVT_PARENT, "i915-GVTg_V5_4", "auto"))
    rows = gvt.json("list")
    assert isinstance(rows, list) and {r["owner"] for r in rows} == {"other"}
    for args in (["remove", "-u", U1], ["stop", "-u", U1], ["undefine", "-u", U2], ["modify", "-u", U2, "--manual"]):
        code, _, err = gvt(*args, ok=False)
        assert code == 1 and "not created by vgpuctl" in err and "--force" in err, args
    assert gvt.root.exists(f"/sys/bus/mdev/devices/{U1}") and definitions.find(gvt.root, U2)
    gvt("remove", "-u", U1, "--force")
    gvt("undefine", "-u", U2, "--force")
    assert gvt.json("list") == []


def test_autostart_is_idempotent_and_continues_past_failures(gvt: Cli) -> None:
    auto = [gvt("define", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_2", "--auto")[1].strip() for _ in range(3)]
    manual = gvt("define", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8")[1].strip()
    code, out, _ = gvt("autostart", ok=False)
    assert code == 1  # only two GVTg_V5_2 fit on a 1 GiB aperture
    assert out.count(": started") == 2 and out.count(": failed (no room for i915-GVTg_V5_2") == 1
    code, out, _ = gvt("autostart", ok=False)
    assert out.count(": already active") == 2 and out.count(": failed") == 1
    assert not gvt.root.exists(f"/sys/bus/mdev/devices/{manual}")
    assert sum(gvt.root.exists(f"/sys/bus/mdev/devices/{u}") for u in auto) == 2
    code, out, _ = gvt("autostart", "0000:00:02.1")
    assert out == ""


@pytest.mark.parametrize("kernel", ["6.8.0", "5.15.0"])
def test_samples_and_nvidia_presets(mount_host: MountFn, tmp_path: Path, kernel: str) -> None:
    samples = Cli(mount_host("samples", kernel=kernel), tmp_path / "s1")
    types = samples.json("types", "-p", "mdpy")
    assert isinstance(types, list) and [t["resolution"] for t in types] == ["1920x1080", "640x480", "1024x768"]
    mbochs = samples.json("types", "-p", "mbochs")
    assert isinstance(mbochs, list) and {t["type"]: t["memory_mib"] for t in mbochs}["mbochs-medium"] == 16
    samples("create", "-p", "mtty", "-t", "mtty-2", "-u", U1)
    for _ in range(4):
        samples("create", "-p", "mdpy", "-t", "mdpy-vga")
    code, _, err = samples("create", "-p", "mdpy", "-t", "mdpy-hd", ok=False)
    assert code == 1 and "no room for mdpy-hd on mdpy" in err  # EUSERS on 6.x, ENOMEM before
    rows = samples.json("list")
    assert isinstance(rows, list) and [r["parent"] for r in rows] == ["mdpy"] * 4 + ["mtty"]
    gpus = samples.json("gpus")
    assert isinstance(gpus, list) and {g["parent"]: g["vendor"] for g in gpus}["mtty"] == "virtual"

    nvidia = Cli(mount_host("nvidia-t4", kernel=kernel), tmp_path / "s2")
    choice = nvidia.json("create", "--resolution", "7680x4320", "--min-memory", "4096")
    assert isinstance(choice, dict) and choice["type"] == "nvidia-232"  # GRID T4-4Q
    t4 = nvidia.json("types")
    assert isinstance(t4, list)
    assert {t["type"]: t["available_instances"] for t in t4}["nvidia-231"] == 0  # homogeneous
    code, _, err = nvidia("create", "-p", choice["parent"], "-t", "nvidia-231", ok=False)
    assert code == 1 and "types that still fit: nvidia-232 (3)" in err


def test_concurrent_creates_for_the_last_instance(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("coffeelake")  # 256 MiB: one GVTg_V5_4
    command = [sys.executable, "-m", "vgpuctl", "--root", str(root.root), "--state-dir", str(tmp_path / "st"),
               "create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4"]
    racers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in racers]
    assert sorted(code for code, _, _ in results) == [0, 1, 1]
    for code, _, err in results:
        if code:
            assert "no room for i915-GVTg_V5_4" in err
    assert len(os.listdir(root.path("/sys/bus/mdev/devices"))) == 1


def test_kill_9_never_leaves_a_half_written_definition(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("coffeelake")
    target = root.path(f"/etc/mdevctl.d/{GVT_PARENT}/{U1}")
    big = Definition(U1, GVT_PARENT, "i915-GVTg_V5_4", "auto", [(f"a{i}", "x" * 200) for i in range(200)])
    small = Definition(U1, GVT_PARENT, "i915-GVTg_V5_8", "manual")
    definitions.write(root, small)
    for attempt in range(12):
        pid = os.fork()
        if pid == 0:  # child: rewrite the file as fast as it can until killed
            try:
                while True:
                    definitions.write(root, big)
                    definitions.write(root, small)
            finally:
                os._exit(0)
        time.sleep(0.02 + attempt * 0.007)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = definitions.parse_config(target.read_text(), U1, GVT_PARENT, str(target))
        assert loaded.mdev_type in ("i915-GVTg_V5_4", "i915-GVTg_V5_8")
        assert [d.uuid for d in definitions.load_all(root)] == [U1]  # leftover temp files are ignored
    definitions.write(root, small)  # a later write sweeps them
    assert os.listdir(target.parent) == [U1]
    cli = Cli(root, tmp_path / "state")
    rows = cli.json("list")
    assert isinstance(rows, list) and rows[0]["type"] == "i915-GVTg_V5_8"


def test_state_file_is_replaced_atomically(tmp_path: Path) -> None:
    from vgpuctl.base.errors import StateDamaged
    from vgpuctl.base.state import StateDir
    from vgpuctl.mdev.state import Journal

    journal = Journal(StateDir(tmp_path))
    for uuid in (U1, U2):
        with journal.claiming("device", uuid, {"parent": GVT_PARENT, "type": "i915-GVTg_V5_4"}):
            pass
    with journal.releasing("device", U1):
        pass
    assert set(journal.ownership().devices) == {U2} and not journal.ownership().journal
    atomic_write(journal.file, b"{broken")
    with pytest.raises(StateDamaged, match="moved away"):
        journal.ownership()


@pytest.mark.parametrize("kernel", ["6.8.0", "5.15.0"])
def test_human_output_of_list_gpus_and_types(mount_host: MountFn, tmp_path: Path, kernel: str) -> None:
    cli = Cli(mount_host("coffeelake", aperture_mib=1024, kernel=kernel), tmp_path / "state")
    assert cli("list")[1] == "no vGPUs\n"
    cli("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", U1)
    cli("define", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8", "-u", U2, "--auto", "--attr", "x=1")
    lines = cli("list")[1].splitlines()
    row1 = next(line for line in lines if U1 in line).split("│")
    row2 = next(line for line in lines if U2 in line).split("│")
    assert [c.strip() for c in row1[1:-1]] == [U1, GVT_PARENT, "i915-GVTg_V5_4", "active", "-", "vgpuctl", "-"]
    assert [c.strip() for c in row2[1:-1]] == [U2, GVT_PARENT, "i915-GVTg_V5_8", "defined", "auto", "vgpuctl", "x=1"]
    gpus = cli("gpus")[1]
    assert "Intel 0x3e92" in gpus and "768/896 MiB" in gpus and "6/7" in gpus
    types = cli("types")[1]
    row = next(line for line in types.splitlines() if "i915-GVTg_V5_2" in line).split("│")
    name = "GVTg_V5_2" if kernel == "6.8.0" else "-"
    assert [c.strip() for c in row[1:6]] == [GVT_PARENT, "i915-GVTg_V5_2", name, "2", "1280 MiB"]


def test_only_vgpuctl_errors_are_the_users_anything_else_is_said_to_be_a_bug(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vgpuctl.cli.app import cli
    from vgpuctl.mdev import report

    def broken(root: object, held: object = ()) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(report, "gpus_rows", broken)
    result = CliRunner().invoke(cli, ["--root", str(tmp_path), "--state-dir", str(tmp_path / "s"), "gpus", "--json"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.endswith("error: internal error, a bug in vgpuctl (ValueError: boom); please report it with "
                                  "the traceback above\n")
    result = CliRunner().invoke(cli, ["--root", str(tmp_path), "--state-dir", str(tmp_path / "s"), "create", "-p",
                                      "x", "-t", "y", "--resolution", "1x1"])
    assert result.exit_code == 1 and result.stderr.startswith("error: give either") and "Traceback" not in result.stderr
