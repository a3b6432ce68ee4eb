"""A VM's display in the browser: ``WebSocket /api/v1/vms/{name}/display``.

QEMU's VNC server (``-vnc unix:<state>/vms/<name>/vnc.sock``) → our RFB client (:mod:`.rfb`, Raw over a
socketpair handed to QEMU through the VM's QMP socket, else over the VNC socket; :mod:`.connection`) → one
:class:`~.hub.DisplayHub` per VM (framebuffer, change tracking in :mod:`.damage`, one encoder per codec shared by
its viewers: :mod:`.jpeg`, :mod:`.h264`; a bounded "latest frame" slot per viewer, :mod:`.viewer`) → a binary
WebSocket per viewer. Input goes back as JSON.
The wire protocol is in ``PROTOCOL.md`` beside this file.

``router`` (auth: :func:`vgpuctl.service.auth.require_auth`) is what the service app includes;
:func:`make_router` builds one with another auth dependency (tests). The route reads the state directory
from ``app.state.state`` and keeps its hubs in ``app.state.display_hubs`` (a :class:`~.hub.HubRegistry`,
made on first use; the app may put one there itself to choose :class:`~.hub.StreamOptions` or to close the
hubs at shutdown with ``await registry.aclose()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from vgpuctl.service.auth import MAX_WS_MESSAGE
from vgpuctl.service.stream.hub import CODECS, Codec, DisplayClosed, DisplayHub, HubRegistry, StreamOptions, Viewer
from vgpuctl.service.stream.rfb import RfbError

__all__ = ["CLOSE_DISPLAY_ENDED", "CLOSE_NOT_FOUND", "MAX_WS_MESSAGE", "DisplayHub", "HubRegistry", "StreamOptions",
           "handle_input", "make_router", "parse_input", "registry_of", "router", "serve_display"]

log = logging.getLogger("vgpuctl.service")

CLOSE_NOT_FOUND = 4404
"""Close code: no such VM, it is not running, or it has no VNC display."""
CLOSE_DISPLAY_ENDED = 4410
"""Close code: the display went away while streaming (the VM stopped)."""
CLOSE_BAD_MESSAGE = 1003
MAX_TEXT = 4096
"""Characters in one input message; a longer one closes the connection (1003). Real ones are < 100."""
MAX_DEPTH = 4
"""Nesting of objects and arrays in one input message: real ones are flat objects (depth 1). A deeper one
is ignored without being parsed (json.loads recurses once per level: 4096 brackets would hit Python's
recursion limit)."""


def registry_of(app: Any) -> HubRegistry:
    registry = getattr(app.state, "display_hubs", None)
    if registry is None:
        registry = HubRegistry()
        app.state.display_hubs = registry
    assert isinstance(registry, HubRegistry)
    return registry


def make_router(auth_dependency: Callable[..., Any] | None) -> APIRouter:
    """The display route, guarded by ``auth_dependency`` (a FastAPI dependency that works for WebSockets);
    None means no authentication (tests only)."""
    router = APIRouter(dependencies=[Depends(auth_dependency)] if auth_dependency is not None else [],
                       tags=["display"])

    @router.websocket("/api/v1/vms/{name}/display")
    async def vm_display(websocket: WebSocket, name: str) -> None:
        """The VM's display: binary messages (JPEG rectangles, frame ends) out, JSON input in (PROTOCOL.md)."""
        await serve_display(websocket, name)

    return router


def _default_router() -> APIRouter:
    from vgpuctl.service.auth import require_auth

    return make_router(require_auth)


router = _default_router()


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.CONNECTING:
        await websocket.accept()
    if websocket.application_state == WebSocketState.CONNECTED and \
            websocket.client_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await websocket.close(code, reason[:120])  # a close reason has at most 123 bytes


async def serve_display(websocket: WebSocket, name: str) -> None:
    """Stream VM ``name``'s display to this WebSocket until either side ends it."""
    from vgpuctl.base.errors import VgpuError
    from vgpuctl.vm.runtime import RuntimePaths, is_running

    state = websocket.app.state.state
    try:
        paths = RuntimePaths.for_vm(state, name)
    except (VgpuError, ValueError):
        await _close(websocket, CLOSE_NOT_FOUND, f"no VM {name[:40]!r}: not a valid VM name")
        return
    if not is_running(state, name):
        await _close(websocket, CLOSE_NOT_FOUND, f"VM {name} is not running")
        return
    if not paths.vnc_socket.exists():
        await _close(websocket, CLOSE_NOT_FOUND, f"VM {name} has no VNC display (display backend is not vnc)")
        return
    try:
        codec = Codec.parse(websocket.query_params.get("codec", Codec.JPEG))
    except ValueError:
        await _close(websocket, 1008, f"codec must be one of {', '.join(CODECS)}")
        return
    await websocket.accept()
    try:
        viewer = await registry_of(websocket.app).join(paths.vnc_socket, name=name, codec=codec,
                                                       qmp_socket=paths.qmp_socket)
    except (OSError, RfbError, DisplayClosed) as exc:
        await _close(websocket, CLOSE_NOT_FOUND, f"VM {name}: display unavailable: {exc}")
        return
    sender = asyncio.create_task(_send_frames(websocket, viewer))
    receiver = asyncio.create_task(_receive_input(websocket, viewer))
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, WebSocketDisconnect | OSError | RuntimeError):
                log.error("display stream of %s failed", name, exc_info=error)
    finally:
        for task in (sender, receiver):
            task.cancel()
        for task in (sender, receiver):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await viewer.close()
    if viewer.closed_reason not in (None, "unsubscribed"):
        await _close(websocket, CLOSE_DISPLAY_ENDED, viewer.closed_reason or "display ended")
    else:
        await _close(websocket, 1000, "")


async def _send_frames(websocket: WebSocket, viewer: Viewer) -> None:
    while True:
        try:
            frame = await viewer.next_frame()
        except DisplayClosed:
            return
        for message in frame.messages:
            await websocket.send_bytes(message)


async def _receive_input(websocket: WebSocket, viewer: Viewer) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            continue  # binary from the client: nothing defined, ignored
        if len(text) > MAX_TEXT:
            await _close(websocket, CLOSE_BAD_MESSAGE, "message too long")
            return
        try:
            event = parse_input(text)
            await handle_input(viewer, event)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            log.debug("display input ignored: %s (%r)", exc, text[:200])


def nesting(text: str) -> int:
    """How deep objects and arrays nest in JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_input(text: str) -> Any:
    """One client message as JSON; ValueError for one that is too long, too deeply nested or not JSON."""
    if len(text) > MAX_TEXT:
        raise ValueError(f"longer than {MAX_TEXT} characters")
    if nesting(text) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return json.loads(text)


async def handle_input(viewer: Viewer, event: Any) -> None:
    """Apply one client message (already parsed JSON) to the viewer's VM. Raises ValueError/TypeError/KeyError
    for a malformed one."""
    if not isinstance(event, dict):
        raise TypeError("not an object")
    kind = event.get("type")
    if kind == "key":
        code, key, down = event["code"], event.get("key"), event["down"]
        if not isinstance(code, str) or not isinstance(down, bool) or not (key is None or isinstance(key, str)):
            raise TypeError("key: code (string), key (string) and down (boolean) expected")
        await viewer.key(code, key, down)
    elif kind == "pointer":
        x, y, buttons = _int(event, "x"), _int(event, "y"), _int(event, "buttons", 0)
        await viewer.pointer(x, y, buttons)
    elif kind == "wheel":
        dx, dy = event.get("dx", 0), event.get("dy", 0)
        if not isinstance(dx, int | float) or not isinstance(dy, int | float):
            raise TypeError("wheel: dx and dy must be numbers")
        await viewer.wheel(_int(event, "x"), _int(event, "y"), dx, dy, _int(event, "buttons", 0))
    elif kind == "refresh":
        viewer.request_full_frame()
    else:
        raise ValueError(f"unknown message type {kind!r}")


def _int(event: dict[str, Any], field: str, default: int | None = None) -> int:
    value = event.get(field, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
        raise TypeError(f"{field}: an integer 0..65535 expected")
    return value
