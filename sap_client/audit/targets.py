"""Target-token inference for generative fine-tuning: read the tokens the user's model learns to write (its
completions) back from the gradients the provider receives.

The user returns g_t = dL/dh_t for every token, h_t the output of the provider's last block. Without a user-kept
block, h_t goes through the final norm (RMSNorm: gamma * h / rms(h)) and the tied output layer E (V, H), both
pretrained and known to the provider, so g_t = J_t^T diag(gamma) E^T (p_t - onehot(y_{t+1})) / n, with J_t the
norm's Jacobian (1/rms(h_t) times a projection that removes the h_t direction). The target y_{t+1} carries the one
negative coefficient: scoring every vocabulary token by <E_v, gamma * g_t> and taking the lowest reads it wherever
E's rows are far enough apart. The score ignores J_t (the provider could compute it from h_t, which it computed
itself, so the full inversion is stronger still): this reader is a lower bound on what leaks. A user-kept tail
bends g_t by its own Jacobian, but its residual path keeps the head's term.
"""

from __future__ import annotations

import torch


def read_targets(gradients: torch.Tensor, embedding: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """(N, H) gradients of the last block's output -> (N,) guessed next tokens: for each row, the vocabulary token
    (a row of the (V, H) tied embedding table) whose score <E_v, gamma * g> is lowest."""
    if gradients.dim() != 2 or embedding.dim() != 2 or gradients.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"gradients (N, H) and embedding (V, H) must share H, got {tuple(gradients.shape)} and "
            f"{tuple(embedding.shape)}"
        )
    rows = gradients.double()
    if norm_weight is not None:
        rows = rows * norm_weight.double()
    guesses = []
    table = embedding.double()
    for start in range(0, len(rows), 1024):  # (chunk, V) scores: bounded memory for a large vocabulary
        guesses.append((rows[start : start + 1024] @ table.T).argmin(dim=1))
    return torch.cat(guesses) if guesses else torch.empty(0, dtype=torch.long)


def next_token_targets(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """targets (B, T) (a token id where it is a loss target, else -100) and the (B, T) mask -> (N_real,) in packed
    order: for row t of a packed gradient, the target its loss term predicts (token t + 1), or -100."""
    following = torch.full_like(targets, -100)
    following[:, :-1] = targets[:, 1:]
    return following[mask.bool()]
