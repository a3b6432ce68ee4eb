"""Property tests: no name a user can type makes a host path leave the directory it was meant for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpuctl.base.errors import InvalidInput
from vgpuctl.host import HostRoot
from vgpuctl.host.root import path_name, relative_path
from vgpuctl.mdev import definitions

ROOT = HostRoot(Path("/srv/host"))
# Names made of the characters that matter here ('/', '.', NUL) and a few ordinary ones, then any text.
TRICKY = st.text(alphabet=st.sampled_from(["/", ".", "\0", "a", "0", "-", ":", " "]), max_size=12)
NAMES = TRICKY | st.text(max_size=20)


def inside(path: Path, directory: Path) -> bool:
    return os.path.normpath(path).startswith(str(directory) + "/")


@settings(max_examples=400, deadline=None)
@given(NAMES)
def test_an_attribute_stays_below_its_device(name: str) -> None:
    device = ROOT.mdev_device_dir("11111111-0000-4000-8000-000000000001")
    try:
        relative_path(name, "attribute")
        local = ROOT.path(f"{device}/{name}")
    except InvalidInput:
        return
    assert inside(local, ROOT.path(device)), name


@settings(max_examples=400, deadline=None)
@given(NAMES)
def test_a_parent_is_one_directory_of_mdevctl_d(name: str) -> None:
    try:
        path_name(name, "parent")
        local = ROOT.path(definitions.definition_path(ROOT, name, "11111111-0000-4000-8000-000000000001"))
    except InvalidInput:
        return
    assert local.parent.parent == ROOT.path(ROOT.etc_mdevctl_d), name


@settings(max_examples=400, deadline=None)
@given(st.lists(NAMES, min_size=1, max_size=4))
def test_no_host_path_leaves_the_root(parts: list[str]) -> None:
    text = "/" + "/".join(parts)
    try:
        local = ROOT.path(text)
    except InvalidInput:
        assert ".." in text.split("/") or "\0" in text
        return
    assert inside(local, ROOT.root) or local == ROOT.root, text


@pytest.mark.parametrize("uuid", ["../../../etc/passwd", "11111111-0000-4000-8000-00000000000/", ""])
def test_uuids_are_checked_before_they_become_paths(uuid: str) -> None:
    with pytest.raises(InvalidInput, match="not a UUID"):
        definitions.canonical_uuid(uuid)
