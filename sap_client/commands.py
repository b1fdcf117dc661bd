"""What `sap-client train`, `resume`, `predict`, `evaluate` and `audit` do, once their arguments are parsed. Each
opens its connection, bottom and trainer with sap_client.connection.open_split; a run's settings are its RunSpec
(run.json), an unfinished run's progress its RunState (checkpoint.safetensors)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from sap_client.connection import OpenSplit, file_sha256, make_privatizer, open_generative, open_split
from sap_client.cti import fit_cti
from sap_client.data import TextDataset, load_labelled_csv, load_texts, stratified_split
from sap_client.filter import FilterConfig, train_filter
from sap_client.labeldp import randomize_labels
from sap_client.privacy import NoiseConfig, Privatizer
from sap_client.remote import ClientCredentials
from sap_client.rundir import (
    BOTTOM,
    CHECKPOINT,
    CTI,
    FILTER,
    HEAD,
    METRICS,
    PRIVACY,
    RUN,
    RunDir,
    RunSpec,
    RunState,
)
from sap_client.sft import SFTTrainer
from sap_client.statement import audit_summary, median_token_distance, privacy_statement, render_statement
from sap_client.trainer import SplitTrainer, TrainConfig, TrainProgress
from sap_common.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from sap_common.dchi import eta_for_noise_ratio
from sap_common.errors import InvalidInputError, ModelLoadError, SapError, SessionNotFoundError, StepOrderError

log = logging.getLogger(__name__)
NORM_SAMPLE = 256  # training texts used to measure the mean hidden-state norm for --noise-ratio


def _resolve_eta(
    noise: NoiseConfig, trainer: SplitTrainer, mean_norm: Callable[[], float], sampled: int
) -> tuple[float, float | None]:
    """(eta from --eta or --noise-ratio, the mean hidden-state norm when it was needed); mean_norm measures it on
    `sampled` training examples. noise must be enabled."""
    eta, norm = noise.eta, None
    if eta is None or noise.rescale_noised:
        norm = mean_norm()
        log.info("mean hidden-state norm %.3f on %d training examples", norm, sampled)
    if eta is None:
        assert noise.noise_ratio is not None and norm is not None  # noise.enabled: --eta or --noise-ratio
        eta = eta_for_noise_ratio(noise.noise_ratio, norm, trainer.bottom.config.hidden_size)
        log.info("eta %.4g for noise ratio %g", eta, noise.noise_ratio)
    return eta, norm


def _noise_is_off(noise: NoiseConfig) -> bool:
    if not noise.enabled:
        log.warning("noise is off: hidden states leave this machine without privacy noise (use --eta or --noise-ratio)")
    return not noise.enabled


def fit_noise(noise: NoiseConfig, trainer: SplitTrainer, train: TextDataset, run: RunDir) -> Privatizer | None:
    """Resolve eta (from --eta or --noise-ratio), the rescaling norm (--rescale-noised) and the CTI
    statistics, on the training split only."""
    if _noise_is_off(noise):
        return None
    sample = train.texts[:NORM_SAMPLE]
    eta, norm = _resolve_eta(noise, trainer, lambda: trainer.mean_hidden_norm(sample), len(sample))
    stats = None
    if noise.cti:
        if not train.labels:
            raise InvalidInputError("CTI needs labelled texts (a label column) to count tokens per class")
        token_ids = [
            trainer.tokenizer(text, truncation=True, max_length=trainer.config.max_length)["input_ids"]
            for text in train.texts
        ]
        vocab = trainer.bottom.input_embedding_matrix().shape[0]
        ignore = {trainer.tokenizer.pad_token_id} - {None}
        stats = fit_cti(
            token_ids, train.labels, num_classes=len(train.label_names), vocab_size=vocab, ignore_ids=ignore
        )
        stats.save(run.file(CTI))
    return make_privatizer(noise, eta, run, stats, norm if noise.rescale_noised else None)


def _fit_filter(trainer: SplitTrainer, train: TextDataset, run: RunDir) -> None:
    """--learned-filter: train the filter on the training split under the run's noise, keep it in the run (every
    later command sends through it) and what its training measured in the trainer, for metrics.json."""
    if trainer.privatizer is None:
        raise InvalidInputError("--learned-filter trains against the run's noise: give --noise-ratio or --eta")
    config = trainer.config
    settings = FilterConfig(steps=config.filter_steps, privacy_weight=config.filter_privacy_weight, seed=config.seed)
    trainer.filter, trainer.filter_training = train_filter(trainer, train, trainer.privatizer, settings)
    tensors = {k: v.contiguous() for k, v in trainer.filter.state_dict().items()}
    save_file(tensors, str(run.file(FILTER)), metadata={"training": json.dumps(trainer.filter_training)})


def _training_data(
    data_path: Path,
    text_column: str,
    label_column: str,
    eval_path: Path | None,
    eval_fraction: float,
    max_examples: int | None,
    seed: int,
) -> tuple[list[str], TextDataset, TextDataset]:
    """(label names, training split, held-out split), the same every time for the same files and settings."""
    data = load_labelled_csv(data_path, text_column, label_column)
    if max_examples:
        data = data.subset(list(range(min(max_examples, len(data)))))
    if eval_path:
        train_data, held = data, load_labelled_csv(eval_path, text_column, label_column, data.label_names)
    else:
        train_data, held = stratified_split(data, eval_fraction, seed)
    return data.label_names, train_data, held


def _training_labels(train: TextDataset, config: TrainConfig, run: RunDir) -> tuple[TextDataset, dict | None]:
    """The training split with the labels training uses: with --label-epsilon, each replaced once by its randomized
    response (keyed by the run's secret, so a resume gets the same); and what metrics.json says of it."""
    if config.label_epsilon is None:
        return train, None
    randomized = randomize_labels(
        train.labels,
        train.texts,
        len(train.label_names),
        config.label_epsilon,
        run.noise_key(),
        config.label_mechanism,
    )
    log.info(
        "label DP: %d of %d training labels randomized away (epsilon %g, %s)",
        randomized.flipped,
        len(train),
        config.label_epsilon,
        config.label_mechanism,
    )
    info = {
        "epsilon": config.label_epsilon,
        "mechanism": config.label_mechanism,
        "keep_probability": randomized.keep_probability,
        "candidates": [train.label_names[c] for c in randomized.candidates],
        "flipped": randomized.flipped,
        "examples": len(train),
    }
    return TextDataset(train.texts, randomized.labels, train.label_names), info


class _Checkpointer:
    """Writes the client's checkpoint (RUN_DIR/checkpoint.safetensors, a RunState) when the provider announces one
    of its own (BackwardReply.checkpointed), before the next step is sent; and once right after the session opens."""

    def __init__(self, run: RunDir, opened: OpenSplit, *, bytes_sent: int = 0, bytes_received: int = 0):
        self.run, self.trainer, self.service = run, opened.trainer, opened.service
        self.bytes_sent, self.bytes_received = bytes_sent, bytes_received  # traffic of earlier processes
        self.step: int | None = None  # the step of the latest checkpoint written

    def __call__(self, progress: TrainProgress) -> None:
        trainer = self.trainer
        if trainer.privatizer is not None:
            progress.privatizer = trainer.privatizer.state()
        assert trainer.session_id is not None
        state = RunState(
            session_id=trainer.session_id,
            session_secret=self.service.session_secret(trainer.session_id),
            progress=progress,
            bytes_sent=self.bytes_sent + self.service.bytes_sent,
            bytes_received=self.bytes_received + self.service.bytes_received,
            saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        tensors: dict[str, torch.Tensor] = {}
        if trainer.bottom_optimizer is not None:
            tensors.update({_BOTTOM + name: value for name, value in trainer.bottom.state_dict().items()})
            optimizer_tensors, state.bottom_optimizer = optimizer_to_tensors(
                trainer.bottom_optimizer, _BOTTOM_OPTIMIZER
            )
            tensors.update(optimizer_tensors)
        if trainer.head is not None and trainer.head_optimizer is not None:
            tensors.update({_HEAD + name: value for name, value in trainer.head.trainable_state().items()})
            optimizer_tensors, state.head_optimizer = optimizer_to_tensors(trainer.head_optimizer, _HEAD_OPTIMIZER)
            tensors.update(optimizer_tensors)
        if isinstance(trainer, SFTTrainer) and trainer.lm_optimizer is not None:  # a generative run's tail LoRA
            tensors.update({_HEAD + name: value for name, value in trainer.user_state().items()})
            optimizer_tensors, state.head_optimizer = optimizer_to_tensors(trainer.lm_optimizer, _HEAD_OPTIMIZER)
            tensors.update(optimizer_tensors)
        self.run.write_state(state, tensors)
        self.step = progress.step
        log.debug("client checkpoint at step %d", progress.step)

    def hint(self, exc: SapError) -> SapError:
        """exc, its message ending with how to continue the run (when there is a checkpoint to continue from)."""
        if self.step is None:
            return exc
        return type(exc)(
            f"{exc}; the run can continue from its checkpoint at step {self.step}: sap-client resume {self.run.path}"
        )


_BOTTOM, _BOTTOM_OPTIMIZER = "bottom/", "bottom_optimizer/"
_HEAD, _HEAD_OPTIMIZER = "head/", "head_optimizer/"


def _fit(opened: OpenSplit, run: RunDir, checkpoint: _Checkpointer, train_data, held, progress=None) -> tuple:
    """Train to the end; (metrics with the run's total traffic, the kept adapter's id)."""
    trainer = opened.trainer
    return _fit_to_the_end(
        opened, checkpoint, lambda: trainer.fit(train_data, held, progress=progress, on_checkpoint=checkpoint)
    )


def _fit_to_the_end(opened: OpenSplit, checkpoint: _Checkpointer, fit: Callable[[], dict]) -> tuple:
    """Run fit(), close the session keeping its adapter; (metrics with the run's total traffic, the adapter's id).
    A server error is re-raised with the checkpoint's hint (how to resume)."""
    trainer, service = opened.trainer, opened.service
    try:
        metrics = fit()
        assert trainer.session_id is not None  # fit trained in it
        adapter_id = service.finish_session(trainer.session_id)
    except SapError as exc:
        raise checkpoint.hint(exc) from exc
    metrics.update(
        bytes_sent=checkpoint.bytes_sent + service.bytes_sent,
        bytes_received=checkpoint.bytes_received + service.bytes_received,
    )
    return metrics, adapter_id


def _new_spec(
    server: str,
    info,
    config: TrainConfig,
    noise: NoiseConfig,
    privatizer: Privatizer | None,
    wire_dtype: str,
    data: tuple[Path, Path | None, float, int | None],
    **task,
) -> RunSpec:
    """run.json of a run starting now: what was asked, the data's digests, eta and the rescaling norm as resolved."""
    data_path, eval_path, eval_fraction, max_examples = data
    return RunSpec(
        server=server,
        model=info.model_id,
        split=info.split,
        config=config,
        noise=noise,
        eta=privatizer.eta if privatizer else None,
        rescale_norm=privatizer.rescale_norm if privatizer else None,
        wire_dtype=wire_dtype,
        data=str(Path(data_path).resolve()),
        data_sha256=file_sha256(data_path),
        eval=str(Path(eval_path).resolve()) if eval_path else None,
        eval_sha256=file_sha256(eval_path) if eval_path else None,
        eval_fraction=None if eval_path else eval_fraction,
        max_examples=max_examples,
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        **task,
    )


def train(
    data_path: Path,
    *,
    server: str,
    out: Path,
    config: TrainConfig,
    noise: NoiseConfig,
    text_column: str,
    label_column: str,
    eval_path: Path | None,
    eval_fraction: float,
    max_examples: int | None,
    device: torch.device | str = "cpu",
    wire_dtype: str = "float32",
    credentials: ClientCredentials | None = None,
) -> dict:
    label_names, train_data, held = _training_data(
        data_path, text_column, label_column, eval_path, eval_fraction, max_examples, config.seed
    )
    run = RunDir(out).create()
    if run.file(CHECKPOINT).exists() and not run.file(METRICS).exists():
        raise InvalidInputError(
            f"{out} holds an unfinished run: continue it with `sap-client resume {out}`, or choose another --out"
        )
    train_data, label_dp = _training_labels(train_data, config, run)
    with open_split(
        server,
        config,
        run=run,  # its secret keys the noise and a --private-head's first weights
        wire_dtype=wire_dtype,
        fresh_noise=noise.fresh_noise,
        credentials=credentials,
        device=device,
    ) as opened:
        info, trainer = opened.info, opened.trainer
        log.info(
            "server %s: %s (%s), split %d/%d, %s; %d train / %d eval examples, %d classes",
            server,
            info.model_id,
            info.model_type,
            info.split,
            info.total_blocks,
            info.peft,
            len(train_data),
            len(held),
            len(label_names),
        )
        trainer.privatizer = fit_noise(noise, trainer, train_data, run)
        if config.learned_filter:
            _fit_filter(trainer, train_data, run)
        spec = _new_spec(
            server,
            info,
            config,
            noise,
            trainer.privatizer,
            wire_dtype,
            (data_path, eval_path, eval_fraction, max_examples),
            label_names=label_names,
            text_column=text_column,
            label_column=label_column,
        )
        for stale in (METRICS, CHECKPOINT):
            run.file(stale).unlink(missing_ok=True)
        run.write_spec(spec)  # before the first step: what `resume` needs
        trainer.open(len(label_names))
        checkpoint = _Checkpointer(run, opened)
        checkpoint(TrainProgress())  # the session id and secret, so even a run cut short at once can resume
        metrics, adapter_id = _fit(opened, run, checkpoint, train_data, held)
    return _complete(run, spec, metrics, trainer, info, adapter_id, opened.download_bytes, label_dp)


def train_generative(
    data_path: Path,
    *,
    server: str,
    out: Path,
    config: TrainConfig,
    noise: NoiseConfig,
    data_format: str,
    loss_on: str,
    eval_path: Path | None,
    eval_fraction: float,
    max_examples: int | None,
    device: torch.device | str = "cpu",
    wire_dtype: str = "float32",
    credentials: ClientCredentials | None = None,
) -> dict:
    """sap-client train DATA.jsonl: generative fine-tuning of the server's decoder (sap_client/sft.py); held-out
    perplexity before and after in metrics.json. Checkpointed like a classification run: `sap-client resume`
    continues one cut short."""
    if noise.cti:
        raise InvalidInputError("--cti needs labelled classes; generative fine-tuning does not support it yet")
    if config.learned_filter:
        raise InvalidInputError("--learned-filter trains with class labels; generative fine-tuning does not support it")
    if config.label_epsilon is not None:
        raise InvalidInputError("--label-epsilon randomizes class labels: a generative run has none")
    run = RunDir(out).create()
    if run.file(CHECKPOINT).exists() and not run.file(METRICS).exists():
        raise InvalidInputError(
            f"{out} holds an unfinished run: continue it with `sap-client resume {out}`, or choose another --out"
        )
    with open_generative(server, config, run=run, wire_dtype=wire_dtype, credentials=credentials, device=device) as (
        opened
    ):
        info, trainer = opened.info, opened.trainer
        assert isinstance(trainer, SFTTrainer)
        data, train_examples, held = _generative_data(
            trainer, config, data_path, data_format, loss_on, eval_path, eval_fraction, max_examples
        )
        log.info(
            "server %s: %s, split %d/%d, %s; generative (%s, loss on %s), %d train / %d eval examples%s",
            server,
            info.model_id,
            info.split,
            info.total_blocks,
            info.peft,
            data.format,
            loss_on,
            len(train_examples),
            len(held),
            f", {data.truncated} cut at {config.max_length} tokens" if data.truncated else "",
        )
        trainer.privatizer = _generative_noise(noise, trainer, train_examples, run)
        spec = _new_spec(
            server,
            info,
            config,
            noise,
            trainer.privatizer,
            wire_dtype,
            (data_path, eval_path, eval_fraction, max_examples),
            label_names=[],
            text_column="",
            label_column="",
            task="generative",
            data_format=data.format,
            loss_on=loss_on,
        )
        for stale in (METRICS, CHECKPOINT):
            run.file(stale).unlink(missing_ok=True)
        run.write_spec(spec)  # before the first step: what `resume` needs
        trainer.open_generative()
        checkpoint = _Checkpointer(run, opened)
        checkpoint(TrainProgress())
        metrics, adapter_id = _fit_generative(opened, checkpoint, train_examples, held)
    return _complete_generative(run, spec, metrics, opened, data, adapter_id)


def _generative_data(
    trainer,
    config: TrainConfig,
    data_path: Path,
    data_format: str,
    loss_on: str,
    eval_path: Path | None,
    eval_fraction: float,
    max_examples: int | None,
) -> tuple:
    """(the loaded SFTData, train examples, held-out examples): a seeded split of data_path unless eval_path."""
    from sap_client.sft_data import load_sft_jsonl

    def load(path: Path):
        tokenizer, length = trainer.tokenizer, config.max_length
        return load_sft_jsonl(path, tokenizer, format=data_format, loss_on=loss_on, max_length=length)

    data = load(data_path)
    examples = data.examples[:max_examples] if max_examples else data.examples
    if eval_path is not None:
        return data, examples, load(eval_path).examples
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    count = max(1, round(len(examples) * eval_fraction))
    if count >= len(examples):
        raise InvalidInputError(f"{data_path}: {len(examples)} examples leave none to train on")
    return data, [examples[i] for i in order[count:]], [examples[i] for i in order[:count]]


def _fit_generative(opened: OpenSplit, checkpoint: _Checkpointer, train_examples, held, progress=None) -> tuple:
    """_fit for a generative run: (metrics with the run's total traffic, the kept adapter's id)."""
    trainer = opened.trainer
    assert isinstance(trainer, SFTTrainer)
    return _fit_to_the_end(
        opened,
        checkpoint,
        lambda: trainer.fit_generative(train_examples, held, progress=progress, on_checkpoint=checkpoint),
    )


def _complete_generative(run: RunDir, spec: RunSpec, metrics: dict, opened: OpenSplit, data, adapter_id: str) -> dict:
    """_complete for a generative run: the tail's LoRA and the bottom (when they trained), metrics.json, the
    privacy statement, run.json; drop the checkpoint."""
    trainer, info, config = opened.trainer, opened.info, opened.trainer.config
    assert isinstance(trainer, SFTTrainer)
    metrics.update(
        bytes_per_train_token=(metrics["bytes_sent"] + metrics["bytes_received"]) / metrics["train_tokens"],
        bottom_download_bytes=opened.download_bytes,
        model=info.model_id,
        split=info.split,
        total_blocks=info.total_blocks,
        peft=info.peft,
        user_tail=config.user_tail,
        data_format=data.format,
        loss_on=spec.loss_on,
        truncated=data.truncated,
        dropped=data.dropped,
        wire_dtype=spec.wire_dtype,
        eta=spec.eta,
        noise_ratio=spec.noise.noise_ratio,
        noise_to_signal=trainer.privatizer.noise_to_signal if trainer.privatizer else 0.0,
        rescale_norm=spec.rescale_norm,
        adapter_id=adapter_id,
    )
    if config.user_tail:
        save_file({k: v.contiguous() for k, v in trainer.user_state().items()}, str(run.file(HEAD)))
    if config.train_bottom:
        state = {k: v.detach().cpu().contiguous() for k, v in trainer.bottom.state_dict().items()}
        save_file(state, str(run.file(BOTTOM)))
    metrics["privacy"] = privacy_statement(
        model=info.model_id,
        split=info.split,
        eta=spec.eta,
        eta_max=None,
        cti=None,
        rescale_norm=spec.rescale_norm,
        noise_observations="one per example" if spec.eta else "no noise",
        epochs=config.epochs,
        median_distance=median_token_distance(trainer.bottom),
        user_tail=config.user_tail,
        generative=True,
        start_adapter=config.start_adapter,
        bottom_learning_rate=config.bottom_learning_rate if config.train_bottom else None,
    )
    run.write_json(METRICS, metrics)
    run.file(PRIVACY).write_text(render_statement(metrics["privacy"]))
    spec.adapter_id, spec.finished = adapter_id, time.strftime("%Y-%m-%dT%H:%M:%S")
    run.write_spec(spec)
    run.file(CHECKPOINT).unlink(missing_ok=True)  # it holds the session secret, and the session is closed
    return metrics


def _generative_noise(noise: NoiseConfig, trainer, examples, run: RunDir) -> Privatizer | None:
    """fit_noise for generative fine-tuning: eta and the rescaling norm, on token-id examples (no CTI)."""
    if _noise_is_off(noise):
        return None
    sample = examples[:NORM_SAMPLE]
    eta, norm = _resolve_eta(noise, trainer, lambda: trainer.mean_hidden_norm_of(sample), len(sample))
    return make_privatizer(noise, eta, run, None, norm if noise.rescale_noised else None)


def resume(
    run_path: Path,
    *,
    server: str | None = None,
    device: torch.device | str = "cpu",
    credentials: ClientCredentials | None = None,
) -> dict:
    """Continue an unfinished `train` run (classification or generative) from RUN_DIR's latest checkpoint, with
    the run's own settings."""
    run = RunDir(run_path)
    spec = run.read_spec()
    if run.file(METRICS).exists() or spec.finished:
        raise InvalidInputError(f"{run_path} holds a completed run (its metrics.json is written): nothing to resume")
    if spec.data is None or spec.data_sha256 is None:
        raise InvalidInputError(f"{run_path}/{RUN} has no resume information (written by an older sap-client)")
    config = spec.config
    data_path = Path(spec.data)
    eval_path = Path(spec.eval) if spec.eval else None
    for path, digest in ((data_path, spec.data_sha256), (eval_path, spec.eval_sha256)):
        if path is not None and path.is_file() and file_sha256(path) != digest:
            raise InvalidInputError(
                f"{path} changed since the run started (its SHA-256 differs): resuming on other "
                f"data would not continue the same run"
            )
    saved = run.read_state()
    server = server or spec.server
    if spec.task == "generative":
        return _resume_generative(run, spec, saved, server, device=device, credentials=credentials)
    label_names, train_data, held = _training_data(
        data_path,
        spec.text_column,
        spec.label_column,
        eval_path,
        spec.eval_fraction or 0.1,
        spec.max_examples,
        config.seed,
    )
    if label_names != spec.label_names:
        raise InvalidInputError(f"{data_path} now has the labels {label_names}, the run {spec.label_names}")
    train_data, label_dp = _training_labels(train_data, config, run)  # keyed: the same labels as before
    with open_split(
        server, config, run=run, spec=spec, fresh_noise=spec.noise.fresh_noise, credentials=credentials, device=device
    ) as opened:
        trainer = opened.trainer
        state, tensors = saved if saved is not None else (None, {})
        if state is not None:
            _restore_bottom(trainer, tensors, state)
            if config.private_head:
                _restore_head(trainer, tensors, state.head_optimizer, len(label_names))
        checkpoint, progress = _continue_session(opened, run, state, lambda: trainer.open(len(label_names)))
        metrics, adapter_id = _fit(opened, run, checkpoint, train_data, held, progress)
    return _complete(run, spec, metrics, trainer, opened.info, adapter_id, opened.download_bytes, label_dp)


def _resume_generative(run: RunDir, spec: RunSpec, saved, server: str, *, device, credentials) -> dict:
    """resume for a generative run: the same data split, the tail's LoRA and its optimizer from the checkpoint."""
    config = spec.config
    with open_generative(
        server,
        config,
        run=run,
        spec=spec,
        finished=False,
        wire_dtype=spec.wire_dtype,
        credentials=credentials,
        device=device,
    ) as opened:
        trainer = opened.trainer
        assert isinstance(trainer, SFTTrainer)
        data, train_examples, held = _generative_data(
            trainer,
            config,
            Path(spec.data or ""),
            spec.data_format or "auto",
            spec.loss_on or "completion",
            Path(spec.eval) if spec.eval else None,
            spec.eval_fraction or 0.1,
            spec.max_examples,
        )
        state, tensors = saved if saved is not None else (None, {})
        if state is not None:
            _restore_bottom(trainer, tensors, state)
            if trainer.lm_optimizer is not None:
                kept = {name[len(_HEAD) :]: value for name, value in tensors.items() if name.startswith(_HEAD)}
                if not kept or state.head_optimizer is None:
                    raise InvalidInputError("the run's checkpoint holds no tail LoRA, although the run keeps a tail")
                trainer.load_user_state(kept)
                optimizer_from_tensors(trainer.lm_optimizer, tensors, state.head_optimizer, _HEAD_OPTIMIZER)
        checkpoint, progress = _continue_session(opened, run, state, trainer.open_generative)
        metrics, adapter_id = _fit_generative(opened, checkpoint, train_examples, held, progress)
    return _complete_generative(run, spec, metrics, opened, data, adapter_id)


def _restore_bottom(trainer: SplitTrainer, tensors: dict, state: RunState) -> None:
    """Put the checkpoint's bottom and its optimizer state back (a --train-bottom run)."""
    if not trainer.config.train_bottom:
        return
    assert trainer.bottom_optimizer is not None and state.bottom_optimizer is not None
    trainer.bottom.load_state_dict(
        {name[len(_BOTTOM) :]: value for name, value in tensors.items() if name.startswith(_BOTTOM)}
    )
    optimizer_from_tensors(trainer.bottom_optimizer, tensors, state.bottom_optimizer, _BOTTOM_OPTIMIZER)


def _continue_session(
    opened: OpenSplit, run: RunDir, state: RunState | None, open_new: Callable[[], object]
) -> tuple[_Checkpointer, TrainProgress]:
    """Bring the provider's session back to the checkpoint's step, or (cut short before the first step: the same
    seeds give the same run) open a new one with open_new; the checkpointer and the progress to continue from."""
    trainer, service = opened.trainer, opened.service
    if state is not None:
        service.use_session(state.session_id, state.session_secret)
        try:
            service.resume_session(state.session_id, state.step)
        except (StepOrderError, SessionNotFoundError) as exc:
            if state.step == 0:  # nothing to lose: the same seeds give the same run in a new session
                log.warning("the server cannot resume the run's session at step 0 (%s): a new session starts", exc)
                state = None
            elif isinstance(exc, StepOrderError):
                raise StepOrderError(
                    f"the server cannot bring the run's session back to step {state.step}, "
                    f"where the run's checkpoint is: {exc}"
                ) from exc
            else:
                raise SessionNotFoundError(
                    f"the server does not know the run's session (was it restarted "
                    f"without its --state-dir, or is this another server?): {exc}"
                ) from exc
    if state is None:
        open_new()
        checkpoint, progress = _Checkpointer(run, opened), TrainProgress()
        checkpoint(progress)
        return checkpoint, progress
    progress = state.progress
    trainer.session_id, trainer.steps = state.session_id, progress.step
    progress.resumed_at.append(progress.step)
    checkpoint = _Checkpointer(run, opened, bytes_sent=state.bytes_sent, bytes_received=state.bytes_received)
    checkpoint.step = progress.step
    log.info(
        "resuming %s at step %d (epoch %d, batch %d)", run.path, progress.step, progress.epoch, progress.position + 1
    )
    return checkpoint, progress


def _restore_head(trainer: SplitTrainer, tensors: dict, layout: dict | None, num_labels: int) -> None:
    """Put the checkpoint's head and its optimizer state back (a --private-head run)."""
    state = {name[len(_HEAD) :]: value for name, value in tensors.items() if name.startswith(_HEAD)}
    if not state or layout is None:
        raise InvalidInputError("the run's checkpoint holds no head, although the run keeps its head (--private-head)")
    head = trainer.new_head(num_labels)  # its structure (and the tail's LoRA); the weights come from the checkpoint
    head.load_trainable_state(state)
    trainer.attach_head(head)
    assert trainer.head_optimizer is not None
    optimizer_from_tensors(trainer.head_optimizer, tensors, layout, _HEAD_OPTIMIZER)


def _complete(
    run: RunDir,
    spec: RunSpec,
    metrics: dict,
    trainer: SplitTrainer,
    info,
    adapter_id: str,
    download_bytes: int,
    label_dp: dict | None = None,
) -> dict:
    """Write the finished run: the bottom (when it trained), metrics.json, run.json; drop the checkpoint."""
    config, noise = trainer.config, spec.noise
    if config.train_bottom:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in trainer.bottom.state_dict().items()}, str(run.file(BOTTOM))
        )
    if trainer.head is not None:
        save_file({k: v.contiguous() for k, v in trainer.head.trainable_state().items()}, str(run.file(HEAD)))
    privatizer = trainer.privatizer
    eta = privatizer.eta if privatizer else None
    metrics.update(
        split=info.split,
        total_blocks=info.total_blocks,
        peft=info.peft,
        model=info.model_id,
        label_names=spec.label_names,
        train_bottom=config.train_bottom,
        bottom_learning_rate=config.bottom_learning_rate if config.train_bottom else None,
        learned_filter=trainer.filter_training if config.learned_filter else None,
        bottom_download_bytes=download_bytes,
        wire_dtype=spec.wire_dtype,
        eta=eta,
        noise_ratio=noise.noise_ratio,
        cti=noise.cti,
        cti_mode=noise.cti_mode if noise.cti else None,
        noise_to_signal=privatizer.noise_to_signal if privatizer else 0.0,
        rescale_norm=privatizer.rescale_norm if privatizer else None,
        noise_observations=(
            "fresh noise every epoch"
            if noise.fresh_noise
            else "one per example"
            if trainer.reuse_sent
            else "one per step (trainable bottom)"
        )
        if eta
        else "no noise",
    )
    metrics["privacy"] = privacy_statement(
        model=info.model_id,
        split=info.split,
        eta=eta,
        eta_max=_largest_eta(privatizer),
        cti=noise.cti_mode if noise.cti else None,
        rescale_norm=metrics["rescale_norm"],
        noise_observations=metrics["noise_observations"],
        epochs=config.epochs,
        median_distance=median_token_distance(trainer.bottom),
        private_head=config.private_head,
        label_dp=label_dp,
        user_tail=config.user_tail,
        start_adapter=config.start_adapter,
        bottom_learning_rate=config.bottom_learning_rate if config.train_bottom else None,
        learned_filter=metrics["learned_filter"],
    )
    metrics["label_dp"] = label_dp
    run.write_json(METRICS, metrics)
    run.file(PRIVACY).write_text(render_statement(metrics["privacy"]))
    spec.adapter_id, spec.finished = adapter_id, time.strftime("%Y-%m-%dT%H:%M:%S")
    run.write_spec(spec)
    run.file(CHECKPOINT).unlink(missing_ok=True)  # it holds the session secret, and the session is closed
    return metrics


def _largest_eta(privatizer: Privatizer | None) -> float | None:
    """The largest finite per-token eta the run's CTI table gives (the weakest noise of a noised token)."""
    if privatizer is None or privatizer.eta_table is None:
        return None
    finite = privatizer.eta_table[torch.isfinite(privatizer.eta_table)]
    return float(finite.max()) if finite.numel() else None


def record_audit(run: RunDir, report: dict) -> None:
    """Put an audit of the run's own settings into its metrics.json["privacy"] and privacy.md."""
    if not run.file(METRICS).is_file():
        return
    metrics = json.loads(run.file(METRICS).read_text())
    if "privacy" not in metrics:
        return
    metrics["privacy"]["audit"] = audit_summary(report)
    run.write_json(METRICS, metrics)
    run.file(PRIVACY).write_text(render_statement(metrics["privacy"]))


def _probabilities(
    run: RunDir,
    spec: RunSpec,
    texts: list[str],
    server: str | None,
    device: torch.device | str = "cpu",
    wire_dtype: str | None = None,
    credentials: ClientCredentials | None = None,
) -> torch.Tensor:
    """Class probabilities (N, C) of texts through the run's split, noise and kept adapter."""
    empty = [i + 2 for i, text in enumerate(texts) if not text]
    if empty:
        raise InvalidInputError(f"line {empty[0]} has an empty text ({len(empty)} such lines)")
    if not spec.adapter_id:
        raise InvalidInputError(
            f"{run.path} holds a run that has not finished training (no adapter yet): "
            f"continue it with `sap-client resume {run.path}`"
        )
    with open_split(
        server or spec.server,
        spec.config,
        run=run,
        spec=spec,
        wire_dtype=wire_dtype,
        trained_bottom=True,
        credentials=credentials,
        device=device,
    ) as opened:
        trainer = opened.trainer
        trainer.session_id, num_labels = opened.service.attach_adapter(spec.adapter_id)
        if trainer.head is not None:  # --private-head: the provider's adapter has no head, this side's has the labels
            num_labels = trainer.head.num_labels
        if num_labels != len(spec.label_names):
            raise ModelLoadError(f"adapter has {num_labels} labels, the run has {len(spec.label_names)}")
        probabilities = trainer.predict(texts)
        opened.service.close_session(trainer.session_id)
    return probabilities


def predict(
    data_path: Path,
    *,
    run_path: Path,
    server: str | None,
    out: Path,
    text_column: str | None,
    device: torch.device | str = "cpu",
    wire_dtype: str | None = None,
    credentials: ClientCredentials | None = None,
) -> int:
    """Write one row per input row: row number, predicted label, class probabilities. Returns rows."""
    run = RunDir(run_path)
    spec = run.read_classification_spec("predict")
    texts = load_texts(data_path, text_column or spec.text_column)
    probabilities = _probabilities(run, spec, texts, server, device, wire_dtype, credentials)
    names = spec.label_names
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "label", *(f"p_{name}" for name in names)])
        for row, (best, probs) in enumerate(zip(probabilities.argmax(-1).tolist(), probabilities.tolist())):
            writer.writerow([row, names[best], *(f"{p:.6f}" for p in probs)])
    return len(texts)


def evaluate(
    data_path: Path,
    *,
    run_path: Path,
    server: str | None,
    text_column: str | None,
    label_column: str | None,
    device: torch.device | str = "cpu",
    wire_dtype: str | None = None,
    credentials: ClientCredentials | None = None,
) -> dict:
    """Accuracy and macro-F1 of the run's adapter on labelled data, through the same split and noise."""
    run = RunDir(run_path)
    spec = run.read_classification_spec("evaluate")
    data = load_labelled_csv(
        data_path, text_column or spec.text_column, label_column or spec.label_column, spec.label_names
    )
    probabilities = _probabilities(run, spec, data.texts, server, device, wire_dtype, credentials)
    predictions = probabilities.argmax(-1).tolist()
    return {
        "accuracy": sum(int(p == y) for p, y in zip(predictions, data.labels)) / len(data),
        "macro_f1": macro_f1(predictions, data.labels, len(spec.label_names)),
        "examples": len(data),
        "data": str(data_path),
    }


def macro_f1(predictions: list[int], labels: list[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1 (a class never predicted nor present counts as F1 = 0)."""
    scores = []
    for c in range(num_classes):
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / num_classes


def audit(
    data_path: Path,
    *,
    server: str,
    out: Path,
    noise: NoiseConfig,
    attack,
    text_column: str,
    label_column: str,
    attribute_column: str | None,
    max_examples: int,
    run_path: Path | None,
    recorded: Path | None,
    batch_size: int,
    max_length: int,
    device: torch.device | str = "cpu",
    credentials: ClientCredentials | None = None,
    public_path: Path | None = None,
    public_examples: int = 2000,
) -> dict:
    """Play the curious provider on what this client would send (or on a --record recording).

    The provider's public text (for the probe and the learned inverter): the texts of public_path, or else the rows
    of DATA after the attacked ones; either way no attacked text is among them."""
    from sap_client.audit.recorded import recorded_audit
    from sap_client.audit.runner import simulated_audit, write_report
    from sap_client.data import read_rows
    from sap_common.recording import read_records

    run = RunDir(run_path) if run_path else None
    if run is not None and run.read_spec().task == "generative":
        return _audit_generative(
            run,
            data_path,
            server=server,
            out=out,
            attack=attack,
            max_examples=max_examples,
            recorded=recorded,
            public_path=public_path,
            public_examples=public_examples,
            device=device,
            credentials=credentials,
        )
    spec = run.read_classification_spec("audit") if run else None
    if spec:
        text_column, label_column, max_length = spec.text_column, spec.label_column, spec.config.max_length
    rows = read_rows(data_path, [text_column] + ([attribute_column] if attribute_column else []))
    labelled = label_column in rows[0]
    everything = (
        load_labelled_csv(data_path, text_column, label_column, spec.label_names if spec else None)
        if labelled
        else TextDataset(load_texts(data_path, text_column), [], [])
    )
    data = (
        everything.subset(list(range(min(max_examples, len(everything)))))
        if labelled
        else TextDataset(everything.texts[:max_examples], [], [])
    )
    attacked = set(data.texts)
    candidates = load_texts(public_path, text_column) if public_path else everything.texts[len(data) :]
    public = [text for text in candidates if text and text not in attacked][:public_examples]
    attributes = None
    if attribute_column:
        values = [row[attribute_column].strip() for row in rows][: len(data)]
        names = sorted(set(values))
        attributes = [names.index(v) for v in values]
    report_dir = RunDir(out).create()
    # The very trainer (bottom, privatizer, send function) a training run with these settings uses; the connection
    # is only for the bottom, so it closes here.
    with open_split(
        server,
        TrainConfig(batch_size=batch_size, max_length=max_length),
        run=run,
        spec=spec,
        credentials=credentials,
        device=device,
    ) as opened:
        info, trainer = opened.info, opened.trainer
    if spec:
        noise = spec.noise
    else:
        trainer.privatizer = fit_noise(noise, trainer, data, report_dir)
    eta = trainer.privatizer.eta if trainer.privatizer else None
    copies = spec.config.epochs if spec and noise.fresh_noise and eta else 1  # noisy copies of each training text
    if copies > 1:  # simulated: that many copies averaged; recorded: each text's copies linked and averaged
        attack = dataclasses.replace(attack, copies=copies)
    if recorded:
        limit = spec.max_examples if spec else None  # a run trained on the first rows only: pair those
        label_data = everything.subset(list(range(min(limit, len(everything))))) if limit else everything
        report = recorded_audit(
            trainer, data, read_records(recorded), attack, public, label_data=label_data if labelled else None
        )
        report["source"] = f"recorded traffic in {recorded}"
    else:
        report = simulated_audit(trainer, data, attributes, attack, public=public)
        report["source"] = "simulated: what this client would send"
    report.update(
        model=info.model_id,
        split=info.split,
        eta=eta,
        noise_ratio=noise.noise_ratio,
        cti=noise.cti,
        cti_mode=noise.cti_mode if noise.cti else None,
        rescale_norm=trainer.privatizer.rescale_norm if trainer.privatizer else None,
        learned_filter=trainer.filter is not None,  # sent through it, and the attacks were given its weights
        attribute_column=attribute_column,
        data=str(data_path),
        public=str(public_path) if public_path else f"rows {len(data) + 1}.. of {data_path}",
    )
    write_report(report, out)
    if run is not None:
        record_audit(run, report)
    return report


def _audit_generative(
    run: RunDir,
    data_path: Path,
    *,
    server: str,
    out: Path,
    attack,
    max_examples: int,
    recorded: Path | None,
    public_path: Path | None,
    public_examples: int,
    device: torch.device | str,
    credentials: ClientCredentials | None,
) -> dict:
    """sap-client audit DATA.jsonl --run RUN_DIR (a generative run): the inversion attacks on the hidden states the
    provider received (or would receive) and, from a recording, the target tokens read from its gradients
    (sap_client/audit/generative.py)."""
    from sap_client.audit.generative import generative_audit
    from sap_client.audit.runner import write_report
    from sap_client.sft_data import load_sft_jsonl
    from sap_common.recording import read_records

    spec = run.read_spec()
    with open_generative(
        server, spec.config, run=run, spec=spec, wire_dtype=spec.wire_dtype, credentials=credentials, device=device
    ) as opened:
        info, trainer = opened.info, opened.trainer
    assert isinstance(trainer, SFTTrainer)

    def examples_of(path: Path):
        return load_sft_jsonl(
            path,
            trainer.tokenizer,
            format=spec.data_format or "auto",
            loss_on=spec.loss_on or "completion",
            max_length=spec.config.max_length,
        ).examples

    everything = examples_of(data_path)
    paired = everything[: spec.max_examples] if spec.max_examples else everything  # the run's own examples
    public = (examples_of(public_path) if public_path else everything[len(paired) :])[:public_examples]
    records = read_records(recorded) if recorded else None
    report = generative_audit(trainer, paired, max_examples, records, attack, public)
    report["source"] = f"recorded traffic in {recorded}" if recorded else "simulated: what this client would send"
    report.update(
        model=info.model_id,
        split=info.split,
        task="generative",
        user_tail=spec.config.user_tail,
        eta=spec.eta,
        noise_ratio=spec.noise.noise_ratio,
        cti=False,
        rescale_norm=spec.rescale_norm,
        data=str(data_path),
        public=str(public_path) if public_path else f"examples {len(paired) + 1}.. of {data_path}",
    )
    write_report(report, out)
    record_audit(run, report)
    return report


def generate(
    run_path: Path,
    prompts: list[dict],
    *,
    server: str | None,
    sampling,
    device: torch.device | str = "cpu",
    wire_dtype: str | None = None,
    credentials: ClientCredentials | None = None,
    on_text: Callable[[int, str], None] | None = None,
) -> dict:
    """sap-client generate: each prompt's completion through the run's split, noise, kept adapter and tail
    (sap_client/generation.py). on_text(prompt index, new text) is called as the text grows. Returns
    {"completions": [{prompt, completion, tokens, stopped}], and the traffic and timing figures}."""
    from sap_client.generation import generate_tokens, stop_ids
    from sap_client.sft_data import generation_prompt

    run = RunDir(run_path)
    spec = run.read_spec()
    if spec.task != "generative":
        raise InvalidInputError(
            f"{run.path} is a {spec.task} run: `sap-client generate` needs a run of `sap-client train DATA.jsonl`"
        )
    if not spec.adapter_id:
        raise InvalidInputError(f"{run.path} holds a run that has not finished training (no adapter yet)")
    completions, generated = [], 0
    with open_generative(
        server or spec.server,
        spec.config,
        run=run,
        spec=spec,
        wire_dtype=wire_dtype or spec.wire_dtype,
        credentials=credentials,
        device=device,
    ) as opened:
        trainer = opened.trainer
        assert isinstance(trainer, SFTTrainer)
        tokenizer, stops = trainer.tokenizer, stop_ids(trainer.tokenizer)
        session_id, _ = opened.service.attach_adapter(spec.adapter_id)
        started = time.perf_counter()
        try:
            for index, prompt in enumerate(prompts):
                ids = generation_prompt(prompt, spec.data_format or "text", tokenizer)
                tokens: list[int] = []
                shown = ""
                for token in generate_tokens(trainer, session_id, ids, sampling):
                    tokens.append(token)
                    text = _decoded(tokenizer, tokens, stops)
                    if on_text is not None and len(text) > len(shown) and text.startswith(shown):
                        on_text(index, text[len(shown) :])
                        shown = text
                text = _decoded(tokenizer, tokens, stops)
                if on_text is not None and text != shown:
                    on_text(index, text[len(shown) :] if text.startswith(shown) else "\n" + text)
                generated += len(tokens)
                completions.append(
                    {
                        **prompt,
                        "completion": text,
                        "tokens": len(tokens),
                        "stopped": bool(tokens) and tokens[-1] in stops,
                    }
                )
        finally:
            opened.service.close_session(session_id)
        seconds = time.perf_counter() - started
        traffic = opened.service.bytes_sent + opened.service.bytes_received
    return {
        "completions": completions,
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_second": generated / seconds if seconds > 0 else 0.0,
        "wire_bytes_per_token": traffic / generated if generated else 0.0,
    }


def _decoded(tokenizer, tokens: list[int], stops: set[int]) -> str:
    return str(tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True))
