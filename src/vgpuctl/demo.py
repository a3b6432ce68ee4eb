"""``vgpuctl demo``: a guided tour of a simulated GVT-g host, then of a simulated SR-IOV host (Alder Lake with
i915-sriov-dkms), with plain file reads and writes where a user would make them."""

from __future__ import annotations

import tempfile
import uuid as uuidlib
from pathlib import Path
from typing import Any

from rich.console import Console

from vgpuctl.base.state import StateDir
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
            _vm_tour(out, root, StateDir(Path(tmp) / "state"))
        finally:
            out.rule("6. Unmount")
            mount.umount(directory)
            out.print(f"$ vgpuctl sim umount {directory}", highlight=False)


SRIOV_PRESET = "adl-sriov"


def run_sriov_tour(out: Console, preset_name: str = SRIOV_PRESET) -> None:
    """Today's Intel vGPUs: SR-IOV VFs of an Alder Lake iGPU, enabled, given to vfio-pci, a VM on one."""
    spec = find_preset(preset_name)
    with tempfile.TemporaryDirectory(prefix="vgpuctl-demo-") as tmp:
        directory = Path(tmp) / "host"
        directory.mkdir()
        out.rule(f"7. An SR-IOV host: {spec.description}")
        mount.mount(spec.to_json(), directory, preset_name)
        out.print(f"$ vgpuctl sim mount --preset {preset_name} {directory}", highlight=False)
        try:
            _sriov_tour(out, HostRoot(directory), StateDir(Path(tmp) / "state"))
        finally:
            mount.umount(directory)
            out.print(f"$ vgpuctl sim umount {directory}", highlight=False)


def _sriov_tour(out: Console, root: HostRoot, state: StateDir) -> None:
    from vgpuctl.backends import sriov_intel
    from vgpuctl.base.errors import VgpuError
    from vgpuctl.vm import lifecycle, profiles
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.devices.vgpu import VgpuRequest
    from vgpuctl.vm.inventory import vf_listing
    from vgpuctl.vm.testguest import build_test_guest

    pf = sriov_intel.intel_pfs(root)[0]
    base = root.pci_device(pf.address)
    total = root.read_value(f"{base}/sriov_totalvfs")
    out.print(f"{pf.address} under {pf.driver}: sriov_totalvfs {total}, sriov_numvfs "
              f"{root.read_value(f'{base}/sriov_numvfs')}", highlight=False)
    try:
        root.write_text(f"{base}/sriov_numvfs", str(int(total) + 1))
    except OSError as e:
        out.print(f"$ echo {int(total) + 1} > {base}/sriov_numvfs")
        out.print(f"[bold red]kernel says: {e.strerror} (errno {e.errno})[/] - more VFs than sriov_totalvfs")
    try:
        sriov_intel.enable(root, state, pf.address, 2)
    except VgpuError as e:
        out.print(f"[bold red]vgpuctl vfs enable failed: {e}[/]")
        return
    out.rule("8. vgpuctl vfs enable: two VFs, each given to vfio-pci by driver_override")
    out.print(f"$ vgpuctl vfs enable {pf.address} 2", highlight=False)
    _print_vfs(out, vf_listing(root, state))
    out.rule("9. A VM on a VF (QEMU: vfio-pci,host=<VF>; simulated here by an emulated adapter)")
    vm = profiles.new_spec("demo-vf", "automotive")
    vm.kernel, vm.boot, vm.memory_mib, vm.cpus = str(build_test_guest()), "kernel", 64, 1
    vm.vgpu, vm.vgpu_display, vm.ramfb = VgpuRequest(vf=pf.address), False, False
    vm.display.backend = "vnc"  # no local window on a server
    specs.save(state, vm, new=True)
    status = lifecycle.start(root, state, "demo-vf")
    try:
        out.print(f"$ vgpuctl vm start demo-vf   -> {status.state} under {status.accel}, VF {status.vgpu}",
                  highlight=False)
        _print_vfs(out, vf_listing(root, state))
    finally:
        stopped = lifecycle.stop(root, state, "demo-vf", timeout_s=10)
        out.print(f"$ vgpuctl vm stop demo-vf   -> {stopped.state}", highlight=False)
    sriov_intel.disable(root, state, pf.address)
    out.print(f"$ vgpuctl vfs disable {pf.address}   -> sriov_numvfs "
              f"{root.read_value(f'{base}/sriov_numvfs')}", highlight=False)


def _tour(out: Console, root: HostRoot) -> None:
    from vgpuctl.cli.vgpus import types_table

    out.print(f"kernel {root.read_value(root.proc_osrelease)}, cmdline: {root.read_value(root.proc_cmdline)}",
              highlight=False)
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
    out.print(f"{root.sys_bus_mdev_devices}: {', '.join(root.listdir(root.sys_bus_mdev_devices))}", highlight=False)
    out.rule("4. Remove them again")
    for uuid in created:
        root.write_text(f"{root.mdev_device_dir(uuid)}/remove", "1")
        out.print(f"removed {uuid}", highlight=False)
    out.print(types_table(read_types(root, PARENT)))


def _vm_tour(out: Console, root: HostRoot, state: StateDir) -> None:
    """A VM on a vGPU: the project's test guest under QEMU (TCG where KVM cannot run guests)."""
    from vgpuctl.vm import lifecycle, profiles, qmp
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.runtime import RuntimePaths
    from vgpuctl.vm.testguest import build_test_guest

    out.rule("5. A VM on a vGPU (streaming profile, the test guest)")
    spec = profiles.new_spec("demo", "streaming")
    spec.kernel, spec.boot, spec.memory_mib, spec.cpus = str(build_test_guest()), "kernel", 64, 1
    specs.save(state, spec, new=True)
    status = lifecycle.start(root, state, "demo")
    out.print(f"$ vgpuctl vm start demo   -> {status.state} under {status.accel}, vGPU {status.vgpu}", highlight=False)
    if status.simulated_display:
        out.print(f"  (simulated host: {status.simulated_display} stands in for the vGPU)", highlight=False)
    try:
        import time

        time.sleep(0.5)  # let the guest draw a frame or two
        shot = lifecycle.screenshot(root, state, "demo", state.path / "demo.png")
        qmp.send_key(RuntimePaths.for_vm(state, "demo").qmp_socket, ["a"])
        out.print(f"$ vgpuctl vm screenshot demo {shot}   ({shot.stat().st_size} bytes); a key press recolours it",
                  highlight=False)
    finally:
        stopped = lifecycle.stop(root, state, "demo", timeout_s=10)
        out.print(f"$ vgpuctl vm stop demo   -> {stopped.state} (ACPI power button)", highlight=False)


DEMO_VMS = (("stream1", "streaming"), ("car1", "automotive"), ("car2", "automotive"))


def run_service_demo(out: Console, preset_name: str, aperture_mib: int, port: int) -> None:
    """The main job: a simulated host, three VMs on its vGPUs, and the service, until Ctrl-C; then clean up."""
    from vgpuctl.cli.serve import run_service
    from vgpuctl.vm import lifecycle, profiles
    from vgpuctl.vm import spec as specs
    from vgpuctl.vm.linuxguest import build_linux_guest, kernel_cmdline
    from vgpuctl.vm.testguest import build_test_guest

    spec = find_preset(preset_name).with_overrides(aperture_mib=aperture_mib)
    guest = str(build_test_guest())
    linux = build_linux_guest()  # the streaming VM runs a real OS: Debian's kernel with a busybox userland
    # Short paths: the VMs' QMP and VNC sockets must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="vgd-") as tmp:
        directory, state = Path(tmp) / "host", StateDir(Path(tmp) / "s")
        directory.mkdir()
        out.rule("The service: a simulated Coffee Lake with three VMs")
        mount.mount(spec.to_json(), directory, preset_name)
        root = HostRoot(directory)
        try:
            for name, profile in DEMO_VMS:
                vm = profiles.new_spec(name, profile)
                if profile == "streaming":  # a Linux console on its screen, a shell that takes the keyboard
                    vm.kernel, vm.initrd, vm.append = str(linux.kernel), str(linux.initrd), kernel_cmdline()
                    vm.boot, vm.memory_mib, vm.cpus, vm.guest_agent = "kernel", 256, 1, True
                else:  # the project's bare-metal test guest: an animation, at once
                    vm.kernel, vm.boot, vm.memory_mib, vm.cpus = guest, "kernel", 64, 1
                vm.display.backend = "vnc"  # the dashboard streams it; no local window on a server
                specs.save(state, vm, new=True)
                status = lifecycle.start(root, state, name)
                out.print(f"VM {name} ({profile}): {status.state} under {status.accel}, vGPU {status.vgpu}",
                          highlight=False)
            out.print("Open the URL below, log in with the token; Ctrl-C stops the VMs and unmounts.",
                      highlight=False)
            run_service(root, state, "127.0.0.1", port, print_token=True)
        finally:
            for name, _ in DEMO_VMS:
                if specs.exists(state, name) and lifecycle.status(root, state, name).pid:
                    lifecycle.kill(root, state, name)
            mount.umount(directory, lazy=True)
            out.print("stopped the VMs and unmounted the simulated host", highlight=False)


def _print_vfs(out: Console, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        for vf in row["vfs"]:
            held = f"VM {vf['vm']}" if vf["vm"] else "free"
            out.print(f"  {vf['address']}  {vf['driver'] or 'no driver'}  {held}", highlight=False)
