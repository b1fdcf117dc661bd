"""Provider: the loaded model cut at k, the bottom bundle it hands out, and its sessions (no gRPC here)."""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sap_common import PROTOCOL_VERSION
from sap_common.devices import plan_blocks
from sap_common.errors import InvalidInputError, ModelLoadError
from sap_common.models.bundle import bundle_sha256, export_bottom, export_tail
from sap_common.models.families import DECODER, family_of
from sap_common.models.registry import LoadedModel, load_model
from sap_common.models.split import TopModel, split_base
from sap_common.peft import PeftConfig
from sap_common.recording import Recorder
from sap_common.service import DEFAULT_LEARNING_RATE, ServerInfo, SessionSpec
from sap_server.adapters import AdapterRecord, AdapterStore
from sap_server.checkpoints import ClosedSession, SessionStore
from sap_server.registry import SessionRegistry
from sap_server.session import DEFAULT_CHECKPOINT_EVERY, DEFAULT_MAX_BATCH_TOKENS, Session

log = logging.getLogger(__name__)


@dataclass
class Provider:
    info: ServerInfo
    sessions: SessionRegistry
    bundle_dir: Path
    adapters: AdapterStore = field(default_factory=AdapterStore)
    _owns_bundle_dir: bool = False
    _tail_dirs: dict[int, Path] = field(default_factory=dict)  # tail bundles written so far, by block count
    _tail_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        split: int,
        peft: PeftConfig,
        *,
        max_sessions: int = 16,
        bundle_dir: Path | None = None,
        state_dir: Path | None = None,
        record_dir: Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        idle_timeout: float | None = None,
        max_memory: dict[torch.device, int] | None = None,
    ) -> Provider:
        """Cut the loaded model at `split`, write the bottom bundle users download, then place the top
        on `device` in `dtype` (default: the loaded dtype). The bundle is written before the move, so
        users get the bottom in the dtype it was loaded in, whatever the top runs in. With max_memory
        (sap-server --device-map balanced) the top's blocks are spread over its devices instead
        (block_plan), each session's head on the last one.

        state_dir keeps adapters (state_dir/adapters) and session checkpoints (state_dir/sessions, every
        checkpoint_every steps); idle_timeout (seconds; None or 0: never) starts the idle reaper, which
        checkpoints and unloads idle sessions (closes them without a state_dir)."""
        base = loaded.base
        total = base.config.num_hidden_layers
        bottom, top = split_base(base, split)
        owns = bundle_dir is None
        bundle_dir = Path(tempfile.mkdtemp(prefix="sap-bottom-")) if bundle_dir is None else bundle_dir
        bundle_dir.mkdir(parents=True, exist_ok=True)
        if any(bundle_dir.iterdir()):
            raise ModelLoadError(f"bundle folder {bundle_dir} must be empty")
        meta = export_bottom(bottom, loaded.tokenizer, loaded.model_id, total, bundle_dir)
        info = ServerInfo(
            protocol_version=PROTOCOL_VERSION,
            model_id=loaded.model_id,
            family=meta.family,
            model_type=meta.model_type,
            split=split,
            total_blocks=total,
            hidden_size=meta.hidden_size,
            peft=peft.method,
            bottom_sha256=bundle_sha256(bundle_dir),
        )
        plan = block_plan(top, dtype, max_memory) if max_memory else None
        if plan is not None:
            log.info(
                "top blocks %d..%d over %s",
                split,
                total - 1,
                ", ".join(f"{d}: {plan.count(d)}" for d in dict.fromkeys(plan)),
            )
        place_top(base, top, torch.device(device) if plan is None else plan[0], dtype, plan)
        recorder = Recorder(record_dir) if record_dir is not None else None
        if recorder is not None:
            log.warning(
                "recording every received hidden state to %s (--record: the curious provider's view)", record_dir
            )
        store = (
            SessionStore(state_dir, {"model_id": info.model_id, "split": split, "peft": asdict(peft)})
            if state_dir is not None
            else None
        )
        sessions = SessionRegistry(
            top,
            base,
            peft,
            max_sessions=max_sessions,
            recorder=recorder,
            max_batch_tokens=max_batch_tokens,
            store=store,
            checkpoint_every=checkpoint_every,
        )
        if idle_timeout:
            sessions.start_reaper(idle_timeout)
        return cls(
            info=info, sessions=sessions, bundle_dir=bundle_dir, adapters=AdapterStore(state_dir), _owns_bundle_dir=owns
        )

    @classmethod
    def load(
        cls,
        model: str,
        split: int,
        peft: PeftConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_sessions: int = 16,
        state_dir: Path | None = None,
        record_dir: Path | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        idle_timeout: float | None = None,
        max_memory: dict[torch.device, int] | None = None,
    ) -> Provider:
        """Load in float32 (the users' bottom stays float32), then put the top on device in dtype (spread
        over max_memory's devices when given)."""
        loaded = load_model(model, dtype=torch.float32)
        log.info(
            "loaded %s: %s, %d blocks, hidden %d; top on %s in %s",
            loaded.model_id,
            loaded.base.config.model_type,
            loaded.base.config.num_hidden_layers,
            loaded.base.config.hidden_size,
            device,
            str(dtype).removeprefix("torch."),
        )
        return cls.from_loaded(
            loaded,
            split,
            peft,
            max_sessions=max_sessions,
            state_dir=state_dir,
            record_dir=record_dir,
            device=device,
            dtype=dtype,
            max_batch_tokens=max_batch_tokens,
            checkpoint_every=checkpoint_every,
            idle_timeout=idle_timeout,
            max_memory=max_memory,
        )

    def tail_bundle(self, blocks: int, lm_head: bool = False) -> Path:
        """The folder of the tail bundle of the model's last `blocks` blocks (written on first request): what a
        --user-tail session's user runs itself. The server keeps at least one block. lm_head: the user makes
        next-token logits from it too (generative fine-tuning of a decoder): blocks may be 0 (the final norm only);
        the output layer must be tied to the input embeddings, which the user's bottom has."""
        served = self.info.total_blocks - self.info.split
        least = 0 if lm_head else 1
        if not least <= blocks < served:
            raise InvalidInputError(
                f"tail_blocks must be in {least}..{served - 1}: this server runs blocks {self.info.split}.."
                f"{self.info.total_blocks - 1} and keeps at least one; got {blocks}"
            )
        if lm_head:
            config = self.sessions.base.config
            if family_of(config) is not DECODER:
                raise InvalidInputError(f"next-token logits need a decoder; this server's model is {config.model_type}")
            if not getattr(config, "tie_word_embeddings", False):
                raise InvalidInputError(
                    f"{self.info.model_id} has an output layer of its own (tie_word_embeddings is false): generative "
                    "fine-tuning supports tied models only (SmolLM2 and other small decoders are)"
                )
        with self._tail_lock:
            folder = self._tail_dirs.get(blocks)
            if folder is None:
                template, base = self.sessions.template, self.sessions.base
                norm: Any = base.norm if family_of(base.config) is DECODER else None  # a transformers submodule
                folder = Path(tempfile.mkdtemp(prefix=f"sap-tail{blocks}-"))
                export_tail(
                    base.config,
                    list(template.blocks)[len(template.blocks) - blocks :],
                    norm,
                    self.info.model_id,
                    folder,
                )
                self._tail_dirs[blocks] = folder
            return folder

    def keep_adapter(self, trainer: Session) -> str:
        """Store the session's trained weights under a new random id (disk too, with a state dir); the caller
        holds trainer.lock."""
        record = AdapterRecord(
            adapter_id=secrets.token_hex(16),
            model_id=self.info.model_id,
            split=self.info.split,
            peft=asdict(self.sessions.peft),
            num_labels=trainer.num_labels,
            seed=trainer.seed,
            steps_applied=trainer.steps_applied,
            state=trainer.trainable_state(),
            output=trainer.output,
            user_tail=trainer.user_tail,
        )
        self.adapters.put(record)
        log.info("adapter %s… kept (%d steps)", record.adapter_id[:8], record.steps_applied)
        return record.adapter_id

    def offer_start_adapter(self, name: str, path: Path) -> None:
        """Offer the starting adapter in `path` (python -m sap_server.robust) under `name`: sessions that ask for it
        start their top's PEFT weights from it. It must have been made for this model, split and PEFT."""
        from sap_server.robust import load_start_adapter_file

        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InvalidInputError(f"a starting adapter's name is letters, digits, '-', '_' and '.'; got {name!r}")
        adapter = load_start_adapter_file(path)
        adapter.check_fits(self.info.model_id, self.info.split, self.sessions.peft)
        self.sessions.start_adapters[name] = adapter.state
        self.info = replace(self.info, start_adapters=tuple(sorted(self.sessions.start_adapters)))
        meta = adapter.meta
        log.info(
            "starting adapter %s from %s: noise ratio %g, held-out relative error %.3f -> %.3f",
            name,
            path,
            meta["settings"]["noise_ratio"],
            meta["relative_error_before"],
            meta["relative_error_after"],
        )

    def close_session(self, session_id: str, secret: str | None, *, keep: bool, check: bool = True) -> ClosedSession:
        """Close a session (authenticated when check), keeping its adapter first when keep."""
        with self.sessions.closing(session_id, secret, check=check) as closing:
            if keep:
                closing.adapter_id = self.keep_adapter(closing.held)
        return closing.closed

    def attach_adapter(
        self, adapter_id: str, *, learning_rate: float = DEFAULT_LEARNING_RATE, weight_decay: float = 0.0
    ) -> tuple[str, Session, str]:
        """A new session starting from a stored adapter (to predict, or to train on)."""
        record = self.adapters.get(adapter_id)
        expected = (self.info.model_id, self.info.split, asdict(self.sessions.peft))
        if (record.model_id, record.split, record.peft) != expected:
            raise ModelLoadError(
                f"adapter {adapter_id[:8]}… was trained for {record.model_id} split {record.split} "
                f"{record.peft['method']}; this server serves {self.info.model_id} split "
                f"{self.info.split} {self.sessions.peft.method}"
            )
        try:
            spec = SessionSpec(
                num_labels=record.num_labels,
                learning_rate=learning_rate,
                seed=record.seed,
                weight_decay=weight_decay,
                output=record.output,
                user_tail=record.user_tail,
            )
        except ValueError as exc:
            raise InvalidInputError(f"OpenSessionRequest: {exc}") from exc
        return self.sessions.open(spec, state=record.state, steps_applied=record.steps_applied)

    def close(self) -> None:
        self.sessions.stop_reaper()
        if self._owns_bundle_dir:
            shutil.rmtree(self.bundle_dir, ignore_errors=True)
        for folder in self._tail_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)


def place_top(
    base: torch.nn.Module,
    top: TopModel,
    device: torch.device,
    dtype: torch.dtype | None,
    plan: list[torch.device] | None = None,
) -> None:
    """Move the top's blocks and the base modules its heads reuse (final norm, pooler) to device/dtype;
    with a plan (one device per block, sap-server --device-map), block i to plan[i], the final norm and
    pooler (and so each session's head) to the last block's device.

    The rotary embedding moves to the (first) device only: its inv_freq stays float32, as transformers
    keeps it; run_blocks moves the positions it computes to each block's device.
    """
    plan = plan or [device] * len(top.blocks)
    if len(plan) != len(top.blocks):
        raise ValueError(f"device plan has {len(plan)} entries for {len(top.blocks)} blocks")
    for block, block_device in zip(top.blocks, plan):
        block.to(device=block_device, dtype=dtype)
    for name in ("norm", "pooler"):  # LastTokenHead / EncoderHead build on these
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(device=plan[-1], dtype=dtype)
    if top.rotary is not None:
        top.rotary.to(device=plan[0])


def block_plan(top: TopModel, dtype: torch.dtype | None, max_memory: dict[torch.device, int]) -> list[torch.device]:
    """One device per top block for --device-map balanced: sap_common.devices.plan_blocks over the blocks'
    sizes in the serving dtype (parameters and buffers)."""

    def size(block: torch.nn.Module) -> int:
        tensors = [*block.parameters(), *block.buffers()]
        return sum(
            t.numel()
            * (torch.empty((), dtype=dtype).element_size() if dtype and t.is_floating_point() else t.element_size())
            for t in tensors
        )

    return plan_blocks([size(block) for block in top.blocks], max_memory)
