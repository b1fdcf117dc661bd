"""Generative fine-tuning of a decoder through the split (SFTTrainer): the model learns to write completions.

The provider's top runs blocks k..L-1-M and returns their output at every real token, packed (N_real, H) (a
session with output "hidden"); the user runs the last M blocks (--user-tail M, with its own LoRA), the final
norm and the output layer (the input embedding table of a tied model, which the user's bottom holds), computes
the loss on the target tokens (sap_client/sft_data.py) and returns dL/d(what came back). No vocabulary-sized
tensor crosses the wire: the logits (B, T, V) and their gradient stay here, and so do the target tokens.

What is sent is what classification sends: the bottom's output at every real token, through the one send function
(SplitTrainer.to_send), with the run's noise; each example's noise is keyed by its token ids.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from sap_client.head import apply_user_lora
from sap_client.privacy import Privatizer
from sap_client.sft_data import SFTExample
from sap_client.trainer import SplitTrainer, TrainConfig, TrainProgress
from sap_common.checkpoint import seeded_draws
from sap_common.models import set_training
from sap_common.models.families import LMHead
from sap_common.models.split import BottomModel, TopModel
from sap_common.service import SessionSpec, TopService

log = logging.getLogger(__name__)

IGNORE = -100  # a position that is not a target (F.cross_entropy's ignore_index)


def batch_tensors(examples: Sequence[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (B, T) right-padded with pad_id, attention_mask (B, T), targets (B, T): the token where it is a
    target of the loss, else IGNORE."""
    longest = max(len(e) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    targets = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for b, example in enumerate(examples):
        row = torch.tensor(example.input_ids, dtype=torch.long)
        ids[b, : len(row)], mask[b, : len(row)] = row, 1
        targets[b, : len(row)] = torch.where(torch.tensor(example.loss_mask), row, IGNORE)
    return ids, mask, targets


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at position t predict targets[:, t + 1]; mean over the targets
    (or their sum with reduction="sum")."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction=reduction,
    )


def noise_key(example: SFTExample) -> bytes:
    """What an example's noise is drawn from (with the run's secret): its token ids, so the same example is sent
    with the same noise in every epoch."""
    return ids_noise_key(example.input_ids)


def ids_noise_key(ids: Sequence[int]) -> bytes:
    """The noise key of a token sequence (a training example, or a generated sequence up to a piece's end)."""
    return b"sft\0" + hashlib.sha256(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()).digest()


class SFTTrainer(SplitTrainer):
    """Generative fine-tuning through a TopService, one step at a time (see the module docstring). lm_end: the
    user's end of the model, a TopModel over the last config.user_tail blocks (possibly none) that ends in LMHead
    (sap_client.bottom.load_server_tail with the bottom's embedding)."""

    def __init__(
        self,
        bottom: BottomModel,
        tokenizer,
        service: TopService,
        config: TrainConfig,
        lm_end: TopModel,
        privatizer: Privatizer | None = None,
        *,
        device: torch.device | str = "cpu",
        head_key: bytes | None = None,
    ):
        if not isinstance(lm_end.head, LMHead) or len(lm_end.blocks) != config.user_tail:
            raise ValueError(f"lm_end must be the model's last {config.user_tail} blocks ending in next-token logits")
        # The head (the output layer) is on this side whatever the flags say; the sent cache and prefetch are
        # classification's (keyed by dataset index).
        config = replace(config, private_head=True, prefetch=False)
        super().__init__(
            bottom,
            tokenizer,
            service,
            config,
            privatizer,
            device=device,
            head_key=head_key,
            tail=lm_end if config.user_tail else None,
        )
        self.output = "hidden"
        self.reuse_sent = False
        self.lm_end = lm_end.to(self.device)
        if config.user_tail:
            apply_user_lora(self.lm_end, self.head_key)
        else:
            self.lm_end.requires_grad_(False)
        trainable = [p for p in self.lm_end.parameters() if p.requires_grad]
        self.lm_optimizer = (
            torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
            if trainable
            else None
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def open_generative(self) -> str:
        """Open the provider's session: its top stops user_tail blocks early and returns packed hidden states."""
        spec = SessionSpec(
            num_labels=0,
            learning_rate=self.config.learning_rate,
            seed=self.config.seed,
            train_bottom=self.config.train_bottom,
            weight_decay=self.config.weight_decay,
            output="hidden",
            user_tail=self.config.user_tail,
            start_adapter=self.config.start_adapter,
        )
        self.session_id = self.service.open_session(spec)
        return self.session_id

    def user_state(self) -> dict[str, torch.Tensor]:
        """Copies of what trains on this side (the tail's LoRA), by name."""
        return {n: p.detach().cpu().clone() for n, p in self.lm_end.named_parameters() if p.requires_grad}

    def load_user_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put back what user_state returned (a finished run's tail LoRA, RUN_DIR/head.safetensors)."""
        params = {n: p for n, p in self.lm_end.named_parameters() if p.requires_grad}
        if params.keys() != state.keys():
            missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
            raise ValueError(f"the kept tail does not fit: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])

    def _sent(self, examples: Sequence[SFTExample], *, train: bool):
        input_ids, mask, targets = batch_tensors(examples, self.pad_id)
        hidden = self.bottom_outputs(input_ids, mask, train=train)
        sent = self.to_send(hidden, mask, input_ids, None, [noise_key(e) for e in examples])
        return hidden, sent, mask, targets

    def mean_hidden_norm_of(self, examples: Sequence[SFTExample]) -> float:
        """Mean L2 norm of the bottom's clean output over the real tokens of examples (for --noise-ratio)."""
        size = self.config.batch_size
        batches = (batch_tensors(examples[s : s + size], self.pad_id)[:2] for s in range(0, len(examples), size))
        return self.mean_norm_of_batches(batches)

    def _logits(self, returned: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Packed (N_real, H) from the provider -> logits (B, T, V), through the tail, the norm and the head."""
        mask = mask.to(self.device).bool()
        zeros = returned.new_zeros(*mask.shape, returned.shape[-1])
        hidden = zeros.masked_scatter(mask.unsqueeze(-1), returned)  # (B, T, H), zero padding; keeps the graph
        return self.lm_end(hidden, mask.long())

    def sft_step(self, examples: Sequence[SFTExample]) -> float:
        """One optimizer step on both sides; returns the batch's mean loss per target token."""
        hidden, sent, mask, targets = self._sent(examples, train=True)
        step = self.steps + 1
        out = self.service.forward(self._session, step, sent, mask, output="hidden")  # (N_real, H)
        returned = out.to(self.device).float().requires_grad_(True)
        if self.lm_optimizer is not None:
            self.lm_optimizer.zero_grad(set_to_none=True)
        set_training(self.lm_end, True)
        with seeded_draws(self.tail_seed, step, self.device, purpose="tail-dropout"):
            logits = self._logits(returned, mask)
        loss = lm_loss(logits, targets.to(self.device))
        loss.backward()
        assert returned.grad is not None
        result = self.service.backward(self._session, step, returned.grad.cpu())
        if self.lm_optimizer is not None:  # once the provider applied the step: both sides move together
            self.lm_optimizer.step()
        self._step_bottom(hidden, mask, result)
        self.steps = result.applied_step
        self.last_checkpointed = result.checkpointed
        return loss.item()

    @torch.no_grad()
    def loss_sum(self, examples: Sequence[SFTExample]) -> tuple[float, int]:
        """(summed next-token loss, number of targets) of examples through the split, nothing trained."""
        total, count = 0.0, 0
        size = self.config.batch_size
        set_training(self.lm_end, False)
        for start in tqdm(range(0, len(examples), size), desc="evaluate", unit="batch", disable=None, leave=False):
            batch = examples[start : start + size]
            _, sent, mask, targets = self._sent(batch, train=False)
            returned = self.service.evaluate(self._session, sent, mask, output="hidden").to(self.device).float()
            total += float(lm_loss(self._logits(returned, mask), targets.to(self.device), reduction="sum"))
            count += int((targets[:, 1:] != IGNORE).sum())
        return total, count

    def perplexity(self, examples: Sequence[SFTExample]) -> float:
        """exp(mean next-token loss over the targets of examples)."""
        total, count = self.loss_sum(examples)
        return math.exp(total / count) if count else float("nan")

    def fit_generative(
        self,
        train: Sequence[SFTExample],
        eval_examples: Sequence[SFTExample],
        *,
        progress: TrainProgress | None = None,
        on_checkpoint: Callable[[TrainProgress], None] | None = None,
    ) -> dict:
        """Train for config.epochs (a seeded order per epoch), measuring held-out perplexity before the first step
        and after each epoch; returns the run's metrics. progress (the client's checkpoint) continues a run where
        it stood, as SplitTrainer.fit does: the orders are replayed, the steps done skipped; on_checkpoint(progress)
        runs whenever the provider says it checkpointed."""
        if self.session_id is None:
            self.open_generative()
        progress = progress if progress is not None else TrainProgress()
        if progress.step != self.steps:
            raise ValueError(f"progress is at step {progress.step} but the trainer at step {self.steps}")
        if self.privatizer is not None and progress.privatizer is not None:
            self.privatizer.load_state(progress.privatizer)
        generator = torch.Generator().manual_seed(self.config.seed)
        started, earlier = time.perf_counter(), progress.seconds
        if progress.eval_before is None:
            progress.eval_before = self.perplexity(eval_examples)
        size = self.config.batch_size
        for epoch in range(1, self.config.epochs + 1):
            order = torch.randperm(len(train), generator=generator).tolist()  # drawn for every epoch: replayed
            if epoch < progress.epoch:
                continue
            batches = [[train[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
            bar = tqdm(
                batches[progress.position :],
                desc=f"epoch {epoch}/{self.config.epochs}",
                unit="step",
                disable=None,
                initial=progress.position,
                total=len(batches),
            )
            for batch in bar:
                progress.losses.append(self.sft_step(batch))
                progress.step, progress.position = self.steps, progress.position + 1
                if self.last_checkpointed and on_checkpoint is not None:
                    progress.seconds = earlier + time.perf_counter() - started
                    progress.privatizer = self.privatizer.state() if self.privatizer is not None else None
                    on_checkpoint(progress)
            perplexity = self.perplexity(eval_examples)
            loss = sum(progress.losses) / len(progress.losses)
            progress.history.append({"epoch": epoch, "train_loss": loss, "eval_perplexity": perplexity})
            progress.epoch, progress.position, progress.losses = epoch + 1, 0, []
            log.info("epoch %d/%d: train loss %.4f, eval perplexity %.3f", epoch, self.config.epochs, loss, perplexity)
        seconds = earlier + time.perf_counter() - started
        tokens = sum(len(e) for e in train) * self.config.epochs
        history = progress.history
        return {
            "task": "generative",
            "eval_perplexity_before": progress.eval_before,
            "eval_perplexity": history[-1]["eval_perplexity"],
            "train_loss": history[-1]["train_loss"],
            "steps": self.steps,
            "examples": len(train) * self.config.epochs,
            "train_examples": len(train),
            "eval_examples": len(eval_examples),
            "train_tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "history": history,
            "resumed_at_steps": list(progress.resumed_at),
        }
