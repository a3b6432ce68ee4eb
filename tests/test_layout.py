"""The layout rules of ARCHITECTURE.md, checked on the source: a rule nobody checks drifts.

- Test modules share helpers through tests/conftest.py, never by importing each other.
- Every path of the managed host (kernel, boot and configuration areas) is spelled in host/root.py (the
  root object) and nowhere else; the simulator, which builds such hosts, is the exception.
- No module outside a vGPU backend tests a vendor's type names (GVT-g's ``i915-GVTg_`` prefix) or decides by a PCI
  vendor id (which VF backend a PF has is backends/vfs.py's to say).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vgpuctl"
TESTS = Path(__file__).resolve().parent
HOST_AREAS = ("/sys", "/proc", "/dev/", "/etc", "/boot", "/lib/modules", "/run", "/efi")
# Literals that name a host area without being a path vgpuctl reads or writes there, and modules whose paths
# are not the managed host's: each with why.
NOT_HOST_PATHS = {
    ("host/doctor.py", "/dev/kvm opens"): "a check's title",
    ("host/doctor.py", "/dev/vfio/vfio"): "a check's title",
}
THIS_MACHINE = {
    "base/process.py": "this machine's processes (QEMU, swtpm), whatever the root",
    "vm/linuxguest.py": "paths inside the Linux test guest it builds",
}


def _literals(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return found


def _modules() -> list[tuple[str, Path]]:
    return sorted((p.relative_to(SRC).as_posix(), p) for p in SRC.rglob("*.py"))


def test_test_modules_import_no_other_test_module() -> None:
    offenders = [f"{p.name}: {line.strip()}" for p in sorted(TESTS.glob("test_*.py"))
                 for line in p.read_text().splitlines()
                 if re.match(r"\s*(from tests\.test_\w+ import|from tests import test_|import tests\.test_)", line)]
    assert offenders == [], "share helpers through tests/conftest.py:\n" + "\n".join(offenders)


def test_only_the_root_object_spells_a_host_path() -> None:
    offenders = []
    for name, path in _modules():
        if name.startswith("sim/") or name == "host/root.py" or name in THIS_MACHINE:
            continue
        for line, text in _literals(path):
            if text.startswith(HOST_AREAS) and (name, text) not in NOT_HOST_PATHS:
                offenders.append(f"{name}:{line}: {text[:70]!r}")
    assert offenders == [], "add a property or method to HostRoot (host/root.py) and use it:\n" + "\n".join(offenders)


def test_no_module_outside_a_backend_tests_a_type_name_prefix() -> None:
    offenders = []
    for name, path in _modules():
        if name.startswith(("backends/", "sim/")):
            continue
        for line, text in _literals(path):
            if re.search(r"(^|[^\w])i915-GVTg_?$|^GVTg_", text):
                offenders.append(f"{name}:{line}: {text!r}")
    assert offenders == [], "a vendor's type names belong to its backend (backends/):\n" + "\n".join(offenders)


def test_no_module_outside_a_backend_decides_by_a_pci_vendor() -> None:
    """A comparison with a vendor id (``function.vendor == NVIDIA_VENDOR_ID``, ``== 0x10de``) is a vendor's rule:
    it belongs to that vendor's backend; elsewhere a vendor id may only label a row."""
    vendor_ids = {0x8086, 0x10DE, 0x1002}
    offenders = []
    for name, path in _modules():
        if name.startswith(("backends/", "sim/")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in (node.left, *node.comparators):
                named = isinstance(side, ast.Name | ast.Attribute) and (
                    getattr(side, "id", None) or getattr(side, "attr", "")).endswith("VENDOR_ID")
                if named or (isinstance(side, ast.Constant) and side.value in vendor_ids):
                    offenders.append(f"{name}:{node.lineno}")
    assert offenders == [], "a vendor's rules belong to its backend (backends/):\n" + "\n".join(offenders)
