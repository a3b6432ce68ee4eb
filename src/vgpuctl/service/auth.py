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
  ``POST /logout`` revokes the session (in this process) and clears the cookie.
- A request authenticated by the cookie that changes something (not GET/HEAD/OPTIONS), and every
  WebSocket handshake, must come from the service's own origin when it names one (``Origin``):
  SameSite=Strict already keeps the cookie off cross-site requests; this is the second lock.
- Public without either: ``GET/POST /login``, ``POST /logout`` and static assets other than HTML
  (``*.js``, ``*.css``, images, fonts) — nothing in them is secret.

:class:`AuthGuard` (ASGI middleware) enforces this for every HTTP request and WebSocket handshake.
:func:`require_auth` is the same check as a FastAPI dependency, for routes that want it explicitly —
the display WebSocket uses it: ``@router.websocket(..., dependencies=[Depends(require_auth)])`` or
a parameter ``_: None = Depends(require_auth)``; it closes an unauthenticated handshake with 1008
(policy violation; before the handshake is accepted, browsers see it as a failed connection).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from fastapi import HTTPException, WebSocketException
from starlette.requests import HTTPConnection
from starlette.status import WS_1008_POLICY_VIOLATION

from vgpuctl.mdev.state import StateDir

log = logging.getLogger("vgpuctl.service")

TOKEN_FILE = "token"
COOKIE = "vgpuctl_session"
SESSION_SECONDS = 7 * 24 * 3600
URL_TOKEN_PARAMS = ("token", "access_token")
PUBLIC_SUFFIXES = (".js", ".mjs", ".css", ".map", ".svg", ".png", ".ico", ".webp", ".woff", ".woff2", ".ttf")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
TOKEN_IN_URL = ("never put the token in the URL (it ends up in logs and browser history): send it as the header "
                "'Authorization: Bearer <token>', or log in at /login")
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
    """The service's token, made at the first start (``<state-dir>/token``, mode 0600)."""
    path = token_path(state)
    state.path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token


def _read_token(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ValueError(f"cannot read the token file {path} ({e.strerror}); it must be a regular file: "
                         "remove it and restart to make a new token") from None
    with os.fdopen(fd) as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"the token file {path} is not a regular file: remove it and restart")
        if mode & 0o077:
            os.fchmod(f.fileno(), 0o600)
            log.warning("%s was readable by others: made it 0600; consider a new token (remove the file)", path)
        token = f.read().strip()
    if len(token) < 16:
        raise ValueError(f"the token file {path} holds no usable token: remove it and restart to make a new one")
    return token


# ---------------------------------------------------------------------- checking


class Authenticator:
    """Checks bearer tokens and session cookies; issues and revokes sessions."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._key = hmac.new(self._token, b"vgpuctl session key v1", hashlib.sha256).digest()
        self._revoked: dict[str, int] = {}  # nonce -> expiry

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token)

    def new_session(self, now: float | None = None) -> str:
        expires = int(now if now is not None else time.time()) + SESSION_SECONDS
        payload = f"{expires}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{self._sign(payload)}"

    def check_session(self, value: str, now: float | None = None) -> bool:
        payload, _, signature = value.rpartition(".")
        expires, _, nonce = payload.partition(".")
        if not (expires.isdigit() and nonce and signature):
            return False
        if not hmac.compare_digest(signature, self._sign(payload)):
            return False
        return int(expires) > (now if now is not None else time.time()) and nonce not in self._revoked

    def revoke(self, value: str) -> None:
        if self.check_session(value):
            expires, nonce = value.split(".")[:2]
            now = time.time()
            self._revoked = {n: e for n, e in self._revoked.items() if e > now}
            self._revoked[nonce] = int(expires)

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

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
    """True unless the request names an Origin other than the host it was sent to."""
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    parts = urlsplit(origin)
    default = {"http": 80, "https": 443, "ws": 80, "wss": 443}
    host = headers.get("host", "")
    if ":" not in host.rpartition("]")[2]:
        host = f"{host}:{default.get(scheme, 80)}"
    origin_host = parts.hostname or ""
    if ":" in origin_host:
        origin_host = f"[{origin_host}]"
    return f"{origin_host}:{parts.port or default.get(parts.scheme, 80)}" == host.lower()


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

    Unauthenticated: 401 JSON for the API (``WWW-Authenticate: Bearer``), a redirect to ``/login`` for a
    browser asking for a page, close 1008 for a WebSocket. Every HTTP response also gets
    ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and ``Referrer-Policy: no-referrer``;
    API responses ``Cache-Control: no-store``.
    """

    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

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
        finally:
            # Method and path only: never the query string (and so never a token someone put there).
            log.info("%s %s %s %.0fms", method, path, status[0] if status else "-",
                     (time.monotonic() - started) * 1000)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, method: str, path: str) -> None:
        websocket = scope["type"] == "websocket"
        if token_in_url(scope):
            if websocket:
                await send({"type": "websocket.close", "code": WS_1008_POLICY_VIOLATION, "reason": "token in URL"})
            else:
                await _json(send, 400, "token_in_url", TOKEN_IN_URL)
            return
        if not websocket and is_public(method, path):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
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
