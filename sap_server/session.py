"""Session: one session's trainable top (PEFT parameters + head + optimizer), step by step."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sap_common.checkpoint import optimizer_from_tensors, optimizer_to_tensors, seeded_draws
from sap_common.devices import DTYPES
from sap_common.errors import InvalidInputError, ModelLoadError, ResourceLimitError, StepOrderError
from sap_common.models import set_training
from sap_common.models.families import KVCache
from sap_common.models.split import TopModel
from sap_common.packing import unpack_hidden
from sap_common.recording import Recorder
from sap_common.service import BackwardResult, SessionSpec

DEFAULT_MAX_BATCH_TOKENS = 65536  # most batch x length one Forward/Evaluate may carry (sap-server --max-batch-tokens)
DEFAULT_CHECKPOINT_EVERY = 20  # sap-server --checkpoint-every (steps)
DEFAULT_IDLE_TIMEOUT = 1800.0  # sap-server --idle-timeout (seconds)


@dataclass
class SessionSnapshot:
    """Everything that restores a session at steps_applied (a pending forward is not part of it)."""

    spec: SessionSpec
    steps_applied: int
    secret_digest: bytes = field(repr=False)
    weights: dict[str, torch.Tensor] = field(repr=False)  # trainable parameters (PEFT + head), by name
    optimizer: tuple[dict[str, torch.Tensor], dict] = field(repr=False)  # sap_common.checkpoint format
    last_reply: BackwardResult | None = field(repr=False)  # the reply of steps_applied, for a retried Backward
    announced: bool = False  # the client was told (BackwardReply.checkpointed) or it is the session's opening


OPTIMIZER_PREFIX = "optimizer/"


@dataclass
class _Pending:
    step: int
    hidden: torch.Tensor  # leaf; its .grad is dL/dhidden when the bottom trains
    output: torch.Tensor  # what Forward returned: logits (B, C), pooled (B, H) or hidden (N_real, H), with its graph
    mask: torch.Tensor  # (B, T) bool: the real tokens


class Session:
    """Runs Forward/Backward for one session and applies each optimizer step exactly once."""

    def __init__(
        self,
        top: TopModel,
        *,
        learning_rate: float,
        weight_decay: float,
        train_bottom: bool,
        num_labels: int = 0,
        output: str = "logits",
        user_tail: int = 0,
        seed: int = 0,
        recorder: Recorder | None = None,
        session_id: str = "",
        secret_digest: bytes = b"",
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ):
        self.top = top
        self.recorder = recorder  # sap-server --record: keep what arrives, as a curious provider would
        self.session_id = session_id
        # SHA-256 of the secret every call of the session over the wire must carry (checked by
        # SessionRegistry); kept here, with the rest of the session's state, so it is saved and restored with it.
        self.secret_digest = secret_digest
        self.max_batch_tokens = max_batch_tokens
        self.num_labels = num_labels
        self.output = output  # SessionSpec.output: what forward and evaluate return
        self.user_tail = user_tail  # SessionSpec.user_tail: blocks at the model's end the user runs, not this top
        self.seed = seed
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.train_bottom = train_bottom
        self.parameters = [p for p in top.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, weight_decay=weight_decay)
        self.steps_applied = 0
        self.saved_step: int | None = None  # the step of the last checkpoint written or loaded (None: none)
        self.lock = threading.Lock()
        self.last_used = time.monotonic()  # for the idle reaper (SessionRegistry.unload_idle)
        self.unloaded = False  # set (under lock) when the session left memory: callers look it up again
        self._pending: _Pending | None = None
        self._last_reply: BackwardResult | None = None
        self._param = next(top.parameters())  # on the first block's device: where the inputs go
        self._devices = sorted({p.device for p in top.parameters()}, key=str)  # all of them (--device-map)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable weights (PEFT parameters and head), named as in the TopModel."""
        return {name: p.detach().cpu().clone() for name, p in self.top.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor], steps_applied: int) -> None:
        """Restore weights saved by trainable_state (the optimizer state starts afresh)."""
        params = {name: p for name, p in self.top.named_parameters() if p.requires_grad}
        if params.keys() != state.keys():
            missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
            raise ModelLoadError(
                f"stored adapter does not fit this server's top: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        with torch.no_grad():
            for name, param in params.items():
                if state[name].shape != param.shape:
                    raise ModelLoadError(
                        f"stored adapter tensor {name} has shape {tuple(state[name].shape)}, "
                        f"expected {tuple(param.shape)}"
                    )
                param.copy_(state[name])
        self.steps_applied = steps_applied

    @property
    def spec(self) -> SessionSpec:
        return SessionSpec(
            num_labels=self.num_labels,
            learning_rate=self.learning_rate,
            seed=self.seed,
            train_bottom=self.train_bottom,
            weight_decay=self.weight_decay,
            output=self.output,
            user_tail=self.user_tail,
        )

    def snapshot(self, *, announced: bool = False) -> SessionSnapshot:
        """The session's state now (call with self.lock held): the weights as CPU copies, the optimizer state as
        the live tensors, so write the snapshot out before the next step."""
        return SessionSnapshot(
            spec=self.spec,
            steps_applied=self.steps_applied,
            secret_digest=self.secret_digest,
            weights=self.trainable_state(),
            optimizer=optimizer_to_tensors(self.optimizer, OPTIMIZER_PREFIX),
            last_reply=self._last_reply,
            announced=announced,
        )

    def restore(self, snapshot: SessionSnapshot) -> None:
        """Put the session back into the snapshot's state: weights, AdamW state, step, the last reply (so a
        retried Backward of that step is replayed); a pending forward is dropped (call with self.lock held)."""
        self.load_trainable_state(snapshot.weights, snapshot.steps_applied)
        tensors, meta = snapshot.optimizer
        optimizer_from_tensors(self.optimizer, tensors, meta, OPTIMIZER_PREFIX)
        self._last_reply = snapshot.last_reply
        self._pending = None
        self.saved_step = snapshot.steps_applied

    @property
    def pending_step(self) -> int | None:
        """The step whose forward is pending (its graph kept until its Backward), or None."""
        return self._pending.step if self._pending is not None else None

    @property
    def pending_output(self) -> torch.Tensor | None:
        """What the pending forward returned (logits (B, C), pooled (B, H) or hidden (N_real, H)), detached, or None."""
        return self._pending.output.detach() if self._pending is not None else None

    def drop_pending(self) -> None:
        self._pending = None

    def forward(
        self, step: int, packed: torch.Tensor, lengths: Sequence[int], output: str | None = None
    ) -> torch.Tensor:
        """Training forward of `step` (must be the next step) on the packed real token vectors (N_real, H) of
        examples of the given lengths, as they come off the wire; keeps the graph until backward. output: what the
        caller expects back (refused unless it is the session's)."""
        self._check_output(output)
        expected = self.steps_applied + 1
        if step != expected:
            raise StepOrderError(f"forward for step {step} but the next step is {expected}")
        hidden, mask = self._inputs(packed, lengths)
        placed, placed_mask = self._place(hidden, mask)
        if self.recorder is not None:
            self.recorder.record("forward", self.session_id, step, hidden, mask)  # as received (padded)
        placed.requires_grad_(self.train_bottom)
        set_training(self.top, True)
        # Dropout draws of this forward are a function of (session seed, step) only (sap_common.checkpoint.
        # seeded_draws): a forward recomputed after a restart or a resume draws the same masks, and sessions
        # running at once in this process do not disturb each other's draws, so no RNG state is saved.
        with seeded_draws(self.seed, step, self._devices):
            out = self.top(placed, placed_mask)  # (B, C) or (B, H), in the top's dtype, on its device
        # Finite but huge inputs can overflow inside the top; refuse before keeping a graph whose backward
        # would write NaN into this session's weights (the pending forward of this step, if any, is kept).
        _check_finite(f"{self.output} computed from hidden (values too large?)", out)
        self._pending = _Pending(step=step, hidden=placed, output=out, mask=placed_mask.bool())
        return out.detach().float().cpu()

    def backward(self, step: int, grad_logits: torch.Tensor, *, checkpointed: bool = False) -> BackwardResult:
        """Back-propagate dL/d(what Forward returned: logits, or pooled) of `step` and apply the optimizer step; a
        retry is replayed. checkpointed: the
        caller (SessionRegistry.backward) checkpoints the session now, before the reply, so the reply (and the
        record of it a replay answers from, which that checkpoint holds) says so; if the checkpoint then fails,
        the caller calls checkpoint_failed()."""
        if self._last_reply is not None and step == self._last_reply.applied_step:
            return BackwardResult(step, True, self._last_reply.grad_hidden, self._last_reply.checkpointed)
        pending = self._pending
        if pending is None or pending.step != step:
            have = "no forward is pending" if pending is None else f"the pending forward is step {pending.step}"
            raise StepOrderError(f"backward for step {step} but {have}; the next step is {self.steps_applied + 1}")
        name = f"grad_{self.output}"
        if tuple(grad_logits.shape) != tuple(pending.output.shape):
            raise InvalidInputError(
                f"{name} has shape {tuple(grad_logits.shape)}, "
                f"expected {tuple(pending.output.shape)} (the {self.output} of step {step})"
            )
        _check_float("grad", grad_logits)  # the wire field
        _check_finite(name, grad_logits)
        self.optimizer.zero_grad(set_to_none=True)
        pending.hidden.grad = None  # a refused earlier try of this step must not accumulate into dL/dhidden
        pending.output.backward(
            grad_logits.to(device=pending.output.device, dtype=pending.output.dtype), retain_graph=True
        )  # kept until the step is applied, so a refusal can be retried
        grads = [p.grad for p in self.parameters if p.grad is not None]
        first = self._param.device  # the top may span devices (--device-map): gather the flags on one
        if grads and not bool(torch.stack([torch.isfinite(g).all().to(first) for g in grads]).all()):  # one sync
            self.optimizer.zero_grad(set_to_none=True)
            raise InvalidInputError(
                f"{name} of step {step} give a non-finite weight gradient (values too large?); nothing was applied"
            )
        self.optimizer.step()
        if self.recorder is not None:
            # as received, once per applied step
            self.recorder.record_gradient(self.session_id, step, grad_logits, name=name)
        self.steps_applied = step
        self._pending = None
        # dL/dhidden of the real tokens only, packed like the forward's input (N_real, H): padding gets none.
        grad = pending.hidden.grad
        grad_hidden = grad[pending.mask].detach().float().cpu() if self.train_bottom and grad is not None else None
        self._last_reply = BackwardResult(step, False, grad_hidden, checkpointed=checkpointed)
        return self._last_reply

    def checkpoint_failed(self) -> BackwardResult:
        """The reply of the step just applied, saying it was not checkpointed after all."""
        assert self._last_reply is not None
        reply = self._last_reply
        self._last_reply = BackwardResult(reply.applied_step, False, reply.grad_hidden, checkpointed=False)
        return self._last_reply

    @torch.no_grad()
    def evaluate(self, packed: torch.Tensor, lengths: Sequence[int], output: str | None = None) -> torch.Tensor:
        """Logits (B, C), pooled (B, H) or hidden (N_real, H) of packed real token vectors, without a graph and
        without a step."""
        self._check_output(output)
        hidden, mask = self._inputs(packed, lengths)
        placed, placed_mask = self._place(hidden, mask)
        if self.recorder is not None:
            self.recorder.record("evaluate", self.session_id, 0, hidden, mask)  # as received (padded)
        set_training(self.top, False)
        return self.top(placed, placed_mask).float().cpu()

    @torch.no_grad()
    def generate(self, cache: KVCache, packed: torch.Tensor) -> torch.Tensor:
        """One piece of a split generation (sap.proto, Generate): the next n positions' vectors (n, H) of the sequence
        whose cache.length earlier positions cache holds -> the top's last block at those positions (n, H); the cache
        grows by n. Nothing trains."""
        if self.output != "hidden":
            raise InvalidInputError(
                f"generation needs a session whose top returns packed hidden states (a generative run's adapter); "
                f"this one returns {self.output}"
            )
        if packed.dim() != 2 or packed.shape[0] < 1:
            raise InvalidInputError(f"hidden has shape {list(packed.shape)}, expected (n, H) with n >= 1 positions")
        check_batch_tokens(1, cache.length + packed.shape[0], self.max_batch_tokens)
        hidden, mask = self._inputs(packed, [packed.shape[0]])
        placed, placed_mask = self._place(hidden, mask)
        if self.recorder is not None:  # step: the position of the piece's first vector
            self.recorder.record("generate", self.session_id, cache.length, hidden, mask)
        set_training(self.top, False)
        return self.top(placed, placed_mask, cache).float().cpu()

    def _check_output(self, output: str | None) -> None:
        if output is not None and output != self.output:
            served = {
                "logits": "logits (its head)",
                "pooled": "pooled (the user keeps the head)",
                "hidden": f"packed hidden states (the user runs the last {self.user_tail} blocks and the head)",
            }[self.output]
            raise InvalidInputError(f"output {output!r} was asked of a session that returns {served}")

    def _inputs(self, packed: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every check of what a Forward or Evaluate carries, in one place (the servicer only decodes frames):
        shape, dtype, lengths, the batch size limit, finite values. Returns the padded (B, T, H) batch as received
        (dtype, device) and its (B, T) mask."""
        size = self.top.config.hidden_size
        if packed.dim() != 2 or packed.shape[1] != size:
            raise InvalidInputError(
                f"hidden has shape {list(packed.shape)}, expected (N_real, {size}): this server's hidden size is {size}"
            )
        _check_float("hidden", packed)
        if lengths:
            check_batch_tokens(len(lengths), max(lengths), self.max_batch_tokens)  # before unpacking allocates
        hidden, mask = unpack_hidden(packed, lengths, field="hidden")  # checks the lengths against the rows
        _check_finite("hidden", packed)
        return hidden, mask

    def _place(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the top's device and in its dtype, refused if it does not fit that dtype."""
        narrowed = hidden.dtype != self._param.dtype  # e.g. float32 values too large for a float16 top
        hidden = hidden.to(device=self._param.device, dtype=self._param.dtype)
        if narrowed:
            _check_finite(f"hidden in the server's dtype {str(hidden.dtype).removeprefix('torch.')}", hidden)
        return hidden, mask.to(device=self._param.device)


def check_batch_tokens(batch: int, length: int, limit: int) -> None:
    """ResourceLimitError when a (batch, length) input is larger than the server takes at once."""
    if batch * length > limit:
        raise ResourceLimitError(
            f"hidden_states batch x length = {batch} x {length} = {batch * length} tokens; "
            f"this server takes at most {limit} per request (--max-batch-tokens): send "
            f"smaller batches or shorter texts"
        )


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _FLOATS:
        names = tuple(DTYPES)
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise InvalidInputError(f"{name}.dtype={dtype!r} is not allowed here; expected one of {names}")


_FLOATS = frozenset(DTYPES.values())


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise InvalidInputError(f"{name} holds NaN or Inf values")
