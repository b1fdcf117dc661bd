"""The d_chi-privacy mechanism for hidden states (Feyisetan et al. 2020; SAP, arXiv 2312.15603), torch only: shared
by the user, who noises what it sends (sap_client/privacy.py), and the provider, which trains adapters robust to
it (sap_server/robust.py).

Density p(n) ∝ exp(-eta * ||n||_2) in d dimensions. Sampling: a uniform direction u = g / ||g|| with
g ~ N(0, I_d), times a radius r ~ Gamma(shape=d, rate=eta), so E||n|| = d / eta. A smaller eta means
more noise and more privacy. Since d is an integer, Gamma(d, 1) is the Erlang distribution: the sum of
d independent Exp(1) draws, -sum(log U_i); that lets every draw come from one explicit
torch.Generator (torch's Gamma sampler takes none).
"""

from __future__ import annotations

import math

import torch


def check_eta(eta: float | torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
    if isinstance(eta, torch.Tensor):
        eta_t = eta.detach().to(torch.float64)
        bad = ~torch.isfinite(eta_t) | (eta_t <= 0)
        if bad.any():
            raise ValueError(f"eta must be positive and finite everywhere; got {eta_t[bad].flatten()[0].item()!r}")
        try:
            fits = torch.broadcast_shapes(tuple(eta_t.shape), batch_shape) == torch.Size(batch_shape)
        except RuntimeError:
            fits = False
        if not fits:  # broadcasting *with* is not enough: the result must keep the batch shape
            raise ValueError(f"eta of shape {tuple(eta_t.shape)} does not broadcast to {batch_shape}")
        return eta_t
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise ValueError(f"eta must be a positive float or a tensor, got {eta!r}")
    if not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"eta must be positive and finite, got {eta!r}")
    return torch.tensor(float(eta), dtype=torch.float64)


def sample_dchi_noise(
    shape: tuple[int, ...],
    eta: float | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One independent d_chi draw per vector along the last dimension (d = shape[-1]).

    eta is a positive float, or a tensor broadcastable to shape[:-1] (one eta per token, for CTI).
    """
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] < 1 or any(s < 0 for s in shape):
        raise ValueError(f"shape must end in a dimension d >= 1 and have no negative sizes, got {shape}")
    eta_t = check_eta(eta, shape[:-1])
    gaussians = torch.randn(shape, generator=generator, dtype=torch.float64)
    uniforms = torch.rand(shape, generator=generator, dtype=torch.float64)
    return dchi_from_draws(gaussians, uniforms, eta_t, dtype)


def dchi_from_draws(
    gaussians: torch.Tensor, uniforms: torch.Tensor, eta: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """d_chi noise from its raw draws (float64, (..., d) each; eta broadcastable to (...,)): a uniform
    direction (normalized Gaussians) times an Erlang(d, eta) norm."""
    direction = gaussians / gaussians.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    # Erlang(d, 1) = -sum of d log-uniforms; 1 - U lies in (0, 1], so the log is finite.
    radius = -torch.log1p(-uniforms).sum(dim=-1) / eta  # (...,) broadcast against eta
    return (direction * radius.unsqueeze(-1)).to(dtype)


def eta_for_noise_ratio(ratio: float, mean_hidden_norm: float, hidden_size: int) -> float:
    """The eta whose expected noise norm d/eta is `ratio` times the mean hidden-state norm."""
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"noise ratio must be positive and finite, got {ratio!r}")
    if not math.isfinite(mean_hidden_norm) or mean_hidden_norm <= 0:
        raise ValueError(f"mean hidden-state norm must be positive, got {mean_hidden_norm!r}")
    return hidden_size / (ratio * mean_hidden_norm)
