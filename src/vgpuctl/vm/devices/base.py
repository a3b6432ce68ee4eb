"""What every device kind is: the protocol its module fulfils, and what the renderers hand it.

A device kind is a module of this package with ``Fields`` (a dataclass of its VmSpec fields, a base of
VmSpec; empty for a device every VM has), ``TABLES`` (the dataclasses its fields read from TOML tables),
``check(spec)`` (its validation, naming the field), ``qemu_args(ctx)`` and ``xml(ctx)``; the positions put
its output where QEMU's command line and libvirt's ``<devices>`` have it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, dataclass_transform, runtime_checkable

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

    from vgpuctl.vm.runtime import ResolvedVgpu, RuntimePaths
    from vgpuctl.vm.spec import VmSpec

_Cls = TypeVar("_Cls", bound=type)


@dataclass_transform(field_specifiers=(field,))
def spec_fields(cls: _Cls) -> _Cls:
    """A kind's ``Fields``: a dataclass for its field list only. VmSpec, which has them all, makes the one
    ``__init__``/``__repr__``/``__eq__`` that is used; making them for every base too cost the CLI ~5 ms at
    start-up (each is compiled from source by ``dataclasses``, unlike the module's cached bytecode)."""
    if cls.__doc__ is None:  # else dataclasses writes one from inspect.signature, which is slow the first time
        cls.__doc__ = f"The VmSpec fields of {cls.__module__}."
    return cast(_Cls, dataclass(init=False, repr=False, eq=False)(cls))


class Record:
    """``__init__``, ``__eq__`` and ``__repr__`` of a spec record (VmSpec and its tables), written once over its
    dataclass fields. ``dataclasses`` compiles these three from source for every class, ~0.4 ms each class at
    every CLI start; what the spec's records need of them (positional or keyword arguments, defaults and
    default factories, field-wise equality) is this much."""

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        declared = fields(self)  # type: ignore[arg-type]
        if len(args) > len(declared):
            raise TypeError(f"{type(self).__name__}() takes {len(declared)} arguments, {len(args)} given")
        given = dict(zip((f.name for f in declared), args, strict=False))
        for name in kwargs:
            if name in given:
                raise TypeError(f"{type(self).__name__}() got {name!r} twice")
        given |= kwargs
        for f in declared:
            if f.name in given:
                value = given.pop(f.name)
            elif f.default is not MISSING:
                value = f.default
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                raise TypeError(f"{type(self).__name__}() needs {f.name!r}")
            setattr(self, f.name, value)
        if given:
            raise TypeError(f"{type(self).__name__}() got unexpected {', '.join(map(repr, given))}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, f.name) == getattr(other, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __repr__(self) -> str:
        values = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))  # type: ignore[arg-type]
        return f"{type(self).__name__}({values})"


@dataclass_transform(field_specifiers=(field,))
def spec_record(cls: _Cls) -> _Cls:
    """A spec record (VmSpec, a table such as Disk): a dataclass whose ``__init__``/``__eq__``/``__repr__`` are
    :class:`Record`'s (``cls`` subclasses it)."""
    if cls.__doc__ is None:
        cls.__doc__ = f"A record of {cls.__module__}."
    return cast(_Cls, dataclass(init=False, repr=False, eq=False)(cls))


# Field metadata: left out of the TOML file while it has its default (files written before it stay as they are).
OMIT_DEFAULT = {"omit_default": True}


def option(declaration: str, help: str) -> dict[str, str]:
    """Field metadata: the field's option of ``vgpuctl vm create/edit`` (click's declaration, its help)."""
    return {"option": declaration, "help": help}


# Field metadata: a table a change merges into (as the API's and the CLI's edits do), not one it replaces.
MERGED = {"merge": True}


class QemuContext:
    """What a device's QEMU arguments depend on besides the spec; notes collect what the user should see.
    A plain class, as XmlContext: made at every ``vm start``, where a dataclass costs ~0.5 ms to define."""

    __slots__ = ("accel", "notes", "paths", "replaced_vgpu", "simulated", "spec", "vgpu", "vhost_net")

    def __init__(self, spec: VmSpec, vgpu: ResolvedVgpu | None, accel: str, paths: RuntimePaths, simulated: bool,
                 vhost_net: bool, notes: list[str] | None = None) -> None:
        self.spec, self.vgpu, self.accel, self.paths = spec, vgpu, accel, paths
        self.simulated, self.vhost_net = simulated, vhost_net
        self.notes: list[str] = [] if notes is None else notes
        # simulated host: the vGPU's emulated stand-in, at this size
        self.replaced_vgpu: tuple[int, int] | None = None

    @property
    def gl(self) -> bool:
        """OpenGL in QEMU's UI: the vGPU is the display (dma-bufs) and a real GPU is there to import them."""
        return self.spec.vgpu_display and not self.simulated


class XmlContext:
    """Where a device puts its libvirt elements, and what libvirt has no element for."""

    __slots__ = ("commandline", "devices", "overrides", "paths", "spec", "vgpu")

    def __init__(self, spec: VmSpec, vgpu: ResolvedVgpu | None, paths: RuntimePaths | None, devices: Element,
                 commandline: list[str] | None = None) -> None:
        self.spec, self.vgpu, self.paths, self.devices = spec, vgpu, paths, devices
        self.commandline: list[str] = [] if commandline is None else commandline  # <qemu:commandline> arguments
        self.overrides: list[tuple[str, str, str]] = []  # the vGPU's (name, type, value) properties

    def add(self, parent: Element, tag: str, text: str | None = None, **attrs: str) -> Element:
        from xml.etree.ElementTree import SubElement

        element = SubElement(parent, tag, attrs)
        if text is not None:
            element.text = text
        return element

    def comment(self, parent: Element, text: str) -> None:
        from xml.etree.ElementTree import Comment

        parent.append(Comment(text))


@runtime_checkable
class DeviceKind(Protocol):
    QEMU_POSITION: int  # where its arguments go on QEMU's command line (the serial console before the boot order)
    XML_POSITION: int  # where its elements go in <devices>
    TABLES: tuple[type[Any], ...]
    Fields: type[Any]

    def check(self, spec: VmSpec) -> None: ...

    def qemu_args(self, ctx: QemuContext) -> list[str]: ...

    def xml(self, ctx: XmlContext) -> None: ...


def qemu_value(text: str) -> str:
    """A value inside QEMU's key=value,... option syntax (a comma is written twice)."""
    return text.replace(",", ",,")


def options(first: str, **props: str | None) -> str:
    """``first,k=v,...`` with None values left out."""
    return ",".join([first] + [f"{k}={v}" for k, v in props.items() if v is not None])


def xy(size: tuple[int, int] | None) -> dict[str, str | None]:
    """QEMU's EDID properties for a size."""
    return {"xres": str(size[0]), "yres": str(size[1])} if size else {}


def no_check(spec: VmSpec) -> None:
    """A kind's ``check`` when its fields need no validation of their own (or it has none)."""
