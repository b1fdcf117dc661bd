"""Shared fixtures: offline mode, a private cache, tiny model folders and a real loopback server."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# The level of each test module (pytest -m unit | service | two_process): unit tests call code in this process;
# service tests run a real gRPC server on loopback in this process; two_process tests start sap-server and/or
# sap-client as processes of their own. Mixed modules are filed under their highest level.
LEVELS = {
    "unit": (
        "test_attacks test_bench test_cli test_codec test_cti test_data test_labeldp test_labels test_privacy "
        "test_privacy_table test_sft_data test_frontier "
        "test_split test_statement test_strong_attacks test_heap test_layering test_openmp "
        "test_proto_fresh"
    ).split(),
    "service": (
        "test_auth test_compute test_concurrency test_equivalence test_fuzz test_lean_wire "
        "test_generation test_learned_filter test_noise_on_the_wire test_prefetch test_robust test_servicer test_sft "
        "test_trained_bottom test_cluster"
    ).split(),
    "two_process": (
        "test_audit test_compose test_devices test_generative_cli test_label_privacy test_private_inference "
        "test_resume test_tls test_two_process test_operations test_sap_cluster"
    ).split(),
}
LEVEL_OF = {module: level for level, modules in LEVELS.items() for module in modules}


def pytest_collection_modifyitems(config, items):
    unfiled = sorted({item.module.__name__ for item in items if item.module.__name__ not in LEVEL_OF})
    if unfiled:
        raise pytest.UsageError(f"tests/conftest.py LEVELS: file {unfiled} under unit, service or two_process")
    for item in items:
        item.add_marker(getattr(pytest.mark, LEVEL_OF[item.module.__name__]))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Bottoms downloaded by tests go to a temp cache, never ~/.cache/sap."""
    monkeypatch.setenv("SAP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sap-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert", layers=3)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", layers=3)


@pytest.fixture(params=["bert", "llama"])
def tiny_model(request, tiny_bert, tiny_llama) -> Path:
    """Each test using it runs once per family."""
    return tiny_bert if request.param == "bert" else tiny_llama


@contextmanager
def running_server(provider, **kwargs) -> Iterator[str]:
    """A real gRPC server on 127.0.0.1:<free port>; yields its address, stops it afterwards."""
    from sap_server.app import start_server

    server, port = start_server(provider, "127.0.0.1", 0, **kwargs)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()
