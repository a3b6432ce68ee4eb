"""What a VM is: a :class:`VmSpec`, stored as TOML in ``<state-dir>/vms/<name>.toml``.

A spec only records what the user asked for. Nothing here touches the host: disks are created
(``qemu-img create``) by the lifecycle when the VM starts, the vGPU request is resolved then
(:mod:`vgpuctl.vm.runtime`), and the QEMU command line is built from both (:mod:`vgpuctl.vm.argv`).

Every check names the field it refuses, e.g.
``/var/lib/vgpuctl/vms/x.toml: memory_mib must be a positive integer (MiB), got 'lots'``.
Unknown fields are refused too, so that a typo never silently does nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vgpuctl.base.errors import Conflict, InvalidInput, NotFound
from vgpuctl.base.state import StateDir
from vgpuctl.host.files import atomic_write
from vgpuctl.mdev.definitions import canonical_uuid

NAME_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
FIRMWARES = ("seabios", "ovmf")
MACHINES = ("pc", "q35")
BOOTS = ("disk", "cdrom", "kernel")
NETWORK_MODES = ("none", "user", "tap", "bridge")
DISK_FORMATS = ("qcow2", "raw")
PROFILE_NAMES = ("streaming", "gaming", "automotive")  # = vgpuctl.vm.profiles.PROFILES' keys (a test checks);
# not imported from there: every VM start validates its spec, and importing the profiles costs it ~1 ms.
BACKENDS = ("vnc", "spice", "egl-headless", "dbus", "gtk", "sdl", "none")
# Backends that can show a vGPU's dma-buf display: each runs (or, for vnc, is paired with) an
# OpenGL UI. "none" cannot: QEMU fails with "vfio-display-dmabuf: opengl not available".
GL_BACKENDS = ("vnc", "spice", "egl-headless", "dbus", "gtk", "sdl")
# QEMU's -drive/-device option syntax doubles commas inside values; these never may contain one.
# Plain patterns, compiled (and cached by re) on first use: a start pays only for the ones its spec needs.
_SIZE = r"[1-9][0-9]*[KMGT]?"
_MAC = r"[0-9a-f]{2}(:[0-9a-f]{2}){5}"
_IFNAME = r"[A-Za-z0-9_.-]{1,15}"  # Linux IFNAMSIZ - 1
_REQUIREMENT = r"([a-z0-9_]+)\.([a-z0-9_]+)=(\S+)"
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB: more than any host QEMU runs on; also bounds graphics memory
MAX_CPUS = 255
MAX_ORDER = 9999
# display.options that only tune the backend QEMU already runs. Anything else could open a listener or a
# file (vnc websocket=/to=, spice port=/tls-port=/addr=, dbus addr=, ...): not settable through a spec.
DISPLAY_OPTIONS = ("gl", "p2p", "lossy", "non-adaptive", "key-delay-ms", "image-compression",
                   "jpeg-wan-compression", "zlib-glz-wan-compression", "playback-compression", "streaming-video",
                   "agent-mouse", "seamless-migration", "full-screen", "zoom-to-fit", "grab-on-hover",
                   "show-tabs", "show-cursor", "show-menubar", "window-close")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise InvalidInput(f"VM name must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or "
                           f"digit, got {name!r}")
    return name


@dataclass
class Disk:
    """A disk image of the VM."""

    path: str
    size: str | None = None  # qemu-img size (e.g. "20G"); used only to create a missing image at start
    format: str = "qcow2"


@dataclass
class Network:
    """The VM's one network interface."""

    mode: str = "user"  # none | user | tap | bridge
    bridge: str | None = None  # mode bridge: the host bridge (through qemu-bridge-helper)
    ifname: str | None = None  # mode tap: an existing tap device; QEMU makes one when unset
    vhost: bool = True  # tap/bridge: use vhost-net when the host has /dev/vhost-net
    mac: str | None = None  # default: 52:54:00 + 3 bytes derived from the VM name (stable, distinct)


@dataclass
class VgpuRequest:
    """Which vGPU the VM gets: one of a UUID, a type (on a parent), requirements for the chooser, or none."""

    uuid: str | None = None  # an existing vGPU or mdevctl definition
    parent: str | None = None  # with uuid: disambiguates; with type or requirements: restricts
    type: str | None = None
    resolution: str | None = None  # "1920x1200": at least this resolution
    min_memory_mib: int | None = None
    weight: int | None = None
    largest: bool = False  # the largest type that still fits (most graphics memory)
    keep: bool = True  # keep the vGPU vgpuctl made when QEMU ends, for the next start (GVT-g fragments its
    # graphics memory when vGPUs come and go); false: remove it whenever QEMU ends (stop, power-off, crash)

    @property
    def kind(self) -> str:
        """'uuid', 'type', 'requirements' or 'none'."""
        if self.uuid:
            return "uuid"
        if self.type:
            return "type"
        if self.resolution or self.min_memory_mib or self.weight or self.largest:
            return "requirements"
        return "none"

    def describe(self) -> str:
        on = f" on {self.parent}" if self.parent else ""
        if self.kind == "uuid":
            return f"vGPU {self.uuid}{on}"
        if self.kind == "type":
            return f"a new {self.type}{on}"
        if self.kind == "requirements":
            parts = ["the largest type that fits"] if self.largest else []
            if self.resolution:
                parts.append(f">= {self.resolution}")
            if self.min_memory_mib:
                parts.append(f">= {self.min_memory_mib} MiB")
            if self.weight:
                parts.append(f"weight >= {self.weight}")
            return f"a new vGPU{on}: {', '.join(parts)}"
        return "none"


@dataclass
class Display:
    """Where the VM's picture goes: the display backend and its options."""

    backend: str = "vnc"  # vnc | spice | egl-headless | dbus | gtk | sdl | none
    vnc_socket: str | None = None  # vnc and egl-headless; default <state-dir>/vms/<name>/vnc.sock
    rendernode: str | None = None  # DRM render node for OpenGL (egl-headless, spice, dbus)
    resolution: str | None = None  # fixed resolution: EDID xres/yres of the vGPU, or of the emulated VGA
    options: dict[str, str] = field(default_factory=dict)  # appended to the backend's QEMU option


@dataclass
class VmSpec:
    """A VM as stored in <state-dir>/vms/<name>.toml."""

    name: str
    profile: str | None = None
    memory_mib: int = 2048
    cpus: int = 2
    cpu: str | None = None  # QEMU -cpu; default "host" under KVM, "max" under TCG
    machine: str = "pc"  # pc (i440fx, as Intel's GVT-g guides) | q35
    firmware: str = "seabios"
    boot: str = "disk"  # disk (then cdrom) | cdrom (then disk) | kernel (direct: kernel/initrd/append)
    fast_boot: bool = False  # -boot menu=off and no option ROM on the NIC (no PXE)
    order: int | None = None  # start order among VMs (lower first); None: unordered
    autostart: bool = False  # started by 'vgpuctl vm autostart' (e.g. at boot), in 'order'
    rtc_localtime: bool = False  # Windows guests keep the RTC in local time
    disks: list[Disk] = field(default_factory=list)
    cdrom: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    network: Network = field(default_factory=Network)
    vgpu: VgpuRequest = field(default_factory=VgpuRequest)
    vgpu_display: bool = False  # the vGPU is the VM's display (QEMU display=on, -vga none)
    ramfb: bool = False  # boot display on the vGPU's console (vfio-pci-nohotplug ramfb=on)
    igd_opregion: bool | None = None  # x-igd-opregion; None: on for GVT-g types
    display: Display = field(default_factory=Display)
    guest_agent: bool = False  # a virtio-serial channel org.qemu.guest_agent.0 (<vm dir>/qga.sock) for the QEMU
    # guest agent in the guest
    requires: list[str] = field(default_factory=list)  # host settings checked at start: "kvm.ignore_msrs=1"
    extra_args: list[str] = field(default_factory=list)  # appended to QEMU's command line as given

    # ------------------------------------------------------------------ checks
    def validate(self, where: str | None = None) -> VmSpec:
        """Refuse a spec that can never work, naming the field; returns self."""
        try:
            _check(self)
        except InvalidInput as e:
            raise InvalidInput(f"{where or 'vm ' + str(self.name)}: {e}") from None
        return self

    def warnings(self) -> list[str]:
        """What may not work as the user expects, but is not wrong."""
        found = []
        if self.boot == "disk" and not self.disks and not self.cdrom:
            found.append("no disk or cdrom to boot from (add --disk PATH[:SIZE], --cdrom ISO or --kernel)")
        if self.firmware == "ovmf" and self.igd_opregion:
            found.append("x-igd-opregion with OVMF needs a firmware with IgdAssignmentDxe (unmodified OVMF "
                         "ignores the OpRegion); SeaBIOS handles it")
        if self.vgpu.kind == "none" and (self.ramfb or self.vgpu_display):
            found.append("vgpu_display/ramfb have no effect without a vGPU")
        return found

    # ------------------------------------------------------------------ TOML
    def to_dict(self) -> dict[str, Any]:
        """Plain data for TOML/JSON: None values left out (TOML has no null)."""
        return _plain(self)  # type: ignore[no-any-return]

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> VmSpec:
        try:
            spec: VmSpec = _read(cls, data, "")
        except InvalidInput as e:
            raise InvalidInput(f"{where}: {e}") from None
        return spec.validate(where)

    @classmethod
    def from_toml(cls, text: str, where: str) -> VmSpec:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InvalidInput(f"{where}: not valid TOML ({e}); fix or remove the file") from None
        return cls.from_dict(data, where)


# ---------------------------------------------------------------------- storage


def vms_dir(state: StateDir) -> Path:
    return state.path / "vms"


def spec_path(state: StateDir, name: str) -> Path:
    return vms_dir(state) / f"{check_name(name)}.toml"


def exists(state: StateDir, name: str) -> bool:
    return spec_path(state, name).is_file()


def load(state: StateDir, name: str) -> VmSpec:
    path = spec_path(state, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFound(f"no VM {name!r}; 'vgpuctl vm list' shows the VMs, 'vgpuctl vm create' makes one") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not text
        raise InvalidInput(f"{path}: cannot be read as a spec ({e}); fix or remove it") from None
    spec = VmSpec.from_toml(text, str(path))
    if spec.name != name:
        raise InvalidInput(f"{path}: name is {spec.name!r} but the file is named for {name!r}; make them agree")
    return spec


def default_mac(name: str) -> str:
    """52:54:00 (QEMU's prefix) and three bytes of the name's hash: stable per VM, distinct between VMs."""
    import hashlib  # loads OpenSSL (~2 ms): only when a MAC is made, not at every start

    digest = hashlib.sha256(f"vgpuctl:{name}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def save(state: StateDir, spec: VmSpec, *, new: bool = False) -> Path:
    """Write the spec atomically (validated first); ``new`` refuses to replace an existing VM.

    A new VM with a network gets its MAC written into the spec (as libvirt writes it into the domain):
    the guest's NIC keeps its address whatever later versions derive, and ``vm show`` shows it.
    """
    path = spec_path(state, spec.name)
    spec.validate(str(path))
    if new and path.exists():
        raise Conflict(f"VM {spec.name!r} already exists; change it with 'vgpuctl vm edit' or pick another name")
    if new and spec.network.mode != "none" and spec.network.mac is None:
        spec.network.mac = default_mac(spec.name)
    atomic_write(path, spec.to_toml().encode())  # (it also sweeps the temp files of killed writes)
    return path


def names(state: StateDir) -> list[str]:
    directory = vms_dir(state)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.toml") if re.fullmatch(NAME_PATTERN, p.stem))


@dataclass(frozen=True)
class SpecProblem:
    """A file in the VMs' directory that is not a VM: listings report it and carry on with the others."""

    name: str
    file: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "file": self.file, "error": self.error}


def load_each(state: StateDir) -> tuple[list[VmSpec], list[SpecProblem]]:
    """Every VM, and a problem for each ``*.toml`` that is not one (bad TOML or field, a directory, a
    name that is not a VM name): one bad file never hides the others."""
    directory = vms_dir(state)
    good: list[VmSpec] = []
    problems: list[SpecProblem] = []
    if not directory.is_dir():
        return good, problems
    for path in sorted(directory.glob("*.toml")):
        if not re.fullmatch(NAME_PATTERN, path.stem):
            problems.append(SpecProblem(path.stem, str(path), f"{path}: {path.stem!r} is not a VM name "
                                        "(a-z, 0-9 and '-'); rename or remove the file"))
            continue
        try:
            good.append(load(state, path.stem))
        except (InvalidInput, NotFound) as e:
            problems.append(SpecProblem(path.stem, str(path), str(e)))
    return good, problems


def remove(state: StateDir, name: str) -> None:
    spec_path(state, name).unlink()


# ---------------------------------------------------------------------- reading and checking


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _read(cls: type[Any], data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from TOML data, checking each field's type by its annotation."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{prefix.rstrip('.') or 'the spec'} must be a table")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise InvalidInput(f"unknown field '{prefix}{key}' (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in data:
            continue
        value, label, kind = data[name], prefix + name, str(f.type)
        if kind in ("Network", "VgpuRequest", "Display"):
            values[name] = _read({"Network": Network, "VgpuRequest": VgpuRequest, "Display": Display}[kind],
                                 value, label + ".")
        elif kind == "list[Disk]":
            if not isinstance(value, list):
                raise InvalidInput(f"{label} must be a list of tables (path, size, format)")
            values[name] = [_read(Disk, item, f"{label}[{i}].") for i, item in enumerate(value)]
        elif kind == "list[str]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidInput(f"{label} must be a list of strings, got {_describe(value)}")
            values[name] = list(value)
        elif kind == "dict[str, str]":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise InvalidInput(f"{label} must be a table of strings, got {_describe(value)}")
            values[name] = dict(value)
        elif kind.startswith("bool"):
            if not isinstance(value, bool):
                raise InvalidInput(f"{label} must be true or false, got {_describe(value)}")
            values[name] = value
        elif kind.startswith("int"):
            values[name] = value  # checked with its unit and range by _check
        else:  # str or str | None
            if not isinstance(value, str):
                raise InvalidInput(f"{label} must be a string, got {_describe(value)}")
            values[name] = value
    if cls is VmSpec and "name" not in values:
        raise InvalidInput("name is missing")
    if cls is Disk and "path" not in values:
        raise InvalidInput(f"{prefix}path is missing")
    return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, (VmSpec, Disk, Network, VgpuRequest, Display)):
        data = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, VgpuRequest) and not value.largest:
            del data["largest"]
        if isinstance(value, VgpuRequest) and value.keep:
            del data["keep"]  # the default: files written before it existed stay as they are
        if isinstance(value, VmSpec) and not value.guest_agent:
            del data["guest_agent"]  # the default: files written before it existed stay as they are
        return {k: v for k, v in data.items() if v is not None and v != {}}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _one_of(label: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInput(f"{label} must be one of {', '.join(choices)}, got {value!r}")


def _positive(label: str, value: Any, unit: str = "", maximum: int | None = None) -> None:
    integer = isinstance(value, int) and not isinstance(value, bool)
    if not integer or value < 1 or (maximum and value > maximum):
        limit = f" up to {maximum}" if maximum and (unit == "" or (integer and value > maximum)) else ""
        raise InvalidInput(f"{label} must be a positive integer{f' ({unit})' if unit else ''}{limit}, "
                           f"got {_describe(value)}")


def _absolute(label: str, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidInput(f"{label} must be an absolute path, got {_describe(value)}")


def parse_resolution(label: str, value: str) -> tuple[int, int]:
    match = re.fullmatch(r"([1-9][0-9]{1,4})x([1-9][0-9]{1,4})", value) if isinstance(value, str) else None
    if not match:
        raise InvalidInput(f"{label} must look like 1920x1200, got {_describe(value)}")
    return int(match[1]), int(match[2])


def _check(spec: VmSpec) -> None:
    check_name(spec.name)
    if spec.profile is not None:
        _one_of("profile", spec.profile, PROFILE_NAMES)
    _positive("memory_mib", spec.memory_mib, "MiB", maximum=MAX_MEMORY_MIB)
    _positive("cpus", spec.cpus, maximum=MAX_CPUS)
    if spec.cpu is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.,=+-]*", spec.cpu):
        raise InvalidInput(f"cpu must be a QEMU -cpu value such as 'host' or 'host,hv_relaxed', got {spec.cpu!r}")
    _one_of("machine", spec.machine, MACHINES)
    _one_of("firmware", spec.firmware, FIRMWARES)
    _one_of("boot", spec.boot, BOOTS)
    if spec.order is not None and (not isinstance(spec.order, int) or isinstance(spec.order, bool)
                                   or not 0 <= spec.order <= MAX_ORDER):
        raise InvalidInput(f"order must be an integer from 0 to {MAX_ORDER}, got {_describe(spec.order)}")
    for i, disk in enumerate(spec.disks):
        _absolute(f"disks[{i}].path", disk.path)
        _one_of(f"disks[{i}].format", disk.format, DISK_FORMATS)
        if disk.size is not None and not re.fullmatch(_SIZE, disk.size):
            raise InvalidInput(f"disks[{i}].size must be a size such as 20G or 512M, got {disk.size!r}")
    paths = [d.path for d in spec.disks]
    duplicate = next((p for p in paths if paths.count(p) > 1), None)
    if duplicate:
        raise InvalidInput(f"disks: {duplicate} is given twice")
    for label in ("cdrom", "kernel", "initrd"):
        _absolute(label, getattr(spec, label))
    if spec.boot == "kernel" and not spec.kernel:
        raise InvalidInput("boot = 'kernel' needs kernel (a kernel image path)")
    if spec.boot == "cdrom" and not spec.cdrom:
        raise InvalidInput("boot = 'cdrom' needs cdrom (an ISO path)")
    if (spec.initrd or spec.append) and not spec.kernel:
        raise InvalidInput("initrd and append need kernel (direct kernel boot)")

    net = spec.network
    _one_of("network.mode", net.mode, NETWORK_MODES)
    if net.mode == "bridge" and not net.bridge:
        raise InvalidInput("network.mode = 'bridge' needs network.bridge (the host bridge, e.g. br0)")
    if net.bridge is not None and (net.mode != "bridge" or not re.fullmatch(_IFNAME, net.bridge)):
        raise InvalidInput(f"network.bridge must be an interface name and needs network.mode = 'bridge', "
                           f"got {net.bridge!r}")
    if net.ifname is not None and (net.mode != "tap" or not re.fullmatch(_IFNAME, net.ifname)):
        raise InvalidInput(f"network.ifname must be an interface name and needs network.mode = 'tap', "
                           f"got {net.ifname!r}")
    if net.mac is not None and not re.fullmatch(_MAC, net.mac):
        raise InvalidInput(f"network.mac must look like 52:54:00:12:34:56 (lower case), got {net.mac!r}")

    vgpu = spec.vgpu
    if vgpu.uuid is not None:
        try:
            canonical = canonical_uuid(vgpu.uuid)
        except InvalidInput:
            raise InvalidInput(f"vgpu.uuid must be a UUID, got {vgpu.uuid!r}") from None
        if canonical != vgpu.uuid:
            raise InvalidInput(f"vgpu.uuid must be written in lower case with hyphens: {canonical}")
    requirements = [k for k in ("resolution", "min_memory_mib", "weight") if getattr(vgpu, k) is not None]
    requirements += ["largest"] if vgpu.largest else []
    if vgpu.uuid and (vgpu.type or requirements):
        others = ", ".join((["type"] if vgpu.type else []) + requirements)
        raise InvalidInput(f"vgpu: give either uuid, or type, or requirements (resolution/min_memory_mib/weight/"
                           f"largest), not uuid with {others}")
    if vgpu.type and requirements:
        raise InvalidInput(f"vgpu: give either type or requirements, not type with {', '.join(requirements)}")
    if vgpu.resolution is not None:
        parse_resolution("vgpu.resolution", vgpu.resolution)
    if vgpu.min_memory_mib is not None:
        _positive("vgpu.min_memory_mib", vgpu.min_memory_mib, "MiB", maximum=MAX_MEMORY_MIB)
    if vgpu.weight is not None:
        _positive("vgpu.weight", vgpu.weight, maximum=16)
    if vgpu.parent is not None and vgpu.kind == "none":
        raise InvalidInput("vgpu.parent alone says nothing: add vgpu.type, vgpu.uuid or requirements")

    display = spec.display
    _one_of("display.backend", display.backend, BACKENDS)
    _absolute("display.vnc_socket", display.vnc_socket)
    _absolute("display.rendernode", display.rendernode)
    if display.vnc_socket is not None and display.backend not in ("vnc", "egl-headless"):
        raise InvalidInput(f"display.vnc_socket needs display.backend vnc or egl-headless, not {display.backend!r}")
    if display.vnc_socket is not None and "," in display.vnc_socket:
        raise InvalidInput("display.vnc_socket must not contain ','")
    if display.resolution is not None:
        parse_resolution("display.resolution", display.resolution)
    for key, value in display.options.items():
        if key not in DISPLAY_OPTIONS:
            raise InvalidInput(f"display.options.{key} is not allowed (only options that cannot open a listener "
                               f"or a file: {', '.join(DISPLAY_OPTIONS)}); listeners are vgpuctl's to set up")
        if "," in value:
            raise InvalidInput(f"display.options.{key} must be a value without ',', got {value!r}")
    if spec.vgpu_display and vgpu.kind == "none":
        raise InvalidInput("vgpu_display = true needs a vGPU (vgpu.uuid, vgpu.type or requirements such as "
                           "vgpu.resolution)")
    if spec.vgpu_display and display.backend not in GL_BACKENDS:
        raise InvalidInput(f"vgpu_display = true needs an OpenGL display backend ({', '.join(GL_BACKENDS)}); "
                           f"display.backend {display.backend!r} cannot show a vGPU")
    if spec.ramfb and not spec.vgpu_display:
        raise InvalidInput("ramfb = true needs vgpu_display = true (QEMU: \"ramfb=on requires display=on\")")
    for i, requirement in enumerate(spec.requires):
        if not re.fullmatch(_REQUIREMENT, requirement):
            raise InvalidInput(f"requires[{i}] must look like MODULE.PARAMETER=VALUE (e.g. kvm.ignore_msrs=1), "
                               f"got {requirement!r}")
