"""The QEMU command line for a VM, as libvirt emits it (spec/peers.md §2.1), built without running anything.

``build_command(spec, vgpu, qemu=..., accel=..., runtime_dir=..., simulated=...)`` returns the argv,
the notes a user should see (``vm argv``, ``vm status``) and the VM's :class:`RuntimePaths`;
``build_argv`` is its argv alone. The caller decides everything that needs a probe: the
accelerator (``kvm`` or ``tcg``), whether the host has ``/dev/vhost-net``, whether the host is
simulated, and which vGPU the VM gets (:func:`vgpuctl.vm.runtime.resolve_vgpu`). QEMU is not
daemonized: the lifecycle starts it detached and reads ``paths.pidfile``/``paths.qmp_socket``.

Each device renders its own arguments (:mod:`vgpuctl.vm.devices`, the vGPU's in :mod:`.devices.vgpu`);
this module renders the machine (name, accelerator, CPU, memory, firmware, QMP, the boot order) and
puts the devices' arguments in their places. GVT-g guests get ``-global PIIX4_PM.disable_s3=1 -global
PIIX4_PM.disable_s4=1`` (ICH9-LPC on q35), as in all of Intel's examples.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from vgpuctl.vm import machine
from vgpuctl.vm.devices import KINDS
from vgpuctl.vm.devices.base import QemuContext, options, qemu_value
from vgpuctl.vm.runtime import ResolvedVgpu, RuntimePaths
from vgpuctl.vm.spec import VmSpec, default_mac

ACCELERATORS = ("kvm", "tcg")
BOOT_POSITION = 20  # devices before it (the serial console) come before the boot order on the command line

__all__ = ["ACCELERATORS", "QemuCommand", "RuntimePaths", "build_argv", "build_command", "default_mac",
           "options", "qemu_value"]


@dataclass
class QemuCommand:
    """The QEMU command line of a VM, the files it uses, and notes on choices made for it."""

    argv: list[str]
    paths: RuntimePaths
    notes: list[str] = field(default_factory=list)
    # Simulated host: the vGPU was replaced by an emulated adapter at this resolution.
    replaced_vgpu: tuple[int, int] | None = None

    def shell(self) -> str:
        return shlex.join(self.argv)


def build_argv(spec: VmSpec, vgpu: ResolvedVgpu | None, *, qemu: str, accel: str, runtime_dir: Path,
               simulated: bool, vhost_net: bool = False) -> list[str]:
    return build_command(spec, vgpu, qemu=qemu, accel=accel, runtime_dir=runtime_dir, simulated=simulated,
                         vhost_net=vhost_net).argv


def build_command(spec: VmSpec, vgpu: ResolvedVgpu | None, *, qemu: str, accel: str, runtime_dir: Path,
                  simulated: bool, vhost_net: bool = False) -> QemuCommand:
    """The whole command line. ``vgpu`` must be given exactly when the spec asks for one."""
    spec.validate()
    if accel not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {accel!r}")
    if (vgpu is None) != (spec.vgpu.kind == "none"):
        raise ValueError(f"VM {spec.name} asks for {spec.vgpu.describe()} but the vGPU given is {vgpu}")
    paths = RuntimePaths(Path(runtime_dir))
    command = QemuCommand([qemu], paths)
    argv, notes = command.argv, command.notes
    ctx = QemuContext(spec, vgpu, accel, paths, simulated, vhost_net, notes)
    kinds = sorted(KINDS, key=lambda kind: kind.QEMU_POSITION)

    argv += ["-name", f"guest={spec.name},debug-threads=on"]
    argv += ["-machine", spec.machine + (",smm=on" if spec.secure_boot else ""), "-accel", accel]
    cpu = machine.cpu(spec, accel)
    model, _, flags = cpu.partition(",")
    if accel == "tcg" and model == "host":
        cpu = "max" + (f",{flags}" if flags else "")
        notes.append(f"TCG has no 'host' CPU model: -cpu {cpu} instead of {spec.cpu or 'host'}")
    if spec.hyperv and accel != "kvm":
        notes.append("TCG: no Hyper-V enlightenments (KVM provides them)")
    argv += ["-cpu", cpu, "-m", str(spec.memory_mib), "-smp", str(spec.cpus)]
    if spec.firmware == "ovmf":
        code, _ = machine.ovmf(spec)
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_value(code)}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={qemu_value(str(machine.nvram(spec, paths)))}"]
        if spec.secure_boot:  # only SMM code may write the variables: the guest cannot bypass Secure Boot
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    argv += ["-no-user-config", "-nodefaults", "-msg", "timestamp=on"]
    argv += ["-qmp", f"unix:{qemu_value(str(paths.qmp_socket))},server=on,wait=off"]
    argv += ["-pidfile", str(paths.pidfile)]
    for kind in kinds:
        if kind.QEMU_POSITION < BOOT_POSITION:
            argv += kind.qemu_args(ctx)
    if spec.rtc_localtime:
        argv += ["-rtc", "base=localtime"]
    if not machine.guest_may_sleep(vgpu):
        pm = "PIIX4_PM" if spec.machine == "pc" else "ICH9-LPC"
        argv += ["-global", f"{pm}.disable_s3=1", "-global", f"{pm}.disable_s4=1"]

    order = "".join({"disk": "c", "cdrom": "d"}[device] for device in machine.boot_order(spec))
    boot = [f"order={order}"] if order else []
    if spec.fast_boot:
        boot.append("menu=off")
    if boot:
        argv += ["-boot", ",".join(boot)]
    if spec.boot == "kernel" and spec.kernel:
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.append:
            argv += ["-append", spec.append]

    for kind in kinds:
        if kind.QEMU_POSITION >= BOOT_POSITION:
            argv += kind.qemu_args(ctx)
    argv += spec.extra_args
    command.replaced_vgpu = ctx.replaced_vgpu
    notes += paths.socket_problems()
    return command
