"""A small asyncio RFB (VNC) 3.8 client for QEMU's VNC server on a unix socket.

What it speaks, and only that (QEMU's server on loopback, see the streaming spec §4):

- the handshake with security type None (QEMU's ``-vnc unix:<path>`` without ``password=on``), a *shared*
  ClientInit (other VNC clients stay connected), ServerInit;
- SetPixelFormat 32 bpp, depth 24, little-endian, red/green/blue shifts 16/8/0: QEMU's own surface format
  (pixman x8r8g8b8), so QEMU copies rows instead of converting pixels; in memory that is B, G, R, X, which
  simplejpeg takes as ``colorspace="BGRX"``;
- SetEncodings Raw (0: no work on either side over a unix socket), DesktopSize (-223), ExtendedDesktopSize
  (-308) and QEMU Extended Key Event (-258);
- FramebufferUpdate with Raw rectangles, written straight from the socket into a NumPy framebuffer
  (``height x width x 4`` uint8), and the resize pseudo-rectangles, which reallocate it; SetColourMapEntries,
  Bell and ServerCutText are read and ignored;
- FramebufferUpdateRequest, PointerEvent, KeyEvent (X keysym) and QEMU's extended key event (type 255,
  sub-type 0: down flag, keysym, XT scancode — layout-independent, used whenever the server acknowledged
  the pseudo-encoding), with a table from browser ``KeyboardEvent.code`` to XT scancodes.

Pipelining: with ``auto_request`` set, the client sends the next incremental FramebufferUpdateRequest as soon
as an update's header arrives, before reading its pixels. QEMU keeps one "update wanted" flag per client (not a
queue) and only sends on its refresh timer (30 ms at best), so one request always being outstanding is what
keeps a busy screen at QEMU's full rate: a timer tick that finds no request lengthens QEMU's refresh interval.
So does a tick that finds the previous update not yet written out: a 1920x1080 Raw update is 8 MB. Hence
:meth:`RfbClient.connect_via_qmp` (QEMU's end of the connection gets a send buffer for a whole update, instead
of the ~200 KB of ``-vnc unix:``), and whole rows go straight from the socket into the framebuffer.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

Framebuffer = npt.NDArray[np.uint8]

ENCODING_RAW = 0
ENCODING_DESKTOP_SIZE = -223
ENCODING_EXTENDED_DESKTOP_SIZE = -308
ENCODING_QEMU_EXTENDED_KEY_EVENT = -258
DEFAULT_ENCODINGS = (ENCODING_RAW, ENCODING_DESKTOP_SIZE, ENCODING_EXTENDED_DESKTOP_SIZE,
                     ENCODING_QEMU_EXTENDED_KEY_EVENT)

# client -> server message types
MSG_SET_PIXEL_FORMAT = 0
MSG_SET_ENCODINGS = 2
MSG_FRAMEBUFFER_UPDATE_REQUEST = 3
MSG_KEY_EVENT = 4
MSG_POINTER_EVENT = 5
MSG_QEMU = 255
QEMU_EXTENDED_KEY_EVENT = 0
# server -> client message types
MSG_FRAMEBUFFER_UPDATE = 0
MSG_SET_COLOUR_MAP_ENTRIES = 1
MSG_BELL = 2
MSG_SERVER_CUT_TEXT = 3

SECURITY_NONE = 1
QEMU_SEND_BUFFER = 32 << 20
"""Send buffer of QEMU's end of a :meth:`RfbClient.connect_via_qmp` connection: a whole 3840x2160 Raw update."""
QMP_FD_NAME = "vgpuctl-display"
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux; Python does not name it
MAX_DIMENSION = 16384
_READ_BUFFER = 1 << 18


class RfbError(Exception):
    """The server broke the protocol, refused us, or wants something this client does not speak."""


class RfbClosed(RfbError):
    """The server closed the connection (QEMU exited or dropped us)."""


@dataclass(frozen=True)
class PixelFormat:
    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    _STRUCT = struct.Struct(">BBBBHHHBBB3x")

    def pack(self) -> bytes:
        return self._STRUCT.pack(self.bits_per_pixel, self.depth, self.big_endian, self.true_colour,
                                 self.red_max, self.green_max, self.blue_max,
                                 self.red_shift, self.green_shift, self.blue_shift)

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, be, tc, rmax, gmax, bmax, rs, gs, bs = cls._STRUCT.unpack(data)
        return cls(bpp, depth, bool(be), bool(tc), rmax, gmax, bmax, rs, gs, bs)

    @property
    def colorspace(self) -> str | None:
        """The simplejpeg colour space of a pixel in memory ("BGRX", "RGBX", ...), None if it has no such name."""
        if not (self.bits_per_pixel == 32 and self.true_colour and self.red_max == self.green_max == self.blue_max
                == 255):
            return None
        shifts = (self.red_shift, self.green_shift, self.blue_shift)
        if sorted(shifts) not in ([0, 8, 16], [8, 16, 24]):
            return None
        byte_of = {s: (s // 8 if not self.big_endian else 3 - s // 8) for s in shifts}
        letters = ["X"] * 4
        for letter, shift in zip("RGB", shifts, strict=True):
            letters[byte_of[shift]] = letter
        return "".join(letters)


BGRX = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)
"""QEMU's native surface format: no per-pixel conversion in QEMU; B, G, R, X bytes in memory."""


@dataclass
class Update:
    """One FramebufferUpdate, already applied to :attr:`RfbClient.framebuffer`."""

    rects: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(x, y, w, h) of every Raw rectangle painted (clipped to the framebuffer)."""
    resized: bool = False
    started: float = 0.0
    """time.time() when the update's header arrived."""
    finished: float = 0.0
    """time.time() when its last rectangle had been read."""


# ------------------------------------------------------------------------------------------------- keyboard

# Browser KeyboardEvent.code -> XT (scan code set 1) make code; two-byte codes as 0xE0xx. Pause (E1 1D 45 in
# hardware) is 0xE046 as QEMU numbers it.
_XT_SIMPLE = {
    "Escape": 0x01, "Digit1": 0x02, "Digit2": 0x03, "Digit3": 0x04, "Digit4": 0x05, "Digit5": 0x06,
    "Digit6": 0x07, "Digit7": 0x08, "Digit8": 0x09, "Digit9": 0x0A, "Digit0": 0x0B, "Minus": 0x0C,
    "Equal": 0x0D, "Backspace": 0x0E, "Tab": 0x0F, "KeyQ": 0x10, "KeyW": 0x11, "KeyE": 0x12, "KeyR": 0x13,
    "KeyT": 0x14, "KeyY": 0x15, "KeyU": 0x16, "KeyI": 0x17, "KeyO": 0x18, "KeyP": 0x19, "BracketLeft": 0x1A,
    "BracketRight": 0x1B, "Enter": 0x1C, "ControlLeft": 0x1D, "KeyA": 0x1E, "KeyS": 0x1F, "KeyD": 0x20,
    "KeyF": 0x21, "KeyG": 0x22, "KeyH": 0x23, "KeyJ": 0x24, "KeyK": 0x25, "KeyL": 0x26, "Semicolon": 0x27,
    "Quote": 0x28, "Backquote": 0x29, "ShiftLeft": 0x2A, "Backslash": 0x2B, "KeyZ": 0x2C, "KeyX": 0x2D,
    "KeyC": 0x2E, "KeyV": 0x2F, "KeyB": 0x30, "KeyN": 0x31, "KeyM": 0x32, "Comma": 0x33, "Period": 0x34,
    "Slash": 0x35, "ShiftRight": 0x36, "NumpadMultiply": 0x37, "AltLeft": 0x38, "Space": 0x39,
    "CapsLock": 0x3A, "F1": 0x3B, "F2": 0x3C, "F3": 0x3D, "F4": 0x3E, "F5": 0x3F, "F6": 0x40, "F7": 0x41,
    "F8": 0x42, "F9": 0x43, "F10": 0x44, "NumLock": 0x45, "ScrollLock": 0x46, "Numpad7": 0x47,
    "Numpad8": 0x48, "Numpad9": 0x49, "NumpadSubtract": 0x4A, "Numpad4": 0x4B, "Numpad5": 0x4C,
    "Numpad6": 0x4D, "NumpadAdd": 0x4E, "Numpad1": 0x4F, "Numpad2": 0x50, "Numpad3": 0x51, "Numpad0": 0x52,
    "NumpadDecimal": 0x53, "PrintScreen": 0x54, "F16": 0x55, "IntlBackslash": 0x56, "F11": 0x57, "F12": 0x58,
    "NumpadEqual": 0x59, "F20": 0x5A, "F13": 0x5D, "F14": 0x5E, "F15": 0x5F, "Open": 0x64, "Paste": 0x65,
    "F23": 0x6D, "F24": 0x6F, "KanaMode": 0x70, "IntlRo": 0x73, "F21": 0x74, "Lang5": 0x76, "Lang4": 0x77,
    "Lang3": 0x78, "Convert": 0x79, "NonConvert": 0x7B, "IntlYen": 0x7D, "NumpadComma": 0x7E,
}
_XT_EXTENDED = {  # second byte after the 0xE0 prefix
    "F17": 0x03, "F19": 0x04, "Again": 0x05, "Props": 0x06, "Undo": 0x07, "MediaTrackPrevious": 0x10,
    "MediaTrackNext": 0x19, "NumpadEnter": 0x1C, "ControlRight": 0x1D, "AudioVolumeMute": 0x20,
    "LaunchApp2": 0x21, "MediaPlayPause": 0x22, "MediaStop": 0x24, "Suspend": 0x25, "AudioVolumeDown": 0x2E,
    "AudioVolumeUp": 0x30, "BrowserHome": 0x32, "NumpadDivide": 0x35, "AltRight": 0x38, "Cut": 0x3C,
    "Find": 0x41, "Pause": 0x46, "Home": 0x47, "ArrowUp": 0x48, "PageUp": 0x49, "ArrowLeft": 0x4B,
    "ArrowRight": 0x4D, "End": 0x4F, "ArrowDown": 0x50, "PageDown": 0x51, "Insert": 0x52, "Delete": 0x53,
    "MetaLeft": 0x5B, "MetaRight": 0x5C, "ContextMenu": 0x5D, "Power": 0x5E, "Sleep": 0x5F, "WakeUp": 0x63,
    "BrowserSearch": 0x65, "BrowserFavorites": 0x66, "BrowserRefresh": 0x67, "BrowserStop": 0x68,
    "BrowserForward": 0x69, "BrowserBack": 0x6A, "LaunchApp1": 0x6B, "LaunchMail": 0x6C, "MediaSelect": 0x6D,
    "Help": 0x75, "NumpadParenLeft": 0x76, "F18": 0x77, "Copy": 0x78, "F22": 0x79, "NumpadParenRight": 0x7B,
    "Eject": 0x7D,
}
XT_SCANCODES: dict[str, int] = {**_XT_SIMPLE, **{code: 0xE000 | b for code, b in _XT_EXTENDED.items()}}
"""Browser ``KeyboardEvent.code`` -> XT make code (0xE0xx for the two-byte ones)."""
# Aliases older browsers send.
XT_SCANCODES.update({"OSLeft": XT_SCANCODES["MetaLeft"], "OSRight": XT_SCANCODES["MetaRight"],
                     "VolumeMute": XT_SCANCODES["AudioVolumeMute"], "VolumeDown": XT_SCANCODES["AudioVolumeDown"],
                     "VolumeUp": XT_SCANCODES["AudioVolumeUp"]})


def qemu_keycode(code: str) -> int | None:
    """The keycode field of QEMU's extended key event: the XT code, with 0xE0xx sent as 0x80|xx."""
    xt = XT_SCANCODES.get(code)
    if xt is None:
        return None
    if xt >> 8 == 0xE0 and (xt & 0xFF) < 0x80:
        return 0x80 | (xt & 0x7F)
    return xt


# X keysyms for keys whose KeyboardEvent.key is not a single character, by KeyboardEvent.code.
_KEYSYMS_BY_CODE = {
    "Backspace": 0xFF08, "Tab": 0xFF09, "Enter": 0xFF0D, "NumpadEnter": 0xFF8D, "Pause": 0xFF13,
    "ScrollLock": 0xFF14, "PrintScreen": 0xFF61, "Escape": 0xFF1B, "Delete": 0xFFFF, "Home": 0xFF50,
    "ArrowLeft": 0xFF51, "ArrowUp": 0xFF52, "ArrowRight": 0xFF53, "ArrowDown": 0xFF54, "PageUp": 0xFF55,
    "PageDown": 0xFF56, "End": 0xFF57, "Insert": 0xFF63, "ContextMenu": 0xFF67, "NumLock": 0xFF7F,
    "ShiftLeft": 0xFFE1, "ShiftRight": 0xFFE2, "ControlLeft": 0xFFE3, "ControlRight": 0xFFE4,
    "CapsLock": 0xFFE5, "AltLeft": 0xFFE9, "AltRight": 0xFFEA, "MetaLeft": 0xFFEB, "MetaRight": 0xFFEC,
    "OSLeft": 0xFFEB, "OSRight": 0xFFEC,
    **{f"F{n}": 0xFFBE + n - 1 for n in range(1, 25)},
}


def keysym_for(code: str, key: str | None) -> int:
    """The X keysym for a browser key event: from ``key`` when it is one character, else from ``code``; 0 if
    neither says (QEMU ignores the keysym of an extended key event unless it was started with ``-k``)."""
    if key is not None and len(key) == 1:
        cp = ord(key)
        return cp if 0x20 <= cp <= 0x7E or 0xA0 <= cp <= 0xFF else 0x01000000 | cp
    return _KEYSYMS_BY_CODE.get(code, 0)


# Browser MouseEvent.buttons bits -> RFB button-mask bits.
_BUTTONS = ((1, 0x01), (4, 0x02), (2, 0x04), (8, 0x80))
WHEEL_UP, WHEEL_DOWN, WHEEL_LEFT, WHEEL_RIGHT = 0x08, 0x10, 0x20, 0x40


def rfb_buttons(browser_buttons: int) -> int:
    """RFB pointer mask (left 1, middle 2, right 4, back 0x80) from ``MouseEvent.buttons`` (left 1, right 2,
    middle 4, back 8)."""
    return sum(rfb for browser, rfb in _BUTTONS if browser_buttons & browser)


# --------------------------------------------------------------------------------------------------- client


class _Reader:
    """Buffered reads from a non-blocking socket; large payloads land directly in the caller's buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray(_READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    async def _more(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            size = self._end - self._start
            self._view[:size] = self._view[self._start:self._end]
            self._start, self._end = 0, size
        n = await asyncio.get_running_loop().sock_recv_into(self._sock, self._view[self._end:])
        if n == 0:
            raise RfbClosed("the VNC server closed the connection")
        self._end += n

    async def exactly(self, n: int) -> bytes:
        if n > len(self._buf):
            out = bytearray(n)
            await self.into(memoryview(out))
            return bytes(out)
        while self._end - self._start < n:
            await self._more()
        data = bytes(self._view[self._start:self._start + n])
        self._start += n
        return data

    async def into(self, target: memoryview) -> None:
        have = min(self._end - self._start, len(target))
        target[:have] = self._view[self._start:self._start + have]
        self._start += have
        loop = asyncio.get_running_loop()
        pos = have
        while pos < len(target):
            n = await loop.sock_recv_into(self._sock, target[pos:])
            if n == 0:
                raise RfbClosed("the VNC server closed the connection")
            pos += n

    async def skip(self, n: int) -> None:
        while n > 0:
            chunk = min(n, len(self._buf))
            await self.exactly(chunk)
            n -= chunk


def grow_send_buffer(sock: socket.socket, size: int) -> None:
    """Ask for a ``size``-byte send buffer: beyond ``net.core.wmem_max`` with CAP_NET_ADMIN (SO_SNDBUFFORCE), else
    as much as ``wmem_max`` allows (the kernel caps SO_SNDBUF silently)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class RfbClient:
    """One connection to a VNC server; create with :meth:`connect`.

    Not safe for concurrent :meth:`read_message` calls (one reader task); sending (input, requests) is safe from
    any task of the same event loop.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = _Reader(sock)
        self._write_lock = asyncio.Lock()
        self._scratch: Framebuffer = np.empty(0, np.uint8)
        self.width = 0
        self.height = 0
        self.name = ""
        self.server_version = ""
        self.server_pixel_format: PixelFormat | None = None
        self.pixel_format = BGRX
        self.framebuffer: Framebuffer = np.zeros((0, 0, 4), np.uint8)
        self.ext_key_events = False
        """True once the server acknowledged QEMU's extended key event pseudo-encoding."""
        self.auto_request = False
        """Send an incremental FramebufferUpdateRequest whenever an update's header arrives (pipelining)."""
        self.updates = 0
        self.bytes_read = 0
        self.closed = False

    # ----------------------------------------------------------------------------------- connection

    @classmethod
    async def connect(cls, path: str | Path, *, shared: bool = True, timeout: float = 10.0,
                      encodings: Sequence[int] = DEFAULT_ENCODINGS,
                      pixel_format: PixelFormat = BGRX) -> RfbClient:
        """Connect to the unix socket at ``path``, handshake, and set the pixel format and encodings."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, str(path)), timeout)
        except BaseException:
            sock.close()
            raise
        return await cls._start(sock, shared, timeout, encodings, pixel_format)

    @classmethod
    async def connect_via_qmp(cls, qmp_socket: str | Path, *, shared: bool = True, timeout: float = 10.0,
                              encodings: Sequence[int] = DEFAULT_ENCODINGS,
                              pixel_format: PixelFormat = BGRX) -> RfbClient:
        """Connect by handing QEMU one end of a socketpair as a VNC client (QMP ``getfd`` + ``add_client``), that
        end with a send buffer for a whole update (:data:`QEMU_SEND_BUFFER`).

        Why: after each socket write QEMU's VNC server moves the unwritten rest of its output buffer down, so
        through the default ~200 KB send buffer of ``-vnc unix:`` a 1920x1080 Raw update (8 MB) takes ~40 writes
        and ~10 ms of memmove in QEMU's main loop, and ~12 ms to arrive; in one buffer it is a write or two and
        ~2 ms. QEMU's QMP socket takes one client at a time: ``timeout`` bounds the wait for it.
        Raises :class:`~vgpuctl.vm.qmp.QmpError` when QMP fails, as :meth:`connect` does the rest."""
        from vgpuctl.vm.qmp import QmpClient

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            grow_send_buffer(theirs, QEMU_SEND_BUFFER)
            async with QmpClient(qmp_socket, name="vgpuctl-display", timeout=timeout) as qmp:
                await qmp.add_vnc_client(theirs, QMP_FD_NAME)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # QEMU has its own copy now
        ours.setblocking(False)
        return await cls._start(ours, shared, timeout, encodings, pixel_format)

    @classmethod
    async def _start(cls, sock: socket.socket, shared: bool, timeout: float, encodings: Sequence[int],
                     pixel_format: PixelFormat) -> RfbClient:
        client = cls(sock)
        try:
            await asyncio.wait_for(client._handshake(shared), timeout)
            await client.set_pixel_format(pixel_format)
            await client.set_encodings(encodings)
        except BaseException:
            client.close()
            raise
        return client

    async def _handshake(self, shared: bool) -> None:
        r = self._reader
        version = await r.exactly(12)
        if not (version.startswith(b"RFB ") and version.endswith(b"\n") and version[7:8] == b"."):
            raise RfbError(f"not an RFB server: {version!r}")
        self.server_version = version[4:11].decode()
        major, minor = int(version[4:7]), int(version[8:11])
        if (major, minor) < (3, 3):
            raise RfbError(f"RFB {major}.{minor} is too old")
        ours = (3, 8) if (major, minor) >= (3, 8) else (3, 7) if (major, minor) >= (3, 7) else (3, 3)
        await self._send(b"RFB %03d.%03d\n" % ours)
        if ours == (3, 3):
            (security,) = struct.unpack(">I", await r.exactly(4))
            if security == 0:
                raise RfbError(f"the server refused the connection: {await self._reason()}")
            if security != SECURITY_NONE:
                raise RfbError(f"the server wants security type {security}; only None (1) is supported")
        else:
            (count,) = await r.exactly(1)
            if count == 0:
                raise RfbError(f"the server refused the connection: {await self._reason()}")
            types = list(await r.exactly(count))
            if SECURITY_NONE not in types:
                raise RfbError(f"the server offers security types {types}; only None (1) is supported "
                               "(start QEMU's VNC without password=on; the socket's permissions guard it)")
            await self._send(bytes([SECURITY_NONE]))
            if ours == (3, 8):
                (result,) = struct.unpack(">I", await r.exactly(4))
                if result != 0:
                    raise RfbError(f"security handshake failed: {await self._reason()}")
        await self._send(bytes([1 if shared else 0]))
        width, height = struct.unpack(">HH", await r.exactly(4))
        self.server_pixel_format = PixelFormat.unpack(await r.exactly(16))
        (name_length,) = struct.unpack(">I", await r.exactly(4))
        self.name = (await r.exactly(name_length)).decode("utf-8", "replace")
        self._resize(width, height)

    async def _reason(self) -> str:
        (length,) = struct.unpack(">I", await self._reader.exactly(4))
        return (await self._reader.exactly(min(length, 65536))).decode("utf-8", "replace")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()

    # ----------------------------------------------------------------------------------- client messages

    async def _send(self, data: bytes) -> None:
        if self.closed:
            raise RfbClosed("the connection is closed")
        async with self._write_lock:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def set_pixel_format(self, pixel_format: PixelFormat) -> None:
        if pixel_format.colorspace is None:
            raise ValueError(f"{pixel_format} is not a byte-aligned 32-bpp format")
        await self._send(struct.pack(">B3x", MSG_SET_PIXEL_FORMAT) + pixel_format.pack())
        self.pixel_format = pixel_format

    async def set_encodings(self, encodings: Sequence[int]) -> None:
        await self._send(struct.pack(f">BxH{len(encodings)}i", MSG_SET_ENCODINGS, len(encodings), *encodings))

    async def request_update(self, incremental: bool = True, area: tuple[int, int, int, int] | None = None) -> None:
        x, y, w, h = area if area is not None else (0, 0, self.width, self.height)
        await self._send(struct.pack(">BBHHHH", MSG_FRAMEBUFFER_UPDATE_REQUEST, incremental, x, y, w, h))

    async def key_event(self, keysym: int, down: bool) -> None:
        await self._send(struct.pack(">BB2xI", MSG_KEY_EVENT, down, keysym))

    async def ext_key_event(self, keysym: int, keycode: int, down: bool) -> None:
        """QEMU's extended key event: the guest gets the scancode whatever the keysym (unless QEMU has ``-k``)."""
        await self._send(struct.pack(">BBHII", MSG_QEMU, QEMU_EXTENDED_KEY_EVENT, down, keysym, keycode))

    async def key(self, code: str, key: str | None, down: bool) -> bool:
        """A browser key event (``KeyboardEvent.code`` and ``.key``). False if it could not be expressed."""
        keysym = keysym_for(code, key)
        keycode = qemu_keycode(code)
        if self.ext_key_events and keycode is not None:
            await self.ext_key_event(keysym, keycode, down)
            return True
        if keysym:
            await self.key_event(keysym, down)
            return True
        return False

    async def pointer_event(self, x: int, y: int, mask: int) -> None:
        x = min(max(x, 0), max(self.width - 1, 0))
        y = min(max(y, 0), max(self.height - 1, 0))
        await self._send(struct.pack(">BBHH", MSG_POINTER_EVENT, mask & 0xFF, x, y))

    # ----------------------------------------------------------------------------------- server messages

    def _resize(self, width: int, height: int) -> None:
        if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
            raise RfbError(f"framebuffer size {width}x{height} out of range")
        self.width, self.height = width, height
        self.framebuffer = np.zeros((height, width, 4), np.uint8)

    async def read_message(self) -> Update | None:
        """Read one server message. A FramebufferUpdate is applied to :attr:`framebuffer` and returned; other
        messages (bell, cut text, colour map) are consumed and give None. Raises RfbClosed at end of stream."""
        r = self._reader
        (kind,) = await r.exactly(1)
        if kind == MSG_FRAMEBUFFER_UPDATE:
            return await self._read_update()
        if kind == MSG_SET_COLOUR_MAP_ENTRIES:
            _, _, count = struct.unpack(">BHH", await r.exactly(5))
            await r.skip(6 * count)
        elif kind == MSG_BELL:
            pass
        elif kind == MSG_SERVER_CUT_TEXT:
            (length,) = struct.unpack(">3xi", await r.exactly(7))
            await r.skip(abs(length))
        else:
            raise RfbError(f"unexpected server message type {kind}")
        return None

    async def _read_update(self) -> Update:
        r = self._reader
        update = Update(started=time.time())
        if self.auto_request:
            await self.request_update(incremental=True)
        (count,) = struct.unpack(">xH", await r.exactly(3))
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await r.exactly(12))
            if encoding == ENCODING_RAW:
                await self._read_raw(x, y, w, h)
                x1, y1 = min(x + w, self.width), min(y + h, self.height)
                if x1 > x and y1 > y:
                    update.rects.append((x, y, x1 - x, y1 - y))
            elif encoding == ENCODING_DESKTOP_SIZE:
                self._resize(w, h)
                update.resized = True
                update.rects.clear()
            elif encoding == ENCODING_EXTENDED_DESKTOP_SIZE:
                (screens,) = struct.unpack(">B3x", await r.exactly(4))
                await r.skip(16 * screens)
                # x: reason (0 server, 1 our request, 2 another client's); y: status (0 = success)
                if y == 0 and (w, h) != (self.width, self.height):
                    self._resize(w, h)
                    update.resized = True
                    update.rects.clear()
            elif encoding == ENCODING_QEMU_EXTENDED_KEY_EVENT:
                self.ext_key_events = True
            else:
                raise RfbError(f"unexpected rectangle encoding {encoding} (not requested)")
        self.updates += 1
        update.finished = time.time()
        return update

    async def _read_raw(self, x: int, y: int, w: int, h: int) -> None:
        """Read a Raw rectangle into the framebuffer."""
        bpp = 4
        size = w * h * bpp
        self.bytes_read += size
        fb = self.framebuffer
        if x + w > self.width or y + h > self.height:  # outside the framebuffer: keep the part inside
            data = np.frombuffer(await self._reader.exactly(size), np.uint8).reshape(h, w, bpp)
            x1, y1 = min(x + w, self.width), min(y + h, self.height)
            if x1 > x and y1 > y:
                fb[y:y1, x:x1] = data[: y1 - y, : x1 - x]
            return
        if x == 0 and w == self.width:  # whole rows: contiguous in the framebuffer, read straight into it
            row = w * bpp
            await self._reader.into(fb.reshape(-1).data[y * row:(y + h) * row])
            return
        if self._scratch.size < size:
            self._scratch = np.empty(size, np.uint8)
        part = self._scratch[:size]
        await self._reader.into(part.data)
        fb[y:y + h, x:x + w] = part.reshape(h, w, bpp)
