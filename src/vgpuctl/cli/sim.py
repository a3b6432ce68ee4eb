"""``vgpuctl sim ...`` and ``vgpuctl demo``: the simulated host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgpuctl.cli import app, die, out

sim_app = typer.Typer(help="Simulated vGPU hosts, mounted as real filesystems (no GPU needed).",
                      no_args_is_help=True)
app.add_typer(sim_app, name="sim")


@sim_app.command("presets")
def sim_presets() -> None:
    """List the simulated host presets, a line each."""
    from vgpuctl.sim.presets import PRESETS

    for name, spec in PRESETS.items():
        typer.echo(f"{name:16} {spec.description}")


@sim_app.command("mount")
def sim_mount(
    directory: Annotated[Path, typer.Argument(help="Empty directory to mount the host's root on.")],
    preset: Annotated[str, typer.Option(help="Preset name (see 'vgpuctl sim presets').")] = "coffeelake",
    kernel: Annotated[str | None, typer.Option(help="Kernel release, e.g. 6.8.0 or 4.10.10.")] = None,
    pci_id: Annotated[str | None, typer.Option(help="GPU PCI id at 00:02.0, e.g. 8086:3e92.")] = None,
    aperture: Annotated[int | None, typer.Option(help="BIOS aperture in MiB: 128/256/512/1024/2048.")] = None,
    cmdline: Annotated[str | None, typer.Option(help="Whole kernel command line (/proc/cmdline).")] = None,
    modules: Annotated[str | None, typer.Option(help="Comma-separated loaded modules (/proc/modules).")] = None,
    kconfig: Annotated[list[str] | None, typer.Option(help="Kconfig override, e.g. CONFIG_VFIO_MDEV=n.")] = None,
    defer: Annotated[str | None, typer.Option(
        help="Comma-separated modules not loaded at boot, e.g. kvmgt; load them later with 'sim ctl DIR load kvmgt'."
    )] = None,
) -> None:
    """Mount a simulated host at DIRECTORY and keep serving it in the background."""
    from vgpuctl.sim import mount
    from vgpuctl.sim.host import SimHost
    from vgpuctl.sim.presets import preset as find_preset

    try:
        spec = find_preset(preset).with_overrides(
            kernel=kernel, pci_id=pci_id, aperture_mib=aperture, cmdline=cmdline,
            modules=modules.split(",") if modules is not None else None, kconfig=kconfig,
            defer=defer.split(",") if defer is not None else None,
        )
        SimHost(spec, preset)  # validate in the foreground, where errors can be shown
        pid = mount.mount(spec.to_json(), directory, preset)
    except (ValueError, mount.MountError) as e:
        die(str(e))
    out.print(f"mounted simulated host '{preset}' at {directory.absolute()} (server pid {pid})", highlight=False)


@sim_app.command("umount")
def sim_umount(
    directory: Annotated[Path, typer.Argument(help="Where the simulated host is mounted.")],
    lazy: Annotated[bool, typer.Option(help="Detach now even if busy; finish when no longer used.")] = False,
) -> None:
    """Unmount a simulated host and stop its server."""
    from vgpuctl.sim import mount

    try:
        mount.umount(directory, lazy=lazy)
    except mount.MountError as e:
        die(str(e))
    out.print(f"unmounted {directory.absolute()}", highlight=False)


@sim_app.command("ctl")
def sim_ctl(
    directory: Annotated[Path, typer.Argument(help="Where the simulated host is mounted.")],
    command: Annotated[list[str], typer.Argument(
        help="One of: reboot, reboot defer=MODULE,... (e.g. defer=kvmgt), load MODULE, unload MODULE, "
             "trigger (udevadm trigger: add), trigger change.", show_default=False,
    )],
) -> None:
    """Send a command to a mounted simulated host (reboot, modprobe, rmmod, udevadm trigger); show its uevents.

    reboot drops every vGPU and boots without the deferred modules (/etc stays); load kvmgt then registers GVT-g.
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
    out.print(f"{text}: done (boot {after.get('boot')}; modules not loaded: {not_loaded})", highlight=False)
    for line in events:
        out.print(f"  uevent {line}", highlight=False)


def _last_seqnum(text: str) -> int:
    lines = text.splitlines()
    return int(lines[-1].rsplit("SEQNUM=", 1)[1]) if lines else 0


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="Preset to tour.")] = "coffeelake",
    aperture: Annotated[int, typer.Option(help="BIOS aperture in MiB.")] = 1024,
) -> None:
    """A guided tour on a simulated host: types, create until full, the kernel's error, clean up."""
    from vgpuctl.demo import run_tour

    try:
        run_tour(out, preset, aperture)
    except Exception as e:  # the tour must always explain itself
        die(f"demo failed: {e}")
