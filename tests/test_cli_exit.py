"""The console script leaves without the interpreter's teardown (vgpuctl.cli.exit_now): what it
printed must still arrive whole, exit statuses must be kept, and a reader that goes away early
(`vgpuctl ... | head`) must not turn into a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

VGPUCTL = str(Path(sys.executable).with_name("vgpuctl"))


def test_output_through_a_pipe_is_complete_and_statuses_are_kept(tmp_path: Path) -> None:
    # A large --json answer through a pipe arrives whole, and the doctor's verdict (not ready:
    # nothing at that root) stays the exit status.
    done = subprocess.run([VGPUCTL, "--root", "/nonexistent", "--state-dir", str(tmp_path), "doctor", "--json",
                           "--no-guest"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert len(done.stdout) > 4096 and json.loads(done.stdout)["checks"]
    usage = subprocess.run([VGPUCTL, "no-such-command"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "No such command" in usage.stderr
    as_mdevctl = subprocess.run([VGPUCTL, "mdevctl", "--no-such-option"], capture_output=True, text=True,
                                timeout=60)
    assert as_mdevctl.returncode == 2


def test_a_reader_that_leaves_early_gives_no_traceback(tmp_path: Path) -> None:
    script = f"{VGPUCTL} --state-dir {tmp_path} --help | head -c 1 >/dev/null; echo $?"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
