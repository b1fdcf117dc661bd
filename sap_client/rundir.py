"""RUN_DIR: what a training run leaves on the user's side so later processes can predict through it.

run.json                RunSpec: what the user asked (server, labels, columns, data path and SHA-256,
                        training and noise settings, the eta and rescaling norm resolved from them),
                        written once when training starts ("finished": null), completed with the adapter id
metrics.json            the run's figures (written when the run completes); "privacy": its privacy statement
privacy.md              the privacy statement in words: the guarantee, the label exposure, what is not
                        covered, and the figures of `sap-client audit --run RUN_DIR` once one has run
noise.key               the secret that keys the noise (never sent anywhere)
cti_counts.safetensors  CTI token statistics (training split only; never sent anywhere)
bottom.safetensors      the fine-tuned bottom, with --train-bottom
head.safetensors        the task head, with --private-head (it never leaves this machine), with --user-tail
                        the tail's LoRA too
tail/                   with --user-tail M: the model's last M blocks (the tail bundle the server sent)
checkpoint.safetensors  while the run is unfinished: where it stands (step, epoch, position, losses,
                        history, noise/signal sums), the session id and secret (file mode 0600), and
                        with --train-bottom the bottom and its optimizer, with --private-head the head
                        and its optimizer (RunState); `sap-client
                        resume RUN_DIR` continues from it. Removed when the run completes.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from sap_client.privacy import NoiseConfig
from sap_client.trainer import TrainConfig, TrainProgress
from sap_common.checkpoint import atomic_write, pack, unpack
from sap_common.errors import InvalidInputError

RUN = "run.json"
METRICS = "metrics.json"
PRIVACY = "privacy.md"
KEY = "noise.key"
CTI = "cti_counts.safetensors"
BOTTOM = "bottom.safetensors"
HEAD = "head.safetensors"
FILTER = "filter.safetensors"  # --learned-filter (sap_client/filter.py)
TAIL = "tail"
CHECKPOINT = "checkpoint.safetensors"
STATE_FORMAT = 1  # of checkpoint.safetensors's metadata (RunState)


@dataclass
class RunSpec:
    """run.json: what the user asked for, resolved once when training starts (eta from --noise-ratio, the
    rescaling norm), and how it ended (adapter_id, finished). Every later command reads the run from here."""

    server: str
    model: str
    split: int
    label_names: list[str]
    text_column: str
    label_column: str
    config: TrainConfig
    noise: NoiseConfig
    data: str | None = None  # None in runs from before `resume` existed: they predict, but cannot resume
    data_sha256: str | None = None
    eta: float | None = None
    rescale_norm: float | None = None
    wire_dtype: str = "float32"  # runs from before --wire-dtype sent float32
    eval: str | None = None
    eval_sha256: str | None = None
    eval_fraction: float | None = None
    max_examples: int | None = None
    started: str | None = None
    finished: str | None = None
    adapter_id: str | None = None
    task: str = "classification"  # or "generative" (a JSONL of completions: sap_client/sft.py)
    data_format: str | None = None  # generative: messages, prompt-completion or text
    loss_on: str | None = None  # generative: completion or all

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = RUN) -> RunSpec:
        known = {f.name for f in fields(cls)}
        try:
            values = {name: value for name, value in data.items() if name in known}
            config = dict(data["config"])
            if config.get("train_bottom") and "bottom_learning_rate" not in config:
                config["bottom_learning_rate"] = config["learning_rate"]  # what runs before --bottom-lr trained at
            values["config"] = TrainConfig(**config)
            values["noise"] = NoiseConfig(**data["noise"])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"{where} is not a run of this sap-client ({type(exc).__name__}: {exc})") from exc


@dataclass
class RunState:
    """checkpoint.safetensors's metadata: where an unfinished run stands and how to reach its session."""

    session_id: str
    session_secret: str | None  # None in-process (no wire to guard)
    progress: TrainProgress = field(default_factory=TrainProgress)
    bytes_sent: int = 0  # traffic of every process of the run so far
    bytes_received: int = 0
    saved_at: str | None = None
    bottom_optimizer: dict | None = None  # the optimizer's layout, with --train-bottom (its tensors are alongside)
    head_optimizer: dict | None = None  # the same for the head, with --private-head
    format: int = STATE_FORMAT

    @property
    def step(self) -> int:
        return self.progress.step

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), step=self.step)

    @classmethod
    def from_json(cls, meta: dict[str, Any], where: str = CHECKPOINT) -> RunState:
        if meta.get("format") != STATE_FORMAT:
            raise InvalidInputError(f"{where} has format {meta.get('format')!r}, expected {STATE_FORMAT}")
        try:
            return cls(
                session_id=meta["session_id"],
                session_secret=meta["session_secret"],
                progress=TrainProgress(**meta["progress"]),
                bytes_sent=meta["bytes_sent"],
                bytes_received=meta["bytes_received"],
                saved_at=meta.get("saved_at"),
                bottom_optimizer=meta.get("bottom_optimizer"),
                head_optimizer=meta.get("head_optimizer"),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"{where} is not a checkpoint of this sap-client ({exc})") from exc


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

    def write_state(self, state: RunState, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the run's checkpoint atomically; readable by the owner only (it holds the session secret)."""
        atomic_write(self.path / CHECKPOINT, pack(tensors, state.to_json()), mode=0o600)

    def read_state(self) -> tuple[RunState, dict[str, torch.Tensor]] | None:
        """(state, tensors) of the run's checkpoint, or None when it has none."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        tensors, meta = unpack(path.read_bytes(), str(path))
        return RunState.from_json(meta, str(path)), tensors

    def write_spec(self, spec: RunSpec) -> None:
        self.write_json(RUN, spec.to_json())

    def read_classification_spec(self, command: str) -> RunSpec:
        """run.json of a classification run; a generative run is refused with what it does not support yet."""
        spec = self.read_spec()
        if spec.task != "classification":
            raise InvalidInputError(
                f"{self.path} is a {spec.task} run: `sap-client {command}` works on classification runs only (a "
                "generative run's RUN_DIR has its metrics, perplexity before and after, and its privacy statement)"
            )
        return spec

    def read_spec(self) -> RunSpec:
        path = self.path / RUN
        if not path.is_file():
            raise InvalidInputError(
                f"{self.path} is not a run folder ({RUN} is missing); pass the --out of a finished `sap-client train`"
            )
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise InvalidInputError(f"{path} is not valid JSON: {exc}") from exc
        return RunSpec.from_json(data, str(path))

    def noise_key(self) -> bytes:
        """The run's noise secret, created on first use (readable by the owner only)."""
        path = self.path / KEY
        if not path.exists():
            path.write_text(secrets.token_hex(32) + "\n")
            os.chmod(path, 0o600)
        return bytes.fromhex(path.read_text().strip())
