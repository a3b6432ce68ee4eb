"""One reading of a host's boot and module facts, by the rules of the programs that read them for real.

The doctor, setup, VM preflight and the simulator all use these, so that they cannot disagree on
what a host is: the kernel command line split as the kernel's ``next_arg()`` does and names compared
as ``parameq()`` does ('-' and '_' alike); boolean values read as ``kstrtobool()`` (lib/kstrtox.c);
the kernel config from /boot/config-RELEASE or /proc/config.gz; modprobe.d and modules-load.d files
chosen by kmod's and systemd's precedence (the first directory wins a file name; a link to
/dev/null masks it) and read in file-name order, later options winning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from vgpuctl.host.root import HostRoot

# ---------------------------------------------------------------- values


def kstrtobool(value: str | None) -> bool | None:
    """The kernel's kstrtobool(): y/Y/1 true, n/N/0 false, on/off (o + n/f); None if it is no boolean."""
    if not value:
        return None
    first, second = value[0].lower(), value[1:2].lower()
    if first in ("y", "1"):
        return True
    if first in ("n", "0"):
        return False
    if first == "o" and second in ("n", "f"):
        return second == "n"
    return None


def param_bool(value: str | None) -> bool | None:
    """A bool module parameter as param_set_bool() reads it: a bare name (no value) means true."""
    return True if value is None else kstrtobool(value)


def as_int(value: str | None) -> int | None:
    """An integer as kstrtoint(..., 0) reads it (0x.. hex, 0.. octal), None if it is none."""
    try:
        return int(value or "", 0)
    except ValueError:
        return None


BOOL_WORDS = ("0", "1", "y", "n", "Y", "N")


def param_matches(wanted: str, given: str | None) -> bool | None:
    """Whether a module parameter's ``given`` value (None: a bare name) is the ``wanted`` one (True), works
    against it (False), or says nothing of it (None). A wanted 0/1/y/n is a bool (param_set_bool: a bare name
    is true, a non-boolean says nothing); a wanted number an int (kstrtoint: a non-number is wrong); anything
    else a string."""
    if wanted in BOOL_WORDS:
        value = param_bool(given)
        return None if value is None else value == param_bool(wanted)
    number = as_int(wanted)
    if number is not None:
        return as_int(given) == number
    return given == wanted


def module_name(text: str) -> str:
    """A module's name as /proc/modules spells it, from a name, a modprobe.d word or a .ko path."""
    base = text.rsplit("/", 1)[-1]
    for suffix in (".ko.zst", ".ko.xz", ".ko.gz", ".ko"):
        base = base.removesuffix(suffix)
    return base.replace("-", "_")


# ---------------------------------------------------------------- the kernel command line


def cmdline_spans(text: str) -> list[tuple[int, int]]:
    """Where each parameter is, split as the kernel's next_arg() does (double quotes hold spaces)."""
    spans = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        start, quoted = i, False
        while i < n and (quoted or not text[i].isspace()):
            if text[i] == '"':
                quoted = not quoted
            i += 1
        spans.append((start, i))
    return spans


def split_cmdline(text: str) -> list[str]:
    return [text[a:b] for a, b in cmdline_spans(text)]


def param_key(token: str) -> str:
    """A parameter's name as the kernel compares it (parameq: '-' and '_' are the same)."""
    return token.lstrip('"').partition("=")[0].replace("-", "_")


def param_value(token: str) -> str | None:
    """A parameter's value without its quotes; None for a bare name."""
    name, sep, value = token.partition("=")
    if not sep:
        return None
    if name.startswith('"'):
        return value.rstrip('"')
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def kernel_params(cmdline: str) -> list[str]:
    """The parameters the kernel itself takes: what follows a bare ``--`` goes to init."""
    tokens = split_cmdline(cmdline)
    return tokens[:tokens.index("--")] if "--" in tokens else tokens


def cmdline_param(cmdline: str, name: str) -> str | None:
    """The value of ``name`` on the command line (the last one wins); "" for a bare flag; None if absent."""
    key, found = param_key(name), None
    for token in kernel_params(cmdline):
        if param_key(token) == key:
            value = param_value(token)
            found = "" if value is None else value
    return found


# ---------------------------------------------------------------- the kernel's build


def kernel_release(root: HostRoot) -> str | None:
    try:
        return root.read_value(root.proc_osrelease) or None
    except OSError:
        return None


def parse_proc_modules(text: str) -> list[str]:
    """The module names of /proc/modules (the first word of each line)."""
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def parse_bar_size_mib(resource: str, index: int) -> int | None:
    """The size in MiB of BAR ``index`` from a PCI device's ``resource`` file (a "start end flags" line per
    region, drivers/pci/pci-sysfs.c resource_show), None when it is absent or unset."""
    lines = resource.splitlines()
    if len(lines) <= index:
        return None
    try:
        start, end = (int(x, 16) for x in lines[index].split()[:2])
    except ValueError:
        return None
    return (end - start + 1) // (1024 * 1024) if end > start else None


def kernel_version(release: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", release or "")
    return (int(match[1]), int(match[2])) if match else None


def parse_kconfig(text: str) -> dict[str, str]:
    """symbol -> y/m/value, and n for '# CONFIG_X is not set'."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            config[key] = value.strip().strip('"')
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            config[line[2:-len(" is not set")]] = "n"
    return config


def kernel_config(root: HostRoot, release: str | None) -> tuple[str, dict[str, str]] | None:
    """(where it was read, the config): /boot/config-RELEASE as distributions ship it, else /proc/config.gz."""
    if release:
        source = root.kernel_config(release)
        try:
            return source, parse_kconfig(root.path(source).read_bytes().decode(errors="replace"))
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError:
            return None
    import gzip  # only on kernels without /boot/config-*: gzip pulls in zlib and more

    try:
        with open(root.path(root.proc_config_gz), "rb") as f:
            return root.proc_config_gz, parse_kconfig(gzip.decompress(f.read()).decode(errors="replace"))
    except (OSError, EOFError, gzip.BadGzipFile):
        return None


# ---------------------------------------------------------------- modprobe.d and modules-load.d


class ConfTree(Protocol):
    """What conf_files needs of a host: a HostRoot, or the simulator's own tree (it boots from /etc the same
    way)."""

    def listdir(self, host_path: str, /) -> list[str]: ...

    def readlink(self, host_path: str, /) -> str: ...


def conf_files(root: ConfTree, directories: Sequence[str], suffix: str = ".conf") -> list[str]:
    """The files in effect, by name across directories (the first directory wins a name, a link to
    /dev/null masks it), in file-name order."""
    chosen: dict[str, str] = {}
    for directory in directories:
        try:
            names = root.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.endswith(suffix) and name not in chosen:
                chosen[name] = f"{directory}/{name}"
    return [path for _, path in sorted(chosen.items()) if not _masked(root, path)]


def _masked(root: ConfTree, path: str) -> bool:
    try:
        return root.readlink(path) == HostRoot().dev_null
    except OSError:  # not a link
        return False


def _text(root: HostRoot, host_path: str) -> str:
    try:
        return root.path(host_path).read_bytes().decode(errors="replace")
    except OSError:
        return ""


def parse_modprobe_options(text: str) -> list[tuple[str, str, str]]:
    """(module, parameter, value) of every ``options`` line, in order ('' for a bare parameter)."""
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 3 and words[0] == "options":
            for word in words[2:]:
                name, _, value = word.partition("=")
                found.append((module_name(words[1]), name.replace("-", "_"), value))
    return found


def modprobe_options(root: HostRoot) -> list[tuple[str, str, str, str]]:
    """(file, module, parameter, value) for every ``options`` line in effect, in the order modprobe applies
    them (so the last one for a parameter wins)."""
    return [(path, *option) for path in conf_files(root, root.modprobe_dirs)
            for option in parse_modprobe_options(_text(root, path))]


def modprobe_option(root: HostRoot, module: str, name: str) -> tuple[str, str] | None:
    """(value, file) of the option modprobe gives ``module`` for ``name``, None if no file sets it."""
    found = None
    for path, option_module, option_name, value in modprobe_options(root):
        if option_module == module_name(module) and option_name == name.replace("-", "_"):
            found = (value, path)
    return found


def parse_modules_load(text: str) -> list[str]:
    """Module names of a modules-load.d file (or Debian's /etc/modules): one a line, '#' and ';' comments."""
    found = []
    for line in text.splitlines():
        word = line.split("#", 1)[0].strip()
        if word and not word.startswith(";"):
            found.append(module_name(word.split()[0]))
    return found


def modules_loaded_at_boot(root: HostRoot) -> dict[str, str]:
    """Module -> the first file that has it loaded at boot (modules-load.d, then Debian's /etc/modules)."""
    found: dict[str, str] = {}
    for path in [*conf_files(root, root.modules_load_dirs), root.etc_modules]:
        for module in parse_modules_load(_text(root, path)):
            found.setdefault(module, path)
    return found


# ---------------------------------------------------------------- out-of-tree modules and the firmware

MODULE_SIGNATURE = b"~Module signature appended~\n"  # the kernel's MODULE_SIG_STRING, at the end of a signed module
MODINFO_KEYS = (b"vermagic", b"version", b"name", b"srcversion")


def parse_modinfo(data: bytes) -> dict[str, str]:
    """The key=value strings of a module's .modinfo section (what ``modinfo`` prints), found in an uncompressed
    .ko as NUL-separated strings: vermagic ("6.8.0-45-generic SMP preempt mod_unload modversions "), version."""
    found: dict[str, str] = {}
    for chunk in data.split(b"\0"):
        key, sep, value = chunk.partition(b"=")
        if sep and key in MODINFO_KEYS:
            found.setdefault(key.decode(), value.decode(errors="replace"))
    return found


def vermagic_release(vermagic: str) -> str:
    """The kernel release a module was built for: the first word of its vermagic."""
    return vermagic.split(" ", 1)[0]


def module_signed(data: bytes) -> bool:
    """Whether a module file carries an appended signature (scripts/sign-file's trailer)."""
    return data.endswith(MODULE_SIGNATURE)


def read_module(root: HostRoot, host_path: str) -> bytes | None:
    """A module file's bytes, uncompressed (.ko, .ko.xz, .ko.gz); None for zstd (no decoder in Python 3.11)."""
    import gzip
    import lzma

    data = root.path(host_path).read_bytes()
    if host_path.endswith(".xz"):
        return lzma.decompress(data)
    if host_path.endswith(".gz"):
        return gzip.decompress(data)
    return None if host_path.endswith(".zst") else data


def parse_efi_bool(data: bytes) -> bool | None:
    """An efivarfs boolean variable (SecureBoot): 4 attribute bytes, then 1 or 0; None if malformed."""
    return data[4] == 1 if len(data) >= 5 else None
