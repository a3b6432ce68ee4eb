"""Issue 11's findings on vGPUs and definitions: what vgpuctl did not make stays someone else's, no path
built from input leaves its directory, the state is recorded before the host changes, one bad file hides
nothing. Each test failed on the code before the ownership journal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GVT_PARENT, Cli
from vgpuctl.host import HostRoot
from vgpuctl.mdev import definitions
from vgpuctl.mdev.definitions import Definition, atomic_write

pytestmark = pytest.mark.fuse

D = "dddddddd-0000-4000-8000-00000000000d"
U1 = "11111111-0000-4000-8000-000000000001"
U2 = "11111111-0000-4000-8000-000000000002"
TYPES = f"/sys/class/mdev_bus/{GVT_PARENT}/mdev_supported_types"


def owners(cli: Cli) -> dict[str, str]:
    rows = cli.json("list")
    assert isinstance(rows, list)
    return {r["uuid"]: r["owner"] for r in rows}


def foreign_definition(root: HostRoot, uuid: str = D, start: str = "manual") -> Path:
    """A definition written as mdevctl writes it (its own file, not vgpuctl's)."""
    definitions.write(root, Definition(uuid, GVT_PARENT, "i915-GVTg_V5_8", start))
    return root.path(definitions.definition_path(root, GVT_PARENT, uuid))


def test_starting_a_foreign_definition_does_not_make_it_ours(gvt: Cli) -> None:
    path = foreign_definition(gvt.root)
    text = path.read_text()
    gvt("start", "-u", D)
    assert owners(gvt) == {D: "other"}  # the row is the definition's, and that stays mdevctl's
    gvt("stop", "-u", D)  # the device was vgpuctl's to stop: vgpuctl created it
    code, _, err = gvt("undefine", "-u", D, ok=False)
    assert code == 1 and "not created by vgpuctl" in err and "--force" in err
    assert path.read_text() == text and owners(gvt) == {D: "other"}


def test_autostart_of_a_foreign_auto_definition_does_not_make_it_ours(gvt: Cli) -> None:
    path = foreign_definition(gvt.root, start="auto")
    _, out, _ = gvt("autostart")
    assert out == f"{D} {GVT_PARENT} i915-GVTg_V5_8: started\n"
    for args in (["undefine", "-u", D], ["modify", "-u", D, "--manual"]):
        code, _, err = gvt(*args, ok=False)
        assert code == 1 and "--force" in err, args
    assert path.exists() and owners(gvt) == {D: "other"}
    gvt("undefine", "-u", D, "--force")  # the user said so
    assert not path.exists()


def test_a_device_started_from_our_definition_is_ours_even_after_a_reboot(gvt: Cli) -> None:
    gvt("define", "-u", U1, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "--auto")
    gvt("autostart")
    # The device record is gone once the device is (a reboot, or another tool); the definition's stays.
    gvt.root.write_text(f"/sys/bus/mdev/devices/{U1}/remove", "1")
    gvt.root.write_text(f"{TYPES}/i915-GVTg_V5_4/create", U1)  # mdevctl's autostart at boot, say
    assert owners(gvt) == {U1: "vgpuctl"}
    gvt("stop", "-u", U1)


def test_a_foreign_device_under_a_uuid_we_once_had_is_not_ours(gvt: Cli) -> None:
    gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", U1)
    gvt.root.write_text(f"/sys/bus/mdev/devices/{U1}/remove", "1")  # removed by another tool
    gvt.root.write_text(f"{TYPES}/i915-GVTg_V5_8/create", U1)  # and made again by it
    assert owners(gvt) == {U1: "other"}
    code, _, err = gvt("remove", "-u", U1, ok=False)
    assert code == 1 and "not created by vgpuctl" in err


@pytest.mark.parametrize("attr", ["../../../../../../../tmp/pwned", "intel_vgpu/../../../../escape", ".."])
def test_attributes_never_leave_the_device(gvt: Cli, tmp_path: Path, attr: str) -> None:
    before = set(os.listdir(gvt.root.root))
    code, _, err = gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", U1, "--attr", f"{attr}=x",
                       ok=False)
    assert code == 1 and "attribute" in err and "Traceback" not in err
    code, _, err = gvt("define", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", U2, "--attr", f"{attr}=x",
                       ok=False)
    assert code == 1 and "attribute" in err
    assert owners(gvt) == {} and set(os.listdir(gvt.root.root)) == before
    assert not Path("/tmp/pwned").exists() and not (gvt.root.root.parent / "escape").exists()


def test_an_attribute_the_device_does_not_have_is_refused_and_the_device_removed(gvt: Cli) -> None:
    # A definition with a bad attribute (written by hand) must not make a new file at start.
    definitions.write(gvt.root, Definition(U1, GVT_PARENT, "i915-GVTg_V5_4", "auto", [("no_such_attr", "1")]))
    code, out, _ = gvt("autostart", ok=False)
    assert code == 1 and "has no attribute 'no_such_attr'" in out
    assert not gvt.root.exists(f"/sys/bus/mdev/devices/{U1}")


@pytest.mark.parametrize("parent", ["../../../tmp/escaped", "a/..", ".."])
def test_parents_are_names_not_paths(gvt: Cli, tmp_path: Path, parent: str) -> None:
    code, _, err = gvt("define", "-p", parent, "-t", "i915-GVTg_V5_4", ok=False)
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err
    env = {**os.environ, "VGPUCTL_ROOT": str(gvt.root.root), "VGPUCTL_STATE_DIR": str(gvt.state)}
    ran = subprocess.run([sys.executable, "-m", "vgpuctl", "mdevctl", "define", "-u", U1, "-p", parent, "-t",
                          "i915-GVTg_V5_4"], env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1 and ran.stderr.startswith("Error: Invalid parent"), ran
    assert not list(Path("/tmp").glob("escaped*")) and not (gvt.root.root.parent / "tmp").exists()


def test_a_damaged_state_file_changes_nothing(gvt: Cli) -> None:
    gvt.state.mkdir(parents=True)
    atomic_write(gvt.state / "owned.json", b"{broken")
    for args in (["create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", U1],
                 ["define", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", U2]):
        code, _, err = gvt(*args, ok=False)
        assert code == 1 and "owned.json is damaged" in err and "moved away" in err, args
    assert not gvt.root.exists(f"/sys/bus/mdev/devices/{U1}")
    assert not gvt.root.exists(definitions.definition_path(gvt.root, GVT_PARENT, U2))


def test_a_bad_definition_file_hides_nothing(gvt: Cli) -> None:
    gvt("define", "-u", U1, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "--auto")
    bad = gvt.root.path(definitions.definition_path(gvt.root, GVT_PARENT, D))
    bad.write_text("{not json")
    code, out, err = gvt("list", "--json")
    assert [r["uuid"] for r in json.loads(out)] == [U1]
    assert f"{definitions.definition_path(gvt.root, GVT_PARENT, D)} cannot be read (invalid json" in err
    gvt("define", "-u", U2, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_8")
    code, out, _ = gvt("autostart", ok=False)  # the boot's autostart: the good one starts, the bad one is named
    assert code == 1 and f"{U1} {GVT_PARENT} i915-GVTg_V5_4: started" in out and str(D) in out
    # Removing our vGPU is not disturbed by someone else's broken file, and forgets our device record.
    gvt("stop", "-u", U1)
    assert owners(gvt) == {U1: "vgpuctl", U2: "vgpuctl"}  # the definitions stay ours
    assert json.loads((gvt.state / "owned.json").read_text())["devices"] == {}


def test_temp_files_of_killed_writes_are_cleaned(gvt: Cli) -> None:
    gvt("create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", U1)
    stale = gvt.state / ".owned.json.999999999.1.tmp"  # no such pid
    stale.write_text("{half")
    gvt("remove", "-u", U1)
    assert not stale.exists()


def test_version_1_records_are_read(gvt: Cli) -> None:
    gvt("define", "-u", U1, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4")
    since = "2026-01-01T00:00:00+0000"
    atomic_write(gvt.state / "owned.json", json.dumps(
        {"vgpus": {U1: {"parent": GVT_PARENT, "type": "i915-GVTg_V5_4", "since": since}}}).encode())
    assert owners(gvt) == {U1: "vgpuctl"}
    gvt("undefine", "-u", U1)
