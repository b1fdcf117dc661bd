"""Learned inversion: the provider trains a model that reads tokens back from received hidden states.

It trains on public text it owns (never the victim's), run through its copy of the pretrained bottom and
perturbed by the same mechanism with the same settings (the worst case: it knows eta, the CTI table, the
rescaling; only the noise key is the user's), with a fresh noise draw in every epoch. Then it decodes what
it received. The model is a small bidirectional transformer over the sequence of received vectors (it sees
the whole sequence, so context on both sides helps, for encoders and decoders alike), with an output layer
over the tokens the public text contains: a token it never saw is one it cannot name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

# (hidden (B, T, H), mask (B, T), input ids (B, T), epoch) -> what the provider would receive for them
NoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class LearnedConfig:
    """The inverter's size and training budget (parameters of `sap-client audit --attack learned`)."""

    width: int = 256
    layers: int = 2
    heads: int = 4
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")


class InversionModel(nn.Module):
    """Received vectors (B, T, H) -> logits over the known tokens (B, T, K)."""

    def __init__(self, hidden: int, known_tokens: int, max_length: int, config: LearnedConfig):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)  # received vectors differ in scale by orders of magnitude (sinks, noise)
        self.project = nn.Linear(hidden, config.width)
        self.positions = nn.Embedding(max_length, config.width)
        layer = nn.TransformerEncoderLayer(
            config.width, config.heads, 4 * config.width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.out = nn.Linear(config.width, known_tokens)

    def forward(self, received: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(received.shape[1], device=received.device)
        x = self.project(self.norm(received)) + self.positions(positions)  # (B, T, W)
        x = self.encoder(x, src_key_padding_mask=~mask.bool())
        return self.out(x)  # (B, T, K)


@dataclass
class LearnedInverter:
    """A trained inversion model and the vocabulary ids of its output classes."""

    model: InversionModel
    token_ids: torch.Tensor  # (K,): output class i is token token_ids[i]
    public_tokens: int  # real tokens it was trained on (per epoch)

    @torch.no_grad()
    def __call__(self, observed: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """observed (B, T, H) -> guessed token ids (B, T)."""
        self.model.eval()
        max_length = self.model.positions.num_embeddings
        if observed.shape[1] > max_length:
            raise ValueError(f"the inverter was trained on at most {max_length} positions, got {observed.shape[1]}")
        guesses = []
        for start in range(0, observed.shape[0], batch_size):
            logits = self.model(
                observed[start : start + batch_size].float(), attention_mask[start : start + batch_size]
            )
            guesses.append(self.token_ids[logits.argmax(-1)])
        return torch.cat(guesses).to(observed.device)


def train_inverter(
    public: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    perturb: NoiseFn,
    *,
    config: LearnedConfig = LearnedConfig(),
) -> LearnedInverter:
    """Train on public batches [(clean hidden (B, T, H), mask (B, T), input ids (B, T))] of the attacker's bottom;
    perturb(hidden, mask, ids, epoch) applies the mechanism (a new draw per epoch)."""
    if not public:
        raise ValueError("the learned inverter needs public text to train on (no public batches given)")
    real_ids = torch.cat([ids[mask.bool()] for _, mask, ids in public])
    known = real_ids.unique()  # (K,) sorted
    lookup = torch.full((int(known.max()) + 1,), -100, dtype=torch.long)
    lookup[known] = torch.arange(len(known))
    hidden_size = public[0][0].shape[-1]
    max_length = max(hidden.shape[1] for hidden, _, _ in public)
    torch.manual_seed(config.seed)  # the model's initial weights and dropout
    model = InversionModel(hidden_size, len(known), max_length, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    order_generator = torch.Generator().manual_seed(config.seed)
    examples = [(b, row) for b, (hidden, _, _) in enumerate(public) for row in range(hidden.shape[0])]
    steps = config.epochs * math.ceil(len(examples) / config.batch_size)
    warmup = max(1, steps // 10)  # a short linear warm-up, then a cosine decay to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    model.train()
    with tqdm(total=steps, desc="learned inverter", unit="step", disable=None) as bar:
        for epoch in range(config.epochs):
            received = [perturb(hidden, mask, ids, epoch) for hidden, mask, ids in public]
            order = torch.randperm(len(examples), generator=order_generator).tolist()
            for start in range(0, len(order), config.batch_size):
                picked = [examples[i] for i in order[start : start + config.batch_size]]
                x, mask, target = _batch(picked, received, public, lookup)
                loss = nn.functional.cross_entropy(
                    model(x, mask).reshape(-1, len(known)), target.reshape(-1), ignore_index=-100
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return LearnedInverter(model, known, int(real_ids.numel()))


def _batch(
    picked: list[tuple[int, int]],
    received: list[torch.Tensor],
    public: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    lookup: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the perturbed public batches, padded together: (x (b, T, H), mask (b, T), target classes (b, T))."""
    lengths = torch.tensor([int(public[b][1][row].sum()) for b, row in picked])
    pad = nn.utils.rnn.pad_sequence
    x = pad([received[b][row, :n] for (b, row), n in zip(picked, lengths.tolist())], batch_first=True).float()
    ids = pad([public[b][2][row, :n] for (b, row), n in zip(picked, lengths.tolist())], batch_first=True)
    mask = (torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (b, T)
    target = lookup[ids].masked_fill(~mask.bool(), -100)
    return x, mask, target
