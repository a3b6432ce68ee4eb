"""vgpuctl as mdevctl, side by side with Debian's real mdevctl 1.2.0.

Real mdevctl runs in a private mount namespace over a simulated host (as in test_mdevctl.py).
vgpuctl's mdevctl mode runs either in-process on the same mount (``run_as_mdevctl(..., root=)``,
what ``VGPUCTL_ROOT`` does) or, to check the wiring, as a link named ``mdevctl``/``lsmdev`` to
.venv/bin/vgpuctl in the same kind of namespace, with ``VGPUCTL_ROOT`` and as ``vgpuctl mdevctl``.
stdout, exit status, stderr (timestamps aside) and the files left behind must be identical;
usage errors only share exit status 2 and the ``error:`` prefix (clap's wording is its own).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    GVT_PARENT,
    MountFn,
    Result,
    available,
    config_bytes,
    in_namespace,
    new_uuid,
    placement,
    why_mdevctl_cannot_run,
)
from vgpuctl.base.state import StateDir
from vgpuctl.cli.mdevctl import run_as_mdevctl
from vgpuctl.host import HostRoot
from vgpuctl.mdev.lifecycle import Manager
from vgpuctl.mdev.state import Journal

V5_4 = "i915-GVTg_V5_4"
U1 = "11111111-2222-3333-4444-555555555555"
U2 = "22222222-2222-3333-4444-555555555555"
U3 = "33333333-2222-3333-4444-555555555555"

pytestmark = pytest.mark.mdevctl

U0 = "0000aaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"  # sorts before U1..U3
UF = "ffff0000-bbbb-4ccc-8ddd-eeeeeeeeeeee"  # sorts after them
U9 = "99999999-9999-4999-8999-999999999999"  # never used
V5_1, V5_2, V5_8 = "i915-GVTg_V5_1", "i915-GVTg_V5_2", "i915-GVTg_V5_8"
NO_PARENT = "0000:00:02.1"
Command = list[str]


@pytest.fixture(autouse=True)
def _require_mdevctl() -> None:
    problem = why_mdevctl_cannot_run()
    if problem is not None:
        pytest.fail(problem)


@pytest.fixture
def vgpuctl_bin() -> Path:
    path = Path(sys.executable).with_name("vgpuctl")
    if not path.exists():
        pytest.fail(f"{path} is missing: run 'make deps' to install vgpuctl into the virtualenv")
    return path


# ------------------------------------------------------------------------------ running both


def batch(host: HostRoot, commands: list[Command], work: Path, tool: str = "mdevctl",
          stdin: dict[int, str] | None = None) -> list[Result]:
    """Run each command line with ``tool`` in one namespace over ``host``; their results in order."""
    work.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, argv in enumerate(commands):
        feed = f"printf %s {shlex.quote(stdin[i])} |" if stdin and i in stdin else "</dev/null"
        lines.append(f"{feed} {tool} {shlex.join(argv)} >{work}/{i}.out 2>{work}/{i}.err; echo $? >{work}/{i}.rc")
    in_namespace(host, "\n".join(lines))
    return [Result(int((work / f"{i}.rc").read_text()), (work / f"{i}.out").read_text(),
                   (work / f"{i}.err").read_text()) for i in range(len(commands))]


def real(host: HostRoot, commands: list[Command], tmp: Path) -> list[Result]:
    return batch(host, commands, tmp / f"real{len(list(tmp.glob('real*')))}")


def ours(host: HostRoot, argv: Command, state: Path) -> Result:
    """vgpuctl's mdevctl mode in-process, on the mount (what VGPUCTL_ROOT=<mount> does)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = run_as_mdevctl(["mdevctl", *argv], root=host, state_dir=str(state))
    return Result(rc, out.getvalue(), err.getvalue())


def link(tmp: Path, vgpuctl_bin: Path, name: str = "mdevctl") -> str:
    """A link named like mdevctl to vgpuctl; in the namespace it sees the host as '/'."""
    directory = tmp / "bin"
    directory.mkdir(exist_ok=True)
    if not (directory / name).exists():
        (directory / name).symlink_to(vgpuctl_bin)
    return f"env -u VGPUCTL_ROOT VGPUCTL_STATE_DIR={shlex.quote(str(tmp / 'state'))} {directory / name}"


def normal(result: Result) -> Result:
    """A result with env_logger's timestamps (in mdevctl's warnings) taken out."""
    return result._replace(err=re.sub(r"^\[\S+ WARN", "[WARN", result.err, flags=re.M))


def snapshot(host: HostRoot) -> dict[str, Any]:
    """What a command leaves behind: config files byte for byte, directories, devices, capacity."""
    etc = host.path("/etc/mdevctl.d")
    return {
        "files": {str(p.relative_to(etc)): p.read_bytes() for p in sorted(etc.rglob("*")) if p.is_file()},
        "dirs": sorted(str(p.relative_to(etc)) for p in etc.rglob("*") if p.is_dir()),
        "active": {u: placement(host, u) for u in host.listdir(host.sys_bus_mdev_devices)},
        "available": {f"{p}/{t}": available(host, p, t) for p in host.listdir(host.sys_class_mdev_bus)
                      for t in host.listdir(host.mdev_types_dir(p))},
    }


def setup(host: HostRoot, commands: list[Command], tmp: Path) -> None:
    for argv, result in zip(commands, real(host, commands, tmp), strict=True):
        assert result.rc == 0, (argv, result)


# ------------------------------------------------------------------------------ listings: a matrix


GVT_ACTIVE = [["start", "-u", U2, "-p", GVT_PARENT, "-t", V5_8], ["start", "-u", U0, "-p", GVT_PARENT, "-t", V5_4]]
GVT_DEFINED = [
    ["define", "-u", UF, "-p", GVT_PARENT, "-t", V5_4, "--auto"],
    ["define", "-u", U3, "-p", GVT_PARENT, "-t", V5_2],
    ["modify", "-u", U3, "--addattr", "intel_vgpu/x", "--value", "1"],
    ["modify", "-u", U3, "--addattr", "first", "--value", "a b", "-i", "0"],
]
GVT_MIXED = [
    *GVT_ACTIVE,
    *GVT_DEFINED,
    ["define", "-u", U2],  # the running one becomes defined too
    ["modify", "-u", U2, "--auto", "--addattr", "k", "--value", "v"],  # 1.2.0 lists its attrs as active
    ["define", "-u", U1, "-p", GVT_PARENT, "-t", V5_8],
    ["start", "-u", U1],
]
SAMPLES_MIXED = [
    ["define", "-u", U1, "-p", "mtty", "-t", "mtty-2", "--auto"],
    ["define", "-u", U1, "-p", "mdpy", "-t", "mdpy-vga"],  # one UUID, two parents
    ["start", "-u", U1, "-p", "mtty"],
    ["modify", "-u", U1, "-p", "mtty", "--addattr", "port", "--value", "2"],
    ["start", "-u", UF, "-p", "mdpy", "-t", "mdpy-hd"],
    ["start", "-u", U0, "-p", "mtty", "-t", "mtty-1"],
    ["define", "-u", U3, "-p", "mbochs", "-t", "mbochs-small"],
    ["modify", "-u", U3, "--addattr", "x", "--value", "1"],
    ["modify", "-u", U3, "--addattr", "y", "--value", "2", "-i", "0"],
    ["start", "-u", U2, "-p", "mtty", "-t", "mtty-2"],
    ["define", "-u", U2, "-p", "mtty", "-t", "mtty-1"],  # defined with another type than it runs with
]
STATES: dict[str, tuple[str, dict[str, Any], list[Command], str]] = {
    "gvt empty": ("coffeelake", {"aperture_mib": 1024}, [], GVT_PARENT),
    "gvt active only": ("coffeelake", {"aperture_mib": 1024}, GVT_ACTIVE, GVT_PARENT),
    "gvt defined only": ("coffeelake", {"aperture_mib": 1024}, GVT_DEFINED, GVT_PARENT),
    "gvt mixed": ("coffeelake", {"aperture_mib": 1024}, GVT_MIXED, GVT_PARENT),
    "samples": ("samples", {}, SAMPLES_MIXED, "mtty"),
    "nvidia": ("nvidia-t4", {}, [], ""),
}


def listings(parent: str) -> list[Command]:
    lists = [[], ["-d"], ["-v"], ["-d", "-v"], ["--dumpjson"], ["-d", "--dumpjson"], ["-u", U1], ["-d", "-u", U1],
             ["--dumpjson", "-u", U1], ["-d", "--dumpjson", "-u", U1], ["-d", "-v", "-u", U3],
             ["--dumpjson", "-d", "-u", U3], ["-u", U9, "--dumpjson"], ["-d", "-u", U9], ["-p", parent],
             ["-d", "-p", parent, "-v"], ["-p", parent, "--dumpjson"], ["-d", "-p", parent, "--dumpjson", "-u", U1],
             ["-p", NO_PARENT, "-d"], ["-dv"]]
    types = [[], ["--dumpjson"], ["-p", parent], ["-p", parent, "--dumpjson"], ["-p", NO_PARENT],
             ["-p", NO_PARENT, "--dumpjson"]]
    return [["list", *f] for f in lists] + [["types", *f] for f in types]


@pytest.mark.parametrize("kernel", ["6.8.0", "5.15.0"])
@pytest.mark.parametrize("state", list(STATES))
def test_listings_are_byte_identical(mount_host: MountFn, tmp_path: Path, state: str, kernel: str) -> None:
    preset, overrides, commands, parent = STATES[state]
    host = mount_host(preset, kernel=kernel, **overrides)
    parent = parent or host.listdir(host.sys_class_mdev_bus)[0]
    setup(host, commands, tmp_path)
    before = snapshot(host)
    for argv, expected in zip(listings(parent), real(host, listings(parent), tmp_path), strict=True):
        assert normal(ours(host, argv, tmp_path / "state")) == normal(expected), argv
    assert snapshot(host) == before


def test_listing_details_worth_seeing(mount_host: MountFn, tmp_path: Path) -> None:
    """A few of the outputs compared above, spelled out: 5.15 GVT has no Name, 1.2.0's quirks."""
    host = mount_host("coffeelake", aperture_mib=1024, kernel="5.15.0")
    setup(host, GVT_MIXED, tmp_path)
    state = tmp_path / "state"
    assert "Name:" not in ours(host, ["types"], state).out
    assert ours(host, ["list", "-v", "-u", U2], state).out == (
        f"{U2} {GVT_PARENT} {V5_8} auto (defined)\n  Attrs:\n    @{{0}}: {{\"k\":\"v\"}}\n\n")
    assert ours(host, ["list", "-d", "-v", "-u", U3], state).out == (
        f'{U3} {GVT_PARENT} {V5_2} manual\n  Attrs:\n    @{{0}}: {{"first":"a b"}}\n'
        '    @{1}: {"intel_vgpu/x":"1"}\n\n')
    assert ours(host, ["list", "-u", U9, "--dumpjson"], state).out == "[]\n"
    assert ours(host, ["list", "-p", NO_PARENT], state).out == "\n"


# ------------------------------------------------------------------------------ changes, on twin hosts


def twins(mount_host: MountFn, tmp: Path, sequence: list[Command], preset: str, **overrides: Any) -> None:
    """The same commands, real mdevctl on one host and vgpuctl on an identical other: every result
    and what is left on the hosts must be the same."""
    theirs, mine = mount_host(preset, **overrides), mount_host(preset, **overrides)
    expected = real(theirs, sequence, tmp)
    for argv, result in zip(sequence, expected, strict=True):
        assert normal(ours(mine, argv, tmp / "state")) == normal(result), argv
    assert snapshot(mine) == snapshot(theirs)


def test_gvt_lifecycle_side_by_side(mount_host: MountFn, tmp_path: Path) -> None:
    jsonfile = tmp_path / "config.json"
    jsonfile.write_text(json.dumps({"mdev_type": V5_8, "start": "auto", "attrs": [{"a": "1"}]}))
    plain = tmp_path / "plain.json"
    plain.write_text('{"mdev_type":"i915-GVTg_V5_8","start":"bogus"}')  # any start but auto is manual
    sequence = [
        ["define", "-u", U1, "-p", GVT_PARENT, "-t", V5_4],
        ["define", "-u", U1, "-p", GVT_PARENT, "-t", V5_4],  # already defined
        ["define", "-u", U2, "-p", GVT_PARENT, "-t", V5_8, "--auto"],
        ["define", "-u", U9],  # No parent specified
        ["define", "-p", GVT_PARENT],  # No type specified
        ["define", "-u", U0, "-p", GVT_PARENT, "--jsonfile", str(jsonfile)],
        ["define", "-u", U0, "-p", GVT_PARENT, "--jsonfile", str(jsonfile)],  # Cowardly refusing
        ["define", "-u", U0, "--jsonfile", str(jsonfile)],  # needs a parent
        ["define", "-u", U9, "-p", GVT_PARENT, "--jsonfile", str(tmp_path / "missing.json")],
        ["define", "-u", UF, "-p", GVT_PARENT, "--jsonfile", str(plain)],
        ["modify", "-u", U1, "--addattr", "intel_vgpu/vgpu_id", "--value", "3"],
        ["modify", "-u", U1, "--addattr", "first", "--value", "0", "-i", "0"],
        ["modify", "-u", U1, "--addattr", "x", "--value", "1", "-i", "5"],  # invalid index
        ["modify", "-u", U1, "--delattr", "-i", "0"],
        ["modify", "-u", U1, "--delattr", "-i", "7"],  # invalid index
        ["modify", "-u", U9, "--auto"],  # not defined
        ["modify", "-u", U1, "-p", NO_PARENT, "--auto"],
        ["modify", "-u", UF],  # nothing to change: rewritten as it is
        ["list", "-d", "-v"],
        ["start", "-u", U1],  # intel_vgpu/vgpu_id is read-only: EACCES, the device is removed again
        ["start", "-u", U0],  # attribute 'a' does not exist
        ["modify", "-u", U1, "--delattr"],
        ["modify", "-u", U1, "--auto", "-t", V5_2],
        ["start", "-u", U1],
        ["start", "-u", U1],  # Device already exists
        ["start", "-u", U1, "-p", GVT_PARENT, "-t", V5_8],  # defined with another type
        ["start", "-u", U3, "-p", GVT_PARENT, "-t", V5_1],
        ["start", "-u", U9, "-p", GVT_PARENT, "-t", V5_1],  # No available instances
        ["start", "-u", U9, "-t", V5_1],  # type without parent
        ["start", "-u", U9],  # insufficiently specified
        ["start", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_3"],
        ["start", "-p", NO_PARENT, "-t", V5_4],
        ["start", "-u", U3, "-p", GVT_PARENT, "-t", V5_4],  # exists with different type
        ["list"], ["list", "-d"], ["list", "--dumpjson"], ["types"],
        ["define", "-u", U3],  # a running transient device becomes defined
        ["list", "-v"],
        ["stop", "-u", U9],  # Error removing device, Caused by
        ["stop", "-u", U3],
        ["undefine", "-u", U9],
        ["undefine", "-u", U3],
        ["start-parent-mdevs", GVT_PARENT],  # U2 starts; U1 (auto, running) and U0 (bad attr) warn
        ["start-parent-mdevs", NO_PARENT],
        ["list"], ["list", "-d", "--dumpjson"],
        ["stop", "-u", U1], ["stop", "-u", U2],
        ["undefine", "-u", U1, "-p", GVT_PARENT],
        ["undefine", "-u", U0],
        ["list", "-d"], ["types", "--dumpjson"],
    ]
    twins(mount_host, tmp_path, sequence, "coffeelake", aperture_mib=1024)


def test_several_parents_side_by_side(mount_host: MountFn, tmp_path: Path) -> None:
    sequence = [
        ["define", "-u", U1, "-p", "mtty", "-t", "mtty-1"],
        ["define", "-u", U1, "-p", "mdpy", "-t", "mdpy-vga", "--auto"],
        ["start", "-u", U1],  # Multiple definitions found
        ["modify", "-u", U1, "--auto"],  # Multiple definitions found, specify a parent
        ["start", "-u", U1, "-p", "mdpy"],
        ["start", "-u", U1, "-p", "mtty"],  # exists under a different parent
        ["list"], ["list", "-d"], ["list", "-d", "--dumpjson", "-u", U1], ["list", "--dumpjson", "-u", U1],
        ["define", "-u", U1, "-p", "mbochs"],  # running: the type is taken from it
        ["define", "-u", U1, "-t", "mtty-2"],  # a type but no parent
        ["list", "-d"],
        ["start", "-p", "MTTY", "-t", "mtty-1"],  # Did you mean 'mtty'?
        ["start", "-p", "mtty", "-t", "mtty-2", "-u", U2],
        ["modify", "-u", U1, "-p", "mtty", "--addattr", "bogus", "--value", "1"],
        ["undefine", "-u", U1, "-p", "mtty"],
        ["list", "-d"],
        ["undefine", "-u", U1],  # the rest of its definitions
        ["list", "-d"], ["list"],
        ["stop", "-u", U1], ["stop", "-u", U2],
        ["types", "--dumpjson"],
    ]
    twins(mount_host, tmp_path, sequence, "samples", kernel="5.15.0")


def test_generated_uuids(mount_host: MountFn, tmp_path: Path) -> None:
    """Without -u, define and start print a new v4 UUID, as mdevctl does."""
    host = mount_host("coffeelake", aperture_mib=1024)
    state = tmp_path / "state"
    defined = ours(host, ["define", "-p", GVT_PARENT, "-t", V5_4], state)
    uid = new_uuid(defined.out)
    assert host.path(f"/etc/mdevctl.d/{GVT_PARENT}/{uid}").read_bytes() == config_bytes(V5_4)
    started = new_uuid(ours(host, ["start", "-p", GVT_PARENT, "-t", V5_8], state).out)
    assert placement(host, started) == (GVT_PARENT, V5_8)
    assert ours(host, ["start", "-u", uid], state) == Result(0, "", "")  # a given UUID is not printed
    assert real(host, [["list"]], tmp_path)[0].out == "".join(
        f"{u} {GVT_PARENT} {t} manual{d}\n" for u, t, d in sorted([(uid, V5_4, " (defined)"), (started, V5_8, "")])
    ) + "\n"


# Configs mdevctl 1.2.0 cannot read (it panics on a non-string mdev_type or attribute value, and serde's words
# for a misspelt literal are its own: not compared).
BAD_CONFIGS: list[str | bytes] = [
    '{"mdev_type": "i915-GVTg_V5_4",\n  ', '{"mdev_type": x}', '{"mdev_type": "i915-GVTg_V5_4", "start": "auto"} x',
    '{"mdev_type": "i915-GVTg_V5_4"}', '{"mdev_type": "i915-GVTg_V5_4", "start": null}',
    '{"mdev_type": "i915-GVTg_V5_4", "start": "auto", "attrs": {}}',
    '{"mdev_type": "i915-GVTg_V5_4", "start": "auto", "attrs": [1]}',
    '{"mdev_type": "i915-GVTg_V5_4", "start": "auto", "attrs": [{"a": "1", "b": "2"}]}', "",
    b'{"mdev_type": "\xff"}',
]


def test_bad_configs_are_said_as_mdevctl_says_them(mount_host: MountFn, tmp_path: Path) -> None:
    """The core's errors for a config it cannot read, in mdevctl's words: a definition file that fails
    every listing, and the same text given with --jsonfile."""
    theirs, mine = mount_host("coffeelake", aperture_mib=1024), mount_host("coffeelake", aperture_mib=1024)
    jsonfile = tmp_path / "config.json"
    commands = [["list", "-d"], ["list", "-d", "-u", U2], ["list"], ["start", "-u", U1],
                ["define", "-u", U2, "-p", GVT_PARENT, "--jsonfile", str(jsonfile)],
                ["start", "-u", U2, "-p", GVT_PARENT, "--jsonfile", str(jsonfile)],
                ["start", "-u", U2, "--jsonfile", str(jsonfile)]]
    for text in BAD_CONFIGS:
        data = text.encode() if isinstance(text, str) else text
        jsonfile.write_bytes(data)
        for host in (theirs, mine):
            host.path(f"/etc/mdevctl.d/{GVT_PARENT}").mkdir(parents=True, exist_ok=True)
            host.path(f"/etc/mdevctl.d/{GVT_PARENT}/{U1}").write_bytes(data)
        for argv, want in zip(commands, real(theirs, commands, tmp_path), strict=True):
            assert normal(ours(mine, argv, tmp_path / "state")) == normal(want), (text, argv)
        assert snapshot(mine) == snapshot(theirs), text


# ------------------------------------------------------------------------------ one writes, the other reads


def test_definitions_made_by_one_are_used_by_the_other(mount_host: MountFn, tmp_path: Path,
                                                       vgpuctl_bin: Path) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    mine = link(tmp_path, vgpuctl_bin)
    script = "\n".join([
        f"mdevctl define -u {U1} -p {GVT_PARENT} -t {V5_4} --auto || exit 11",
        f"{mine} define -u {U2} -p {GVT_PARENT} -t {V5_8} || exit 12",
        f"{mine} start -u {U1} || exit 13",  # ours starts real mdevctl's definition
        f"mdevctl start -u {U2} || exit 14",  # and real mdevctl ours
        f"mdevctl modify -u {U2} --auto || exit 15",
        f"{mine} list -d > {tmp_path}/ours.txt && mdevctl list -d > {tmp_path}/real.txt || exit 16",
        f"{mine} stop -u {U2} && mdevctl stop -u {U1} && mdevctl undefine -u {U2} && {mine} undefine -u {U1}",
    ])
    result = in_namespace(host, script)
    assert result.rc == 0, result
    both = f"{U1} {GVT_PARENT} {V5_4} auto (active)\n{U2} {GVT_PARENT} {V5_8} auto (active)\n\n"
    assert (tmp_path / "ours.txt").read_text() == (tmp_path / "real.txt").read_text() == both
    assert snapshot(host)["active"] == {} and snapshot(host)["files"] == {}
    assert not (tmp_path / "state" / "owned.json").exists()  # mdevctl's devices are not vgpuctl's


def test_entry_points_agree(mount_host: MountFn, tmp_path: Path, vgpuctl_bin: Path) -> None:
    """A link named mdevctl or lsmdev in the namespace, VGPUCTL_ROOT, and `vgpuctl mdevctl`."""
    host = mount_host("samples")
    setup(host, SAMPLES_MIXED, tmp_path)
    commands = [["list", "-d", "-v"], ["list", "--dumpjson"], ["types", "-p", "mtty"], ["--version"],
                ["stop", "-u", U9], ["list", "-u", "nope"]]
    expected = [normal(r) for r in real(host, commands, tmp_path)]
    in_ns = batch(host, commands, tmp_path / "link", tool=link(tmp_path, vgpuctl_bin))
    env = f"VGPUCTL_ROOT={shlex.quote(str(host.root))} VGPUCTL_STATE_DIR={tmp_path / 'state'}"
    lines = [f"{env} {tmp_path / 'bin' / 'mdevctl'} {shlex.join(c)}" for c in commands[:3]]
    lines += [f"{vgpuctl_bin} --root {shlex.quote(str(host.root))} mdevctl {shlex.join(c)}" for c in commands[3:]]
    outside = [Result(rc, out, err) for rc, out, err in (_sh(line) for line in lines)]
    for argv, want, got_ns, got_root in zip(commands, expected, in_ns, outside, strict=True):
        if want.rc == 2:  # usage error: exit status and prefix only
            assert got_ns.rc == got_root.rc == 2 and got_ns.err.startswith("error:"), (argv, got_ns, got_root)
        else:
            assert normal(got_ns) == want == normal(got_root), argv
    lsmdev = batch(host, [["-d", "-v"], ["-V"]], tmp_path / "lsmdev", tool=link(tmp_path, vgpuctl_bin, "lsmdev"))
    assert lsmdev[0] == expected[0]
    assert lsmdev[1] == Result(0, "lsmdev 1.2.0\n", "")


def _sh(line: str) -> tuple[int, str, str]:
    done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if k != "VGPUCTL_ROOT"})
    return done.returncode, done.stdout, done.stderr


# ------------------------------------------------------------------------------ libvirt's calls


def test_libvirt_call_shapes(mount_host: MountFn, tmp_path: Path, vgpuctl_bin: Path) -> None:
    """node_device_driver.c's mdevctl invocations, compact JSON on stdin (peers.md 2.3)."""
    compact = '{"mdev_type":"i915-GVTg_V5_8","start":"manual","attrs":[]}'
    commands = [
        ["start", f"--parent={GVT_PARENT}", "--jsonfile=/dev/stdin"],  # nodedev-create, new UUID
        ["define", f"--parent={GVT_PARENT}", "--jsonfile=/dev/stdin", f"--uuid={U1}"],  # nodedev-define
        ["define", f"--parent={GVT_PARENT}", "--jsonfile=/dev/stdin", f"--uuid={U1}"],  # Cowardly refusing
        ["start", f"--parent={GVT_PARENT}", "--jsonfile=/dev/stdin", f"--uuid={U2}"],
        ["list", "--dumpjson", "--defined"],
        ["start", f"--uuid={U1}"],  # nodedev-start
        ["modify", "--uuid", U1, "--auto"],  # nodedev-autostart
        ["modify", "--uuid", U1, "--manual"],
        ["modify", "--defined", "--live", "--jsonfile", "b", "--help"],  # libvirt's probe: unsupported
        ["list", "--dumpjson"],
        ["stop", f"--uuid={U2}"],  # nodedev-destroy
        ["stop", f"--uuid={U1}"],
        ["undefine", f"--uuid={U1}"],  # nodedev-undefine
        ["list", "--dumpjson", "--defined"],
        ["list", "--dumpjson"],
    ]
    stdin = {0: compact, 1: compact.replace("manual", "auto"), 2: compact, 3: compact}
    theirs, mine = mount_host("coffeelake", aperture_mib=1024), mount_host("coffeelake", aperture_mib=1024)
    expected = batch(theirs, commands, tmp_path / "real", stdin=stdin)
    got = batch(mine, commands, tmp_path / "ours", tool=link(tmp_path, vgpuctl_bin), stdin=stdin)
    new_theirs, new_mine = new_uuid(expected[0].out), new_uuid(got[0].out)
    for argv, want, result in zip(commands, expected, got, strict=True):
        if want.rc == 2:
            assert result.rc == 2 and result.out == "" and result.err.startswith("error:"), (argv, result)
        elif argv[0] == "list":  # the random UUIDs sort differently in the two runs
            assert (result.rc, result.err) == (want.rc, want.err), argv
            assert _sorted_listing(result.out) == _sorted_listing(want.out.replace(new_theirs, new_mine)), argv
        elif argv != commands[0]:
            assert result == want._replace(out=want.out.replace(new_theirs, new_mine)), argv
    assert json.loads(got[4].out) == [{GVT_PARENT: [{U1: {"mdev_type": V5_8, "start": "auto", "attrs": []}}]}]
    assert snapshot(mine)["active"] == {new_mine: (GVT_PARENT, V5_8)}
    assert snapshot(mine)["files"] == snapshot(theirs)["files"] == {}


def _sorted_listing(text: str) -> object:
    data = json.loads(text)
    return [{parent: sorted(devices, key=lambda d: next(iter(d))) for parent, devices in group.items()}
            for group in data]


# ------------------------------------------------------------------------------ usage, help, version


USAGE_ERRORS = [
    ["start", "-u", "notauuid"], ["list", "-u", "{11111111222233334444555555555555}"], ["bogus"],
    ["list", "--bogus"], ["list", "--dumpjs"], ["list", "extra"], ["list", "-u"],
    ["modify", "-u", U1, "--auto", "--manual"], ["modify", "-u", U1, "--addattr", "x"],
    ["modify", "-u", U1, "--addattr", "x", "--value", "y", "--delattr"], ["modify", "-u", U1, "-i", "-1", "--delattr"],
    ["modify", "-u", U1, "-i", "x", "--delattr"], ["modify", "-u", U1, "--delattr", "--delattr"],
    ["define", "-t", "x"], ["define", "-p", GVT_PARENT, "-t", "x", "--jsonfile", "f"],
    ["define", "-p", GVT_PARENT, "-a", "--jsonfile", "f"], ["start", "-p", GVT_PARENT, "-t", "x", "--jsonfile", "f"],
    ["start", "-t", "x"], ["stop"], ["undefine"], ["modify"], ["modify", "--auto"], ["stop", "-u", U1, "-u", U1],
    ["start-parent-mdevs"], ["types", "-V"], ["help", "bogus"], ["-x"],
]
OK_ANYWAY = [  # what clap accepts that a stricter parser might not
    ["list", "-u", f"{{{U1}}}"], ["list", "-u", "11111111222233334444555555555555"], ["list", "-u", f"urn:uuid:{U1}"],
    ["list", "-u", U1.upper()], ["list", f"-u={U1}"], ["list", "-dv"], ["modify", "-u", U9, "--value", "v"],
]


def test_usage_errors_exit_2(mount_host: MountFn, tmp_path: Path) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    expected = real(host, [*USAGE_ERRORS, [], *OK_ANYWAY], tmp_path)
    for argv, want in zip(USAGE_ERRORS, expected, strict=False):
        got = ours(host, argv, tmp_path / "state")
        assert want.rc == got.rc == 2 and want.out == got.out == "", (argv, want, got)
        assert want.err.startswith("error:") and got.err.startswith("error:"), (argv, got)
    no_command = ours(host, [], tmp_path / "state")  # help on stderr, exit 2
    assert expected[len(USAGE_ERRORS)].rc == no_command.rc == 2 and no_command.out == "" and no_command.err
    for argv, want in zip(OK_ANYWAY, expected[len(USAGE_ERRORS) + 1:], strict=True):
        assert ours(host, argv, tmp_path / "state") == want, argv


def test_help_and_version(mount_host: MountFn, tmp_path: Path) -> None:
    host = mount_host("coffeelake", aperture_mib=1024)
    versions = [["-V"], ["--version"], ["list", "-V"], ["list", "--version"]]
    helps = [["--help"], ["-h"], ["help"], ["help", "list"], ["list", "--help"], ["stop", "-h"],
             ["start-parent-mdevs", "--help"], ["--help", "list"], ["-h", "types"]]
    expected = real(host, versions + helps, tmp_path)
    for argv, want in zip(versions, expected, strict=False):
        assert ours(host, argv, tmp_path / "state") == want, argv
    for argv, want in zip(helps, expected[len(versions):], strict=True):
        got = ours(host, argv, tmp_path / "state")
        assert want.rc == got.rc == 0 and got.out and got.err == "", (argv, got)  # help texts are our own
        if argv[0] in ("--help", "-h") or argv == ["help"]:  # the top's help: every subcommand
            listed = [name for name in ("define", "undefine", "modify", "start", "stop", "list", "types")
                      if f"\n    {name} " in got.out]
            assert len(listed) == 7, (argv, got.out)


# ------------------------------------------------------------------------------ vgpuctl's own records


def test_mdevctl_mode_keeps_vgpuctl_records_true(mount_host: MountFn, tmp_path: Path) -> None:
    host, state = mount_host("coffeelake", aperture_mib=1024), tmp_path / "state"
    assert ours(host, ["define", "-u", U1, "-p", GVT_PARENT, "-t", V5_4], state).rc == 0
    assert ours(host, ["start", "-u", U1], state).rc == 0
    owned = Journal(StateDir(state)).ownership()  # made through mdevctl: mdevctl's, not vgpuctl's
    assert owned.devices == owned.definitions == {}
    Manager(host, StateDir(state)).create(GVT_PARENT, V5_8, U2)
    assert Journal(StateDir(state)).owns_device(U2)
    assert ours(host, ["stop", "-u", U2], state) == Result(0, "", "")  # no ownership rule for mdevctl
    assert not Journal(StateDir(state)).owns_device(U2)  # and vgpuctl forgets what is gone
