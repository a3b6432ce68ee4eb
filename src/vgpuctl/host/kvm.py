"""Whether KVM really works on this machine: the device, the CPU, and a tiny guest that must run.

``/dev/kvm`` existing and answering ``KVM_GET_API_VERSION`` does not prove that guests run. On a
KVM-PVM host (a VM that exposes KVM without VMX/SVM) the device opens and reports API 12, yet
QEMU's ordinary guests stop with "KVM internal error. Suberror: 1": PVM handles a guest that is
not PVM-aware through KVM's instruction emulator, which gets through mode switches but not x87
or SSE instructions (spec qemu-streaming.md §5). So the probe starts the real QEMU with
``-accel kvm`` and a 64 KiB firmware image (:data:`GUEST_ASM`) that walks the boot path of every
PC guest — real mode, protected mode, long mode, x87 init, SSE — and writes one byte per stage
to the isa-debugcon port 0xE9. "Ran" means the last byte arrived; the bytes that did arrive
say how far it got. The same image under ``-accel tcg`` shows that the image itself is sound.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vgpuctl.host.qemu import find_qemu
from vgpuctl.host.root import HostRoot

KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)

# The bytes the guest writes, in order, and what reaching each one means.
STAGES: dict[str, str] = {
    "R": "real mode",
    "P": "32-bit protected mode",
    "L": "64-bit long mode",
    "F": "x87 FPU initialisation",
    "S": "an SSE instruction",
}
ALL_STAGES = "".join(STAGES)

GUEST_ASM = r"""
/* vgpuctl's KVM probe guest: a 64 KiB x86 firmware image (QEMU -bios), mapped at 0xF0000.
   It walks the path every PC guest takes at boot and reports each stage on the
   isa-debugcon port 0xE9: R real mode, P 32-bit protected mode, L 64-bit long mode,
   F x87 FPU initialised (fwait; fninit), S an SSE instruction executed. Then it halts.
   Build: as --64 -o guest.o guest.S && objcopy -O binary -j .text guest.o guest.bin */
        .set    BASE, 0xF0000
        .code16
start16:
        cli
        mov     $'R', %al
        out     %al, $0xe9
        lgdtl   %cs:(gdtr - start16)
        mov     %cr0, %eax
        or      $1, %al                     /* CR0.PE */
        mov     %eax, %cr0
        ljmpl   $0x08, $(BASE + start32 - start16)
        .code32
start32:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $'P', %al
        out     %al, $0xe9
        mov     $0x1000, %edi               /* page tables: PML4 0x1000, PDPT 0x2000, PD 0x3000 */
        xor     %eax, %eax
        mov     $0xC00, %ecx
        rep stosl
        movl    $0x2003, 0x1000
        movl    $0x3003, 0x2000
        movl    $0x83, 0x3000               /* identity map of the first 2 MiB */
        mov     %cr4, %eax
        or      $0x20, %eax                 /* CR4.PAE */
        mov     %eax, %cr4
        mov     $0x1000, %eax
        mov     %eax, %cr3
        mov     $0xC0000080, %ecx           /* EFER.LME */
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000000, %eax           /* CR0.PG */
        mov     %eax, %cr0
        ljmp    $0x18, $(BASE + start64 - start16)
        .code64
start64:
        mov     $'L', %al
        out     %al, $0xe9
        mov     %cr0, %rax
        and     $~0xC, %rax                 /* clear CR0.EM, CR0.TS */
        or      $0x22, %rax                 /* set CR0.MP, CR0.NE */
        mov     %rax, %cr0
        mov     %cr4, %rax
        or      $0x600, %rax                /* CR4.OSFXSR, CR4.OSXMMEXCPT */
        mov     %rax, %cr4
        finit
        mov     $'F', %al
        out     %al, $0xe9
        xorps   %xmm0, %xmm0
        mov     $'S', %al
        out     %al, $0xe9
halt:
        hlt
        jmp     halt
        .p2align 3
gdt:    /* accessed bits preset: the CPU must not write to the GDT, which lies in ROM */
        .quad   0
        .quad   0x00CF9B000000FFFF          /* 0x08: 32-bit code */
        .quad   0x00CF93000000FFFF          /* 0x10: data */
        .quad   0x00AF9B000000FFFF          /* 0x18: 64-bit code */
gdt_end:
gdtr:
        .word   gdt_end - gdt - 1
        .long   BASE + gdt - start16
        .org    0xFFF0, 0xF4
        .code16
        ljmp    $0xF000, $0                 /* the reset vector */
        .org    0x10000, 0xF4
"""

# GUEST_ASM assembled (GNU as 2.40); the rest of the image is 0xF4 (hlt).
_GUEST_CODE = bytes.fromhex(
    "fab052e6e92e660f0116d8000f20c00c010f22c066ea1c000f00080066b810008ed88ec08ed0b050e6e9bf0010000031"
    "c0b9000c0000f3abc7050010000003200000c7050020000003300000c70500300000830000000f20e083c8200f22e0b8"
    "001000000f22d8b9800000c00f320d000100000f300f20c00d000000800f22c0ea87000f001800b04ce6e90f20c04883"
    "e0f34883c8220f22c00f20e0480d000600000f22e09bdbe3b046e6e90f57c0b053e6e9f4ebfd66900000000000000000"
    "ffff0000009bcf00ffff00000093cf00ffff0000009baf001f00b8000f00"
)
_RESET_VECTOR = bytes.fromhex("ea000000f0")  # ljmp $0xF000, $0
_IMAGE_SIZE = 0x10000  # QEMU wants a BIOS image of a multiple of 64 KiB
_RESET_OFFSET = 0xFFF0


def guest_image() -> bytes:
    """The probe guest's 64 KiB firmware image."""
    image = bytearray(b"\xf4" * _IMAGE_SIZE)
    image[: len(_GUEST_CODE)] = _GUEST_CODE
    image[_RESET_OFFSET: _RESET_OFFSET + len(_RESET_VECTOR)] = _RESET_VECTOR
    return bytes(image)


@dataclass(frozen=True)
class GuestRun:
    """One run of the probe guest under one accelerator."""

    accel: str  # "kvm" or "tcg"
    stages: str  # the stage bytes the guest wrote, e.g. "RPL"
    error: str | None  # first relevant line QEMU printed, or what else went wrong
    elapsed_s: float
    stderr: str  # all QEMU printed, for the curious

    @property
    def completed(self) -> bool:
        return self.stages == ALL_STAGES and self.error is None

    def story(self) -> str:
        """How far the guest got, in words."""
        if self.completed:
            return "the test guest ran through real, protected and long mode, x87 and SSE"
        if not self.stages:
            return "the test guest did not execute its first instruction"
        reached = STAGES.get(self.stages[-1], self.stages[-1])
        failed = STAGES.get(ALL_STAGES[len(self.stages)], "its next stage") \
            if len(self.stages) < len(ALL_STAGES) else "halting"
        return f"the test guest got as far as {reached}, then stopped at {failed}"


_PREFIX = re.compile(r"^\S*qemu[\w.-]*: ")


def _relevant_line(stderr: str) -> str | None:
    """QEMU's first line that says something: no warnings, no "terminating on signal"."""
    for raw in stderr.splitlines():
        line = _PREFIX.sub("", raw.strip())
        if line and not line.startswith("warning:") and not line.startswith("terminating on signal"):
            return line
    return None


def run_tiny_guest(qemu_binary: str, accel: str = "kvm", timeout_s: float = 3.0) -> GuestRun:
    """Boot the probe guest under ``accel`` until it writes its last stage byte, fails, or times out.

    QEMU pauses (does not exit) on a KVM internal error, so the run ends as soon as stderr says so,
    and QEMU is always killed at the end."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vgpuctl-kvm-probe-") as tmp:
        image = Path(tmp) / "guest.bin"
        image.write_bytes(guest_image())
        debug_r, debug_w = os.pipe()
        try:
            try:
                process = subprocess.Popen(
                    [qemu_binary, "-nodefaults", "-no-user-config", "-machine", "q35", "-accel", accel,
                     "-display", "none", "-m", "16", "-no-reboot", "-bios", str(image),
                     "-chardev", f"file,id=probe,path=/dev/fd/{debug_w}",
                     "-device", "isa-debugcon,iobase=0xe9,chardev=probe"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    pass_fds=[debug_w])
            except OSError as exc:
                return GuestRun(accel, "", f"cannot run {qemu_binary}: {exc.strerror or exc}",
                                time.monotonic() - start, "")
            finally:
                os.close(debug_w)
            return _watch(process, debug_r, accel, timeout_s, start)
        finally:
            os.close(debug_r)


def _watch(process: subprocess.Popen[bytes], debug_r: int, accel: str, timeout_s: float, start: float) -> GuestRun:
    assert process.stderr is not None
    err_fd = process.stderr.fileno()
    stages, stderr = b"", b""
    open_fds = [debug_r, err_fd]
    error: str | None = None
    try:
        while True:
            remaining = start + timeout_s - time.monotonic()
            if remaining <= 0:
                error = f"no result within {timeout_s:g} s"
                break
            readable, _, _ = select.select(open_fds, [], [], remaining)
            if debug_r in readable:
                chunk = os.read(debug_r, 64)
                stages += chunk
                if not chunk:
                    open_fds.remove(debug_r)
            if err_fd in readable:
                chunk = os.read(err_fd, 4096)
                stderr += chunk
                if not chunk:  # QEMU exited
                    process.wait()
                    error = _relevant_line(stderr.decode(errors="replace")) \
                        or f"QEMU exited with status {process.returncode}"
                    break
            if stages.decode(errors="replace") == ALL_STAGES:
                break
            if b"KVM internal error" in stderr or b"emulation failure" in stderr:
                error = _relevant_line(stderr.decode(errors="replace"))
                stderr += _drain(err_fd)  # the rest of QEMU's report: "emulation failure", registers
                break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
    # Bytes written just before the end are still in the pipe.
    while select.select([debug_r], [], [], 0)[0]:
        chunk = os.read(debug_r, 64)
        if not chunk:
            break
        stages += chunk
    text = stages.decode(errors="replace")
    if error is None and text != ALL_STAGES:
        error = f"the guest wrote {text!r}, not {ALL_STAGES!r}"
    return GuestRun(accel, text, error, time.monotonic() - start, stderr.decode(errors="replace"))


def _drain(fd: int, idle_s: float = 0.05, limit_s: float = 0.3) -> bytes:
    """What ``fd`` still delivers until it is quiet for ``idle_s`` (at most ``limit_s`` in all)."""
    data = b""
    end = time.monotonic() + limit_s
    while (remaining := end - time.monotonic()) > 0 and select.select([fd], [], [], min(idle_s, remaining))[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


@dataclass(frozen=True)
class KvmReport:
    device_present: bool  # /dev/kvm exists under the root
    device_opens: bool | None  # os.open(O_RDWR) worked (None: not tried, e.g. simulated host)
    api_version: int | None  # ioctl KVM_GET_API_VERSION (0xAE00) -> 12 on any modern kernel
    cpu_flag: str | None  # "vmx", "svm" or None, from /proc/cpuinfo under the root
    nested_hypervisor: bool  # cpuinfo has the "hypervisor" flag (we run inside a VM)
    guest_runs: bool | None  # a tiny guest really ran under KVM (None: not tried)
    guest_error: str | None  # e.g. "KVM internal error. Suberror: 1" (first relevant stderr line)
    detail: str  # one sentence for humans: what this means


def _cpu_flags(root: HostRoot) -> set[str] | None:
    try:
        text = root.read_text(root.proc_cpuinfo)
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def _open_device(root: HostRoot) -> tuple[bool, int | None, str | None]:
    """(opens, API version, why it did not open)."""
    try:
        fd = os.open(root.path(root.dev_kvm), os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, None, f"{exc.strerror or errno.errorcode.get(exc.errno or 0, exc)}"
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError:
            return True, None, None
        return True, int(version), None
    finally:
        os.close(fd)


def _is_this_machine(root: HostRoot) -> bool:
    try:
        return root.root.resolve() == Path("/")
    except OSError:
        return False


_CONSEQUENCE = "QEMU falls back to TCG, far slower, and GVT-g (which requires KVM) cannot work"


def probe_kvm(root: HostRoot, qemu_binary: str | None = None, run_guest: bool = True,
              timeout_s: float = 3.0) -> KvmReport:
    """KVM on the host under ``root``: device, CPU flags, and (on this machine only) a real guest."""
    present = root.exists(root.dev_kvm)
    flags = _cpu_flags(root)
    cpu_flag = next((flag for flag in ("vmx", "svm") if flags and flag in flags), None)
    nested = bool(flags and "hypervisor" in flags)
    vt = {"vmx": "VT-x", "svm": "AMD-V"}.get(cpu_flag or "", "")

    def report(opens: bool | None, api: int | None, runs: bool | None, error: str | None, detail: str) -> KvmReport:
        return KvmReport(present, opens, api, cpu_flag, nested, runs, error, detail)

    if root.is_simulated:
        state = "present" if present else "absent (kvm_intel/kvm_amd not loaded)"
        return report(None, None, None, None,
                      f"Simulated host: /dev/kvm is {state}; its nodes are not devices, so /dev/kvm was not "
                      "opened and no guest was started.")
    if not present:
        if cpu_flag:
            why = f"the CPU has {cpu_flag} ({vt}): load kvm_intel or kvm_amd"
        elif nested:
            why = "this is a VM whose hypervisor does not pass VMX/SVM through"
        elif flags is None:
            why = f"{root.proc_cpuinfo} could not be read"
        else:
            why = "the CPU shows no VMX/SVM: enable VT-x/AMD-V in the firmware setup"
        return report(None, None, None, None, f"{root.dev_kvm} is missing ({why}); {_CONSEQUENCE}.")
    opens, api, open_error = _open_device(root)
    if not opens:
        return report(False, None, None, None,
                      f"{root.dev_kvm} exists but cannot be opened ({open_error}): run as root or join the kvm group.")
    if not run_guest:
        return report(True, api, None, None,
                      f"{root.dev_kvm} opens (API {api}); no test guest was started, so whether guests run is unknown.")
    if not _is_this_machine(root):
        return report(True, api, None, None,
                      f"{root.dev_kvm} opens (API {api}); no test guest was started because the root {root.root} "
                      "is not this machine's /.")
    binary = find_qemu(qemu_binary)
    if binary is None:
        return report(True, api, None, None,
                      f"{root.dev_kvm} opens (API {api}); no QEMU was found to start a test guest.")
    run = run_tiny_guest(binary, "kvm", timeout_s)
    if run.completed:
        return report(True, api, True, None, f"KVM works: {run.story()} under KVM{f' ({vt})' if vt else ''}.")
    if root.exists(root.sys_module("kvm_pvm")):
        kind = "this is KVM-PVM (module kvm_pvm), which runs guests that are not PVM-aware through " \
               "KVM's instruction emulator"
    elif cpu_flag is None and nested:
        kind = "this is a VM without VMX/SVM (nested virtualization not exposed)"
    else:
        kind = f"the CPU has {cpu_flag} ({vt})" if cpu_flag else "the CPU shows no VMX/SVM"
    return report(True, api, False, run.error,
                  f"{root.dev_kvm} opens but an ordinary guest cannot run under KVM: {run.story()} ({run.error}); "
                  f"{kind}; {_CONSEQUENCE}.")
