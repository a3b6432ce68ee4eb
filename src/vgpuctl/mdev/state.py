"""vgpuctl's own records: which vGPUs and definitions it created, and per-parent locks.

Kept in a state directory of its own (``--state-dir``, ``$VGPUCTL_STATE_DIR``, default
/var/lib/vgpuctl), never inside mdevctl's files, and not under the host root: a simulated host
and a test's state stay apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgpuctl.mdev.definitions import atomic_write

STATE_ENV = "VGPUCTL_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/vgpuctl"


@dataclass(frozen=True)
class StateDir:
    """vgpuctl's own state directory (--state-dir): what it owns, its locks, VM specs and runtime files."""

    path: Path

    @classmethod
    def from_env(cls, path: str | os.PathLike[str] | None = None) -> StateDir:
        chosen = path if path is not None else os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR
        return cls(Path(chosen))

    @property
    def owned_file(self) -> Path:
        return self.path / "owned.json"

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive advisory lock (flock), released on exit or when the process dies."""
        locks = self.path / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def owned(self) -> dict[str, dict[str, Any]]:
        """uuid -> {"parent", "type", "since"} for every vGPU or definition vgpuctl created."""
        try:
            data: dict[str, dict[str, Any]] = json.loads(self.owned_file.read_text())["vgpus"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"{self.owned_file} is damaged: move it away; vgpuctl will then own nothing") \
                from None
        return data

    def owns(self, uuid: str) -> bool:
        return uuid in self.owned()

    def record(self, uuid: str, parent: str, type_id: str) -> None:
        self._update(lambda vgpus: vgpus.setdefault(uuid, {"parent": parent, "type": type_id,
                                                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))

    def forget(self, uuid: str) -> None:
        self._update(lambda vgpus: vgpus.pop(uuid, None))

    def _update(self, change: Any) -> None:
        with self.lock("state"):
            vgpus = self.owned()
            change(vgpus)
            atomic_write(self.owned_file, json.dumps({"vgpus": vgpus}, indent=2, sort_keys=True).encode() + b"\n")
