"""The application: :func:`create_app` puts the API, events, metrics, login and dashboard together.

Routes outside ``/api/v1`` (see :mod:`.api` for those):

- ``GET /openapi.json`` the OpenAPI document (authenticated like everything else);
- ``GET /metrics`` Prometheus text (:mod:`.metrics`);
- ``GET /login`` the login form, ``POST /login`` (form field ``token``, optional ``next``) sets the
  session cookie and redirects (303) to ``next`` or ``/``; a wrong token redirects back to
  ``/login?error=1``; ``POST /logout`` ends the session;
- ``GET /`` the dashboard (``web/index.html``), and every other file of ``web/`` by its name; pages
  need a login (else a redirect to ``/login``), scripts, styles and images do not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from vgpuctl import __version__
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.service import api, errors, logs
from vgpuctl.service.auth import (
    COOKIE,
    SESSION_SECONDS,
    Authenticator,
    AuthGuard,
    HostNames,
    load_or_create_token,
    require_auth,
    session_cookie,
)
from vgpuctl.service.events import POLL_INTERVAL_S, EventHub
from vgpuctl.service.metrics import make_registry, render

log = logging.getLogger("vgpuctl.service")

WEB_DIR = Path(__file__).parent / "web"
MAX_LOGIN_BODY = 8192
FAILED_LOGIN_DELAY_S = 0.25

DESCRIPTION = """\
vgpuctl's API: the host's mdev GPUs and vGPU types, vGPUs and their mdevctl definitions, VMs, the
host check, live events and metrics — the same library and the same JSON as the `vgpuctl` CLI.

**Authentication**: `Authorization: Bearer <token>` (the token is in `<state-dir>/token`), or the
`vgpuctl_session` cookie that `POST /login` sets. Never put the token in the URL: that is refused (400).

**Errors** are JSON `{"error": kind, "message": what to do}`: 404 `not_found`; 409 `conflict`,
`not_owned` (add `force=true`), `capacity_error` (the GPU is full: the message says which pool and what
still fits), `kernel_error`, `vm_error`; 422 `invalid_input`; 401 `unauthorized`; 400 `token_in_url`;
413 `too_large` (a body over 1 MiB); 421 `unknown_host` (a Host header that does not name this service);
503 `state_damaged` (one of vgpuctl's own files is damaged: the message says which).
"""

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in — vgpuctl</title></head>
<body style="font-family: sans-serif; max-width: 30em; margin: 4em auto">
<form method="post" action="/login">
<h1>vgpuctl</h1>
<p>Enter the access token: it is in the file <code>token</code> in vgpuctl's state directory
(<code>/var/lib/vgpuctl/token</code> by default).</p>
<p><label for="token">Access token</label><br>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus size="48"></p>
<p><button type="submit">Log in</button></p>
</form></body></html>
"""

NO_DASHBOARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vgpuctl</title></head>
<body style="font-family: sans-serif"><h1>vgpuctl</h1>
<p>The dashboard is not installed. The API is at <a href="/api/v1/gpus">/api/v1</a>, described by
<a href="/openapi.json">/openapi.json</a>; metrics at <a href="/metrics">/metrics</a>.</p></body></html>
"""


def create_app(root: HostRoot, state: StateDir, token: str | None = None, *,
               poll_interval_s: float = POLL_INTERVAL_S, listen_host: str | None = None,
               allow_hosts: Iterable[str] = ()) -> FastAPI:
    """The service for the host at ``root`` with vgpuctl's state in ``state``; ``token`` defaults to
    ``<state-dir>/token``, made at the first start. Requests must name the service in their Host header:
    a loopback address, ``localhost``, ``listen_host`` (the address it listens on) or one of
    ``allow_hosts`` (see :class:`~.auth.HostNames`)."""
    token = token if token is not None else load_or_create_token(state)
    logs.protect(token)  # from here on no log line of this process shows it
    auth = Authenticator(token, state)
    hub = EventHub(_snapshotters(root, state), poll_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await hub.close()
        hubs = getattr(app.state, "display_hubs", None)
        if hubs is not None and hasattr(hubs, "aclose"):
            await hubs.aclose()

    app = FastAPI(title="vgpuctl", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  openapi_url="/openapi.json", docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None)
    app.state.ctx = api.Context(root, state)
    app.state.root, app.state.state = root, state
    app.state.auth = auth
    app.state.events = hub
    app.state.metrics = make_registry(root, state)
    errors.install(app)
    app.add_middleware(AuthGuard, auth=auth, hosts=HostNames(listen_host, allow_hosts))
    app.include_router(api.router)
    _include_display_stream(app)
    _add_metrics(app)
    _add_login(app, auth)
    _add_web(app)
    _document_security(app)
    return app


def _snapshotters(root: HostRoot, state: StateDir) -> dict[str, Any]:
    from vgpuctl.mdev.report import gpus_rows, vgpu_rows
    from vgpuctl.service.problems import unreadable_files
    from vgpuctl.vm.inventory import vf_holders, vf_listing, vm_overviews

    return {"gpus": lambda: gpus_rows(root, set(vf_holders(root, state))), "vgpus": lambda: vgpu_rows(root, state),
            "vms": lambda: vm_overviews(root, state), "problems": lambda: unreadable_files(root, state),
            "vfs": lambda: vf_listing(root, state)}


def _include_display_stream(app: FastAPI) -> None:
    """The display WebSocket (``vgpuctl.service.stream``), when it is there and its dependencies are."""
    try:
        from vgpuctl.service.stream import router
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "vgpuctl.service.stream":
            log.info("no display streaming (vgpuctl.service.stream is not installed)")
        else:
            log.warning("display streaming is off: %s", e)
        return
    app.include_router(router)


def _add_metrics(app: FastAPI) -> None:
    registry = app.state.metrics

    @app.get("/metrics", tags=["metrics"], dependencies=[Depends(require_auth)], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def metrics() -> Response:
        """Prometheus metrics, all named ``vgpuctl_*``: vGPUs per type and parent, pools, available instances,
        VMs per state, display streams' fps and viewers."""
        body, content_type = render(registry)
        return Response(body, media_type=content_type)


def _safe_next(value: str | None) -> str:
    """Only a path on this site (no scheme, no host, no '//'): never an open redirect."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value \
            and not any(c in value for c in "\r\n") and not value.startswith("/login"):
        return value
    return "/"


def _add_login(app: FastAPI, auth: Authenticator) -> None:
    @app.get("/login", include_in_schema=False)
    def login_page() -> Response:
        page = WEB_DIR / "login.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-store"})
        return HTMLResponse(LOGIN_PAGE, headers={"Cache-Control": "no-store"})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                raise HTTPException(413, "the login form is larger than a token")
        fields = _login_fields(request.headers.get("content-type", ""), body)
        token, target = fields.get("token", ""), _safe_next(fields.get("next"))
        if not (token and auth.check_token(token.strip())):
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)
            again = "/login?error=1" + (f"&next={quote(target, safe='/')}" if target != "/" else "")
            return RedirectResponse(again, status_code=303)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, auth.new_session(), max_age=SESSION_SECONDS, path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        session = session_cookie(request.headers.get("cookie", ""))
        if session:
            auth.revoke(session)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response


def _login_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The login form's fields: urlencoded (a browser's form) or a JSON object."""
    try:
        text = body.decode()
        if content_type.split(";")[0].strip().lower() == "application/json":
            data = json.loads(text)
            return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
        return {k: v[0] for k, v in parse_qs(text, max_num_fields=10).items()}
    except ValueError:  # not UTF-8, not JSON, too many fields: no token
        return {}


def _add_web(app: FastAPI) -> None:
    web = WEB_DIR.resolve()

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = web / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache"})
        return HTMLResponse(NO_DASHBOARD)

    @app.get("/{path:path}", include_in_schema=False)
    def web_file(path: str) -> Response:
        candidate = (web / path).resolve()
        if path.startswith("api/") or not candidate.is_relative_to(web) or not candidate.is_file():
            raise HTTPException(404, f"no page or file /{path}; the API is under /api/v1 (see /openapi.json)")
        return FileResponse(candidate, headers={"Cache-Control": "no-cache"})


def _document_security(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The token in <state-dir>/token"},
                "session": {"type": "apiKey", "in": "cookie", "name": COOKIE,
                            "description": "Set by POST /login (form field token)"},
            }
            schema["security"] = [{"bearer": []}, {"session": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
