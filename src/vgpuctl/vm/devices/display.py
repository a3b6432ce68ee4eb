"""Where the VM's picture goes: QEMU's display backend (its UI) and its options; libvirt's <graphics>."""

from __future__ import annotations

from dataclasses import field
from typing import TYPE_CHECKING, Any

from vgpuctl.base.errors import InvalidInput
from vgpuctl.vm.checks import absolute, one_of, parse_resolution
from vgpuctl.vm.devices.base import MERGED, QemuContext, Record, XmlContext, qemu_value, spec_fields, spec_record

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

    from vgpuctl.vm.spec import VmSpec

QEMU_POSITION = 100
XML_POSITION = 60
BACKENDS = ("vnc", "spice", "egl-headless", "dbus", "gtk", "sdl", "none")
# Backends that can show a vGPU's dma-buf display: each runs (or, for vnc, is paired with) an
# OpenGL UI. "none" cannot: QEMU fails with "vfio-display-dmabuf: opengl not available".
GL_BACKENDS = ("vnc", "spice", "egl-headless", "dbus", "gtk", "sdl")
# display.options that only tune the backend QEMU already runs. Anything else could open a listener or a
# file (vnc websocket=/to=, spice port=/tls-port=/addr=, dbus addr=, ...): not settable through a spec.
DISPLAY_OPTIONS = ("gl", "p2p", "lossy", "non-adaptive", "key-delay-ms", "image-compression",
                   "jpeg-wan-compression", "zlib-glz-wan-compression", "playback-compression", "streaming-video",
                   "agent-mouse", "seamless-migration", "full-screen", "zoom-to-fit", "grab-on-hover",
                   "show-tabs", "show-cursor", "show-menubar", "window-close")


@spec_record
class Display(Record):
    """Where the VM's picture goes: the display backend and its options."""

    backend: str = field(default="vnc", metadata={"choices": BACKENDS})
    vnc_socket: str | None = None  # vnc and egl-headless; default <state-dir>/vms/<name>/vnc.sock
    rendernode: str | None = None  # DRM render node for OpenGL (egl-headless, spice, dbus)
    resolution: str | None = None  # fixed resolution: EDID xres/yres of the vGPU, or of the emulated VGA
    options: dict[str, str] = field(default_factory=dict)  # appended to the backend's QEMU option


TABLES: tuple[type[Any], ...] = (Display,)


@spec_fields
class Fields:
    display: Display = field(default_factory=Display, metadata=MERGED)


def fixed_resolution(spec: VmSpec) -> tuple[int, int] | None:
    """The screen size the spec fixes (display.resolution), for the emulated VGA or the vGPU's EDID."""
    wanted = spec.display.resolution
    return parse_resolution("display.resolution", wanted) if wanted else None


def check(spec: VmSpec) -> None:
    display = spec.display
    one_of("display.backend", display.backend, BACKENDS)
    absolute("display.vnc_socket", display.vnc_socket)
    absolute("display.rendernode", display.rendernode)
    if display.vnc_socket is not None and display.backend not in ("vnc", "egl-headless"):
        raise InvalidInput(f"display.vnc_socket needs display.backend vnc or egl-headless, not {display.backend!r}")
    if display.vnc_socket is not None and "," in display.vnc_socket:
        raise InvalidInput("display.vnc_socket must not contain ','")
    fixed_resolution(spec)
    for key, value in display.options.items():
        if key not in DISPLAY_OPTIONS:
            raise InvalidInput(f"display.options.{key} is not allowed (only options that cannot open a listener "
                               f"or a file: {', '.join(DISPLAY_OPTIONS)}); listeners are vgpuctl's to set up")
        if "," in value:
            raise InvalidInput(f"display.options.{key} must be a value without ',', got {value!r}")


def qemu_args(ctx: QemuContext) -> list[str]:
    display, gl, paths = ctx.spec.display, ctx.gl, ctx.paths
    backend = display.backend
    extra = "".join(f",{k}={v}" for k, v in display.options.items())
    render = f",rendernode={qemu_value(display.rendernode)}" if display.rendernode and gl else ""
    if backend in ("vnc", "egl-headless"):
        # egl-headless imports the dma-buf with OpenGL and copies it back for the VNC server.
        vnc = f"unix:{qemu_value(display.vnc_socket or str(paths.vnc_socket))}"
        egl = not ctx.simulated and (gl or backend == "egl-headless")
        if backend == "egl-headless" and ctx.simulated:
            ctx.notes.append("simulated host: no egl-headless (no render node, nothing to import): VNC alone")
        if display.rendernode and egl:
            render = f",rendernode={qemu_value(display.rendernode)}"
        head = f"egl-headless{render}" if egl else "none"
        if backend == "egl-headless":
            return ["-display", head + (extra if egl else ""), "-vnc", vnc]
        return ["-display", head, "-vnc", vnc + extra]
    if backend == "spice":
        spice = f"unix=on,addr={qemu_value(str(paths.spice_socket))},disable-ticketing=on"
        return ["-display", "none", "-spice", spice + (",gl=on" if gl else "") + render + extra]
    if backend == "dbus":
        p2p = "" if "p2p" in display.options else ",p2p=yes"
        return ["-display", f"dbus{p2p}" + (",gl=on" if gl else "") + render + extra]
    if backend in ("gtk", "sdl"):
        return ["-display", backend + (",gl=on" if gl else "") + extra]
    return ["-display", "none" + extra]


def xml(ctx: XmlContext) -> None:
    """The graphics elements for the backend; what libvirt has no element for goes to ctx.commandline."""
    display, devices, paths = ctx.spec.display, ctx.devices, ctx.paths
    backend = display.backend
    gl = ctx.spec.vgpu_display

    def gl_element(parent: Element) -> None:
        attrs = {"enable": "yes"}
        if display.rendernode:
            attrs["rendernode"] = display.rendernode
        ctx.add(parent, "gl", **attrs)

    if backend in ("vnc", "egl-headless"):
        if gl or backend == "egl-headless":
            egl = ctx.add(devices, "graphics", type="egl-headless")
            if display.rendernode:
                ctx.add(egl, "gl", rendernode=display.rendernode)
        vnc = ctx.add(devices, "graphics", type="vnc")
        socket = display.vnc_socket or (str(paths.vnc_socket) if paths else None)
        if socket:
            vnc.set("socket", socket)
        else:
            vnc.set("autoport", "yes")
            ctx.add(vnc, "listen", type="address", address="127.0.0.1")
    elif backend == "spice":
        spice = ctx.add(devices, "graphics", type="spice")
        if paths:
            ctx.add(spice, "listen", type="socket", socket=str(paths.spice_socket))
        else:
            ctx.add(spice, "listen", type="none")
        if gl:
            gl_element(spice)
    elif backend == "dbus":
        attrs = {"type": "dbus"}
        if "addr" not in display.options:
            attrs["p2p"] = "no" if display.options.get("p2p") == "no" else "yes"
        dbus = ctx.add(devices, "graphics", **attrs)
        if gl:
            gl_element(dbus)
    elif backend == "sdl":
        sdl = ctx.add(devices, "graphics", type="sdl")
        if gl:
            gl_element(sdl)
    elif backend == "gtk":
        # libvirt has no gtk graphics. QEMU's own option goes last on the command line and wins over
        # libvirt's -display; the egl-headless element only satisfies libvirt's rule that display='on'
        # needs a graphics device.
        ctx.comment(devices, " gtk: passed to QEMU as -display gtk (qemu:commandline), which replaces "
                             "the egl-headless display libvirt sets up ")
        if gl:
            ctx.add(devices, "graphics", type="egl-headless")
        ctx.commandline += ["-display", "gtk" + (",gl=on" if gl else "")]
