"""The audit of real traffic: attack what a `sap-server --record` server received, with the user's own data as the
ground truth, and read the labels back from the recorded Backward gradients."""

from __future__ import annotations

import hashlib

import torch
from scipy.optimize import linear_sum_assignment

from sap_client.audit.attacks import AttackConfig, Attacker, undo_rescaling
from sap_client.audit.content import content_mask
from sap_client.audit.labels import (
    gradient_clusters,
    label_inference,
    linked_clusters,
    name_clusters,
    name_sides,
    norm_scoring,
    sign_rule,
    tracked_sides,
)
from sap_client.audit.runner import build_attacker, clean_batches, eia_report
from sap_client.data import TextDataset
from sap_client.trainer import SplitTrainer
from sap_common.models.families import ENCODER
from sap_common.recording import Record

# How many examples' labels the provider is taken to know when it names the two sides of a binary run (texts it
# planted, or read back and labelled itself). Odd, so a majority decides; several, because under randomized
# response each known label agrees with the side training used only with the keep probability (0.731 at eps 1).
KNOWN_LABELS = 31


def recorded_audit(
    trainer: SplitTrainer,
    data: TextDataset,
    records: list[Record],
    config: AttackConfig,
    public: list[str] | None = None,
    label_data: TextDataset | None = None,
    *,
    cache: dict | None = None,
    mechanism: str | None = None,
) -> dict:
    """Attack what a server recorded (sap-server --record): the hidden states it received, with every attack that
    applies, and (when the data is labelled and the recording holds Backward gradients) the labels. The attacks
    invert through trainer's bottom (after --train-bottom, pass a trainer over the pretrained bottom: the provider's
    copy); cache and mechanism: see build_attacker (a caller auditing many runs shares what it can).

    Ground truth comes from the user's own data: each data text is paired with the distinct received example of its
    length nearest to what this client would send for it (and to its clean bottom output), one to one, nearest pairs
    first; so a recording of more texts than `data` holds (a whole run audited on its first --max-examples texts)
    leaves the rest unmatched instead of pairing them with the wrong text. label_data (default: data), the texts
    and labels whose gradients are read: pairing is cheap, so a whole training file can be, while the inversion
    attacks run on data only."""
    received, digests, sources = _distinct_examples(records)
    matched = _pair_with_texts(trainer, data, received)  # received index -> (text index, ids)
    order = sorted(matched)
    if not order:  # before the attacker is built: that runs the public text and may train an inverter
        raise ValueError("no recorded example matches a text of the data (same tokenizer, split and data?)")
    provider = build_attacker(trainer, config, public, cache=cache, mechanism=mechanism)
    results = invert_received(provider, trainer, received, matched, order)
    copies: dict[str, int] = {}
    if config.copies > 1:  # fresh noise each epoch: the provider links each text's copies and averages them
        groups = link_copies(records, received, sources, config.copies)
        copies = {"copies_per_text": config.copies, "copies_linked": sum(len(g) for g in groups)}
        averaged = list(received)
        for members in groups:
            mean = torch.stack([received[i] for i in members]).mean(0)
            for i in members:
                averaged[i] = mean
        attacked = invert_received(provider, trainer, averaged, matched, order)
        results.update({f"{kind}, copies averaged": found for kind, found in attacked.items()})
    report = eia_report({1: results}, trainer, provider)
    report.update(examples=len(order), recorded_examples=len(received), unmatched_examples=len(received) - len(order))
    report.update(copies)
    label_data = label_data if label_data is not None else data
    if label_data.labels:
        paired = matched if label_data is data else _pair_with_texts(trainer, label_data, received)
        text_of = {digests[i]: text for i, (text, _) in paired.items()}
        position = "first" if trainer.bottom.family is ENCODER else "last"  # where a pooled head reads
        report.update(recorded_label_inference(records, text_of, label_data.labels, position))
    return report


def invert_received(
    provider: Attacker,
    trainer: SplitTrainer,
    received: list[torch.Tensor],
    matched: dict[int, tuple[int, torch.Tensor]],
    order: list[int],
) -> dict[str, list[tuple]]:
    """Every applicable attack on the received examples `order` (indices into received, paired in matched with
    their true ids), batch by batch: {attack: [(guesses, truth, mask, content)]}, eia_report's input."""
    results: dict[str, list[tuple]] = {kind: [] for kind in provider.applicable()}
    size = trainer.config.batch_size
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        observed = torch.nn.utils.rnn.pad_sequence(
            [undo_rescaling(received[i], trainer.privatizer) for i in chunk], batch_first=True
        )  # (B, T, H)
        truth = torch.nn.utils.rnn.pad_sequence([matched[i][1] for i in chunk], batch_first=True)  # (B, T)
        lengths = torch.tensor([len(received[i]) for i in chunk])
        mask = (torch.arange(observed.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        content = content_mask(truth, mask, trainer.tokenizer)
        for kind in results:
            results[kind].append((provider.invert(kind, observed, mask), truth, mask, content))
    return results


def recorded_label_inference(
    records: list[Record], text_of: dict[str, int], labels: list[int], pooled_position: str = "last"
) -> dict:
    """Read the labels back from every recorded Backward gradient whose forward example was paired with a data text;
    the accuracy on those texts' true labels, beside the majority-class baseline. Each (step, example) is one
    observation; examples seen in several epochs count once per epoch.

    dL/dlogits (the provider holds the head): the sign rule. dL/dpooled (--private-head): on a binary task, tracked
    direction scoring (each step's gradients lie on one line; sides kept consistent from step to step), with the one
    flip for the whole run resolved by the class prior, or by the KNOWN_LABELS examples whose labels the provider
    knows (the naming most of them agree with); and norm
    scoring; and clustering, for any number of classes. dL/dhidden (N_real, H) (--user-tail): the same attacks on
    each example's row at pooled_position ("last" real token for decoders, "first" for encoders). The figure is the
    strongest of them (each one's is reported too)."""
    forwards = {(r.session, r.step): r for r in records if r.kind == "forward"}  # a retried forward: the same tensors
    steps: dict[str, list[tuple[torch.Tensor, list[int | None], list[str]]]] = {
        "grad_logits": [],
        "grad_pooled": [],
        "grad_hidden": [],
    }
    unmatched = 0
    for record in records:
        name = next((n for n in steps if n in record.tensors), None)
        forward = forwards.get((record.session, record.step)) if record.kind == "backward" else None
        if name is None or forward is None:
            continue
        digests = _row_digests(forward.tensors["hidden_states"], forward.tensors["attention_mask"])
        rows = [text_of.get(digest) for digest in digests]
        unmatched += sum(row is None for row in rows)
        gradient = record.tensors[name]
        if name == "grad_hidden":  # packed (N_real, H): each example's row at the position its head reads
            gradient = _rows_at(gradient, forward.tensors["attention_mask"], pooled_position)
            name = "grad_pooled"
        steps[name].append((gradient, rows, digests))
    if steps["grad_logits"]:
        guesses, truth = [], []
        for grads, rows, _ in steps["grad_logits"]:
            predicted = sign_rule(grads)  # (B,)
            for b, row in enumerate(rows):
                if row is not None:
                    guesses.append(int(predicted[b]))
                    truth.append(labels[row])
        if truth:
            figures = label_inference(torch.tensor(guesses), torch.tensor(truth))
            return {**figures, "label_attack": "sign", "label_inference_unmatched": unmatched}
    if steps["grad_pooled"]:
        return _pooled_label_inference(steps["grad_pooled"], labels, unmatched)
    return {
        "label_inference": "no recorded Backward gradient of a paired example (a recording from before "
        "gradients were recorded, or no training steps)"
    }


def _pooled_label_inference(
    steps: list[tuple[torch.Tensor, list[int | None], list[str]]], labels: list[int], unmatched: int
) -> dict:
    """The attacks on dL/dpooled (B, H) of a user-kept head (see recorded_label_inference)."""
    truth_rows = [row for _, rows, _ in steps for row in rows if row is not None]
    if not truth_rows:
        return {"label_inference": "no recorded Backward gradient of a paired example"}
    truth = torch.tensor([labels[row] for row in truth_rows])
    gradients = torch.cat([grads[[b for b, row in enumerate(rows) if row is not None]] for grads, rows, _ in steps])
    # the provider's own link between observations: the digest of the vectors it was sent
    sent = [digest for _, rows, digests in steps for row, digest in zip(rows, digests) if row is not None]
    number = {digest: i for i, digest in enumerate(dict.fromkeys(sent))}
    groups = torch.tensor([number[digest] for digest in sent])
    classes = max(len(set(labels)), 2)
    counts = torch.bincount(truth, minlength=classes)
    prior = (counts.double() / len(truth)).tolist()
    # the first observation of each of the first KNOWN_LABELS examples, with its true label
    known = [(i, int(truth[i])) for i in (sent.index(digest) for digest in list(number)[:KNOWN_LABELS])]
    guesses = _binary_attacks(steps, truth, gradients, counts, known) if classes == 2 else {}
    if len(truth) >= classes:  # after the binary attacks: a tie names theirs
        clusters = gradient_clusters(gradients, classes)
        guesses["clustering, prior"] = name_clusters(clusters, prior)
        if classes == 2:
            guesses["clustering, known labels"] = name_sides(clusters, known=known)
        if len(number) < len(sent):  # some example was sent more than once (several epochs)
            linked = linked_clusters(gradients, clusters, groups, classes)
            guesses["linked clustering, prior"] = name_clusters(linked, prior)
            if classes == 2:
                guesses["linked clustering, known labels"] = name_sides(linked, known=known)
    if not guesses:
        return {"label_inference": "too few recorded gradients to attack", "label_inference_examples": len(truth)}
    figures = {attack: label_inference(guess, truth) for attack, guess in guesses.items()}
    strongest = max(figures, key=lambda attack: figures[attack]["label_inference_accuracy"])
    return {
        **figures[strongest],
        "label_attack": strongest,
        "label_attacks": {attack: f["label_inference_accuracy"] for attack, f in figures.items()},
        "label_inference_unmatched": unmatched,
    }


def _binary_attacks(
    steps, truth: torch.Tensor, gradients: torch.Tensor, counts: torch.Tensor, known: list[tuple[int, int]]
) -> dict:
    """Tracked direction scoring (named by the prior, or by the known labels) and norm scoring: two classes."""
    sides = torch.cat(
        [
            side[[b for b, row in enumerate(rows) if row is not None]]
            for side, (_, rows, _) in zip(tracked_sides([g for g, _, _ in steps]), steps)
        ]
    )
    majority = int(counts.argmax())
    guesses = {
        "tracked direction, prior": name_sides(sides, majority_class=majority),
        "tracked direction, known labels": name_sides(sides, known=known),
    }
    if len(truth) >= 2 and 0 < int(counts.min()):
        guesses["norm"] = norm_scoring(gradients, float(counts.min()) / len(truth), majority)
    return guesses


def _rows_at(packed: torch.Tensor, mask: torch.Tensor, position: str) -> torch.Tensor:
    """(N_real, H) packed rows of a right-padded (B, T) mask -> (B, H): each example's first or last real row."""
    lengths = mask.long().sum(1)
    starts = torch.cumsum(lengths, 0) - lengths
    index = starts if position == "first" else starts + lengths - 1
    return packed[index]


def _pair_with_texts(
    trainer: SplitTrainer, data: TextDataset, received: list[torch.Tensor]
) -> dict[int, tuple[int, torch.Tensor]]:
    """received index -> (text index, token ids): one to one within each length, nearest pairs first (see _pair),
    against each text's clean bottom output and what this client would send for it."""
    references: dict[int, list[tuple]] = {}
    index = 0
    for texts, labels, input_ids, mask, hidden in clean_batches(trainer, data):
        sent = trainer.to_send(hidden, mask, input_ids, labels, trainer.noise_keys(texts))
        for b in range(len(input_ids)):
            length = int(mask[b].sum())
            references.setdefault(length, []).append(
                (index, hidden[b, :length], sent[b, :length], input_ids[b, :length])
            )
            index += 1
    return _pair(references, received)


def _pair(references: dict[int, list[tuple]], received: list[torch.Tensor]) -> dict[int, tuple[int, torch.Tensor]]:
    """received index -> (reference index, token ids), references being {length: [(index, clean rows, sent rows,
    ids)]}: one to one within each length, nearest pairs first. The distance is the smaller of the distances to the
    clean bottom output and to what this client would send (exact for a run's keyed noise and frozen bottom; the
    clean output serves fresh noise and trained bottoms)."""
    by_length: dict[int, list[int]] = {}
    for i, rows in enumerate(received):
        by_length.setdefault(len(rows), []).append(i)
    matched = {}
    for length, indices in by_length.items():
        candidates = references.get(length, [])
        if not candidates:
            continue
        got = torch.stack([received[i].reshape(-1) for i in indices]).double()
        distances = torch.minimum(
            torch.cdist(got, torch.stack([c[1].reshape(-1) for c in candidates]).double()),
            torch.cdist(got, torch.stack([c[2].reshape(-1) for c in candidates]).double()),
        )
        for r, t in _one_to_one(distances):
            matched[indices[r]] = (candidates[t][0], candidates[t][3])
    return matched


def _one_to_one(distances: torch.Tensor) -> list[tuple[int, int]]:
    """(row, column) pairs of a distance matrix, nearest pairs first, each row and each column used once."""
    width = distances.shape[1]
    used_rows, used_columns, pairs = set(), set(), []
    for flat in distances.reshape(-1).argsort().tolist():
        r, c = divmod(flat, width)
        if r not in used_rows and c not in used_columns:
            used_rows.add(r)
            used_columns.add(c)
            pairs.append((r, c))
            if len(pairs) == min(distances.shape):
                break
    return pairs


def _assignment(costs: torch.Tensor) -> list[tuple[int, int]]:
    """(row, column) pairs of least total cost, each row and each column used once (min(shape) pairs)."""
    rows, columns = linear_sum_assignment(costs.numpy())
    return list(zip(rows.tolist(), columns.tolist()))


def link_copies(
    records: list[Record], received: list[torch.Tensor], sources: list[Record], epochs: int
) -> list[list[int]]:
    """The provider's linking of a fresh-noise run's copies (indices into received; sources: the record each was
    first received in): every epoch sends each training text once, so within each length the examples of epoch 1
    are matched one to one with those of each later epoch in turn, by least total squared distance to the mean of
    the copies linked so far (two copies of a text differ by noise draws; two texts by those and their difference:
    under isotropic noise the least-squares matching is the likeliest one). The epoch of a training step is its
    place among the run's steps, which come in `epochs` equal runs."""
    steps = sorted({(r.session, r.step) for r in records if r.kind == "forward"})
    per_epoch = max(1, -(-len(steps) // epochs))
    epoch_of_step = {key: n // per_epoch for n, key in enumerate(steps)}
    by_length: dict[int, dict[int, list[int]]] = {}
    for i, source in enumerate(sources):
        if source.kind == "forward":
            epoch = epoch_of_step[(source.session, source.step)]
            by_length.setdefault(len(received[i]), {}).setdefault(epoch, []).append(i)
    groups: dict[int, list[int]] = {}
    for by_epoch in by_length.values():
        anchors = by_epoch.get(0, [])
        if not anchors:
            continue
        # each later epoch is matched against the mean of the copies linked so far: its noise shrinks with every
        # epoch linked, so later links are surer than against epoch 1's copy alone
        total = torch.stack([received[i].reshape(-1) for i in anchors]).double()
        count = torch.ones(len(anchors), 1, dtype=torch.float64)
        for epoch in sorted(e for e in by_epoch if e != 0):
            others = by_epoch[epoch]
            right = torch.stack([received[i].reshape(-1) for i in others]).double()
            for a, b in _assignment(torch.cdist(total / count, right).square()):
                groups.setdefault(anchors[a], [anchors[a]]).append(others[b])
                total[a] += right[b]
                count[a] += 1
    return list(groups.values())


def _row_digests(hidden: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [
        hashlib.sha256(hidden[b, mask[b].bool()].float().numpy().tobytes()).hexdigest() for b in range(hidden.shape[0])
    ]


def _distinct_examples(records: list[Record]) -> tuple[list[torch.Tensor], list[str], list[Record]]:
    """Real-token rows of every received example, each distinct tensor once (re-sends collapse), their digests, and
    the record each was first received in."""
    seen, examples, digests, sources = set(), [], [], []
    for record in records:
        if "hidden_states" not in record.tensors:
            continue
        hidden, mask = record.tensors["hidden_states"], record.tensors["attention_mask"]
        for b, digest in enumerate(_row_digests(hidden, mask)):
            if digest not in seen:
                seen.add(digest)
                examples.append(hidden[b, mask[b].bool()].float())
                digests.append(digest)
                sources.append(record)
    return examples, digests, sources
