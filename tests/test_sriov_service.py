"""SR-IOV vGPUs beside mdev ones (issue 13): ``vfs list`` with NVIDIA's vendor-VFIO PFs, ``gpus`` and ``types``
showing SR-IOV PFs, the chooser across every backend, and the service's ``/api/v1/vfs``, its enable/disable and
the SR-IOV gauges of ``/metrics`` — on simulated Alder Lake (i915-sriov-dkms), Arc Pro B60 (xe) and L40S hosts."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API, AUTH, BASE, TOKEN, Cli, GoldenFn, MountFn, error_of
from vgpuctl.backends import offered_types, sriov_nvidia
from vgpuctl.base.errors import CapacityError, InvalidInput, NotFound
from vgpuctl.base.state import StateDir
from vgpuctl.cli.app import cli as vgpuctl
from vgpuctl.host import HostRoot, pci
from vgpuctl.mdev.choose import Request, choose_on_host
from vgpuctl.service.app import create_app

pytestmark = pytest.mark.fuse

INTEL_PF = "0000:00:02.0"
B60_PF = "0000:03:00.0"
NVIDIA_PF = "0000:41:00.0"
CONTROL = "/.vgpuctl-sim-control"
L40S_8Q = 1159


def control(root: HostRoot, command: str) -> None:
    root.path(CONTROL).write_text(command + "\n")


def sriov_manage(root: HostRoot) -> list[str]:
    """NVIDIA's sriov-manage -e ALL (the simulator's stand-in): every VF of the L40S, on nvidia."""
    done = subprocess.run(["sh", str(root.path("/usr/lib/nvidia/sriov-manage")), "-e", "ALL"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [vf.address for vf in pci.read_pf(root, NVIDIA_PF).vfs]


def render(cli: Cli, *args: str) -> str:
    """What the CLI prints at 120 columns without colour, the host's path as <ROOT>."""
    from click.testing import CliRunner

    result = CliRunner().invoke(vgpuctl, ["--root", str(cli.root.root), "--state-dir", str(cli.state), *args],
                                env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout.replace(str(cli.root.root), "<ROOT>")


@pytest.fixture
def state() -> Iterator[StateDir]:
    directory = Path(tempfile.mkdtemp(prefix="vgsr-"))
    yield StateDir(directory)
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------- listings


def test_gpus_and_types_show_intel_pfs_with_their_vf_quotas(mount_host: MountFn, tmp_path: Path,
                                                             golden: GoldenFn) -> None:
    cli = Cli(mount_host("adl-sriov"), tmp_path / "state")
    golden("listings/sriov-adl-off-gpus.txt", render(cli, "gpus"))
    off = cli.json("types")
    assert isinstance(off, list) and [(t["type"], t["available_instances"]) for t in off] == [("intel-sriov-vf", 0)]
    cli("vfs", "enable", INTEL_PF, "3")
    control(cli.root, "open 0000:00:02.2")  # a VM outside vgpuctl holds one
    for command in ("gpus", "types"):
        golden(f"listings/sriov-adl-3-{command}.txt", render(cli, command))
        golden(f"listings/sriov-adl-3-{command}.json", render(cli, command, "--json"))
    rows = cli.json("gpus")
    assert isinstance(rows, list) and len(rows) == 1
    sriov = rows[0]["sriov"]
    # i915-sriov-dkms's fair share of 3: (free GGTT - 64 MiB spare) / 3, aligned down to 4 KiB (sriov.md 2.4.1)
    assert (sriov["enabled_vfs"], sriov["vfio_bound"], sriov["free"], sriov["held"]) == (3, 3, 2, ["0000:00:02.2"])
    assert [q["ggtt_mib"] for q in sriov["quotas"]] == [1088] * 3 and sriov["quotas"][0]["memory_from"] == "ggtt"
    types = cli.json("types", "-p", INTEL_PF)
    assert isinstance(types, list) and types[0]["available_instances"] == 2 and types[0]["memory_mib"] == 1088


def test_an_xe_pf_lists_its_debugfs_quotas(mount_host: MountFn, tmp_path: Path, golden: GoldenFn) -> None:
    cli = Cli(mount_host("b60-xe"), tmp_path / "state")
    cli("vfs", "enable", B60_PF, "2")
    golden("listings/sriov-b60-2-gpus.txt", render(cli, "gpus"))
    rows = cli.json("gpus")
    assert isinstance(rows, list)
    quotas = rows[0]["sriov"]["quotas"]
    assert [q["vf"] for q in quotas] == [1, 2] and all(q["ggtt_mib"] and q["contexts"] for q in quotas)
    # xe's fair LMEM (pf_estimate_fair_lmem): (24 GiB - the PF's 128 MiB spare) / 2, 2 MiB aligned; the chooser's
    # memory on a dGPU
    assert [(q["lmem_mib"], q["memory_from"]) for q in quotas] == [(12224, "lmem")] * 2
    assert rows[0]["sriov"]["vfio_driver"] == "xe-vfio-pci" and rows[0]["sriov"]["vfio_bound"] == 2


def test_nvidia_pfs_are_listed_with_each_vfs_type_and_what_the_pf_can_take(mount_host: MountFn, tmp_path: Path,
                                                                           golden: GoldenFn) -> None:
    cli = Cli(mount_host("l40s-vfio"), tmp_path / "state")
    before = cli.json("vfs", "list")
    assert isinstance(before, dict) and before["pfs"][0]["problem"].startswith("no VFs enabled: run")
    vfs = sriov_manage(cli.root)
    sriov_nvidia.assign(cli.root, vfs[0], L40S_8Q)
    control(cli.root, f"open {vfs[0]}")
    listed = cli.json("vfs", "list")
    assert isinstance(listed, dict)
    (row,) = listed["pfs"]
    assert (row["backend"], row["vendor_id"], row["vfio_driver"], row["enabled_vfs"]) == \
        ("nvidia-vfio", "10de", "nvidia", 32)
    first, second = row["vfs"][0], row["vfs"][1]
    assert first["vgpu_type"] == {"id": L40S_8Q, "name": "NVIDIA L40S-8Q"}  # named from a sibling's list
    assert first["creatable"] == [] and first["opened_by"] == "a simulated VM"
    # homogeneous placement: after an 8 GiB type only 8 GiB types fit on the siblings (sriov.md 3.3)
    assert second["vgpu_type"] is None and second["creatable"] == [L40S_8Q, 1172]
    assert [(t["name"], t["framebuffer_mib"], t["free_vfs"]) for t in row["types"]] == \
        [("NVIDIA L40S-8Q", 8192, 31), ("NVIDIA L40S-8C", 8192, 31)]
    text = render(cli, "vfs", "list")
    assert f"{NVIDIA_PF}  nvidia  10de:26b9  VFs 32/32" in text and "type 1159 (NVIDIA L40S-8Q)" in text
    golden("vfs/l40s-vfio-1.txt", text)
    golden("vfs/l40s-vfio-1.json", render(cli, "vfs", "list", "--json"))
    for command in ("gpus", "types"):
        golden(f"listings/sriov-l40s-{command}.txt", render(cli, command))
        golden(f"listings/sriov-l40s-{command}.json", render(cli, command, "--json"))
    gpus = cli.json("gpus")
    assert isinstance(gpus, list)
    assert gpus[0]["sriov"]["held"] == [vfs[0]] and gpus[0]["sriov"]["free"] == 31


# ---------------------------------------------------------------------- the chooser across every backend


def test_the_chooser_takes_an_intel_vf_by_its_ggtt_quota(mount_host: MountFn, tmp_path: Path) -> None:
    cli = Cli(mount_host("adl-sriov"), tmp_path / "state")
    with pytest.raises(NotFound, match=r"intel-sriov-vf: no VFs enabled \(vgpuctl vfs enable PF N\)"):
        choose_on_host(cli.root, Request(min_memory_mib=512))  # a PF without VFs offers none
    cli("vfs", "enable", INTEL_PF, "3")
    choice = choose_on_host(cli.root, Request(min_memory_mib=1024))
    assert (choice.chosen.parent, choice.chosen.type_id) == (INTEL_PF, "intel-sriov-vf")
    assert "1088 MiB graphics memory, its GGTT quota" in choice.reason and "3 can be created" in choice.reason
    with pytest.raises(NotFound) as too_much:
        choose_on_host(cli.root, Request(min_memory_mib=2048))
    assert too_much.value.data["rejected"] == [f"{INTEL_PF} intel-sriov-vf: 1088 MiB"]
    # no display of its own: any resolution is the emulated adapter's, and the reason says so
    wide = choose_on_host(cli.root, Request(resolution=(3840, 2160)))
    assert wide.chosen.type_id == "intel-sriov-vf" and "no display of its own" in wide.reason
    # VFs held by VMs are not free
    assert choose_on_host(cli.root, Request(min_memory_mib=1), held={"0000:00:02.1"}).chosen.available_instances == 2
    with pytest.raises(CapacityError, match="stop a VM on a VF, enable more VFs"):
        choose_on_host(cli.root, Request(min_memory_mib=1), held={f"0000:00:02.{n}" for n in (1, 2, 3)})
    # `vgpuctl create` makes mdevs: it says how a VM takes the VF instead
    dry = cli.json("create", "--min-memory", "1024", "--dry-run")
    assert isinstance(dry, dict) and dry["type"] == "intel-sriov-vf" and dry["parent"] == INTEL_PF
    code, _, err = cli("create", "--min-memory", "1024", ok=False)
    assert code == 1 and f"vgpuctl vm create NAME --vf {INTEL_PF}" in err and "--type" not in err


def test_the_chooser_takes_the_smallest_nvidia_type_that_fits(mount_host: MountFn, tmp_path: Path) -> None:
    root = mount_host("l40s-vfio")
    vfs = sriov_manage(root)
    choice = choose_on_host(root, Request(resolution=(3840, 2160), min_memory_mib=5000))
    assert (choice.chosen.type_id, choice.chosen.name) == ("nvidia-vfio:1158", "NVIDIA L40S-6Q")
    assert "6144 MiB graphics memory" in choice.reason
    # a compute (C) type has no display: a resolution rules it out
    compute = next(t for t in offered_types(root) if t.name == "NVIDIA L40S-4C")
    assert compute.resolution is None and compute.memory_mib == 4096
    sriov_nvidia.assign(root, vfs[0], L40S_8Q)  # now only 8 GiB types fit on the siblings
    after = choose_on_host(root, Request(min_memory_mib=1000))
    assert after.chosen.type_id == "nvidia-vfio:1159" and after.chosen.available_instances == 31
    with pytest.raises(InvalidInput, match=rf"vm create NAME --vf {NVIDIA_PF} --type 1159") as refused:
        from vgpuctl.mdev.choose import require_creatable

        require_creatable(after)
    assert refused.value.data["type"] == "nvidia-vfio:1159"


def test_names_and_framebuffers_of_nvidia_types() -> None:
    assert sriov_nvidia.framebuffer_mib("NVIDIA H200X-1-18C") == 18 * 1024
    assert sriov_nvidia.framebuffer_mib("NVIDIA A16-2Q") == 2048 and sriov_nvidia.max_resolution("NVIDIA A16-2Q")
    assert sriov_nvidia.max_resolution("NVIDIA H200X-141C") is None
    assert sriov_nvidia.framebuffer_mib("NVIDIA mystery") is None


# ---------------------------------------------------------------------- the service


def test_the_api_lists_enables_and_disables_vfs(mount_host: MountFn, state: StateDir) -> None:
    root = mount_host("adl-sriov")
    cli = Cli(root, state.path)
    with TestClient(create_app(root, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        listed = client.get(f"{API}/vfs")
        assert listed.status_code == 200 and listed.json() == cli.json("vfs", "list")["pfs"]  # type: ignore[index]
        enabled = client.post(f"{API}/vfs/{INTEL_PF}/enable", json={"count": 2})
        assert enabled.status_code == 200, enabled.text
        row = enabled.json()
        assert row["enabled_vfs"] == 2 and [vf["driver"] for vf in row["vfs"]] == ["vfio-pci"] * 2
        assert row["enabled_by_vgpuctl"] is True and client.get(f"{API}/vfs").json()[0] == row
        assert client.get(f"{API}/gpus").json() == cli.json("gpus")
        assert client.get(f"{API}/types").json() == cli.json("types")
        dry = client.post(f"{API}/vgpus", json={"min_memory": 1024, "dry_run": True})
        assert dry.status_code == 200 and (dry.json()["parent"], dry.json()["type"]) == (INTEL_PF, "intel-sriov-vf")
        made = client.post(f"{API}/vgpus", json={"min_memory": 1024})
        assert made.status_code == 422 and made.json()["data"]["how"] == f"vgpuctl vm create NAME --vf {INTEL_PF}"
        # the kernel's and vgpuctl's refusals are the API's JSON errors, with their data
        status, kind, message = error_of(client.post(f"{API}/vfs/{INTEL_PF}/enable", json={"count": 8}))
        assert (status, kind) == (422, "invalid_input") and "at most 7 VFs" in message
        too_many = client.post(f"{API}/vfs/{INTEL_PF}/enable", json={"count": 8}).json()
        assert too_many["data"] == {"what": "count", "parent": INTEL_PF, "total": 7, "count": 8}
        control(root, "open 0000:00:02.1")
        busy = client.post(f"{API}/vfs/{INTEL_PF}/disable")
        assert busy.status_code == 409 and busy.json()["error"] == "conflict"
        assert busy.json()["data"]["holder"] == "a simulated VM" and "stop those VMs" in busy.json()["message"]
        control(root, "close 0000:00:02.1")
        off = client.post(f"{API}/vfs/{INTEL_PF}/disable", json={"timeout": 5})
        assert off.status_code == 200 and off.json()["vfs"] == [] and off.json()["enabled_vfs"] == 0
        assert error_of(client.post(f"{API}/vfs/0000:00:1f.0/enable", json={"count": 1}))[:2] == (404, "not_found")
        assert error_of(client.post(f"{API}/vfs/not-a-pf/enable", json={"count": 1}))[:2] == (422, "invalid_input")
        assert error_of(client.post(f"{API}/vfs/{INTEL_PF}/enable", json={"count": 0}))[:2] == (422, "invalid_input")


def test_the_api_provisions_restores_after_a_reboot_and_enables_nvidia(mount_host: MountFn, state: StateDir) -> None:
    root = mount_host("adl-sriov")
    with TestClient(create_app(root, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        body = {"vfs": ["1-2"], "ggtt": "512M", "contexts": 1024, "doorbells": 16}
        provisioned = client.post(f"{API}/vfs/{INTEL_PF}/provision", json=body)
        assert provisioned.status_code == 200, provisioned.text
        assert provisioned.json()["quotas"]["1"] == {"ggtt": 512 << 20, "contexts": 1024, "doorbells": 16}
        assert client.post(f"{API}/vfs/{INTEL_PF}/enable", json={"count": 2}).json()["enabled_vfs"] == 2
        status, kind, message = error_of(client.post(f"{API}/vfs/{INTEL_PF}/provision", json={"ggtt": "lots"}))
        assert (status, kind) == (422, "invalid_input") and "not a size" in message
        control(root, "reboot")  # VFs are runtime state: the reboot has none
        assert client.get(f"{API}/vfs").json()[0]["enabled_vfs"] == 0
        restored = client.post(f"{API}/vfs/restore")
        assert restored.status_code == 200 and [r["outcome"] for r in restored.json()] == ["restored"]
        row = client.get(f"{API}/vfs").json()[0]
        assert row["enabled_vfs"] == 2 and row["vfs"][1]["quota"]["ggtt"] == 512 << 20
        assert [r["outcome"] for r in client.post(f"{API}/vfs/restore").json()] == ["already"]
    root = mount_host("l40s-vfio")
    with TestClient(create_app(root, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        status, kind, message = error_of(client.post(f"{API}/vfs/{NVIDIA_PF}/enable", json={"count": 2}))
        assert (status, kind) == (422, "invalid_input") and "give no count" in message
        enabled = client.post(f"{API}/vfs/{NVIDIA_PF}/enable", json={})
        assert enabled.status_code == 200, enabled.text
        assert enabled.json()["enabled_vfs"] == 32 and enabled.json()["enabled_by_vgpuctl"]
        assert client.post(f"{API}/vfs/{NVIDIA_PF}/disable").json()["enabled_vfs"] == 0


def test_the_kernels_refusal_is_a_kernel_error_with_its_errno(mount_host: MountFn, state: StateDir) -> None:
    root = mount_host("adl-sriov-nomaxvfs")  # i915-sriov-dkms without max_vfs: totalvfs 0, ERANGE on any N
    with TestClient(create_app(root, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        refused = client.post(f"{API}/vfs/{INTEL_PF}/enable", json={"count": 2})
        body = refused.json()
        assert (refused.status_code, body["error"]) == (409, "kernel_error"), body
        assert "i915.max_vfs is 0" in body["message"]
        assert body["data"]["errno"] == 34 and body["data"]["driver"] == "i915" and body["data"]["parent"] == INTEL_PF


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_each_pfs_vfs(mount_host: MountFn, state: StateDir) -> None:
    root = mount_host("adl-sriov")
    Cli(root, state.path)("vfs", "enable", INTEL_PF, "3")
    control(root, "open 0000:00:02.3")
    with TestClient(create_app(root, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    samples = _samples(response.text)
    labels = (("backend", "sriov-intel"), ("pf", INTEL_PF))
    assert {name: samples[(name, labels)] for name in
            ("vgpuctl_sriov_vfs_total", "vgpuctl_sriov_vfs_enabled", "vgpuctl_sriov_vfs_free",
             "vgpuctl_sriov_vfs_held")} == {"vgpuctl_sriov_vfs_total": 7, "vgpuctl_sriov_vfs_enabled": 3,
                                            "vgpuctl_sriov_vfs_free": 2, "vgpuctl_sriov_vfs_held": 1}
    assert samples[("vgpuctl_collect_errors", (("source", "vfs"),))] == 0


def test_metrics_of_an_nvidia_pf(mount_host: MountFn, state: StateDir) -> None:
    root = mount_host("l40s-vfio")
    vfs = sriov_manage(root)
    sriov_nvidia.assign(root, vfs[1], L40S_8Q)  # a type set, no VM yet: not free
    with TestClient(create_app(root, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        samples = _samples(client.get("/metrics").text)
        assert json.loads(json.dumps(client.get(f"{API}/vfs").json()))[0]["vfs"][1]["vgpu_type"]["id"] == L40S_8Q
    labels = (("backend", "nvidia-vfio"), ("pf", NVIDIA_PF))
    assert samples[("vgpuctl_sriov_vfs_enabled", labels)] == 32 and samples[("vgpuctl_sriov_vfs_free", labels)] == 31
    assert samples[("vgpuctl_sriov_vfs_held", labels)] == 0


def test_an_mdev_host_has_no_sriov_rows_or_gauges(mount_host: MountFn, state: StateDir) -> None:
    root = mount_host("coffeelake", aperture_mib=1024)
    with TestClient(create_app(root, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        assert client.get(f"{API}/vfs").json() == []
        assert all("sriov" not in row for row in client.get(f"{API}/gpus").json())
        text = client.get("/metrics").text
    assert "vgpuctl_sriov_vfs_total{" not in text and 'vgpuctl_collect_errors{source="vfs"} 0.0' in text


# ---------------------------------------------------------------------- a VM's requirements met by a VF


def _wanting(state: StateDir, name: str, guest: Path, **requirements: object) -> None:
    from tests.conftest import new_vm
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.spec import VgpuRequest

    new_vm(state, name, guest)
    spec = specs.load(state, name)
    spec.vgpu, spec.vgpu_display, spec.ramfb = VgpuRequest(**requirements), False, False  # type: ignore[arg-type]
    specs.save(state, spec)


def test_a_vm_asking_for_memory_gets_an_intel_vf_and_runs_on_it(mount_host: MountFn, state: StateDir,
                                                                 guest: Path) -> None:
    from vgpuctl.vm import lifecycle
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.runtime import resolve_vgpu

    root = mount_host("adl-sriov")
    cli = Cli(root, state.path)
    _wanting(state, "big", guest, min_memory_mib=1024)
    with pytest.raises(NotFound, match="no VFs enabled"):
        resolve_vgpu(root, specs.load(state, "big"))
    cli("vfs", "enable", INTEL_PF, "2")
    resolved = resolve_vgpu(root, specs.load(state, "big"))
    assert resolved is not None and (resolved.uuid, resolved.parent, resolved.type_id, resolved.state) == \
        ("0000:00:02.1", INTEL_PF, "intel-sriov-vf", "active")
    assert "its GGTT quota" in resolved.reason and "the first free VF" in resolved.reason
    shown = specs.load(state, "big")
    shown.vgpu_display = True  # an Intel VF has no display of its own: not a candidate then
    with pytest.raises(NotFound):
        resolve_vgpu(root, shown)
    _wanting(state, "huge", guest, min_memory_mib=4096)
    with pytest.raises(NotFound, match="1632 MiB"):  # a fair half of the GGTT
        resolve_vgpu(root, specs.load(state, "huge"))
    try:
        started = lifecycle.start(root, state, "big", accel="tcg")
        assert started.state == "running" and started.vgpu == "0000:00:02.1"
        listed = cli.json("vfs", "list")
        assert isinstance(listed, dict) and listed["pfs"][0]["vfs"][0]["vm"] == "big"
        _wanting(state, "second", guest, min_memory_mib=1024)
        second = resolve_vgpu(root, specs.load(state, "second"), taken={"0000:00:02.1": "big"})
        assert second is not None and second.uuid == "0000:00:02.2"  # the VF big runs on is not free
        assert choose_on_host(root, Request(min_memory_mib=1), held={"0000:00:02.1"}).chosen.available_instances == 1
    finally:
        if lifecycle.status(root, state, "big").state != "stopped":
            lifecycle.stop(root, state, "big", timeout_s=10)
    listed = cli.json("vfs", "list")
    assert isinstance(listed, dict) and listed["pfs"][0]["vfs"][0]["vm"] is None


def test_a_vm_asking_for_a_resolution_and_memory_gets_the_smallest_nvidia_type(mount_host: MountFn,
                                                                               state: StateDir, guest: Path) -> None:
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.runtime import resolve_vgpu

    root = mount_host("l40s-vfio")
    vfs = sriov_manage(root)
    _wanting(state, "cad", guest, resolution="3840x2160", min_memory_mib=5000)
    resolved = resolve_vgpu(root, specs.load(state, "cad"))
    assert resolved is not None and (resolved.uuid, resolved.parent, resolved.type_id, resolved.state) == \
        (vfs[0], NVIDIA_PF, "nvidia-vfio:1158", "new")
    assert "6144 MiB graphics memory" in resolved.reason and "can take type 1158" in resolved.reason
    sriov_nvidia.assign(root, vfs[0], L40S_8Q)  # homogeneous now: 8 GiB types only, on the other VFs
    again = resolve_vgpu(root, specs.load(state, "cad"), taken={vfs[0]})
    assert again is not None and (again.uuid, again.type_id) == (vfs[1], "nvidia-vfio:1159")
