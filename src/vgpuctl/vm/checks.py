"""How a spec's values are checked: each check names the field it refuses (spec.py and every device use them)."""

from __future__ import annotations

import re
from typing import Any

from vgpuctl.base.errors import InvalidInput

MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB: more than any host QEMU runs on; also bounds graphics memory


def describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def one_of(label: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInput(f"{label} must be one of {', '.join(choices)}, got {value!r}")


def positive(label: str, value: Any, unit: str = "", maximum: int | None = None) -> None:
    integer = isinstance(value, int) and not isinstance(value, bool)
    if not integer or value < 1 or (maximum and value > maximum):
        limit = f" up to {maximum}" if maximum and (unit == "" or (integer and value > maximum)) else ""
        raise InvalidInput(f"{label} must be a positive integer{f' ({unit})' if unit else ''}{limit}, "
                           f"got {describe(value)}")


def absolute(label: str, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidInput(f"{label} must be an absolute path, got {describe(value)}")


def parse_resolution(label: str, value: str) -> tuple[int, int]:
    match = re.fullmatch(r"([1-9][0-9]{1,4})x([1-9][0-9]{1,4})", value) if isinstance(value, str) else None
    if not match:
        raise InvalidInput(f"{label} must look like 1920x1200, got {describe(value)}")
    return int(match[1]), int(match[2])
