"""The test guest: a tiny bare-metal program of our own that QEMU boots in a fraction of a second under TCG.

The C and assembly sources ship with vgpuctl (``vgpuctl/vm/testguest/``) and are compiled here, on first use,
with Debian's gcc and binutils into a 32-bit multiboot (v1) ELF that QEMU loads with ``-kernel`` (machine
``pc`` or ``q35``). The guest

- sets a 32-bpp linear framebuffer through the Bochs VBE interface of QEMU's display device (PCI 1234:1111:
  ``-vga std``, ``-device VGA`` or ``-device bochs-display``), at the resolution compiled in (``resolution=``,
  default 1024x768) or the one given on its command line (``-append mode=1920x1080``);
- draws a gradient with a bar that moves with time, so two screenshots a moment apart differ; or, with
  ``anim=full`` on its command line (``kernel_args(..., animation="full")``), a pattern that scrolls diagonally
  over the whole screen, so every row changes in every frame, at ``fps=N`` frames per second (default 60, at most
  100: paced by its 100 Hz timer; as fast as it can when a frame takes longer to draw);
- switches its colour scheme (blue, red, green background in turn) on every PS/2 key press; the
  background's strongest channel is the scheme's in every pixel, so any row shows the scheme (in ``anim=full``
  the whole screen is background);
- powers off (ACPI S5) when the ACPI power button is pressed (QMP ``system_powerdown``), so QEMU exits;
- writes ``vgpuctl-test-guest ready ...`` to the isa-debugcon port 0xe9 once its first frame is on screen,
  then a ``... key scancode=0x1e scheme=1`` line per key press and a line when it powers off; with ``anim=full``
  also ``... anim=full fps=60`` after the ready line and, once a second, ``... frames=58 ms=1000`` (frames drawn
  in that many milliseconds: the guest's real repaint rate, see ``frame_rate``).

Builds are cached under ``$VGPUCTL_CACHE_DIR`` (else ``~/.cache/vgpuctl``) by a hash of the sources, the
resolution, the build flags and the compiler and linker versions, and land there atomically, so concurrent
builds are safe.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

READY_LINE = "vgpuctl-test-guest ready"
"""The start of the line the guest writes to the debug console once its first frame is drawn."""
DEBUGCON_IOBASE = 0xE9
DEFAULT_RESOLUTION = (1024, 768)
MAX_DIMENSION = 4096
MAX_FPS = 100
"""anim=full draws at most one frame per tick of the guest's 100 Hz timer."""
Animation = Literal["bar", "full"]
# Whole lines only: the guest may still be writing the last one when the log is read.
_FRAMES_RE = re.compile(r"^vgpuctl-test-guest frames=(\d+) ms=(\d+)\r?\n", re.MULTILINE)
DEBIAN_PACKAGES = ("gcc", "binutils")
"""What building the guest needs on Debian (booting it needs qemu-system-x86 too)."""

_SOURCE_SUFFIXES = (".c", ".S", ".ld")
_RECIPE_VERSION = "1"
_CFLAGS = (
    "-m32", "-march=i686", "-ffreestanding", "-nostdinc", "-fno-pie", "-fno-pic", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-mgeneral-regs-only", "-O2", "-Wall", "-Wextra",
)
_LDFLAGS = ("-m", "elf_i386", "-nostdlib", "--build-id=none")


class TestGuestBuildError(RuntimeError):
    """The test guest could not be built (missing compiler, failed compile or link, unwritable cache)."""

    __test__ = False  # not a pytest test class, whatever its name


def default_cache_dir() -> Path:
    """``$VGPUCTL_CACHE_DIR``, else ``~/.cache/vgpuctl``."""
    env = os.environ.get("VGPUCTL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vgpuctl"


def kernel_cmdline(resolution: tuple[int, int] | None = None, animation: Animation = "bar",
                   fps: int | None = None) -> str:
    """The guest command line (QEMU ``-append``) that picks a resolution and an animation at boot.

    ``fps`` (1..100) only applies to ``animation="full"``; the guest's default is 60.
    """
    words: list[str] = []
    if resolution is not None:
        width, height = _check_resolution(resolution)
        words.append(f"mode={width}x{height}")
    if animation == "full":
        words.append("anim=full")
        if fps is not None:
            if not 1 <= fps <= MAX_FPS:
                raise ValueError(f"fps {fps} outside 1..{MAX_FPS}")
            words.append(f"fps={fps}")
    elif animation != "bar":
        raise ValueError(f"unknown animation {animation!r}: bar or full")
    elif fps is not None:
        raise ValueError("fps applies to animation='full' only (the bar moves with every timer tick)")
    return " ".join(words)


def kernel_args(elf: Path, resolution: tuple[int, int] | None = None, animation: Animation = "bar",
                fps: int | None = None) -> list[str]:
    """QEMU arguments that boot the guest: ``-kernel ELF`` and, when something is chosen at boot, ``-append``."""
    args = ["-kernel", str(elf)]
    if cmdline := kernel_cmdline(resolution, animation, fps):
        args += ["-append", cmdline]
    return args


def frame_rate(debug_log: str, skip: int = 0) -> float | None:
    """Frames per second the guest drew (``anim=full``), from the ``frames=N ms=T`` lines of its debug log after
    the first ``skip`` of them; None without such lines."""
    counts = [(int(n), int(ms)) for n, ms in _FRAMES_RE.findall(debug_log)][skip:]
    total_ms = sum(ms for _, ms in counts)
    return 1000 * sum(n for n, _ in counts) / total_ms if total_ms else None


def frame_reports(debug_log: str) -> int:
    """How many ``frames=N ms=T`` lines the debug log holds (for ``frame_rate``'s ``skip``)."""
    return len(_FRAMES_RE.findall(debug_log))


def build_test_guest(
    cache_dir: Path | None = None, *, resolution: tuple[int, int] = DEFAULT_RESOLUTION
) -> Path:
    """The path of the test guest's ELF, compiled on first use and cached.

    ``resolution`` is the mode the guest sets unless its command line says otherwise. Raises
    TestGuestBuildError when gcc or ld is missing or the build fails.
    """
    width, height = _check_resolution(resolution)
    gcc = shutil.which("gcc")
    if gcc is None:
        raise TestGuestBuildError(
            "gcc not found: building the test guest needs a C compiler (Debian: apt-get install gcc binutils)"
        )
    ld = _find_linker(gcc)
    sources = _read_sources()
    defines = (f"-DTG_DEFAULT_WIDTH={width}", f"-DTG_DEFAULT_HEIGHT={height}")

    digest = hashlib.sha256()
    for part in (_RECIPE_VERSION, *_CFLAGS, *defines, *_LDFLAGS, _tool_version(gcc), _tool_version(ld)):
        digest.update(part.encode() + b"\0")
    for name, data in sorted(sources.items()):
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    key = digest.hexdigest()[:20]

    directory = (cache_dir if cache_dir is not None else default_cache_dir()) / "testguest"
    target = directory / f"vgpuctl-test-guest-{width}x{height}-{key}.elf"
    if target.is_file():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
    except OSError as exc:
        raise TestGuestBuildError(f"cannot create the test guest cache {directory}: {exc}") from exc
    try:
        for name, data in sources.items():
            (workdir / name).write_bytes(data)
        objects: list[str] = []
        for name in sorted(sources):
            if name.endswith((".c", ".S")):
                obj = name.rsplit(".", 1)[0] + ".o"
                _run([gcc, *_CFLAGS, *defines, "-c", name, "-o", obj], workdir)
                objects.append(obj)
        scripts = sorted(name for name in sources if name.endswith(".ld"))
        if len(scripts) != 1:
            raise TestGuestBuildError(f"expected one linker script among the test guest sources, found {scripts}")
        _run([ld, *_LDFLAGS, "-T", scripts[0], "-o", "guest.elf", *objects], workdir)
        elf = workdir / "guest.elf"
        if elf.read_bytes()[:5] != b"\x7fELF\x01":
            raise TestGuestBuildError(f"{elf} is not a 32-bit ELF")
        os.replace(elf, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target


def _check_resolution(resolution: tuple[int, int]) -> tuple[int, int]:
    width, height = resolution
    if not (320 <= width <= MAX_DIMENSION and 200 <= height <= MAX_DIMENSION):
        raise ValueError(f"resolution {width}x{height} outside 320x200..{MAX_DIMENSION}x{MAX_DIMENSION}")
    return width, height


def _find_linker(gcc: str) -> str:
    try:
        name = subprocess.run([gcc, "-print-prog-name=ld"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        name = "ld"
    ld = shutil.which(name.strip() or "ld")
    if ld is None:
        raise TestGuestBuildError(
            "ld not found: building the test guest needs GNU ld (Debian: apt-get install binutils)"
        )
    return ld


def _tool_version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise TestGuestBuildError(f"{tool} --version failed: {exc}") from exc
    return out.splitlines()[0] if out else tool


def _read_sources() -> dict[str, bytes]:
    folder = resources.files("vgpuctl.vm").joinpath("testguest")
    sources = {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(_SOURCE_SUFFIXES)
    }
    if not sources:
        raise TestGuestBuildError("the test guest sources (vgpuctl/vm/testguest/) are missing from this install")
    return sources


def _run(argv: Sequence[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise TestGuestBuildError(f"cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise TestGuestBuildError(
            f"building the test guest failed: {' '.join(argv)} exited {proc.returncode}\n{proc.stderr.strip()}"
        )
