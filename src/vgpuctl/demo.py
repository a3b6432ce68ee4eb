"""``vgpuctl demo``: a guided tour of a simulated GVT-g host, with plain file reads and writes."""

from __future__ import annotations

import tempfile
import uuid as uuidlib
from pathlib import Path

from rich.console import Console

from vgpuctl.host import HostRoot
from vgpuctl.mdev.sysfs import read_types
from vgpuctl.sim import mount
from vgpuctl.sim.presets import preset as find_preset

PARENT = "0000:00:02.0"


def run_tour(out: Console, preset_name: str, aperture_mib: int) -> None:
    spec = find_preset(preset_name).with_overrides(aperture_mib=aperture_mib)
    with tempfile.TemporaryDirectory(prefix="vgpuctl-demo-") as tmp:
        directory = Path(tmp) / "host"
        directory.mkdir()
        out.rule(f"1. Mount a simulated host: {spec.description}")
        pid = mount.mount(spec.to_json(), directory, preset_name)
        out.print(f"$ vgpuctl sim mount --preset {preset_name} --aperture {aperture_mib} {directory}"
                  f"   (server pid {pid})", highlight=False)
        try:
            root = HostRoot(directory)
            _tour(out, root)
        finally:
            out.rule("5. Unmount")
            mount.umount(directory)
            out.print(f"$ vgpuctl sim umount {directory}", highlight=False)


def _tour(out: Console, root: HostRoot) -> None:
    from vgpuctl.cli.vgpus import types_table

    out.print(f"kernel {root.read_value('/proc/sys/kernel/osrelease')}, cmdline: "
              f"{root.read_value('/proc/cmdline')}", highlight=False)
    out.rule("2. The vGPU types the kernel offers (mdev_supported_types)")
    out.print(types_table(read_types(root, PARENT)))
    # The smallest type fits most often: it shows the 7-vGPU limit on a 1 GiB aperture.
    type_id = max(root.listdir(root.mdev_types_dir(PARENT)),
                  key=lambda t: int(root.read_value(f"{root.mdev_type_dir(PARENT, t)}/available_instances")))
    create = f"{root.mdev_type_dir(PARENT, type_id)}/create"
    out.rule(f"3. Create {type_id} vGPUs until the GPU is full")
    created: list[str] = []
    while True:
        new = str(uuidlib.uuid4())
        try:
            root.write_text(create, new)
        except OSError as e:
            out.print(f"$ echo {new} > .../{type_id}/create")
            out.print(f"[bold red]kernel says: {e.strerror} (errno {e.errno})[/] - every pool or vGPU id is "
                      "taken; remove a vGPU or raise the BIOS aperture to make room")
            break
        created.append(new)
        left = root.read_value(f"{root.mdev_type_dir(PARENT, type_id)}/available_instances")
        out.print(f"created vGPU {len(created)}: {new}   available_instances now {left}", highlight=False)
    out.print(types_table(read_types(root, PARENT)))
    out.print(f"/sys/bus/mdev/devices: {', '.join(root.listdir(root.sys_bus_mdev_devices))}", highlight=False)
    out.rule("4. Remove them again")
    for uuid in created:
        root.write_text(f"{root.mdev_device_dir(uuid)}/remove", "1")
        out.print(f"removed {uuid}", highlight=False)
    out.print(types_table(read_types(root, PARENT)))
