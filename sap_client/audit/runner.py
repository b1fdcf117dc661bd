"""The privacy audit: play the curious provider on exactly what this client would send (or on a
recording of what a server received) and measure how much of the text and attributes leak."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sap_client.audit.attribute import attribute_inference, mean_pool
from sap_client.audit.inversion import (nearest_neighbour_inversion, optimization_inversion, position_aware_inversion,
                                        token_recovery)
from sap_client.data import TextDataset
from sap_client.privacy import Privatizer
from sap_client.trainer import SplitTrainer
from sap_common.models.split import BottomModel

log = logging.getLogger(__name__)


@dataclass
class AttackConfig:
    attack: str = field(default="auto", metadata={"help": "nn, optimization, or auto (nn only where exact)"})
    steps: int = 400
    lr: float = 0.03
    temperature: float = 0.2
    distance: str = "cosine"
    seed: int = 0
    observations: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        if self.attack not in ("auto", "nn", "optimization"):
            raise ValueError(f"attack must be auto, nn or optimization, got {self.attack!r}")
        if self.steps < 1 or not self.lr > 0 or not self.temperature > 0:
            raise ValueError(f"steps, lr and temperature must be positive, got {self.steps}, {self.lr}, "
                             f"{self.temperature}")
        if not self.observations or min(self.observations) < 1:
            raise ValueError(f"observations must be counts >= 1, got {self.observations}")


def chosen_attack(config: AttackConfig, trainer: SplitTrainer) -> str:
    """At k = 0 nearest neighbour is exact (over the embedding rows, or for an encoder over what its embedding
    layer emits at each position); deeper splits need the optimization attack."""
    if config.attack != "auto":
        return config.attack
    return "nn" if trainer.bottom.split == 0 else "optimization"


def _invert(kind: str, bottom: BottomModel, observed: torch.Tensor, mask: torch.Tensor,
            config: AttackConfig) -> torch.Tensor:
    """bottom is the attacker's copy: the pretrained bottom the provider shipped."""
    if kind == "nn":
        if bottom.split == 0:
            return position_aware_inversion(observed, mask, bottom)
        return nearest_neighbour_inversion(observed, bottom.input_embedding_matrix().detach())
    return optimization_inversion(observed, mask, bottom, steps=config.steps, lr=config.lr,
                                  temperature=config.temperature, distance=config.distance, seed=config.seed)


def _batches(trainer: SplitTrainer, data: TextDataset):
    size = trainer.config.batch_size
    for start in range(0, len(data), size):
        texts = data.texts[start:start + size]
        labels = torch.tensor(data.labels[start:start + size]) if data.labels else None
        input_ids, mask = trainer.encode(texts)
        trainer.bottom.eval()
        with torch.no_grad():
            hidden = trainer.bottom(input_ids, mask)  # (B, T, H)
        yield texts, labels, input_ids, mask, hidden


def _send(privatizer: Privatizer | None, hidden, mask, input_ids, labels, keys: list[bytes]) -> torch.Tensor:
    if privatizer is None:
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)
    return privatizer(hidden, mask, input_ids, labels, keys)


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
    if norm is None:
        return observed
    d = observed.shape[-1]
    length = (norm ** 2 + d * (d + 1) / privatizer.eta ** 2) ** 0.5
    rescaled = ((observed.norm(dim=-1, keepdim=True) - norm).abs() <= 1e-3 * norm)  # (..., 1)
    return torch.where(rescaled, observed * (length / norm), observed)


def simulated_audit(trainer: SplitTrainer, data: TextDataset, attributes: list[int] | None,
                    config: AttackConfig, attacker: BottomModel | None = None) -> dict:
    """Attack what the client would send for `data`; with observations n > 1, average n noisy copies.

    attacker: the provider's copy of the bottom (default: the client's own, i.e. a frozen bottom). After
    fine-tuning the bottom, pass the pretrained one: the provider does not have the user's weights.
    """
    kind = chosen_attack(config, trainer)
    attacker = attacker if attacker is not None else trainer.bottom
    special = set(trainer.tokenizer.all_special_ids)
    privatizer = trainer.privatizer
    per_n: dict[int, list[tuple]] = {n: [] for n in config.observations}
    pooled = []
    for texts, labels, input_ids, mask, hidden in _batches(trainer, data):
        keys = [t.encode() for t in texts]  # the keys training uses: the provider's first observation
        first = _send(privatizer, hidden, mask, input_ids, labels, keys)
        pooled.append(mean_pool(first, mask))
        first = undo_rescaling(first, privatizer)
        for n in config.observations:
            copies = [first] + [undo_rescaling(_send(privatizer, hidden, mask, input_ids, labels,
                                                     [k + f"\0copy={i}".encode() for k in keys]), privatizer)
                                for i in range(1, n)]
            observed = torch.stack(copies).mean(0)
            per_n[n].append((_invert(kind, attacker, observed, mask, config), input_ids, mask))
    report = {"attack": kind, "examples": len(data)}
    report["observations"] = [_recovery_entry(n, per_n[n], special) for n in config.observations]
    report.update(_eia_fields(report["observations"][0]))
    if attributes is not None:
        report.update(attribute_report(torch.cat(pooled), attributes, config.seed))
    return report


def sent_representations(trainer: SplitTrainer, data: TextDataset, clean: list | None = None) -> torch.Tensor:
    """Mean-pooled vectors of what the client sends for each text (one observation): (N, H), the AIA input.

    clean: an optional cache of the bottom's clean outputs for `data` (an empty list is filled; a filled one
    is reused), for callers that privatize the same texts with several noise settings and a frozen bottom.
    """
    if clean is None or not clean:
        batches = list(_batches(trainer, data))
        if clean is not None:
            clean.extend(batches)
    else:
        batches = clean
    pooled = []
    for texts, labels, input_ids, mask, hidden in batches:
        sent = _send(trainer.privatizer, hidden, mask, input_ids, labels, [t.encode() for t in texts])
        pooled.append(mean_pool(sent, mask))
    return torch.cat(pooled)


def _recovery_entry(n: int, results: list[tuple], special: set[int]) -> dict:
    predicted = torch.cat([r[0].reshape(-1) for r in results])
    actual = torch.cat([r[1].reshape(-1) for r in results])
    mask = torch.cat([r[2].reshape(-1) for r in results])
    figures = token_recovery(predicted, actual, mask, special)
    return {"observations": n, **figures, "privacy": 1.0 - figures["recovery"]}


def _eia_fields(entry: dict) -> dict:
    return {"eia_token_recovery": entry["recovery"],
            "eia_token_recovery_without_special": entry["recovery_without_special"],
            "eia_privacy": entry["privacy"], "eia_tokens": entry["tokens"]}


def attribute_report(features: torch.Tensor, attributes: list[int], seed: int) -> dict:
    """AIA on pooled features (N, H): auxiliary half (the attacker's labelled data) vs victim half, split seeded and disjoint."""
    order = torch.randperm(len(attributes), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    aux, victim = order[:half], order[half:]
    labels = torch.tensor(attributes)
    result = attribute_inference(features[aux], labels[aux], features[victim], labels[victim], seed=seed)
    return {"aia_accuracy": result["accuracy"], "aia_baseline": result["baseline"],
            "aia_privacy": 1.0 - result["accuracy"], "aia_victims": len(victim)}


def recorded_audit(trainer: SplitTrainer, data: TextDataset, recording: list[tuple[torch.Tensor, torch.Tensor]],
                   config: AttackConfig) -> dict:
    """Attack what a server recorded (sap-server --record). Ground truth comes from the user's own data:
    each data text is paired with the distinct received example of its length whose rows are nearest its
    clean bottom output, one to one (nearest pairs first), so a recording of more texts than `data` holds
    (a full training run audited on its first --max-examples texts) leaves the rest unmatched instead of
    pairing them with the wrong text."""
    kind = chosen_attack(config, trainer)
    received = _distinct_examples(recording)
    clean: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # length -> [(clean (len, H), ids (len,))]
    for _, _, input_ids, mask, hidden in _batches(trainer, data):
        for b in range(len(input_ids)):
            length = int(mask[b].sum())
            clean.setdefault(length, []).append((hidden[b, :length], input_ids[b, :length]))
    by_length: dict[int, list[int]] = {}
    for index, rows in enumerate(received):
        by_length.setdefault(len(rows), []).append(index)
    matched = []
    for length, indices in by_length.items():
        candidates = clean.get(length, [])
        if not candidates:
            continue
        distances = torch.cdist(torch.stack([received[i].reshape(-1) for i in indices]).double(),
                                torch.stack([c.reshape(-1) for c, _ in candidates]).double())  # (received, texts)
        pairs = sorted((value, r, t) for r, row in enumerate(distances.tolist()) for t, value in enumerate(row))
        used_rows, used_texts = set(), set()
        for _, r, t in pairs:  # (received, text) pairs from the nearest on, each side used once
            if r not in used_rows and t not in used_texts:
                used_rows.add(r)
                used_texts.add(t)
                matched.append((received[indices[r]], candidates[t][1]))
    unmatched = len(received) - len(matched)
    results = []
    size = trainer.config.batch_size
    for start in range(0, len(matched), size):
        chunk = matched[start:start + size]
        observed = torch.nn.utils.rnn.pad_sequence([undo_rescaling(rows, trainer.privatizer) for rows, _ in chunk],
                                                   batch_first=True)  # (B, T, H)
        truth = torch.nn.utils.rnn.pad_sequence([ids for _, ids in chunk], batch_first=True)  # (B, T)
        lengths = torch.tensor([len(rows) for rows, _ in chunk])
        mask = (torch.arange(observed.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        results.append((_invert(kind, trainer.bottom, observed, mask, config), truth, mask))
    if not results:
        raise ValueError("no recorded example matches a text of the data (same tokenizer, split and data?)")
    entry = _recovery_entry(1, results, set(trainer.tokenizer.all_special_ids))
    return {"attack": kind, "examples": len(matched), "recorded_examples": len(received),
            "unmatched_examples": unmatched, "observations": [entry], **_eia_fields(entry)}


def _distinct_examples(recording: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Real-token rows of every received example, each distinct tensor once (re-sends collapse)."""
    seen, examples = set(), []
    for hidden, mask in recording:
        for b in range(hidden.shape[0]):
            rows = hidden[b, mask[b].bool()].float()
            digest = hashlib.sha256(rows.numpy().tobytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                examples.append(rows)
    return examples


def write_report(report: dict, folder: Path) -> None:
    """report.json (all figures) and a short report.md a person can read."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# SAP privacy audit ({report.get('source', 'simulated')})", "",
             f"Model {report.get('model')} split k = {report['split']}; noise eta = {report['eta']}, "
             f"noise ratio = {report.get('noise_ratio')}, CTI = {report['cti']}"
             + (f", noised vectors rescaled to norm {report['rescale_norm']:.4g}" if report.get("rescale_norm") else "")
             + ".", "",
             f"**Embedding inversion** ({report['attack']} attack, {report['eia_tokens']} tokens of "
             f"{report['examples']} examples): {report['eia_token_recovery']:.1%} of tokens recovered "
             f"({report['eia_token_recovery_without_special']:.1%} without special tokens); empirical privacy "
             f"{report['eia_privacy']:.3f}.", ""]
    if len(report["observations"]) > 1:
        lines += ["| observations of each example averaged | tokens recovered | empirical privacy |", "|---|---|---|"]
        lines += [f"| {o['observations']} | {o['recovery']:.1%} | {o['privacy']:.3f} |" for o in report["observations"]]
        lines += ["", "Averaging several noisy copies strips the noise: send each example once "
                      "(the default with a frozen bottom; avoid --fresh-noise).", ""]
    if "aia_accuracy" in report:
        lines += [f"**Attribute inference** ({report['attribute_column']}): accuracy {report['aia_accuracy']:.3f} "
                  f"against a majority baseline of {report['aia_baseline']:.3f} on {report['aia_victims']} "
                  f"victims; empirical privacy {report['aia_privacy']:.3f}.", ""]
    (folder / "report.md").write_text("\n".join(lines))
