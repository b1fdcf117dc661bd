"""open_split: everything a command needs, opened one way for all of them (train, resume, predict, evaluate, audit);
open_generative: the same for generative fine-tuning (sap-client train DATA.jsonl).

It connects, checks the server against the run (model and split), downloads and verifies the bottom, puts a run's
fine-tuned bottom weights in place and builds the SplitTrainer with the run's privatizer, whose send function
(SplitTrainer.to_send) is what every command, the audit included, sends or measures."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sap_client.bottom import load_server_bottom, load_server_tail
from sap_client.cti import CtiStatistics, eta_table
from sap_client.filter import LearnedFilter
from sap_client.head import UserHead
from sap_client.privacy import NoiseConfig, Privatizer
from sap_client.remote import ClientCredentials, RemoteTopService
from sap_client.rundir import BOTTOM, CTI, FILTER, HEAD, TAIL, RunDir, RunSpec
from sap_client.trainer import SplitTrainer, TrainConfig
from sap_common.devices import DTYPES
from sap_common.errors import InvalidInputError, ModelLoadError
from sap_common.models.families import DECODER_TYPES
from sap_common.service import ServerInfo

log = logging.getLogger(__name__)


def wire_dtype_of(name: str) -> torch.dtype:
    """--wire-dtype's torch dtype (float32 is lossless; bfloat16 and float16 halve the bytes)."""
    if name not in DTYPES:
        raise InvalidInputError(f"wire dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def make_privatizer(
    noise: NoiseConfig, eta: float | None, run: RunDir, stats: CtiStatistics | None, rescale_norm: float | None = None
) -> Privatizer:
    table = None
    if stats is not None and eta is not None:
        table = eta_table(stats, eta, mode=noise.cti_mode, floor=noise.cti_floor, top=noise.cti_top)
    return Privatizer(
        eta, key=run.noise_key(), eta_table=table, label_rows=noise.cti_rows == "label", rescale_norm=rescale_norm
    )


def load_filter(run: RunDir, hidden_size: int) -> tuple[LearnedFilter, dict | None]:
    """A --learned-filter run's filter (filter.safetensors), frozen: every later send goes through it; and what its
    training measured."""
    path = run.file(FILTER)
    if not path.is_file():
        raise InvalidInputError(f"{run.path} trained with --learned-filter but has no {FILTER}")
    filter_ = LearnedFilter(hidden_size)
    filter_.load_state_dict(load_file(str(path)))
    filter_.requires_grad_(False)
    with safe_open(str(path), "pt") as opened:
        training = (opened.metadata() or {}).get("training")
    return filter_.eval(), json.loads(training) if training else None


def run_privatizer(run: RunDir, spec: RunSpec) -> Privatizer | None:
    """The privatizer a run uses: its eta, CTI statistics, noise key and rescaling norm (None without noise)."""
    if not spec.eta:
        return None
    noise = spec.noise
    if noise.rescale_noised and spec.rescale_norm is None:
        raise InvalidInputError(f"{run.path} asks for rescaled noised vectors but records no rescale_norm")
    return make_privatizer(
        noise,
        spec.eta,
        run,
        CtiStatistics.load(run.file(CTI)) if noise.cti else None,
        spec.rescale_norm if noise.rescale_noised else None,
    )


@dataclass
class OpenSplit:
    """A connected client: the service, what the server serves, and the trainer over the downloaded bottom."""

    service: RemoteTopService
    info: ServerInfo
    trainer: SplitTrainer
    download_bytes: int  # the bottom download (the service's byte counters start at 0 after it)

    def close(self) -> None:
        self.service.close()

    def __enter__(self) -> OpenSplit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _take_download_bytes(service: RemoteTopService) -> int:
    """The bytes received so far (a download), the traffic counters then reset: training traffic starts at 0."""
    received, service.bytes_sent, service.bytes_received = service.bytes_received, 0, 0
    return received


def _check_start_adapter(info: ServerInfo, config: TrainConfig, server: str) -> None:
    """A new run's --start-adapter must be one the server offers (checked before the bottom is downloaded)."""
    if config.start_adapter and config.start_adapter not in info.start_adapters:
        offered = ", ".join(info.start_adapters) or "none"
        raise InvalidInputError(
            f"the server at {server} offers no starting adapter {config.start_adapter!r} (it offers: {offered})"
        )


def open_split(
    server: str,
    config: TrainConfig,
    *,
    run: RunDir | None = None,
    spec: RunSpec | None = None,
    wire_dtype: str | None = None,
    trained_bottom: bool = False,
    fresh_noise: bool = False,
    credentials: ClientCredentials | None = None,
    device: torch.device | str = "cpu",
) -> OpenSplit:
    """Connect to server and build the trainer. With a run (spec read from run.json): the server must serve the run's
    model and split, the trainer gets the run's privatizer, the wire dtype is the run's unless wire_dtype overrides
    it, and trained_bottom loads the run's fine-tuned bottom (bottom.safetensors) when it has one, and its head
    (head.safetensors, --private-head). A run's secret keys a new head's first weights."""
    wire = wire_dtype or (spec.wire_dtype if spec else "float32")
    service = RemoteTopService(server, wire_dtype=wire_dtype_of(wire), credentials=credentials)
    try:
        info = service.server_info()
        if spec is not None and (info.model_id, info.split) != (spec.model, spec.split):
            raise ModelLoadError(
                f"the run was trained on {spec.model} split {spec.split}; the server at {server} serves "
                f"{info.model_id} split {info.split}"
            )
        if spec is None:
            _check_start_adapter(info, config, server)
        bottom, tokenizer, _ = load_server_bottom(service, info)
        download_bytes = _take_download_bytes(service)
        if trained_bottom and run is not None and run.file(BOTTOM).exists():
            bottom.load_state_dict(load_file(str(run.file(BOTTOM))))
        tail = None
        if config.user_tail:  # the model's last blocks run here: kept in the run (a temporary folder without one)
            where = run.file(TAIL) if run is not None else Path(tempfile.mkdtemp(prefix="sap-tail-")) / TAIL
            tail = load_server_tail(service, info, config.user_tail, where)
            download_bytes += _take_download_bytes(service)
        privatizer = run_privatizer(run, spec) if run is not None and spec is not None else None
        head_key = run.noise_key() if run is not None else None
        trainer = SplitTrainer(
            bottom,
            tokenizer,
            service,
            config,
            privatizer,
            fresh_noise=fresh_noise,
            device=device,
            head_key=head_key,
            tail=tail,
        )
        if trained_bottom and run is not None and config.private_head:
            trainer.attach_head(load_head(run.file(HEAD), trainer))
        if run is not None and spec is not None and spec.config.learned_filter:
            trainer.filter, trainer.filter_training = load_filter(run, trainer.bottom.config.hidden_size)
    except BaseException:
        service.close()
        raise
    return OpenSplit(service, info, trainer, download_bytes)


def open_generative(
    server: str,
    config: TrainConfig,
    *,
    run: RunDir,
    spec: RunSpec | None = None,
    finished: bool = True,
    wire_dtype: str = "float32",
    credentials: ClientCredentials | None = None,
    device: torch.device | str = "cpu",
) -> OpenSplit:
    """Connect to server for generative fine-tuning: the bottom, and the tail bundle with the model's last
    config.user_tail blocks (possibly none) and final norm, kept in RUN_DIR/tail, ending in the tied output layer;
    an SFTTrainer over them (no privatizer yet: the caller fits the noise). With the spec of a finished run
    (sap-client generate): the server must serve its model and split, and the trainer gets the run's fine-tuned
    bottom and tail LoRA and its privatizer; with finished=False (sap-client resume) only its privatizer, the
    weights coming from the run's checkpoint."""
    from sap_client.sft import SFTTrainer

    service = RemoteTopService(server, wire_dtype=wire_dtype_of(wire_dtype), credentials=credentials)
    try:
        info = service.server_info()
        if spec is not None and (info.model_id, info.split) != (spec.model, spec.split):
            raise ModelLoadError(
                f"the run was trained on {spec.model} split {spec.split}; the server at {server} serves "
                f"{info.model_id} split {info.split}"
            )
        if info.model_type not in DECODER_TYPES:
            raise InvalidInputError(
                f"generative fine-tuning needs a decoder; the server at {server} serves {info.model_id} "
                f"({info.model_type})"
            )
        if spec is None:
            _check_start_adapter(info, config, server)
        bottom, tokenizer, _ = load_server_bottom(service, info)
        download_bytes = _take_download_bytes(service)
        embedding = bottom.embeddings  # a decoder's embeddings are its token table itself
        if not isinstance(embedding, torch.nn.Embedding):
            raise ModelLoadError(f"{info.model_id}'s bottom has no token embedding table to make logits with")
        lm_end = load_server_tail(service, info, config.user_tail, run.file(TAIL), lm_embedding=embedding)
        download_bytes += _take_download_bytes(service)
        if spec is not None and finished and run.file(BOTTOM).exists():
            bottom.load_state_dict(load_file(str(run.file(BOTTOM))))
        trainer = SFTTrainer(bottom, tokenizer, service, config, lm_end, device=device, head_key=run.noise_key())
        if spec is not None:
            if config.user_tail and finished:
                try:
                    trainer.load_user_state(load_file(str(run.file(HEAD))))
                except (OSError, ValueError) as exc:
                    raise ModelLoadError(f"{run.file(HEAD)}: the run's tail LoRA cannot be loaded: {exc}") from exc
            trainer.privatizer = run_privatizer(run, spec)
    except BaseException:
        service.close()
        raise
    return OpenSplit(service, info, trainer, download_bytes)


def load_head(path: Path, trainer: SplitTrainer) -> UserHead:
    """The head a --private-head run kept (RUN_DIR/head.safetensors), over the trainer's tail when it has one."""
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: a --private-head run keeps its task head there")
    state = load_file(str(path))
    weight = state.get("classifier.weight")
    if weight is None or weight.dim() != 2:
        raise ModelLoadError(f"{path} holds no head (classifier.weight)")
    head = trainer.new_head(weight.shape[0])
    try:
        head.load_trainable_state(state)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    return head


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
