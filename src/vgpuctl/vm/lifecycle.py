"""Running VMs: start (preflight, vGPU on demand, QEMU detached, wait for QMP ``running``), stop,
kill, status, screenshot — all re-attaching through the VM's QMP socket and pidfile, so a VM
outlives the vgpuctl process that started it.

QEMU runs under ``sh -c 'qemu ...; echo $? > exit-status'`` in a session of its own: the exit
status tells a guest power-off (0) from a crash (anything else) after vgpuctl has gone away.
Nothing loses track of it: ``run.json`` is written before QEMU is spawned (and the shell's pid and
start time right after), and every command finds the VM's QEMU by its command line in /proc
(:func:`vgpuctl.vm.runtime.vm_processes`) whatever the state files say, so a start killed at any
point never leaves a QEMU that status calls stopped or that a second start runs beside.
Its QMP socket is bound by vgpuctl before QEMU starts and handed over as a file descriptor, as
libvirt does, so a start connects at once and learns ``running`` the moment QEMU's monitor speaks;
``run.json`` keeps the exact argv (``vgpuctl vm argv`` prints the equivalent with a socket path).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import Conflict, KernelError, NotFound, VgpuError
from vgpuctl.base.process import boot_id
from vgpuctl.base.process import started_at as process_started_at
from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot
from vgpuctl.host.files import atomic_write
from vgpuctl.vm import machine
from vgpuctl.vm import qmp as qmp_commands
from vgpuctl.vm import spec as specs
from vgpuctl.vm.argv import QemuCommand, build_command
from vgpuctl.vm.qmp import QmpClient, QmpError
from vgpuctl.vm.runtime import (
    Process,
    ResolvedVgpu,
    RuntimePaths,
    VmProcesses,
    check_requirements,
    guest_warnings,
    process,
    resolve_vgpu,
    running_vms,
    swtpm_processes,
    vm_processes,
)
from vgpuctl.vm.spec import VmSpec

START_TIMEOUT_S = 30.0
SWTPM_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 15


class VmError(VgpuError):
    """A VM could not be started, stopped or reached; the message says what to do."""


class Prepared(NamedTuple):
    """Everything a start needs, computed without changing anything."""

    spec: VmSpec
    vgpu: ResolvedVgpu | None
    command: QemuCommand
    accel: str
    notes: list[str]


@dataclass
class VmStatus:
    """What a VM is doing now, found through its pidfile, QMP socket and run record."""

    name: str
    state: str  # starting | running | paused | shutdown (guest powered off, QEMU waits) | stopped | crashed
    pid: int | None = None
    qmp_status: str | None = None
    accel: str | None = None
    vgpu: str | None = None
    simulated_display: str | None = None  # the emulated adapter standing in for the vGPU on a simulated host
    console: dict[str, str] = field(default_factory=dict)
    detail: str = ""
    log_tail: list[str] = field(default_factory=list)
    uptime_s: float | None = None  # since QEMU started
    # What the QEMU guest agent says of the guest (vm.agent.guest_facts), when asked for and the VM has one.
    guest: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- choosing how to run


def qemu_host(root: HostRoot) -> HostRoot:
    """The machine QEMU runs on: the host itself, or this machine when the host is simulated."""
    return HostRoot(Path("/")) if root.is_simulated else root


def default_qemu() -> str:
    from vgpuctl.host.qemu_binary import find_qemu

    return find_qemu() or "qemu-system-x86_64"


def choose_accel(state: StateDir, root: HostRoot, qemu: str, notes: list[str]) -> str:
    """KVM when KVM really runs a guest, else TCG — by probe, cached per boot and QEMU binary."""
    def probe() -> dict[str, Any]:
        from vgpuctl.host.kvm import probe_kvm

        report = probe_kvm(qemu_host(root), qemu_binary=qemu, run_guest=True)
        return {"accel": "kvm" if report.guest_runs else "tcg", "detail": report.detail}

    found = _cached_probe(state, "kvm-probe.json", qemu, probe)
    assert found is not None
    notes.append(f"accelerator {found['accel']}: {found['detail']}")
    return str(found["accel"])


def _cached_probe(state: StateDir, file: str, qemu: str,
                  probe: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """``probe()``'s answer about ``qemu``, kept in ``<state-dir>/<file>`` for this boot and this QEMU binary
    (probes start QEMU: ~100 ms or more, which a VM start should not pay each time). None is not kept."""
    key = _probe_key(qemu)
    cache = state.path / file
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return dict(cached["answer"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or from an older vgpuctl: probe again
    answer = probe()
    if answer is not None:
        with contextlib.suppress(OSError):  # a read-only state dir only costs the probe next time
            atomic_write(cache, json.dumps({"key": key, "answer": answer}).encode())
    return answer


def _probe_key(qemu: str) -> str:
    try:
        boot = boot_id()
        mtime = os.stat(qemu).st_mtime_ns if os.path.isabs(qemu) else 0
    except OSError:
        boot, mtime = "?", 0
    return f"{boot}:{qemu}:{mtime}"


def prepare(root: HostRoot, state: StateDir, name: str, *, accel: str = "auto", qemu: str | None = None) -> Prepared:
    """The spec, its vGPU (resolved read-only) and the exact QEMU command line."""
    spec = specs.load(state, name)
    # VFs other VMs run on, looked for only when a VF may be chosen (once: the chooser and the VF pick share them)
    vgpu = resolve_vgpu(root, spec, taken=functools.cache(lambda: _running_vgpus(state, name)))
    notes: list[str] = []
    if vgpu is not None and vgpu.state == "new":
        notes.append(f"would create vGPU {vgpu.uuid} ({vgpu.type_id} on {vgpu.parent}) at start: {vgpu.reason}")
    elif vgpu is not None and vgpu.state == "defined":
        notes.append(f"would start the defined vGPU {vgpu.uuid} ({vgpu.type_id} on {vgpu.parent}) at start")
    binary = qemu or default_qemu()
    chosen = choose_accel(state, root, binary, notes) if accel == "auto" else accel
    host = qemu_host(root)
    vhost = host.exists(host.dev_vhost_net)
    command = build_command(spec, vgpu, qemu=binary, accel=chosen,
                            runtime_dir=RuntimePaths.for_vm(state, name).directory,
                            simulated=root.is_simulated, vhost_net=vhost)
    return Prepared(spec, vgpu, command, chosen, notes + command.notes + guest_warnings(root, spec, chosen))


# ---------------------------------------------------------------------- QMP


def qmp(paths: RuntimePaths, command: str, arguments: dict[str, Any] | None = None,
        timeout_s: float = 5.0) -> Any:
    """One QMP command over the VM's socket (:func:`vgpuctl.vm.qmp.run`), returning its result."""
    return qmp_commands.run(paths.qmp_socket, command, arguments, timeout=timeout_s)


def _qmp_status(paths: RuntimePaths) -> str | None:
    try:
        return qmp_commands.query_status(paths.qmp_socket, timeout=2.0)
    except QmpError:
        return None


# ---------------------------------------------------------------------- lifecycle


def _run_file(paths: RuntimePaths) -> Path:
    return paths.directory / "run.json"


def _vf_file(paths: RuntimePaths) -> Path:
    """The VF whose per-VM type vgpuctl set for this VM (NVIDIA vendor-VFIO), until it is released."""
    return paths.directory / "vf.json"


def _exit_file(paths: RuntimePaths, run: dict[str, Any]) -> Path:
    """Where this run's shell leaves QEMU's exit status. One name per run: the shell of a killed
    earlier run may still be writing its own when the next run starts."""
    return paths.directory / f"exit-status.{run['run_id']}"


def _log_tail(paths: RuntimePaths) -> list[str]:
    try:
        return paths.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return []


def _running_vgpus(state: StateDir, but: str) -> dict[str, str]:
    """vGPU uuid -> VM name for every other VM that runs now."""
    recorded = {other: _read_run(RuntimePaths.for_vm(state, other)).get("vgpu")
                for other in specs.names(state) if other != but}
    holders = {other: vgpu for other, vgpu in recorded.items() if vgpu}
    if not holders:
        return {}
    running = running_vms(state)  # one pass over /proc for all of them
    return {vgpu: other for other, vgpu in holders.items() if other in running}


def _read_run(paths: RuntimePaths) -> dict[str, Any]:
    """The run record (``run.json``); {} when there is none."""
    try:
        run = json.loads(_run_file(paths).read_text())
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


def _processes(state: StateDir, name: str, run: dict[str, Any] | None = None) -> VmProcesses:
    """The VM's QEMU and shell now; the QEMU its run record names is looked at first."""
    recorded = Process.from_json((run if run is not None else _read_run(RuntimePaths.for_vm(state, name)))
                                 .get("qemu"))
    return vm_processes(state, name, [recorded.pid] if recorded and recorded.alive() else None)


def _occupied(current: VmStatus) -> bool:
    """A QEMU of the VM runs, or its shell is about to run one (or has just seen it end)."""
    return current.pid is not None or current.state == "starting"


@contextlib.contextmanager
def vm_lock(state: StateDir, name: str) -> Iterator[None]:
    """The VM's lock, for whatever starts, stops or removes it; NotFound (no lock file made) if there is no
    such VM, also when it was removed while this waited for the lock."""
    if not specs.exists(state, name):
        raise NotFound(f"no VM {name!r}; 'vgpuctl vm list' shows the VMs")
    with state.lock(f"vm-{name}"):
        if not specs.exists(state, name):
            raise NotFound(f"no VM {name!r}: it was removed")
        yield


def start(root: HostRoot, state: StateDir, name: str, *, accel: str = "auto", qemu: str | None = None,
          timeout_s: float = START_TIMEOUT_S) -> VmStatus:
    """Preflight, make sure the vGPU exists, start QEMU detached and wait until QMP says ``running``."""
    paths = RuntimePaths.for_vm(state, name)
    with vm_lock(state, name):
        crashpoint("vm-start:locked")
        current = status(root, state, name)
        if _occupied(current):
            raise Conflict(f"VM {name} is already {current.state}" + (f" (pid {current.pid})" if current.pid else "")
                           + f"; 'vgpuctl vm stop {name}' first")
        prepared = prepare(root, state, name, accel=accel, qemu=qemu)
        _preflight(root, state, prepared, paths)
        vgpu = prepared.vgpu
        if vgpu is not None and vgpu.backend.pci_function and vgpu.backend.vm_vgpu_type(vgpu.type_id):
            # An NVIDIA VF gets its type; the VF is recorded first (outliving run.json, which a stop removes
            # before the wrapper's release runs), so that the release after QEMU, or a later one, finds it.
            paths.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(_vf_file(paths), json.dumps({"vf": vgpu.uuid, "type": vgpu.type_id}).encode())
            vgpu.backend.assign(root, vgpu.uuid, vgpu.type_id)  # nothing when it has the type already
            crashpoint("vm-start:vgpu-created")
        elif vgpu is not None and vgpu.state != "active":
            from vgpuctl.mdev.lifecycle import Manager  # only now: a restart reuses its vGPU

            Manager(root, state).create(vgpu.parent, vgpu.type_id, vgpu.uuid)
            crashpoint("vm-start:vgpu-created")
        paths.directory.mkdir(parents=True, exist_ok=True)
        for stale in (paths.pidfile, paths.qmp_socket, *paths.directory.glob("exit-status.*")):
            stale.unlink(missing_ok=True)
        _make_disks(prepared.spec)
        _make_nvram(prepared.spec, paths)
        with _tpm_emulator(state, name, prepared.spec):
            argv = prepared.command.argv
            replaced = prepared.command.replaced_vgpu
            run = {"run_id": time.time_ns(), "argv": argv, "accel": prepared.accel, "vgpu": vgpu.uuid if vgpu else None,
                   "simulated_display": f"emulated VGA {replaced[0]}x{replaced[1]}" if replaced else None,
                   "notes": prepared.notes, "started": time.time()}
            exit_file = _exit_file(paths, run)
            listener = listen_qmp(paths.qmp_socket)
            try:
                run["argv"] = argv = preopened_qmp_argv(argv, listener)
                # Recorded before QEMU exists: from here on a killed start leaves a record (QEMU itself is
                # found by its command line all the same).
                atomic_write(_run_file(paths), json.dumps(run, indent=2).encode(), durable=False)
                crashpoint("vm-start:recorded")
                with open(paths.log, "w") as log:
                    # The shell waits for QEMU and keeps its exit status for later status calls; with
                    # vgpu.keep = false it then removes the vGPU, however QEMU ended (stop, power-off, crash).
                    shell = subprocess.Popen(["/bin/sh", "-c", WRAPPER, "sh", *argv],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             pass_fds=(listener,), start_new_session=True,
                                             env={**os.environ, "VGPUCTL_EXIT": str(exit_file),
                                                  **_release_env(root, state, prepared)})
            finally:
                os.close(listener)
            crashpoint("vm-start:spawned")
            shell_process = process(shell.pid)
            run["shell"] = shell_process.to_json() if shell_process else None
            atomic_write(_run_file(paths), json.dumps(run, indent=2).encode(), durable=False)
            crashpoint("vm-start:recorded-shell")
            wait_running(paths.qmp_socket, lambda: _exited_at_start(paths, exit_file, name), timeout_s,
                         f"VM {name} did not reach 'running' within {timeout_s:.0f} s; see {paths.log}")
            crashpoint("vm-start:running")
            processes = vm_processes(state, name)
            run["qemu"] = processes.qemu.to_json() if processes.qemu else None
            atomic_write(_run_file(paths), json.dumps(run, indent=2).encode(), durable=False)
            crashpoint("vm-start:recorded-qemu")
    return status(root, state, name, qmp_status="running", processes=processes)  # both just found: not again


class AutostartResult(NamedTuple):
    """What ``vgpuctl vm autostart`` did with one VM."""

    name: str
    outcome: str  # started | already running (or paused, starting) | failed
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self._asdict())


def _autostart_specs(state: StateDir) -> tuple[list[VmSpec], list[AutostartResult]]:
    """The VMs marked autostart in start order (``order``, lower first, unordered last; then name), and a
    failure for each spec file that cannot be read (one broken file must not keep the others down)."""
    good, problems = specs.load_each(state)
    chosen = [spec for spec in good if spec.autostart]
    unreadable = [AutostartResult(problem.owner, "failed", problem.error) for problem in problems]
    chosen.sort(key=lambda spec: (spec.order is None, spec.order or 0, spec.name))
    return chosen, unreadable


def autostart(root: HostRoot, state: StateDir, *, accel: str = "auto") -> list[AutostartResult]:
    """Start every VM whose spec says ``autostart``, one after the other in their ``order`` (lower first,
    unordered last, then by name), each until QMP says running before the next begins — the in-car case,
    where the cluster display must be up before the others. A VM that already runs counts as done (the
    command is safe to run again); one that fails is reported and the next one still starts."""
    chosen, results = _autostart_specs(state)
    for spec in chosen:
        try:
            current = status(root, state, spec.name)
            if _occupied(current):
                results.append(AutostartResult(spec.name, f"already {current.state}"))
                continue
            started = start(root, state, spec.name, accel=accel)
            results.append(AutostartResult(spec.name, "started", f"{started.accel or '?'}, pid {started.pid}"))
        except VgpuError as error:
            results.append(AutostartResult(spec.name, "failed", str(error)))
    return results


def autostop(root: HostRoot, state: StateDir, *, timeout_s: float = STOP_TIMEOUT_S) -> list[AutostartResult]:
    """Stop the running VMs marked ``autostart`` in the reverse of their start order (ACPI power button, then
    quit after ``timeout_s``): what the boot unit does at shutdown, before the vGPUs go away."""
    chosen, results = _autostart_specs(state)
    for spec in reversed(chosen):
        try:
            if not _occupied(status(root, state, spec.name)):
                continue
            stopped = stop(root, state, spec.name, timeout_s=timeout_s)
            results.append(AutostartResult(spec.name, "stopped", stopped.detail))
        except VgpuError as error:
            results.append(AutostartResult(spec.name, "failed", str(error)))
    return results


WRAPPER = ('"$@"; echo $? > "$VGPUCTL_EXIT"; '
           '[ -z "$VGPUCTL_RELEASE_VM" ] || exec "$VGPUCTL_PYTHON" -m vgpuctl --root "$VGPUCTL_RELEASE_ROOT" '
           '--state-dir "$VGPUCTL_RELEASE_STATE" vm release-vgpu "$VGPUCTL_RELEASE_VM"')


def _release_env(root: HostRoot, state: StateDir, prepared: Prepared) -> dict[str, str]:
    """What the wrapper needs to remove the VM's vGPU after QEMU, if the spec says not to keep it (only a
    vGPU vgpuctl made for the VM: one named by UUID in the spec is the user's)."""
    vgpu = prepared.spec.vgpu
    if prepared.vgpu is None:
        return {}
    backend = prepared.vgpu.backend
    per_vm_vf = backend.pci_function and backend.vm_vgpu_type(prepared.vgpu.type_id) is not None
    if not per_vm_vf and (vgpu.keep or vgpu.kind in ("uuid", "vf") or backend.pci_function):
        return {}  # an NVIDIA VF's type is released whenever QEMU ends, so that another VM may have the VF
    return {"VGPUCTL_RELEASE_VM": prepared.spec.name, "VGPUCTL_PYTHON": sys.executable,
            "VGPUCTL_RELEASE_ROOT": str(root.root), "VGPUCTL_RELEASE_STATE": str(state.path)}


def _preflight(root: HostRoot, state: StateDir, prepared: Prepared, paths: RuntimePaths) -> None:
    problems = list(paths.socket_problems())
    for requirement in check_requirements(root, prepared.spec):
        if requirement.met is False:
            problems.append(requirement.describe())
    vgpu = prepared.vgpu
    if vgpu is not None:
        holder = _running_vgpus(state, prepared.spec.name).get(vgpu.uuid)
        if holder:
            problems.append(f"vGPU {vgpu.uuid} is in use by VM {holder}; a vGPU serves one VM at a time")
        problems += _vf_problems(root, prepared)
    if not os.path.exists(prepared.command.argv[0]) and "/" in prepared.command.argv[0]:
        problems.append(f"QEMU {prepared.command.argv[0]} not found: apt-get install qemu-system-x86")
    else:
        problems += _display_problems(state, prepared.command.argv[0], prepared.spec.display.backend)
    if prepared.spec.tpm and _which("swtpm") is None:
        problems.append(SWTPM_MISSING)
    if problems:
        raise VmError(f"VM {prepared.spec.name} cannot start: " + "; ".join(problems))


def _vf_problems(root: HostRoot, prepared: Prepared) -> list[str]:
    """An SR-IOV VF: on a VFIO driver (not the host's i915/xe), and asked for no display of its own."""
    vgpu = prepared.vgpu
    if vgpu is None or not vgpu.backend.pci_function:
        return []
    from vgpuctl.backends import sriov_intel
    from vgpuctl.host.pci import read_function

    problems = []
    if prepared.spec.vgpu_display and vgpu.backend.no_display:
        problems.append(f"vgpu_display = true: {vgpu.backend.no_display}; set vgpu_display = false")
    driver = read_function(root, vgpu.uuid).driver
    if sriov_intel.BACKEND.claims_type(vgpu.type_id) and driver not in sriov_intel.VFIO_DRIVERS:
        problems.append(f"VF {vgpu.uuid} is bound to {driver or 'no driver'}, not to vfio-pci: QEMU cannot open it "
                        f"('vgpuctl vfs enable {vgpu.parent} N' binds the VFs)")
    return problems


# Where a display backend QEMU lacks comes from (Debian; other distributions split QEMU's modules alike).
_BACKEND_PACKAGES = {"gtk": "qemu-system-gui", "sdl": "qemu-system-gui", "spice": "qemu-system-modules-spice",
                     "egl-headless": "qemu-system-modules-opengl", "dbus": "qemu-system-modules-opengl"}


def _display_problems(state: StateDir, qemu: str, backend: str) -> list[str]:
    """The display backend must be one this QEMU has (its UI modules are separate packages)."""
    if backend == "none":
        return []
    capabilities = qemu_displays(state, qemu)
    if capabilities is None or backend in capabilities["available"]:
        return []
    package = _BACKEND_PACKAGES.get(backend)
    return [f"display backend {backend} is not available in {qemu} (QEMU {capabilities['version']}; it has "
            f"{', '.join(capabilities['available']) or 'none'})"
            + (f": apt-get install {package}, or choose another with 'vgpuctl vm edit --display'" if package
               else "")]


def qemu_displays(state: StateDir, qemu: str) -> dict[str, Any] | None:
    """The display backends ``qemu`` has (``{"version", "available"}``), asked of the binary with
    vgpuctl.host.qemu's probe, once per binary and boot; None if it cannot tell."""
    def probe() -> dict[str, Any] | None:
        from vgpuctl.host.qemu import probe_qemu

        report = probe_qemu(qemu)
        if report.version is None or not report.displays:
            return None  # not a QEMU we can read: the start will say what QEMU says
        available = [d for d in report.displays if d not in ("none", "spice-app", "curses")]
        available += [name for name, present in (("vnc", report.vnc), ("spice", report.spice)) if present]
        return {"version": report.version, "available": sorted(available)}

    return _cached_probe(state, "qemu-probe.json", qemu, probe)


def _make_nvram(spec: VmSpec, paths: RuntimePaths) -> None:
    """The VM's own copy of OVMF's variables, made from the template at its first start (then the guest's)."""
    if spec.firmware != "ovmf":
        return
    template, copy = machine.ovmf(spec)[1], machine.nvram(spec, paths)
    if not copy.exists():
        try:
            import shutil  # shutil imports bz2 and lzma: only for a VM that needs it

            shutil.copyfile(template, copy)
        except OSError as e:
            raise VmError(f"could not copy OVMF's variables {template} to {copy}: {e} (apt-get install ovmf)") from None


def _make_disks(spec: VmSpec) -> None:
    for disk in spec.disks:
        if os.path.exists(disk.path) or not disk.size:
            continue
        done = subprocess.run(["qemu-img", "create", "-q", "-f", disk.format, disk.path, disk.size],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise VmError(f"could not create disk {disk.path}: {done.stderr.strip()} (apt-get install qemu-utils)")


SWTPM_MISSING = ("the TPM needs swtpm, which is not installed: apt-get install swtpm swtpm-tools; or turn the "
                 "TPM off with 'vgpuctl vm edit --no-tpm' (Windows 11's installer then needs its TPM check bypassed)")


@contextlib.contextmanager
def _tpm_emulator(state: StateDir, name: str, spec: VmSpec) -> Iterator[None]:
    """The VM's swtpm, started for the QEMU launched inside; ended again if the start fails before a QEMU
    runs (with ``--terminate`` swtpm ends when QEMU closes its connection, but only once QEMU has made one)."""
    if not spec.tpm:
        yield
        return
    # One a killed start left (its lock on the state dir would refuse a second swtpm), or the last QEMU's,
    # given a moment to finish writing the TPM's state after that QEMU's end.
    end_swtpm(state, name, grace_s=1.0)
    _start_swtpm(RuntimePaths.for_vm(state, name))
    crashpoint("vm-start:swtpm-started")
    try:
        yield
    except BaseException:
        if vm_processes(state, name).qemu is None:
            end_swtpm(state, name)
        raise


def swtpm_argv(binary: str, paths: RuntimePaths) -> list[str]:
    """swtpm as libvirt runs it for QEMU's emulator backend (man swtpm; QEMU's docs/specs/tpm.rst): the
    control channel only (QEMU passes the data channel over it), ``--terminate`` so that it ends with
    QEMU's connection, ``--daemon`` so that the command returns once the socket listens, and its pidfile
    and log in the VM's runtime directory (the pidfile's path is how vgpuctl finds it in /proc)."""
    return [binary, "socket", "--tpm2",
            "--tpmstate", f"dir={paths.tpm_state},mode=0600",
            "--ctrl", f"type=unixio,path={paths.swtpm_socket},mode=0600",
            "--pid", f"file={paths.swtpm_pidfile}", "--log", f"file={paths.swtpm_log}",
            "--terminate", "--daemon"]


def _start_swtpm(paths: RuntimePaths) -> None:
    """Start the VM's swtpm and return once its control socket listens."""
    binary = _which("swtpm")
    if binary is None:
        raise VmError(SWTPM_MISSING)
    if "," in str(paths.directory):  # swtpm's options are comma-separated, without an escape
        raise VmError(f"swtpm cannot take the path {paths.directory} (a comma): use another --state-dir")
    paths.tpm_state.mkdir(mode=0o700, exist_ok=True)  # the guest's keys (BitLocker, Windows Hello): kept
    for stale in (paths.swtpm_socket, paths.swtpm_pidfile):
        stale.unlink(missing_ok=True)
    # With --daemon the command we run exits after swtpm has bound and listens on the control socket (the
    # daemon carries on): its exit is the condition to wait for, not the socket file's appearance.
    try:
        done = subprocess.run(swtpm_argv(binary, paths), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=SWTPM_TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise VmError(f"swtpm did not start within {SWTPM_TIMEOUT_S:g} s; see {paths.swtpm_log}") from None
    if done.returncode != 0 or not paths.swtpm_socket.is_socket():
        said = (done.stderr or done.stdout).strip() or _swtpm_log_tail(paths) or f"exit status {done.returncode}"
        raise VmError(f"swtpm did not start: {said} (see {paths.swtpm_log})")


def _swtpm_log_tail(paths: RuntimePaths) -> str:
    try:
        return " / ".join(paths.swtpm_log.read_text(errors="replace").splitlines()[-3:])
    except OSError:
        return ""


def end_swtpm(state: StateDir, name: str, grace_s: float = 0.0) -> int:
    """End the VM's swtpm processes (found in /proc by their pidfile's path: whatever the state files say),
    after ``grace_s`` for them to end by themselves (QEMU gone: ``--terminate``). Returns how many were killed."""
    found = swtpm_processes(state, name)
    deadline = time.monotonic() + grace_s
    while found and time.monotonic() < deadline:
        time.sleep(0.01)
        found = [p for p in found if p.alive()]
    for swtpm in found:
        _kill(swtpm)
    for swtpm in found:
        _wait_gone(swtpm, 5.0)
    return len(found)


def listen_qmp(path: Path) -> int:
    """A listening socket (its file descriptor) for QEMU's monitor, bound before QEMU starts, as
    libvirt does: vgpuctl connects at once and QEMU greets as soon as its monitor runs — no polling
    for the socket file, no retry delays. QEMU inherits it; close this process's copy once it has.
    """
    import _socket  # the C module: `socket` (its enums, selectors) costs ~2 ms more before QEMU starts

    path.unlink(missing_ok=True)
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener.detach()


def preopened_qmp_argv(argv: list[str], fd: int) -> list[str]:
    """``argv`` with its ``-qmp unix:...`` replaced by the pre-opened listening socket ``fd``."""
    at = argv.index("-qmp")
    return [*argv[:at], "-chardev", f"socket,id=vgpuctl-qmp,fd={fd},server=on,wait=off",
            "-mon", "chardev=vgpuctl-qmp,mode=control", *argv[at + 2:]]


def wait_running(qmp_socket: Path, exited: Callable[[], bool], timeout_s: float, timeout_message: str) -> None:
    """Connect to a QEMU that is starting and return once QMP reports ``running``.

    ``exited`` is asked every few ms while QEMU has not answered; it raises (or returns True) when
    QEMU is gone. One connection for the whole wait: with a pre-opened socket the connection waits
    in the listen backlog until QEMU's monitor greets.
    """
    import asyncio

    async def wait() -> None:
        client = QmpClient(qmp_socket, timeout=None)  # bounded below, as a whole
        connect = asyncio.ensure_future(client.connect())
        try:
            while not connect.done():
                if exited():
                    raise VmError("QEMU exited at start")
                await asyncio.wait([connect], timeout=0.01)
            connect.result()
            while True:  # without -S the first answer is "running"; "prelaunch"/"inmigrate" pass soon
                if await client.query_status() == "running":
                    return
                await asyncio.sleep(0.005)
        finally:
            connect.cancel()
            await client.close()

    async def bounded() -> None:
        try:
            await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            raise VmError(timeout_message) from None

    try:
        asyncio.run(bounded())
    except QmpError as error:  # QEMU closed the socket: it is gone, or going
        deadline = time.monotonic() + 1.0  # its shell records the exit status just after
        while time.monotonic() < deadline:
            if exited():
                break
            time.sleep(0.01)
        raise VmError(f"QMP of the starting QEMU failed: {error.desc}") from error


def _exited_at_start(paths: RuntimePaths, exit_file: Path, name: str) -> bool:
    if exit_file.exists():
        tail = "\n  ".join(_log_tail(paths))
        raise VmError(f"QEMU for VM {name} exited at start:\n  {tail}")
    return False


def status(root: HostRoot, state: StateDir, name: str, *, qmp_status: str | None = None,
           processes: VmProcesses | None = None, guest: bool = False) -> VmStatus:
    """The VM's QEMU as found in /proc (whatever the state files say) and asked through QMP; a vanished QEMU
    is told from a guest power-off by the exit status its shell left.

    ``qmp_status``: what QMP has just said, when the caller has asked (a start); saves a round trip.
    ``processes``: the VM's processes, when the caller has just looked (a listing: one pass for all VMs).
    ``guest``: also ask the guest agent what runs inside (a round trip to the guest: not for listings).
    """
    if not specs.exists(state, name):
        raise NotFound(f"no VM {name!r}; 'vgpuctl vm list' shows the VMs")
    paths = RuntimePaths.for_vm(state, name)
    run = _read_run(paths)
    found = processes if processes is not None else _processes(state, name, run)
    result = VmStatus(name, "stopped", accel=run.get("accel"), vgpu=run.get("vgpu"),
                      simulated_display=run.get("simulated_display"))
    if found.qemu is not None:
        result.pid = found.qemu.pid
        result.qmp_status = qmp_status or _qmp_status(paths)
        result.state = {"running": "running", "paused": "paused", "shutdown": "shutdown",
                        None: "running"}.get(result.qmp_status, result.qmp_status or "running")
        result.console = _console(paths)
        started = process_started_at(found.qemu.pid)
        result.uptime_s = round(time.time() - started, 1) if started is not None else None
        if guest:
            result.guest = _guest_facts(state, name, paths)
        if not run:
            result.detail = "vgpuctl has no record of this run (its start was interrupted)"
        return result
    # A shell without QEMU: QEMU is starting, unless it has been seen running (then it has just ended and
    # the shell is about to record how: _exit_status waits for that).
    if found.shells and not run.get("qemu") and not (run and _exit_file(paths, run).exists()):
        result.state, result.detail = "starting", "QEMU is starting (or has just ended)"
        return result
    if not run:
        return result
    if "shell" not in run and "shell_pid" not in run and not _exit_file(paths, run).exists():
        result.detail = "a start was interrupted before QEMU ran"
        return result
    code = _exit_status(paths, run)
    if code == 0:
        result.detail = "the guest powered off"
    else:
        result.state = "crashed"
        result.detail = f"QEMU ended with status {code}" if code >= 0 else "QEMU is gone without an exit status"
        result.log_tail = _log_tail(paths)
    return result


def _exit_status(paths: RuntimePaths, run: dict[str, Any], wait_s: float = 1.0) -> int:
    """QEMU's exit status as its shell recorded it; -1 if there is none (the shell died too)."""
    deadline = time.monotonic() + wait_s  # the shell writes it just after QEMU is gone
    while True:
        try:
            text = _exit_file(paths, run).read_text().strip()
            if text:
                return int(text)
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            return -1
        time.sleep(0.01)


def _guest_facts(state: StateDir, name: str, paths: RuntimePaths) -> dict[str, Any]:
    if not specs.load(state, name).guest_agent:
        return {"agent": False, "detail": "no guest agent: the VM has no agent channel (vm edit --guest-agent)"}
    from vgpuctl.vm.agent import guest_facts

    return guest_facts(paths.agent_socket)


def _console(paths: RuntimePaths) -> dict[str, str]:
    found = {"qmp": str(paths.qmp_socket), "serial_log": str(paths.serial_log)}
    if paths.serial_socket.exists():  # the guest's serial console, interactive (e.g. socat - UNIX:...)
        found["serial"] = f"unix:{paths.serial_socket}"
    if paths.vnc_socket.exists():
        found["vnc"] = f"unix:{paths.vnc_socket}"
    if paths.spice_socket.exists():
        found["spice"] = f"unix:{paths.spice_socket}"
    return found


def stop(root: HostRoot, state: StateDir, name: str, *, timeout_s: float = STOP_TIMEOUT_S) -> VmStatus:
    """ACPI power button, then ``quit`` if the guest has not powered off within the timeout."""
    paths = RuntimePaths.for_vm(state, name)
    with vm_lock(state, name):
        crashpoint("vm-stop:locked")
        current, qemu = _settled(root, state, name)
        if qemu is None:
            return _not_running(state, name, current)
        if current.state == "running":
            if not _agent_shutdown(state, name, paths):  # the guest agent, else the ACPI power button
                _try_qmp(qmp_commands.system_powerdown, paths)
            crashpoint("vm-stop:powerdown-sent")
            if _wait_gone(qemu, timeout_s):
                return _finish(state, name, "the guest powered off", "stop")
        _try_qmp(qmp_commands.quit, paths)
        crashpoint("vm-stop:quit-sent")
        how = "QEMU quit" if current.state != "running" else f"no power-off within {timeout_s:g} s: QEMU quit"
        if not _wait_gone(qemu, 5.0):
            _kill(qemu)
            _wait_gone(qemu, 5.0)
            how = "QEMU did not quit: killed"
        return _finish(state, name, how, "stop")


def kill(root: HostRoot, state: StateDir, name: str) -> VmStatus:
    with vm_lock(state, name):
        crashpoint("vm-kill:locked")
        current, qemu = _settled(root, state, name)
        if qemu is None:
            return _not_running(state, name, current)
        _kill(qemu)
        crashpoint("vm-kill:killed")
        _wait_gone(qemu, 5.0)
        return _finish(state, name, "killed", "kill")


def _not_running(state: StateDir, name: str, current: VmStatus) -> VmStatus:
    """A stop or kill of a VM without QEMU: it still ends a swtpm that a killed start left; else Conflict."""
    if end_swtpm(state, name):
        return VmStatus(name, current.state, detail="QEMU was not running: ended the swtpm a start left")
    raise Conflict(f"VM {name} is not running ({current.state})")


def _settled(root: HostRoot, state: StateDir, name: str, timeout_s: float = 5.0) -> tuple[VmStatus, Process | None]:
    """The VM's status and QEMU, once a shell that is about to run QEMU (or has just seen it end) is past
    that: a stop or kill must reach a QEMU that a killed start left starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = status(root, state, name)
        if current.state != "starting" or time.monotonic() > deadline:
            return current, _processes(state, name).qemu if current.pid is not None else None
        time.sleep(0.01)


def _kill(qemu: Process) -> None:
    """SIGKILL to exactly this process: through a pidfd taken while its start time still matches."""
    try:
        pidfd = os.pidfd_open(qemu.pid)
    except ProcessLookupError:
        return
    try:
        if qemu.alive():
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _agent_shutdown(state: StateDir, name: str, paths: RuntimePaths) -> bool:
    """A clean shutdown through the guest agent, where the VM has its channel and an agent takes it."""
    try:
        wanted = specs.load(state, name).guest_agent
    except VgpuError:
        return False
    if not wanted or not paths.agent_socket.exists():
        return False
    from vgpuctl.vm.agent import shutdown

    return shutdown(paths.agent_socket)


def _try_qmp(command: Callable[[Path], None], paths: RuntimePaths) -> None:
    with contextlib.suppress(QmpError):  # QEMU may go away before it answers: that is the goal
        command(paths.qmp_socket)


def _wait_gone(qemu: Process, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while qemu.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _finish(state: StateDir, name: str, how: str, command: str) -> VmStatus:
    """After a stop or kill asked for by the user: once QEMU's shell is gone too (it records the exit status,
    then may hand over to 'vm release-vgpu'), forget the run (the vGPU stays for the next start)."""
    paths = RuntimePaths.for_vm(state, name)
    deadline = time.monotonic() + 5.0
    while vm_processes(state, name).any and time.monotonic() < deadline:
        time.sleep(0.01)
    end_swtpm(state, name, grace_s=1.0)  # it ends by itself once QEMU's connection closes (--terminate)
    crashpoint(f"vm-{command}:gone")
    _run_file(paths).unlink(missing_ok=True)
    paths.pidfile.unlink(missing_ok=True)
    return VmStatus(name, "stopped", detail=how)


def release_vgpu(root: HostRoot, state: StateDir, name: str) -> str | None:
    """Remove the vGPU vgpuctl created for this VM (a stopped VM only). Returns its UUID, if any."""
    with vm_lock(state, name):  # not while a start of this VM is creating or reusing it
        return release_vgpu_locked(root, state, name)


def release_vgpu_locked(root: HostRoot, state: StateDir, name: str) -> str | None:
    """:func:`release_vgpu` for a caller that holds the VM's lock (``vm rm``)."""
    from vgpuctl.mdev.lifecycle import Manager
    from vgpuctl.mdev.sysfs import active_device
    from vgpuctl.vm.runtime import vm_vgpu_uuid

    if _occupied(status(root, state, name)):
        raise Conflict(f"VM {name} runs; stop it before releasing its vGPU")
    vf_file = _vf_file(RuntimePaths.for_vm(state, name))
    try:
        held = json.loads(vf_file.read_text())
    except (OSError, ValueError):
        held = None
    if isinstance(held, dict) and held.get("vf") and held.get("type"):
        from vgpuctl.backends import backend_for_type

        # a VF: its type back to none (NVIDIA, with the EPERM retry)
        backend_for_type(str(held["type"])).release(root, str(held["vf"]))
        vf_file.unlink(missing_ok=True)
        return str(held["vf"])
    uuid = vm_vgpu_uuid(name)
    if active_device(root, uuid) is None:
        return None
    Manager(root, state).remove(uuid)
    return uuid


def screenshot(root: HostRoot, state: StateDir, name: str, target: Path) -> Path:
    """The VM's display as a PNG (QMP screendump)."""
    paths = RuntimePaths.for_vm(state, name)
    if status(root, state, name).pid is None:
        raise Conflict(f"VM {name} is not running")
    target = target.absolute()
    try:
        qmp_commands.screendump(paths.qmp_socket, target, "png")
    except QmpError as e:
        raise KernelError(f"screendump failed: {e.desc}") from None
    return target


def _which(program: str) -> str | None:
    import shutil  # shutil imports bz2 and lzma: only for a VM that needs it

    return shutil.which(program)
