"""``vgpuctl serve``: the API, auth, events and metrics against a mounted simulated host, in-process
(TestClient), under a real uvicorn (thread and subprocess), and fuzzed by schemathesis."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from click.testing import CliRunner
from fastapi import Depends, FastAPI, WebSocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.conftest import API, AUTH, BASE, GVT_PARENT, TOKEN, MountFn, error_of, free_port, serving
from vgpuctl.base.state import StateDir
from vgpuctl.cli.app import cli
from vgpuctl.host import HostRoot
from vgpuctl.mdev.lifecycle import Manager
from vgpuctl.service import metrics
from vgpuctl.service.app import create_app
from vgpuctl.service.auth import COOKIE, Authenticator, load_or_create_token, require_auth, token_path

pytestmark = pytest.mark.fuse

U1 = "22222222-0000-4000-8000-000000000001"
U2 = "22222222-0000-4000-8000-000000000002"


@pytest.fixture
def host(mount_host: MountFn) -> HostRoot:
    return mount_host("coffeelake", aperture_mib=1024)


@pytest.fixture
def state() -> Iterator[StateDir]:
    # Short: QMP/VNC socket paths must stay under 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="vgsv-"))
    yield StateDir(directory)
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def client(host: HostRoot, state: StateDir) -> Iterator[TestClient]:
    with TestClient(create_app(host, state, token=TOKEN), base_url=BASE, headers=AUTH) as test_client:
        yield test_client


def cli_json(host: HostRoot, state: StateDir, *args: str) -> Any:
    result = CliRunner().invoke(cli, ["--root", str(host.root), "--state-dir", str(state.path), *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)



# ---------------------------------------------------------------------- the host, as the CLI shows it


def test_listings_are_the_clis_json(client: TestClient, host: HostRoot, state: StateDir) -> None:
    assert client.get(f"{API}/gpus").json() == cli_json(host, state, "gpus")
    assert client.get(f"{API}/types").json() == cli_json(host, state, "types")
    assert client.get(f"{API}/types", params={"parent": GVT_PARENT}).json() == \
        cli_json(host, state, "types", "-p", GVT_PARENT)
    assert client.get(f"{API}/vgpus").json() == [] == cli_json(host, state, "list")

    created = client.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_4", "uuid": U1})
    assert created.status_code == 201
    assert created.json() == {"uuid": U1, "parent": GVT_PARENT, "type": "i915-GVTg_V5_4", "reason": None}
    defined = client.post(f"{API}/definitions", json={"uuid": U2, "parent": GVT_PARENT, "type": "i915-GVTg_V5_8",
                                                      "start": "auto", "attrs": [{"a": "1"}]})
    assert defined.status_code == 201
    assert defined.json() == {"uuid": U2, "parent": GVT_PARENT, "type": "i915-GVTg_V5_8", "start": "auto",
                              "attrs": [{"a": "1"}]}
    gpus = client.get(f"{API}/gpus").json()
    assert gpus == cli_json(host, state, "gpus") and gpus[0]["active_vgpus"] == [U1]
    assert gpus[0]["pools"]["low GM (aperture)"]["used"] == 128
    for query, args in (({}, ()), ({"defined": "true"}, ("-d",)), ({"active": "true"}, ("--active",)),
                        ({"uuid": U2}, ("-u", U2)), ({"parent": GVT_PARENT}, ("-p", GVT_PARENT))):
        assert client.get(f"{API}/vgpus", params=query).json() == cli_json(host, state, "list", *args), query
    rows = client.get(f"{API}/vgpus").json()
    assert [(r["uuid"], r["active"], r["defined"], r["owner"]) for r in rows] == \
        [(U1, True, False, "vgpuctl"), (U2, False, True, "vgpuctl")]
    assert client.get(f"{API}/types").json() == cli_json(host, state, "types")


def test_unknown_parent_is_404_with_the_parents_there_are(client: TestClient) -> None:
    status, kind, message = error_of(client.get(f"{API}/types", params={"parent": "0000:00:03.0"}))
    assert (status, kind) == (404, "not_found") and GVT_PARENT in message


def test_doctor(client: TestClient, host: HostRoot) -> None:
    report = client.get(f"{API}/doctor", params={"guest": "false"}).json()
    assert report["simulated"] is True and report["root"] == str(host.root)
    assert isinstance(report["ready"], bool) and report["checks"]
    assert {"id", "status", "fix"} <= set(report["checks"][0])


# ---------------------------------------------------------------------- vGPUs and definitions


def test_create_choose_and_remove_vgpus(client: TestClient, host: HostRoot, state: StateDir) -> None:
    dry = client.post(f"{API}/vgpus", json={"resolution": "1920x1200", "dry_run": True})
    assert dry.status_code == 200
    assert dry.json()["type"] == "i915-GVTg_V5_4" and "smallest type" in dry.json()["reason"]
    assert client.get(f"{API}/vgpus").json() == []
    chosen = client.post(f"{API}/vgpus", json={"resolution": "1024x768", "min_memory": 500})
    assert chosen.status_code == 201 and chosen.json()["type"] == "i915-GVTg_V5_4"
    uuid = chosen.json()["uuid"]
    assert [r["uuid"] for r in client.get(f"{API}/vgpus").json()] == [uuid]
    assert client.delete(f"{API}/vgpus/{uuid}").status_code == 204
    assert client.get(f"{API}/vgpus").json() == []
    assert error_of(client.delete(f"{API}/vgpus/{uuid}"))[:2] == (404, "not_found")


def test_a_full_gpu_is_409_with_what_still_fits(client: TestClient) -> None:
    assert client.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_1"}).status_code == 201
    status, kind, message = error_of(client.post(f"{API}/vgpus", json={"parent": GVT_PARENT,
                                                                       "type": "i915-GVTg_V5_1"}))
    assert (status, kind) == (409, "capacity_error")
    assert message.startswith("no room for i915-GVTg_V5_1 on 0000:00:02.0") and "types that still fit" in message
    status, kind, message = error_of(client.post(f"{API}/vgpus", json={"resolution": "1920x1200",
                                                                       "min_memory": 2000}))
    assert (status, kind) == (409, "capacity_error") and "is full" in message


def test_bad_input_is_4xx_with_a_message(client: TestClient) -> None:
    cases: list[tuple[str, str, Any, int]] = [
        ("post", f"{API}/vgpus", {}, 422),
        ("post", f"{API}/vgpus", {"parent": GVT_PARENT, "type": "i915-GVTg_V5_4", "resolution": "1x1"}, 422),
        ("post", f"{API}/vgpus", {"parent": GVT_PARENT, "type": "i915-GVTg_V5_4", "uuid": "nope"}, 422),
        ("post", f"{API}/vgpus", {"parent": GVT_PARENT, "type": "i915-GVTg_V5_9"}, 404),
        ("post", f"{API}/vgpus", {"parent": "../../etc", "type": "i915-GVTg_V5_4"}, 422),
        ("post", f"{API}/vgpus", {"parent": GVT_PARENT, "type": "i915-GVTg_V5_4", "attrs": [{"../x": "1"}]}, 422),
        ("post", f"{API}/vgpus", {"parent": GVT_PARENT, "type": "i915-GVTg_V5_4", "attrs": [{"a": "1", "b": "2"}]},
         422),
        ("post", f"{API}/vgpus", {"resolution": "wide"}, 422),
        ("post", f"{API}/vgpus", "not json", 422),
        ("delete", f"{API}/vgpus/not-a-uuid", None, 422),
        ("post", f"{API}/definitions", {"uuid": U1}, 422),
        ("patch", f"{API}/definitions/{U1}", {}, 422),
        ("patch", f"{API}/definitions/{U1}", {"start": "auto"}, 404),
        ("post", f"{API}/vms", {"name": "Bad Name"}, 422),
        ("post", f"{API}/vms", {"name": "ok", "memory_mib": 0}, 422),
        ("post", f"{API}/vms", {"name": "ok", "wat": 1}, 422),
        ("post", f"{API}/vms", {"name": "ok", "kernel": "relative/path"}, 422),
        ("get", f"{API}/vms/nope", None, 404),
        ("get", f"{API}/vms/Not_A_Name", None, 422),
        ("post", f"{API}/vms/nope/start", {"accel": "tcg"}, 404),
        ("post", f"{API}/vms/nope/start", {"accel": "warp"}, 422),
        ("post", f"{API}/vms/nope/stop", {"timeout": -1}, 422),
        ("get", f"{API}/vms/nope/screenshot", None, 404),
        ("get", f"{API}/nothing-here", None, 404),
    ]
    for method, url, body, expected in cases:
        kwargs: dict[str, Any] = {}
        if isinstance(body, str):
            kwargs["content"] = body
            kwargs["headers"] = {"Content-Type": "application/json"}
        elif body is not None:
            kwargs["json"] = body
        response = client.request(method.upper(), url, **kwargs)
        assert response.status_code == expected, (method, url, body, response.text)
        assert error_of(response)[2], (url, body)
    problem = client.post(f"{API}/vms", json={"name": "ok", "memory_mib": 0}).json()
    assert "memory_mib must be a positive integer" in problem["message"]


def test_not_owned_needs_force(client: TestClient, host: HostRoot) -> None:
    host.write_text(f"{host.mdev_type_dir(GVT_PARENT, 'i915-GVTg_V5_8')}/create", U1)  # not vgpuctl's
    status, kind, message = error_of(client.delete(f"{API}/vgpus/{U1}"))
    assert (status, kind) == (409, "not_owned") and "--force" in message
    assert client.delete(f"{API}/vgpus/{U1}", params={"force": "true"}).status_code == 204


def test_definitions(client: TestClient, host: HostRoot, state: StateDir) -> None:
    made = client.post(f"{API}/definitions", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_8"})
    assert made.status_code == 201 and made.json()["start"] == "manual"
    uuid = made.json()["uuid"]
    assert error_of(client.post(f"{API}/definitions", json={"uuid": uuid, "parent": GVT_PARENT,
                                                            "type": "i915-GVTg_V5_8"}))[:2] == (409, "conflict")
    changed = client.patch(f"{API}/definitions/{uuid}", json={"start": "auto", "add_attr": {"name": "x", "value": "1"}})
    assert changed.status_code == 200 and changed.json()["start"] == "auto" and changed.json()["attrs"] == [{"x": "1"}]
    changed = client.patch(f"{API}/definitions/{uuid}", json={"delete_attr": True})
    assert changed.json()["attrs"] == []
    assert cli_json(host, state, "list", "-d") == client.get(f"{API}/vgpus", params={"defined": "true"}).json()
    started = client.post(f"{API}/definitions/{uuid}/start")
    assert started.status_code == 201 and started.json() == {"uuid": uuid, "parent": GVT_PARENT,
                                                             "type": "i915-GVTg_V5_8"}
    (row,) = client.get(f"{API}/vgpus").json()
    assert row["active"] and row["defined"] and row["start"] == "auto"
    assert client.delete(f"{API}/vgpus/{uuid}").status_code == 204
    assert client.delete(f"{API}/definitions/{uuid}", params={"parent": GVT_PARENT}).status_code == 204
    assert client.get(f"{API}/vgpus").json() == []


# ---------------------------------------------------------------------- VMs


def test_vm_create_start_screenshot_stop_remove(client: TestClient, host: HostRoot, state: StateDir) -> None:
    from vgpuctl.vm.testguest import build_test_guest

    guest = build_test_guest()
    body = {"name": "car1", "profile": "automotive", "kernel": str(guest), "memory_mib": 64, "cpus": 1,
            "display": {"backend": "vnc"}}
    created = client.post(f"{API}/vms", json=body)
    assert created.status_code == 201, created.text
    vm = created.json()
    assert vm["state"] == "stopped" and vm["spec"]["boot"] == "kernel" and vm["display"] == "vnc"
    assert vm["spec"]["display"]["resolution"] == "1024x768"  # the profile's, merged
    assert error_of(client.post(f"{API}/vms", json=body))[:2] == (409, "conflict")
    assert [v["name"] for v in client.get(f"{API}/vms").json()] == ["car1"]

    started = client.post(f"{API}/vms/car1/start", json={"accel": "tcg"})
    assert started.status_code == 200, started.text
    try:
        assert started.json()["state"] == "running" and started.json()["accel"] == "tcg"
        (listed,) = client.get(f"{API}/vms").json()
        assert listed["state"] == "running" and listed["running"] and listed["vgpu_uuid"] == started.json()["vgpu"]
        assert client.get(f"{API}/vms/car1/status").json()["state"] == "running"
        assert client.get(f"{API}/vms/car1").json()["file"].endswith("car1.toml")
        deadline = time.monotonic() + 20
        while True:  # the guest sets its 1024x768 mode soon after QEMU runs
            shot = client.get(f"{API}/vms/car1/screenshot")
            assert shot.status_code == 200 and shot.headers["content-type"] == "image/png"
            if struct.unpack(">II", shot.content[16:24]) == (1024, 768) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert shot.content[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", shot.content[16:24]) == (1024, 768)
        assert error_of(client.delete(f"{API}/vms/car1"))[:2] == (409, "conflict")
        assert error_of(client.post(f"{API}/vms/car1/start", json={"accel": "tcg"}))[:2] == (409, "conflict")
    finally:
        stopped = client.post(f"{API}/vms/car1/stop", json={"timeout": 10})
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    assert error_of(client.post(f"{API}/vms/car1/kill"))[:2] == (409, "conflict")
    assert error_of(client.get(f"{API}/vms/car1/screenshot"))[:2] == (409, "conflict")
    assert client.delete(f"{API}/vms/car1").status_code == 204
    assert client.get(f"{API}/vms").json() == []
    assert client.get(f"{API}/vgpus").json() == []  # the remove released the vGPU made for the VM


# ---------------------------------------------------------------------- auth


def test_requests_need_the_token(host: HostRoot, state: StateDir) -> None:
    app = create_app(host, state, token=TOKEN)
    with TestClient(app, base_url=BASE) as anonymous:
        for path in (f"{API}/gpus", f"{API}/vms", "/metrics", "/openapi.json", f"{API}/events"):
            response = anonymous.get(path)
            assert error_of(response)[:2] == (401, "unauthorized"), path
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.get(f"{API}/gpus", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anonymous.get(f"{API}/gpus", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        raw = {"Cookie": f"{COOKIE}={TOKEN}"}
        assert anonymous.get(f"{API}/gpus", headers=raw).status_code == 401  # the raw token is no session
        assert anonymous.post(f"{API}/vgpus", json={"resolution": "1024x768"}).status_code == 401
        assert anonymous.get(f"{API}/gpus", headers=AUTH).status_code == 200
        # Pages redirect to the login; the login page and static assets are public.
        page = anonymous.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        page = anonymous.get("/vm.html", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login?next=/vm.html")
        login = anonymous.get("/login")
        assert login.status_code == 200 and 'name="token"' in login.text
        assert anonymous.get("/style.css").status_code == 200
        assert anonymous.get("/app.js").status_code == 200
        assert anonymous.get("/nothing.css").status_code == 404


def test_a_token_in_the_url_is_refused(client: TestClient) -> None:
    for query in ({"token": TOKEN}, {"access_token": TOKEN}, {"Token": "x"}):
        response = client.get(f"{API}/gpus", params=query)
        status, kind, message = error_of(response)
        assert (status, kind) == (400, "token_in_url") and "Authorization: Bearer" in message
        assert TOKEN not in response.text
    assert client.get("/login", params={"token": TOKEN}).status_code == 400


def test_cookie_login_and_logout(host: HostRoot, state: StateDir) -> None:
    with TestClient(create_app(host, state, token=TOKEN), base_url=BASE) as browser:
        wrong = browser.post("/login", data={"token": "nope"}, follow_redirects=False)
        assert wrong.status_code == 303 and wrong.headers["location"] == "/login?error=1"
        assert COOKIE not in browser.cookies
        logged_in = browser.post("/login", data={"token": TOKEN, "next": "/vm.html?name=car1"},
                                 follow_redirects=False)
        assert logged_in.status_code == 303 and logged_in.headers["location"] == "/vm.html?name=car1"
        cookie = logged_in.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback; under TLS it is Secure (test_tls)
        session = browser.cookies[COOKIE]
        assert TOKEN not in session and session.count(".") == 2
        assert browser.get(f"{API}/gpus").status_code == 200
        assert browser.get("/").status_code == 200
        assert browser.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_8"}).status_code == 201
        # The cookie from another site's page: refused for anything that changes something.
        foreign = browser.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_8"},
                               headers={"Origin": "http://evil.example"})
        assert error_of(foreign)[:2] == (403, "forbidden")
        same = browser.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_8"},
                            headers={"Origin": "http://127.0.0.1:8470"})
        assert same.status_code == 201
        # An open redirect is not to be had.
        elsewhere = browser.post("/login", data={"token": TOKEN, "next": "//evil.example/"}, follow_redirects=False)
        assert elsewhere.headers["location"] == "/"
        session = browser.cookies[COOKIE]
        out = browser.post("/logout", follow_redirects=False)
        assert out.status_code == 303 and COOKIE not in browser.cookies
        assert browser.get(f"{API}/gpus", headers={"Cookie": f"{COOKIE}={session}"}).status_code == 401  # revoked
        forged = session.rsplit(".", 1)[0] + "." + "0" * 64
        assert browser.get(f"{API}/gpus", headers={"Cookie": f"{COOKIE}={forged}"}).status_code == 401


def test_the_token_file_is_made_once_and_private(host: HostRoot, state: StateDir) -> None:
    app = create_app(host, state)
    path = token_path(state)
    token = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 40
    assert load_or_create_token(state) == token
    with TestClient(app, base_url=BASE) as c:
        assert c.get(f"{API}/gpus", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_require_auth_guards_websockets(host: HostRoot, state: StateDir) -> None:
    app = FastAPI()  # no guard middleware: the dependency alone
    app.state.auth = Authenticator(TOKEN)

    @app.websocket("/ws", dependencies=[Depends(require_auth)])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    with TestClient(app) as c:
        with pytest.raises(WebSocketDisconnect) as refused, c.websocket_connect("/ws"):
            pass
        assert refused.value.code == 1008
        with c.websocket_connect("/ws", headers=AUTH) as websocket:
            assert websocket.receive_text() == "hello"
        session = app.state.auth.new_session()
        with c.websocket_connect("/ws", headers={"Cookie": f"{COOKIE}={session}"}) as websocket:
            assert websocket.receive_text() == "hello"
        with pytest.raises(WebSocketDisconnect) as foreign, \
                c.websocket_connect("/ws", headers={"Cookie": f"{COOKIE}={session}", "Origin": "http://evil.example"}):
            pass
        assert foreign.value.code == 1008
    # The service's guard refuses an unauthenticated handshake before any route runs.
    with TestClient(create_app(host, state, token=TOKEN), base_url=BASE) as c:
        with pytest.raises(WebSocketDisconnect) as refused, c.websocket_connect(f"{API}/vms/car1/display"):
            pass
        assert refused.value.code == 1008


# ---------------------------------------------------------------------- metrics


def test_metrics(client: TestClient, host: HostRoot) -> None:
    client.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_4"})
    metrics.report_stream("car1", fps=29.5, viewers=2)
    try:
        response = client.get("/metrics")
    finally:
        metrics.clear_stream("car1")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert f'vgpuctl_vgpus{{parent="{GVT_PARENT}",type="i915-GVTg_V5_4"}} 1.0' in text
    assert f'vgpuctl_vgpus{{parent="{GVT_PARENT}",type="i915-GVTg_V5_8"}} 0.0' in text
    assert f'vgpuctl_available_instances{{parent="{GVT_PARENT}",type="i915-GVTg_V5_4"}} 4.0' in text
    assert f'vgpuctl_pool_free{{parent="{GVT_PARENT}",pool="low GM (aperture)"}} 768.0' in text
    assert 'vgpuctl_vms{state="running"} 0.0' in text
    assert 'vgpuctl_stream_fps{vm="car1"} 29.5' in text and 'vgpuctl_stream_viewers{vm="car1"} 2.0' in text
    for name in ("vgpuctl_vgpus_defined", "vgpuctl_pool_total", 'vgpuctl_collect_errors{source="vms"} 0.0'):
        assert name in text
    assert "car1" not in client.get("/metrics").text


# ---------------------------------------------------------------------- live events under a real server



def read_events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name:
            yield name, json.loads(line[6:])
            name = None


def test_events_stream_snapshots_and_changes_made_elsewhere(host: HostRoot, state: StateDir) -> None:
    app = create_app(host, state, token=TOKEN)
    hub = app.state.events
    with serving(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=5) as http, \
            http.stream("GET", f"{API}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
        first = dict(next(events) for _ in range(3))
        assert set(first) == {"gpus", "vgpus", "vms"}
        assert first["vgpus"] == [] and first["gpus"][0]["active_vgpus"] == []
        assert first["gpus"] == http.get(f"{API}/gpus").json()
        assert hub.polling
        # The CLI (here: the library it calls) creates a vGPU: it shows up within ~0.5 s.
        changed = time.monotonic()
        Manager(host, state).create(GVT_PARENT, "i915-GVTg_V5_4", U1)
        seen: dict[str, Any] = {}
        for name, data in events:
            seen[name] = data
            if {"gpus", "vgpus"} <= set(seen):
                break
        assert time.monotonic() - changed < 2.0
        assert [r["uuid"] for r in seen["vgpus"]] == [U1] and seen["gpus"][0]["active_vgpus"] == [U1]
        assert seen["vgpus"] == http.get(f"{API}/vgpus").json()
    # Nobody listens any more: the poller stops.
    deadline = time.monotonic() + 3
    while hub.polling:
        assert time.monotonic() < deadline, "the poller kept running without clients"
        time.sleep(0.05)


def test_tls(host: HostRoot, state: StateDir, tmp_path: Path) -> None:
    from vgpuctl.cli.serve import check_bind

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True)
    check_bind("0.0.0.0", str(cert), str(key))  # a public address is fine with TLS
    app = create_app(host, state, token=TOKEN)
    with serving(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as base, \
            httpx.Client(base_url=base, verify=False, timeout=10) as browser:
        assert base.startswith("https://")
        assert browser.get(f"{API}/gpus", headers=AUTH).status_code == 200
        login = browser.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert login.status_code == 303
        assert "Secure" in login.headers["set-cookie"] and "HttpOnly" in login.headers["set-cookie"]
        assert browser.get(f"{API}/gpus").status_code == 200  # with the cookie


def test_a_snapshot_that_fails_is_an_error_event_and_the_others_go_on() -> None:
    import asyncio

    from vgpuctl.base.errors import InvalidInput
    from vgpuctl.service.events import EventHub

    def broken() -> Any:
        raise InvalidInput("/etc/mdevctl.d/0000:00:02.0/x: invalid json; fix or remove the file")

    async def first_events() -> list[str]:
        hub = EventHub({"vgpus": broken, "gpus": lambda: [{"parent": "p"}]}, interval_s=0.05)
        stream = hub.stream()
        chunks = [await anext(stream) for _ in range(3)]
        await stream.aclose()
        assert not hub.polling
        return chunks

    retry, error, gpus = asyncio.run(first_events())
    assert retry == "retry: 2000\n\n"
    assert error.startswith("event: error\ndata: ")
    assert json.loads(error.split("data: ", 1)[1]) == {
        "error": "invalid_input", "message": "/etc/mdevctl.d/0000:00:02.0/x: invalid json; fix or remove the file",
        "source": "vgpus"}
    assert gpus == 'event: gpus\ndata: [{"parent":"p"}]\n\n'


# ---------------------------------------------------------------------- vgpuctl serve


def test_serve_refuses_a_public_address_without_tls(host: HostRoot, state: StateDir, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--root", str(host.root), "--state-dir", str(state.path), "serve"]
    for address in ("0.0.0.0", "192.0.2.10", "::", "example.com"):
        result = runner.invoke(cli, [*base, "--host", address])
        assert result.exit_code == 1, result.output
        assert f"refusing to serve on {address} without TLS" in result.stderr and "--tls-cert" in result.stderr
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    result = runner.invoke(cli, [*base, "--host", "0.0.0.0", "--tls-cert", str(cert)])
    assert result.exit_code == 1 and "needs both --tls-cert FILE and --tls-key FILE" in result.stderr
    assert not token_path(state).exists()  # refused before anything was made


def test_real_server(host: HostRoot, state: StateDir) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "vgpuctl", "--root", str(host.root), "--state-dir", str(state.path),
         "serve", "--port", str(port), "--print-token"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout is not None
        watchdog = threading.Timer(30, process.kill)  # a server that never says anything must not hang the test
        watchdog.start()
        lines = [process.stdout.readline().rstrip("\n") for _ in range(3)]
        watchdog.cancel()
        assert lines[-1].startswith("token "), (lines, process.poll())
        token = lines[-1].split(" ", 1)[1]
        assert token == token_path(state).read_text().strip()
        assert lines[0].startswith(f"vgpuctl serve: http://127.0.0.1:{port}/")
        assert str(token_path(state)) in lines[1] and token not in lines[1]
        url = f"http://127.0.0.1:{port}"
        response = httpx.get(f"{url}{API}/gpus", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code == 200 and response.json()[0]["parent"] == GVT_PARENT
        assert httpx.get(f"{url}{API}/gpus", timeout=10).status_code == 401
        assert httpx.get(f"{url}{API}/gpus", params={"access_token": token}, timeout=10).status_code == 400
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    # A clean shutdown (uvicorn then re-raises the SIGTERM it caught).
    assert process.returncode in (0, -15) and "Application shutdown complete" in stderr, stderr
    assert f"GET {API}/gpus 200" in stderr and f"GET {API}/gpus 400" in stderr  # method and path only
    assert token not in stderr and "access_token" not in stderr


# ---------------------------------------------------------------------- schemathesis


def test_no_request_makes_a_server_error(host: HostRoot, state: StateDir) -> None:
    """Every operation of /openapi.json with generated valid and invalid input: never a 5xx.

    No VM may come to exist (later cases could start it, and leave QEMU running): the state dir's
    ``vms`` is a plain file, so even a valid POST /vms ends in a 4xx (``host_error``) after every
    check of its input has run, and start/stop/kill/screenshot answer 404 or 422 at once.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    state.path.mkdir(parents=True, exist_ok=True)
    (state.path / "vms").write_text("not a directory: no VM can be made here\n")
    app = create_app(host, state, token=TOKEN, allow_hosts=["testserver"])  # schemathesis' ASGI client's name
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert ("POST", f"{API}/vms/{{name}}/start") in paths and ("GET", "/metrics") in paths
    ran = 0
    for operation in operations:
        if operation.path == f"{API}/events":
            continue  # an endless stream
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=12, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                case.call_and_validate(headers=AUTH, checks=[not_a_server_error])

            try:
                check()
            except Exception as e:
                if type(e).__name__ == "Unsatisfiable":  # e.g. no invalid value exists for a plain string
                    continue
                raise
            ran += 1
    assert ran >= 30
    assert (state.path / "vms").is_file()
