"""SplitTrainer: the user's training loop. Bottom runs here; labels and loss never leave this process."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from sap_client.data import TextDataset
from sap_client.head import UserHead, new_user_head, tail_dropout_seed
from sap_client.privacy import NoiseTally, Privatizer
from sap_common.checkpoint import seeded_draws
from sap_common.models import set_training
from sap_common.models.split import TopModel
from sap_common.service import DEFAULT_LEARNING_RATE, BackwardResult, SessionSpec, TopService

if TYPE_CHECKING:  # the model code loads transformers: not needed to parse a command line
    from transformers import PreTrainedTokenizerBase

    from sap_client.filter import LearnedFilter
    from sap_common.models.split import BottomModel

log = logging.getLogger(__name__)

# What the client sends for one batch: (hidden with graph or None, sent (B, T, H), mask (B, T), the privatizer's
# measurements of the batch, counted when it is sent (None: nothing new was noised)).
Outgoing = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, NoiseTally | None]

# --train-bottom fine-tunes every weight of the bottom, as full fine-tuning does, at a full fine-tuning rate: at the
# top's PEFT rate (1e-3) MiniLM's bottom at split 2 drifted far from its pretrained weights and a run could end at
# chance (README, "Defence: the trainable bottom"); 1e-4 learned best of the rates tried there.
DEFAULT_BOTTOM_LEARNING_RATE = 1e-4


@dataclass
class TrainConfig:
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    learning_rate: float = field(
        default=DEFAULT_LEARNING_RATE, metadata={"help": "AdamW learning rate of the top's PEFT weights and a head"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_length: int = field(default=64, metadata={"help": "tokens per example after truncation"})
    seed: int = field(default=0, metadata={"help": "seeds data order and the server's initial weights"})
    train_bottom: bool = field(default=False, metadata={"help": "also fine-tune the user's bottom blocks"})
    bottom_learning_rate: float = field(
        default=DEFAULT_BOTTOM_LEARNING_RATE,
        metadata={
            "help": "AdamW learning rate of the bottom with train_bottom: every weight of it trains, the embeddings "
            "included, and the top's PEFT rate (1e-3) wrecks it"
        },
    )
    private_head: bool = field(
        default=False,
        metadata={
            "help": "keep the task head on this machine: the provider returns the pooled representation and never "
            "sees logits, dL/dlogits or the number of classes (dL/dpooled still carries the labels: privacy.md)"
        },
    )
    user_tail: int = field(
        default=0,
        metadata={
            "help": "with private_head, also run the model's last M blocks here with this side's own LoRA: the "
            "provider returns the packed hidden states of block L-M-1 and receives their gradient"
        },
    )
    label_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "train on labels randomized once per example with this epsilon (label DP); None: true labels"
        },
    )
    label_mechanism: str = field(default="rr", metadata={"help": "rr or rr-prior (sap_client/labeldp.py)"})
    start_adapter: str = field(
        default="",
        metadata={
            "help": "start the provider's top from this noise-robust starting adapter (one the server offers: "
            "sap-server --start-adapter); what is sent is unchanged"
        },
    )
    learned_filter: bool = field(
        default=False,
        metadata={
            "help": "before the first step, train a filter between the bottom and the noise on this machine (task "
            "loss plus an inversion model's confusion: sap_client/filter.py); needs noise, a frozen bottom"
        },
    )
    filter_steps: int = field(default=300, metadata={"help": "training steps of the learned filter"})
    filter_privacy_weight: float = field(
        default=0.3, metadata={"help": "the learned filter's weight on the inversion model's confusion"}
    )
    prefetch: bool = field(
        default=True,
        metadata={"help": "with a frozen bottom, prepare batch i+1 while batch i is on the server (results unchanged)"},
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "bottom_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.label_epsilon is not None and not (0 < self.label_epsilon < float("inf")):
            raise ValueError(f"label_epsilon must be a finite number > 0, got {self.label_epsilon}")
        if self.label_mechanism not in ("rr", "rr-prior"):
            raise ValueError(f"label_mechanism must be rr or rr-prior, got {self.label_mechanism!r}")
        if self.learned_filter and self.train_bottom:
            raise ValueError("learned_filter trains on a frozen bottom's outputs: not with train_bottom")
        if self.filter_steps < 1 or not (0 <= self.filter_privacy_weight < float("inf")):
            raise ValueError(
                f"filter_steps must be >= 1 and filter_privacy_weight >= 0, got {self.filter_steps}, "
                f"{self.filter_privacy_weight}"
            )
        if self.user_tail < 0 or (self.user_tail and not self.private_head):
            raise ValueError(
                f"user_tail must be 0, or >= 1 with private_head (the tail ends in the head); got {self.user_tail}"
            )


@dataclass
class TrainProgress:
    """Where a run stands after `step`: what the client checkpoints (with its bottom, when that trains) and what
    SplitTrainer.fit continues from. The data order is replayed from the seeded generator, so (epoch,
    position) is all it takes to find the next batch."""

    step: int = 0  # optimizer steps applied on both sides
    epoch: int = 1  # the epoch under way (1-based)
    position: int = 0  # batches of that epoch done
    losses: list[float] = field(default_factory=list)  # the batch losses of that epoch so far
    history: list[dict] = field(default_factory=list)  # one entry per finished epoch
    seconds: float = 0.0  # training time spent so far, in every process of the run
    privatizer: dict | None = None  # Privatizer.state(): its running noise/signal sums
    resumed_at: list[int] = field(default_factory=list)  # steps the run was resumed at
    eval_before: float | None = None  # a generative run's held-out perplexity before its first step


@dataclass
class EvalResult:
    accuracy: float
    predictions: list[int]
    probabilities: torch.Tensor  # (N, C)


def _place_bottom(bottom: BottomModel, device: torch.device) -> BottomModel:
    """Run the bottom on device while its callers (this loop, the audit) keep CPU tensors: inputs move
    there, outputs come back (differentiably, so dL/dhidden still reaches a trainable bottom). Noise is
    drawn on the CPU from keyed generators and the codec sends CPU tensors, so nothing else changes."""
    if device.type == "cpu":
        return bottom
    bottom.to(device)
    bottom.register_forward_pre_hook(lambda _module, args: tuple(a.to(device) for a in args))
    bottom.register_forward_hook(lambda _module, _args, output: output.cpu())
    return bottom


class Prefetcher:
    """Runs work(item) for each item in one background thread, at most `depth` results ahead of the consumer.

    Iterating yields the results in the items' order. An exception in the worker is re-raised in the
    consuming thread (with the worker's traceback); leaving the with-block, normally or by an exception,
    stops the worker and joins it, so no thread outlives the block.
    """

    _DONE = object()  # end-of-items marker
    _POLL = 0.1  # seconds between checks of the stop flag while the queue is full or empty

    def __init__(self, work: Callable[[Any], object], items: Iterable, *, depth: int = 1, name: str = "sap-prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._work = work
        self._items = list(items)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker (it finishes the item in hand, if any) and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __iter__(self) -> Iterator:
        while True:
            try:
                ok, value = self._queue.get(timeout=self._POLL)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch worker stopped without a result") from None
                continue
            if not ok:
                raise value  # the worker's exception, surfacing here in the consumer
            if value is self._DONE:
                return
            yield value

    def _run(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set() or not self._put((True, self._work(item))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put((False, exc))
            return
        self._put((True, self._DONE))

    def _put(self, entry: tuple[bool, object]) -> bool:
        """Queue entry unless the consumer has stopped; False when it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=self._POLL)
                return True
            except queue.Full:
                continue
        return False


def _labels(data: TextDataset, batch: list[int]) -> torch.Tensor:
    return torch.tensor([data.labels[i] for i in batch])  # (B,)


class SplitTrainer:
    """Runs the bottom locally and the top through a TopService, one step at a time."""

    def __init__(
        self,
        bottom: BottomModel,
        tokenizer: PreTrainedTokenizerBase,
        service: TopService,
        config: TrainConfig,
        privatizer: Privatizer | None = None,
        *,
        fresh_noise: bool = False,
        device: torch.device | str = "cpu",
        head_key: bytes | None = None,
        tail: TopModel | None = None,
    ):
        self.device = torch.device(device)
        self.bottom = _place_bottom(bottom, self.device)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.service = service
        self.config = config
        self.privatizer = privatizer
        self.fresh_noise = fresh_noise
        self.session_id: str | None = None
        self.steps = 0
        self.last_checkpointed = False
        self.bottom.requires_grad_(config.train_bottom)
        self.bottom_optimizer = (
            torch.optim.AdamW(
                self.bottom.parameters(), lr=config.bottom_learning_rate, weight_decay=config.weight_decay
            )
            if config.train_bottom
            else None
        )
        # One observation per example: with a frozen bottom each training example's sent tensor
        # (real tokens only, (len, H)) is computed once and re-sent unchanged in later epochs.
        self.reuse_sent = not config.train_bottom and not fresh_noise
        self._sent_cache: dict[int, torch.Tensor] = {}
        # Overlap: a frozen bottom does not depend on the server's steps, so batch i+1 can be computed
        # and privatized while batch i's RPCs are in flight. Noise is keyed per example and the order
        # comes from the seeded generator, so the results are the same with and without it.
        self.prefetch = config.prefetch and not config.train_bottom
        # --private-head: the head lives here; the provider's session returns the pooled representation, or with
        # --user-tail M the packed hidden states of block L-M-1, which the tail (the pretrained last M blocks, given
        # here without LoRA) continues from.
        self.output = "hidden" if config.user_tail else "pooled" if config.private_head else "logits"
        if config.user_tail and (tail is None or len(tail.blocks) != config.user_tail):
            raise ValueError(f"user_tail {config.user_tail} needs the model's last {config.user_tail} blocks (tail)")
        self.tail = tail
        self.head_key = head_key if head_key is not None else secrets.token_bytes(32)  # the run's secret, if any
        self.tail_seed = tail_dropout_seed(self.head_key)
        self.head: UserHead | None = None
        self.head_optimizer: torch.optim.Optimizer | None = None
        # --learned-filter: the user's frozen map between the bottom and the noise (sap_client/filter.py)
        self.filter: LearnedFilter | None = None
        self.filter_training: dict | None = None  # what the filter's training measured (metrics.json, privacy.md)

    def attach_head(self, head: UserHead) -> None:
        """Use head as the run's task head (a new one, or the one a run kept) with a fresh optimizer."""
        if head.tail_blocks != self.config.user_tail:
            raise ValueError(f"the head runs {head.tail_blocks} tail blocks, the run {self.config.user_tail}")
        self.head = head.to(self.device)
        self.head_optimizer = torch.optim.AdamW(
            [p for p in self.head.parameters() if p.requires_grad],
            lr=self.config.learning_rate,
            weight_decay=self.config.weight_decay,
        )

    def new_head(self, num_labels: int) -> UserHead:
        """This run's head as training starts: keyed by the run's secret, over the tail when there is one."""
        return new_user_head(self.bottom.config.hidden_size, num_labels, self.head_key, tail=self.tail)

    def open(self, num_labels: int) -> str:
        """Open the provider's session; with --private-head also draw this side's head (unless one is attached)."""
        if self.config.private_head and self.head is None:
            self.attach_head(self.new_head(num_labels))
        spec = SessionSpec(
            num_labels=0 if self.config.private_head else num_labels,
            learning_rate=self.config.learning_rate,
            seed=self.config.seed,
            train_bottom=self.config.train_bottom,
            weight_decay=self.config.weight_decay,
            output=self.output,
            user_tail=self.config.user_tail,
            start_adapter=self.config.start_adapter,
        )
        self.session_id = self.service.open_session(spec)
        return self.session_id

    @property
    def _session(self) -> str:
        if self.session_id is None:
            raise RuntimeError("no session is open: call open_session (or set session_id) first")
        return self.session_id

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> input_ids (B, T), attention_mask (B, T), right-padded to the longest."""
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"]

    def bottom_outputs(self, input_ids: torch.Tensor, mask: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        """The bottom's hidden states (B, T, H) for a batch; with a graph only when the bottom trains now."""
        if train and self.config.train_bottom:
            set_training(self.bottom, True)
            # Dropout of a trainable bottom draws from (seed, step) alone (sap_common.checkpoint.seeded_draws), so
            # a resumed run recomputes a step exactly. The bottom trains without prefetch: this is step steps + 1.
            with seeded_draws(self.config.seed, self.steps + 1, self.device, purpose="bottom-dropout"):
                return self.bottom(input_ids, mask)
        set_training(self.bottom, False)
        with torch.no_grad():
            return self.bottom(input_ids, mask)

    def noise_keys(self, texts: list[str], *, epoch: int | None = None) -> list[bytes]:
        """What each text's noise is drawn from (with the run's secret): the text itself, so a text is sent with the
        same noise in every epoch and at inference; with --fresh-noise, the training epoch too."""
        tag = f"\0epoch={epoch}" if epoch is not None and self.fresh_noise else ""
        return [(text + tag).encode() for text in texts]

    def to_send(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None,
        keys: list[bytes],
        tally: NoiseTally | None = None,
    ) -> torch.Tensor:
        """The send function: the tensor (B, T, H) that leaves this machine for a batch of bottom outputs. Training,
        inference and the audit all call this one. Padding is sent as zeros, never as bottom outputs: at k >= 1
        those mix in the real tokens. With a learned filter, the filter's output is what is noised. tally: see
        Privatizer.__call__."""
        if self.filter is not None:
            with torch.no_grad():
                hidden = self.filter(hidden.detach())
        if self.privatizer is None:
            return hidden.detach() * mask.unsqueeze(-1).to(hidden.dtype)
        return self.privatizer(hidden, mask, input_ids, labels, keys, tally=tally)

    def _outgoing(
        self,
        texts: list[str],
        labels: torch.Tensor | None,
        *,
        train: bool,
        epoch: int = 0,
        tally: NoiseTally | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden with graph, the tensor that is sent, mask)."""
        input_ids, mask = self.encode(texts)
        hidden = self.bottom_outputs(input_ids, mask, train=train)  # (B, T, H)
        keys = self.noise_keys(texts, epoch=epoch if train else None)
        return hidden, self.to_send(hidden, mask, input_ids, labels, keys, tally), mask

    def _cached(self, ids: list[int] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.reuse_sent or ids is None or not all(i in self._sent_cache for i in ids):
            return None
        rows = [self._sent_cache[i] for i in ids]
        lengths = torch.tensor([len(r) for r in rows])
        sent = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T, H), zero padding
        mask = (torch.arange(sent.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return sent, mask

    def _prepare(self, texts: list[str], labels: torch.Tensor, ids: list[int] | None, epoch: int) -> Outgoing:
        """The batch as it will be sent: from the sent cache, or computed (and cached) now."""
        cached = self._cached(ids)
        if cached is not None:
            return None, *cached, None
        tally = NoiseTally() if self.privatizer is not None else None
        hidden, sent, mask = self._outgoing(texts, labels, train=True, epoch=epoch, tally=tally)
        if self.reuse_sent and ids is not None:
            for row, i in enumerate(ids):
                self._sent_cache[i] = sent[row, : int(mask[row].sum())].clone()
        return hidden, sent, mask, tally

    def _exchange(self, outgoing: Outgoing, labels: torch.Tensor) -> float:
        """Forward and Backward of one prepared batch (and the bottom's step when it trains); the loss.
        self.last_checkpointed says whether the provider checkpointed the session at this step."""
        hidden, sent, mask, tally = outgoing
        step = self.steps + 1
        out = self.service.forward(self._session, step, sent, mask, output=self.output)  # (B, C), (B, H), (N, H)
        returned = out.to(self.device).requires_grad_(True)
        if self.head is None:
            loss = F.cross_entropy(returned, labels.to(self.device))
            (grad_out,) = torch.autograd.grad(loss, returned)
        else:  # dL/d(what came back) goes back; the head's (and the tail's) own gradients stay here
            assert self.head_optimizer is not None
            self.head_optimizer.zero_grad(set_to_none=True)
            set_training(self.head, True)
            # The tail's dropout draws come from (the run's secret, step) alone: a resumed step draws the same.
            with seeded_draws(self.tail_seed, step, self.device, purpose="tail-dropout"):
                logits = self.head(returned, mask.to(self.device))
            loss = F.cross_entropy(logits, labels.to(self.device))
            loss.backward()
            assert returned.grad is not None
            grad_out = returned.grad
        result = self.service.backward(self._session, step, grad_out.cpu())
        if self.head_optimizer is not None:  # once the provider applied the step: both sides move together
            self.head_optimizer.step()
        self._step_bottom(hidden, mask, result)
        self.steps = result.applied_step
        self.last_checkpointed = result.checkpointed
        if tally is not None:
            tally.commit()
        return loss.item()

    def _step_bottom(self, hidden: torch.Tensor | None, mask: torch.Tensor, result: BackwardResult) -> None:
        """A trainable bottom's step from the dL/dhidden the provider returned (real tokens, packed)."""
        if self.bottom_optimizer is None:
            return
        if result.grad_hidden is None:
            raise RuntimeError("the server returned no dL/dhidden although the bottom is trainable")
        self.bottom_optimizer.zero_grad(set_to_none=True)
        assert hidden is not None  # the bottom trains, so its output kept its graph
        hidden[mask.bool()].backward(result.grad_hidden.to(hidden.dtype))
        self.bottom_optimizer.step()

    def step(self, texts: list[str], labels: torch.Tensor, *, ids: list[int] | None = None, epoch: int = 1) -> float:
        """One optimizer step on both sides; returns the batch loss. ids name the examples (for reuse)."""
        return self._exchange(self._prepare(texts, labels, ids, epoch), labels)

    def _prepared(self, data: TextDataset, batches: list[list[int]], epoch: int) -> Generator[Outgoing, None, None]:
        """Each batch prepared for sending, in order: in a background thread when prefetching."""

        def prepare(batch: list[int]) -> Outgoing:
            return self._prepare([data.texts[i] for i in batch], _labels(data, batch), batch, epoch)

        if not self.prefetch:
            yield from map(prepare, batches)
            return
        with Prefetcher(prepare, batches, depth=1) as prefetched:  # at most 2 batches ahead
            yield from prefetched

    def train_batches(
        self,
        data: TextDataset,
        batches: list[list[int]],
        *,
        description: str = "train",
        epoch: int = 1,
        on_step: Callable[[float, bool], None] | None = None,
    ) -> list[float]:
        """One optimizer step per batch of example indices into data, in order; the batch losses.
        on_step(loss, checkpointed) runs after each step, before the next one is sent."""
        losses = []
        # closing(): leaving the loop early (an RPC error) stops and joins the prefetch thread at once.
        with (
            closing(self._prepared(data, batches, epoch)) as prepared,
            tqdm(total=len(batches), desc=description, unit="step", disable=None, leave=False) as bar,
        ):
            for batch, outgoing in zip(batches, prepared):
                loss = self._exchange(outgoing, _labels(data, batch))
                losses.append(loss)
                if on_step is not None:
                    on_step(loss, self.last_checkpointed)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}")
        return losses

    def train_epoch(
        self, data: TextDataset, generator: torch.Generator, description: str = "train", epoch: int = 1
    ) -> float:
        """One pass in a seeded random order; returns the mean batch loss."""
        order = torch.randperm(len(data), generator=generator).tolist()
        losses = self.train_batches(data, self._batches(order), description=description, epoch=epoch)
        return sum(losses) / len(losses)

    def predict(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        """Class probabilities (N, C) through the same split (and the same privatizer)."""
        size = batch_size or self.config.batch_size
        out = []
        for start in tqdm(range(0, len(texts), size), desc="predict", unit="batch", disable=None, leave=False):
            _, sent, mask = self._outgoing(texts[start : start + size], None, train=False)
            returned = self.service.evaluate(self._session, sent, mask, output=self.output).float()
            if self.head is not None:
                set_training(self.head, False)
                with torch.no_grad():
                    returned = self.head(returned.to(self.device), mask.to(self.device)).cpu()
            elif self.config.private_head:
                raise RuntimeError("--private-head: no head attached (the run's head.safetensors)")
            out.append(torch.softmax(returned, dim=-1))
        return torch.cat(out)

    def evaluate(self, data: TextDataset) -> EvalResult:
        probabilities = self.predict(data.texts)
        predictions = probabilities.argmax(-1).tolist()
        correct = sum(int(p == y) for p, y in zip(predictions, data.labels))
        return EvalResult(correct / len(data), predictions, probabilities)

    def _batches(self, order: list[int]) -> list[list[int]]:
        size = self.config.batch_size
        return [order[start : start + size] for start in range(0, len(order), size)]

    def _rebuild_sent_cache(self, data: TextDataset, progress: TrainProgress) -> None:
        """Resuming with one observation per example: fill the sent cache as the interrupted run had it (every
        example of the epoch-1 batches already done, computed in those same batches, so the tensors are
        bit-identical; nothing is sent). The privatizer's sums are restored from the checkpoint afterwards."""
        if not self.reuse_sent or (progress.epoch == 1 and progress.position == 0):
            return
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.config.seed)).tolist()
        batches = self._batches(order)
        done = batches[: progress.position] if progress.epoch == 1 else batches
        for batch in done:  # the measurements are dropped: the checkpoint's sums already count these batches
            self._prepare([data.texts[i] for i in batch], _labels(data, batch), batch, 1)
        log.info("rebuilt the sent cache of %d examples (one observation per example)", len(self._sent_cache))

    def fit(
        self,
        train: TextDataset,
        eval_data: TextDataset,
        *,
        progress: TrainProgress | None = None,
        on_checkpoint: Callable[[TrainProgress], None] | None = None,
    ) -> dict:
        """Train for config.epochs, evaluating after each; returns the run's metrics.

        progress (from the client's checkpoint) continues a run where it stood: the data order is replayed,
        the steps done are skipped. on_checkpoint(progress) runs whenever the provider says it checkpointed
        the session at a step, before the next step is sent (so the provider is never more than one
        checkpoint ahead of the client's latest)."""
        if self.session_id is None:
            self.open(len(train.label_names))
        progress = progress if progress is not None else TrainProgress()
        if progress.step != self.steps:
            raise ValueError(f"progress is at step {progress.step} but the trainer at step {self.steps}")
        self._rebuild_sent_cache(train, progress)
        if self.privatizer is not None and progress.privatizer is not None:
            self.privatizer.load_state(progress.privatizer)
        generator = torch.Generator().manual_seed(self.config.seed)
        started, before = time.perf_counter(), progress.seconds

        def on_step(loss: float, checkpointed: bool) -> None:
            progress.step, progress.position = self.steps, progress.position + 1
            progress.losses.append(loss)
            if checkpointed and on_checkpoint is not None:
                progress.seconds = before + time.perf_counter() - started
                progress.privatizer = self.privatizer.state() if self.privatizer is not None else None
                on_checkpoint(progress)

        for epoch in range(1, self.config.epochs + 1):
            order = torch.randperm(len(train), generator=generator).tolist()  # drawn for every epoch: replayed
            if epoch < progress.epoch:
                continue
            batches = self._batches(order)
            self.train_batches(
                train,
                batches[progress.position :],
                description=f"epoch {epoch}/{self.config.epochs}",
                epoch=epoch,
                on_step=on_step,
            )
            loss = sum(progress.losses) / len(progress.losses)
            accuracy = self.evaluate(eval_data).accuracy
            progress.history.append({"epoch": epoch, "train_loss": loss, "eval_accuracy": accuracy})
            progress.epoch, progress.position, progress.losses = epoch + 1, 0, []
            log.info("epoch %d/%d: train loss %.4f, eval accuracy %.4f", epoch, self.config.epochs, loss, accuracy)
        seconds = before + time.perf_counter() - started
        history = progress.history
        examples = len(train) * self.config.epochs
        return {
            "eval_accuracy": history[-1]["eval_accuracy"],
            "train_loss": history[-1]["train_loss"],
            "steps": self.steps,
            "examples": examples,
            "train_examples": len(train),
            "eval_examples": len(eval_data),
            "eval_majority": max(eval_data.labels.count(c) for c in set(eval_data.labels)) / len(eval_data),
            "seconds": seconds,
            "examples_per_second": examples / seconds if seconds > 0 else 0.0,
            "history": history,
            "resumed_at_steps": list(progress.resumed_at),
        }

    def mean_hidden_norm(self, texts: list[str]) -> float:
        """Mean L2 norm of the bottom's clean output over the real tokens of texts."""
        size = self.config.batch_size
        return self.mean_norm_of_batches(
            self.encode(texts[start : start + size]) for start in range(0, len(texts), size)
        )

    @torch.no_grad()
    def mean_norm_of_batches(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean L2 norm of the bottom's clean output over the real tokens of (input_ids, mask) batches."""
        set_training(self.bottom, False)
        total, count = 0.0, 0
        for input_ids, mask in batches:
            mask = mask.to(self.device)
            norms = self.bottom(input_ids.to(self.device), mask).norm(dim=-1)  # (B, T)
            total += norms[mask.bool()].sum().item()
            count += int(mask.sum())
        return total / count
