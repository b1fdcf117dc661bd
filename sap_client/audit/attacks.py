"""The curious provider as one object: its copy of the pretrained bottom, its public text, the mechanism it
simulates, and every inversion attack it can run on what it received (nn, optimization, sequential, learned).

`auto` runs every attack that applies and the audit reports the strongest: a privacy figure is 1 - the
success of the best attack we can run, never of a chosen weak one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sap_client.audit.inversion import nearest_neighbour_inversion, optimization_inversion, position_aware_inversion
from sap_client.audit.learned import LearnedConfig, NoiseFn, train_inverter
from sap_client.audit.probe import TokenProbe, fit_token_probe
from sap_client.audit.sequential import SequentialConfig, first_position_outputs, sequential_inversion
from sap_client.privacy import Privatizer
from sap_common.models.families import DECODER
from sap_common.models.split import BottomModel

if TYPE_CHECKING:
    from sap_client.filter import LearnedFilter

ATTACKS = ("nn", "optimization", "sequential", "learned")
MIN_PUBLIC = 16  # fewer public texts than this: no probe and no learned inverter


@dataclass
class AttackConfig:
    attack: str = field(
        default="auto",
        metadata={"help": "auto (every attack that applies, the strongest reported) or one of " + ", ".join(ATTACKS)},
    )
    steps: int = 400  # optimization attack
    lr: float = 0.03
    temperature: float = 0.2
    distance: str = "cosine"
    seed: int = 0
    observations: tuple[int, ...] = (1,)
    # noisy copies of each example the provider really holds (a --fresh-noise run: one per epoch); the audit's
    # figure is the one with that many averaged, so it is added to observations
    copies: int = 1
    sequential: SequentialConfig = field(default_factory=SequentialConfig)
    learned: LearnedConfig = field(default_factory=LearnedConfig)

    def __post_init__(self) -> None:
        if self.attack not in ("auto", *ATTACKS):
            raise ValueError(f"attack must be auto or one of {', '.join(ATTACKS)}, got {self.attack!r}")
        if self.steps < 1 or not self.lr > 0 or not self.temperature > 0:
            raise ValueError(
                f"steps, lr and temperature must be positive, got {self.steps}, {self.lr}, {self.temperature}"
            )
        if not self.observations or min(self.observations) < 1:
            raise ValueError(f"observations must be counts >= 1, got {self.observations}")
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")
        if self.copies not in self.observations:
            self.observations = tuple(sorted({*self.observations, self.copies}))


def undo_rescaling(observed: torch.Tensor, privatizer: Privatizer | None) -> torch.Tensor:
    """The attacker's first move against --rescale-noised: give every rescaled vector back the length h + n
    would have had, so that the attacks score candidates as they would on unscaled noisy vectors.

    A rescaled vector is recognisable (its norm is the one norm c every noised vector has); h and n are nearly
    orthogonal in high dimensions and ||n|| concentrates, so ||h + n|| is about sqrt(c^2 + E||n||^2), with
    E||n||^2 = d (d + 1) / eta^2 (a Gamma(d, eta) radius; the base eta: with CTI's scale mode the important
    tokens' is larger). The nearest-neighbour attack (L2) needs this: fed the rescaled vectors as they are,
    it weighs the candidates' norms too heavily and understates the leak (tiny Llama k = 0, R 2.5: 17% of
    tokens against 42% after this); the optimization attack's cosine distance does not depend on it."""
    norm = privatizer.rescale_norm if privatizer is not None else None
    if norm is None or privatizer is None or privatizer.eta is None:
        return observed
    d = observed.shape[-1]
    length = (norm**2 + d * (d + 1) / privatizer.eta**2) ** 0.5
    rescaled = (observed.norm(dim=-1, keepdim=True) - norm).abs() <= 1e-3 * norm  # (..., 1)
    return torch.where(rescaled, observed * (length / norm), observed)


def simulated_mechanism(privatizer: Privatizer | None, filter_: LearnedFilter | None = None) -> NoiseFn:
    """What the attacker applies to its public text: the user's mechanism with the user's settings (eta, CTI
    table, rescaling, a learned filter's weights: the attacker is taken to know them), an independent noise key,
    then its own undoing of the rescaling. Unlabelled public text takes CTI's unlabelled (max) rows. Every (text,
    epoch) gets its own draw."""

    def perturb(hidden: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor, epoch: int) -> torch.Tensor:
        if filter_ is not None:
            with torch.no_grad():
                hidden = filter_(hidden)
        if privatizer is None or privatizer.eta is None:
            return hidden * mask.unsqueeze(-1).to(hidden.dtype)
        twin = privatizer.with_key(f"attacker-epoch-{epoch}".encode(), label_rows=False)
        keys = [row[row_mask.bool()].numpy().tobytes() for row, row_mask in zip(input_ids, mask)]
        return undo_rescaling(twin(hidden, mask, input_ids, None, keys), privatizer)

    return perturb


class Attacker:
    """The provider's attacks on received hidden states (B, T, H). public: batches of its own text through its
    bottom, [(clean hidden (B, T, H), mask (B, T), ids (B, T))], never the victim's; the probe, the position-0
    table and the learned inverter are built from them on first use."""

    def __init__(
        self,
        bottom: BottomModel,
        config: AttackConfig,
        *,
        perturb: NoiseFn,
        public: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
        cache: dict | None = None,
        mechanism: str | None = None,
        known_filter: LearnedFilter | None = None,
    ):
        """cache (optional, the caller's): keeps what is expensive to build across Attackers of one bottom and
        public text: the position-0 table always, the probe and the learned inverter under `mechanism`, a key
        naming the noise settings they were trained under (no key: they are not shared). known_filter: a learned
        filter the user sends through, which the attacker is taken to know: the optimization attack inverts through
        the bottom and the filter, the nearest-neighbour and sequential attacks run on what was received with the
        filter's linear map undone (perturb must apply it too: simulated_mechanism)."""
        self.bottom, self.config, self.perturb = bottom, config, perturb
        self.known_filter = known_filter
        self.public = public or []
        self.public_texts = sum(int(hidden.shape[0]) for hidden, _, _ in self.public)
        self._cache = cache if cache is not None else {}
        self._mechanism = mechanism

    def _cached(self, name: str, build):
        key: object
        if name == "first_outputs":
            key = name
        elif self._mechanism:
            key = (name, self._mechanism)
        else:
            key = (name, id(self))  # private to this attacker
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def has_public(self) -> bool:
        return self.public_texts >= MIN_PUBLIC

    def applicable(self) -> list[str]:
        """The attacks `auto` runs here: every one that applies to this split, family and public text."""
        if self.config.attack != "auto":
            return [self.config.attack]
        kinds = ["nn"] if self.bottom.split == 0 else ["optimization"]
        if self.bottom.split > 0 and self.bottom.family is DECODER:
            kinds.append("sequential")
        if self.has_public:
            kinds.append("learned")
        return kinds

    def invert(self, kind: str, observed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """observed (B, T, H) -> guessed ids (B, T) with one attack."""
        bottom, config = self.bottom, self.config
        if self.known_filter is not None and kind in ("nn", "sequential"):
            observed = self.known_filter.undo(observed)
        if kind == "nn":
            if bottom.split == 0:
                return position_aware_inversion(observed, mask, bottom)
            return nearest_neighbour_inversion(observed, bottom.input_embedding_matrix().detach())
        if kind == "optimization":
            return optimization_inversion(
                observed,
                mask,
                bottom,
                steps=config.steps,
                lr=config.lr,
                temperature=config.temperature,
                distance=config.distance,
                seed=config.seed,
                after=self.known_filter,
            )
        if kind == "sequential":
            first = self._cached("first_outputs", lambda: first_position_outputs(bottom))
            return sequential_inversion(
                observed, mask, bottom, probe=self.probe(), first_outputs=first, config=config.sequential
            )
        if kind == "learned":
            if not self.has_public:
                raise ValueError(
                    f"the learned attack needs at least {MIN_PUBLIC} public texts to train on, got {self.public_texts}"
                )
            inverter = self._cached("learned", lambda: train_inverter(self.public, self.perturb, config=config.learned))
            return inverter(observed, mask)
        raise ValueError(f"unknown attack {kind!r}; expected one of {', '.join(ATTACKS)}")

    def probe(self) -> TokenProbe | None:
        """The sequential attack's ridge probe, fitted on the public text under the mechanism (position 0, which
        the exact position-0 search covers, is left out: in many decoders it is an outlier of huge norm)."""
        if not self.has_public:
            return None

        def fit() -> TokenProbe:
            rows, ids = [], []
            for hidden, mask, input_ids in self.public:
                received = self.perturb(hidden, mask, input_ids, 0)
                chosen = mask.bool().clone()
                chosen[:, 0] = False
                rows.append(received[chosen])
                ids.append(input_ids[chosen])
            return fit_token_probe(torch.cat(rows), torch.cat(ids), self.bottom.input_embedding_matrix())

        return self._cached("probe", fit)
