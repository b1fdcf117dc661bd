"""RUN_DIR: what a training run leaves on the user's side so later processes can predict through it.

run.json                server, labels, columns, data (path and SHA-256), training and noise settings;
                        written when training starts ("finished": null), completed with the adapter id
metrics.json            the run's figures (written when the run completes); "privacy": its privacy statement
privacy.md              the privacy statement in words: the guarantee, the label exposure, what is not
                        covered, and the figures of `sap-client audit --run RUN_DIR` once one has run
noise.key               the secret that keys the noise (never sent anywhere)
cti_counts.safetensors  CTI token statistics (training split only; never sent anywhere)
bottom.safetensors      the fine-tuned bottom, with --train-bottom
checkpoint.safetensors  while the run is unfinished: where it stands (step, epoch, position, losses,
                        history, noise/signal sums), the session id and secret (file mode 0600), and
                        with --train-bottom the bottom and its optimizer; `sap-client train --resume
                        RUN_DIR` continues from it. Removed when the run completes.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import torch

from sap_common.checkpoint import atomic_write, pack, unpack
from sap_common.errors import InvalidInputError

RUN = "run.json"
METRICS = "metrics.json"
PRIVACY = "privacy.md"
KEY = "noise.key"
CTI = "cti_counts.safetensors"
BOTTOM = "bottom.safetensors"
CHECKPOINT = "checkpoint.safetensors"


class RunDir:
    def __init__(self, path: Path):
        self.path = path

    def file(self, name: str) -> Path:
        return self.path / name

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_json(self, name: str, data: dict) -> None:
        atomic_write(self.path / name, (json.dumps(data, indent=2) + "\n").encode(), mode=0o644)

    def write_checkpoint(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the run's checkpoint atomically; readable by the owner only (it holds the session secret)."""
        atomic_write(self.path / CHECKPOINT, pack(tensors, meta), mode=0o600)

    def read_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) of the run's checkpoint, or None when it has none."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        return unpack(path.read_bytes(), str(path))

    def read_run(self) -> dict:
        path = self.path / RUN
        if not path.is_file():
            raise InvalidInputError(
                f"{self.path} is not a run folder ({RUN} is missing); pass the --out of a finished `sap-client train`"
            )
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise InvalidInputError(f"{path} is not valid JSON: {exc}") from exc

    def noise_key(self) -> bytes:
        """The run's noise secret, created on first use (readable by the owner only)."""
        path = self.path / KEY
        if not path.exists():
            path.write_text(secrets.token_hex(32) + "\n")
            os.chmod(path, 0o600)
        return bytes.fromhex(path.read_text().strip())
