"""``vgpuctl setup plan/apply/revert`` on a distribution layout each: GRUB with update-grub (Debian) and with
grub2-mkconfig, grubby (Fedora), systemd-boot and kernelstub (Pop!_OS).

The layouts are written into the mounted simulated host's ``etc/`` and ``boot/`` (plain storage).
The systemd-boot layout is tested both in a plain directory used as the root and on a mounted host.
The boot tools are stubs in a tools directory (``--tools-dir``) that record their argv, one JSON
list a line; grubby's and kernelstub's stubs also keep the state the real tools would change.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from click.testing import CliRunner

from tests.conftest import MountFn
from vgpuctl.backends.gvt_setup import GVT_SETUP
from vgpuctl.cli.app import cli as app
from vgpuctl.cli.setup import BOOT_CHOICES
from vgpuctl.host import HostRoot
from vgpuctl.host.facts import split_cmdline
from vgpuctl.host.setup import (
    KERNELSTUB_CONFIG,
    MECHANISMS,
    CmdlineChange,
    Tools,
    make_plan,
    needed_change,
    parse_grub_assignments,
    parse_grubby_info,
)

GVT = "i915.enable_gvt=1 kvm.ignore_msrs=1 intel_iommu=on"
MODULES = """\
# Written by 'vgpuctl setup apply': modules Intel GVT-g (KVMGT) vGPUs need, loaded at boot.
# 'vgpuctl setup revert' puts back what was here before.
kvmgt
vfio-iommu-type1
mdev
"""
OPTIONS = """\
# Written by 'vgpuctl setup apply': module options for Intel GVT-g (KVMGT).
# 'vgpuctl setup revert' puts back what was here before.
options i915 enable_gvt=1
options kvm ignore_msrs=1
"""
SIM_GRUB = 'GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX=""\n'
REBOOT = ("reboot needed: the kernel command line changes, which takes effect at the next boot; "
          "i915 reads enable_gvt only when it loads, at boot\n")
PENDING = f"reboot needed: this kernel was booted without the new command line (add {GVT})\n"
REVERTED = ("reboot needed: the kernel command line is back as before, from the next boot; "
            "i915 reads its options only when it loads, at boot\n")


class Setup:
    """``vgpuctl --root R --state-dir S setup ...`` in-process, with the stubs' directory when there is one."""

    def __init__(self, root: HostRoot, state: Path, tools: Path | None = None) -> None:
        self.root, self.state, self.tools = root, state, tools
        self.log = tools / "calls.log" if tools else None

    def __call__(self, *args: str, code: int = 0) -> str:
        extra = ["--tools-dir", str(self.tools)] if self.tools else []
        result = CliRunner().invoke(app, ["--root", str(self.root.root), "--state-dir", str(self.state),
                                          "setup", *args, *extra])
        assert result.exit_code == code, (args, result.stdout, result.stderr, result.exception)
        return result.stdout if code == 0 else result.stdout + result.stderr

    def calls(self) -> list[list[str]]:
        """Every stub run since the last look, oldest first."""
        if self.log is None or not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        self.log.unlink()
        return [json.loads(line) for line in lines]

    def write(self, host_path: str, text: str) -> None:
        path = self.root.path(host_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def read(self, host_path: str) -> str | None:
        path = self.root.path(host_path)
        return path.read_text() if path.exists() else None

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        """The state directory's files with their contents and modification times."""
        return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(self.state.rglob("*")) if p.is_file()}


def stub(tools: Path, name: str, body: str = "") -> None:
    """A program that appends its argv to calls.log, then runs ``body`` (Python, with ``argv`` set)."""
    tools.mkdir(exist_ok=True)
    log = tools / "calls.log"
    script = tools / name
    script.write_text(f"#!{sys.executable}\nimport json, sys\nargv = sys.argv[1:]\n"
                      f"with open({str(log)!r}, 'a') as f:\n    f.write(json.dumps([{name!r}, *argv]) + '\\n')\n"
                      + body)
    script.chmod(0o755)


def os_release(setup: Setup, text: str) -> None:
    setup.write("/etc/os-release", text)


# ---------------------------------------------------------------- GRUB + update-grub (Debian)


def test_debian_update_grub_plan_apply_again_revert(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake-bare"), tmp_path / "state", tmp_path / "bin")
    os_release(setup, 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n')
    stub(tmp_path / "bin", "update-grub")
    assert setup.read("/etc/default/grub") == SIM_GRUB
    head = "boot: GRUB: /etc/default/grub, then update-grub (/etc/default/grub exists)\n"

    assert setup("plan") == head + f"""\
--- a/etc/default/grub
+++ b/etc/default/grub
@@ -1,4 +1,4 @@
 GRUB_DEFAULT=0
 GRUB_TIMEOUT=5
-GRUB_CMDLINE_LINUX_DEFAULT="quiet"
+GRUB_CMDLINE_LINUX_DEFAULT="quiet {GVT}"
 GRUB_CMDLINE_LINUX=""
--- /dev/null
+++ b/etc/modules-load.d/vgpuctl.conf
@@ -0,0 +1,5 @@
{"".join("+" + line + chr(10) for line in MODULES.splitlines())}\
--- /dev/null
+++ b/etc/modprobe.d/vgpuctl.conf
@@ -0,0 +1,4 @@
{"".join("+" + line + chr(10) for line in OPTIONS.splitlines())}\
then run:
  update-grub
""" + REBOOT
    plan = json.loads(setup("plan", "--json"))
    assert plan["boot"]["mechanism"] == "grub" and plan["boot"]["add"] == GVT.split()
    assert [(f["path"], f["action"]) for f in plan["files"]] == [
        ("/etc/default/grub", "modify"), ("/etc/modules-load.d/vgpuctl.conf", "create"),
        ("/etc/modprobe.d/vgpuctl.conf", "create")]
    assert plan["commands"] == [{"argv": ["update-grub"], "command": "update-grub", "runs": True}]
    assert plan["reboot"] is True and plan["nothing_to_do"] is False
    assert setup.calls() == [] and not setup.state.exists()  # plan changes nothing

    assert setup("apply") == head + f"""\
updated    /etc/default/grub
created    /etc/modules-load.d/vgpuctl.conf
created    /etc/modprobe.d/vgpuctl.conf
ran        update-grub
backups in {setup.state}/setup: 'vgpuctl setup revert' puts them back
""" + REBOOT
    assert setup.read("/etc/default/grub") == SIM_GRUB.replace('"quiet"', f'"quiet {GVT}"')
    assert setup.read("/etc/modules-load.d/vgpuctl.conf") == MODULES
    assert setup.read("/etc/modprobe.d/vgpuctl.conf") == OPTIONS
    assert setup.calls() == [["update-grub"]]
    assert (setup.state / "setup/backup/etc/default/grub").read_text() == SIM_GRUB
    manifest = json.loads((setup.state / "setup/manifest.json").read_text())
    assert sorted(manifest["files"]) == ["/etc/default/grub", "/etc/modprobe.d/vgpuctl.conf",
                                         "/etc/modules-load.d/vgpuctl.conf"]
    assert manifest["files"]["/etc/modules-load.d/vgpuctl.conf"]["existed"] is False
    assert manifest["regenerate"] == [["update-grub"]] and manifest["pending"] == []

    before = setup.snapshot()
    assert setup("apply") == head + "nothing to do: the host is set up\n" + PENDING
    assert setup("plan") == head + "nothing to do: the host is set up\n" + PENDING
    assert setup.calls() == [] and setup.snapshot() == before  # no backup churn

    assert setup("revert") == """\
restored   /etc/default/grub
removed    /etc/modprobe.d/vgpuctl.conf  (vgpuctl created it)
removed    /etc/modules-load.d/vgpuctl.conf  (vgpuctl created it)
ran        update-grub
""" + REVERTED
    assert setup.root.path("/etc/default/grub").read_bytes() == SIM_GRUB.encode()
    assert setup.read("/etc/modules-load.d/vgpuctl.conf") is None
    assert setup.read("/etc/modprobe.d/vgpuctl.conf") is None
    assert setup.calls() == [["update-grub"]]
    assert [p for p in (setup.state / "setup").rglob("*")] == []
    assert setup("revert") == "nothing to revert\n"


def test_revert_refuses_a_file_changed_since_unless_forced(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake-bare"), tmp_path / "state", tmp_path / "bin")
    os_release(setup, "ID=ubuntu\nID_LIKE=debian\n")
    stub(tmp_path / "bin", "update-grub")
    setup("apply")
    edited = f"{setup.read('/etc/default/grub')}GRUB_TIMEOUT_STYLE=hidden\n"
    setup.write("/etc/default/grub", edited)
    setup.root.path("/etc/modprobe.d/vgpuctl.conf").unlink()  # removed by hand: already as before
    setup.calls()

    assert setup("revert", code=1) == """\
refused    /etc/default/grub  (changed since vgpuctl wrote it; --force puts back the original anyway, \
losing those changes)
unchanged  /etc/modprobe.d/vgpuctl.conf  (already as it was before vgpuctl)
removed    /etc/modules-load.d/vgpuctl.conf  (vgpuctl created it)
"""
    assert setup.read("/etc/default/grub") == edited and setup.calls() == []
    assert list(json.loads((setup.state / "setup/manifest.json").read_text())["files"]) == ["/etc/default/grub"]

    assert setup("revert", "--force") == """\
restored   /etc/default/grub  (forced)
ran        update-grub
reboot needed: the kernel command line is back as before, from the next boot
"""
    assert setup.root.path("/etc/default/grub").read_bytes() == SIM_GRUB.encode()
    assert setup.calls() == [["update-grub"]]
    assert not (setup.state / "setup/manifest.json").exists()


def test_a_failed_update_grub_is_run_again_by_the_next_apply(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake-bare"), tmp_path / "state", tmp_path / "bin")
    os_release(setup, "ID=debian\n")
    stub(tmp_path / "bin", "update-grub", "print('grub-probe: error: failed to get canonical path of overlay', "
                                     "file=sys.stderr)\nsys.exit(1)\n")
    out = setup("apply", code=1)
    assert "failed     update-grub  (grub-probe: error: failed to get canonical path of overlay)\n" in out
    assert setup("plan").endswith("then run:\n  update-grub\n" + PENDING)
    stub(tmp_path / "bin", "update-grub")
    setup.calls()
    assert "ran        update-grub\n" in setup("apply")
    assert setup.calls() == [["update-grub"]]
    assert "nothing to do" in setup("apply") and setup.calls() == []


# ---------------------------------------------------------------- GRUB + grub2-mkconfig, conflicting values


def test_grub2_mkconfig_replaces_conflicting_values(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake-bare", kernel="5.4.0"), tmp_path / "state", tmp_path / "bin")
    os_release(setup, 'NAME="openSUSE Leap"\nID="opensuse-leap"\nID_LIKE="suse opensuse"\n')
    stub(tmp_path / "bin", "grub2-mkconfig")
    original = ("# If you change this file, run 'grub2-mkconfig -o /boot/grub2/grub.cfg' afterwards\n"
                "GRUB_DISTRIBUTOR=\n"
                "GRUB_DEFAULT=saved\n"
                "GRUB_CMDLINE_LINUX_DEFAULT='splash=silent  i915.enable_gvt=0 i915.enable_guc=3 quiet'  # quiet\n"
                "export GRUB_CMDLINE_LINUX=intel_iommu=off,igfx_off\n"
                "GRUB_TIMEOUT=8")  # no newline at the end
    setup.write("/etc/default/grub", original)
    setup.write("/etc/modprobe.d/50-i915.conf", "options i915 enable_guc=1\n")
    expected = original.replace("i915.enable_gvt=0 i915.enable_guc=3 quiet'",
                                "i915.enable_gvt=1 i915.enable_guc=2 quiet kvm.ignore_msrs=1'") \
        .replace("intel_iommu=off,igfx_off", "intel_iommu=on,igfx_off")
    modules = MODULES + "vfio_mdev\n"  # kernel 5.4: vfio_mdev is its own module

    plan = setup("plan")
    assert plan.startswith("boot: GRUB: /etc/default/grub, then grub2-mkconfig -o /boot/grub2/grub.cfg "
                           "(/etc/default/grub exists)\n--- a/etc/default/grub\n+++ b/etc/default/grub\n")
    assert """\
-GRUB_CMDLINE_LINUX_DEFAULT='splash=silent  i915.enable_gvt=0 i915.enable_guc=3 quiet'  # quiet
-export GRUB_CMDLINE_LINUX=intel_iommu=off,igfx_off
+GRUB_CMDLINE_LINUX_DEFAULT='splash=silent  i915.enable_gvt=1 i915.enable_guc=2 quiet kvm.ignore_msrs=1'  # quiet
+export GRUB_CMDLINE_LINUX=intel_iommu=on,igfx_off
 GRUB_TIMEOUT=8
\\ No newline at end of file
--- /dev/null
""" in plan
    assert "+vfio_mdev\n" in plan
    assert ("note: /etc/modprobe.d/50-i915.conf has 'options i915 enable_guc=1', which asks for GuC submission: "
            "GVT-g then does not start; remove it by hand\n") in plan
    assert plan.endswith("then run:\n  grub2-mkconfig -o /boot/grub2/grub.cfg\n"
                         "note: /etc/modprobe.d/50-i915.conf has 'options i915 enable_guc=1', which asks for GuC "
                         "submission: GVT-g then does not start; remove it by hand\n" + REBOOT)

    setup("apply")
    assert setup.read("/etc/default/grub") == expected
    assert setup.read("/etc/modules-load.d/vgpuctl.conf") == modules
    assert setup.calls() == [["grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"]]
    assert "nothing to do" in setup("apply") and setup.calls() == []
    assert "restored   /etc/default/grub\n" in setup("revert")
    assert setup.root.path("/etc/default/grub").read_bytes() == original.encode()
    assert setup.read("/etc/modprobe.d/50-i915.conf") == "options i915 enable_guc=1\n"  # never ours to touch
    assert setup.calls() == [["grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"]]


def test_ubuntu_cloud_image_edits_the_grub_d_file_that_wins(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake-bare"), tmp_path / "state")
    os_release(setup, "ID=ubuntu\nID_LIKE=debian\n")
    cloud = 'GRUB_CMDLINE_LINUX_DEFAULT="console=tty1 console=ttyS0"\nGRUB_TERMINAL=console\n'
    setup.write("/etc/default/grub.d/50-cloudimg-settings.cfg", cloud)
    plan = setup("plan")
    assert "--- a/etc/default/grub.d/50-cloudimg-settings.cfg\n" in plan and "--- a/etc/default/grub\n" not in plan
    out = setup("apply")
    assert "not run    update-grub  (" in out and "is not this machine's root" in out
    assert setup.read("/etc/default/grub.d/50-cloudimg-settings.cfg") == cloud.replace("ttyS0", f"ttyS0 {GVT}")
    assert setup.read("/etc/default/grub") == SIM_GRUB
    assert setup("revert").startswith("restored   /etc/default/grub.d/50-cloudimg-settings.cfg\n")
    assert setup.read("/etc/default/grub.d/50-cloudimg-settings.cfg") == cloud


BAD_GRUB = [
    ('GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX=""\n',
     '/etc/default/grub has no GRUB_CMDLINE_LINUX_DEFAULT line, so vgpuctl will not edit it. Do it by hand: add the '
     f'line GRUB_CMDLINE_LINUX_DEFAULT="{GVT}", then run \'update-grub\'; or set up the rest with --boot none'),
    ('GRUB_CMDLINE_LINUX_DEFAULT="quiet\n  splash"\n',
     "/etc/default/grub:1: GRUB_CMDLINE_LINUX_DEFAULT spans several lines, so vgpuctl will not edit it. Do it by "
     f"hand: add {GVT} in GRUB_CMDLINE_LINUX_DEFAULT, then run 'update-grub'; or set up the rest with --boot none"),
    ('EXTRA=splash\nGRUB_CMDLINE_LINUX_DEFAULT="quiet $EXTRA"\n',
     "/etc/default/grub:2: GRUB_CMDLINE_LINUX_DEFAULT uses shell expansion ($ or `), so vgpuctl will not edit it."),
    ('GRUB_CMDLINE_LINUX_DEFAULT="`cat /etc/cmdline`"\n', "uses shell expansion ($ or `)"),
    ('GRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX_DEFAULT+=" splash"\n',
     "/etc/default/grub:2: GRUB_CMDLINE_LINUX_DEFAULT appends with +=, so"),
    ("GRUB_CMDLINE_LINUX_DEFAULT=quiet\\\nsplash\n", "GRUB_CMDLINE_LINUX_DEFAULT continues on the next line"),
    ('GRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX="i915.enable_gvt=0 $X"\n',
     "/etc/default/grub:2: GRUB_CMDLINE_LINUX uses shell expansion ($ or `), so vgpuctl will not edit it. Do it by "
     "hand: add kvm.ignore_msrs=1 intel_iommu=on; replace i915.enable_gvt=0 with i915.enable_gvt=1 in "
     "GRUB_CMDLINE_LINUX"),
    ('GRUB_CMDLINE_LINUX_DEFAULT="quiet" splash\n', "GRUB_CMDLINE_LINUX_DEFAULT has more than one plain value"),
]


def test_never_edits_a_grub_file_it_cannot_parse(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake-bare"), tmp_path / "state", tmp_path / "bin")
    os_release(setup, "ID=debian\n")
    stub(tmp_path / "bin", "update-grub")
    for text, message in BAD_GRUB:
        setup.write("/etc/default/grub", text)
        for command in ("plan", "apply"):
            out = setup(command, code=1)
            assert out.startswith("error: /etc/default/grub") and message in out, (text, out)
        assert setup.read("/etc/default/grub") == text
        assert setup.read("/etc/modules-load.d/vgpuctl.conf") is None
        assert not (setup.state / "setup").exists() and setup.calls() == []
    # --boot none sets up the rest and leaves the file alone
    assert "updated    /etc/default/grub" not in setup("apply", "--boot", "none")
    assert setup.read("/etc/modules-load.d/vgpuctl.conf") == MODULES and setup.calls() == []
    # shell expansion that needs no change is no reason to refuse
    setup.write("/etc/default/grub", f'GRUB_CMDLINE_LINUX_DEFAULT="$X {GVT}"\n')
    assert "GRUB_CMDLINE_LINUX_DEFAULT uses shell expansion ($ or `); its literal text already has what Intel GVT-g " \
           "(KVMGT) needs, so it is left alone" in setup("plan")


def test_a_host_already_set_up_by_hand_has_nothing_to_do(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake"), tmp_path / "state", tmp_path / "bin")  # ready command line
    os_release(setup, "ID=debian\n")
    stub(tmp_path / "bin", "update-grub")
    setup.write("/etc/modules-load.d/gvt.conf", "# GVT-g\nkvmgt\nvfio_iommu_type1\nmdev  # the bus\n")
    setup.write("/etc/modprobe.d/gvt.conf", "options i915 enable_gvt=1\noptions kvm ignore_msrs=Y\n")
    expected = "boot: GRUB: /etc/default/grub, then update-grub (/etc/default/grub exists)\n" \
               "nothing to do: the host is set up\n"
    assert setup("plan") == expected
    assert json.loads(setup("plan", "--json"))["nothing_to_do"] is True
    assert setup("apply") == expected
    assert setup("revert") == "nothing to revert\n"
    assert setup.calls() == [] and not (setup.state / "setup").exists()


# ---------------------------------------------------------------- grubby (Fedora)

GRUBBY = """\
STATE = {state!r}
kernels = json.load(open(STATE))
if argv == ["--info=ALL"]:
    for i, k in enumerate(kernels):
        print(f"index={{i}}")
        print(f'kernel="{{k["kernel"]}}"')
        print(f'args="{{k["args"]}}"')
        print('root="UUID=5a0b9c1e"')
    print("index=2")
    print("non linux entry")
    sys.exit(0)
options = dict(a.split("=", 1) for a in argv if "=" in a)
remove, add = options.get("--remove-args", "").split(), options.get("--args", "").split()
for k in kernels:
    words = [w for w in k["args"].split() if w not in remove]
    for a in add:  # grubby replaces an argument of the same name
        words = [w for w in words if w.split("=")[0] != a.split("=")[0]] + [a]
    k["args"] = " ".join(words)
json.dump(kernels, open(STATE, "w"))
"""


def test_fedora_grubby_plan_apply_again_revert(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake-bare"), tmp_path / "state", tmp_path / "bin")
    os_release(setup, 'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=40\n')
    kernels = [{"kernel": "/boot/vmlinuz-6.8.5-301.fc40.x86_64", "args": "ro rootflags=subvol=root rhgb quiet"},
               {"kernel": "/boot/vmlinuz-0-rescue-3c1e", "args": "ro rootflags=subvol=root"}]
    state = tmp_path / "grubby.json"
    state.write_text(json.dumps(kernels))
    stub(tmp_path / "bin", "grubby", GRUBBY.format(state=str(state)))
    command = f"grubby --update-kernel=ALL '--args={GVT}'"

    assert setup("plan") == f"""\
boot: grubby: --update-kernel=ALL on every boot entry (a Fedora/RHEL family system (fedora) with grubby)
--- grubby --info=ALL
+++ after grubby --update-kernel=ALL
@@ -1,4 +1,4 @@
 kernel="/boot/vmlinuz-6.8.5-301.fc40.x86_64"
-args="ro rootflags=subvol=root rhgb quiet"
+args="ro rootflags=subvol=root rhgb quiet {GVT}"
 kernel="/boot/vmlinuz-0-rescue-3c1e"
-args="ro rootflags=subvol=root"
+args="ro rootflags=subvol=root {GVT}"
--- /dev/null
+++ b/etc/modules-load.d/vgpuctl.conf
@@ -0,0 +1,5 @@
{"".join("+" + line + chr(10) for line in MODULES.splitlines())}\
--- /dev/null
+++ b/etc/modprobe.d/vgpuctl.conf
@@ -0,0 +1,4 @@
{"".join("+" + line + chr(10) for line in OPTIONS.splitlines())}\
then run:
  {command}
""" + REBOOT
    assert setup.calls() == [["grubby", "--info=ALL"]]

    out = setup("apply")
    assert out.endswith(f"created    /etc/modules-load.d/vgpuctl.conf\ncreated    /etc/modprobe.d/vgpuctl.conf\n"
                        f"ran        {command}\nbackups in {setup.state}/setup: 'vgpuctl setup revert' puts them "
                        "back\n" + REBOOT)
    assert setup.calls() == [["grubby", "--info=ALL"], ["grubby", "--update-kernel=ALL", f"--args={GVT}"]]
    assert [k["args"] for k in json.loads(state.read_text())] == [
        f"ro rootflags=subvol=root rhgb quiet {GVT}", f"ro rootflags=subvol=root {GVT}"]
    manifest = json.loads((setup.state / "setup/manifest.json").read_text())
    assert manifest["undo"] == [{"tool": "grubby", "added": GVT.split(), "removed": []}]

    assert "nothing to do: the host is set up\n" in setup("apply")
    assert setup.calls() == [["grubby", "--info=ALL"]]

    assert setup("revert") == f"""\
removed    /etc/modprobe.d/vgpuctl.conf  (vgpuctl created it)
removed    /etc/modules-load.d/vgpuctl.conf  (vgpuctl created it)
ran        grubby --update-kernel=ALL '--remove-args={GVT}'
""" + REVERTED
    assert setup.calls() == [["grubby", "--update-kernel=ALL", f"--remove-args={GVT}"]]
    assert json.loads(state.read_text()) == kernels
    assert not (setup.state / "setup/manifest.json").exists()


def test_commands_are_shown_not_run_under_another_root(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake-bare"), tmp_path / "state")  # no tools directory
    os_release(setup, "ID=rhel\nID_LIKE=fedora\n")
    plan = setup("plan", "--boot", "grubby")
    assert plan.startswith("boot: grubby: --update-kernel=ALL on every boot entry (chosen with --boot)\n"
                           "--- /proc/cmdline\n+++ after grubby --update-kernel=ALL\n")
    assert f'+args="BOOT_IMAGE=/boot/vmlinuz-6.8.0 root=/dev/sda1 ro quiet {GVT}"\n' in plan
    assert (f"then run, on that host (vgpuctl does not run them under --root {setup.root.root}):\n"
            f"  grubby --update-kernel=ALL '--args={GVT}'\n") in plan
    assert f"note: grubby is not run under --root {setup.root.root}: the current command line is " \
           "/proc/cmdline's\n" in plan
    out = setup("apply", "--boot", "grubby")
    assert f"not run    grubby --update-kernel=ALL '--args={GVT}'  ({setup.root.root} is not this machine's root" \
           in out
    assert json.loads((setup.state / "setup/manifest.json").read_text())["undo"] == []
    assert setup.read("/etc/modules-load.d/vgpuctl.conf") == MODULES


# ---------------------------------------------------------------- systemd-boot

ENTRY = """\
title   Arch Linux
linux   /vmlinuz-linux
initrd  /initramfs-linux.img
options root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw  quiet i915.enable_guc=3
"""
FALLBACK = """\
title   Arch Linux (fallback initramfs)
linux   /vmlinuz-linux
initrd  /initramfs-linux-fallback.img
options root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw intel_iommu=off
options i915.enable_gvt=0"""
WINDOWS = "title Windows Boot Manager\nefi /EFI/Microsoft/Boot/bootmgfw.efi\n"


def test_systemd_boot_plan_apply_again_revert(tmp_path: Path) -> None:
    # A plain directory as the root: the whole layout, /proc included, written by the test.
    setup = Setup(HostRoot(tmp_path / "root"), tmp_path / "state")
    files = {
        "/etc/os-release": 'NAME="Arch Linux"\nID=arch\n',
        "/boot/loader/loader.conf": "default arch.conf\ntimeout 3\n",
        "/boot/loader/entries/arch.conf": ENTRY,
        "/boot/loader/entries/arch-fallback.conf": FALLBACK,
        "/boot/loader/entries/windows.conf": WINDOWS,
        "/etc/kernel/cmdline": "root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw quiet\n",
        "/proc/cmdline": "initrd=\\initramfs-linux.img root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw quiet\n",
        "/proc/sys/kernel/osrelease": "6.8.2-arch2-1\n",
        "/boot/config-6.8.2-arch2-1": "CONFIG_DRM_I915=m\nCONFIG_KVM=y\n",
    }
    for path, text in files.items():
        setup.write(path, text)
    options = OPTIONS.replace("options kvm ignore_msrs=1\n", "")
    head = ("boot: systemd-boot: the loader entries' options lines, and /etc/kernel/cmdline for kernels installed "
            "later (/boot/loader/loader.conf exists)\n")
    notes = ("note: /boot/loader/entries/windows.conf: not a Linux entry (no 'linux' line), left alone\n"
             "note: kvm is built into this kernel (CONFIG_KVM=y): modprobe options do not reach it, the kernel "
             "command line sets it\n")

    assert setup("plan") == head + f"""\
--- a/boot/loader/entries/arch-fallback.conf
+++ b/boot/loader/entries/arch-fallback.conf
@@ -1,5 +1,5 @@
 title   Arch Linux (fallback initramfs)
 linux   /vmlinuz-linux
 initrd  /initramfs-linux-fallback.img
-options root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw intel_iommu=off
-options i915.enable_gvt=0
\\ No newline at end of file
+options root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw intel_iommu=on
+options i915.enable_gvt=1 kvm.ignore_msrs=1
\\ No newline at end of file
--- a/boot/loader/entries/arch.conf
+++ b/boot/loader/entries/arch.conf
@@ -1,4 +1,4 @@
 title   Arch Linux
 linux   /vmlinuz-linux
 initrd  /initramfs-linux.img
-options root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw  quiet i915.enable_guc=3
+options root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw  quiet i915.enable_guc=2 {GVT}
--- a/etc/kernel/cmdline
+++ b/etc/kernel/cmdline
@@ -1 +1 @@
-root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw quiet
+root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw quiet {GVT}
--- /dev/null
+++ b/etc/modules-load.d/vgpuctl.conf
@@ -0,0 +1,5 @@
{"".join("+" + line + chr(10) for line in MODULES.splitlines())}\
--- /dev/null
+++ b/etc/modprobe.d/vgpuctl.conf
@@ -0,0 +1,3 @@
{"".join("+" + line + chr(10) for line in options.splitlines())}\
""" + notes + REBOOT

    assert setup("apply") == head + f"""\
updated    /boot/loader/entries/arch-fallback.conf
updated    /boot/loader/entries/arch.conf
updated    /etc/kernel/cmdline
created    /etc/modules-load.d/vgpuctl.conf
created    /etc/modprobe.d/vgpuctl.conf
backups in {setup.state}/setup: 'vgpuctl setup revert' puts them back
""" + notes + REBOOT
    assert setup.read("/boot/loader/entries/arch.conf") == ENTRY.replace("i915.enable_guc=3",
                                                                         f"i915.enable_guc=2 {GVT}")
    assert setup.read("/boot/loader/entries/arch-fallback.conf") == FALLBACK.replace(
        "intel_iommu=off", "intel_iommu=on").replace("enable_gvt=0", "enable_gvt=1 kvm.ignore_msrs=1")
    assert setup.read("/etc/kernel/cmdline") == f"root=UUID=0a3407de-014b-458b-b5c1-848e92a327a3 rw quiet {GVT}\n"
    assert setup.read("/etc/modprobe.d/vgpuctl.conf") == options

    before = setup.snapshot()
    assert setup("apply") == head + "nothing to do: the host is set up\n" + notes + PENDING
    assert setup.snapshot() == before
    other = Setup(HostRoot(tmp_path / "other"), setup.state)  # one state directory, one host's setup
    other.write("/etc/default/grub", SIM_GRUB)
    assert other("apply", "--boot", "grub", code=1) == (
        f"error: {setup.state}/setup holds the setup of root {setup.root.root}, not {other.root.root}: revert it "
        f"with --root {setup.root.root}, or use another --state-dir\n")

    assert setup("revert") == """\
restored   /boot/loader/entries/arch-fallback.conf
restored   /boot/loader/entries/arch.conf
restored   /etc/kernel/cmdline
removed    /etc/modprobe.d/vgpuctl.conf  (vgpuctl created it)
removed    /etc/modules-load.d/vgpuctl.conf  (vgpuctl created it)
""" + REVERTED
    for path, text in files.items():
        assert setup.root.path(path).read_bytes() == text.encode(), path
    assert not setup.root.path("/etc/modprobe.d/vgpuctl.conf").exists()


# ---------------------------------------------------------------- kernelstub (Pop!_OS)

KERNELSTUB = """\
CONFIG = {config!r}
config = json.load(open(CONFIG))
options = config["user"]["kernel_options"]
if argv[0] == "-a":
    options += [o for o in argv[1].split() if o not in options]
elif argv[0] == "-d":
    config["user"]["kernel_options"] = [o for o in options if o not in argv[1].split()]
open(CONFIG, "w").write(json.dumps(config, indent=2) + "\\n")
"""


def test_pop_os_kernelstub_plan_apply_again_revert(mount_host: MountFn, tmp_path: Path) -> None:
    setup = Setup(mount_host("coffeelake-bare"), tmp_path / "state", tmp_path / "bin")
    os_release(setup, 'NAME="Pop!_OS"\nID=pop\nID_LIKE="ubuntu debian"\n')
    config = {"default": {"kernel_options": ["quiet", "splash"], "esp_path": "/boot/efi"},
              "user": {"kernel_options": ["quiet", "loglevel=0", "systemd.show_status=false", "splash",
                                          "kvm.ignore_msrs=0"],
                       "esp_path": "/boot/efi", "setup_loader": False, "manage_mode": False}}
    original = json.dumps(config, indent=2) + "\n"
    setup.write("/etc/kernelstub/configuration", original)
    stub(tmp_path / "bin", "kernelstub", KERNELSTUB.format(config=str(setup.root.path(KERNELSTUB_CONFIG))))
    adds = "i915.enable_gvt=1 intel_iommu=on kvm.ignore_msrs=1"

    plan = setup("plan")
    assert plan.startswith("""\
boot: kernelstub: the user kernel_options in /etc/kernelstub/configuration (/etc/kernelstub/configuration exists \
(Pop!_OS))
--- /etc/kernelstub/configuration (user kernel_options)
+++ after kernelstub
@@ -1 +1 @@
-quiet loglevel=0 systemd.show_status=false splash kvm.ignore_msrs=0
+quiet loglevel=0 systemd.show_status=false splash i915.enable_gvt=1 intel_iommu=on kvm.ignore_msrs=1
--- /dev/null
+++ b/etc/modules-load.d/vgpuctl.conf
""")
    assert plan.endswith(f"then run:\n  kernelstub -d kvm.ignore_msrs=0\n  kernelstub -a '{adds}'\n" + REBOOT)
    assert setup.calls() == []

    assert f"ran        kernelstub -d kvm.ignore_msrs=0\nran        kernelstub -a '{adds}'\n" in setup("apply")
    assert setup.calls() == [["kernelstub", "-d", "kvm.ignore_msrs=0"], ["kernelstub", "-a", adds]]
    applied = json.loads(setup.read("/etc/kernelstub/configuration") or "")
    assert applied["user"]["kernel_options"] == ["quiet", "loglevel=0", "systemd.show_status=false", "splash",
                                                 "i915.enable_gvt=1", "intel_iommu=on", "kvm.ignore_msrs=1"]

    assert "nothing to do: the host is set up\n" in setup("apply") and setup.calls() == []

    out = setup("revert")
    assert f"ran        kernelstub -d '{adds}'\nran        kernelstub -a kvm.ignore_msrs=0\n" in out
    assert setup.calls() == [["kernelstub", "-d", adds], ["kernelstub", "-a", "kvm.ignore_msrs=0"]]
    assert setup.read("/etc/kernelstub/configuration") == original
    assert setup.read("/etc/modules-load.d/vgpuctl.conf") is None

    setup.write("/etc/kernelstub/configuration", "{not json")
    assert "error: cannot read the user kernel_options of /etc/kernelstub/configuration" in setup("plan", code=1)


# ---------------------------------------------------------------- what a real host is offered now


def test_immediate_steps_are_offered_on_a_real_host_only(mount_host: MountFn, tmp_path: Path) -> None:
    bare = mount_host("coffeelake-bare")
    steps = make_plan(bare, Tools(bare), GVT_SETUP, real_host=True).now
    assert steps == ["echo 1 > /sys/module/kvm/parameters/ignore_msrs   # kvm.ignore_msrs at once, until the next "
                     "boot"]  # a reboot is needed anyway, which loads the modules
    assert make_plan(bare, Tools(bare), GVT_SETUP).now == []  # under --root: nothing is offered
    # Command line ready, but the modules not loaded: no reboot needed, load them now.
    ready = mount_host("coffeelake", modules=["i915", "kvm", "kvm_intel", "vfio"])
    plan = make_plan(ready, Tools(ready), GVT_SETUP, real_host=True)
    assert plan.reboot == []
    assert plan.now == ["modprobe -a kvmgt vfio-iommu-type1 mdev   # load the modules now instead of at the next "
                        "boot"]


# ---------------------------------------------------------------- the pieces


def gvt_change(tokens: list[str]) -> CmdlineChange:
    return needed_change(tokens, GVT_SETUP)


def test_needed_change_keeps_good_values_and_fixes_bad_ones() -> None:
    assert not gvt_change(["i915.enable_gvt=Y", "kvm.ignore_msrs", "intel_iommu=on,sm_on", "i915.enable_guc=2"])
    assert gvt_change(["i915.enable-gvt=0", "kvm.ignore_msrs=N", "intel_iommu=igfx_off"]) == CmdlineChange(
        add=("intel_iommu=on",), replace=(("i915.enable-gvt=0", "i915.enable-gvt=1"),
                                          ("kvm.ignore_msrs=N", "kvm.ignore_msrs=1")))
    # only the last value counts in the kernel; the others that work against it go
    assert gvt_change(["i915.enable_gvt=0", "i915.enable_gvt=1", "i915.enable_gvt=n", *GVT.split()[1:]]) == \
        CmdlineChange(remove=("i915.enable_gvt=0", "i915.enable_gvt=n"))
    assert gvt_change([*GVT.split(), "i915.enable_guc=1", "i915.enable_guc=-1", "i915.enable_guc_submission=1"]) \
        == CmdlineChange(replace=(("i915.enable_guc=1", "i915.enable_guc=0"),
                                  ("i915.enable_guc_submission=1", "i915.enable_guc_submission=0")))
    change = gvt_change(split_cmdline('quiet  i915.enable_gvt=0 root="LABEL=my disk"'))
    assert change.apply('  quiet  i915.enable_gvt=0 root="LABEL=my disk"  ') == \
        '  quiet  i915.enable_gvt=1 root="LABEL=my disk" kvm.ignore_msrs=1 intel_iommu=on  '
    assert CmdlineChange(remove=("b",)).apply("a b c") == "a c"
    assert CmdlineChange(remove=("c",)).apply("a b c\n") == "a b\n"
    assert CmdlineChange(add=("x",)).apply("") == "x"


def test_parsers() -> None:
    [a, b] = parse_grub_assignments("/g", "GRUB_CMDLINE_LINUX=\nexport GRUB_CMDLINE_LINUX_DEFAULT='a b' # c\n")
    assert (a.name, a.value, a.quote, a.problem) == ("GRUB_CMDLINE_LINUX", "", "", None)
    assert (b.name, b.value, b.quote, b.problem, b.line) == ("GRUB_CMDLINE_LINUX_DEFAULT", "a b", "'", None, 2)
    assert a.written("x y") == '"x y"' and b.written("x") == "'x'"
    assert parse_grubby_info('index=0\nkernel="/boot/k"\nargs="ro quiet"\nindex=1\nnon linux entry\n') == \
        [("/boot/k", "ro quiet")]
    assert ("auto", *MECHANISMS) == BOOT_CHOICES


def test_tools_under_another_root_are_found_not_run(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    (tmp_path / "usr/sbin").mkdir(parents=True)
    (tmp_path / "usr/sbin/grubby").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "usr/sbin/grubby", 0o755)
    tools = Tools(root)
    assert tools.find("grubby") == "/usr/sbin/grubby" and not tools.runnable
    assert Tools(root, tmp_path / "bin").runnable and Tools(root, tmp_path / "bin").find("grubby") is None


def test_systemd_boot_round_trip_on_a_mounted_simulated_host(mount_host: MountFn, tmp_path: Path) -> None:
    """The same layout on the simulator, whose /boot is writable storage like /etc."""
    root = mount_host("coffeelake-bare")
    setup = Setup(root, tmp_path / "state")
    setup.write("/boot/loader/loader.conf", "default arch.conf\n")
    setup.write("/boot/loader/entries/arch.conf", ENTRY)
    assert "boot: systemd-boot" in setup("plan")
    setup("apply")
    entry = setup.read("/boot/loader/entries/arch.conf")
    assert entry is not None and "i915.enable_guc=2 i915.enable_gvt=1 kvm.ignore_msrs=1 intel_iommu=on" in entry
    assert "nothing to do" in setup("apply")
    setup("revert")
    assert setup.read("/boot/loader/entries/arch.conf") == ENTRY


def test_a_host_set_up_by_an_earlier_vgpuctl_reverts_cleanly(tmp_path: Path) -> None:
    """The record exactly as vgpuctl wrote it before setup and install-units shared one installer (commit
    15080c8: its manifest.json and backup/), on a host it changed: revert puts the host back byte for byte."""
    root, state = HostRoot(tmp_path / "root"), tmp_path / "state"
    setup = Setup(root, state, tmp_path / "bin")
    stub(tmp_path / "bin", "update-grub")
    original = 'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX=""\n'
    written = original.replace('"quiet"', f'"quiet {GVT}"')
    setup.write("/etc/os-release", "ID=debian\n")
    setup.write("/etc/default/grub", written)
    setup.write("/etc/modules-load.d/vgpuctl.conf", MODULES)
    setup.write("/etc/modprobe.d/vgpuctl.conf", OPTIONS)
    (state / "setup/backup/etc/default").mkdir(parents=True)
    (state / "setup/backup/etc/default/grub").write_text(original)

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def created(text: str, role: str) -> dict[str, object]:
        return {"existed": False, "mode": None, "original_sha256": None, "role": role,
                "written_sha256": digest(text)}

    (state / "setup/manifest.json").write_text(json.dumps({
        "files": {
            "/etc/default/grub": {"existed": True, "mode": 420, "original_sha256": digest(original), "role": "boot",
                                  "written_sha256": digest(written)},
            "/etc/modprobe.d/vgpuctl.conf": created(OPTIONS, "options"),
            "/etc/modules-load.d/vgpuctl.conf": created(MODULES, "modules"),
        },
        "pending": [], "regenerate": [["update-grub"]], "root": str(root.root.resolve()), "undo": [], "version": 1,
    }, indent=2, sort_keys=True) + "\n")

    assert setup("revert") == """\
restored   /etc/default/grub
removed    /etc/modprobe.d/vgpuctl.conf  (vgpuctl created it)
removed    /etc/modules-load.d/vgpuctl.conf  (vgpuctl created it)
ran        update-grub
""" + REVERTED
    assert setup.root.path("/etc/default/grub").read_bytes() == original.encode()
    assert sorted(str(p.relative_to(root.root)) for p in root.root.rglob("*") if p.is_file()) == [
        "etc/default/grub", "etc/os-release"]
    assert [p for p in (state / "setup").rglob("*")] == []
