"""Issue 11 through the service: an unreadable file is reported (API, metrics) and hides nothing; unknown
parents are refused; a damaged state file changes nothing."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import GVT_PARENT, MountFn
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.mdev import definitions
from vgpuctl.mdev.definitions import Definition, atomic_write
from vgpuctl.mdev.state import Journal
from vgpuctl.service.app import create_app

pytestmark = pytest.mark.fuse

TOKEN = "problems-test-token"
API = "/api/v1"
GOOD = "33333333-0000-4000-8000-000000000001"
BAD = "33333333-0000-4000-8000-000000000002"


@pytest.fixture
def served(mount_host: MountFn) -> Iterator[tuple[HostRoot, StateDir, TestClient]]:
    root = mount_host("coffeelake", aperture_mib=1024)
    state = StateDir(Path(tempfile.mkdtemp(prefix="vgpr-")))
    with TestClient(create_app(root, state, token=TOKEN), base_url="http://127.0.0.1",
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield root, state, client
    shutil.rmtree(state.path, ignore_errors=True)


def test_unreadable_files_are_reported_and_hide_nothing(served: tuple[HostRoot, StateDir, TestClient]) -> None:
    root, state, client = served
    definitions.write(root, Definition(GOOD, GVT_PARENT, "i915-GVTg_V5_4", "auto"))
    bad_definition = definitions.definition_path(root, GVT_PARENT, BAD)
    root.path(bad_definition).write_text('{"mdev_type": ')
    vms = state.path / "vms"
    vms.mkdir(parents=True)
    (vms / "broken.toml").write_text("memory_mib = [")
    (vms / "dir.toml").mkdir()

    found = client.get(f"{API}/problems").json()
    assert [(p["kind"], p["path"]) for p in found] == [
        ("definition", bad_definition), ("vm_spec", str(vms / "broken.toml")), ("vm_spec", str(vms / "dir.toml"))]
    assert all(p["error"] for p in found)
    assert [r["uuid"] for r in client.get(f"{API}/vgpus").json()] == [GOOD]  # the good one still listed
    assert client.get(f"{API}/vms").status_code == 200
    scraped = client.get("/metrics").text
    assert 'vgpuctl_unreadable_files{kind="definition"} 1.0' in scraped
    assert 'vgpuctl_unreadable_files{kind="vm_spec"} 2.0' in scraped
    assert 'vgpuctl_collect_errors{source="problems"} 0.0' in scraped


def test_a_definition_on_an_unknown_parent_is_refused(served: tuple[HostRoot, StateDir, TestClient]) -> None:
    root, _, client = served
    for parent in ("0000:00:09.0", "../../../tmp/x", "a/.."):
        answer = client.post(f"{API}/definitions", json={"uuid": GOOD, "parent": parent, "type": "i915-GVTg_V5_4"})
        assert answer.status_code in (404, 422), (parent, answer.text)
        assert answer.json()["error"] in ("not_found", "invalid_input"), answer.text
    assert definitions.load_all(root) == []


def test_a_damaged_state_file_makes_no_vgpu(served: tuple[HostRoot, StateDir, TestClient]) -> None:
    root, state, client = served
    state.path.mkdir(parents=True, exist_ok=True)
    atomic_write(Journal(state).file, b"{broken")
    answer = client.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_4", "uuid": GOOD})
    assert answer.status_code >= 400 and "owned.json is damaged" in answer.json()["message"], answer.text
    assert not root.exists(f"/sys/bus/mdev/devices/{GOOD}")


def test_starting_a_foreign_definition_through_the_api_does_not_make_it_ours(
        served: tuple[HostRoot, StateDir, TestClient]) -> None:
    root, _, client = served
    definitions.write(root, Definition(BAD, GVT_PARENT, "i915-GVTg_V5_8", "auto"))  # as mdevctl writes it
    path = root.path(definitions.definition_path(root, GVT_PARENT, BAD))
    assert client.post(f"{API}/definitions/{BAD}/start").status_code < 300
    assert client.delete(f"{API}/vgpus/{BAD}").status_code < 300  # the device vgpuctl started is its own
    answer = client.delete(f"{API}/definitions/{BAD}")
    assert answer.status_code == 409 and answer.json()["error"] == "not_owned", answer.text
    assert path.exists()
    assert [r["owner"] for r in client.get(f"{API}/vgpus").json()] == ["other"]
