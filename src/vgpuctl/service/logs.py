"""No secret in any log line: the token and session cookies are scrubbed from every log record.

The service never logs a query string or a header itself (:class:`~.auth.AuthGuard` logs method, path and
status). But other code does: uvicorn logs every WebSocket handshake with its whole URL at INFO
(``"WebSocket /api/v1/vms/car1/display?token=..." [accepted]``, whatever ``access_log`` says), its access log
(off in ``vgpuctl serve``) and its trace level print query strings and headers, and a client may put the
token anywhere — in a path segment, which the service's own line logs. So :func:`protect` installs a log
record factory (process-wide: every logger, every handler, whoever configured them) that, in each record's
message, arguments and traceback:

- replaces the token itself (also percent-encoded) with ``[token]``;
- replaces anything shaped like a session cookie (``<expiry>.<nonce>.<64 hex>``) with ``[session]``;
- drops the values of query parameters that carry credentials (``token``, ``access_token``, ...) and of
  ``Authorization`` and ``Cookie`` headers, so a wrong or an old token does not show either.

Records without a trigger in them (most) cost one substring scan.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import quote, unquote

REDACTED_TOKEN = "[token]"
REDACTED_SESSION = "[session]"
REDACTED = "[redacted]"

_SESSION = re.compile(r"\b\d{6,15}\.[A-Za-z0-9_-]{8,64}\.[0-9a-f]{64}\b")
_SECRET_PARAMS = r"(?:access_token|token|session|vgpuctl_session|password|passwd|secret|api_key|apikey|key|auth)"
_QUERY_SECRET = re.compile(rf"(?i)([?&;]{_SECRET_PARAMS}=)[^&\s\"'#;]*")
_HEADER_SECRET = re.compile(r"(?i)((?:authorization|cookie|x-api-key)['\"]?\s*[:=,]\s*b?['\"]?)[^'\"\r\n]*")
_TRIGGERS = ("token", "session", "authorization", "cookie", "=", "password", "secret", "key", "auth")

_secrets: set[str] = set()
_lock = threading.Lock()
_previous_factory: Any = None


def scrub(text: str) -> str:
    """``text`` without the protected secrets, session cookies and credential-bearing values."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED_TOKEN)
        elif "%" in text and secret in unquote(text):
            text = unquote(text).replace(secret, REDACTED_TOKEN)
    text = _SESSION.sub(REDACTED_SESSION, text)
    text = _QUERY_SECRET.sub(rf"\1{REDACTED}", text)
    return _HEADER_SECRET.sub(rf"\1{REDACTED}", text)


def _needs_scrub(text: str) -> bool:
    if any(secret in text for secret in _secrets):
        return True
    lowered = text.lower()
    return any(t in lowered for t in _TRIGGERS) or "%" in text or bool(_SESSION.search(text))


def _scrub_record(record: logging.LogRecord) -> None:
    args = record.args
    if isinstance(args, tuple) and all(isinstance(a, (str, int, float, type(None))) for a in args):
        # Argument by argument, so that formatters that read record.args (uvicorn's access log) still work.
        if isinstance(record.msg, str) and _needs_scrub(record.msg):
            record.msg = scrub(record.msg)
        record.args = tuple(scrub(a) if isinstance(a, str) and _needs_scrub(a) else a for a in args)
        message = record.getMessage()
        if _needs_scrub(message) and scrub(message) != message:  # a secret made of several arguments
            record.msg, record.args = scrub(message), ()
    else:
        message = record.getMessage()  # dicts, bytes, objects (e.g. an ASGI scope at trace level)
        if _needs_scrub(message):
            record.msg, record.args = scrub(message), ()
    if record.exc_info and record.exc_info[0] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        if _needs_scrub(text):
            record.exc_text = scrub(text)
    if record.stack_info and _needs_scrub(record.stack_info):
        record.stack_info = scrub(record.stack_info)


def _factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record: logging.LogRecord = _previous_factory(*args, **kwargs)
    try:
        _scrub_record(record)
    except Exception:  # a record that cannot be formatted: logging reports that itself, later; hide it all
        record.msg, record.args = "[a log record that could not be checked for secrets]", ()
        record.exc_info = record.exc_text = None
    return record


def protect(secret: str) -> None:
    """From now on, no log record of this process shows ``secret`` (nor session cookies, nor credentials in
    URLs and headers). Idempotent; the first call installs the record factory."""
    global _previous_factory
    with _lock:
        if len(secret) >= 8:
            _secrets.add(secret)
            if quote(secret, safe="") != secret:
                _secrets.add(quote(secret, safe=""))
        if _previous_factory is None:
            _previous_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_factory)
