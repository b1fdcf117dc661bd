"""The committed stubs in sap_common/proto/ must be exactly what protoc makes from sap.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed")

REPO = Path(__file__).resolve().parent.parent
PROTO = Path("proto/sap_common/proto/sap.proto")
GENERATED = ("sap_pb2.py", "sap_pb2_grpc.py", "sap_pb2.pyi")


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", "-Iproto",
        f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
        str(PROTO),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"protoc failed ({proc.returncode}):\n{proc.stderr}"
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "sap_common" / "proto" / name).read_bytes()
        != (REPO / "sap_common" / "proto" / name).read_bytes()
    ]
    assert not stale, (
        f"generated stubs are stale: {', '.join(stale)} differ from what {PROTO} compiles to; "
        "regenerate with `make proto` and commit the result"
    )
