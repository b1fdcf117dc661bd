"""The CLIs' OpenMP spin default (sap_common/openmp.py) is set before torch loads, and never overrides the user."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sap_common import openmp

PROBE = "import os, sys; import {module}; print(os.environ.get('GOMP_SPINCOUNT', '-'), 'torch' in sys.modules)"


def _probe(module: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.split()


@pytest.mark.parametrize("module", ["sap_client.cli", "sap_server.cli"])
def test_cli_sets_the_spin_default_before_torch(module):
    # prefer_short_spin refuses once torch is imported, so the value proves it ran before torch loaded
    assert _probe(module) == [openmp.SPIN_COUNT, "True"]


@pytest.mark.parametrize("env", [{"GOMP_SPINCOUNT": "123"}, {"OMP_WAIT_POLICY": "passive"}])
def test_the_users_choice_is_kept(env):
    expected = env.get("GOMP_SPINCOUNT", "-")
    assert _probe("sap_server.cli", **env)[0] == expected


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401 - loaded in this process already (by conftest); the default cannot apply

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert openmp.prefer_short_spin() is False
    assert "GOMP_SPINCOUNT" not in os.environ
