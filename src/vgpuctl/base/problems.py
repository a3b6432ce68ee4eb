"""A file vgpuctl reads that cannot be read (a bad mdevctl definition, a bad VM spec): reported with its path
and error by every listing, the API, the event stream, the metrics and the dashboard, while everything else
goes on working — one bad file hides nothing."""

from __future__ import annotations

from typing import Literal, NamedTuple

ProblemKind = Literal["definition", "vm_spec"]


class UnreadableFile(NamedTuple):  # a NamedTuple: imported at every CLI start, where a frozen dataclass costs ~1 ms
    kind: ProblemKind
    path: str
    error: str
    owner: str  # whose file it is: a definition's parent device, a VM spec's VM name

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "error": self.error}
