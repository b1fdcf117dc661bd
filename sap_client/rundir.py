"""RUN_DIR: what a training run leaves on the user's side so later processes can predict through it.

    run.json               server, adapter id, labels, columns, training and noise settings
    metrics.json           the run's figures
    noise.key              the secret that keys the noise (never sent anywhere)
    cti_counts.safetensors CTI token statistics (training split only; never sent anywhere)
    bottom.safetensors     the fine-tuned bottom, with --train-bottom
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from sap_common.errors import InvalidInputError

RUN = "run.json"
METRICS = "metrics.json"
KEY = "noise.key"
CTI = "cti_counts.safetensors"
BOTTOM = "bottom.safetensors"


class RunDir:
    def __init__(self, path: Path):
        self.path = path

    def file(self, name: str) -> Path:
        return self.path / name

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_json(self, name: str, data: dict) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2) + "\n")

    def read_run(self) -> dict:
        path = self.path / RUN
        if not path.is_file():
            raise InvalidInputError(f"{self.path} is not a run folder ({RUN} is missing); pass the --out of "
                                    f"a finished `sap-client train`")
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
