"""The host probes for KVM and QEMU (vgpuctl.host.kvm, vgpuctl.host.qemu).

QEMU tests run Debian's real qemu-system-x86_64; each says which accelerator it uses (none: only
help output, no guest). Expected values are parsed here from the binary's own output, with code
independent of the module's, except for the few vfio-pci properties vgpuctl depends on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import MountFn
from vgpuctl.host import HostRoot
from vgpuctl.host import kvm as kvm_module
from vgpuctl.host.kvm import ALL_STAGES, GUEST_ASM, guest_image, probe_kvm, run_tiny_guest
from vgpuctl.host.qemu import QEMU_ENV, find_qemu, parse_list, parse_properties, probe_qemu

NEEDED_VFIO = {"sysfsdev": "str", "display": "OnOffAuto", "x-igd-opregion": "bool", "xres": "uint32",
               "yres": "uint32"}


@pytest.fixture
def qemu(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv(QEMU_ENV, raising=False)
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        pytest.fail("qemu-system-x86_64 is required: apt-get install qemu-system-x86 (make test does)")
    return binary


def _run(binary: str, *args: str) -> str:
    """stdout of one help query; these exit 0 or 1 (-spice help) and both are fine here."""
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=30).stdout


def _names_after(text: str, heading: str) -> list[str]:
    """The test's own reading of a one-name-per-line list: everything after the heading line
    up to a blank line."""
    after = text.split(heading, 1)[1].split("\n", 1)[1]
    return [line.strip() for line in after.split("\n\n", 1)[0].splitlines() if line.strip()]


def _host_cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":")[0].strip() == "flags":
            return set(line.split(":", 1)[1].split())
    return set()


# ---- QEMU capabilities (no accelerator: help output only) -------------------------------------


def test_qemu_probe_matches_what_the_binary_prints(qemu: str) -> None:
    """No guest, no accelerator: every field equals the binary's own help output."""
    started = time.monotonic()
    report = probe_qemu()
    elapsed = time.monotonic() - started
    assert report.errors == []
    assert report.binary == os.path.realpath(qemu) or report.binary == qemu
    assert elapsed < 2.0, f"probe took {elapsed:.2f} s"

    version = re.search(r"version (\d+\.\d+\.\d+)", _run(qemu, "-version"))
    assert version is not None and report.version == version.group(1)

    accels = _names_after(_run(qemu, "-accel", "help"), "Accelerators supported in QEMU binary:")
    assert report.accelerators == accels
    assert {"kvm", "tcg"} <= set(report.accelerators)

    displays = _names_after(_run(qemu, "-display", "help"), "Available display backend types:")
    assert report.displays == displays
    assert "none" in report.displays
    # Debian 12 with qemu-system-gui: the GL-capable backends vGPU displays need, as printed.
    for backend in ("egl-headless", "gtk", "sdl", "spice-app", "dbus"):
        assert (backend in report.displays) == (backend in displays)

    vfio_text = _run(qemu, "-device", "vfio-pci,help")
    listed = {line.split("=")[0].strip(): line.split("<")[1].split(">")[0]
              for line in vfio_text.splitlines() if "=<" in line}
    assert report.vfio_pci_properties == listed
    for name, kind in NEEDED_VFIO.items():
        assert report.vfio_pci_properties.get(name) == kind, name

    devices = _run(qemu, "-device", "help")
    assert report.vfio_pci_nohotplug == ('name "vfio-pci-nohotplug"' in devices)
    assert report.vfio_pci_nohotplug
    nohotplug = _run(qemu, "-device", "vfio-pci-nohotplug,help")
    assert report.ramfb == ("ramfb=<bool>" in nohotplug)
    assert report.ramfb

    assert report.spice == ("spice options:" in _run(qemu, "-spice", "help"))
    assert report.vnc == ("vnc options:" in _run(qemu, "-vnc", "help"))


def test_find_qemu_order(qemu: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No QEMU is run: the argument wins over $VGPUCTL_QEMU, which wins over PATH."""
    assert find_qemu() == qemu
    monkeypatch.setenv(QEMU_ENV, qemu)
    assert find_qemu() == qemu
    assert find_qemu("qemu-system-x86_64") == qemu
    missing = tmp_path / "no-such-qemu"
    assert find_qemu(str(missing)) is None  # asked for by name: no silent fallback


def test_missing_qemu_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$VGPUCTL_QEMU names a file that does not exist: no binary, and the error says which."""
    missing = tmp_path / "qemu-system-x86_64"
    monkeypatch.setenv(QEMU_ENV, str(missing))
    assert find_qemu() is None
    report = probe_qemu()
    assert report.binary is None and report.version is None
    assert report.accelerators == [] and report.displays == [] and report.vfio_pci_properties == {}
    assert len(report.errors) == 1
    assert QEMU_ENV in report.errors[0] and str(missing) in report.errors[0]
    assert "not found" in report.errors[0]
    if os.path.exists("/dev/kvm"):
        kvm = probe_kvm(HostRoot(Path("/")))  # no QEMU to start a guest with
        assert kvm.guest_runs is None and "no QEMU" in kvm.detail


def test_help_parsers_on_other_formats() -> None:
    """No QEMU is run: older property format, and a display list followed by prose."""
    old = "vfio-pci.host=str\nvfio-pci.sysfsdev=str\nvfio-pci.x-igd-opregion=bool\n"
    assert parse_properties(old) == {"host": "str", "sysfsdev": "str", "x-igd-opregion": "bool"}
    text = "Available display backend types:\nnone\ngtk\n\nSome display backends support suboptions:\n  a\n"
    assert parse_list(text, "Available display backend types") == ["none", "gtk"]


# ---- the probe guest --------------------------------------------------------------------------


def test_guest_image_is_the_assembled_source(tmp_path: Path) -> None:
    """No QEMU is run: the embedded image is exactly GUEST_ASM assembled with GNU as."""
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("GNU binutils (as, objcopy) not installed")
    source, obj, image = tmp_path / "guest.S", tmp_path / "guest.o", tmp_path / "guest.bin"
    source.write_text(GUEST_ASM)
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(image)], check=True)
    assert image.read_bytes() == guest_image()
    assert len(guest_image()) == 0x10000


def test_tiny_guest_runs_under_tcg(qemu: str) -> None:
    """Accelerator: TCG. The same image the KVM probe uses writes every stage byte, so a KVM
    failure is KVM's and not the image's."""
    run = run_tiny_guest(qemu, "tcg", timeout_s=10.0)
    assert run.stages == ALL_STAGES, run.stderr
    assert run.error is None and run.completed
    assert run.elapsed_s < 5.0


# ---- KVM on this machine ----------------------------------------------------------------------


def test_kvm_probe_on_this_machine(qemu: str) -> None:
    """Accelerator: KVM (-accel kvm, no fallback). On this KVM-PVM machine the device opens but
    the guest stops with a KVM internal error; a machine that runs guests passes too, as long as
    the report is consistent."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("this machine has no /dev/kvm")
    started = time.monotonic()
    report = probe_kvm(HostRoot(Path("/")), timeout_s=10.0)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0
    assert report.device_present is True
    assert report.device_opens is True
    assert report.api_version == 12
    flags = _host_cpu_flags()
    assert report.nested_hypervisor == ("hypervisor" in flags)
    assert report.cpu_flag == ("vmx" if "vmx" in flags else "svm" if "svm" in flags else None)
    assert report.guest_runs is not None
    assert report.guest_runs == (report.guest_error is None)  # ran iff no error
    if Path("/sys/module/kvm_pvm").exists():  # KVM-PVM, as on the machine this was written on
        assert report.nested_hypervisor is True and report.cpu_flag is None
        assert report.guest_runs is False
        assert report.guest_error is not None and "KVM internal error" in report.guest_error
        assert "KVM-PVM" in report.detail and "TCG" in report.detail
    if report.guest_runs:
        assert "KVM works" in report.detail


def test_kvm_guest_stages_on_this_machine(qemu: str) -> None:
    """Accelerator: KVM. Where the guest stops is reported; under KVM-PVM the emulator gets the
    guest into long mode and fails at x87/SSE."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("this machine has no /dev/kvm")
    run = run_tiny_guest(qemu, "kvm", timeout_s=10.0)
    assert ALL_STAGES.startswith(run.stages)
    assert run.completed == (run.error is None)
    if Path("/sys/module/kvm_pvm").exists():
        assert run.stages.startswith("RPL") and not run.completed
        assert "emulation failure" in run.stderr
        assert "long mode" in run.story()


def test_kvm_probe_without_guest(qemu: str) -> None:
    """No accelerator: run_guest=False opens the device only."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("this machine has no /dev/kvm")
    report = probe_kvm(HostRoot(Path("/")), run_guest=False)
    assert report.device_opens is True and report.guest_runs is None and report.guest_error is None


# ---- simulated hosts (FUSE): nothing is opened or run -----------------------------------------


@pytest.mark.fuse
def test_kvm_probe_on_simulated_host(mount_host: MountFn, monkeypatch: pytest.MonkeyPatch) -> None:
    """No accelerator, no QEMU: a simulated host's /dev/kvm is a model node."""
    def no_guest(*args: object, **kwargs: object) -> None:
        raise AssertionError("a guest was started for a simulated host")

    monkeypatch.setattr(kvm_module, "run_tiny_guest", no_guest)
    root = mount_host("coffeelake")
    report = probe_kvm(root)
    assert report.device_present is True
    assert report.device_opens is None and report.api_version is None
    assert report.guest_runs is None and report.guest_error is None
    assert "Simulated" in report.detail
    if root.exists("/proc/cpuinfo"):  # the simulator's CPU: a Coffee Lake with VT-x, bare metal
        assert report.cpu_flag == "vmx" and report.nested_hypervisor is False


@pytest.mark.fuse
def test_kvm_probe_on_simulated_host_without_kvm(mount_host: MountFn) -> None:
    """No accelerator, no QEMU: kvm_intel not loaded, so no /dev/kvm."""
    root = mount_host("coffeelake", modules=["i915", "vfio"])
    report = probe_kvm(root)
    assert report.device_present is False
    assert report.device_opens is None and report.guest_runs is None
    assert "absent" in report.detail


# ---- QEMUs that misbehave (shell scripts standing in for the binary) -------------------------


def _fake_qemu(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_tiny_guest_timeout_kills_qemu(tmp_path: Path) -> None:
    """No accelerator: a "QEMU" that never answers is killed at the timeout."""
    fake = _fake_qemu(tmp_path, "exec sleep 30")
    started = time.monotonic()
    run = run_tiny_guest(fake, "kvm", timeout_s=0.3)
    assert time.monotonic() - started < 2.0
    assert run.stages == "" and run.error is not None and "0.3 s" in run.error
    assert not run.completed


def test_tiny_guest_qemu_exits_with_an_error(tmp_path: Path) -> None:
    """No accelerator: QEMU's first relevant stderr line, program prefix and warnings removed."""
    fake = _fake_qemu(tmp_path, 'echo "qemu-system-x86_64: warning: something minor" >&2\n'
                                'echo "qemu-system-x86_64: failed to initialize kvm: Permission denied" >&2\n'
                                "exit 1")
    run = run_tiny_guest(fake, "kvm", timeout_s=5.0)
    assert run.error == "failed to initialize kvm: Permission denied"
    assert not run.completed


def test_qemu_probe_of_a_binary_that_is_not_qemu(tmp_path: Path) -> None:
    """No accelerator: a binary that prints nothing useful gives errors, not a crash or guesses."""
    report = probe_qemu(_fake_qemu(tmp_path, "echo hello; exit 0"))
    assert report.binary is not None and report.version is None
    assert report.accelerators == [] and report.vfio_pci_properties == {} and not report.ramfb
    assert any("-version" in error for error in report.errors)
    assert any("vfio-pci" in error for error in report.errors)


def test_qemu_probe_timeout(tmp_path: Path) -> None:
    """No accelerator: a hanging binary is killed and reported, within the timeout."""
    started = time.monotonic()
    report = probe_qemu(_fake_qemu(tmp_path, "exec sleep 30"), timeout_s=0.3)
    assert time.monotonic() - started < 2.0
    assert report.version is None and report.errors and all("no answer within" in e for e in report.errors)
