"""Embedding inversion attacks (EIA): recover input tokens from the hidden states a provider receives.

k = 0: the nearest row of the embedding matrix (L2) is the guess. k >= 1: optimization-based, as in
the public reference code: learn logits z over the vocabulary per position, feed softmax(z / T) @ E
through the attacker's copy of the pretrained bottom, minimise the distance to what was observed and
read argmax(z). Success = fraction of real (non-padding) tokens recovered; privacy = 1 - success.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from sap_common.models.families import ENCODER, run_blocks
from sap_common.models.split import BottomModel

DISTANCES = ("cosine", "l2")
# Elements of one (chunk, V) distance block: 2**24 floats = 64 MiB, whatever V is.
_BLOCK_ELEMENTS = 1 << 24


def nearest_neighbour_inversion(
    observed: torch.Tensor, embedding: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """observed (..., H), embedding (V, H) -> (...,) ids of the nearest embedding rows (L2).

    Works in chunks of observed rows so that V = 50k and N = 50k fit in memory.
    """
    if embedding.dim() != 2 or embedding.shape[0] < 1:
        raise ValueError(f"embedding must be a non-empty (V, H) matrix, got shape {tuple(embedding.shape)}")
    if observed.dim() < 1 or observed.shape[-1] != embedding.shape[1]:
        raise ValueError(
            f"observed must be (..., H) with H = {embedding.shape[1]} (the embedding width), "
            f"got shape {tuple(observed.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    vocab, width = embedding.shape
    chunk = chunk_size or max(1, _BLOCK_ELEMENTS // vocab)
    table = embedding.detach().float()  # (V, H)
    table_sq = (table * table).sum(-1)  # (V,)
    rows = observed.detach().reshape(-1, width)  # (N, H)
    ids = torch.empty(rows.shape[0], dtype=torch.long, device=table.device)
    starts = range(0, rows.shape[0], chunk)
    for start in tqdm(starts, desc="nearest-neighbour EIA", unit="chunk", disable=None):
        block = rows[start : start + chunk].to(table.device, torch.float32)  # (n, H)
        # ||a - b||^2 = ||a||^2 - 2ab + ||b||^2; ||a||^2 is the same for every b, so it is left out.
        scores = table_sq.unsqueeze(0) - 2.0 * block @ table.T  # (n, V)
        ids[start : start + chunk] = scores.argmin(-1)
    return ids.reshape(observed.shape[:-1]).to(observed.device)


def position_aware_inversion(observed: torch.Tensor, attention_mask: torch.Tensor, bottom: BottomModel) -> torch.Tensor:
    """Exact nearest-neighbour inversion of a k = 0 bottom, for every family: observed (B, T, H) -> ids (B, T).

    A decoder's k = 0 output is the embedding row itself. An encoder (BERT) adds a position and a token
    type embedding and applies LayerNorm, so the candidates differ per position: for position p they are
    the embedding layer's outputs for every vocabulary token placed at p, and the guess is the nearest one.
    """
    if bottom.split != 0:
        raise ValueError(f"position-aware nearest-neighbour inversion needs a k = 0 bottom, got k = {bottom.split}")
    if observed.dim() != 3 or tuple(attention_mask.shape) != tuple(observed.shape[:2]):
        raise ValueError(
            f"observed must be (B, T, H) and attention_mask (B, T), got {tuple(observed.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    table = bottom.input_embedding_matrix().detach()  # (V, H)
    if bottom.family is not ENCODER:
        return nearest_neighbour_inversion(observed, table)
    guesses = torch.zeros(observed.shape[:2], dtype=torch.long, device=observed.device)
    vocab = torch.arange(table.shape[0], device=table.device).unsqueeze(1)  # (V, 1): every token, alone
    was_training = bottom.training
    bottom.eval()
    try:
        with torch.no_grad():
            for p in tqdm(range(observed.shape[1]), desc="nearest-neighbour EIA", unit="position", disable=None):
                rows = attention_mask[:, p].bool()
                if not rows.any():
                    continue
                # every token at position p, as the embedding layer (positions, token types, LayerNorm) emits it
                candidates = bottom.embeddings(input_ids=vocab, cache_length=p)[:, 0]  # (V, H)
                guesses[rows, p] = nearest_neighbour_inversion(observed[rows, p], candidates).to(guesses.device)
    finally:
        bottom.train(was_training)
    return guesses


def bottom_from_embeddings(bottom: BottomModel, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run bottom on token embeddings x (B, T, H) instead of ids -> hidden states (B, T, H).

    Encoders (BERT, RoBERTa) still add positions and token types and apply their LayerNorm; decoders
    (Llama, ...) use the plain embedding table, so x goes straight into the blocks.
    """
    hidden = bottom.embeddings(inputs_embeds=x) if bottom.family is ENCODER else x  # (B, T, H)
    return run_blocks(bottom.config, bottom.family, bottom.blocks, 0, hidden, attention_mask, bottom.rotary)


def _distance(output: torch.Tensor, observed: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-token distance over real tokens: 1 - cosine, or squared L2."""
    if kind == "cosine":
        per_token = 1.0 - nn.functional.cosine_similarity(output, observed, dim=-1, eps=1e-8)  # (B, T)
    else:
        per_token = ((output - observed) ** 2).sum(-1)  # (B, T)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def optimization_inversion(
    observed: torch.Tensor,
    attention_mask: torch.Tensor,
    bottom: BottomModel,
    *,
    steps: int = 400,
    lr: float = 0.03,
    temperature: float = 0.2,
    distance: str = "cosine",
    seed: int = 0,
    batch_size: int = 8,
    after: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """observed (B, T, H) -> guessed token ids (B, T); padding positions hold meaningless guesses. after: what the
    user applies to the bottom's output before sending (a learned filter the attacker knows), applied to every
    candidate's output too.

    The bottom's weights are not changed: its parameters are frozen (and put in eval mode) for the
    attack, and their requires_grad flags and training mode are restored afterwards.
    """
    if observed.dim() != 3:
        raise ValueError(f"observed must be (B, T, H), got shape {tuple(observed.shape)}")
    if tuple(attention_mask.shape) != tuple(observed.shape[:2]):
        raise ValueError(
            f"attention_mask must be (B, T) = {tuple(observed.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    if observed.shape[-1] != bottom.config.hidden_size:
        raise ValueError(
            f"observed hidden size {observed.shape[-1]} does not match the bottom's "
            f"hidden_size {bottom.config.hidden_size}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite, got {lr!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")

    with frozen(bottom):
        return _invert(
            observed,
            attention_mask,
            bottom,
            steps=steps,
            lr=lr,
            temperature=temperature,
            distance=distance,
            seed=seed,
            batch_size=batch_size,
            after=after,
        )


@contextmanager
def frozen(bottom: BottomModel) -> Iterator[BottomModel]:
    """The attacker's bottom frozen and in eval mode while an attack runs; its requires_grad flags and training
    mode are restored afterwards (the bottom may be a user's trainable one)."""
    params = list(bottom.parameters())
    flags = [p.requires_grad for p in params]
    was_training = bottom.training
    try:
        for p in params:
            p.requires_grad_(False)
        bottom.eval()
        yield bottom
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        bottom.train(was_training)


def _invert(
    observed: torch.Tensor,
    attention_mask: torch.Tensor,
    bottom: BottomModel,
    *,
    steps: int,
    lr: float,
    temperature: float,
    distance: str,
    seed: int,
    batch_size: int,
    after: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    table = bottom.input_embedding_matrix().detach()  # (V, H)
    device, dtype = table.device, table.dtype
    n, length, _ = observed.shape
    generator = torch.Generator().manual_seed(seed)  # CPU generator: the same start on any device
    guesses = torch.empty((n, length), dtype=torch.long)
    starts = range(0, n, batch_size)
    bar = tqdm(total=len(starts) * steps, desc="optimization EIA", unit="step", disable=None)
    with bar:
        for start in starts:
            target = observed[start : start + batch_size].detach().to(device, dtype)  # (b, T, H)
            mask = attention_mask[start : start + batch_size].to(device)  # (b, T)
            init = 0.01 * torch.randn((target.shape[0], length, table.shape[0]), generator=generator)
            logits = nn.Parameter(init.to(device))  # (b, T, V), float32
            optimizer = torch.optim.Adam([logits], lr=lr)
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                soft = torch.softmax(logits / temperature, dim=-1).to(dtype) @ table  # (b, T, H)
                output = bottom_from_embeddings(bottom, soft, mask)
                if after is not None:
                    output = after(output)
                loss = _distance(output.float(), target.float(), mask, distance)
                loss.backward()
                optimizer.step()
                bar.update(1)
            guesses[start : start + batch_size] = logits.detach().argmax(-1).cpu()
    return guesses.to(observed.device)


def token_recovery(
    predicted: torch.Tensor,
    actual: torch.Tensor,
    mask: torch.Tensor,
    special_ids: Collection[int] = (),
    content: torch.Tensor | None = None,
) -> dict[str, float | int]:
    """Fraction of real tokens (mask = 1) guessed exactly, with and without special token ids, and (given a
    content mask, sap_client.audit.content) over content tokens only.

    Returns recovery, recovery_without_special (NaN when every real token is special), tokens and
    tokens_without_special; with content also recovery_content (NaN without content tokens) and
    tokens_content. Empirical privacy is 1 - recovery.
    """
    if predicted.shape != actual.shape or actual.shape != mask.shape:
        raise ValueError(
            f"predicted, actual and mask must have the same shape, got {tuple(predicted.shape)}, "
            f"{tuple(actual.shape)} and {tuple(mask.shape)}"
        )
    if content is not None and content.shape != mask.shape:
        raise ValueError(f"content must have the mask's shape {tuple(mask.shape)}, got {tuple(content.shape)}")
    real = mask.to(torch.bool)
    if not real.any():
        raise ValueError("mask has no real tokens: recovery is undefined")
    hit = (predicted.to(actual.device) == actual) & real
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=actual.dtype, device=actual.device)
    ordinary = real & ~torch.isin(actual, special)
    tokens, ordinary_tokens = int(real.sum()), int(ordinary.sum())
    figures: dict[str, float | int] = {
        "recovery": int(hit.sum()) / tokens,
        "recovery_without_special": int((hit & ordinary).sum()) / ordinary_tokens if ordinary_tokens else math.nan,
        "tokens": tokens,
        "tokens_without_special": ordinary_tokens,
    }
    if content is not None:
        chosen = content.to(actual.device).bool() & real
        count = int(chosen.sum())
        figures.update(recovery_content=int((hit & chosen).sum()) / count if count else math.nan, tokens_content=count)
    return figures


def average_observations(observations: list[torch.Tensor]) -> torch.Tensor:
    """The multi-observation attack: the mean of several noisy copies of the same hidden states.

    With independent noise the residual noise norm falls like 1/sqrt(n); invert the mean afterwards.
    """
    if not observations:
        raise ValueError("observations must hold at least one tensor, got an empty list")
    shapes = {tuple(o.shape) for o in observations}
    if len(shapes) != 1:
        raise ValueError(f"every observation must have the same shape, got {sorted(shapes)}")
    return torch.stack([o.detach() for o in observations]).mean(0)
