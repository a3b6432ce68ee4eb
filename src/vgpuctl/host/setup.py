"""Making a host ready for a kind of vGPU: kernel command line, modules at boot, module options. What each kind
needs comes from its backend (:class:`SetupWants`; GVT-g's is vgpuctl.backends.gvt_setup).

Three steps, as ``vgpuctl setup plan`` / ``apply`` / ``revert``:

* :func:`make_plan` reads the host under its root and works out every change, as file edits
  (old bytes -> new bytes, shown as unified diffs) and commands (grubby, kernelstub, update-grub
  ...). It refuses, before anything is written, when a file it would edit cannot be parsed.
* :func:`apply` backs up each file's original content (or its absence) under the setup state
  directory, records a hash of what it writes, writes atomically, then runs the commands. A plan
  with nothing to change does nothing at all: a second apply is a no-op.
* :func:`revert` restores each original if the file still holds what vgpuctl wrote (else it
  refuses for that file unless forced), regenerates the boot configuration, and undoes the
  command-line changes made through grubby or kernelstub.

The kernel command line goes through the distribution's own mechanism (:data:`MECHANISMS`):
``grub`` (``/etc/default/grub`` [+ ``grub.d/*.cfg``], then update-grub or grub[2]-mkconfig),
``grubby`` (Fedora/RHEL/CentOS), ``systemd-boot`` (loader entries' ``options`` lines, plus
``/etc/kernel/cmdline`` for kernels installed later) and ``kernelstub`` (Pop!_OS). Commands run
only on the machine's own root, or from an explicit tools directory (tests put stubs there);
under another root they are shown, not run.

A wanted parameter is added unless already in effect, and replaced in place where the command line
sets it against the wish (``i915.enable_gvt=0`` -> ``=1``, ``intel_iommu=off`` -> ``on``); tokens the
backend says work against it are changed as it says.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vgpuctl.base.crash import crashpoint
from vgpuctl.base.errors import VgpuError
from vgpuctl.host import facts
from vgpuctl.host.files import atomic_write
from vgpuctl.host.install import Command, Record, Step, Tools, remove, sha256, undo
from vgpuctl.host.root import HostRoot

__all__ = ["Command", "Step", "Tools"]  # the installer's, used here and by callers of setup

# ---------------------------------------------------------------- places (as on the host)

_HOST = HostRoot()  # the places are the same under every root: HostRoot spells them
DEFAULT_GRUB = _HOST.etc_default_grub
DEFAULT_GRUB_D = _HOST.etc_default_grub_d
GRUB_CONFIGS = _HOST.grub_configs
KERNELSTUB_CONFIG = _HOST.etc_kernelstub_configuration
KERNEL_CMDLINE = _HOST.etc_kernel_cmdline
LOADER_BASES = _HOST.boot_loader_bases
IGNORE_MSRS = _HOST.module_parameter("kvm", "ignore_msrs")
PROC_MODULES = _HOST.proc_modules
OUR_FILE = "vgpuctl.conf"

MECHANISMS = ("grub", "grubby", "systemd-boot", "kernelstub", "none")
FEDORA_FAMILY = frozenset({"fedora", "rhel", "centos", "rocky", "almalinux", "ol", "amzn"})
DEBIAN_FAMILY = frozenset({"debian", "ubuntu"})
SUSE_FAMILY = frozenset({"suse", "opensuse", "sles"})

def modules_header(wants: SetupWants) -> str:
    return (f"# Written by 'vgpuctl setup apply': modules {wants.subject} vGPUs need, loaded at boot.\n"
            "# 'vgpuctl setup revert' puts back what was here before.\n")


def options_header(wants: SetupWants) -> str:
    return (f"# Written by 'vgpuctl setup apply': module options for {wants.subject}.\n"
            "# 'vgpuctl setup revert' puts back what was here before.\n")


class SetupError(VgpuError):
    """The host cannot be set up automatically; the message says what to do by hand."""


class SetupWants(Protocol):
    """What one kind of vGPU needs of the host's boot configuration. Its backend says it (GVT-g's:
    vgpuctl.backends.gvt_setup); this module plans it and applies it on the one installer."""

    @property
    def subject(self) -> str:
        """What the files vgpuctl writes are for, in their header (e.g. "Intel GVT-g (KVMGT)")."""

    @property
    def params(self) -> tuple[str, ...]:
        """Kernel parameters that must be in effect (``name=value`` or a bare flag)."""

    @property
    def module_options(self) -> tuple[tuple[str, str, str, str], ...]:
        """(module, parameter, value, the module's Kconfig symbol): what modprobe.d sets (e.g. i915 enable_gvt 1)."""

    def modules(self, kernel: tuple[int, int] | None) -> list[str]:
        """Modules loaded at boot on this kernel version (None: unknown)."""

    def cmdline_fix(self, token: str) -> str | None:
        """A command-line token that works against this kind of vGPU, changed so that it does not (None: fine)."""

    def option_note(self, path: str, module: str, param: str, value: str) -> str | None:
        """What to say of someone else's ``options`` line that works against it (None: nothing)."""

    def reboot_reasons(self, root: HostRoot, edits: Sequence[FileEdit], running: str | None) -> list[str]:
        """Why the planned edits need a reboot, beyond a changed command line."""

    def cmdline_notes(self, running: str) -> list[str]:
        """What to say of the running kernel's command line (e.g. a parameter that keeps the GPU's driver off)."""


@dataclass(frozen=True)
class BootWants:
    """A kind's wants that are only lists (parameters, modules, options) and notes: the base of the SR-IOV
    backends' (vgpuctl.backends.sriov_intel_setup, sriov_nvidia); a kind with its own rules overrides them."""

    subject: str
    params: tuple[str, ...] = ()
    module_options: tuple[tuple[str, str, str, str], ...] = ()
    boot_modules: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what to say of this host (e.g. the driver that must be installed first)

    def modules(self, kernel: tuple[int, int] | None) -> list[str]:
        return list(self.boot_modules)

    def cmdline_fix(self, token: str) -> str | None:
        return None

    def option_note(self, path: str, module: str, param: str, value: str) -> str | None:
        return None

    def reboot_reasons(self, root: HostRoot, edits: Sequence[FileEdit], running: str | None) -> list[str]:
        return []

    def cmdline_notes(self, running: str) -> list[str]:
        return list(self.notes)


@dataclass(frozen=True)
class CombinedWants:
    """The wants of several kinds of vGPU on one host (a GVT-g iGPU and an NVIDIA card) as one: every
    parameter, module and option of each, in order; a token's fix and an option's note from the first kind
    that has one; every kind's reasons and notes."""

    parts: tuple[SetupWants, ...]

    @property
    def subject(self) -> str:
        return " and ".join(p.subject for p in self.parts)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(_unique(w for p in self.parts for w in p.params))

    @property
    def module_options(self) -> tuple[tuple[str, str, str, str], ...]:
        return tuple(dict.fromkeys(o for p in self.parts for o in p.module_options))

    def modules(self, kernel: tuple[int, int] | None) -> list[str]:
        return _unique(m for p in self.parts for m in p.modules(kernel))

    def cmdline_fix(self, token: str) -> str | None:
        return next((f for p in self.parts if (f := p.cmdline_fix(token)) is not None), None)

    def option_note(self, path: str, module: str, param: str, value: str) -> str | None:
        return next((n for p in self.parts if (n := p.option_note(path, module, param, value)) is not None), None)

    def reboot_reasons(self, root: HostRoot, edits: Sequence[FileEdit], running: str | None) -> list[str]:
        return _unique(r for p in self.parts for r in p.reboot_reasons(root, edits, running))

    def cmdline_notes(self, running: str) -> list[str]:
        return _unique(n for p in self.parts for n in p.cmdline_notes(running))


def combined(wants: Sequence[SetupWants]) -> SetupWants:
    """One kind's wants as they are, several kinds' as :class:`CombinedWants`."""
    return wants[0] if len(wants) == 1 else CombinedWants(tuple(wants))


# ---------------------------------------------------------------- the kernel command line


# Parameters whose value is a comma list of names, of which the last token is in effect (a charp core_param:
# module_blacklist=xe must be added to an existing module_blacklist=nouveau, not after it).
LIST_PARAMS = ("module_blacklist",)


def _judge(want: str, token: str) -> bool | None:
    """Whether ``token`` gives the wanted setting (True), works against it (False), or neither (None)."""
    key = facts.param_key(want)
    if key == "intel_iommu":
        options = (facts.param_value(token) or "").split(",")
        return True if "on" in options else False if "off" in options else None
    if key in LIST_PARAMS:
        return facts.param_value(want) in (facts.param_value(token) or "").split(",")
    return facts.param_matches(want.partition("=")[2], facts.param_value(token))


def _fixed(want: str, token: str) -> str:
    """``token`` changed in place to give the wanted setting, keeping its spelling and other options."""
    name = token.partition("=")[0]
    if facts.param_key(want) == "intel_iommu":
        options = ["on" if o == "off" else o for o in (facts.param_value(token) or "").split(",")]
        return f"{name}={','.join(options)}"
    if facts.param_key(want) in LIST_PARAMS:
        names = [n for n in (facts.param_value(token) or "").split(",") if n]
        return f"{name}={','.join([*names, want.partition('=')[2]])}"
    return f"{name}={want.partition('=')[2]}"


@dataclass(frozen=True)
class CmdlineChange:
    """Parameters to append, to change in place (old -> new), and to drop."""

    add: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.replace or self.remove)

    @property
    def new_tokens(self) -> list[str]:
        """What a tool that only adds and removes must add (appended and replacing values)."""
        return _unique([*self.add, *(new for _, new in self.replace)])

    @property
    def old_tokens(self) -> list[str]:
        """What such a tool must remove."""
        return _unique([*self.remove, *(old for old, _ in self.replace)])

    def as_remove_and_add(self) -> CmdlineChange:
        """The same change as a tool makes it that can only remove and append (grubby, kernelstub)."""
        return CmdlineChange(add=tuple(self.new_tokens), remove=tuple(self.old_tokens))

    def union(self, other: CmdlineChange) -> CmdlineChange:
        replace = dict(self.replace)
        replace.update((old, new) for old, new in other.replace if old not in replace)
        return CmdlineChange(tuple(_unique([*self.add, *other.add])), tuple(replace.items()),
                             tuple(_unique([*self.remove, *other.remove])))

    def words(self) -> str:
        parts = []
        if self.add:
            parts.append("add " + " ".join(self.add))
        parts += [f"replace {old} with {new}" for old, new in self.replace]
        if self.remove:
            parts.append("remove " + " ".join(self.remove))
        return "; ".join(parts)

    def apply(self, text: str, add_here: bool = True) -> str:
        """``text`` (a command line) with the change made, its other spacing kept as it was."""
        spans = facts.cmdline_spans(text)
        additions = list(self.add) if add_here else []
        if not spans:
            return text + " ".join(additions)
        prefix = text[:spans[0][0]]
        items = [(text[a:b], text[b:spans[i + 1][0]] if i + 1 < len(spans) else text[b:])
                 for i, (a, b) in enumerate(spans)]
        trailing = items[-1][1]
        replace = dict(self.replace)
        kept = [(replace.get(token, token), sep) for token, sep in items if token not in self.remove]
        if not kept:
            return prefix + " ".join(additions) + (trailing if additions else "")
        kept[-1] = (kept[-1][0], trailing)
        if additions:
            kept[-1] = (kept[-1][0], " ")
            kept.append((" ".join(additions), trailing))
        return prefix + "".join(token + sep for token, sep in kept)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def needed_change(tokens: Sequence[str], wants: SetupWants) -> CmdlineChange:
    """What makes a command line right for this kind of vGPU (empty when it already is)."""
    add: list[str] = []
    replace: dict[str, str] = {}
    remove: list[str] = []
    for want in wants.params:
        found = [t for t in tokens if facts.param_key(t) == facts.param_key(want)]
        if found and facts.param_key(want) in LIST_PARAMS:
            found = found[-1:]  # the last one is in effect; the others are left as they are
        good = [t for t in found if _judge(want, t) is True]
        bad = _unique(t for t in found if _judge(want, t) is False)
        if good:
            remove += bad
        elif bad:
            replace[bad[-1]] = _fixed(want, bad[-1])  # the last one is the one in effect
            remove += bad[:-1]
        else:
            add.append(want)
    for token in _unique(tokens):
        fixed = wants.cmdline_fix(token)
        if fixed is not None:
            replace[token] = fixed
    return CmdlineChange(tuple(add), tuple(replace.items()), tuple(_unique(remove)))


# ---------------------------------------------------------------- edits, commands, tools


@dataclass(frozen=True)
class FileEdit:
    """One file's change: ``old``/``new`` are its bytes, None when absent (``new`` None: delete it)."""

    host_path: str
    old: bytes | None
    new: bytes | None
    mode: int
    role: str  # boot (the kernel command line), modules, options

    @property
    def action(self) -> str:
        return "create" if self.old is None else "delete" if self.new is None else "modify"

    def diff(self) -> str:
        absent = _HOST.dev_null  # diff's name for the side where the file does not exist
        return unified_diff(self.old, self.new, f"a{self.host_path}" if self.old is not None else absent,
                            f"b{self.host_path}" if self.new is not None else absent)


def unified_diff(old: bytes | str | None, new: bytes | str | None, from_label: str, to_label: str) -> str:
    """A unified diff (``patch -p1`` from / applies it), marking a last line without a newline."""
    def lines(data: bytes | str | None) -> list[str]:
        text = data.decode(errors="replace") if isinstance(data, bytes) else data or ""
        return text.splitlines(keepends=True)

    out = []
    for line in difflib.unified_diff(lines(old), lines(new), from_label, to_label):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


# ---------------------------------------------------------------- reading the host


def _read(root: HostRoot, host_path: str, editing: bool = False) -> bytes | None:
    """A file's bytes, or None when it does not exist; a file to edit must be a regular file."""
    local = root.path(host_path)
    if editing and local.is_symlink():
        raise SetupError(f"{host_path} is a symbolic link (to {os.readlink(local)}); vgpuctl edits only "
                         "regular files: edit it by hand, or replace the link with a copy")
    try:
        return local.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _text(host_path: str, data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise SetupError(f"{host_path} is not UTF-8 text, so vgpuctl will not edit it") from None


def _mode(root: HostRoot, host_path: str) -> int:
    try:
        return root.path(host_path).stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o644


def distro_ids(root: HostRoot) -> set[str]:
    fields = root.os_release()
    return {fields.get("ID", ""), *fields.get("ID_LIKE", "").split()} - {""}


def running_cmdline(root: HostRoot) -> str | None:
    try:
        return root.read_value(root.proc_cmdline)
    except OSError:
        return None


# ---------------------------------------------------------------- boot mechanisms


@dataclass
class BootPlan:
    mechanism: str
    summary: str  # how this host's command line is set, in a few words
    detected: str = ""  # why this mechanism was chosen
    change: CmdlineChange = field(default_factory=CmdlineChange)
    edits: list[FileEdit] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)  # the changes themselves (grubby, kernelstub)
    after: list[Command] = field(default_factory=list)  # to run once the files changed (update-grub ...)
    regenerate: list[Command] = field(default_factory=list)  # what makes the boot config from the files
    preview: str = ""  # a diff of the command line, for mechanisms that are commands
    undo: dict[str, Any] | None = None  # what a command mechanism added and removed
    notes: list[str] = field(default_factory=list)


def detect_mechanism(root: HostRoot, tools: Tools, wants: SetupWants) -> tuple[str, str]:
    """(mechanism, why) from the files under the root and the tools the host has."""
    ids = distro_ids(root)
    if root.exists(KERNELSTUB_CONFIG):
        return "kernelstub", f"{KERNELSTUB_CONFIG} exists (Pop!_OS)"
    fedora = sorted(ids & FEDORA_FAMILY)
    if fedora and tools.find("grubby"):
        return "grubby", f"a Fedora/RHEL family system ({', '.join(fedora)}) with grubby"
    loaders = [f"{base}/loader/loader.conf" for base in LOADER_BASES if root.exists(f"{base}/loader/loader.conf")]
    if loaders:
        return "systemd-boot", f"{loaders[0]} exists"
    if root.exists(DEFAULT_GRUB):
        return "grub", f"{DEFAULT_GRUB} exists"
    if _loader_entries(root):
        return "systemd-boot", "boot loader entries exist"
    raise SetupError("cannot tell how this host sets its kernel command line (no kernelstub configuration, "
                     f"grubby, systemd-boot loader.conf or {DEFAULT_GRUB}); name it with --boot, or use "
                     f"--boot none and add by hand: {' '.join(wants.params)}")


def plan_boot(root: HostRoot, tools: Tools, wants: SetupWants, mechanism: str = "auto") -> BootPlan:
    detected = "chosen with --boot"
    if mechanism == "auto":
        mechanism, detected = detect_mechanism(root, tools, wants)
    if mechanism not in MECHANISMS:
        raise SetupError(f"unknown boot mechanism {mechanism!r}; one of: {', '.join(MECHANISMS)}")
    planners = {"grub": _plan_grub, "grubby": _plan_grubby, "systemd-boot": _plan_systemd_boot,
                "kernelstub": _plan_kernelstub}
    if mechanism == "none":
        plan = BootPlan("none", "left alone (--boot none)")
    else:
        plan = planners[mechanism](root, tools, wants)
    plan.detected = detected
    return plan


# ---- GRUB: /etc/default/grub


GRUB_ASSIGNMENT = re.compile(r"^(?P<lead>[ \t]*(?:export[ \t]+)?)(?P<name>GRUB_CMDLINE_LINUX(?:_DEFAULT)?)"
                             r"(?P<op>\+?=)", re.M)
UNQUOTED = re.compile(r"[^\s#;&|<>()'\"`$\\]*")


@dataclass(frozen=True)
class Assignment:
    """``NAME=value`` in a shell file that grub-mkconfig sources."""

    host_path: str
    name: str
    line: int
    start: int  # the value as written (with its quotes) is text[start:end]
    end: int
    quote: str  # '"', "'" or ""
    value: str  # the literal text (best effort when there is a problem)
    problem: str | None = None

    def written(self, value: str) -> str:
        quote = self.quote or ('"' if not value or any(c.isspace() for c in value) else "")
        return f"{quote}{value}{quote}"


def parse_grub_assignments(host_path: str, text: str) -> list[Assignment]:
    """Each GRUB_CMDLINE_LINUX[_DEFAULT] assignment; one vgpuctl cannot edit safely carries a problem."""
    found = []
    for match in GRUB_ASSIGNMENT.finditer(text):
        start = match.end()
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        rest = text[start:line_end]
        line = text.count("\n", 0, start) + 1
        problem = None
        quote = rest[:1] if rest[:1] in ("'", '"') else ""
        if quote:
            close = rest.find(quote, 1)
            if close < 0:
                later = text.find(quote, line_end)
                problem = "spans several lines" if later >= 0 else "has no closing quote"
                value, after, end = rest[1:], "", line_end
            else:
                value, after, end = rest[1:close], rest[close + 1:], start + close + 1
            if problem is None and quote == '"' and ("$" in value or "`" in value):
                problem = "uses shell expansion ($ or `)"
            elif problem is None and quote == '"' and "\\" in value:
                problem = "uses backslash escapes"
        else:
            value = UNQUOTED.match(rest).group()  # type: ignore[union-attr]
            after, end = rest[len(value):], start + len(value)
            if after.startswith("\\") and not after.strip("\\ \t"):
                problem = "continues on the next line"
            elif after[:1] in ("$", "`"):
                problem = "uses shell expansion ($ or `)"
        if problem is None and after.strip() and not (after[0] in " \t" and after.strip().startswith("#")):
            problem = "has more than one plain value on its line"
        if problem is None and match["op"] == "+=":
            problem = "appends with +="
        found.append(Assignment(host_path, match["name"], line, start, end, quote, value, problem))
    return found


def grub_regenerate(root: HostRoot, tools: Tools) -> Command:
    """update-grub on Debian/Ubuntu, else grub2-mkconfig or grub-mkconfig writing the existing grub.cfg."""
    debian = bool(distro_ids(root) & DEBIAN_FAMILY)
    names = ("update-grub", "grub-mkconfig", "grub2-mkconfig") if debian else \
        ("grub2-mkconfig", "grub-mkconfig", "update-grub")
    name = next((n for n in names if tools.find(n)), names[0])
    if name == "update-grub":
        return Command(("update-grub",))
    config = next((c for c in GRUB_CONFIGS if root.exists(c)),
                  GRUB_CONFIGS[0] if name == "grub2-mkconfig" else GRUB_CONFIGS[1])
    return Command((name, "-o", config))


def _plan_grub(root: HostRoot, tools: Tools, wants: SetupWants) -> BootPlan:
    regenerate = grub_regenerate(root, tools)
    plan = BootPlan("grub", f"GRUB: {DEFAULT_GRUB}, then {regenerate}", regenerate=[regenerate])
    if tools.runnable and tools.find(regenerate.argv[0]) is None:
        plan.notes.append(f"{regenerate.argv[0]} not found: regenerate the GRUB configuration by hand after apply")
    paths = [DEFAULT_GRUB]
    if root.path(DEFAULT_GRUB_D).is_dir():
        paths += [f"{DEFAULT_GRUB_D}/{n}" for n in root.listdir(DEFAULT_GRUB_D) if n.endswith(".cfg")]
    texts: dict[str, str] = {}
    assignments: list[Assignment] = []
    for path in paths:
        data = _read(root, path, editing=True)
        if data is None:
            if path == DEFAULT_GRUB:
                raise SetupError(f"{DEFAULT_GRUB} does not exist: is GRUB this host's boot loader? Name the right "
                                 "one with --boot")
            continue
        texts[path] = _text(path, data)
        assignments += parse_grub_assignments(path, texts[path])
    last: dict[str, Assignment] = {}
    for assignment in assignments:  # in the order grub-mkconfig sources them: the last one counts
        last[assignment.name] = assignment
    linux, default = last.get("GRUB_CMDLINE_LINUX"), last.get("GRUB_CMDLINE_LINUX_DEFAULT")
    target = default
    if target is None and linux is not None and distro_ids(root) & (FEDORA_FAMILY | SUSE_FAMILY):
        target = linux  # these distributions put the whole command line there
    tokens = [t for a in (linux, default) if a is not None for t in facts.split_cmdline(a.value)]
    change = needed_change(tokens, wants)
    plan.change = change
    if not change:
        for a in (linux, default):
            if a is not None and a.problem:
                plan.notes.append(f"{a.host_path}:{a.line}: {a.name} {a.problem}; its literal text already "
                                  f"has what {wants.subject} needs, so it is left alone")
        return plan
    by_hand = f"by hand: {change.words()} in {{name}}, then run '{regenerate}'; or set up the rest with --boot none"
    if target is None:
        fixes = f"; in GRUB_CMDLINE_LINUX: {CmdlineChange((), change.replace, change.remove).words()}" \
            if change.replace or change.remove else ""
        raise SetupError(f"{DEFAULT_GRUB} has no GRUB_CMDLINE_LINUX_DEFAULT line, so vgpuctl will not edit it. Do it "
                         f"by hand: add the line GRUB_CMDLINE_LINUX_DEFAULT=\"{' '.join(change.add)}\"{fixes}, "
                         f"then run '{regenerate}'; or set up the rest with --boot none")
    for a in (linux, default):
        if a is not None and a.problem:
            raise SetupError(f"{a.host_path}:{a.line}: {a.name} {a.problem}, so vgpuctl will not edit it. Do it "
                             + by_hand.format(name=a.name))
    new_texts = dict(texts)
    for a in sorted((a for a in (linux, default) if a is not None), key=lambda a: a.start, reverse=True):
        value = change.apply(a.value, add_here=a is target)
        if value != a.value:
            text = new_texts[a.host_path]
            new_texts[a.host_path] = text[:a.start] + a.written(value) + text[a.end:]
    for path in paths:
        if path in texts and new_texts[path] != texts[path]:
            plan.edits.append(FileEdit(path, texts[path].encode(), new_texts[path].encode(), _mode(root, path), "boot"))
    plan.after = [regenerate]
    return plan


# ---- systemd-boot: loader entries


def _loader_entries(root: HostRoot) -> list[str]:
    entries = []
    for base in LOADER_BASES:
        directory = f"{base}/loader/entries"
        if root.path(directory).is_dir():
            entries += [f"{directory}/{n}" for n in root.listdir(directory) if n.endswith(".conf")]
    return entries


OPTIONS_LINE = re.compile(r"^(?P<key>[ \t]*options)(?P<sep>[ \t]+|(?=\r?\n?$))(?P<value>.*?)(?P<end>\r?\n?)$")


def _plan_systemd_boot(root: HostRoot, tools: Tools, wants: SetupWants) -> BootPlan:
    plan = BootPlan("systemd-boot", "systemd-boot: the loader entries' options lines")
    entries = _loader_entries(root)
    if not entries:
        raise SetupError("no systemd-boot entries in " + ", ".join(f"{b}/loader/entries" for b in LOADER_BASES)
                         + f": add by hand to the entry's options line: {' '.join(wants.params)}")
    for path in entries:
        text = _text(path, _read(root, path, editing=True) or b"")
        lines = text.splitlines(keepends=True)
        keys = [line.split(None, 1)[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if "linux" not in keys:
            plan.notes.append(f"{path}: not a Linux entry (no 'linux' line), left alone")
            continue
        matches = {i: m for i, line in enumerate(lines) if (m := OPTIONS_LINE.match(line))}
        indexes = list(matches)
        tokens = [t for m in matches.values() for t in facts.split_cmdline(m["value"])]
        change = needed_change(tokens, wants)
        if not change:
            continue
        plan.change = plan.change.union(change)
        for i, m in matches.items():
            value = change.apply(m["value"], add_here=i == indexes[-1])
            lines[i] = f"{m['key']}{m['sep'] or ' '}{value}{m['end']}"
        if not indexes:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append(f"options {' '.join(change.add)}\n")
        plan.edits.append(FileEdit(path, text.encode(), "".join(lines).encode(), _mode(root, path), "boot"))
    data = _read(root, KERNEL_CMDLINE, editing=True)
    if data is not None:
        text = _text(KERNEL_CMDLINE, data)
        change = needed_change(facts.split_cmdline(text), wants)
        if change:
            plan.change = plan.change.union(change)
            plan.edits.append(FileEdit(KERNEL_CMDLINE, data, change.apply(text).encode(),
                                       _mode(root, KERNEL_CMDLINE), "boot"))
        plan.summary += f", and {KERNEL_CMDLINE} for kernels installed later"
    else:
        plan.notes.append(f"no {KERNEL_CMDLINE}: kernel-install takes new entries' command line from the running "
                          "kernel's, i.e. from these entries once the host has rebooted")
    return plan


# ---- grubby (Fedora, RHEL, CentOS)


def parse_grubby_info(output: str) -> list[tuple[str, str]]:
    """(kernel, args) for each Linux entry in ``grubby --info=ALL`` output."""
    kernels: list[tuple[str, str]] = []
    kernel: str | None = None
    for line in output.splitlines():
        key, _, value = line.partition("=")
        value = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
        if key == "index":
            kernel = None
        elif key == "kernel":
            kernel = value
        elif key == "args" and kernel is not None:
            kernels.append((kernel, value))
    return kernels


def _plan_grubby(root: HostRoot, tools: Tools, wants: SetupWants) -> BootPlan:
    plan = BootPlan("grubby", "grubby: --update-kernel=ALL on every boot entry")
    if tools.runnable:
        code, out, err = tools.run(Command(("grubby", "--info=ALL")))
        if code != 0:
            raise SetupError(f"'grubby --info=ALL' failed: {(err or out).strip() or f'exit status {code}'}")
        kernels = parse_grubby_info(out)
        source = "grubby --info=ALL"
        if not kernels:
            raise SetupError("'grubby --info=ALL' lists no kernel with arguments; add by hand: grubby "
                             f"--update-kernel=ALL --args='{' '.join(wants.params)}'")
    else:
        current = running_cmdline(root)
        if current is None:
            raise SetupError(f"cannot read the command line: grubby cannot be asked under --root {root.root} "
                             f"and {root.proc_cmdline} is missing")
        kernels = [("(running kernel)", current)]
        source = root.proc_cmdline
        plan.notes.append(f"grubby is not run under --root {root.root}: the current command line is "
                          f"{root.proc_cmdline}'s")
    before, after = [], []
    for kernel, args in kernels:
        change = needed_change(facts.split_cmdline(args), wants)
        plan.change = plan.change.union(change)
        before.append(f'kernel="{kernel}"\nargs="{args}"\n')
        after.append(f'kernel="{kernel}"\nargs="{change.as_remove_and_add().apply(args)}"\n')
    if not plan.change:
        return plan
    plan.preview = unified_diff("".join(before), "".join(after), source, "after grubby --update-kernel=ALL")
    argv = ["grubby", "--update-kernel=ALL"]
    if plan.change.old_tokens:
        argv.append("--remove-args=" + " ".join(plan.change.old_tokens))
    if plan.change.new_tokens:
        argv.append("--args=" + " ".join(plan.change.new_tokens))
    plan.commands = [Command(tuple(argv))]
    plan.undo = {"tool": "grubby", "added": plan.change.new_tokens, "removed": plan.change.old_tokens}
    return plan


# ---- kernelstub (Pop!_OS)


def _plan_kernelstub(root: HostRoot, tools: Tools, wants: SetupWants) -> BootPlan:
    plan = BootPlan("kernelstub", f"kernelstub: the user kernel_options in {KERNELSTUB_CONFIG}")
    data = _read(root, KERNELSTUB_CONFIG)
    try:
        config = json.loads(data or b"")
        options = config["user"]["kernel_options"]
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise SetupError(f"cannot read the user kernel_options of {KERNELSTUB_CONFIG}, so vgpuctl will not change "
                         f"them; by hand: kernelstub -a '{' '.join(wants.params)}'") from None
    change = needed_change(options, wants)
    plan.change = change
    if not change:
        return plan
    current = " ".join(options)
    plan.preview = unified_diff(current + "\n", change.as_remove_and_add().apply(current) + "\n",
                                f"{KERNELSTUB_CONFIG} (user kernel_options)", "after kernelstub")
    if change.old_tokens:
        plan.commands.append(Command(("kernelstub", "-d", " ".join(change.old_tokens))))
    if change.new_tokens:
        plan.commands.append(Command(("kernelstub", "-a", " ".join(change.new_tokens))))
    plan.undo = {"tool": "kernelstub", "added": change.new_tokens, "removed": change.old_tokens}
    return plan


def undo_commands(undo: dict[str, Any]) -> list[Command]:
    """The commands that take back what a grubby or kernelstub run added and removed."""
    added, removed = list(undo.get("added", [])), list(undo.get("removed", []))
    if undo.get("tool") == "grubby":
        argv = ["grubby", "--update-kernel=ALL"]
        if added:
            argv.append("--remove-args=" + " ".join(added))
        if removed:
            argv.append("--args=" + " ".join(removed))
        return [Command(tuple(argv))]
    commands = []
    if added:
        commands.append(Command(("kernelstub", "-d", " ".join(added))))
    if removed:
        commands.append(Command(("kernelstub", "-a", " ".join(removed))))
    return commands


# ---------------------------------------------------------------- modules and their options


def wanted_modules(release: str | None, wants: SetupWants) -> list[str]:
    return wants.modules(facts.kernel_version(release))


def modules_loaded_elsewhere(root: HostRoot, ours: str) -> dict[str, str]:
    """Module (normalized) -> the other file that has it loaded at boot."""
    return {module: path for module, path in facts.modules_loaded_at_boot(root).items()
            if path != ours and not path.endswith(f"/{OUR_FILE}")}


def module_options_elsewhere(root: HostRoot, ours: str) -> list[tuple[str, str, str, str]]:
    """(file, module, parameter, value) for every ``options`` line in the other modprobe files."""
    return [option for option in facts.modprobe_options(root)
            if option[0] != ours and not option[0].endswith(f"/{OUR_FILE}")]


def _our_file(root: HostRoot, host_path: str, lines: list[str], header: str, role: str) -> FileEdit | None:
    old = _read(root, host_path, editing=True)
    new = (header + "".join(f"{line}\n" for line in lines)).encode() if lines else None
    if old == new:
        return None
    if new is None and old is not None and not old.startswith(header.encode()):
        return None  # not ours and nothing to add: leave it
    return FileEdit(host_path, old, new, _mode(root, host_path), role)


def plan_modules(root: HostRoot, release: str | None, notes: list[str], wants: SetupWants) -> FileEdit | None:
    path = f"{root.etc_modules_load_d}/{OUR_FILE}"
    elsewhere = modules_loaded_elsewhere(root, path)
    if release is None:
        notes.append(f"kernel release unknown ({root.proc_osrelease} unreadable): vfio_mdev (kernels < 5.14) is "
                     "not listed")
    return _our_file(root, path, [m for m in wanted_modules(release, wants) if facts.module_name(m) not in elsewhere],
                     modules_header(wants), "modules")


def plan_options(root: HostRoot, release: str | None, notes: list[str], wants: SetupWants) -> FileEdit | None:
    path = f"{root.etc_modprobe_d}/{OUR_FILE}"
    found = facts.kernel_config(root, release)
    config = found[1] if found else None
    elsewhere = module_options_elsewhere(root, path)
    lines = []
    for module, param, wanted, symbol in wants.module_options:
        if config is not None and config.get(symbol) == "y":
            notes.append(f"{module} is built into this kernel ({symbol}=y): modprobe options do not reach it, "
                         "the kernel command line sets it")
            continue
        values = [(f, v) for f, m, p, v in elsewhere if m == module and p == param]
        good = [f for f, v in values if facts.param_matches(wanted, v or None) is True]
        bad = [(f, v) for f, v in values if facts.param_matches(wanted, v or None) is not True]
        for f, v in bad:
            notes.append(f"{f} has 'options {module} {param}={v}', which works against {wants.subject}: remove it "
                         "by hand")
        if not good or bad:
            lines.append(f"options {module} {param}={wanted}")
    notes += [note for f, m, p, v in elsewhere if (note := wants.option_note(f, m, p, v)) is not None]
    return _our_file(root, path, lines, options_header(wants), "options")


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    root: HostRoot
    boot: BootPlan
    edits: list[FileEdit]
    pending: list[Command]  # commands that failed at the last apply, to run again
    reboot: list[str]  # why a reboot is needed (empty: it is not)
    notes: list[str]
    now: list[str]  # optional steps that take effect at once (on this machine only)
    runnable: bool  # whether apply runs the commands

    @property
    def commands(self) -> list[Command]:
        return [*self.boot.commands, *self.boot.after, *(c for c in self.pending if c not in self.boot.after)]

    @property
    def nothing_to_do(self) -> bool:
        return not self.edits and not self.commands

    def to_json(self) -> dict[str, Any]:
        change = self.boot.change
        return {
            "root": str(self.root.root),
            "boot": {"mechanism": self.boot.mechanism, "summary": self.boot.summary, "detected": self.boot.detected,
                     "add": list(change.add), "replace": [list(r) for r in change.replace],
                     "remove": list(change.remove), "preview": self.boot.preview or None},
            "files": [{"path": e.host_path, "action": e.action, "role": e.role, "diff": e.diff()} for e in self.edits],
            "commands": [{"argv": list(c.argv), "command": str(c), "runs": self.runnable} for c in self.commands],
            "nothing_to_do": self.nothing_to_do,
            "reboot": bool(self.reboot),
            "reboot_reasons": self.reboot,
            "notes": self.notes,
            "now": self.now,
        }


def make_plan(root: HostRoot, tools: Tools, wants: SetupWants, mechanism: str = "auto", pending: Sequence[Command] = (),
              real_host: bool | None = None) -> Plan:
    """Everything that would make the host ready; raises SetupError before anything could be written."""
    boot = plan_boot(root, tools, wants, mechanism)
    notes = list(boot.notes)
    release = facts.kernel_release(root)
    edits = list(boot.edits)
    for edit in (plan_modules(root, release, notes, wants), plan_options(root, release, notes, wants)):
        if edit is not None:
            edits.append(edit)
    reboot = []
    if boot.change:
        reboot.append("the kernel command line changes, which takes effect at the next boot")
    running = running_cmdline(root)
    reboot += wants.reboot_reasons(root, edits, running)
    if not reboot and boot.mechanism != "none" and running is not None:
        missing = needed_change(facts.split_cmdline(running), wants)
        if missing:
            reboot.append(f"this kernel was booted without the new command line ({missing.words()})")
    real = root.is_this_machine if real_host is None else real_host
    now = immediate_steps(root, release, bool(reboot), wants) if real else []
    notes += wants.cmdline_notes(running or "")
    return Plan(root, boot, edits, list(pending), reboot, notes, now, tools.runnable)


def immediate_steps(root: HostRoot, release: str | None, rebooting: bool, wants: SetupWants) -> list[str]:
    """What can take effect before a reboot, for the administrator to run now."""
    steps = []
    try:
        ignore_msrs = root.read_value(IGNORE_MSRS)
    except OSError:
        ignore_msrs = None
    if ignore_msrs is not None and facts.param_bool(ignore_msrs) is not True:
        steps.append(f"echo 1 > {IGNORE_MSRS}   # kvm.ignore_msrs at once, until the next boot")
    if not rebooting:
        try:
            loaded = {line.split()[0] for line in root.read_text(PROC_MODULES).splitlines() if line.strip()}
        except OSError:
            loaded = set()
        missing = [m for m in wanted_modules(release, wants) if facts.module_name(m) not in loaded]
        if missing:
            steps.append(f"modprobe -a {' '.join(missing)}   # load the modules now instead of at the next boot")
    return steps


# ---------------------------------------------------------------- backups, apply, revert


def setup_record(setup_dir: Path) -> Record:
    """The installer's record of what apply changed, with setup's own keys: the commands that regenerate the
    boot configuration, what grubby/kernelstub runs added and removed, the commands still to run."""
    record = Record(setup_dir)
    for key in ("regenerate", "undo", "pending"):
        record.data.setdefault(key, [])
    return record


def pending_commands(setup_dir: Path) -> list[Command]:
    """The commands that failed at the last apply, to run again."""
    return [Command(tuple(argv)) for argv in setup_record(setup_dir).data["pending"]]


def _write(root: HostRoot, edit: FileEdit) -> None:
    if edit.new is None:
        remove(root.path(edit.host_path))
    else:
        atomic_write(root.path(edit.host_path), edit.new, edit.mode)


def apply(plan: Plan, setup_dir: Path, tools: Tools) -> list[Step]:
    """Make the plan's changes: the originals recorded first, then atomic writes, then the commands."""
    record = setup_record(setup_dir)
    if plan.nothing_to_do:
        return []
    record.check_root(plan.root, "revert it")
    for edit in plan.edits:  # record the originals before touching anything
        record.claim(plan.root, edit.host_path, edit.role, sha256(edit.new))
    if any(e.role == "boot" for e in plan.edits):
        record.data["regenerate"] = [list(c.argv) for c in plan.boot.regenerate]
    record.save()
    steps = []
    for edit in plan.edits:
        crashpoint("setup-apply:before-write")
        _write(plan.root, edit)
        steps.append(Step({"create": "created", "modify": "updated", "delete": "removed"}[edit.action],
                          edit.host_path))
        if sha256(edit.new) == record.files[edit.host_path]["original_sha256"]:
            record.forget(edit.host_path)  # back as it was before vgpuctl: nothing to revert
    pending: list[Command] = []
    crashpoint("setup-apply:before-commands")
    for command in plan.boot.commands:
        step = tools.step(command)
        steps.append(step)
        if step.action == "ran" and plan.boot.undo:
            _record_undo(record, plan.boot.undo, command)
    for command in [*plan.boot.after, *(c for c in plan.pending if c not in plan.boot.after)]:
        step = tools.step(command)
        steps.append(step)
        if step.action == "failed":
            pending.append(command)
    record.data["pending"] = [list(c.argv) for c in pending]
    record.save()
    return steps


def _record_undo(record: Record, undo: dict[str, Any], command: Command) -> None:
    """Remember what a grubby/kernelstub command changed (kernelstub: -a adds, -d removes)."""
    records: list[dict[str, Any]] = record.data["undo"]
    found = next((r for r in records if r["tool"] == undo["tool"]), None)
    if found is None:
        found = {"tool": undo["tool"], "added": [], "removed": []}
        records.append(found)
    if undo["tool"] == "kernelstub":
        key, tokens = ("added", undo["added"]) if command.argv[1] == "-a" else ("removed", undo["removed"])
        found[key] = _unique([*found[key], *tokens])
    else:
        found["added"] = _unique([*found["added"], *undo["added"]])
        found["removed"] = _unique([*found["removed"], *undo["removed"]])


REVERTED_NOTES = {"unchanged": "already as it was before vgpuctl", "removed": "vgpuctl created it",
                  "refused": "changed since vgpuctl wrote it; --force puts back the original anyway, losing those "
                             "changes"}


def revert(root: HostRoot, setup_dir: Path, tools: Tools, force: bool = False) -> tuple[list[Step], list[str]]:
    """Put back what apply changed; returns the steps and why a reboot is needed."""
    record = setup_record(setup_dir)
    if record.empty:
        return [], []
    record.check_root(root, "revert it")
    steps, reboot = [], []
    boot_restored = False
    for host_path, entry in sorted(record.files.items()):
        written = record.owns(root, host_path)
        outcome = undo(root, record, host_path, force)
        note = REVERTED_NOTES.get(outcome, "forced" if outcome == "restored" and not written else "")
        if outcome == "refused" and not os.path.lexists(root.path(host_path)):
            note = note.replace("changed", "was removed", 1)
        steps.append(Step(outcome, host_path, note))
        if outcome in ("unchanged", "refused"):
            continue
        if entry["role"] == "boot":
            boot_restored = True
        if entry["role"] == "options":
            reboot.append("i915 reads its options only when it loads, at boot")
    if boot_restored:
        reboot.insert(0, "the kernel command line is back as before, from the next boot")
        steps += [tools.step(Command(tuple(argv))) for argv in record.data["regenerate"]]
    remaining = []
    for recorded in record.data["undo"]:
        results = [tools.step(c) for c in undo_commands(recorded)]
        steps += results
        if all(r.action == "ran" for r in results):
            reboot.insert(0, "the kernel command line is back as before, from the next boot")
        else:
            remaining.append(recorded)
    record.data["undo"] = remaining
    if not record.files:
        record.data["pending"] = []
        record.data["regenerate"] = []
    record.save()
    return steps, _unique(reboot)
