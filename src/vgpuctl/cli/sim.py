"""``vgpuctl sim ...`` and ``vgpuctl demo``: the simulated host."""

from __future__ import annotations

from pathlib import Path

import click

from vgpuctl.cli.app import die, out, say


@click.group("sim")
def sim_group() -> None:
    """Simulated vGPU hosts, mounted as real filesystems (no GPU needed)."""


@sim_group.command("presets")
def sim_presets() -> None:
    """List the simulated host presets, a line each."""
    from vgpuctl.sim.presets import PRESETS

    for name, spec in PRESETS.items():
        say(f"{name:16} {spec.description}")


@sim_group.command("mount")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--preset", default="coffeelake", show_default=True, help="Preset name (see 'vgpuctl sim presets').")
@click.option("--kernel", help="Kernel release, e.g. 6.8.0 or 4.10.10.")
@click.option("--pci-id", help="GPU PCI id at 00:02.0, e.g. 8086:3e92.")
@click.option("--aperture", type=int, help="BIOS aperture in MiB: 128/256/512/1024/2048.")
@click.option("--cmdline", help="Whole kernel command line (/proc/cmdline).")
@click.option("--modules", help="Comma-separated loaded modules (/proc/modules).")
@click.option("--kconfig", multiple=True, help="Kconfig override, e.g. CONFIG_VFIO_MDEV=n (repeatable).")
@click.option("--defer", help="Comma-separated modules not loaded at boot, e.g. kvmgt; "
              "load them later with 'sim ctl DIR load kvmgt'.")
@click.option("--no-virt", is_flag=True, help="VT-x/AMD-V off in the firmware: no vmx/svm, no kvm_intel, no /dev/kvm.")
@click.option("--kconfig-file", type=click.Choice(["boot", "proc", "none"]),
              help="Where the kernel config is: /boot/config-<release> (default), /proc/config.gz, or neither.")
def sim_mount(directory: Path, preset: str, kernel: str | None, pci_id: str | None, aperture: int | None,
              cmdline: str | None, modules: str | None, kconfig: tuple[str, ...], defer: str | None,
              no_virt: bool, kconfig_file: str | None) -> None:
    """Mount a simulated host at DIRECTORY and keep serving it in the background."""
    from vgpuctl.sim import mount
    from vgpuctl.sim.host import SimHost
    from vgpuctl.sim.presets import preset as find_preset

    try:
        spec = find_preset(preset).with_overrides(
            kernel=kernel, pci_id=pci_id, aperture_mib=aperture, cmdline=cmdline,
            modules=modules.split(",") if modules is not None else None, kconfig=list(kconfig),
            defer=defer.split(",") if defer is not None else None,
            virt=False if no_virt else None, kconfig_file=kconfig_file,
        )
        SimHost(spec, preset)  # validate in the foreground, where errors can be shown
        pid = mount.mount(spec.to_json(), directory, preset)
    except (ValueError, mount.MountError) as e:
        die(str(e))
    say(f"mounted simulated host '{preset}' at {directory.absolute()} (server pid {pid})")


@sim_group.command("umount")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--lazy", is_flag=True, help="Detach now even if busy; finish when no longer used.")
def sim_umount(directory: Path, lazy: bool) -> None:
    """Unmount a simulated host and stop its server."""
    from vgpuctl.sim import mount

    try:
        mount.umount(directory, lazy=lazy)
    except mount.MountError as e:
        die(str(e))
    say(f"unmounted {directory.absolute()}")


@sim_group.command("ctl")
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("command", nargs=-1, required=True)
def sim_ctl(directory: Path, command: tuple[str, ...]) -> None:
    """Send COMMAND to a mounted simulated host (reboot, modprobe, rmmod, udevadm trigger); show its uevents.

    COMMAND is one of: reboot, reboot defer=MODULE,... (e.g. defer=kvmgt), load MODULE, unload MODULE,
    trigger (udevadm trigger: add), trigger change. reboot drops every vGPU and boots without the
    deferred modules (/etc stays); load kvmgt then registers GVT-g.
    """
    import errno

    from vgpuctl.host import HostRoot
    from vgpuctl.sim.host import SIM_CONTROL, SIM_UEVENTS

    root = HostRoot(directory)
    try:
        info = root.simulation()
    except OSError:
        info = None
    if info is None:
        die(f"no simulated host is mounted at {directory.absolute()} (run 'vgpuctl sim mount' first)")
    text = " ".join(command)
    words = text.split()
    module = words[1] if len(words) > 1 else ""
    seen = _last_seqnum(root.read_text(SIM_UEVENTS))
    try:
        root.write_text(SIM_CONTROL, text + "\n")
    except OSError as e:
        not_loaded = ", ".join(info.get("not_loaded", [])) or "none"
        reasons = {
            errno.EINVAL: f"the simulator does not understand {text!r} (see 'vgpuctl sim ctl --help')",
            errno.ENOENT: (f"{module} is neither loaded nor deferred on this host: only modules held back at boot "
                           f"can be loaded (not loaded now: {not_loaded})") if words[:1] == ["load"]
                          else f"{module} is not loaded",
            errno.ENODEV: f"modprobe {module}: No such device (i915 did not start GVT-g; kernels up to 5.18 "
                          "then refuse to load kvmgt)",
        }
        die(reasons.get(e.errno or 0, f"{text!r} failed: {e.strerror}"))
    after = root.simulation() or {}
    events = root.read_text(SIM_UEVENTS).splitlines()
    if after.get("boot") == info.get("boot"):  # a reboot starts counting again
        events = [line for line in events if _last_seqnum(line) > seen]
    not_loaded = ", ".join(after.get("not_loaded", [])) or "none"
    say(f"{text}: done (boot {after.get('boot')}; modules not loaded: {not_loaded})")
    for line in events:
        say(f"  uevent {line}")


def _last_seqnum(text: str) -> int:
    lines = text.splitlines()
    return int(lines[-1].rsplit("SEQNUM=", 1)[1]) if lines else 0


@click.command()
@click.option("--preset", default="coffeelake", show_default=True, help="Preset to tour.")
@click.option("--aperture", type=int, default=1024, show_default=True, help="BIOS aperture in MiB.")
@click.option("--serve", is_flag=True, help="Then serve the dashboard with three VMs until Ctrl-C.")
@click.option("--port", type=click.IntRange(1, 65535), default=8470, show_default=True, help="Port for --serve.")
def demo(preset: str, aperture: int, serve: bool, port: int) -> None:
    """A guided tour on a simulated host: types, create until full, the kernel's error, a VM; then SR-IOV VFs on a
    simulated Alder Lake (enable, a VM on a VF, disable); with --serve,
    the dashboard on a simulated Coffee Lake running three VMs (streaming and automotive), until Ctrl-C."""
    from vgpuctl.demo import run_service_demo, run_sriov_tour, run_tour

    try:
        run_tour(out(), preset, aperture)
        run_sriov_tour(out())
        if serve:
            run_service_demo(out(), preset, aperture, port)
    except Exception as e:  # the tour must always explain itself
        die(f"demo failed: {e}")
