"""Who may use the service: whoever holds the token, or a browser session made from it.

- **The token** is made at the first start, ``secrets.token_urlsafe(32)`` in ``<state-dir>/token``
  (mode 0600, readable by root only). It is as powerful as root on this host (it starts VMs with any
  QEMU argument): keep it like a root password. Remove the file and restart to change it; that also
  ends every session.
- **Requests** carry it as ``Authorization: Bearer <token>``. A token in the URL (``?token=``,
  ``?access_token=``) is refused with 400 before anything else (URLs end up in logs, histories and
  Referer headers), and no request line with its query string is ever logged.
- **Browsers** log in at ``GET /login`` (a form) → ``POST /login`` (form field ``token``), which sets
  the cookie ``vgpuctl_session``: HttpOnly, SameSite=Strict, Secure under TLS, 7 days. Its value is
  ``<expiry>.<nonce>.<HMAC-SHA256>`` keyed by a key derived from the token — never the token itself.
  The cookie is accepted wherever the header is (EventSource and WebSocket cannot set headers).
  ``POST /logout`` revokes the session and clears the cookie. Revocations are kept in
  ``<state-dir>/revoked-sessions.json`` (written atomically, read by every service on that state
  directory, so a revoked cookie stays revoked after a restart; an entry goes once its cookie would
  have expired anyway).
- A request authenticated by the cookie that changes something (not GET/HEAD/OPTIONS), and every
  WebSocket handshake, must come from the service's own origin when it names one (``Origin``):
  SameSite=Strict already keeps the cookie off cross-site requests; this is the second lock.
- **The Host header** must name the service (``127.0.0.1``, ``localhost``, ``[::1]``, any loopback
  address, the ``--host`` it listens on, or a name given with ``--allow-host``, e.g. a reverse
  proxy's): any other is refused with 421 before anything else, so a web page whose name an attacker
  points at 127.0.0.1 (DNS rebinding) cannot reach the API as if it were this site.
- **Request bodies** are at most :data:`MAX_BODY` bytes: a larger ``Content-Length`` is refused with
  413 at once, and a body sent without one (chunked) is counted as it arrives and cut off at the limit.
- Public without either: ``GET/POST /login``, ``POST /logout`` and static assets other than HTML
  (``*.js``, ``*.css``, images, fonts) — nothing in them is secret.

:class:`AuthGuard` (ASGI middleware) enforces this for every HTTP request and WebSocket handshake.
:func:`require_auth` is the same check as a FastAPI dependency, for routes that want it explicitly —
the display WebSocket uses it: ``@router.websocket(..., dependencies=[Depends(require_auth)])`` or
a parameter ``_: None = Depends(require_auth)``; it closes an unauthenticated handshake with 1008
(policy violation; before the handshake is accepted, browsers see it as a failed connection).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from fastapi import HTTPException, WebSocketException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.status import WS_1008_POLICY_VIOLATION

from vgpuctl.base.errors import StateDamaged
from vgpuctl.base.state import StateDir

log = logging.getLogger("vgpuctl.service")

TOKEN_FILE = "token"
REVOKED_FILE = "revoked-sessions.json"
COOKIE = "vgpuctl_session"
SESSION_SECONDS = 7 * 24 * 3600
MAX_BODY = 1 << 20
"""Bytes a request body may have (1 MiB). The largest the API takes is a VM's JSON spec, a few KB; anything
near this is a mistake or an attack, and the body is held in memory while it is parsed."""
MAX_WS_MESSAGE = 64 * 1024
"""What ``vgpuctl serve`` lets its WebSocket layer take in one message (uvicorn's ``ws_max_size``, whose
default is 16 MiB, buffered before any route sees it); larger ones are refused there (close 1009). The
display's input messages are at most 4096 characters."""
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
URL_TOKEN_PARAMS = ("token", "access_token")
PUBLIC_SUFFIXES = (".js", ".mjs", ".css", ".map", ".svg", ".png", ".ico", ".webp", ".woff", ".woff2", ".ttf")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
TOKEN_IN_URL = ("never put the token in the URL (it ends up in logs and browser history): send it as the header "
                "'Authorization: Bearer <token>', or log in at /login")
TOO_LARGE = (f"the request body is larger than {MAX_BODY // 1024} KiB, the most this service takes: send the JSON "
             "the API documents (see /openapi.json)")
UNAUTHORIZED = ("authentication required: send 'Authorization: Bearer <token>' (the token is in the file "
                "'token' in vgpuctl's state directory), or log in at /login")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---------------------------------------------------------------------- the token file


def token_path(state: StateDir) -> Path:
    return state.path / TOKEN_FILE


def load_or_create_token(state: StateDir) -> str:
    """The service's token, made at the first start (``<state-dir>/token``, mode 0600).

    Raises StateDamaged, saying what to do, when the state directory or the token file is unusable (not a
    directory, not a regular file, unreadable, empty)."""
    path = token_path(state)
    try:
        state.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StateDamaged("cannot use the state directory {path} ({why}): it must be a directory vgpuctl can "
                           "write (choose another with --state-dir)", what="state", path=str(state.path),
                           why=e.strerror or str(e)) from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as e:
        raise StateDamaged("cannot make the token file {path} ({why}): the state directory {state} must be "
                           "writable by vgpuctl", what="token", path=str(path), why=e.strerror or str(e),
                           state=str(state.path)) from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token


def _read_token(path: Path) -> str:
    remedy = "remove it and restart to make a new token"
    try:
        # O_NONBLOCK: a FIFO put there must not hang the start; O_NOFOLLOW: no symlink to elsewhere.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        reason = "a symbolic link" if e.errno == errno.ELOOP else e.strerror or str(e)
        raise StateDamaged("cannot read the token file {path} ({why}); it must be a regular file: {remedy}",
                           what="token", path=str(path), why=reason, remedy=remedy) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise StateDamaged("the token file {path} is {kind}: {remedy}", what="token", path=str(path), kind=kind,
                               remedy=remedy)
        if mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("%s was readable by others: made it 0600; consider a new token (remove the file)", path)
        data = os.read(fd, 4096)
    except OSError as e:
        raise StateDamaged("cannot read the token file {path} ({why}): {remedy}", what="token", path=str(path),
                           why=e.strerror or str(e), remedy=remedy) from None
    finally:
        os.close(fd)
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if len(token) < 16 or any(c.isspace() for c in token):
        raise StateDamaged("the token file {path} holds no usable token: {remedy}", what="token", path=str(path),
                           remedy=remedy)
    return token


# ---------------------------------------------------------------------- checking


class Revocations:
    """Revoked sessions (nonce -> the cookie's expiry) in ``<state-dir>/revoked-sessions.json``.

    Shared by every service on the state directory: each check sees the file's current content (re-read
    when it changed: one stat per check), each revocation merges into it under the state directory's lock
    and replaces it atomically. Expired entries are dropped at every write, so it holds at most the
    sessions revoked within the last SESSION_SECONDS. A damaged file refuses every session (fail closed)
    and says so in the log. ``state=None`` keeps them in memory only (tests)."""

    def __init__(self, state: StateDir | None) -> None:
        self.state = state
        self.path = state.path / REVOKED_FILE if state is not None else None
        self._entries: dict[str, int] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.damaged = False

    def _current(self) -> dict[str, int]:
        if self.path is None:
            return self._entries
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._entries, self._stamp, self.damaged = {}, None, False
            return self._entries
        except OSError as e:
            self._fail(f"cannot read it ({e.strerror or e})")
            return self._entries
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_bytes())
                entries = {str(k): int(v) for k, v in data["revoked"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                self._stamp = stamp
                self._fail(f"it is damaged ({type(e).__name__})")
                return self._entries
            self._entries, self._stamp, self.damaged = entries, stamp, False
        return self._entries

    def _fail(self, why: str) -> None:
        if not self.damaged:
            log.error("%s: %s; every browser session is refused until it is fixed: remove the file and the token "
                      "file beside it, then restart the service and log in again (the bearer token still works "
                      "until then)", self.path, why)
        self.damaged = True

    def revoked(self, nonce: str) -> bool:
        entries = self._current()
        return self.damaged or nonce in entries

    def add(self, nonce: str, expires: int) -> None:
        now = time.time()
        if self.path is None or self.state is None:
            self._entries = {n: e for n, e in self._entries.items() if e > now}
            self._entries[nonce] = expires
            return
        from vgpuctl.host.files import atomic_write

        with self.state.lock("sessions"):
            self._stamp = None  # read it afresh under the lock: another service may have added to it
            current = self._current()
            if self.damaged:  # never overwrite it: that would bring back the sessions it revoked
                return
            entries = {n: e for n, e in current.items() if e > now}
            entries[nonce] = expires
            body = json.dumps({"revoked": entries}, indent=0, sort_keys=True).encode() + b"\n"
            atomic_write(self.path, body, mode=0o600)
            self._entries, self._stamp, self.damaged = entries, None, False


class Authenticator:
    """Checks bearer tokens and session cookies; issues and revokes sessions (revocations kept in ``state``)."""

    def __init__(self, token: str, state: StateDir | None = None) -> None:
        self._token = token.encode()
        self._key = hmac.new(self._token, b"vgpuctl session key v1", hashlib.sha256).digest()
        self.revocations = Revocations(state)

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self._token)

    def new_session(self, now: float | None = None) -> str:
        expires = int(now if now is not None else time.time()) + SESSION_SECONDS
        payload = f"{expires}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{self._sign(payload)}"

    def check_session(self, value: str, now: float | None = None) -> bool:
        payload, _, signature = value.rpartition(".")
        expires, _, nonce = payload.partition(".")
        if not (expires.isascii() and expires.isdigit() and len(expires) < 16 and nonce and signature):
            return False
        if not hmac.compare_digest(signature.encode("utf-8", "surrogateescape"), self._sign(payload).encode()):
            return False
        return int(expires) > (now if now is not None else time.time()) and not self.revocations.revoked(nonce)

    def revoke(self, value: str) -> None:
        if self.check_session(value):
            expires, nonce = value.split(".")[:2]
            self.revocations.add(nonce, int(expires))

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()

    def method(self, headers: dict[str, str]) -> str | None:
        """How a request with these (lower-cased) headers is authenticated: "bearer", "cookie" or None."""
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip() and self.check_token(credentials.strip()):
            return "bearer"
        session = session_cookie(headers.get("cookie", ""))
        if session and self.check_session(session):
            return "cookie"
        return None


def session_cookie(header: str) -> str | None:
    if COOKIE not in header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # a malformed Cookie header is no session
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel else None


def _headers(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        name = key.decode("latin-1").lower()
        text = value.decode("latin-1")
        found[name] = f"{found[name]}; {text}" if name == "cookie" and name in found else text
    return found


def token_in_url(scope: Scope) -> bool:
    query = scope.get("query_string", b"").decode("latin-1")
    return any(key.lower() in URL_TOKEN_PARAMS for key, _ in parse_qsl(query, keep_blank_values=True))


def same_origin(headers: dict[str, str], scheme: str) -> bool:
    """True unless the request names an Origin other than the host it was sent to (a malformed one is other)."""
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    default = {"http": 80, "https": 443, "ws": 80, "wss": 443}
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or default.get(parts.scheme, 80)
    except ValueError:  # e.g. 'http://[::1' or 'http://host:99999'
        return False
    host = headers.get("host", "")
    if ":" not in host.rpartition("]")[2]:
        host = f"{host}:{default.get(scheme, 80)}"
    origin_host = parts.hostname or ""
    if ":" in origin_host:
        origin_host = f"[{origin_host}]"
    return f"{origin_host}:{origin_port}" == host.lower()


def host_name(header: str) -> str | None:
    """The name or address in a Host header, without port or brackets, lower case; None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, colon, port = header.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.removesuffix(".")
    return name or None


class HostNames:
    """The Host header values this service answers to (a guard against DNS rebinding).

    Loopback addresses and ``localhost``; the address or name it listens on (``listen_host``); every IP
    address when it listens on all of them (``0.0.0.0``, ``::``: an address is never a rebinding); and the
    names in ``allowed`` (``--allow-host``: a reverse proxy's, the machine's own DNS name)."""

    def __init__(self, listen_host: str | None = None, allowed: Iterable[str] = ()) -> None:
        self.names = set(LOOPBACK_HOSTS)
        self.any_address = False
        for given in (listen_host, *allowed):
            if not given:
                continue
            name = host_name(given) if given.startswith("[") else given.strip().lower().strip("[]").removesuffix(".")
            if name in ("0.0.0.0", "::"):
                self.any_address = True
            elif name:
                self.names.add(name)

    def allows(self, header: str | None) -> bool:
        if header is None:  # HTTP/1.0 without Host: not a browser (every browser sends one)
            return True
        name = host_name(header)
        if name is None:
            return False
        if name in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return address.is_loopback or self.any_address

    def refusal(self, header: str) -> str:
        shown = header[:100].encode("ascii", "backslashreplace").decode()
        return (f"this service does not answer to the host name {shown!r} (a guard against DNS rebinding): use "
                "its own address (http://127.0.0.1:PORT/ by default), or start 'vgpuctl serve' with "
                f"--allow-host NAME for a name a reverse proxy or DNS gives it")


def is_public(method: str, path: str) -> bool:
    if path == "/login":
        return method in ("GET", "HEAD", "POST")
    if path == "/logout":
        return method == "POST"
    if method not in ("GET", "HEAD") or path.startswith("/api/") or path in ("/metrics", "/openapi.json"):
        return False
    return path.lower().endswith(PUBLIC_SUFFIXES)


def require_auth(conn: HTTPConnection) -> None:
    """FastAPI dependency for HTTP and WebSocket routes: 401 (HTTP) or close 1008 (WebSocket) unless the
    request carries the bearer token or a valid session cookie (from the service's own origin)."""
    auth: Authenticator = conn.app.state.auth
    headers = {k.lower(): v for k, v in conn.headers.items()}
    method = auth.method(headers)
    websocket = conn.scope["type"] == "websocket"
    if method is None:
        if websocket:
            raise WebSocketException(code=WS_1008_POLICY_VIOLATION, reason="unauthorized: log in at /login")
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": 'Bearer realm="vgpuctl"'})
    if websocket and not same_origin(headers, conn.url.scheme):
        raise WebSocketException(code=WS_1008_POLICY_VIOLATION, reason="cross-origin WebSocket refused")


# ---------------------------------------------------------------------- the guard


class AuthGuard:
    """ASGI middleware: refuses tokens in URLs, authenticates every request, logs method, path and status.

    First a Host header that does not name the service: 421 (close 1008 for a WebSocket); a token in the URL:
    400; a body over :data:`MAX_BODY`: 413 (``Content-Length`` at once, a chunked body once it gets there).
    Unauthenticated: 401 JSON for the API (``WWW-Authenticate: Bearer``), a redirect to ``/login`` for a
    browser asking for a page, close 1008 for a WebSocket. Every HTTP response also gets
    ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and ``Referrer-Policy: no-referrer``;
    API responses ``Cache-Control: no-store``.
    """

    def __init__(self, app: ASGIApp, auth: Authenticator, hosts: HostNames | None = None) -> None:
        self.app = app
        self.auth = auth
        self.hosts = hosts or HostNames()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        started = time.monotonic()
        status: list[int] = []

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"no-referrer")]
                if path.startswith("/api/") or path in ("/metrics", "/openapi.json"):
                    extra.append((b"cache-control", b"no-store"))
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in extra if h[0] not in names)]
            elif message["type"] == "websocket.accept":
                status.append(101)
            elif message["type"] == "websocket.close" and not status:
                status.append(403)
            await send(message)

        try:
            await self._guarded(scope, receive, send_logged, method, path)
        except BodyTooLarge:
            if status:  # the app had answered already: nothing more to say
                raise
            await _json(send_logged, 413, "too_large", TOO_LARGE, [(b"connection", b"close")])
        finally:
            # Method and path only: never the query string (and so never a token someone put there).
            log.info("%s %s %s %.0fms", method, path, status[0] if status else "-",
                     (time.monotonic() - started) * 1000)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, method: str, path: str) -> None:
        websocket = scope["type"] == "websocket"
        headers = _headers(scope)
        if not self.hosts.allows(headers.get("host")):
            if websocket:
                await send({"type": "websocket.close", "code": WS_1008_POLICY_VIOLATION, "reason": "unknown host"})
            else:
                await _json(send, 421, "unknown_host", self.hosts.refusal(headers["host"]))
            return
        if token_in_url(scope):
            if websocket:
                await send({"type": "websocket.close", "code": WS_1008_POLICY_VIOLATION, "reason": "token in URL"})
            else:
                await _json(send, 400, "token_in_url", TOKEN_IN_URL)
            return
        if not websocket:
            length = headers.get("content-length")
            if length is not None and not (length.strip().isascii() and length.strip().isdigit()):
                await _json(send, 400, "bad_request", "Content-Length must be a number of bytes")
                return
            if length is not None and int(length) > MAX_BODY:
                await _json(send, 413, "too_large", TOO_LARGE, [(b"connection", b"close")])
                return
            receive = _limited(receive)
        if not websocket and is_public(method, path):
            await self.app(scope, receive, send)
            return
        how = self.auth.method(headers)
        if how is None:
            if websocket:
                await send({"type": "websocket.close", "code": WS_1008_POLICY_VIOLATION, "reason": "unauthorized"})
            elif method in ("GET", "HEAD") and _wants_page(path, headers):
                query = scope.get("query_string", b"").decode("latin-1")
                target = path + (f"?{query}" if query else "")  # back to the same page, query included
                await _redirect(send, "/login" + (f"?next={quote(target, safe='/')}" if target != "/" else ""))
            else:
                await _json(send, 401, "unauthorized", UNAUTHORIZED,
                            [(b"www-authenticate", b'Bearer realm="vgpuctl"')])
            return
        if (websocket or (how == "cookie" and method not in SAFE_METHODS)) and \
                not same_origin(headers, scope.get("scheme", "http")):
            if websocket:
                await send({"type": "websocket.close", "code": WS_1008_POLICY_VIOLATION, "reason": "cross-origin"})
            else:
                await _json(send, 403, "forbidden", "cross-origin request refused: use the dashboard on this "
                                                    "service's own address, or the Authorization header")
            return
        await self.app(scope, receive, send)


class BodyTooLarge(StarletteHTTPException):
    """Raised by the request's ``receive`` once the body passes MAX_BODY: FastAPI's body parsing and
    ``request.stream()`` pass it on, and it becomes a 413 ``too_large`` like any HTTPException."""

    def __init__(self) -> None:
        super().__init__(413, TOO_LARGE, headers={"Connection": "close"})


def _limited(receive: Receive) -> Receive:
    """``receive`` counting the body's bytes: BodyTooLarge once there are more than MAX_BODY."""
    received = 0

    async def receive_limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > MAX_BODY:
                raise BodyTooLarge()
        return message

    return receive_limited


def _wants_page(path: str, headers: dict[str, str]) -> bool:
    if path.startswith("/api/") or path in ("/metrics", "/openapi.json"):
        return False
    return path == "/" or path.endswith(".html") or "text/html" in headers.get("accept", "")


async def _json(send: Send, status: int, kind: str, message: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    import json

    body = json.dumps({"error": kind, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", quote(location, safe="/?=&%").encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
