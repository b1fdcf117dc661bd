"""TLS and mutual TLS over loopback, with certificates made at test time by the openssl command line.

A test CA signs a server certificate for 127.0.0.1/localhost (subjectAltName) and a client certificate; a
second, untrusted CA signs an impostor client certificate.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from conftest import running_server
from sap_client import cli as client_cli
from sap_client.remote import ClientCredentials, RemoteTopService
from sap_common.errors import InvalidInputError, ServerUnavailableError
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig
from sap_common.service import SessionSpec
from sap_server import cli as server_cli
from sap_server.auth import ServerTls
from sap_server.provider import Provider
from tiny_models import learnable_rows, write_csv

HIDDEN, NUM_LABELS, BATCH, LENGTH = 32, 2, 4, 6

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA: trusts nothing of ours
    impostor_cert: Path  # a client certificate the other CA signed
    impostor_key: Path


def _openssl(folder: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


def _ca(folder: Path, name: str) -> None:
    _openssl(
        folder,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN=SAP test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )


def _leaf(folder: Path, name: str, ca: str, extensions: str, serial: int) -> None:
    _openssl(
        folder,
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN=sap-{name}",
    )
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        folder,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-set_serial",
        str(serial),
        "-days",
        "2",
        "-out",
        f"{name}.pem",
        "-extfile",
        f"{name}.ext",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line to make test certificates")
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "other-ca")
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    _leaf(folder, "server", "ca", leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n", 2)
    _leaf(folder, "client", "ca", leaf + "extendedKeyUsage=clientAuth\n", 3)
    _leaf(folder, "impostor", "other-ca", leaf + "extendedKeyUsage=clientAuth\n", 4)
    return Pki(
        *(
            folder / name
            for name in (
                "ca.pem",
                "server.pem",
                "server.key",
                "client.pem",
                "client.key",
                "other-ca.pem",
                "impostor.pem",
                "impostor.key",
            )
        )
    )


@pytest.fixture(scope="module")
def provider(tiny_llama):
    provider = Provider.from_loaded(load_model(str(tiny_llama)), split=1, peft=PeftConfig())
    yield provider
    provider.close()


def _train(service: RemoteTopService, seed: int, steps: int = 3) -> str:
    sid = service.open_session(SessionSpec(num_labels=NUM_LABELS, learning_rate=1e-2, seed=seed))
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        hidden = torch.randn(BATCH, LENGTH, HIDDEN, generator=g)
        mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
        mask[1, -3:] = 0
        labels = torch.randint(0, NUM_LABELS, (BATCH,), generator=g)
        logits = service.forward(sid, step, hidden, mask).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
        assert service.backward(sid, step, grad).applied_step == step
    return sid


def _refused(address: str, credentials: ClientCredentials | None) -> None:
    """The client cannot get anything from the server: the handshake fails (at connect or at the first call)."""
    with pytest.raises(ServerUnavailableError):
        with RemoteTopService(
            address, credentials=credentials, connect_timeout=2, tries=2, retry_backoff=0.05, call_timeout=5
        ) as service:
            service.server_info()


def test_tls_round_trip_matches_plain_training(provider, pki):
    tls = ServerTls.from_files(pki.server_cert, pki.server_key)
    with running_server(provider, tls=tls) as secure, running_server(provider) as plain:
        with RemoteTopService(secure, credentials=ClientCredentials(tls_ca=pki.ca)) as service:
            assert service.server_info().hidden_size == HIDDEN
            over_tls = _train(service, seed=4)
        with RemoteTopService(plain) as service:
            in_clear = _train(service, seed=4)
        a, b = (provider.sessions.get(sid).trainable_state() for sid in (over_tls, in_clear))
        assert all(torch.equal(a[name], b[name]) for name in a)
        assert provider.sessions.get(over_tls).steps_applied == 3

        _refused(secure, None)  # a plaintext client
        _refused(secure, ClientCredentials(tls_ca=pki.other_ca))  # a client that does not trust the server's CA


def test_mutual_tls_round_trip_and_clients_without_a_valid_certificate(provider, pki):
    tls = ServerTls.from_files(pki.server_cert, pki.server_key, client_ca=pki.ca)
    assert tls.mutual
    with running_server(provider, tls=tls) as address:
        good = ClientCredentials(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        with RemoteTopService(address, credentials=good) as service:
            sid = _train(service, seed=5, steps=2)
            assert service.close_session(sid) == 2
        _refused(address, ClientCredentials(tls_ca=pki.ca))  # no client certificate
        _refused(address, ClientCredentials(tls_ca=pki.ca, tls_cert=pki.impostor_cert, tls_key=pki.impostor_key))
        _refused(address, None)


def test_missing_or_unpaired_tls_files_are_clear_errors(pki, tmp_path, tiny_llama, capsys):
    missing = tmp_path / "nope.pem"
    with pytest.raises(InvalidInputError, match="nope.pem"):
        RemoteTopService("127.0.0.1:1", credentials=ClientCredentials(tls_ca=missing))
    with pytest.raises(ValueError, match="go together"):
        ClientCredentials(tls_ca=pki.ca, tls_cert=pki.client_cert)
    with pytest.raises(InvalidInputError, match=r"--tls-key.*nope.pem"):
        ServerTls.from_files(pki.server_cert, missing)

    server = ["--model", str(tiny_llama), "--split", "1", "--port", "0"]
    assert server_cli.main(server + ["--tls-cert", str(pki.server_cert), "--tls-key", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pem" in err[0] and "--tls-key" in err[0]
    for flags in (["--tls-cert", str(pki.server_cert)], ["--tls-client-ca", str(pki.ca)]):
        with pytest.raises(SystemExit) as info:
            server_cli.main(server + flags)
        assert info.value.code == 2
    data = write_csv(tmp_path / "data.csv", learnable_rows(8))
    with pytest.raises(SystemExit) as info:
        client_cli.main(["train", str(data), "--tls-cert", str(pki.client_cert)])
    assert info.value.code == 2 and "go together" in capsys.readouterr().err
    assert client_cli.main(["train", str(data), "--tls-ca", str(missing), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pem" in err[0] and "--tls-ca" in err[0]


def test_client_cli_over_mutual_tls(provider, pki, tmp_path, monkeypatch):
    data = write_csv(tmp_path / "data.csv", learnable_rows(24))
    tls = ServerTls.from_files(pki.server_cert, pki.server_key, client_ca=pki.ca)
    with running_server(provider, tls=tls) as address:
        train = [
            "train",
            str(data),
            "--server",
            address,
            "--batch-size",
            "8",
            "--eval-fraction",
            "0.25",
            "--out",
            str(tmp_path / "run"),
        ]
        assert (
            client_cli.main(
                train + ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
            )
            == 0
        )
        for name, path in (("SAP_TLS_CA", pki.ca), ("SAP_TLS_CERT", pki.client_cert), ("SAP_TLS_KEY", pki.client_key)):
            monkeypatch.setenv(name, str(path))
        assert client_cli.main(["evaluate", str(data), "--run", str(tmp_path / "run")]) == 0
