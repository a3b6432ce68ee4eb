"""The service's hardening (issue 11): no secret in any log line, no 500 from any header or body a client can send,
revocations that outlive the process, a request body limit, the Host allow-list, bounded display input, SSE
errors for every subscriber, an unusable token file said in one line, hubs that let go of their memory, and
damaged state files as a clear JSON error."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import stat
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
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketDisconnect

from tests.conftest import API, AUTH, BASE, GVT_PARENT, TOKEN, MountFn, error_of, free_port, serving
from vgpuctl.base import errors as base_errors
from vgpuctl.base.errors import VgpuError
from vgpuctl.base.state import StateDir
from vgpuctl.cli.app import cli
from vgpuctl.host import HostRoot
from vgpuctl.mdev.state import Journal
from vgpuctl.service import errors as service_errors
from vgpuctl.service.app import create_app
from vgpuctl.service.auth import (
    COOKIE,
    MAX_BODY,
    REVOKED_FILE,
    SESSION_SECONDS,
    Authenticator,
    HostNames,
    load_or_create_token,
    same_origin,
    token_path,
)

U1 = "22222222-0000-4000-8000-000000000001"

FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture
def state() -> Iterator[StateDir]:
    directory = Path(tempfile.mkdtemp(prefix="vgsh-"))  # short: QMP/VNC socket paths must stay under 108 bytes
    yield StateDir(directory)
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def host(mount_host: MountFn) -> HostRoot:
    return mount_host("coffeelake", aperture_mib=1024)


def log_in(client: TestClient | httpx.Client, token: str = TOKEN) -> str:
    response = client.post("/login", data={"token": token}, follow_redirects=False)
    assert response.status_code == 303, response.text
    session = response.cookies.get(COOKIE)
    assert session
    return session


# ---------------------------------------------------------------------- 1. no secret in any log line


class Capture(logging.Handler):
    """Every record of every logger, formatted with its traceback, as a log file would show it."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def capture_all_logs() -> Iterator[Capture]:
    handler = Capture()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi",
                                                   "websockets", "vgpuctl", "vgpuctl.service")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(1)  # everything, trace included
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def hit_everything(base: str, token: str, session: str | None) -> None:
    """Every endpoint, and the display WebSocket, with the token everywhere a client might put it."""
    from websockets.sync.client import connect

    openapi = httpx.get(f"{base}/openapi.json", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    cookie = {"Cookie": f"{COOKIE}={session}"} if session else {}
    with httpx.Client(base_url=base, timeout=10) as http:
        for path, operations in openapi["paths"].items():
            if path.endswith("/events"):
                continue  # an endless stream; below
            url = path.replace("{uuid}", U1).replace("{name}", "nope")
            for method in operations:
                for headers, params in (({"Authorization": f"Bearer {token}"}, {}), ({}, {"token": token}),
                                        ({}, {"access_token": token}), (cookie, {}),
                                        ({"Authorization": f"Bearer {token}x"}, {"token": "wrong-" + token})):
                    http.request(method.upper(), url, headers=headers, params=params,
                                 json={} if method in ("post", "patch", "put") else None)
        with http.stream("GET", f"{API}/events", headers={"Authorization": f"Bearer {token}"}) as events:
            next(events.iter_lines())
        http.get(f"{API}/events", params={"token": token})
        http.get(f"/{token}")  # a path segment
        http.get(f"{API}/vms/{token.lower()[:20]}/status", headers={"Authorization": f"Bearer {token}"})
        http.get(f"{API}/vgpus/{token}", headers=cookie)
        http.post("/login", data={"token": token})
        http.post("/login", data={"token": "not-" + token})
        http.get("/", headers={"Cookie": f"{COOKIE}={session}; other={token}"} if session else {})
    ws = base.replace("http://", "ws://") + f"{API}/vms/nope/display"
    for url, headers in ((f"{ws}?token={token}", {}), (f"{ws}?codec=h264&access_token={token}", {}),
                         (ws, {"Authorization": f"Bearer {token}"}), (ws, cookie),
                         (f"{ws}?codec={token}", {"Authorization": f"Bearer {token}"}),
                         (base.replace("http://", "ws://") + f"{API}/vms/{token}/display", {}),
                         (f"{ws}?token=wrong", {"Authorization": "Bearer wrong"})):
        with contextlib.suppress(Exception), connect(url, additional_headers=headers, open_timeout=5) as conn:
            conn.recv(timeout=2)


def secrets_in(text: str, *secrets: str) -> list[str]:
    return [line for line in text.splitlines() if any(s and s in line for s in secrets)]


def test_no_log_line_of_a_real_service_shows_the_token(host: HostRoot, state: StateDir) -> None:
    """``vgpuctl serve`` as a user runs it: its whole stdout and stderr after every endpoint, the WebSocket, the
    login, with the token (and a session cookie) in the query string, headers, a cookie and path segments."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "vgpuctl", "--root", str(host.root), "--state-dir", str(state.path), "serve",
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout is not None
        watchdog = threading.Timer(30, process.kill)
        watchdog.start()
        banner = [process.stdout.readline() for _ in range(2)]
        watchdog.cancel()
        token = token_path(state).read_text().strip()
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as browser:
            session = log_in(browser, token)
        hit_everything(base, token, session)
        with httpx.Client(base_url=base, timeout=10) as browser:
            browser.cookies.set(COOKIE, session)
            browser.post("/logout")
    finally:
        process.terminate()
        stdout, stderr = process.communicate(timeout=15)
    logged = "".join(banner) + stdout + stderr
    assert '"WebSocket /api/v1/vms/nope/display' in logged and "GET /api/v1/gpus 400" in logged, logged[-3000:]
    assert secrets_in(logged, token, session) == []
    assert "[token]" in logged  # the path segment was there, scrubbed


def test_no_log_record_shows_the_token_even_at_trace_level_with_the_access_log(host: HostRoot,
                                                                               state: StateDir) -> None:
    """uvicorn at its most talkative (trace: ASGI scopes with every header; its access log with query strings),
    every record of every logger captured, tracebacks formatted."""
    app = create_app(host, state, token=TOKEN)
    with capture_all_logs() as captured, serving(app, log_level="trace", access_log=True) as base:
        with httpx.Client(base_url=base, timeout=10) as browser:
            session = log_in(browser)
        hit_everything(base, TOKEN, session)
    text = "\n".join(captured.lines)
    assert "Authorization".lower() in text.lower() and "WebSocket" in text, text[-2000:]
    assert secrets_in(text, TOKEN, session) == []


# ---------------------------------------------------------------------- 2. no 500 from headers or bodies


def test_a_malformed_origin_is_cross_origin_not_a_server_error(host: HostRoot, state: StateDir) -> None:
    for origin in ("http://[::1", "http://127.0.0.1:99999", "http://127.0.0.1:port", "http://[zz]:80", "::::"):
        assert same_origin({"origin": origin, "host": "127.0.0.1:8470"}, "http") is False, origin
    with TestClient(create_app(host, state, token=TOKEN), base_url=BASE) as browser:
        log_in(browser)
        response = browser.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_8"},
                                headers={"Origin": "http://[::1"})
        assert error_of(response)[:2] == (403, "forbidden")


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4),
                           max_leaves=12)


def test_no_header_a_client_can_send_makes_a_server_error(host: HostRoot, state: StateDir) -> None:
    app = create_app(host, state, token=TOKEN)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
        session = log_in(client)

        @FUZZ
        @given(name=st.sampled_from(["origin", "host", "cookie", "authorization", "content-type", "content-length"]),
               value=header_text | st.sampled_from(["http://[::1", "http://a:99999", "http://a:b", "[::1", "a:b:c",
                                                     "[::1]x", "-1", "1e3", " 12", "999999999999999999999",
                                                     "Bearer", "Bearer ", f"{COOKIE}=", f"{COOKIE}=\"x",
                                                     "application/json; charset=nope", "multipart/form-data"]),
               method=st.sampled_from(["GET", "POST", "DELETE"]))
        @example(name="origin", value="http://[::1", method="POST")
        def check(name: str, value: str, method: str) -> None:
            headers = {"Cookie": f"{COOKIE}={session}".encode(), name: value.encode("latin-1")}
            url = f"{API}/vgpus" if method != "DELETE" else f"{API}/vgpus/{U1}"
            body = b'{"parent": "x"}' if method == "POST" else b""
            response = client.request(method, url, headers=headers, content=body)
            assert response.status_code < 500, (name, value, response.status_code, response.text)
            if response.status_code >= 400:
                error_of(response)

        check()


def test_no_json_body_makes_a_server_error(host: HostRoot, state: StateDir) -> None:
    """Every POST/PUT/PATCH of /openapi.json with generated JSON: objects with the operation's own fields (and
    others), of any JSON type, nested; and arbitrary bytes. No VM can come to exist (``vms`` is a file)."""
    state.path.mkdir(parents=True, exist_ok=True)
    (state.path / "vms").write_text("not a directory: no VM can be made here\n")
    app = create_app(host, state, token=TOKEN)
    schema = app.openapi()
    bodies: list[tuple[str, str, list[str]]] = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if method not in ("post", "put", "patch"):
                continue
            fields: list[str] = []
            content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            ref = content.get("schema", {})
            for option in ref.get("anyOf", [ref]):
                if "$ref" in option:
                    model = schema["components"]["schemas"][option["$ref"].rsplit("/", 1)[1]]
                    fields += list(model.get("properties", {}))
            bodies.append((method.upper(), path.replace("{uuid}", U1).replace("{name}", "fuzz"), fields))
    assert len(bodies) >= 8 and any(p == f"{API}/vms" for _, p, _ in bodies)
    with TestClient(app, base_url=BASE, headers=AUTH, raise_server_exceptions=False) as client:
        for method, url, fields in bodies:
            fuzz_body(client, method, url, fields)
    assert (state.path / "vms").is_file()


def test_an_infinite_number_echoed_back_is_still_json(host: HostRoot, state: StateDir) -> None:
    """Python's JSON reads Infinity; a validation error echoing it (FastAPI's detail) must still be JSON."""
    with TestClient(create_app(host, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        response = client.post(f"{API}/vgpus", content=b'{"parent": Infinity, "type": "x"}',
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["input"] == "inf"


def fuzz_body(client: TestClient, method: str, url: str, fields: list[str]) -> None:
    keys = st.sampled_from(fields) | st.text(max_size=6) if fields else st.text(max_size=6)

    @settings(FUZZ, max_examples=25)
    @given(body=st.dictionaries(keys, json_values, max_size=6) | json_values, raw=st.none() | st.binary(max_size=64))
    def check(body: Any, raw: bytes | None) -> None:
        content = raw if raw is not None else json.dumps(body).encode()
        response = client.request(method, url, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code < 500, (method, url, body, raw, response.text)
        if response.status_code >= 400:
            error_of(response)

    check()


# ---------------------------------------------------------------------- 3. revocations outlive the process


def test_a_revoked_session_stays_revoked_after_a_restart_and_on_another_service(host: HostRoot,
                                                                              state: StateDir) -> None:
    with TestClient(create_app(host, state, token=TOKEN), base_url=BASE) as first, \
            TestClient(create_app(host, state, token=TOKEN), base_url=BASE) as second:
        session, other = log_in(first), log_in(second)
        for client in (first, second):
            assert client.get(f"{API}/gpus", headers={"Cookie": f"{COOKIE}={session}"}).status_code == 200
        first.post("/logout", headers={"Cookie": f"{COOKIE}={session}"}, follow_redirects=False)
        # The other service on the same state dir, running already, refuses it at once.
        assert second.get(f"{API}/gpus", headers={"Cookie": f"{COOKIE}={session}"}).status_code == 401
        assert second.get(f"{API}/gpus", headers={"Cookie": f"{COOKIE}={other}"}).status_code == 200
    path = state.path / REVOKED_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A restart: a new process' service (here a new app) on the state dir.
    with TestClient(create_app(host, state, token=TOKEN), base_url=BASE) as restarted:
        assert restarted.get(f"{API}/gpus", headers={"Cookie": f"{COOKIE}={session}"}).status_code == 401
        assert restarted.get(f"{API}/gpus", headers={"Cookie": f"{COOKIE}={other}"}).status_code == 200
        restarted.post("/logout", headers={"Cookie": f"{COOKIE}={other}"}, follow_redirects=False)
    revoked = json.loads(path.read_text())["revoked"]
    assert set(revoked) == {session.split(".")[1], other.split(".")[1]}  # both services' revocations merged


def test_revocations_are_bounded_by_the_cookies_expiry(state: StateDir) -> None:
    auth = Authenticator(TOKEN, state)
    now = time.time()
    old = auth.new_session(now=now - SESSION_SECONDS + 60)  # expires in a minute
    fresh = auth.new_session()
    auth.revoke(old)
    assert list(json.loads((state.path / REVOKED_FILE).read_text())["revoked"]) == [old.split(".")[1]]
    later = Authenticator(TOKEN, state)
    assert not later.check_session(old)
    # Once its cookie would have expired anyway, the next write drops it.
    (state.path / REVOKED_FILE).write_text(json.dumps({"revoked": {old.split(".")[1]: int(now) - 1}}))
    later.revoke(fresh)
    assert list(json.loads((state.path / REVOKED_FILE).read_text())["revoked"]) == [fresh.split(".")[1]]
    assert not Authenticator(TOKEN, state).check_session(fresh)


def test_a_damaged_revocation_file_refuses_sessions_and_says_so(state: StateDir,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    auth = Authenticator(TOKEN, state)
    session = auth.new_session()
    assert auth.check_session(session)
    state.path.mkdir(parents=True, exist_ok=True)
    (state.path / REVOKED_FILE).write_text("{not json")
    with caplog.at_level(logging.ERROR, "vgpuctl.service"):
        assert not auth.check_session(session)
    assert REVOKED_FILE in caplog.text and "remove the file" in caplog.text
    assert auth.method({"authorization": f"Bearer {TOKEN}"}) == "bearer"


# ---------------------------------------------------------------------- 4. the request body limit


def raw_request(port: int, head: bytes, body_chunks: Iterator[bytes] | None = None, timeout: float = 5) -> bytes:
    """Send a request by hand (headers, then body chunks while the server has not answered); the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        answer = b""
        for chunk in body_chunks or ():
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            if answer:
                break
            try:
                sock.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(timeout)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + 20:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        return answer


def test_a_body_over_the_limit_is_413_at_once(host: HostRoot, state: StateDir) -> None:
    app = create_app(host, state, token=TOKEN)
    with serving(app) as base:
        port = int(base.rsplit(":", 1)[1])
        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        started = time.monotonic()
        for path in (f"{API}/vgpus", "/login", f"{API}/vms"):
            # 200 MB announced, not one byte sent: the answer comes without waiting for the body.
            answer = raw_request(port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                       f"\r\nContent-Length: {200 << 20}\r\n".encode() + auth + b"\r\n")
            assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["error"] == "too_large" and "1024 KiB" in body["message"]
        assert time.monotonic() - started < 5
        # Chunked: no Content-Length; counted as it arrives, cut off after MAX_BODY.
        chunk = b"x" * 65536
        chunks = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(3200))  # up to 200 MB
        answer = raw_request(port, f"POST {API}/vgpus HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                   "\r\nTransfer-Encoding: chunked\r\n".encode() + auth + b"\r\n", chunks, timeout=20)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "too_large"
        with httpx.Client(base_url=base, headers=AUTH, timeout=10) as http:
            # Under the limit the body is read as ever (here: a JSON string too long for any field, so 422).
            response = http.post(f"{API}/vgpus", content=json.dumps({"parent": "x" * (MAX_BODY - 100)}),
                                 headers={"Content-Type": "application/json"})
            assert response.status_code == 422
            assert http.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_8"}).status_code == 201
            response = http.post(f"{API}/vgpus", content=b"1" * (MAX_BODY + 1),
                                 headers={"Content-Type": "application/json"})
            assert error_of(response)[:2] == (413, "too_large")


def test_a_body_over_the_limit_in_process(host: HostRoot, state: StateDir) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b" " * 65536

    with TestClient(create_app(host, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        response = client.post(f"{API}/vms", content=chunks(), headers={"Content-Type": "application/json"})
        assert error_of(response)[:2] == (413, "too_large")
        response = client.post(f"{API}/vgpus", content=b"{}", headers={"Content-Length": "x1"})
        assert error_of(response)[:2] == (400, "bad_request")


# ---------------------------------------------------------------------- 5. the Host allow-list


def test_only_host_headers_that_name_the_service_are_answered(host: HostRoot, state: StateDir) -> None:
    app = create_app(host, state, token=TOKEN, listen_host="127.0.0.1", allow_hosts=["vgpu.example.org"])
    with TestClient(app, base_url=BASE, headers=AUTH) as client:
        for name in ("127.0.0.1:8470", "localhost:8470", "LOCALHOST", "[::1]:8470", "127.0.0.5", "localhost.",
                     "vgpu.example.org", "vgpu.example.org:443"):
            assert client.get(f"{API}/gpus", headers={"Host": name}).status_code == 200, name
        for name in ("evil.example", "evil.example:8470", "127.0.0.1.nip.io", "localhost:x", "[::1", "",
                     "vgpu.example.org.evil", "192.0.2.1"):
            response = client.get(f"{API}/gpus", headers={"Host": name})
            status, kind, message = error_of(response)
            assert (status, kind) == (421, "unknown_host"), name
            assert "--allow-host" in message and "DNS rebinding" in message
        # Refused before anything else: before the login page, before a token in the URL.
        assert client.get("/login", headers={"Host": "evil.example"}).status_code == 421
        assert client.post("/login", data={"token": TOKEN}, headers={"Host": "evil.example"}).status_code == 421
        with pytest.raises(WebSocketDisconnect) as refused, \
                client.websocket_connect(f"{API}/vms/car1/display", headers={"Host": "evil.example"}):
            pass
        assert refused.value.code == 1008
    everywhere = HostNames("0.0.0.0")
    assert everywhere.allows("192.0.2.7:8470") and everywhere.allows("[2001:db8::1]:8470")
    assert not everywhere.allows("rebound.example:8470")
    assert HostNames("vgpu.lan").allows("VGPU.lan:8470") and not HostNames("vgpu.lan").allows("other.lan")
    assert HostNames().allows(None)  # HTTP/1.0 without a Host header: no browser


def test_serve_allow_host(host: HostRoot, state: StateDir) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "vgpuctl", "--root", str(host.root), "--state-dir", str(state.path), "serve",
         "--port", str(port), "--allow-host", "vgpu.example.org", "--print-token"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout is not None
        watchdog = threading.Timer(30, process.kill)
        watchdog.start()
        token = [process.stdout.readline() for _ in range(3)][-1].split(" ", 1)[1].strip()
        watchdog.cancel()
        url, headers = f"http://127.0.0.1:{port}{API}/gpus", {"Authorization": f"Bearer {token}"}
        assert httpx.get(url, headers=headers, timeout=10).status_code == 200
        assert httpx.get(url, headers={**headers, "Host": "vgpu.example.org"}, timeout=10).status_code == 200
        assert httpx.get(url, headers={**headers, "Host": "evil.example"}, timeout=10).status_code == 421
    finally:
        process.terminate()
        process.communicate(timeout=15)


# ---------------------------------------------------------------------- 7. SSE errors reach every subscriber


def test_the_error_event_reaches_every_subscriber() -> None:
    from vgpuctl.base.errors import InvalidInput
    from vgpuctl.service.events import EventHub

    def broken() -> Any:
        raise InvalidInput("/etc/mdevctl.d/x: invalid json; fix or remove the file")

    async def events_of(stream: Any, count: int) -> list[str]:
        chunks = [await asyncio.wait_for(anext(stream), 5) for _ in range(count)]
        return [c.split("\n", 1)[0] for c in chunks]

    async def scenario() -> None:
        hub = EventHub({"vgpus": broken, "gpus": lambda: [{"parent": "p"}]}, interval_s=0.02)
        first, second = hub.stream(), hub.stream()
        assert await events_of(first, 3) == ["retry: 2000", "event: error", "event: gpus"]
        assert sorted(await events_of(second, 3)) == ["event: error", "event: gpus", "retry: 2000"]
        third = hub.stream()  # joins a running poller, long after the error was first seen
        await asyncio.sleep(0.1)
        assert sorted(await events_of(third, 3)) == ["event: error", "event: gpus", "retry: 2000"]
        for stream in (first, second, third):
            await stream.aclose()
        assert not hub.polling
        again = hub.stream()  # a new poller: still broken, still told
        assert sorted(await events_of(again, 3)) == ["event: error", "event: gpus", "retry: 2000"]
        await again.aclose()

    asyncio.run(scenario())


# ---------------------------------------------------------------------- 8. an unusable token file


def test_an_unusable_token_file_is_one_line_that_says_what_to_do(state: StateDir, tmp_path: Path) -> None:
    path = token_path(state)
    path.mkdir(parents=True)
    with pytest.raises(base_errors.StateDamaged, match="is a directory: remove it and restart"):
        load_or_create_token(state)
    result = CliRunner().invoke(cli, ["--state-dir", str(state.path), "serve", "--port", str(free_port())])
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
    assert "is a directory: remove it" in result.stderr and "Traceback" not in result.stderr
    path.rmdir()
    os.mkfifo(path)  # must not hang
    with pytest.raises(base_errors.StateDamaged, match="not a regular file"):
        load_or_create_token(state)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(base_errors.StateDamaged, match="symbolic link"):
        load_or_create_token(state)
    path.unlink()
    path.write_bytes(b"\xff\xfe not text \xff" * 4)
    with pytest.raises(base_errors.StateDamaged, match="holds no usable token"):
        load_or_create_token(state)
    path.write_text("")
    with pytest.raises(base_errors.StateDamaged, match="holds no usable token"):
        load_or_create_token(state)
    blocked = StateDir(tmp_path / "a-file")
    blocked.path.write_text("not a directory")
    with pytest.raises(base_errors.StateDamaged, match="must be a directory"):
        load_or_create_token(blocked)


# ---------------------------------------------------------------------- 10. damaged state files, VgpuErrors


def test_a_damaged_owned_json_is_a_503_that_names_the_file(host: HostRoot, state: StateDir) -> None:
    with TestClient(create_app(host, state, token=TOKEN), base_url=BASE, headers=AUTH) as client:
        assert client.post(f"{API}/vgpus", json={"parent": GVT_PARENT, "type": "i915-GVTg_V5_8"}).status_code == 201
        Journal(state).file.write_text("{damaged")
        status, kind, message = error_of(client.get(f"{API}/vgpus"))
        assert (status, kind) == (503, "state_damaged")
        assert str(Journal(state).file) in message and "moved away" in message


def test_every_vgpuerror_is_json_with_a_message() -> None:
    class Unforeseen(VgpuError):
        pass

    class Declared(VgpuError):
        http_status = 423

    class StateDamaged(VgpuError):
        pass

    assert service_errors.classify(Unforeseen("x")) == (409, "unforeseen")
    assert service_errors.classify(Declared("x")) == (423, "declared")
    assert service_errors.classify(StateDamaged("/var/lib/vgpuctl/x")) == (503, "state_damaged")
    assert service_errors.classify(RuntimeError("/s/owned.json is damaged: move it away")) == (500, "internal")
    assert service_errors.classify(ValueError("a bug")) == (500, "internal")  # only vgpuctl's errors are not bugs

    from fastapi import FastAPI

    app = FastAPI()
    service_errors.install(app)
    raised: list[Exception] = [Unforeseen("what to do next"), Declared("locked"), StateDamaged("/s/f is damaged"),
                               RuntimeError("a bug, with a secret")]

    @app.get("/boom/{i}")
    def boom(i: int) -> None:
        raise raised[i]

    with TestClient(app, raise_server_exceptions=False) as client:
        assert error_of(client.get("/boom/0")) == (409, "unforeseen", "what to do next")
        assert error_of(client.get("/boom/1")) == (423, "declared", "locked")
        assert error_of(client.get("/boom/2")) == (503, "state_damaged", "/s/f is damaged")
        assert error_of(client.get("/boom/3")) == (500, "internal", "internal error: see the server's log")


# ---------------------------------------------------------------------- the logs module itself


def test_scrub_covers_what_a_log_may_carry() -> None:
    from vgpuctl.service import logs

    secret = "s3cr3t-" + "k" * 30
    logs.protect(secret)
    session = "1900000000.abcdefghijklmnopqrstuv." + "0123456789abcdef" * 4
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test.scrub")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('%s - "WebSocket %s" 403', "127.0.0.1:1", f"/x?codec=h264&token={secret}")
        logger.warning("GET %s 404", f"/api/v1/{secret}")
        logger.warning("scope %s", {"headers": [(b"authorization", f"Bearer {secret}x".encode()),
                                                (b"cookie", f"{COOKIE}={session}".encode())]})
        logger.warning("percent-encoded %s", "/" + secret.replace("-", "%2D"))
        logger.warning("a session %s in prose", session)
        try:
            raise ValueError(f"failed for {secret}")
        except ValueError:
            logger.exception("with a traceback")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert secret not in text and session not in text and secret.replace("-", "%2D") not in text
    assert text.count("[token]") >= 3 and "[session]" in text and "codec=h264" in text
