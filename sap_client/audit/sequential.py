"""Sequential inversion of a causal decoder's hidden states: MAP decoding under the noise, left to right.

In a causal model the hidden state at position t depends only on tokens 0..t. Knowing the prefix, the
provider (white-box: it has the pretrained bottom) can run prefix + v through the bottom for any candidate
token v and compare the output at t with what it received. Under d_chi noise, whose density is
proportional to exp(-eta ||n||), the most likely v is the one whose output is nearest in L2, and the log
likelihood of a whole sequence is -eta times the sum of those distances: a beam over positions keeps the
best few prefixes so that an early mistake can still be undone.

Scoring all V tokens at every position would cost V forwards; a shortlist picks the candidates:
- a linear probe h -> token (ridge regression on hidden states of public text, under the same noise);
- the rows of the embedding matrix most similar (cosine) to the received vector;
- a gradient signal: the first-order change of the distance when the position's input embedding moves from
  the best candidate so far towards each vocabulary row (as HotFlip and GCG rank token swaps).
Each candidate costs one token through the bottom: the prefix's keys and values are kept (a KV cache) and
all candidates of one prefix are queries of one block call, each attending to the prefix and to itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sap_client.audit.inversion import frozen
from sap_client.audit.probe import TokenProbe
from sap_common.models.families import DECODER
from sap_common.models.split import BottomModel

# layer index -> (keys, values), each (M, kv heads, t, head dim): the K/V of M prefixes of length t
PrefixKV = dict[int, tuple[torch.Tensor, torch.Tensor]]


class _PrefixCache:
    """Quacks like a transformers Cache for one block call: attention sees the prefix's keys and values followed
    by the new ones; the new ones are kept for the caller (no prefix is modified)."""

    def __init__(self, prefix: PrefixKV | None):
        self.prefix = prefix or {}
        self.new: PrefixKV = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new[layer_idx] = (key, value)
        if layer_idx not in self.prefix:
            return key, value
        old_key, old_value = self.prefix[layer_idx]
        return torch.cat([old_key, key], dim=2), torch.cat([old_value, value], dim=2)


def _prefix_length(prefix: PrefixKV | None) -> int:
    return next(iter(prefix.values()))[0].shape[2] if prefix else 0


def extend(
    bottom: BottomModel, prefix: PrefixKV | None, x: torch.Tensor, position: int
) -> tuple[torch.Tensor, PrefixKV]:
    """The bottom's output at `position` for C candidate input embeddings after each of M prefixes.

    prefix: the K/V of M prefixes of length `position` (None when position = 0); x (M, C, H): candidate
    token embeddings. Returns outputs (M, C, H) and the candidates' K/V, (M, kv heads, C, head dim) per layer.
    The C candidates of a prefix are queries of one call: each attends to the prefix and to itself only.
    """
    m, c, _ = x.shape
    t = _prefix_length(prefix)
    if t != position and len(bottom.blocks):
        raise ValueError(f"prefix of length {t} for position {position}")
    position_ids = torch.full((m, c), position, dtype=torch.long, device=x.device)
    rotary = bottom.rotary(x, position_ids) if bottom.rotary is not None else None
    allowed = torch.zeros(c, t + c, dtype=torch.bool, device=x.device)
    allowed[:, :t] = True
    allowed[:, t:] = torch.eye(c, dtype=torch.bool, device=x.device)
    mask = torch.zeros(c, t + c, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
    mask = mask.expand(m, 1, c, t + c)  # (M, 1, C, t + C), additive
    cache = _PrefixCache(prefix)
    hidden = x
    for block in bottom.blocks:
        hidden = block(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary, cache=cache)
    return hidden, cache.new


@dataclass(frozen=True)
class SequentialConfig:
    """Shortlist sizes per source and the beam width (parameters of `sap-client audit --attack sequential`)."""

    probe_candidates: int = 64  # top tokens of the one-hot probe
    embedding_candidates: int = 64  # top cosine matches of the (probe-predicted) input embedding against E
    gradient_candidates: int = 32  # top first-order improvements of the distance
    beam: int = 4
    batch_size: int = 16  # examples decoded together

    def __post_init__(self) -> None:
        for name in ("probe_candidates", "embedding_candidates", "gradient_candidates"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.embedding_candidates + self.probe_candidates < 1:
            raise ValueError("the shortlist needs embedding or probe candidates (both are 0)")
        if self.beam < 1 or self.batch_size < 1:
            raise ValueError(f"beam and batch_size must be >= 1, got {self.beam} and {self.batch_size}")

    @property
    def shortlist(self) -> int:
        return self.probe_candidates + self.embedding_candidates + self.gradient_candidates


@torch.no_grad()
def first_position_outputs(bottom: BottomModel, *, chunk: int = 4096) -> torch.Tensor:
    """The bottom's output at position 0 for every vocabulary token (V, H): it depends on that token alone,
    so one pass over the vocabulary makes position 0 an exact search (SmolLM2 k = 6: about 45 s on 2 cores)."""
    table = bottom.input_embedding_matrix().detach().float()
    with frozen(bottom):
        rows = [
            extend(bottom, None, table[start : start + chunk].unsqueeze(0), 0)[0][0]
            for start in tqdm(range(0, table.shape[0], chunk), desc="position-0 outputs", unit="chunk", disable=None)
        ]
    return torch.cat(rows)


def sequential_inversion(
    observed: torch.Tensor,
    attention_mask: torch.Tensor,
    bottom: BottomModel,
    *,
    probe: TokenProbe | None = None,
    first_outputs: torch.Tensor | None = None,
    config: SequentialConfig = SequentialConfig(),
) -> torch.Tensor:
    """observed (B, T, H) -> guessed token ids (B, T) for a causal decoder's bottom (right padding).

    probe: fitted on public text (fit_token_probe); without it the embedding similarity compares the received
    vector itself with E and takes the probe's share. first_outputs: first_position_outputs(bottom), computed
    here when not given. The bottom's weights are not changed (frozen and in eval mode while the attack runs).
    """
    if bottom.family is not DECODER:
        raise ValueError(
            "sequential inversion needs a causal decoder's bottom (Llama, Qwen, Mistral); an encoder's "
            "hidden states depend on the whole text"
        )
    if observed.dim() != 3 or tuple(attention_mask.shape) != tuple(observed.shape[:2]):
        raise ValueError(
            f"observed must be (B, T, H) and attention_mask (B, T), got {tuple(observed.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if observed.shape[-1] != bottom.config.hidden_size:
        raise ValueError(
            f"observed hidden size {observed.shape[-1]} does not match the bottom's hidden_size "
            f"{bottom.config.hidden_size}"
        )
    with frozen(bottom):
        if first_outputs is None:
            first_outputs = first_position_outputs(bottom)
        lengths = attention_mask.sum(-1).tolist()
        guesses = torch.zeros(observed.shape[:2], dtype=torch.long)
        bar = tqdm(total=int(sum(lengths)), desc="sequential EIA", unit="token", disable=None)
        with bar:
            for start in range(0, observed.shape[0], config.batch_size):
                chunk = slice(start, start + config.batch_size)
                decoded = _Decoder(bottom, probe, first_outputs, config).run(
                    observed[chunk].float(), lengths[chunk], bar
                )
                for row, ids in enumerate(decoded):
                    guesses[start + row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return guesses.to(observed.device)


def _mask_repeats(candidates: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """distances with +inf wherever a candidate repeats an earlier one of its row."""
    order = candidates.argsort(dim=1, stable=True)
    ordered = candidates.gather(1, order)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    repeats = torch.zeros_like(repeat).scatter(1, order, repeat)
    return distances.masked_fill(repeats, math.inf)


def _gather_prefix(prefix: PrefixKV | None, new: PrefixKV, parents: torch.Tensor, picks: torch.Tensor) -> PrefixKV:
    """The K/V of the chosen hypotheses: parent prefix followed by the chosen candidate's own K/V."""
    out = {}
    for layer, (key, value) in new.items():
        index = picks.view(-1, 1, 1, 1).expand(-1, key.shape[1], 1, key.shape[3])
        new_key, new_value = key[parents].gather(2, index), value[parents].gather(2, index)
        if prefix:
            old_key, old_value = prefix[layer]
            new_key = torch.cat([old_key[parents], new_key], dim=2)
            new_value = torch.cat([old_value[parents], new_value], dim=2)
        out[layer] = (new_key, new_value)
    return out


def _concat_kv(first: PrefixKV, second: PrefixKV) -> PrefixKV:
    return {
        layer: (torch.cat([k, second[layer][0]], dim=2), torch.cat([v, second[layer][1]], dim=2))
        for layer, (k, v) in first.items()
    }


class _Decoder:
    """Beam decoding of a chunk of examples. A hypothesis is (example, tokens so far, summed L2 distance, the
    prefix's K/V); at each position every hypothesis scores its shortlist and each example keeps its best."""

    def __init__(
        self, bottom: BottomModel, probe: TokenProbe | None, first_outputs: torch.Tensor, config: SequentialConfig
    ):
        self.bottom, self.probe, self.first_outputs, self.config = bottom, probe, first_outputs.float(), config
        self.table = bottom.input_embedding_matrix().detach().float()  # (V, H)
        self.unit_table = torch.nn.functional.normalize(self.table, dim=-1)

    def shortlist(self, received: torch.Tensor) -> torch.Tensor:
        """received (M, H) -> candidate ids (M, C): the probe's top tokens and the embedding similarity's."""
        config, vocab = self.config, self.table.shape[0]
        n_probe = min(config.probe_candidates, vocab) if self.probe is not None else 0
        n_embed = min(config.embedding_candidates + (config.probe_candidates if self.probe is None else 0), vocab)
        parts = []
        if n_probe and self.probe is not None:
            parts.append(self.probe.scores(received).topk(n_probe, dim=-1).indices)
        if n_embed:
            query = self.probe.predicted_embedding(received) if self.probe is not None else received
            cosine = torch.nn.functional.normalize(query, dim=-1) @ self.unit_table.T  # (M, V)
            parts.append(cosine.topk(n_embed, dim=-1).indices)
        return torch.cat(parts, dim=1)

    def gradient_candidates(
        self,
        prefix: PrefixKV | None,
        origin: torch.Tensor,
        received: torch.Tensor,
        position: int,
        exclude: torch.Tensor,
        count: int,
    ) -> torch.Tensor:
        """The tokens v whose move origin -> E_v decreases ||B(prefix, x)_t - received|| most to first order."""
        x = origin.detach().clone().unsqueeze(1).requires_grad_(True)  # (M, 1, H)
        with torch.enable_grad():
            output, _ = extend(self.bottom, prefix, x, position)
            (gradient,) = torch.autograd.grad((output[:, 0] - received).norm(dim=-1).sum(), x)
        change = gradient[:, 0] @ self.table.T  # (M, V): (E_v - x) . g, up to the per-row constant x . g
        change.scatter_(1, exclude, math.inf)
        return change.topk(min(count, self.table.shape[0]), dim=-1, largest=False).indices

    @torch.no_grad()
    def score(
        self, prefix: PrefixKV | None, candidates: torch.Tensor, received: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, PrefixKV]:
        """L2 distances (M, C) of the candidates' outputs to the received vectors, and the candidates' K/V."""
        output, new = extend(self.bottom, prefix, self.table[candidates], position)
        return (output - received.unsqueeze(1)).norm(dim=-1).double(), new

    def candidates_at(
        self, prefix: PrefixKV | None, received: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor, PrefixKV]:
        """(candidates (M, C), their distances (M, C), their K/V) at one position."""
        if position == 0:  # exact: the nearest of every token's position-0 output
            exact = torch.cdist(received, self.first_outputs)  # (M, V)
            candidates = exact.topk(min(self.config.shortlist, exact.shape[1]), dim=-1, largest=False).indices
            distances, new = self.score(prefix, candidates, received, position)
            return candidates, distances, new
        candidates = self.shortlist(received)
        distances, new = self.score(prefix, candidates, received, position)
        distances = _mask_repeats(candidates, distances)
        origins = [self.table[candidates.gather(1, distances.argmin(1, keepdim=True)).squeeze(1)]]  # the best so far
        if self.probe is not None:
            origins.append(self.probe.predicted_embedding(received))  # and where the probe puts the input
        count = self.config.gradient_candidates
        for i, origin in enumerate(origins):
            share = count // len(origins) + (1 if i < count % len(origins) else 0)
            if not share:
                continue
            extra = self.gradient_candidates(prefix, origin, received, position, candidates, share)
            extra_distances, extra_new = self.score(prefix, extra, received, position)
            candidates = torch.cat([candidates, extra], dim=1)
            distances = _mask_repeats(candidates, torch.cat([distances, extra_distances], dim=1))
            new = _concat_kv(new, extra_new) if new else new
        return candidates, distances, new

    def run(self, observed: torch.Tensor, lengths: list[int], bar) -> list[list[int]]:
        """observed (N, T, H), the examples' real lengths -> decoded token ids per example."""
        n = observed.shape[0]
        example = torch.arange(n)  # (M,): the example each hypothesis decodes
        tokens = torch.zeros(n, 0, dtype=torch.long)  # (M, t)
        score = torch.zeros(n, dtype=torch.float64)  # (M,): the sum of L2 distances so far
        prefix: PrefixKV | None = None
        result: list[list[int]] = [[] for _ in range(n)]
        length_of = torch.tensor(lengths)
        for t in range(max(lengths, default=0)):
            done = length_of[example] <= t
            if done.any():
                _keep_best(result, example[done], tokens[done], score[done])
                keep = ~done
                example, tokens, score = example[keep], tokens[keep], score[keep]
                prefix = {layer: (k[keep], v[keep]) for layer, (k, v) in prefix.items()} if prefix else prefix
            received = observed[example, t]  # (M, H)
            candidates, distances, new = self.candidates_at(prefix, received, t)
            parents, picks = _select(example, score.unsqueeze(1) + distances, self.config.beam)
            example = example[parents]
            score = score[parents] + distances[parents, picks]
            tokens = torch.cat([tokens[parents], candidates[parents, picks].unsqueeze(1)], dim=1)
            prefix = _gather_prefix(prefix, new, parents, picks) if new else None
            bar.update(int((length_of > t).sum()))
        _keep_best(result, example, tokens, score)
        return result


def _select(example: torch.Tensor, totals: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each example, the `beam` best (hypothesis, candidate) pairs by total score: (parents, picks)."""
    parents, picks = [], []
    width = totals.shape[1]
    for e in example.unique().tolist():
        rows = (example == e).nonzero().squeeze(1)  # this example's hypotheses
        flat = totals[rows].reshape(-1)
        finite = int(torch.isfinite(flat).sum())
        best = flat.topk(min(beam, max(finite, 1)), largest=False).indices
        parents.append(rows[best // width])
        picks.append(best % width)
    return torch.cat(parents), torch.cat(picks)


def _keep_best(result: list[list[int]], example: torch.Tensor, tokens: torch.Tensor, score: torch.Tensor) -> None:
    for e in example.unique().tolist():
        rows = (example == e).nonzero().squeeze(1)
        result[e] = tokens[rows[score[rows].argmin()]].tolist()
