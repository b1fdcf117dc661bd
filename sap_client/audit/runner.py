"""The privacy audit: play the curious provider on exactly what this client would send and measure how much of the
text and attributes leak (sap_client.audit.recorded does the same on a recording of what a server received)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sap_client.audit.attacks import AttackConfig, Attacker, simulated_mechanism, undo_rescaling
from sap_client.audit.attribute import attribute_inference, mean_pool
from sap_client.audit.content import content_mask
from sap_client.audit.inversion import token_recovery
from sap_client.data import TextDataset
from sap_client.trainer import SplitTrainer
from sap_common.models.split import BottomModel

log = logging.getLogger(__name__)

__all__ = [
    "AttackConfig",
    "attribute_report",
    "build_attacker",
    "sent_representations",
    "simulated_audit",
    "undo_rescaling",
    "write_report",
]


def clean_batches(trainer: SplitTrainer, data: TextDataset, bottom: BottomModel | None = None):
    """(texts, labels, ids, mask, clean hidden) per batch of data, through bottom (default: the trainer's own, as
    training runs it)."""
    size = trainer.config.batch_size
    for start in range(0, len(data), size):
        texts = data.texts[start : start + size]
        labels = torch.tensor(data.labels[start : start + size]) if data.labels else None
        input_ids, mask = trainer.encode(texts)
        if bottom is None:
            hidden = trainer.bottom_outputs(input_ids, mask)  # (B, T, H)
        else:
            bottom.eval()
            with torch.no_grad():
                hidden = bottom(input_ids, mask)
        yield texts, labels, input_ids, mask, hidden


def build_attacker(
    trainer: SplitTrainer,
    config: AttackConfig,
    public: list[str] | None = None,
    attacker: BottomModel | None = None,
    cache: dict | None = None,
    mechanism: str | None = None,
) -> Attacker:
    """The curious provider for this client's settings: its pretrained bottom (default: the client's own, i.e. a
    frozen bottom), its public texts run through that bottom, and the client's mechanism to simulate on them.
    cache and mechanism: see Attacker (a caller auditing many settings shares what it can)."""
    bottom = attacker if attacker is not None else trainer.bottom
    if cache is not None and "public" in cache:
        batches = cache["public"]
    else:
        batches = [
            (hidden, mask, ids)
            for _, _, ids, mask, hidden in clean_batches(trainer, TextDataset(list(public or []), [], []), bottom)
        ]
        if cache is not None:
            cache["public"] = batches
    return Attacker(
        bottom,
        config,
        perturb=simulated_mechanism(trainer.privatizer, trainer.filter),
        public=batches,
        cache=cache,
        mechanism=mechanism,
        known_filter=trainer.filter,
    )


def simulated_audit(
    trainer: SplitTrainer,
    data: TextDataset,
    attributes: list[int] | None,
    config: AttackConfig,
    attacker: BottomModel | None = None,
    public: list[str] | None = None,
    cache: dict | None = None,
    mechanism: str | None = None,
) -> dict:
    """Attack what the client would send for `data` with every attack that applies (or the one asked for); with
    observations n > 1, average n noisy copies first.

    attacker: the provider's copy of the bottom (default: the client's own, i.e. a frozen bottom). After
    fine-tuning the bottom, pass the pretrained one: the provider does not have the user's weights.
    public: the provider's own texts (disjoint from data) for the probe and the learned inverter.
    """
    provider = build_attacker(trainer, config, public, attacker, cache, mechanism)
    kinds = provider.applicable()
    privatizer = trainer.privatizer
    per_n: dict[int, dict[str, list[tuple]]] = {n: {kind: [] for kind in kinds} for n in config.observations}
    pooled = []
    for texts, labels, input_ids, mask, hidden in clean_batches(trainer, data):
        keys = trainer.noise_keys(texts)  # the keys training uses: the provider's first observation
        first = trainer.to_send(hidden, mask, input_ids, labels, keys)
        pooled.append(mean_pool(first, mask))
        first = undo_rescaling(first, privatizer)
        content = content_mask(input_ids, mask, trainer.tokenizer)
        for n in config.observations:
            copies = [first] + [
                undo_rescaling(
                    trainer.to_send(hidden, mask, input_ids, labels, [k + f"\0copy={i}".encode() for k in keys]),
                    privatizer,
                )
                for i in range(1, n)
            ]
            observed = torch.stack(copies).mean(0)
            for kind in kinds:
                per_n[n][kind].append((provider.invert(kind, observed, mask), input_ids, mask, content))
    report = eia_report(per_n, trainer, provider, headline=config.copies)
    report["examples"] = len(data)
    if attributes is not None:
        report.update(attribute_report(torch.cat(pooled), attributes, config.seed))
    return report


def eia_report(
    per_n: dict[int, dict[str, list[tuple]]], trainer: SplitTrainer, provider: Attacker, headline: int = 1
) -> dict:
    """Each attack's figures per observation count, and the strongest attack's at `headline` copies averaged (the
    copies the provider holds) as the audit's figures."""
    special = set(trainer.tokenizer.all_special_ids)
    observations = []
    for n, by_kind in per_n.items():
        attacks = {kind: _recovery(results, special) for kind, results in by_kind.items()}
        strongest = max(attacks, key=lambda kind: attacks[kind]["recovery"])
        observations.append(
            {
                "observations": n,
                **attacks[strongest],
                "attack": strongest,
                "privacy": 1.0 - attacks[strongest]["recovery"],
                "recovery_content": max(a["recovery_content"] for a in attacks.values()),
                "attacks": attacks,
            }
        )
    first = next((o for o in observations if o["observations"] == headline), observations[0])
    return {
        "attack": first["attack"],
        "attacks_run": list(first["attacks"]),
        "observations": observations,
        "headline_observations": first["observations"],
        "eia_attacks": first["attacks"],
        "public_examples": provider.public_texts,
        **_eia_fields(first),
    }


def sent_representations(trainer: SplitTrainer, data: TextDataset, clean: list | None = None) -> torch.Tensor:
    """Mean-pooled vectors of what the client sends for each text (one observation): (N, H), the AIA input.

    clean: an optional cache of the bottom's clean outputs for `data` (an empty list is filled; a filled one
    is reused), for callers that privatize the same texts with several noise settings and a frozen bottom.
    """
    if clean is None or not clean:
        batches = list(clean_batches(trainer, data))
        if clean is not None:
            clean.extend(batches)
    else:
        batches = clean
    pooled = []
    for texts, labels, input_ids, mask, hidden in batches:
        sent = trainer.to_send(hidden, mask, input_ids, labels, trainer.noise_keys(texts))
        pooled.append(mean_pool(sent, mask))
    return torch.cat(pooled)


def _recovery(results: list[tuple], special: set[int]) -> dict:
    """Token recovery over [(guesses, truth, mask, content)] batches."""

    def flat(i: int) -> torch.Tensor:
        return torch.cat([r[i].reshape(-1) for r in results])

    return token_recovery(flat(0), flat(1), flat(2), special, content=flat(3))


def _eia_fields(entry: dict) -> dict:
    return {
        "eia_token_recovery": entry["recovery"],
        "eia_token_recovery_without_special": entry["recovery_without_special"],
        "eia_token_recovery_content": entry["recovery_content"],
        "eia_privacy": entry["privacy"],
        "eia_content_privacy": 1.0 - entry["recovery_content"],
        "eia_tokens": entry["tokens"],
        "eia_content_tokens": entry["tokens_content"],
    }


def attribute_report(features: torch.Tensor, attributes: list[int], seed: int) -> dict:
    """AIA on pooled features (N, H): the auxiliary half (the attacker's labelled data) against the victim half,
    split seeded and disjoint."""
    order = torch.randperm(len(attributes), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    aux, victim = order[:half], order[half:]
    labels = torch.tensor(attributes)
    result = attribute_inference(features[aux], labels[aux], features[victim], labels[victim], seed=seed)
    return {
        "aia_accuracy": result["accuracy"],
        "aia_baseline": result["baseline"],
        "aia_privacy": 1.0 - result["accuracy"],
        "aia_victims": len(victim),
    }


def _copies_words(report: dict) -> str:
    """The end of the headline sentence: how the copies of a fresh-noise run were counted in the figure."""
    if report.get("headline_observations", 1) > 1:
        return (
            f", with the {report['headline_observations']} noisy copies of each example the provider holds averaged "
            f"(fresh noise in each epoch)."
        )
    if report.get("copies_per_text"):
        return (
            f". The provider holds {report['copies_per_text']} noisy copies of each training text (fresh noise in "
            f"each epoch): this audit linked {report['copies_linked']} of the {report['recorded_examples']} received "
            f"examples as copies of one text and averaged them (the attacks marked 'copies averaged'); the simulated "
            f"audit, which averages perfectly linked copies, can read more."
        )
    return "."


def write_report(report: dict, folder: Path) -> None:
    """report.json (all figures) and a short report.md a person can read."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# SAP privacy audit ({report.get('source', 'simulated')})",
        "",
        f"Model {report.get('model')} split k = {report['split']}; noise eta = {report['eta']}, "
        f"noise ratio = {report.get('noise_ratio')}, CTI = {report['cti']}"
        + (f", noised vectors rescaled to norm {report['rescale_norm']:.4g}" if report.get("rescale_norm") else "")
        + ".",
        "",
        "**Embedding inversion**, "
        + (
            f"the strongest of {len(report['eia_attacks'])} attacks ({report['attack']}), "
            if len(report["eia_attacks"]) > 1
            else f"the {report['attack']} attack, "
        )
        + f"{report['eia_tokens']} tokens of {report['examples']} examples: {report['eia_token_recovery']:.1%} of "
        f"tokens recovered ({report['eia_token_recovery_without_special']:.1%} without special tokens, "
        f"{report['eia_token_recovery_content']:.1%} of the {report['eia_content_tokens']} content tokens); "
        f"empirical privacy {report['eia_privacy']:.3f}{_copies_words(report)}",
        "",
        "| attack | tokens recovered | content tokens recovered |",
        "|---|---|---|",
    ]
    lines += [
        f"| {kind} | {a['recovery']:.1%} | {a['recovery_content']:.1%} |" for kind, a in report["eia_attacks"].items()
    ]
    lines += [
        "",
        f"The provider's public text: {report.get('public_examples', 0)} texts (for the probe and the learned "
        f"inverter; never the attacked ones).",
        "",
    ]
    if len(report["observations"]) > 1:
        lines += ["| observations of each example averaged | tokens recovered | empirical privacy |", "|---|---|---|"]
        lines += [f"| {o['observations']} | {o['recovery']:.1%} | {o['privacy']:.3f} |" for o in report["observations"]]
        lines += [
            "",
            "Averaging several noisy copies strips the noise: send each example once "
            "(the default with a frozen bottom; avoid --fresh-noise).",
            "",
        ]
    if "aia_accuracy" in report:
        lines += [
            f"**Attribute inference** ({report['attribute_column']}): accuracy {report['aia_accuracy']:.3f} "
            f"against a majority baseline of {report['aia_baseline']:.3f} on {report['aia_victims']} "
            f"victims; empirical privacy {report['aia_privacy']:.3f}.",
            "",
        ]
    if "targets_read" in report:
        lines += [
            f"**Target tokens** (the tokens the model learns to write, read from the recorded Backward gradients: "
            f"the lowest <E_v, gamma * g> over the vocabulary, a lower bound): {report['targets_read']:.1%} of "
            f"{report['target_tokens']} target tokens read over {report['target_steps']} steps; empirical privacy "
            f"{report['targets_privacy']:.3f}.",
            "",
        ]
    if "label_inference_accuracy" in report:
        lines += [
            f"**Label inference** ({report['label_attack']} rule on the recorded Backward gradients): "
            f"{report['label_inference_accuracy']:.1%} of {report['label_inference_examples']} training labels "
            f"read, against a majority baseline of {report['label_inference_baseline']:.1%}.",
            "",
        ]
    (folder / "report.md").write_text("\n".join(lines))
