"""The test guest, built with Debian's gcc and booted in real QEMU under TCG (``-accel tcg``, no KVM).

Every boot test runs ``qemu-system-x86_64`` with the guest as its multiboot ``-kernel``, talks QMP to it
(``qemu.qmp``), reads the guest's isa-debugcon log and parses QMP ``screendump`` PPM files.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import EventListener, QMPClient

from tests.conftest import Image, read_ppm
from vgpuctl.vm.testguest import (
    READY_LINE,
    Animation,
    TestGuestBuildError,
    build_test_guest,
    frame_rate,
    frame_reports,
    kernel_args,
    kernel_cmdline,
)

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 10.0  # generous: the guest is ready ~0.2 s after QEMU starts, but the machine may be loaded
YELLOW, CYAN = (255, 224, 0), (0, 224, 255)  # the moving bar in colour schemes 0 and 1


@pytest.fixture(scope="module")
def guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None or shutil.which("ld") is None:
        pytest.fail("the test guest needs gcc and binutils: apt-get install gcc binutils (make test does)")
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} is missing: apt-get install qemu-system-x86 (make test does)")
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def guest_elf(guest_cache: Path) -> Path:
    return build_test_guest(guest_cache)


# ---------------------------------------------------------------------------------------------------- images



def test_read_ppm_handles_comments(tmp_path: Path) -> None:
    path = tmp_path / "x.ppm"
    path.write_bytes(b"P6\n# made by hand\n2 1\n255\n" + bytes([1, 2, 3, 4, 5, 6]))
    image = read_ppm(path)
    assert (image.width, image.height) == (2, 1)
    assert image.pixel(1, 0) == (4, 5, 6)


# ------------------------------------------------------------------------------------------------------ QEMU


@dataclass
class Guest:
    proc: asyncio.subprocess.Process
    qmp: QMPClient
    debug_log: Path
    directory: Path
    dumps: int = 0

    def log(self) -> str:
        return self.debug_log.read_text(errors="replace")

    async def wait_log(self, text: str | re.Pattern[str], timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while not ((log := self.log()) and (text.search(log) if isinstance(text, re.Pattern) else text in log)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the guest's debug log within {timeout} s: {log!r}")
            await asyncio.sleep(0.05)
        return log

    async def screendump(self) -> Image:
        self.dumps += 1
        path = self.directory / f"screen{self.dumps}.ppm"
        await self.qmp.execute("screendump", {"filename": str(path)})
        return read_ppm(path)


@contextlib.asynccontextmanager
async def booted(elf: Path, display: Sequence[str] = ("-vga", "std"), resolution: tuple[int, int] | None = None,
                 animation: Animation = "bar", fps: int | None = None) -> AsyncIterator[Guest]:
    """QEMU (TCG, machine pc) running the guest, once its ready line is on the debug console."""
    with tempfile.TemporaryDirectory(prefix="vgtg-") as tmp:  # short: a unix socket path has ~108 bytes
        directory = Path(tmp)
        sock, debug_log, stderr_path = directory / "qmp.sock", directory / "debug.log", directory / "qemu.err"
        argv = [
            QEMU, "-machine", "pc", "-accel", "tcg", "-nodefaults", *display, "-display", "none",
            *kernel_args(elf, resolution, animation, fps),
            "-qmp", f"unix:{sock},server=on,wait=off",
            "-chardev", f"file,id=dbg,path={debug_log}", "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
        ]
        start = time.monotonic()
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=stderr, stderr=stderr)
        qmp = QMPClient("vgpuctl-test")
        try:
            deadline = start + BOOT_TIMEOUT
            while READY_LINE not in (debug_log.read_text(errors="replace") if debug_log.exists() else ""):
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no ready line within {BOOT_TIMEOUT} s (exit {proc.returncode}): "
                                         f"{stderr_path.read_text(errors='replace')}")
                await asyncio.sleep(0.02)
            await qmp.connect(str(sock))
            yield Guest(proc, qmp, debug_log, directory)
        finally:
            try:
                await qmp.disconnect()
            except EOFError:  # QEMU exited (powered off): the QMP connection ended with it
                if proc.returncode is None:
                    raise
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def moving_bar(guest: Guest, colour: tuple[int, int, int]) -> tuple[Image, Image]:
    """Two screendumps a moment apart in which the bar (of this colour) stands in different places."""
    first = await guest.screendump()
    y = first.height // 2
    bar = first.columns_of(colour, y)
    assert bar, f"no {colour} bar on row {y}"
    for _ in range(20):  # ~0.2 s each; the bar moves ~400 px/s, slower if this machine is very loaded
        await asyncio.sleep(0.2)
        second = await guest.screendump()
        moved = second.columns_of(colour, y)
        if moved and moved != bar:
            return first, second
    raise AssertionError(f"the bar did not move in 4 s: {bar[:1]}..{bar[-1:]}")


def assert_picture(image: Image) -> None:
    """Not blank: a gradient has many colours."""
    sample = {image.pixel(x, y) for y in range(0, image.height, 37) for x in range(0, image.width, 29)}
    assert len(sample) > 50, f"only {len(sample)} colours: blank?"


def dominant(image: Image) -> str:
    means = image.mean()
    return "rgb"[means.index(max(means))]


def changed_fraction(first: Image, second: Image) -> float:
    """The fraction of pixels (every 5th column of every row) that differ between two pictures."""
    sample = [(x, y) for y in range(first.height) for x in range(0, first.width, 5)]
    return sum(first.pixel(x, y) != second.pixel(x, y) for x, y in sample) / len(sample)


def dominant_of_row(image: Image, y: int) -> str:
    """What the stream benchmark looks at: the strongest channel summed over one row."""
    row = image.row(y)
    sums = [sum(row[0::3]), sum(row[1::3]), sum(row[2::3])]
    return "rgb"[sums.index(max(sums))]


async def power_down(guest: Guest) -> None:
    """system_powerdown: the guest powers off (ACPI S5) and QEMU exits 0 by itself."""
    listener = EventListener(("SHUTDOWN",))
    with guest.qmp.listen(listener):
        await guest.qmp.execute("system_powerdown")
        event = await asyncio.wait_for(listener.get(), 10)
    data = event["data"]
    assert isinstance(data, dict) and data["guest"] is True and data["reason"] == "guest-shutdown", event
    assert await asyncio.wait_for(guest.proc.wait(), 10) == 0
    assert "powering off" in guest.log()


# ----------------------------------------------------------------------------------------------------- tests


def test_build_is_cached_by_sources_compiler_and_resolution(guest_cache: Path, guest_elf: Path) -> None:
    assert guest_elf.parent.parent == guest_cache
    head = guest_elf.read_bytes()[:20]
    assert head[:5] == b"\x7fELF\x01" and head[18] == 3  # 32-bit ELF for i386: a multiboot v1 kernel
    before = guest_elf.stat()
    again = build_test_guest(guest_cache)
    assert again == guest_elf
    after = again.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "rebuilt"
    other = build_test_guest(guest_cache, resolution=(1920, 1080))
    assert other != guest_elf and other.is_file()
    assert not [p for p in guest_elf.parent.iterdir() if p.name.startswith(".build-")]


def test_cache_dir_comes_from_the_environment(guest_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VGPUCTL_CACHE_DIR", str(guest_cache))
    assert build_test_guest().parent == guest_cache / "testguest"


def test_missing_gcc_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TestGuestBuildError, match="apt-get install gcc"):
        build_test_guest(tmp_path)


def test_boots_fast_and_animates(guest_elf: Path) -> None:
    async def scenario() -> None:
        async with booted(guest_elf) as guest:
            assert "mode=1024x768" in guest.log()
            first, second = await moving_bar(guest, YELLOW)
            assert (first.width, first.height) == (1024, 768)
            assert first.rgb != second.rgb
            assert_picture(first)
            assert_picture(second)

    asyncio.run(scenario())


def test_key_press_changes_the_colour_scheme(guest_elf: Path) -> None:
    async def scenario() -> None:
        async with booted(guest_elf) as guest:
            before = await guest.screendump()
            assert dominant(before) == "b" and before.columns_of(YELLOW, 100)
            await guest.qmp.execute("send-key", {"keys": [{"type": "qcode", "data": "a"}]})
            await guest.wait_log("scheme=1")
            after = await guest.screendump()
            assert dominant(after) == "r" and after.columns_of(CYAN, 100)
            assert not after.columns_of(YELLOW, 100)
            assert "key scancode=0x1e scheme=1" in guest.log()  # one press (release ignored): 'a' in set 1

    asyncio.run(scenario())


def test_acpi_powerdown_makes_qemu_exit(guest_elf: Path) -> None:
    async def scenario() -> None:
        async with booted(guest_elf) as guest:
            await power_down(guest)

    asyncio.run(scenario())


def test_full_hd_compiled_in_on_std_vga(guest_cache: Path) -> None:
    elf = build_test_guest(guest_cache, resolution=(1920, 1080))

    async def scenario() -> None:
        async with booted(elf) as guest:
            image = await guest.screendump()
            assert (image.width, image.height) == (1920, 1080)
            assert_picture(image)
            await power_down(guest)

    asyncio.run(scenario())


def test_mode_on_the_command_line_on_bochs_display(guest_elf: Path) -> None:
    async def scenario() -> None:
        async with booted(guest_elf, ("-device", "bochs-display"), resolution=(1920, 1080)) as guest:
            assert "mode=1920x1080" in guest.log()
            first, second = await moving_bar(guest, YELLOW)
            assert (first.width, first.height) == (1920, 1080)
            assert_picture(second)
            await power_down(guest)

    asyncio.run(scenario())



def test_kernel_cmdline_picks_resolution_and_animation() -> None:
    assert kernel_cmdline((1920, 1080)) == "mode=1920x1080"
    assert kernel_cmdline((640, 480), "full") == "mode=640x480 anim=full"
    assert kernel_cmdline(None, "full", 30) == "anim=full fps=30"
    assert kernel_args(Path("g.elf")) == ["-kernel", "g.elf"]  # the bar, compiled-in resolution: no -append
    with pytest.raises(ValueError, match="fps"):
        kernel_cmdline(None, "full", 101)
    with pytest.raises(ValueError, match="fps applies"):
        kernel_cmdline(None, "bar", 30)


def test_frame_rate_from_the_debug_log() -> None:
    log = ("vgpuctl-test-guest ready mode=640x480 fb=0xfd000000 pm1a_cnt=0x604 s5=0\n"
           "vgpuctl-test-guest anim=full fps=60\nvgpuctl-test-guest frames=30 ms=1000\n"
           "vgpuctl-test-guest key scancode=0x1e scheme=1\nvgpuctl-test-guest frames=61 ms=1010\n"
           "vgpuctl-test-guest frames=59 ms=990\n")
    assert frame_rate(log) == 50.0
    assert frame_rate(log, skip=1) == 60.0
    assert frame_rate("vgpuctl-test-guest ready mode=640x480\n") is None


def test_full_screen_animation_changes_every_row_and_keys_switch_its_scheme(guest_elf: Path) -> None:
    async def scenario() -> None:
        async with booted(guest_elf, resolution=(640, 480), animation="full", fps=50) as guest:
            log = await guest.wait_log("anim=full fps=50")
            assert "mode=640x480" in log
            first = await guest.screendump()
            assert (first.width, first.height) == (640, 480)
            assert_picture(first)
            for _ in range(20):  # 20 ms a frame; retried: a loaded machine may draw slower
                await asyncio.sleep(0.1)
                second = await guest.screendump()
                rows = sum(first.row(y) != second.row(y) for y in range(first.height))
                # not just a moving bar (which changes every row too): most of the picture moved
                pixels = changed_fraction(first, second)
                if rows >= 0.99 * first.height and pixels >= 0.5:
                    break
            else:
                raise AssertionError(f"{rows} of {first.height} rows and {pixels:.0%} of the pixels changed")
            middle = first.height // 2
            assert dominant(first) == dominant_of_row(first, middle) == dominant_of_row(second, middle) == "b"

            await guest.qmp.execute("send-key", {"keys": [{"type": "qcode", "data": "a"}]})
            await guest.wait_log("key scancode=0x1e scheme=1")
            after = await guest.screendump()
            assert dominant(after) == dominant_of_row(after, middle) == "r"

            log = await guest.wait_log(re.compile(r"frames=\d+ ms=\d+\r?\n"), timeout=5)  # a whole line
            rate = frame_rate(log)
            assert rate is not None and 0 < rate <= 101, log  # 50 paced; a loaded machine draws fewer
            await power_down(guest)

    asyncio.run(scenario())


def test_frame_rate_counts_whole_report_lines_only() -> None:
    # the guest may be writing its last line when the log is read: "ms=10" of what becomes "ms=1000"
    log = "vgpuctl-test-guest frames=50 ms=1000\nvgpuctl-test-guest frames=51 ms=10"
    assert (frame_rate(log), frame_reports(log)) == (50.0, 1)
    assert (frame_rate(log + "00\n"), frame_reports(log + "00\n")) == (50.5, 2)
