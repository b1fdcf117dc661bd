"""The privacy audit: play the curious provider on exactly what this client would send (or on a
recording of what a server received) and measure how much of the text and attributes leak."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from sap_client.audit.attacks import AttackConfig, Attacker, simulated_mechanism, undo_rescaling
from sap_client.audit.attribute import attribute_inference, mean_pool
from sap_client.audit.content import content_mask
from sap_client.audit.inversion import token_recovery
from sap_client.audit.labels import label_inference, sign_rule
from sap_client.data import TextDataset
from sap_client.privacy import Privatizer
from sap_client.trainer import SplitTrainer
from sap_common.models.split import BottomModel
from sap_common.recording import Record

log = logging.getLogger(__name__)

__all__ = ["AttackConfig", "attribute_report", "recorded_audit", "sent_representations", "simulated_audit",
           "undo_rescaling", "write_report"]


def _batches(trainer: SplitTrainer, data: TextDataset, bottom: BottomModel | None = None):
    """(texts, labels, ids, mask, clean hidden) per batch of data, through bottom (default: the trainer's)."""
    size = trainer.config.batch_size
    bottom = bottom if bottom is not None else trainer.bottom
    for start in range(0, len(data), size):
        texts = data.texts[start:start + size]
        labels = torch.tensor(data.labels[start:start + size]) if data.labels else None
        input_ids, mask = trainer.encode(texts)
        bottom.eval()
        with torch.no_grad():
            hidden = bottom(input_ids, mask)  # (B, T, H)
        yield texts, labels, input_ids, mask, hidden


def _send(privatizer: Privatizer | None, hidden, mask, input_ids, labels, keys: list[bytes]) -> torch.Tensor:
    if privatizer is None:
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)
    return privatizer(hidden, mask, input_ids, labels, keys)


def build_attacker(trainer: SplitTrainer, config: AttackConfig, public: list[str] | None = None,
                   attacker: BottomModel | None = None, cache: dict | None = None,
                   mechanism: str | None = None) -> Attacker:
    """The curious provider for this client's settings: its pretrained bottom (default: the client's own, i.e. a
    frozen bottom), its public texts run through that bottom, and the client's mechanism to simulate on them.
    cache and mechanism: see Attacker (a caller auditing many settings shares what it can)."""
    bottom = attacker if attacker is not None else trainer.bottom
    if cache is not None and "public" in cache:
        batches = cache["public"]
    else:
        batches = [(hidden, mask, ids) for _, _, ids, mask, hidden in
                   _batches(trainer, TextDataset(list(public or []), [], []), bottom)]
        if cache is not None:
            cache["public"] = batches
    return Attacker(bottom, config, perturb=simulated_mechanism(trainer.privatizer), public=batches, cache=cache,
                    mechanism=mechanism)


def simulated_audit(trainer: SplitTrainer, data: TextDataset, attributes: list[int] | None,
                    config: AttackConfig, attacker: BottomModel | None = None,
                    public: list[str] | None = None, cache: dict | None = None, mechanism: str | None = None) -> dict:
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
    for texts, labels, input_ids, mask, hidden in _batches(trainer, data):
        keys = [t.encode() for t in texts]  # the keys training uses: the provider's first observation
        first = _send(privatizer, hidden, mask, input_ids, labels, keys)
        pooled.append(mean_pool(first, mask))
        first = undo_rescaling(first, privatizer)
        content = content_mask(input_ids, mask, trainer.tokenizer)
        for n in config.observations:
            copies = [first] + [undo_rescaling(_send(privatizer, hidden, mask, input_ids, labels,
                                                     [k + f"\0copy={i}".encode() for k in keys]), privatizer)
                                for i in range(1, n)]
            observed = torch.stack(copies).mean(0)
            for kind in kinds:
                per_n[n][kind].append((provider.invert(kind, observed, mask), input_ids, mask, content))
    report = _eia_report(per_n, trainer, provider)
    report["examples"] = len(data)
    if attributes is not None:
        report.update(attribute_report(torch.cat(pooled), attributes, config.seed))
    return report


def _eia_report(per_n: dict[int, dict[str, list[tuple]]], trainer: SplitTrainer, provider: Attacker) -> dict:
    """Each attack's figures per observation count, and the strongest attack's as the audit's figures."""
    special = set(trainer.tokenizer.all_special_ids)
    observations = []
    for n, by_kind in per_n.items():
        attacks = {kind: _recovery(results, special) for kind, results in by_kind.items()}
        strongest = max(attacks, key=lambda kind: attacks[kind]["recovery"])
        observations.append({"observations": n, **attacks[strongest], "attack": strongest,
                             "privacy": 1.0 - attacks[strongest]["recovery"],
                             "recovery_content": max(a["recovery_content"] for a in attacks.values()),
                             "attacks": attacks})
    first = observations[0]
    return {"attack": first["attack"], "attacks_run": list(first["attacks"]), "observations": observations,
            "eia_attacks": first["attacks"], "public_examples": provider.public_texts, **_eia_fields(first)}


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


def _recovery(results: list[tuple], special: set[int]) -> dict:
    """Token recovery over [(guesses, truth, mask, content)] batches."""
    def flat(i: int) -> torch.Tensor:
        return torch.cat([r[i].reshape(-1) for r in results])

    return token_recovery(flat(0), flat(1), flat(2), special, content=flat(3))


def _eia_fields(entry: dict) -> dict:
    return {"eia_token_recovery": entry["recovery"],
            "eia_token_recovery_without_special": entry["recovery_without_special"],
            "eia_token_recovery_content": entry["recovery_content"],
            "eia_privacy": entry["privacy"], "eia_content_privacy": 1.0 - entry["recovery_content"],
            "eia_tokens": entry["tokens"], "eia_content_tokens": entry["tokens_content"]}


def attribute_report(features: torch.Tensor, attributes: list[int], seed: int) -> dict:
    """AIA on pooled features (N, H): auxiliary half (the attacker's labelled data) vs victim half, split seeded and disjoint."""
    order = torch.randperm(len(attributes), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    aux, victim = order[:half], order[half:]
    labels = torch.tensor(attributes)
    result = attribute_inference(features[aux], labels[aux], features[victim], labels[victim], seed=seed)
    return {"aia_accuracy": result["accuracy"], "aia_baseline": result["baseline"],
            "aia_privacy": 1.0 - result["accuracy"], "aia_victims": len(victim)}


def recorded_audit(trainer: SplitTrainer, data: TextDataset, records: list[Record], config: AttackConfig,
                   public: list[str] | None = None, label_data: TextDataset | None = None) -> dict:
    """Attack what a server recorded (sap-server --record): the hidden states it received, with every attack that
    applies, and (when the data is labelled and the recording holds Backward gradients) the labels.

    Ground truth comes from the user's own data: each data text is paired with the distinct received example of its
    length nearest to what this client would send for it (and to its clean bottom output), one to one, nearest pairs
    first; so a recording of more texts than `data` holds (a whole run audited on its first --max-examples texts)
    leaves the rest unmatched instead of pairing them with the wrong text. label_data (default: data), the texts
    and labels whose gradients are read: pairing is cheap, so a whole training file can be, while the inversion
    attacks run on data only."""
    received, digests = _distinct_examples(records)
    matched = _pair_with_texts(trainer, data, received)  # received index -> (text index, ids)
    provider = build_attacker(trainer, config, public)
    kinds = provider.applicable()
    order = sorted(matched)
    results: dict[str, list[tuple]] = {kind: [] for kind in kinds}
    size = trainer.config.batch_size
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        observed = torch.nn.utils.rnn.pad_sequence([undo_rescaling(received[i], trainer.privatizer) for i in chunk],
                                                   batch_first=True)  # (B, T, H)
        truth = torch.nn.utils.rnn.pad_sequence([matched[i][1] for i in chunk], batch_first=True)  # (B, T)
        lengths = torch.tensor([len(received[i]) for i in chunk])
        mask = (torch.arange(observed.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        content = content_mask(truth, mask, trainer.tokenizer)
        for kind in kinds:
            results[kind].append((provider.invert(kind, observed, mask), truth, mask, content))
    if not order:
        raise ValueError("no recorded example matches a text of the data (same tokenizer, split and data?)")
    report = _eia_report({1: results}, trainer, provider)
    report.update(examples=len(order), recorded_examples=len(received), unmatched_examples=len(received) - len(order))
    label_data = label_data if label_data is not None else data
    if label_data.labels:
        paired = matched if label_data is data else _pair_with_texts(trainer, label_data, received)
        text_of = {digests[i]: text for i, (text, _) in paired.items()}
        report.update(recorded_label_inference(records, text_of, label_data.labels))
    return report


def recorded_label_inference(records: list[Record], text_of: dict[str, int], labels: list[int]) -> dict:
    """The sign rule on every recorded Backward gradient of the logits whose forward example was paired with a data
    text: its accuracy on those texts' true labels, beside the majority-class baseline. Each (step, example) is one
    observation; examples seen in several epochs count once per epoch."""
    forwards = {(r.session, r.step): r for r in records if r.kind == "forward"}  # a retried forward: the same tensors
    guesses, truth, unmatched = [], [], 0
    for record in records:
        if record.kind != "backward" or "grad_logits" not in record.tensors:
            continue
        forward = forwards.get((record.session, record.step))
        if forward is None:
            continue
        grads = record.tensors["grad_logits"]  # (B, C)
        predicted = sign_rule(grads)
        for b, digest in enumerate(_row_digests(forward.tensors["hidden_states"], forward.tensors["attention_mask"])):
            if digest in text_of:
                guesses.append(int(predicted[b]))
                truth.append(labels[text_of[digest]])
            else:
                unmatched += 1
    if not truth:
        return {"label_inference": "no recorded Backward gradient of a paired example (a recording from before "
                                   "gradients were recorded, or no training steps)"}
    figures = label_inference(torch.tensor(guesses), torch.tensor(truth))
    return {**figures, "label_attack": "sign", "label_inference_unmatched": unmatched}


def _pair_with_texts(trainer: SplitTrainer, data: TextDataset, received: list[torch.Tensor]
                     ) -> dict[int, tuple[int, torch.Tensor]]:
    """received index -> (text index, token ids): one to one within each length, nearest pairs first. The distance
    is the smaller of the distances to the text's clean bottom output and to what this client would send for it
    (exact for a run's keyed noise and frozen bottom; the clean output serves fresh noise and trained bottoms)."""
    references: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    index = 0
    for texts, labels, input_ids, mask, hidden in _batches(trainer, data):
        sent = _send(trainer.privatizer, hidden, mask, input_ids, labels, [t.encode() for t in texts])
        for b in range(len(input_ids)):
            length = int(mask[b].sum())
            references.setdefault(length, []).append((index, hidden[b, :length], sent[b, :length],
                                                      input_ids[b, :length]))
            index += 1
    by_length: dict[int, list[int]] = {}
    for i, rows in enumerate(received):
        by_length.setdefault(len(rows), []).append(i)
    matched = {}
    for length, indices in by_length.items():
        candidates = references.get(length, [])
        if not candidates:
            continue
        got = torch.stack([received[i].reshape(-1) for i in indices]).double()
        distances = torch.minimum(torch.cdist(got, torch.stack([c[1].reshape(-1) for c in candidates]).double()),
                                  torch.cdist(got, torch.stack([c[2].reshape(-1) for c in candidates]).double()))
        width = distances.shape[1]
        used_rows, used_texts = set(), set()
        for flat in distances.reshape(-1).argsort().tolist():  # (received, text) pairs from the nearest on
            r, t = divmod(flat, width)
            if r not in used_rows and t not in used_texts:  # each side used once
                used_rows.add(r)
                used_texts.add(t)
                matched[indices[r]] = (candidates[t][0], candidates[t][3])
                if len(used_rows) == min(len(indices), width):
                    break
    return matched


def _row_digests(hidden: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [hashlib.sha256(hidden[b, mask[b].bool()].float().numpy().tobytes()).hexdigest()
            for b in range(hidden.shape[0])]


def _distinct_examples(records: list[Record]) -> tuple[list[torch.Tensor], list[str]]:
    """Real-token rows of every received example, each distinct tensor once (re-sends collapse), and their digests."""
    seen, examples, digests = set(), [], []
    for record in records:
        if "hidden_states" not in record.tensors:
            continue
        hidden, mask = record.tensors["hidden_states"], record.tensors["attention_mask"]
        for b, digest in enumerate(_row_digests(hidden, mask)):
            if digest not in seen:
                seen.add(digest)
                examples.append(hidden[b, mask[b].bool()].float())
                digests.append(digest)
    return examples, digests


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
             "**Embedding inversion**, "
             + (f"the strongest of {len(report['eia_attacks'])} attacks ({report['attack']}), "
                if len(report["eia_attacks"]) > 1 else f"the {report['attack']} attack, ")
             + f"{report['eia_tokens']} tokens of {report['examples']} examples: {report['eia_token_recovery']:.1%} of "
             f"tokens recovered ({report['eia_token_recovery_without_special']:.1%} without special tokens, "
             f"{report['eia_token_recovery_content']:.1%} of the {report['eia_content_tokens']} content tokens); "
             f"empirical privacy {report['eia_privacy']:.3f}.", "",
             "| attack | tokens recovered | content tokens recovered |", "|---|---|---|"]
    lines += [f"| {kind} | {a['recovery']:.1%} | {a['recovery_content']:.1%} |" for kind, a in report["eia_attacks"].items()]
    lines += ["", f"The provider's public text: {report.get('public_examples', 0)} texts (for the probe and the learned "
                  f"inverter; never the attacked ones).", ""]
    if len(report["observations"]) > 1:
        lines += ["| observations of each example averaged | tokens recovered | empirical privacy |", "|---|---|---|"]
        lines += [f"| {o['observations']} | {o['recovery']:.1%} | {o['privacy']:.3f} |" for o in report["observations"]]
        lines += ["", "Averaging several noisy copies strips the noise: send each example once "
                      "(the default with a frozen bottom; avoid --fresh-noise).", ""]
    if "aia_accuracy" in report:
        lines += [f"**Attribute inference** ({report['attribute_column']}): accuracy {report['aia_accuracy']:.3f} "
                  f"against a majority baseline of {report['aia_baseline']:.3f} on {report['aia_victims']} "
                  f"victims; empirical privacy {report['aia_privacy']:.3f}.", ""]
    if "label_inference_accuracy" in report:
        lines += [f"**Label inference** ({report['label_attack']} rule on the recorded Backward gradients): "
                  f"{report['label_inference_accuracy']:.1%} of {report['label_inference_examples']} training labels "
                  f"read, against a majority baseline of {report['label_inference_baseline']:.1%}.", ""]
    (folder / "report.md").write_text("\n".join(lines))
