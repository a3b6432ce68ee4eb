"""vgpuctl's own state directory: what it owns (mdev/state.py), its locks, VM specs and runtime files, the
service's token and revocations.

Chosen by ``--state-dir``, else ``$VGPUCTL_STATE_DIR``, else /var/lib/vgpuctl; never inside mdevctl's
files, and not under the host root, so that a simulated host and a test's state stay apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

STATE_ENV = "VGPUCTL_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/vgpuctl"


class StateDir(NamedTuple):
    """vgpuctl's own state directory (--state-dir)."""

    path: Path

    @classmethod
    def from_env(cls, path: str | os.PathLike[str] | None = None) -> StateDir:
        chosen = path if path is not None else os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR
        return cls(Path(chosen))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive advisory lock (flock), released on exit or when the process dies."""
        if "/" in name or name.startswith("."):  # a lock file stays in locks/, whatever a name holds
            raise ValueError(f"lock name {name!r} is not a file name")
        locks = self.path / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
