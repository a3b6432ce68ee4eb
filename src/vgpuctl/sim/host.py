"""A simulated vGPU host: the mdev core and the rest of a host's sysfs, procfs, /dev, /boot, /etc.

``SimHost(spec)`` builds the tree of :mod:`vgpuctl.sim.vfs` nodes that a real kernel would show
for the hardware, kernel version, command line and loaded modules in ``spec``. Writes to
``create`` and ``remove`` go through :class:`SimHost` exactly as the kernel's mdev core handles
them (spec kernel-mdev-gvt.md 1.3-1.5).
"""

from __future__ import annotations

import errno
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from vgpuctl.host.platforms import INTEL_VENDOR_ID, platform_for
from vgpuctl.host.root import SIM_MARKER
from vgpuctl.sim.kernel import Kernel
from vgpuctl.sim.presets import READY_CMDLINE_FLAGS, HostSpec, preset
from vgpuctl.sim.vendors import (
    GvtParent,
    MbochsParent,
    MdpyParent,
    MttyParent,
    NvidiaParent,
    Parent,
)
from vgpuctl.sim.vfs import Attr, Blob, CharDev, Dir, Link, Vfs, const, fail

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
UUID_STRING_LEN = 36
IGPU_ADDRESS = "0000:00:02.0"
VFIO_MAJOR = 511  # dynamic char major as commonly seen for /dev/vfio/<group>
IGPU_BAR2_START = 0x4000000000


@dataclass
class MdevDevice:
    uuid: str
    parent: Parent
    type_id: str
    iommu_group: int


class SimHost:
    """One simulated host. Thread-safe: every path operation holds one lock."""

    def __init__(self, spec: HostSpec, preset_name: str = "custom") -> None:
        self.spec = spec
        self.preset_name = preset_name
        self.kernel = Kernel(spec.kernel)
        self.kernel.version  # noqa: B018 - validates the release string early
        self.vfs = Vfs()
        self.lock = threading.RLock()
        self.parents: dict[str, Parent] = {}
        self.devices: dict[str, MdevDevice] = {}
        self.iommu_groups: set[int] = set()
        self.marker_extra: dict[str, Any] = {}
        self._build()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SimHost:
        return cls(preset(name).with_overrides(**overrides), preset_name=name)

    # ------------------------------------------------------------------ derived host facts
    @property
    def cmdline(self) -> str:
        if self.spec.cmdline is not None:
            return self.spec.cmdline.replace("{release}", self.spec.kernel)
        flags = READY_CMDLINE_FLAGS if self.spec.gpu and self.spec.gpu.vendor_id == INTEL_VENDOR_ID else ""
        return f"BOOT_IMAGE=/boot/vmlinuz-{self.spec.kernel} root=/dev/sda1 ro quiet {flags}".strip()

    def cmdline_param(self, key: str) -> str | None:
        value = None
        for word in self.cmdline.split():
            name, _, val = word.partition("=")
            if name == key:
                value = val
        return value

    @property
    def kconfig(self) -> dict[str, str]:
        config = {
            "CONFIG_DRM_I915": "m",
            "CONFIG_DRM_I915_GVT": "y",
            "CONFIG_DRM_I915_GVT_KVMGT": "m",
            "CONFIG_VFIO": "m",
            "CONFIG_VFIO_MDEV": "m",
            "CONFIG_VFIO_IOMMU_TYPE1": "m",
            "CONFIG_KVM": "m",
            "CONFIG_KVM_INTEL": "m",
            "CONFIG_INTEL_IOMMU": "y",
        }
        if self.kernel.has_vfio_mdev_module:
            config["CONFIG_VFIO_MDEV_DEVICE"] = "m"
        if self.kernel.at_least(6, 6):
            config["CONFIG_VFIO_GROUP"] = "y"
        if self.spec.samples:
            config["CONFIG_SAMPLE_VFIO_MDEV_MTTY"] = "m"
            config["CONFIG_SAMPLE_VFIO_MDEV_MDPY"] = "m"
            config["CONFIG_SAMPLE_VFIO_MDEV_MBOCHS"] = "m"
        config.update(self.spec.kconfig)
        return {k: v for k, v in config.items() if v != "n"}

    @property
    def is_intel(self) -> bool:
        return self.spec.gpu is not None and self.spec.gpu.vendor_id == INTEL_VENDOR_ID

    def _gvt_param(self, key: str) -> str | None:
        return self.cmdline_param(f"i915.{key}")

    @property
    def enable_gvt(self) -> bool:
        return (self._gvt_param("enable_gvt") or "0").lower() in ("1", "y", "yes", "true", "on")

    @property
    def guc_submission(self) -> bool:
        try:
            return int(self._gvt_param("enable_guc") or "-1") in (1, 3)
        except ValueError:
            return False

    @property
    def gvt_initialises(self) -> bool:
        """Whether i915's GVT-g device init succeeds (independent of kvmgt being loaded)."""
        gpu = self.spec.gpu
        if gpu is None or not self.is_intel or not self.enable_gvt or self.guc_submission:
            return False
        if "CONFIG_DRM_I915_GVT" not in self.kconfig or "CONFIG_DRM_I915_GVT_KVMGT" not in self.kconfig:
            return False
        platform = platform_for(gpu.device_id)
        return platform is not None and platform.gvt_supported_on(self.kernel.version, gpu.device_id)

    @property
    def modules(self) -> list[str]:
        if self.spec.modules is not None:
            return list(self.spec.modules)
        modules = ["kvm", "kvm_intel", "vfio", "vfio_iommu_type1"]
        if self.is_intel:
            modules = self.kernel.required_modules
            # Up to 5.18 "modprobe kvmgt" fails with ENODEV when i915 did not start GVT.
            if not self.gvt_initialises and not self.kernel.gvt_in_kvmgt:
                modules.remove("kvmgt")
        if self.spec.nvidia_gpus:
            modules += ["nvidia", "nvidia_vgpu_vfio", "mdev"]
        modules += [s for s in self.spec.samples if s == "mtty" or self.kernel.has_mdpy_mbochs]
        if self.spec.samples:
            modules.append("mdev")
        return list(dict.fromkeys(modules))

    def loaded(self, module: str) -> bool:
        return module in self.modules

    # ------------------------------------------------------------------ building the tree
    def _build(self) -> None:
        fs = self.vfs
        release = self.spec.kernel
        fs.put(SIM_MARKER, Attr(show=self._marker))
        fs.put("/proc/cmdline", Attr(show=const(self.cmdline + "\n")))
        fs.put("/proc/sys/kernel/osrelease", Attr(show=const(release + "\n")))
        fs.put("/proc/modules", Attr(show=self._proc_modules))
        fs.put(f"/boot/config-{release}", Blob(data=bytearray(self._config_text().encode()), mode=0o644))
        self._build_etc()
        fs.mkdirs("/dev")
        fs.mkdirs("/sys/kernel/iommu_groups")
        fs.mkdirs("/sys/bus/pci/drivers")
        self._build_modules()
        if self.loaded("kvm_intel") or self.loaded("kvm_amd"):
            fs.put("/dev/kvm", CharDev(major=10, minor=232, mode=0o660))
        if self.loaded("vfio"):
            fs.put("/dev/vfio/vfio", CharDev(major=10, minor=196, mode=0o666))
        if self.loaded("mdev"):
            fs.mkdirs("/sys/bus/mdev/devices")
            fs.mkdirs("/sys/bus/mdev/drivers")
        iommu_on = self.cmdline_param("intel_iommu") == "on" and "CONFIG_INTEL_IOMMU" in self.kconfig
        if iommu_on:
            fs.mkdirs("/sys/class/iommu/dmar0")
        self._add_pci_device("0000:00:00.0", "/sys/devices/pci0000:00/0000:00:00.0", 0x8086, 0x3E0F,
                             0x060000, None, iommu_on)
        if self.spec.gpu is not None:
            self._build_igpu(iommu_on)
        for index in range(self.spec.nvidia_gpus):
            self._build_nvidia(index, iommu_on)
        for sample in self.spec.samples:
            if self.loaded(sample):
                self._build_sample(sample)

    def _marker(self) -> str:
        data = {"preset": self.preset_name, "kernel": self.spec.kernel, **self.marker_extra}
        return json.dumps(data) + "\n"

    def _config_text(self) -> str:
        lines = [f"# Linux/x86 {self.spec.kernel} Kernel Configuration (simulated)"]
        lines += [f"{key}={value}" for key, value in sorted(self.kconfig.items())]
        return "\n".join(lines) + "\n"

    def _proc_modules(self) -> str:
        return "".join(f"{m} 65536 0 - Live 0x0000000000000000\n" for m in self.modules)

    def _build_etc(self) -> None:
        etc = self.vfs.mkdirs("/etc")
        etc.writable = True
        for directory in ("/etc/mdevctl.d/scripts.d/callouts", "/etc/mdevctl.d/scripts.d/notifiers",
                          "/etc/modprobe.d", "/etc/default"):
            self.vfs.mkdirs(directory)
        self._mark_writable(etc)
        extra = self.cmdline.split(" ro ", 1)[1] if " ro " in self.cmdline else ""
        grub = f'GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT="{extra}"\nGRUB_CMDLINE_LINUX=""\n'
        self.vfs.put("/etc/default/grub", Blob(data=bytearray(grub.encode())))

    def _mark_writable(self, directory: Dir) -> None:
        directory.writable = True
        for child in directory.children.values():
            if isinstance(child, Dir):
                self._mark_writable(child)

    def _build_modules(self) -> None:
        fs = self.vfs
        for module in self.modules:
            fs.mkdirs(f"/sys/module/{module}")
        if self.loaded("i915") and "CONFIG_DRM_I915_GVT" in self.kconfig:
            # Older kernels (before ~5.8 [U]) cleared the global parameter when GVT init failed.
            failed = self.enable_gvt and not self.gvt_initialises and not self.kernel.at_least(5, 8)
            value = "Y" if self.enable_gvt and not failed else "N"
            fs.put("/sys/module/i915/parameters/enable_gvt", Attr(show=const(value + "\n"), mode=0o400))
        if self.loaded("i915"):
            guc = self._gvt_param("enable_guc") or "-1"
            fs.put("/sys/module/i915/parameters/enable_guc", Attr(show=const(guc + "\n"), mode=0o400))
        if self.loaded("kvm"):
            self._bool_param("kvm", "ignore_msrs", self.cmdline_param("kvm.ignore_msrs"))
            self._bool_param("kvm", "report_ignored_msrs", self.cmdline_param("kvm.report_ignored_msrs") or "Y")
        if self.loaded("mdev"):
            fs.put("/sys/module/mdev/version", Attr(show=const("0.1\n")))

    def _bool_param(self, module: str, name: str, initial: str | None) -> None:
        state = {"value": (initial or "N").upper() in ("1", "Y", "YES", "TRUE", "ON")}

        def store(text: str) -> None:  # kernel param_set_bool accepts 0/1/y/n/Y/N
            word = text.strip().upper()
            if word not in ("0", "1", "Y", "N"):
                raise fail(errno.EINVAL)
            state["value"] = word in ("1", "Y")

        self.vfs.put(f"/sys/module/{module}/parameters/{name}",
                     Attr(show=lambda: ("Y" if state["value"] else "N") + "\n", store=store, mode=0o644))

    def _add_pci_device(self, address: str, path: str, vendor: int, device: int, pci_class: int,
                        driver: str | None, iommu_on: bool, bar2_mib: int = 0) -> None:
        fs = self.vfs
        fs.mkdirs(path)
        fs.put(f"{path}/vendor", Attr(show=const(f"0x{vendor:04x}\n")))
        fs.put(f"{path}/device", Attr(show=const(f"0x{device:04x}\n")))
        fs.put(f"{path}/class", Attr(show=const(f"0x{pci_class:06x}\n")))
        fs.put(f"{path}/subsystem_vendor", Attr(show=const(f"0x{vendor:04x}\n")))
        fs.put(f"{path}/resource", Attr(show=const(_pci_resource(bar2_mib))))
        fs.put(f"{path}/subsystem", Link(target="/sys/bus/pci"))
        fs.put(f"/sys/bus/pci/devices/{address}", Link(target=path))
        if driver:
            fs.mkdirs(f"/sys/bus/pci/drivers/{driver}")
            fs.put(f"{path}/driver", Link(target=f"/sys/bus/pci/drivers/{driver}"))
            fs.put(f"/sys/bus/pci/drivers/{driver}/{address}", Link(target=path))
        if iommu_on:
            group = self._new_iommu_group()
            fs.put(f"/sys/kernel/iommu_groups/{group}/devices/{address}", Link(target=path))
            fs.put(f"{path}/iommu_group", Link(target=f"/sys/kernel/iommu_groups/{group}"))

    def _build_igpu(self, iommu_on: bool) -> None:
        gpu = self.spec.gpu
        assert gpu is not None
        path = f"/sys/devices/pci0000:00/{IGPU_ADDRESS}"
        driver = ("i915" if self.loaded("i915") else None) if self.is_intel else "amdgpu"
        self._add_pci_device(IGPU_ADDRESS, path, gpu.vendor_id, gpu.device_id, 0x030000, driver, iommu_on,
                             bar2_mib=gpu.aperture_mib)
        if not (self.gvt_initialises and self.loaded("i915")):
            return
        # GVT device init got far enough to expose the golden-state firmware blob (root only).
        self.vfs.put(f"{path}/gvt_firmware", Attr(show=const(""), mode=0o400, binary=True))
        if self.loaded("kvmgt") and self.loaded("mdev"):
            platform = platform_for(gpu.device_id)
            assert platform is not None
            self._register_parent(GvtParent(
                name=IGPU_ADDRESS, device_path=path, kernel=self.kernel, vendor_driver="intel_vgpu_mdev",
                graphics_ver=platform.graphics_ver, aperture_mib=gpu.aperture_mib, ggtt_mib=gpu.ggtt_mib,
                fences=gpu.fences,
            ))

    def _build_nvidia(self, index: int, iommu_on: bool) -> None:
        bus = 0x3B + index * 0x23  # 3b, 5e, 81, a4, ... as on dual-socket servers
        address = f"0000:{bus:02x}:00.0"
        port = f"0000:00:{index + 3:02x}.0"
        path = f"/sys/devices/pci0000:00/{port}/{address}"
        self._add_pci_device(address, path, 0x10DE, 0x1EB8, 0x030200,
                             "nvidia" if self.loaded("nvidia") else None, iommu_on)
        if self.loaded("nvidia_vgpu_vfio") and self.loaded("mdev"):
            self._register_parent(NvidiaParent(address, path, self.kernel, "nvidia-vgpu-vfio"))

    def _build_sample(self, sample: str) -> None:
        path = f"/sys/devices/virtual/{sample}/{sample}"
        self.vfs.mkdirs(path)
        self.vfs.put(f"/sys/class/{sample}/{sample}", Link(target=path))
        kinds: dict[str, type[Parent]] = {"mtty": MttyParent, "mdpy": MdpyParent, "mbochs": MbochsParent}
        self._register_parent(kinds[sample](sample, path, self.kernel, sample))

    def _register_parent(self, parent: Parent) -> None:
        """mdev_register_parent(): the types kset, one directory per type, the mdev_bus class link."""
        fs = self.vfs
        self.parents[parent.name] = parent
        types_dir = f"{parent.device_path}/mdev_supported_types"
        fs.mkdirs(types_dir)
        for sim_type in parent.types():
            base = f"{types_dir}/{sim_type.type_id}"
            fs.mkdirs(f"{base}/devices")
            fs.put(f"{base}/create", Attr(store=partial(self.create, parent.name, sim_type.type_id)))
            fs.put(f"{base}/device_api", Attr(show=const(sim_type.device_api + "\n")))
            fs.put(f"{base}/available_instances", Attr(show=partial(_show_available, parent, sim_type.type_id)))
            if sim_type.name is not None:
                fs.put(f"{base}/name", Attr(show=const(sim_type.name + "\n")))
            if sim_type.description is not None:
                fs.put(f"{base}/description", Attr(show=const(sim_type.description)))
        fs.put(f"/sys/class/mdev_bus/{parent.name}", Link(target=parent.device_path))
        driver = self.kernel.mdev_driver(parent.vendor_driver)
        fs.mkdirs(f"/sys/bus/mdev/drivers/{driver}")

    def _new_iommu_group(self) -> int:
        group = next(n for n in range(len(self.iommu_groups) + 1) if n not in self.iommu_groups)
        self.iommu_groups.add(group)
        return group

    # ------------------------------------------------------------------ the mdev core
    def create(self, parent_name: str, type_id: str, text: str) -> None:
        """A write of ``text`` to ``<parent>/mdev_supported_types/<type_id>/create``."""
        with self.lock:
            if len(text) not in (UUID_STRING_LEN, UUID_STRING_LEN + 1):
                raise fail(errno.EINVAL, "write a 36-character UUID")
            raw = text[:UUID_STRING_LEN]
            if not UUID_RE.match(raw):
                raise fail(errno.EINVAL, "not a UUID")
            uuid = raw.lower()  # %pUl
            parent = self.parents[parent_name]
            clash = self.devices.get(uuid)
            if clash and (self.kernel.global_uuid_check or clash.parent is parent):
                raise fail(errno.EEXIST, f"{uuid} exists on {clash.parent.name}")
            if clash:
                # 4.10 allowed the same UUID under two parents, but sysfs can't hold two
                # /sys/bus/mdev/devices/<uuid> links: the kernel fails there with EEXIST too.
                raise fail(errno.EEXIST, f"{uuid} exists on {clash.parent.name}")
            extra = parent.allocate(uuid, type_id)
            group = self._new_iommu_group()
            device = MdevDevice(uuid, parent, type_id, group)
            self.devices[uuid] = device
            self._add_device_nodes(device, extra)

    def _add_device_nodes(self, device: MdevDevice, extra: dict[str, Any]) -> None:
        fs = self.vfs
        parent, uuid = device.parent, device.uuid
        path = f"{parent.device_path}/{uuid}"
        type_dir = f"{parent.device_path}/mdev_supported_types/{device.type_id}"
        driver = self.kernel.mdev_driver(parent.vendor_driver)
        fs.mkdirs(path)
        fs.put(f"{path}/remove", Attr(store=partial(self.remove, uuid)))
        fs.put(f"{path}/mdev_type", Link(target=type_dir))
        fs.put(f"{path}/driver", Link(target=f"/sys/bus/mdev/drivers/{driver}"))
        fs.put(f"{path}/subsystem", Link(target="/sys/bus/mdev"))
        fs.put(f"{path}/uevent", Attr(show=const(f"DRIVER={driver}\nMDEV_TYPE={device.type_id}\n")))
        fs.put(f"{path}/iommu_group", Link(target=f"/sys/kernel/iommu_groups/{device.iommu_group}"))
        for relative, node in extra.items():
            fs.put(f"{path}/{relative}", node)
        fs.put(f"{type_dir}/devices/{uuid}", Link(target=path))
        fs.put(f"/sys/bus/mdev/devices/{uuid}", Link(target=path))
        fs.put(f"/sys/bus/mdev/drivers/{driver}/{uuid}", Link(target=path))
        fs.put(f"/sys/kernel/iommu_groups/{device.iommu_group}/devices/{uuid}", Link(target=path))
        fs.put(f"/dev/vfio/{device.iommu_group}", CharDev(major=VFIO_MAJOR, minor=device.iommu_group))

    def remove(self, uuid: str, text: str) -> None:
        """A write of ``text`` to ``<device>/remove`` (kstrtoul base 0: non-zero removes)."""
        with self.lock:
            value = _kstrtoul(text)
            if value == 0:
                return
            device = self.devices.pop(uuid, None)
            if device is None:
                raise fail(errno.ENODEV)
            parent = device.parent
            driver = self.kernel.mdev_driver(parent.vendor_driver)
            fs = self.vfs
            fs.drop(f"{parent.device_path}/{uuid}")
            fs.drop(f"{parent.device_path}/mdev_supported_types/{device.type_id}/devices/{uuid}")
            fs.drop(f"/sys/bus/mdev/devices/{uuid}")
            fs.drop(f"/sys/bus/mdev/drivers/{driver}/{uuid}")
            fs.drop(f"/sys/kernel/iommu_groups/{device.iommu_group}")
            fs.drop(f"/dev/vfio/{device.iommu_group}")
            self.iommu_groups.discard(device.iommu_group)
            parent.release(uuid)

    # ------------------------------------------------------------------ path operations (locked)
    def read(self, path: str, size: int = -1, offset: int = 0) -> bytes:
        with self.lock:
            return self.vfs.read(path, size, offset)

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def write(self, path: str, data: bytes | str, offset: int = 0) -> int:
        with self.lock:
            return self.vfs.write(path, data.encode() if isinstance(data, str) else data, offset)

    def listdir(self, path: str) -> list[str]:
        with self.lock:
            return self.vfs.listdir(path)

    def readlink(self, path: str) -> str:
        with self.lock:
            return self.vfs.readlink(path)

    def exists(self, path: str) -> bool:
        try:
            with self.lock:
                self.vfs.node(path)
        except OSError:
            return False
        return True

    def walk(self, top: str = "/") -> Iterator[str]:
        """Every path under top (not following symlinks), for tests and debugging."""
        for name in self.listdir(top):
            path = f"{top.rstrip('/')}/{name}"
            yield path
            node = self.vfs.node(path)
            if isinstance(node, Dir):
                yield from self.walk(path)


def _show_available(parent: Parent, type_id: str) -> str:
    return f"{parent.available(type_id)}\n"


def _kstrtoul(text: str) -> int:
    """kstrtoul(buf, 0): optional trailing newline, 0x/0 prefixes, nothing else."""
    body = text[:-1] if text.endswith("\n") else text
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", body):
            return int(body, 16)
        if re.fullmatch(r"0[0-7]*", body):
            return int(body, 8)
        if re.fullmatch(r"[1-9][0-9]*", body):
            return int(body)
    except ValueError:
        pass
    raise fail(errno.EINVAL, "remove takes a number")


def _pci_resource(bar2_mib: int) -> str:
    """The PCI ``resource`` file: 13 lines of start/end/flags; BAR2 is the GVT aperture (GMADR)."""
    lines = ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 13
    lines[0] = "0x00000000f6000000 0x00000000f6ffffff 0x0000000000140204"
    if bar2_mib:
        end = IGPU_BAR2_START + bar2_mib * 1024 * 1024 - 1
        lines[2] = f"0x{IGPU_BAR2_START:016x} 0x{end:016x} 0x000000000014220c"
        lines[4] = "0x000000000000f000 0x000000000000f03f 0x0000000000040101"
    return "\n".join(lines) + "\n"
