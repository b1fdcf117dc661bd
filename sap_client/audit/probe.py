"""Ridge-regression probes from a received hidden state to its token: the sequential attack's shortlist.

Fitted on the provider's public text as it would arrive (under the same noise), they map a received vector to
scores over the vocabulary and to the input embedding they expect at that position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TokenProbe:
    """Two ridge-regression probes from a received vector, fitted together on public text under the noise:
    token scores ([h, 1] @ onehot) and a predicted input embedding ([h, 1] @ embedding), whose cosine
    matches against the embedding matrix reach tokens the public text never showed."""

    onehot: torch.Tensor  # (H + 1, V)
    embedding: torch.Tensor  # (H + 1, H)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> token scores (..., V)."""
        hidden = hidden.float()
        return hidden @ self.onehot[:-1] + self.onehot[-1]

    def predicted_embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> the input embedding the probe expects at that position (..., H)."""
        hidden = hidden.float()
        return hidden @ self.embedding[:-1] + self.embedding[-1]


def fit_token_probe(
    hidden: torch.Tensor, token_ids: torch.Tensor, table: torch.Tensor, *, ridge: float = 1e-2
) -> TokenProbe:
    """Fit h -> one-hot(token) and h -> E[token] by ridge regression: hidden (N, H) vectors of public text (as
    the provider would receive them: under the same noise), token_ids (N,), table the embedding matrix (V, H).

    ridge is relative: the penalty is ridge x the mean diagonal of X^T X, so it does not depend on the scale
    of the hidden states. Tokens that never occur get a zero one-hot column (the embedding probe and the
    gradient shortlist still reach them).
    """
    vocab_size = table.shape[0]
    if hidden.dim() != 2 or token_ids.shape != hidden.shape[:1] or hidden.shape[0] < 1:
        raise ValueError(
            f"hidden must be (N, H) and token_ids (N,) with N >= 1, got {tuple(hidden.shape)} and "
            f"{tuple(token_ids.shape)}"
        )
    if not (math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be positive and finite, got {ridge!r}")
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size:
        raise ValueError(f"token_ids must lie in 0..{vocab_size - 1}")
    x = torch.cat([hidden.double(), torch.ones(hidden.shape[0], 1, dtype=torch.float64)], dim=1)  # (N, H + 1)
    gram = x.T @ x  # (H + 1, H + 1)
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    onehot = torch.zeros(x.shape[1], vocab_size, dtype=torch.float64)  # X^T Y for a one-hot Y, (H + 1, V)
    onehot.index_add_(1, token_ids.long(), x.T)
    embedding = x.T @ table.detach().double()[token_ids.long()]  # (H + 1, H)
    solved = torch.linalg.solve(gram, torch.cat([onehot, embedding], dim=1)).float()
    return TokenProbe(solved[:, :vocab_size].contiguous(), solved[:, vocab_size:].contiguous())
