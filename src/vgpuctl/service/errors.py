"""Every error the service answers with is JSON: ``{"error": <kind>, "message": <what to do>}``.

vgpuctl's own errors map to HTTP statuses by kind:

========================  ======  ==================================================================
error                     status  kind
========================  ======  ==================================================================
NotFound                  404     ``not_found``
Conflict                  409     ``conflict`` (exists already, in use, running ...)
NotOwned                  409     ``not_owned`` (vgpuctl did not create it: add ``?force=true``)
CapacityError             409     ``capacity_error``: the request conflicts with the host's current
                                  state (a full GVT-g pool) and succeeds once a vGPU is removed —
                                  not 507, which is a 5xx: a full GPU is no server fault
InvalidInput              422     ``invalid_input`` (as request validation errors, which also carry
                                  ``detail``: FastAPI's list of what is wrong where)
KernelError               409     ``kernel_error``; 403 ``permission_denied`` for EACCES/EPERM
VmError                   409     ``vm_error`` (a VM that cannot start or be reached)
other VgpuError           409     its class name in snake case (or the class's ``http_status``)
a damaged state file      503     ``state_damaged``: a VgpuError that says a file of vgpuctl's own is
                                  damaged (``owned.json`` ...); the message names the file and what to
                                  do. The service cannot serve that until someone fixes the file: no
                                  client fault, no bug either.
OSError                   409     ``host_error`` (404 for a missing file, 403 for permissions)
========================  ======  ==================================================================

A vgpuctl error that carries data (the PF, the errno, the driver ...) also answers it as ``data``, JSON-safe
(``{"error": "kernel_error", "message": ..., "data": {"parent": "0000:00:02.0", "errno": 2, ...}}``), so a
client need not parse the message.

Bad input is a 4xx, never a 500; only a bug (any other exception: a bare ValueError or RuntimeError too) is
a 500, with
``{"error": "internal", ...}`` and the traceback in the server's log, never in the response.
"""

from __future__ import annotations

import errno
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from vgpuctl.base.errors import CapacityError, Conflict, InvalidInput, KernelError, NotFound, NotOwned, VgpuError

log = logging.getLogger("vgpuctl.service")

STATUS_KINDS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
                421: "unknown_host", 422: "invalid_input", 503: "unavailable"}
_DAMAGED = re.compile(r"\b(is|are) (damaged|corrupt(ed)?)\b|\bdamaged\b", re.IGNORECASE)


class ErrorBody(BaseModel):
    """What every error response holds."""

    error: str
    message: str


# For the OpenAPI document: the error statuses every API operation may answer with.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No or a wrong token/session"},
    404: {"model": ErrorBody, "description": "No such GPU, type, vGPU, definition or VM"},
    409: {"model": ErrorBody, "description": "Conflict, not owned, no capacity, kernel or VM refused"},
    413: {"model": ErrorBody, "description": "Request body over 1 MiB"},
    422: {"model": ErrorBody, "description": "Invalid input"},
    503: {"model": ErrorBody, "description": "A state file of vgpuctl's is damaged (the message says which)"},
}


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, **extra}, status_code=status, headers=headers)


def _kind(error: BaseException) -> str:
    """NotFound -> not_found, CapacityError -> capacity_error, VmError -> vm_error (a VgpuError says its kind)."""
    if isinstance(error, VgpuError):
        return error.kind
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


def _damaged_state(error: Exception) -> bool:
    """A VgpuError of no more specific kind saying one of vgpuctl's files is damaged."""
    return "Damaged" in type(error).__name__ or "Corrupt" in type(error).__name__ or bool(_DAMAGED.search(str(error)))


def classify(error: Exception) -> tuple[int, str]:
    """The HTTP status and error kind of one of vgpuctl's errors or an OSError; 500 ``internal`` for anything
    else (a bug)."""
    if isinstance(error, VgpuError):
        declared = getattr(error, "http_status", None)  # a VgpuError subclass may say what it is over HTTP
        if isinstance(declared, int) and 400 <= declared <= 599:
            return declared, _kind(error)
    if isinstance(error, NotFound):
        return 404, "not_found"
    if isinstance(error, (Conflict, NotOwned, CapacityError)):
        return 409, _kind(error)
    if isinstance(error, InvalidInput):
        return 422, "invalid_input"
    if isinstance(error, KernelError):
        if error.errno in (errno.EACCES, errno.EPERM):
            return 403, "permission_denied"
        return 409, "kernel_error"
    if isinstance(error, VgpuError):
        return (503, "state_damaged") if _damaged_state(error) else (409, _kind(error))
    if isinstance(error, FileNotFoundError):
        return 404, "not_found"
    if isinstance(error, PermissionError):
        return 403, "permission_denied"
    if isinstance(error, OSError):
        return 409, "host_error"
    return 500, "internal"


def message_of(error: Exception) -> str:
    if isinstance(error, OSError) and not isinstance(error, VgpuError):
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}"
    return str(error) or type(error).__name__


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _finite(value: Any) -> Any:
    """``value`` with every infinite or NaN float (an input echoed back, which JSON cannot hold) as its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _json_safe(data: dict[str, Any]) -> Any:
    """An error's data as JSON can hold it: anything else as its text, infinite floats too."""
    import json

    return json.loads(json.dumps(_finite(data), default=str))


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the JSON body above."""

    async def vgpuctl_error(request: Request, exc: Exception) -> JSONResponse:
        status, kind = classify(exc)
        if kind == "internal":
            log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
            return error_response(500, "internal", "internal error: see the server's log")
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, message_of(exc))
        data = getattr(exc, "data", None) if isinstance(exc, VgpuError) else None
        extra = {"data": _json_safe(data)} if data else {}
        return error_response(status, kind, message_of(exc), **extra)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        return error_response(422, "invalid_input", _validation_message(errors),
                              detail=_finite(jsonable_encoder(errors, custom_encoder={Exception: str})))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = STATUS_KINDS.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, kind, detail, headers=dict(exc.headers or {}))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", "internal error: see the server's log")

    for error in (VgpuError, OSError):
        app.add_exception_handler(error, vgpuctl_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
