"""The Linux test guest: Debian's own kernel and a busybox initramfs that proves every device vgpuctl gives a VM.

Built at test time from Debian packages, nothing installed: the kernel and its modules come from the
``linux-image-6.1.0-*-amd64`` package (``apt-get download``, unpacked with ``dpkg-deb -x``; the ``.deb`` is kept in
the cache, so later builds need no network), the userland is ``/bin/busybox`` of busybox-static, and the initramfs
(a gzipped newc cpio) is written here. Its ``/init`` (:data:`INIT`)

- loads the modules the devices need (virtio_pci, virtio_blk, virtio_net, virtio_console, ata_piix/ahci + sr_mod
  for the CD-ROM, isofs, ext4 for ext2, xhci_pci + usbhid + hid_generic, evdev, the ACPI button), in the order their
  ``depends=`` (modinfo) gives: the package has no modules.dep, depmod makes it at install;
- reports each virtio disk (size, its first bytes); formats the disk named by ``vgpuctl.fs=vda`` with ext2 when it
  has no filesystem yet, and writes a file ``boot-N`` there at every boot (``disk.vda.boots=N``);
- mounts the CD-ROM and reports its files and ``token.txt``;
- brings eth0 up with DHCP (busybox udhcpc), reports the MAC and the lease, and fetches ``vgpuctl.url=URL``;
- reports the input devices it sees and the first event of each (keyboard, USB tablet);
- powers off cleanly on the ACPI power button (unmounts its disks first, and says so);
- answers the QEMU guest agent's guest-sync, guest-ping, guest-info, guest-get-osinfo, guest-shutdown and
  guest-network-get-interfaces on the ``org.qemu.guest_agent.0`` virtio-serial port, when the VM has one;
- runs a shell on the VGA console (tty1) and on the serial port; typing ``kb`` in one reports it and draws a
  bar of full blocks on the screen.

Reports go to the serial port and the screen through the kernel's log, a line each: ``VGPUCTL-GUEST key=value``
(:func:`read_report`).
Builds are cached under ``$VGPUCTL_CACHE_DIR`` (else ``~/.cache/vgpuctl``) in ``linuxguest/``, keyed by the kernel
package, busybox and this recipe, and land there atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vgpuctl.vm.testguest import default_cache_dir

KERNEL_META_PACKAGE = "linux-image-amd64"  # Debian 12: depends on the current linux-image-6.1.0-N-amd64
BUSYBOX = Path("/bin/busybox")
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
DEBIAN_PACKAGES = ("busybox-static", "xorriso", "isolinux", "syslinux-common")
"""What building the guest and its ISOs needs on Debian (the kernel package is downloaded, not installed)."""
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "ata_piix", "ahci", "sr_mod", "isofs",
           "ext4", "crc32c_generic", "xhci_pci", "usbhid", "hid_generic", "evdev", "button")
"""What the guest's devices need (each with what it depends on); built-in ones are left out."""
CMDLINE = "console=tty0 console=ttyS0"  # kernel messages on both; /dev/console (init's) is the serial port
# Anywhere in a line (after the kernel's timestamp, maybe after a shell's output on the serial port); whole lines
# only: the log may be read while the guest is writing its last line.
_REPORT_RE = re.compile(r"VGPUCTL-GUEST ([a-z0-9_.-]+)=(.*?)\r?\n")

INIT = r"""#!/bin/busybox sh
# vgpuctl's Linux test guest. Every finding is a line "VGPUCTL-GUEST key=value" (/bin/report).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1  # kernel messages off the consoles from here on, but for the reports (level 0)
report kernel="$(uname -r)"
report cmdline="$(cat /proc/cmdline)"
param() { tr ' ' '\n' </proc/cmdline | sed -n "s/^vgpuctl\.$1=//p"; }
# wait_for CONDITION TENTHS: poll until it holds (devices appear asynchronously)
wait_for() { n=0; until eval "$1"; do [ $n -ge "$2" ] && return 1; sleep 0.1; n=$((n + 1)); done; }

failed=""
for m in $(cat /etc/modules); do insmod "/lib/modules/$m.ko" || failed="$failed,$m"; done
report modules.loaded="$(wc -l </etc/modules)"
report modules.failed="${failed#,}"

disks() {
    list=""
    for d in /sys/block/vd*; do
        [ -e "$d" ] || continue
        n=${d##*/}
        list="$list,$n"
        report disk.$n.sectors="$(cat $d/size)"
        report disk.$n.head="$(head -c 64 /dev/$n | tr -cd 'A-Za-z0-9-')"
    done
    report disks="${list#,}"
    fs=$(param fs)
    [ -n "$fs" ] || return 0
    mkdir -p /mnt/$fs
    if ! mount -t ext4 /dev/$fs /mnt/$fs 2>/dev/null; then
        mke2fs -q /dev/$fs >/dev/null 2>&1 || return 0
        report disk.$fs.formatted=ext2
        mount -t ext4 /dev/$fs /mnt/$fs || return 0
    fi
    report disk.$fs.files="$(ls /mnt/$fs | grep '^boot-' | tr '\n' ' ')"
    boots=$(($(ls /mnt/$fs | grep -c '^boot-') + 1))
    echo "boot $boots" >/mnt/$fs/boot-$boots && sync && report disk.$fs.boots=$boots
}

cdrom() {
    if ! wait_for '[ -b /dev/sr0 ]' 100; then report cdrom=none; return 0; fi
    mkdir -p /mnt/cdrom
    mount -t iso9660 -o ro /dev/sr0 /mnt/cdrom || { report cdrom=unreadable; return 0; }
    report cdrom.files="$(ls /mnt/cdrom | tr '\n' ' ')"
    [ -f /mnt/cdrom/token.txt ] && report cdrom.token="$(cat /mnt/cdrom/token.txt)"
    return 0
}

net() {
    [ -e /sys/class/net/eth0 ] || { report net=none; return 0; }
    report net.mac="$(cat /sys/class/net/eth0/address)"
    ip link set lo up
    ip link set eth0 up
    udhcpc -i eth0 -n -q -t 10 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1 || { report net.lease=none; return 0; }
    url=$(param url)
    # timeout, not wget -T: that segfaults in Debian 12's static busybox 1.35
    [ -n "$url" ] && report http.body="$(timeout 20 wget -q -O - "$url" | tr -cd 'A-Za-z0-9-')"
    return 0
}

# power_button EVENT_DEVICE: at its first event, unmount and power off (once, whichever button comes first)
power_button() {
    dd if="$1" bs=24 count=1 >/dev/null 2>&1 || return 0
    mkdir /tmp/powering-off 2>/dev/null || return 0
    report acpi=power-button
    sync
    for m in $(awk '$2 ~ /^\/mnt\// {print $2}' /proc/mounts); do umount "$m" && report unmounted="$m"; done
    report shutdown=clean
    poweroff -f
}

inputs() {
    # The USB tablet comes a moment after its controller: wait for it when there is one.
    if ls -d /sys/bus/pci/drivers/xhci_hcd/0000:* >/dev/null 2>&1; then
        wait_for 'grep -q "^N: Name=.*USB" /proc/bus/input/devices' 150
    fi
    report input.devices="$(sed -n 's/^N: Name="\(.*\)"$/\1/p' /proc/bus/input/devices | tr '\n' ';')"
    for e in /sys/class/input/event*; do
        name=$(cat $e/device/name)
        case "$name" in
            *"Power Button"*) power_button /dev/input/${e##*/} & ;;
            *) (dd if=/dev/input/${e##*/} bs=24 count=1 >/dev/null 2>&1 && report input.event="$name") & ;;
        esac
    done
}

# The guest agent, when the VM has its virtio-serial channel (virtio device 3: a console).
agent_port() {
    grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null || { report agent=none; return 0; }
    wait_for 'grep -qx org.qemu.guest_agent.0 /sys/class/virtio-ports/*/name 2>/dev/null' 100
    for p in /sys/class/virtio-ports/*; do
        if [ "$(cat $p/name)" = org.qemu.guest_agent.0 ] && wait_for "[ -c /dev/${p##*/} ]" 50; then
            agent /dev/${p##*/} &
            report agent=/dev/${p##*/}
            return 0
        fi
    done
    report agent=none
}

disks &
cdrom &
net &
inputs &
agent_port &
wait
report ready=1
setsid sh -c 'exec sh -i </dev/tty1 >/dev/tty1 2>&1' &
setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1' &
while :; do sleep 3600; done
"""

# A kernel log record per report, at the one level init leaves on the consoles: the kernel writes a record whole
# to every console, polling the serial port (the tty's interrupt-driven output stalled at times under TCG).
REPORT = """#!/bin/sh
echo "<0>VGPUCTL-GUEST $*" >/dev/kmsg
"""

# Typed on a console: says where it ran, then draws two rows of full blocks (U+2588) on the screen.
KB = r"""#!/bin/sh
report typed="$(tty)"
i=0
while [ $i -lt 160 ]; do printf '\342\226\210'; i=$((i + 1)); done >/dev/tty1
"""

# A QEMU guest agent of the guest's own on the virtio-serial port $1: a JSON command a line, an answer a line.
AGENT = r"""#!/bin/sh
exec 3<>"$1"
COMMANDS="guest-sync guest-ping guest-info guest-get-osinfo guest-network-get-interfaces guest-shutdown"
supported() {
    sep=""
    for c in $COMMANDS; do
        printf '%s{"name": "%s", "enabled": true, "success-response": true}' "$sep" "$c"
        sep=", "
    done
}
interfaces() {
    sep=""
    for d in /sys/class/net/*; do
        n=${d##*/}
        addresses=$(ip -4 addr show dev "$n" | awk '$1 == "inet" { split($2, a, "/");
            printf "%s{\"ip-address-type\": \"ipv4\", \"ip-address\": \"%s\", \"prefix\": %s}", s, a[1], a[2];
            s = ", " }')
        printf '%s{"name": "%s", "hardware-address": "%s", "ip-addresses": [%s]}' "$sep" "$n" "$(cat $d/address)" \
            "$addresses"
        sep=", "
    done
}
while :; do
    # End of file while no client is connected on the host: look again in a moment.
    read -r line <&3 || { sleep 0.2; continue; }
    case "$line" in
        *'"guest-sync"'*)
            id=$(echo "$line" | sed -n 's/.*"id" *: *\([0-9]*\).*/\1/p')
            answer="{\"return\": ${id:-0}}" ;;
        *'"guest-ping"'*) answer='{"return": {}}' ;;
        *'"guest-info"'*)
            answer="{\"return\": {\"version\": \"vgpuctl-test-agent 1\", \"supported_commands\": [$(supported)]}}" ;;
        *'"guest-get-osinfo"'*)
            answer="{\"return\": {\"id\": \"vgpuctl-test-guest\", \"name\": \"vgpuctl Linux test guest\",\
 \"pretty-name\": \"vgpuctl Linux test guest (busybox)\", \"kernel-release\": \"$(uname -r)\",\
 \"kernel-version\": \"$(uname -v)\", \"machine\": \"$(uname -m)\"}}" ;;
        *'"guest-network-get-interfaces"'*) answer="{\"return\": [$(interfaces)]}" ;;
        *'"guest-shutdown"'*)  # as qemu-ga: no answer; the guest shuts down cleanly (once)
            mkdir /tmp/powering-off 2>/dev/null || continue
            report shutdown=agent
            sync
            for m in $(awk '$2 ~ /^\/mnt\// {print $2}' /proc/mounts); do umount "$m" && report unmounted="$m"; done
            report shutdown=clean
            poweroff -f ;;
        *) answer='{"error": {"class": "CommandNotFound", "desc": "the vgpuctl test agent does not have it"}}' ;;
    esac
    echo "$answer" >&3
done
"""

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
    bound|renew)
        ifconfig "$interface" "$ip" netmask "$subnet" up
        [ -n "$router" ] && route add default gw "$router" dev "$interface"
        report net.lease="$ip"
        report net.router="$router"
        ;;
esac
"""


class LinuxGuestBuildError(RuntimeError):
    """The Linux test guest could not be built (no kernel package, no busybox-static, a failed tool)."""


@dataclass(frozen=True)
class LinuxGuest:
    """A built guest: boot it with ``-kernel kernel -initrd initrd -append CMDLINE...``."""

    kernel: Path
    initrd: Path
    kernel_version: str


def build_linux_guest(cache_dir: Path | None = None) -> LinuxGuest:
    """The guest's kernel and initramfs, built on first use and cached. Raises LinuxGuestBuildError."""
    directory = (cache_dir if cache_dir is not None else default_cache_dir()) / "linuxguest"
    deb = kernel_deb(directory)
    busybox = _static_busybox()
    digest = hashlib.sha256()
    digest.update(deb.name.encode() + b"\0")
    # The recipe: this module (the build's code) and the scripts as this process will write them, which differ
    # from the file's when it changed after the import: such a build must not pass for the file's.
    digest.update(Path(__file__).read_bytes())
    for text in (INIT, REPORT, KB, AGENT, UDHCPC_SCRIPT):
        digest.update(text.encode() + b"\0")
    digest.update(busybox)
    target = directory / f"guest-{digest.hexdigest()[:20]}"
    if (target / "initrd.gz").is_file():
        return _guest_in(target)
    workdir = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
    try:
        unpacked = workdir / "deb"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise LinuxGuestBuildError(f"{deb.name} holds {len(kernels)} kernels (boot/vmlinuz-*), expected one")
        version = kernels[0].name.removeprefix("vmlinuz-")
        order = module_order(unpacked / "lib" / "modules" / version, MODULES)
        out = workdir / "out"
        out.mkdir()
        shutil.copyfile(kernels[0], out / "vmlinuz")
        (out / "version").write_text(version + "\n")
        (out / "initrd.gz").write_bytes(gzip.compress(_initramfs(busybox, order), 6, mtime=0))
        shutil.rmtree(unpacked)
        try:
            os.rename(out, target)  # atomic; a concurrent build of the same key may have won: it is the same
        except OSError:
            if not (target / "initrd.gz").is_file():
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _guest_in(target)


def kernel_deb(directory: Path) -> Path:
    """The kernel package: the one kept in ``directory``, else downloaded there (``apt-get download``; one
    ``apt-get update`` and a second try when that fails)."""
    debs = directory / "debs"
    kept = sorted(debs.glob("linux-image-*-amd64_*.deb"))
    if kept:
        return kept[-1]
    debs.mkdir(parents=True, exist_ok=True)
    package = _kernel_package()
    download = Path(tempfile.mkdtemp(prefix=".download-", dir=debs))
    try:
        if _apt(["apt-get", "download", package], download).returncode != 0:
            _apt(["apt-get", "update", "-qq"], download)
            done = _apt(["apt-get", "download", package], download)
            if done.returncode != 0:
                raise LinuxGuestBuildError(
                    f"cannot download the kernel package {package} (apt-get download: {done.stderr.strip()}); "
                    f"the Linux test guest needs Debian's package repository once, then it is kept in {debs}")
        found = sorted(download.glob(f"{package}_*.deb"))
        if not found:
            raise LinuxGuestBuildError(f"apt-get download {package} left no .deb in {download}")
        target = debs / found[0].name
        os.replace(found[0], target)
        return target
    finally:
        shutil.rmtree(download, ignore_errors=True)


def module_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The ``.ko`` files of ``wanted`` and of everything they depend on, each after its dependencies.

    Built-in modules (``modules.builtin``) are left out: they need no insmod.
    """
    files = {p.name.removesuffix(".ko").replace("-", "_"): p for p in (modules_dir / "kernel").rglob("*.ko")}
    builtin_file = modules_dir / "modules.builtin"
    builtin = {Path(line).name.removesuffix(".ko").replace("-", "_")
               for line in builtin_file.read_text().split()} if builtin_file.is_file() else set()
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise LinuxGuestBuildError(f"kernel module {name} is neither built in nor in {modules_dir}")
        for dependency in _depends(files[name]):
            visit(dependency)
        order.append(files[name])

    for name in wanted:
        visit(name)
    return order


def kernel_cmdline(**params: str) -> str:
    """The guest's kernel command line: the consoles, and ``vgpuctl.KEY=VALUE`` for each parameter
    (``fs="vda"``: the disk to keep files on; ``url=...``: a page to fetch)."""
    words = [CMDLINE] + [f"vgpuctl.{key}={value}" for key, value in params.items()]
    if any(" " in word for word in words[1:]):
        raise ValueError(f"guest parameters must not contain spaces: {params}")
    return " ".join(words)


def read_report(serial_log: str) -> dict[str, list[str]]:
    """Every ``VGPUCTL-GUEST key=value`` line of the serial log: the values of each key, in order."""
    found: dict[str, list[str]] = {}
    for key, value in _REPORT_RE.findall(serial_log):
        found.setdefault(key, []).append(value)
    return found


def build_iso(target: Path, files: dict[str, bytes], *, boot: LinuxGuest | None = None, append: str = "") -> Path:
    """An ISO 9660 image (Rock Ridge, Joliet) of ``files``, written atomically; with ``boot``, bootable by BIOS
    (isolinux) into that guest with the kernel command line ``append``."""
    xorriso = shutil.which("xorriso")
    if xorriso is None:
        raise LinuxGuestBuildError("xorriso not found: building an ISO needs it (Debian: apt-get install xorriso)")
    with tempfile.TemporaryDirectory(prefix=".iso-", dir=target.parent) as work:
        tree = Path(work) / "tree"
        tree.mkdir()
        for name, data in files.items():
            (tree / name).write_bytes(data)
        args = [xorriso, "-as", "mkisofs", "-quiet", "-R", "-J", "-V", "VGPUCTL"]
        if boot is not None:
            for path in (ISOLINUX_BIN, LDLINUX_C32):
                if not path.is_file():
                    raise LinuxGuestBuildError(f"{path} not found: a bootable ISO needs isolinux "
                                               "(Debian: apt-get install isolinux)")
                shutil.copyfile(path, tree / path.name)
            shutil.copyfile(boot.kernel, tree / "vmlinuz")
            shutil.copyfile(boot.initrd, tree / "initrd.gz")
            (tree / "isolinux.cfg").write_text(f"DEFAULT linux\nLABEL linux\n  KERNEL /vmlinuz\n"
                                               f"  APPEND initrd=/initrd.gz {append}\n")
            args += ["-b", "isolinux.bin", "-c", "boot.cat", "-no-emul-boot", "-boot-load-size", "4",
                     "-boot-info-table"]
        partial = Path(work) / "image.iso"
        _run([*args, "-o", str(partial), str(tree)])
        os.replace(partial, target)
    return target


# ---------------------------------------------------------------------- building


def _guest_in(directory: Path) -> LinuxGuest:
    version = (directory / "version").read_text().strip()
    return LinuxGuest(directory / "vmlinuz", directory / "initrd.gz", version)


def _kernel_package() -> str:
    try:
        done = subprocess.run(["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True)
    except OSError as exc:
        raise LinuxGuestBuildError(f"cannot run apt-cache ({exc}): the Linux test guest's kernel comes from "
                                   "Debian's package repository (apt)") from exc
    match = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)", done.stdout)
    if match is None:
        raise LinuxGuestBuildError(f"apt-cache depends {KERNEL_META_PACKAGE} names no kernel package "
                                   f"({done.stderr.strip() or done.stdout.strip()}); run apt-get update")
    return match[1]


def _apt(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LinuxGuestBuildError(f"{' '.join(argv)} failed: {exc}") from exc


def _static_busybox() -> bytes:
    try:
        data = BUSYBOX.read_bytes()
    except OSError as exc:
        raise LinuxGuestBuildError(f"{BUSYBOX}: {exc}; apt-get install busybox-static") from exc
    if data[:5] != b"\x7fELF\x02" or _has_interpreter(data):
        raise LinuxGuestBuildError(f"{BUSYBOX} is not a static 64-bit busybox: apt-get install busybox-static")
    return data


def _has_interpreter(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF asks for a dynamic loader (a PT_INTERP program header)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def _depends(module: Path) -> list[str]:
    match = re.search(rb"\0depends=([^\0]*)\0", module.read_bytes())
    return [name.replace("-", "_") for name in match[1].decode().split(",") if name] if match else []


_SIGNATURE_MAGIC = b"~Module signature appended~\n"


def _unsigned(module: bytes) -> bytes:
    """The module without its appended signature: Debian's kernel does not enforce signatures, and checking
    33 of them is seconds of emulated RSA under TCG (it loads an unsigned module, noting a taint)."""
    if not module.endswith(_SIGNATURE_MAGIC):
        return module
    end = len(module) - len(_SIGNATURE_MAGIC) - 12  # struct module_signature: 12 bytes before the magic
    signer_len, key_id_len = module[end + 3], module[end + 4]
    sig_len, = struct.unpack_from(">I", module, end + 8)
    return module[: end - sig_len - signer_len - key_id_len]


def _initramfs(busybox: bytes, modules: list[Path]) -> bytes:
    archive = _Cpio()
    for directory in ("bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "sys", "tmp"):
        archive.add(directory, 0o040755)
    archive.add("dev/console", 0o020600, rdev=(5, 1))  # the kernel opens it for init before devtmpfs is up
    archive.add("init", 0o100755, INIT.encode())
    archive.add("bin/busybox", 0o100755, busybox)
    archive.add("bin/sh", 0o120777, b"busybox")
    for name, text in (("bin/report", REPORT), ("bin/kb", KB), ("bin/agent", AGENT),
                       ("etc/udhcpc.script", UDHCPC_SCRIPT)):
        archive.add(name, 0o100755, text.encode())
    names = []
    for module in modules:
        name = module.name.removesuffix(".ko")
        archive.add(f"lib/modules/{name}.ko", 0o100644, _unsigned(module.read_bytes()))
        names.append(name)
    archive.add("etc/modules", 0o100644, "".join(f"{name}\n" for name in names).encode())
    return archive.finish()


class _Cpio:
    """A cpio archive in the "newc" format the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.inode = 0

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.inode += 1
        fields = (self.inode, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08x" % value for value in fields) + name.encode() + b"\0"
        self.parts += [header, _pad(header), data, _pad(data)]

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def _pad(data: bytes) -> bytes:
    return b"\0" * (-len(data) % 4)


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as exc:
        raise LinuxGuestBuildError(f"cannot run {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise LinuxGuestBuildError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
