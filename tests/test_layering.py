"""Layering: only the codec, the servicer/app and the client's remote stub touch grpc or generated code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("sap_common", "sap_server", "sap_client", "sap_cluster")
ALLOWED = {
    "sap_common/codec.py",
    "sap_server/servicer.py",
    "sap_server/app.py",
    "sap_server/health.py",  # the standard gRPC health service: wire-level by definition
    "sap_client/remote.py",
    "sap_cluster/router.py",  # a gRPC router: passes calls on as bytes
}
ALLOWED_DIRS = ("sap_common/proto/",)
# Domain modules that must stay torch-only, checked by name so a move or rename is noticed.
MUST_BE_DOMAIN = (
    "sap_server/session.py",
    "sap_server/registry.py",
    "sap_common/peft/",
    "sap_common/models/",
    "sap_client/trainer.py",
)


def _python_files() -> list[str]:
    return sorted(p.relative_to(REPO).as_posix() for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def _module_name(relative: str) -> str:
    parts = relative[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(relative: str) -> list[str]:
    """Every module an import statement anywhere in the file names (nested imports included)."""
    tree = ast.parse((REPO / relative).read_text(encoding="utf-8"), filename=relative)
    is_package = relative.endswith("__init__.py")
    package = _module_name(relative).split(".")
    if not is_package:
        package = package[:-1]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]  # `from sap_common import proto`
    return found


def _is_wire(module: str) -> bool:
    return (
        module == "grpc"
        or module.startswith("grpc.")
        or module.startswith("grpc_")
        or module == "sap_common.proto"
        or module.startswith("sap_common.proto.")
    )


def _wire_imports(relative: str) -> list[str]:
    return sorted({m for m in _imported_modules(relative) if _is_wire(m)})


def test_scan_finds_the_packages():
    files = _python_files()
    assert len(files) >= 20
    for expected in (
        "sap_common/codec.py",
        "sap_server/servicer.py",
        "sap_client/remote.py",
        "sap_server/session.py",
        "sap_common/models/split.py",
    ):
        assert expected in files


def test_the_scanner_sees_wire_imports_where_they_are_allowed():
    # guards against a scanner that finds nothing: the allowed modules really do import the wire
    for relative in ("sap_common/codec.py", "sap_server/servicer.py", "sap_client/remote.py"):
        assert _wire_imports(relative), f"{relative} shows no grpc/proto import: the scanner is broken"


def test_scanner_resolves_every_import_form(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    pkg = tmp_path / "sap_common" / "models"
    pkg.mkdir(parents=True)
    samples = {
        "plain.py": "import grpc\n",
        "sub.py": "import grpc.aio as aio\n",
        "nested.py": "def f():\n    from sap_common.proto import sap_pb2\n",
        "from_parent.py": "from sap_common import proto\n",
        "relative.py": "from ..proto import sap_pb2_grpc\n",
        "clean.py": "import torch\nfrom sap_common.errors import SapError\nfrom . import split\n",
    }
    for name, source in samples.items():
        (pkg / name).write_text(source)
    flagged = {name for name in samples if _wire_imports(f"sap_common/models/{name}")}
    assert flagged == set(samples) - {"clean.py"}


def _allowed(relative: str) -> bool:
    return relative in ALLOWED or relative.startswith(ALLOWED_DIRS)


def test_only_the_wire_layer_imports_grpc_or_generated_code():
    offenders = {f: _wire_imports(f) for f in _python_files() if not _allowed(f)}
    offenders = {f: mods for f, mods in offenders.items() if mods}
    assert not offenders, f"domain modules import the wire layer: {offenders}"


@pytest.mark.parametrize("prefix", MUST_BE_DOMAIN)
def test_domain_modules_are_torch_only(prefix):
    files = [f for f in _python_files() if f == prefix or (prefix.endswith("/") and f.startswith(prefix))]
    assert files, f"no file matches {prefix}: was it moved? update this test"
    for relative in files:
        assert not _allowed(relative)
        assert not _wire_imports(relative), f"{relative} imports {_wire_imports(relative)}"


def test_importing_the_domain_leaves_grpc_unloaded():
    code = (
        "import sys\n"
        "import sap_client.trainer, sap_server.session, sap_common.models.split\n"
        "import sap_server.registry, sap_client.data\n"
        "bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'sap_common.proto')))\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, f"loaded: {result.stdout.strip()} {result.stderr[-2000:]}"
