"""The user's side of d_chi-privacy (the mechanism itself is sap_common/dchi.py): the Privatizer that noises every
real token vector it sends, keyed by the run's secret, and the run's noise settings."""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, field

import torch

from sap_common.dchi import check_eta, dchi_from_draws


@dataclass(frozen=True)
class NoiseConfig:
    """The user's noise settings (what `--eta`, `--noise-ratio`, `--cti*` and `--fresh-noise` set)."""

    eta: float | None = field(default=None, metadata={"help": "base eta; None with no noise_ratio = no noise"})
    noise_ratio: float | None = field(default=None, metadata={"help": "set eta so E||n|| = R * mean||h||"})
    cti: bool = field(default=False, metadata={"help": "per-token eta from class statistics (CTI)"})
    cti_mode: str = field(default="scale", metadata={"help": "scale or exempt"})
    cti_floor: float = field(default=0.6, metadata={"help": "scale mode: eta = max(UI, floor) * eta"})
    cti_top: float = field(default=0.1, metadata={"help": "exempt mode: fraction of tokens per class exempted"})
    cti_rows: str = field(
        default="label",
        metadata={
            "help": "label: a training text's eta comes from its class row (DESIGN); max: every text, training too, "
            "uses the max over classes, so the noise does not depend on the label"
        },
    )
    fresh_noise: bool = field(default=False, metadata={"help": "new noise every epoch instead of once"})
    rescale_noised: bool = field(
        default=False,
        metadata={
            "help": "send every noised vector rescaled to the mean hidden-state norm (post-processing of the d_chi "
            "output): the top's attention is not drawn to the longer noisy vectors"
        },
    )

    def __post_init__(self) -> None:
        if self.eta is not None and self.noise_ratio is not None:
            raise ValueError("give either eta or noise_ratio, not both")
        if self.eta is not None:
            check_eta(self.eta, ())
        if self.noise_ratio is not None and not (math.isfinite(self.noise_ratio) and self.noise_ratio > 0):
            raise ValueError(f"noise ratio must be positive and finite, got {self.noise_ratio!r}")
        if self.cti and not self.enabled:
            raise ValueError("CTI shapes the noise: it needs --eta or --noise-ratio")
        from sap_client.cti import CTI_MODES

        if self.cti_mode not in CTI_MODES:
            raise ValueError(f"cti_mode must be one of {CTI_MODES}, got {self.cti_mode!r}")
        if not (math.isfinite(self.cti_floor) and self.cti_floor > 0):
            raise ValueError(f"cti floor must be positive and finite, got {self.cti_floor!r}")
        if not 0 < self.cti_top <= 1:
            raise ValueError(f"cti top fraction must be in (0, 1], got {self.cti_top!r}")
        if self.cti_rows not in CTI_ROWS:
            raise ValueError(f"cti_rows must be one of {CTI_ROWS}, got {self.cti_rows!r}")
        if self.rescale_noised and not self.enabled:
            raise ValueError("rescaling the noised vectors needs noise: --eta or --noise-ratio")

    @property
    def enabled(self) -> bool:
        return self.eta is not None or self.noise_ratio is not None


CTI_ROWS = ("label", "max")


class NoiseTally:
    """Noise/signal measurements of a batch prepared ahead of time, counted by commit() when it is sent (so the
    running sums at any step do not depend on how far ahead the preparation ran)."""

    def __init__(self) -> None:
        self._entries: list[tuple[Privatizer, tuple[float, float, int]]] = []

    def record(self, owner: Privatizer, measured: tuple[float, float, int]) -> None:
        self._entries.append((owner, measured))

    def commit(self) -> None:
        entries, self._entries = self._entries, []
        for owner, measured in entries:
            owner.add([measured])


class Privatizer:
    """Prepares what leaves the user: padding zeroed, every real token vector perturbed with d_chi noise.

    Noise is keyed: each example's draw comes from a generator seeded with HMAC(key, example key),
    where the key is a secret that never leaves the user. The same text therefore always gets the
    same noise (a provider that sees it twice learns nothing new), and a run can be replayed.

    With rescale_norm, every noised vector h + n is sent rescaled to that norm (the mean hidden-state
    norm): post-processing of the d_chi output, so its guarantee holds for what is sent. Without it, the
    noisy vectors are about sqrt(1 + R^2) times longer than clean ones and draw the top's attention away
    from the clean (CTI-exempt) ones (benchmarks/cti_attention.py). Exempt vectors and padding are left as
    they are; the noise/signal figures are the d_chi noise's, before rescaling.
    """

    def __init__(
        self,
        eta: float | None,
        *,
        key: bytes,
        eta_table: torch.Tensor | None = None,
        label_rows: bool = True,
        rescale_norm: float | None = None,
    ):
        if eta is not None:
            check_eta(eta, ())
        if eta_table is not None and eta is None:
            raise ValueError("an eta table (CTI) needs a base eta")
        if rescale_norm is not None:
            if eta is None:
                raise ValueError("rescaling the noised vectors needs a base eta")
            if isinstance(rescale_norm, bool) or not (math.isfinite(rescale_norm) and rescale_norm > 0):
                raise ValueError(f"rescale norm must be positive and finite, got {rescale_norm!r}")
        self.rescale_norm = None if rescale_norm is None else float(rescale_norm)
        self.eta = eta
        self.key = key
        self.eta_table = eta_table  # (C + 1, V); +inf marks tokens exempt from noise
        # CTI: a labelled (training) text uses its class row; False = the unlabeled (max) row for every text
        self.label_rows = label_rows
        self.noise_norm_sum = 0.0
        self.hidden_norm_sum = 0.0
        self.tokens = 0

    @property
    def noise_to_signal(self) -> float:
        """Measured mean ||noise|| / mean ||hidden|| over every real token sent so far."""
        return self.noise_norm_sum / self.hidden_norm_sum if self.hidden_norm_sum > 0 else 0.0

    def add(self, tally: list[tuple[float, float, int]]) -> None:
        """Count measured examples: (||noise|| sum, ||hidden|| sum, real tokens) each."""
        for noise_norm, hidden_norm, tokens in tally:
            self.noise_norm_sum += noise_norm
            self.hidden_norm_sum += hidden_norm
            self.tokens += tokens

    def state(self) -> dict:
        """The running sums (for a client checkpoint); load_state puts them back."""
        return {"noise_norm_sum": self.noise_norm_sum, "hidden_norm_sum": self.hidden_norm_sum, "tokens": self.tokens}

    def load_state(self, state: dict) -> None:
        self.noise_norm_sum = float(state["noise_norm_sum"])
        self.hidden_norm_sum = float(state["hidden_norm_sum"])
        self.tokens = int(state["tokens"])

    def with_key(self, key: bytes, *, label_rows: bool | None = None) -> Privatizer:
        """The same mechanism (eta, CTI table, rescaling) under another noise key, with fresh noise/signal sums: what
        a simulation of this user's sends draws from (the attacker's public text, the learned filter's training)."""
        return Privatizer(
            self.eta,
            key=key,
            eta_table=self.eta_table,
            label_rows=self.label_rows if label_rows is None else label_rows,
            rescale_norm=self.rescale_norm,
        )

    def _seed(self, example_key: bytes) -> int:
        return int.from_bytes(hmac.new(self.key, example_key, hashlib.sha256).digest()[:8], "little")

    def __call__(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None,
        example_keys: list[bytes],
        tally: NoiseTally | None = None,
    ) -> torch.Tensor:
        """hidden (B, T, H) -> the tensor to send, (B, T, H); padding rows are zeros.

        The noise/signal sums count each example at once, or, with a tally, when tally.commit() runs."""
        mask = attention_mask.to(torch.bool)
        sent = hidden.detach().clone() * mask.unsqueeze(-1).to(hidden.dtype)
        if self.eta is None:
            return sent
        if self.eta_table is not None:
            from sap_client.cti import token_eta

            etas = token_eta(self.eta_table, input_ids, labels if self.label_rows else None)  # (B, T)
        else:
            etas = torch.full(mask.shape, float(self.eta), dtype=torch.float64)
        # Each example's draws come from its own keyed generator, in the order sample_dchi_noise draws them
        # (its Gaussians, then its uniforms); the rest runs once over the batch's real tokens (row-major:
        # example by example), which gives the same values as one sample_dchi_noise call per example.
        lengths = mask.sum(-1).tolist()
        size = hidden.shape[-1]
        gaussians, uniforms = [], []
        for example_key, length in zip(example_keys, lengths, strict=True):
            generator = torch.Generator().manual_seed(self._seed(example_key))
            gaussians.append(torch.randn((length, size), generator=generator, dtype=torch.float64))
            uniforms.append(torch.rand((length, size), generator=generator, dtype=torch.float64))
        real_eta = etas[mask]  # (N_real,)
        exempt = torch.isinf(real_eta)
        noise = dchi_from_draws(
            torch.cat(gaussians),
            torch.cat(uniforms),
            check_eta(torch.where(exempt, 1.0, real_eta), real_eta.shape),
            hidden.dtype,
        )
        noise[exempt] = 0.0
        real_hidden = hidden.detach()[mask]
        for noise_norms, hidden_norms, length in zip(
            noise.norm(dim=-1).split(lengths), real_hidden.norm(dim=-1).split(lengths), lengths
        ):
            measured = (noise_norms.sum().item(), hidden_norms.sum().item(), length)
            if tally is None:
                self.add([measured])
            else:
                tally.record(self, measured)
        noisy = real_hidden + noise  # (N_real, H)
        if self.rescale_norm is not None:
            scale = self.rescale_norm / noisy.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            noisy = torch.where(exempt.unsqueeze(-1), noisy, noisy * scale)
        sent[mask] = noisy
        return sent
