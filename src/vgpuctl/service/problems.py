"""The files vgpuctl reads that cannot be read, each with its path and error: the API, the event stream, the
metrics and the dashboard report them, while everything else goes on working (a bad file hides nothing)."""

from __future__ import annotations

from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot


def unreadable_files(root: HostRoot, state: StateDir) -> list[dict[str, str]]:
    """[{"kind": "definition" | "vm_spec", "path", "error"}], definitions first, each sorted by path."""
    from vgpuctl.mdev import definitions
    from vgpuctl.vm import spec as specs

    return [bad.to_json() for bad in [*definitions.scan(root)[1], *specs.load_each(state)[1]]]
