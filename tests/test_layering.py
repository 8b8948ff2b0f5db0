"""docs/architecture.md's layers, enforced by parsing imports: each layer imports only the layers above it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGE = REPO / "gatewayd"
ORDER = ["core", "stores", "adapters", "service", "cli"]
# Third-party I/O libraries: only adapters import them, one library per adapter module.
THIRD_PARTY = {"paho", "tpm2_pytss", "pyudev", "systemd"}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_respects_layers(path: Path) -> None:
    rel = path.relative_to(PACKAGE).parts
    if len(rel) == 1:
        return  # gatewayd/__init__.py: version only
    layer = rel[0]
    allowed = set(ORDER[: ORDER.index(layer) + 1])
    for name in imports(path):
        top, _, rest = name.partition(".")
        if top == "gatewayd" and rest:
            target = rest.split(".")[0]
            if target in ORDER:
                assert target in allowed, f"{name} imported by a {layer} module"
                if layer == "adapters" and target == "adapters":
                    raise AssertionError(f"adapters do not import each other: {name}")
        elif top in THIRD_PARTY:
            assert layer == "adapters", f"third-party I/O library {top} imported outside adapters"
        elif layer == "core":
            assert top in sys.stdlib_module_names or top == "__future__", f"core imports non-stdlib {name}"


SIDES = ("upstream", "downstream")  # service/'s subpackages, along the config's sections


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "service").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO))
)
def test_service_sides_import_only_themselves(path: Path) -> None:
    """service/upstream (identity, uplink, renewal, trust) and service/downstream (listeners, broker,
    registry, serial sensors) import neither each other nor service/'s root modules: they meet only there,
    in the composition root (service/root.py), the daemon and the forwarder between them."""
    rel = path.relative_to(PACKAGE / "service").parts
    if len(rel) == 1:
        return  # a root module: may join both sides
    side = rel[0]
    for name in imports(path):
        parts = name.split(".")
        if parts[:2] == ["gatewayd", "service"] and len(parts) > 2:
            assert parts[2] == side, f"{path.relative_to(REPO)} (service/{side}) imports {name}"


def test_service_root_holds_only_what_joins_the_sides() -> None:
    root = sorted(p.stem for p in (PACKAGE / "service").glob("*.py") if p.stem != "__init__")
    assert root == ["clock", "control", "daemon", "forwarder", "hardware", "logsetup", "root"], root
    assert {p.name for p in (PACKAGE / "service").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        SIDES
    )


def test_imports_are_absolute() -> None:
    """The layer tests read absolute imports only; a relative one would slip past them."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"


def test_core_does_no_io() -> None:
    forbidden = {"socket", "threading", "asyncio", "subprocess", "time", "os", "random", "ssl", "select"}
    for path in (PACKAGE / "core").rglob("*.py"):
        tops = {name.split(".")[0] for name in imports(path)}
        assert not tops & forbidden, f"{path.name} imports {tops & forbidden}"


def test_the_daemon_and_gatewayctl_do_not_import_the_tpm_library() -> None:
    """tpm2-pytss is used in a helper process only (service/upstream/tpmproc.py): importing it in the daemon
    would keep it resident for good."""
    import subprocess

    code = (
        "import sys, gatewayd.cli.gatewayd, gatewayd.cli.gatewayctl, gatewayd.service.daemon\n"
        "print(sorted(m for m in sys.modules if m.startswith('tpm2_pytss')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout
