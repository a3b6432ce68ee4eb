"""The test guest: a tiny bare-metal program of our own that QEMU boots in a fraction of a second under TCG.

The C and assembly sources ship with vgpuctl (``vgpuctl/vm/testguest/``) and are compiled here, on first use,
with Debian's gcc and binutils into a 32-bit multiboot (v1) ELF that QEMU loads with ``-kernel`` (machine
``pc`` or ``q35``). The guest

- sets a 32-bpp linear framebuffer through the Bochs VBE interface of QEMU's display device (PCI 1234:1111:
  ``-vga std``, ``-device VGA`` or ``-device bochs-display``), at the resolution compiled in (``resolution=``,
  default 1024x768) or the one given on its command line (``-append mode=1920x1080``);
- draws a gradient with a bar that moves with time, so two screenshots a moment apart differ;
- switches its colour scheme (blue, red, green background in turn) on every PS/2 key press;
- powers off (ACPI S5) when the ACPI power button is pressed (QMP ``system_powerdown``), so QEMU exits;
- writes ``vgpuctl-test-guest ready ...`` to the isa-debugcon port 0xe9 once its first frame is on screen,
  then a ``... key scancode=0x1e scheme=1`` line per key press and a line when it powers off.

Builds are cached under ``$VGPUCTL_CACHE_DIR`` (else ``~/.cache/vgpuctl``) by a hash of the sources, the
resolution, the build flags and the compiler and linker versions, and land there atomically, so concurrent
builds are safe.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

READY_LINE = "vgpuctl-test-guest ready"
"""The start of the line the guest writes to the debug console once its first frame is drawn."""
DEBUGCON_IOBASE = 0xE9
DEFAULT_RESOLUTION = (1024, 768)
MAX_DIMENSION = 4096
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


def kernel_cmdline(resolution: tuple[int, int]) -> str:
    """The guest command line (QEMU ``-append``) that picks a resolution at boot."""
    width, height = _check_resolution(resolution)
    return f"mode={width}x{height}"


def kernel_args(elf: Path, resolution: tuple[int, int] | None = None) -> list[str]:
    """QEMU arguments that boot the guest: ``-kernel ELF`` and, for a resolution at boot, ``-append``."""
    args = ["-kernel", str(elf)]
    if resolution is not None:
        args += ["-append", kernel_cmdline(resolution)]
    return args


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
