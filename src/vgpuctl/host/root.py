"""The one object through which vgpuctl touches a host.

Every host path (``/sys/...``, ``/proc/...``, ``/etc/...``, ``/dev/...``) is written as the
absolute path it has on a real machine and resolved under a root directory, the way mdevctl
injects its environment root. With root ``/`` that is the machine itself; with the mount point
of a simulated host (``vgpuctl sim mount``) it is the simulator.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from vgpuctl.base.errors import InvalidInput

ROOT_ENV = "VGPUCTL_ROOT"
# A file that only a simulated host has: lets a layer know it runs against the simulator
# without importing it.
SIM_MARKER = "/.vgpuctl-sim"


def path_name(name: str, what: str) -> str:
    """``name`` if it is one path component (a parent, a type, an attribute as the user typed it), else an error."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidInput("{what} {value!r} is not a name: it may not be empty, '.' or '..', or hold '/'",
                           what=what, value=name)
    return name


def relative_path(text: str, what: str) -> str:
    """``text`` if it is a path below a directory (an attribute such as ``intel_vgpu/vgpu_id``), else an error."""
    for part in text.split("/"):
        if not part or part in (".", "..") or "\0" in part:
            raise InvalidInput("{what} {value!r} must stay inside its directory: no '..', '.' or empty parts",
                               what=what, value=text)
    return text


@dataclass(frozen=True)
class HostRoot:
    """A host seen through a root directory."""

    root: Path = Path("/")

    @classmethod
    def from_env(cls, root: str | os.PathLike[str] | None = None) -> HostRoot:
        """The root given on the command line, else ``$VGPUCTL_ROOT``, else ``/``."""
        chosen = root if root is not None else os.environ.get(ROOT_ENV) or "/"
        return cls(Path(chosen))

    def path(self, host_path: str | PurePosixPath) -> Path:
        """The local path of ``host_path`` (an absolute path as seen on the host)."""
        text = str(host_path)
        if not text.startswith("/"):
            raise ValueError(f"host paths are absolute, got {text!r}")
        # Confinement: names from user input (parents, attributes, UUIDs) are joined into host paths, and a
        # '..' among them would climb out of the directory meant (and out of the root). No caller needs one.
        if ("/.." in text and ".." in text.split("/")) or "\0" in text:
            raise InvalidInput("{path!r} climbs out of its directory: a name may not be '..' or hold '/'",
                               what="path", path=text)
        return self.root / text.lstrip("/")

    # Small conveniences: sysfs and procfs values are short text files ending in "\n".
    def read_text(self, host_path: str) -> str:
        # os-level calls: sysfs values are small, and this is the hot path of every listing.
        fd = os.open(self.path(host_path), os.O_RDONLY)
        try:
            chunks = [os.read(fd, 65536)]
            while len(chunks[-1]) == 65536:  # large files such as /boot/config-*
                chunks.append(os.read(fd, 65536))
            return b"".join(chunks).decode()
        finally:
            os.close(fd)

    def read_value(self, host_path: str) -> str:
        """A sysfs attribute's value without its trailing newline."""
        return self.read_text(host_path).rstrip("\n")

    def write_text(self, host_path: str, value: str) -> None:
        """Write an attribute in one write() call, as sysfs expects."""
        with open(self.path(host_path), "w") as f:
            f.write(value)

    def exists(self, host_path: str) -> bool:
        return os.path.lexists(self.path(host_path))

    def listdir(self, host_path: str) -> list[str]:
        return sorted(os.listdir(self.path(host_path)))

    def readlink(self, host_path: str) -> str:
        return os.readlink(self.path(host_path))

    # Well-known places, so that no other module spells them out.
    @property
    def sys_bus_pci_devices(self) -> str:
        return "/sys/bus/pci/devices"

    @property
    def sys_bus_mdev_devices(self) -> str:
        return "/sys/bus/mdev/devices"

    @property
    def sys_class_mdev_bus(self) -> str:
        return "/sys/class/mdev_bus"

    @property
    def etc_mdevctl_d(self) -> str:
        return "/etc/mdevctl.d"

    @property
    def etc_systemd_system(self) -> str:
        """Where the administrator's systemd units live (what ``systemctl enable`` links into)."""
        return "/etc/systemd/system"

    @property
    def etc_udev_rules_d(self) -> str:
        return "/etc/udev/rules.d"

    @property
    def run_dir(self) -> str:
        """The runtime tmpfs, there from the first moment of boot (unlike /run/lock)."""
        return "/run"

    @property
    def run_systemd_system(self) -> str:
        """Exists exactly when systemd is the running init (sd_booted())."""
        return "/run/systemd/system"

    @property
    def etc_modules_load_d(self) -> str:
        """Modules systemd-modules-load loads at boot, a name a line."""
        return "/etc/modules-load.d"

    @property
    def etc_modprobe_d(self) -> str:
        """modprobe's configuration (``options MODULE PARAM=VALUE`` ...)."""
        return "/etc/modprobe.d"

    @property
    def proc_cmdline(self) -> str:
        """The command line the running kernel was booted with."""
        return "/proc/cmdline"

    @property
    def proc_osrelease(self) -> str:
        """The running kernel's release (``uname -r``)."""
        return "/proc/sys/kernel/osrelease"

    @property
    def proc_config_gz(self) -> str:
        """The running kernel's own config, where it was built with CONFIG_IKCONFIG_PROC."""
        return "/proc/config.gz"

    @property
    def etc_modules(self) -> str:
        """Debian's list of modules loaded at boot (read by systemd-modules-load there too)."""
        return "/etc/modules"

    @property
    def proc_modules(self) -> str:
        """The modules loaded now, a line each."""
        return "/proc/modules"

    @property
    def proc_cpuinfo(self) -> str:
        return "/proc/cpuinfo"

    @property
    def sys_class_iommu(self) -> str:
        """One entry per active IOMMU unit (dmar0, ...): empty when the IOMMU is off."""
        return "/sys/class/iommu"

    @property
    def dev_kvm(self) -> str:
        return "/dev/kvm"

    @property
    def dev_vfio_container(self) -> str:
        """VFIO's container device, which QEMU opens for every vfio-pci device."""
        return "/dev/vfio/vfio"

    def dev_vfio_group(self, group: str) -> str:
        """An IOMMU group's VFIO device (legacy group interface), which QEMU holds open for a VF it runs."""
        return f"/dev/vfio/{path_name(group, 'IOMMU group')}"

    def dev_vfio_device(self, name: str) -> str:
        """A VFIO device's cdev (iommufd interface), e.g. vfio0."""
        return f"/dev/vfio/devices/{path_name(name, 'VFIO device')}"

    @property
    def proc(self) -> str:
        """The processes (their open files: who holds a VF)."""
        return "/proc"

    @property
    def dev_dri(self) -> str:
        """DRM device nodes (card*, renderD*)."""
        return "/dev/dri"

    @property
    def dev_vhost_net(self) -> str:
        return "/dev/vhost-net"

    @property
    def etc_default_grub(self) -> str:
        return "/etc/default/grub"

    @property
    def etc_default_grub_d(self) -> str:
        """Debian/Ubuntu: sourced after /etc/default/grub."""
        return "/etc/default/grub.d"

    @property
    def grub_configs(self) -> tuple[str, ...]:
        """What grub2-mkconfig and update-grub write (Fedora family, Debian family)."""
        return ("/boot/grub2/grub.cfg", "/boot/grub/grub.cfg")

    @property
    def etc_kernelstub_configuration(self) -> str:
        """Pop!_OS's boot configuration."""
        return "/etc/kernelstub/configuration"

    @property
    def etc_kernel_cmdline(self) -> str:
        """kernel-install's command line for new systemd-boot entries."""
        return "/etc/kernel/cmdline"

    @property
    def boot_loader_bases(self) -> tuple[str, ...]:
        """Where systemd-boot's ESP / XBOOTLDR are mounted."""
        return ("/efi", "/boot", "/boot/efi")

    @property
    def dev_null(self) -> str:
        """What a configuration file is linked to to mask it (modprobe.d, modules-load.d, units)."""
        return "/dev/null"

    @property
    def modprobe_dirs(self) -> tuple[str, ...]:
        """kmod's search path (libkmod-config.c), earlier directories winning a file name."""
        return ("/etc/modprobe.d", "/run/modprobe.d", "/usr/local/lib/modprobe.d", "/usr/lib/modprobe.d",
                "/lib/modprobe.d")

    @property
    def modules_load_dirs(self) -> tuple[str, ...]:
        """systemd-modules-load's search path (modules-load.d(5)), with the same rule."""
        return ("/etc/modules-load.d", "/run/modules-load.d", "/usr/local/lib/modules-load.d",
                "/usr/lib/modules-load.d", "/lib/modules-load.d")

    def pci_device(self, address: str) -> str:
        return f"{self.sys_bus_pci_devices}/{address}"

    def pci_driver(self, driver: str) -> str:
        """A PCI driver's directory (bind, unbind, new_id and a link per bound device)."""
        return f"/sys/bus/pci/drivers/{driver}"

    @property
    def pci_drivers_probe(self) -> str:
        """Writing an address here probes the device again (driver_override decides who takes it)."""
        return "/sys/bus/pci/drivers_probe"

    def sys_module(self, module: str) -> str:
        """A module's sysfs directory: present while it is loaded (or built in with parameters)."""
        return f"/sys/module/{module}"

    def lib_modules(self, release: str) -> str:
        """A kernel's module tree (modules.dep, modules.builtin)."""
        return f"/lib/modules/{release}"

    def module_parameter(self, module: str, name: str) -> str:
        """A loaded module's parameter as it is now (0444 or 0400 files under /sys/module)."""
        return f"{self.sys_module(module)}/parameters/{name}"

    def dkms_module_dirs(self, release: str) -> tuple[str, ...]:
        """Where DKMS installs a kernel's out-of-tree modules (updates/dkms on Debian/Ubuntu/Fedora, extra on
        others); depmod ranks updates/ above the kernel's own, so a module there replaces the in-tree one."""
        return (f"{self.lib_modules(release)}/updates/dkms", f"{self.lib_modules(release)}/extra")

    @property
    def dkms_tree(self) -> str:
        """DKMS's tree: <module>/<version>/<kernel>/<arch>/ for each kernel a module was built for; mok.pub, the
        key DKMS signs modules with (dkms 3)."""
        return "/var/lib/dkms"

    def lib_firmware(self, directory: str) -> str:
        """A driver's firmware directory (i915, xe)."""
        return f"/lib/firmware/{path_name(directory, 'firmware directory')}"

    @property
    def efi_secure_boot(self) -> str:
        """The firmware's SecureBoot variable in efivarfs (EFI global variable GUID): 4 attribute bytes, then
        1 when Secure Boot is on."""
        return "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-e0c0a0d3f9b9"

    @property
    def sys_kernel_iommu_groups(self) -> str:
        """One directory per IOMMU group: empty when the IOMMU is off."""
        return "/sys/kernel/iommu_groups"

    def xe_configfs_max_vfs(self, address: str) -> str:
        """xe's per-device max_vfs in configfs (xe_configfs.c): read at the PF's probe."""
        return f"/sys/kernel/config/xe/{path_name(address, 'PCI address')}/sriov/max_vfs"

    @property
    def nvidia_sriov_manage(self) -> str:
        """NVIDIA's script that enables (-e) and disables (-d) a GPU's VFs, shipped with its vGPU host driver."""
        return "/usr/lib/nvidia/sriov-manage"

    @property
    def etc_sysfs_d(self) -> str:
        """sysfsutils' settings applied at boot (Debian: also /etc/sysfs.conf)."""
        return "/etc/sysfs.d"

    @property
    def etc_sysfs_conf(self) -> str:
        return "/etc/sysfs.conf"

    def kernel_config(self, release: str) -> str:
        """The Kconfig a distribution kernel ships with."""
        return f"/boot/config-{release}"

    def os_release(self) -> dict[str, str]:
        """``/etc/os-release`` (else ``/usr/lib/os-release``) as a dict, quotes removed; {} if neither exists."""
        for candidate in ("/etc/os-release", "/usr/lib/os-release"):
            try:
                text = self.read_text(candidate)
            except (FileNotFoundError, NotADirectoryError):
                continue
            fields = {}
            for line in text.splitlines():
                key, sep, value = line.strip().partition("=")
                if sep and key and not key.startswith("#"):
                    value = value.strip()
                    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                        value = value[1:-1]
                    fields[key] = value
            return fields
        return {}

    @property
    def is_this_machine(self) -> bool:
        """Whether the root is this machine's own ``/``, whose programs vgpuctl may run."""
        return self.root.resolve() == Path("/")

    def mdev_types_dir(self, parent: str) -> str:
        return f"{self.sys_class_mdev_bus}/{parent}/mdev_supported_types"

    def mdev_type_dir(self, parent: str, type_id: str) -> str:
        return f"{self.mdev_types_dir(parent)}/{type_id}"

    def mdev_device_dir(self, uuid: str) -> str:
        return f"{self.sys_bus_mdev_devices}/{uuid}"

    def debugfs_dri(self, name: str) -> str:
        """A DRM device's debugfs directory, by minor or by PCI address (which one a kernel links is [U]): xe's SR-IOV
        provisioning (sriov/vfN/...)."""
        return f"/sys/kernel/debug/dri/{path_name(name, 'DRM device')}"

    def simulation(self) -> dict[str, Any] | None:
        """What the simulated host says about itself, or None on a real host."""
        try:
            data: dict[str, Any] = json.loads(self.read_text(SIM_MARKER))
        except FileNotFoundError:
            return None
        return data

    @property
    def is_simulated(self) -> bool:
        return self.exists(SIM_MARKER)


# This process's own status (its capabilities), on this machine whatever the root: the doctor asks whether
# QEMU started from here may lock memory.
THIS_PROCESS_STATUS = "/proc/self/status"
