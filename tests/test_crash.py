"""Crash tests, in the spirit of SQLite's: every mutating vGPU command is killed (SIGKILL) at each of its steps.

A run with ``VGPUCTL_CRASH_TRACE`` learns the command's crash points (vgpuctl.base.crash); then, for each
point, a fresh host is set up, the command runs as its own process with ``VGPUCTL_CRASH_AT`` at that point,
and the invariants are checked after the kill:

* the next command succeeds (``list``, which settles what the killed one left in the journal);
* nothing vgpuctl made is unknown to it: every device and definition is foreign (set up by the test as
  another tool would) or owned by vgpuctl — and every foreign one is unchanged and not claimed;
* no partial file: every definition and vgpuctl's records parse; the journal holds no intent of the dead;
* vgpuctl can undo all it owns without ``--force``, leaving exactly the foreign objects.

``VGPUCTL_CRASH_SOAK=N`` adds N kills at random moments (not at crash points) per command: the soak mode
whose figures are in bench/RESULTS.md. ``make test`` runs the crash points and a few random kills.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import GVT_PARENT, Cli, MountFn
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.mdev import definitions
from vgpuctl.mdev.definitions import Definition
from vgpuctl.mdev.lifecycle import Manager
from vgpuctl.mdev.state import Journal
from vgpuctl.mdev.sysfs import active_devices

pytestmark = pytest.mark.fuse

OURS = "0aaaaaaa-0000-4000-8000-000000000001"  # a vGPU vgpuctl creates
OUR_DEF = "0aaaaaaa-0000-4000-8000-000000000002"  # a definition vgpuctl writes
FOREIGN_DEV = "0fffffff-0000-4000-8000-000000000001"  # made by another tool: never touched
FOREIGN_DEF = "0fffffff-0000-4000-8000-000000000002"  # mdevctl's definition, auto, started by vgpuctl
TYPES = f"/sys/class/mdev_bus/{GVT_PARENT}/mdev_supported_types"
SOAK = int(os.environ.get("VGPUCTL_CRASH_SOAK", "3"))


@dataclass(frozen=True)
class Scenario:
    name: str
    argv: list[str]
    before: Callable[[Manager], None]  # what vgpuctl itself did before (in process, not killed)


def _nothing(m: Manager) -> None:
    pass


def _created(m: Manager) -> None:
    m.create(GVT_PARENT, "i915-GVTg_V5_4", OURS)


def _defined(m: Manager) -> None:
    m.define(OUR_DEF, GVT_PARENT, "i915-GVTg_V5_4", auto=True)


def _started_foreign(m: Manager) -> None:
    m.start(FOREIGN_DEF)


SCENARIOS = [
    Scenario("create", ["create", "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "-u", OURS], _nothing),
    Scenario("remove", ["remove", "-u", OURS], _created),
    Scenario("define", ["define", "-u", OUR_DEF, "-p", GVT_PARENT, "-t", "i915-GVTg_V5_4", "--auto"], _nothing),
    Scenario("undefine", ["undefine", "-u", OUR_DEF], _defined),
    Scenario("modify", ["modify", "-u", OUR_DEF, "--manual"], _defined),
    Scenario("start", ["start", "-u", FOREIGN_DEF], _nothing),
    Scenario("stop", ["stop", "-u", FOREIGN_DEF], _started_foreign),
    Scenario("autostart", ["autostart"], _defined),
]


class Bench:
    """One mounted host, reset between trials to: a foreign device, a foreign auto definition, no state."""

    def __init__(self, root: HostRoot, tmp: Path) -> None:
        self.root, self.tmp, self.trial = root, tmp, 0
        self.foreign_text = ""

    def reset(self, scenario: Scenario) -> StateDir:
        for device in active_devices(self.root):
            self.root.write_text(f"/sys/bus/mdev/devices/{device.uuid}/remove", "1")
        for definition in definitions.load_all(self.root):
            definitions.delete(self.root, definition)
        self.trial += 1
        state = StateDir(self.tmp / f"state{self.trial}")
        self.root.write_text(f"{TYPES}/i915-GVTg_V5_8/create", FOREIGN_DEV)
        definitions.write(self.root, Definition(FOREIGN_DEF, GVT_PARENT, "i915-GVTg_V5_8", "auto"))
        self.foreign_text = self.foreign_path.read_text()
        scenario.before(Manager(self.root, state))
        return state

    @property
    def foreign_path(self) -> Path:
        return self.root.path(definitions.definition_path(self.root, GVT_PARENT, FOREIGN_DEF))

    def run(self, state: StateDir, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "vgpuctl", "--root", str(self.root.root), "--state-dir", str(state.path),
                   *argv]
        return subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def check(self, state: StateDir, what: str) -> None:
        """The invariants after a kill (see the module's docstring)."""
        cli = Cli(self.root, state.path)
        rows = cli.json("list")  # the next command succeeds, and settles the journal
        assert isinstance(rows, list), what
        ownership = Journal(state).ownership()
        assert ownership.journal == [], (what, ownership.journal)
        foreign = {FOREIGN_DEV, FOREIGN_DEF}
        for row in rows:
            expected = "other" if row["uuid"] in foreign else "vgpuctl"
            assert row["owner"] == expected, (what, row)  # nothing made and unknown, nothing foreign claimed
        active = {d.uuid: d.type_id for d in active_devices(self.root)}
        assert active.get(FOREIGN_DEV) == "i915-GVTg_V5_8", what
        # Only vgpuctl starts mdevctl's definition here: a device of it is vgpuctl's (the row is the definition's).
        assert FOREIGN_DEF not in active or ownership.owns_device(FOREIGN_DEF), what
        assert self.foreign_path.read_text() == self.foreign_text, what
        found, bad = definitions.scan(self.root)
        assert bad == [], (what, bad)  # no partial definition
        # vgpuctl can undo what it owns without --force; only the foreign objects are left.
        manager = Manager(self.root, state)
        for row in rows:
            if row["owner"] != "vgpuctl":
                continue
            if row["active"]:
                manager.remove(row["uuid"])
            if row["defined"]:
                manager.undefine(row["uuid"], row["parent"])
        left = {d.uuid for d in active_devices(self.root)} | {d.uuid for d in definitions.load_all(self.root)}
        assert left <= foreign | {FOREIGN_DEF}, (what, left)
        assert FOREIGN_DEV in left and FOREIGN_DEF in {d.uuid for d in found}, what


def crash_points(bench: Bench, scenario: Scenario) -> list[str]:
    """The points the command passes, as ``NAME#N`` for the N-th pass of NAME."""
    state = bench.reset(scenario)
    trace = bench.tmp / f"trace-{scenario.name}"
    trace.unlink(missing_ok=True)
    assert bench.run(state, scenario.argv, VGPUCTL_CRASH_TRACE=str(trace)).wait(timeout=60) in (0, 1)
    bench.check(state, f"{scenario.name} uninterrupted")
    seen: dict[str, int] = {}
    points = []
    for name in [line.split()[0] for line in trace.read_text().splitlines()]:
        seen[name] = seen.get(name, 0) + 1
        points.append(f"{name}#{seen[name]}")
    return points


@pytest.fixture
def bench(mount_host: MountFn, tmp_path: Path) -> Bench:
    return Bench(mount_host("coffeelake", aperture_mib=1024), tmp_path)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_killed_at_every_step(bench: Bench, scenario: Scenario) -> None:
    points = crash_points(bench, scenario)
    assert points, f"{scenario.name} passes no crash point: the harness would prove nothing"
    for point in points:
        state = bench.reset(scenario)
        status = bench.run(state, scenario.argv, VGPUCTL_CRASH_AT=point).wait(timeout=60)
        assert status == -signal.SIGKILL, (scenario.name, point, status)  # it really died there
        bench.check(state, f"{scenario.name} killed at {point}")
    if os.environ.get("VGPUCTL_CRASH_REPORT"):
        with open(os.environ["VGPUCTL_CRASH_REPORT"], "a") as f:
            f.write(json.dumps({"scenario": scenario.name, "crash_points": points}) + "\n")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_killed_at_random_moments(bench: Bench, scenario: Scenario) -> None:
    """kill -9 at a random moment between the command's first crash point and its end (the windows between
    crash points too; before the first one, nothing has changed yet)."""
    rng = random.Random(f"{scenario.name}-{SOAK}")
    state = bench.reset(scenario)
    trace = bench.tmp / f"timed-{scenario.name}"
    started = time.monotonic()
    assert bench.run(state, scenario.argv, VGPUCTL_CRASH_TRACE=str(trace)).wait(timeout=60) in (0, 1)
    ended = time.monotonic()
    first = float(trace.read_text().split()[1]) - started
    bench.check(state, scenario.name)
    killed = 0
    for trial in range(SOAK):
        state = bench.reset(scenario)
        process = bench.run(state, scenario.argv)
        try:
            process.wait(timeout=rng.uniform(first, ended - started))
        except subprocess.TimeoutExpired:
            process.kill()
            killed += 1
        process.wait(timeout=60)
        bench.check(state, f"{scenario.name} random kill {trial}")
    if os.environ.get("VGPUCTL_CRASH_REPORT"):
        with open(os.environ["VGPUCTL_CRASH_REPORT"], "a") as f:
            f.write(json.dumps({"scenario": scenario.name, "trials": SOAK, "killed": killed,
                                "window_ms": [round(first * 1000), round((ended - started) * 1000)]}) + "\n")
