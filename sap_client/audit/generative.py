"""The audit of a generative fine-tuning run (sap-client audit DATA.jsonl --run RUN_DIR): what the provider can read
of the user's chats, prompts and replies alike, with the user's own data as the ground truth.

Two readings, the strongest attack of each reported:
- from the hidden states it received (every token of every example): the inversion attacks of the classification
  audit (sap_client/audit/attacks.py: nearest neighbour or optimization, sequential, learned), on the recorded
  Forward and Evaluate tensors, or without a recording on what this client would send;
- from the gradients it received (recorded Backward, one row per token): the target tokens, read by
  sap_client/audit/targets.py (a lower bound: the norm's Jacobian is ignored).

Each received example is paired with the data example whose sent tensor (the run's keyed noise) or clean bottom
output is nearest, one to one (sap_client/audit/recorded.py). Generation pieces (Generate) are not paired: their
text is what the model wrote, which the data does not hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sap_client.audit.attacks import AttackConfig, Attacker, simulated_mechanism
from sap_client.audit.recorded import _distinct_examples, _pair, _row_digests, invert_received
from sap_client.audit.runner import eia_report
from sap_client.audit.targets import read_targets
from sap_client.sft import SFTTrainer, batch_tensors, noise_key
from sap_client.sft_data import SFTExample
from sap_common.recording import Record


def _references(trainer: SFTTrainer, examples: Sequence[SFTExample]) -> dict[int, list[tuple]]:
    """{length: [(example index, clean rows, sent rows, ids)]}: what this client's bottom makes of each example and
    what it sends for it (the one send function, the run's noise)."""
    references: dict[int, list[tuple]] = {}
    size = trainer.config.batch_size
    for start in range(0, len(examples), size):
        batch = examples[start : start + size]
        ids, mask, _ = batch_tensors(batch, trainer.pad_id)
        hidden = trainer.bottom_outputs(ids, mask)
        sent = trainer.to_send(hidden, mask, ids, None, [noise_key(e) for e in batch])
        for b, example in enumerate(batch):
            n = len(example)
            references.setdefault(n, []).append((start + b, hidden[b, :n], sent[b, :n], ids[b, :n]))
    return references


def _public_batches(trainer: SFTTrainer, examples: Sequence[SFTExample]) -> list[tuple]:
    """The provider's own chats through the pretrained bottom: (clean hidden, mask, ids) batches."""
    batches = []
    size = trainer.config.batch_size
    for start in range(0, len(examples), size):
        ids, mask, _ = batch_tensors(examples[start : start + size], trainer.pad_id)
        batches.append((trainer.bottom_outputs(ids, mask), mask, ids))
    return batches


def generative_audit(
    trainer: SFTTrainer,
    examples: Sequence[SFTExample],
    attacked: int,
    records: list[Record] | None,
    config: AttackConfig,
    public: Sequence[SFTExample] = (),
) -> dict:
    """Attack what the provider received for examples (a recording, or what this client would send): inversion of
    the hidden states of the first `attacked` paired examples, and the target tokens of every recorded gradient row
    whose example is paired. public: the provider's own chats (never attacked ones), for the probe and the learned
    inverter."""
    references = _references(trainer, examples)
    if records is not None:
        forwards = [r for r in records if r.kind in ("forward", "evaluate")]
        received, digests, _ = _distinct_examples(forwards)
        matched = _pair(references, received)  # received index -> (example index, ids)
    else:
        rows = sorted((c for group in references.values() for c in group), key=lambda c: c[0])
        received, digests = [row[2] for row in rows], []
        matched = {i: (row[0], row[3]) for i, row in enumerate(rows)}
    order = sorted((i for i in matched if matched[i][0] < attacked), key=lambda i: matched[i][0])
    if not order:
        raise ValueError("no received example matches an example of the data (same tokenizer, split and data?)")
    provider = Attacker(
        trainer.bottom, config, perturb=simulated_mechanism(trainer.privatizer), public=_public_batches(trainer, public)
    )
    report = eia_report({1: invert_received(provider, trainer, received, matched, order)}, trainer, provider)
    report.update(examples=len(order), recorded_examples=len(received), unmatched_examples=len(received) - len(matched))
    report["public_examples"] = len(public)
    if records is not None:
        example_of = {digests[i]: matched[i][0] for i in matched}
        report.update(_target_reading(trainer, examples, records, example_of))
    return report


def _target_reading(
    trainer: SFTTrainer, examples: Sequence[SFTExample], records: list[Record], example_of: dict[str, int]
) -> dict:
    """The target tokens read from every recorded Backward gradient (grad_hidden, one row per real token of its
    step's forward), scored where the forward's example is paired and the row's token has a target."""
    norm = getattr(trainer.lm_end.head, "norm", None)
    norm_weight = norm.weight.detach().float() if norm is not None and hasattr(norm, "weight") else None
    table = trainer.bottom.input_embedding_matrix().detach().float()
    forward_of = {(r.session, r.step): r for r in records if r.kind == "forward"}  # the last forward of each step
    hits = total = steps = 0
    for record in records:
        if record.kind != "backward" or "grad_hidden" not in record.tensors:
            continue
        forward = forward_of.get((record.session, record.step))
        if forward is None:
            continue
        mask = forward.tensors["attention_mask"]
        wanted = []
        for b, digest in enumerate(_row_digests(forward.tensors["hidden_states"], mask)):
            n = int(mask[b].sum())
            index = example_of.get(digest)
            if index is None or len(examples[index]) != n:
                wanted += [-100] * n
                continue
            example = examples[index]
            wanted += [example.input_ids[t + 1] if t + 1 < n and example.loss_mask[t + 1] else -100 for t in range(n)]
        grad = record.tensors["grad_hidden"].float()
        if grad.shape[0] != len(wanted):
            continue
        want = torch.tensor(wanted)
        chosen = want != -100
        if not bool(chosen.any()):
            continue
        guess = read_targets(grad[chosen], table, norm_weight)
        hits += int((guess == want[chosen]).sum())
        total += int(chosen.sum())
        steps += 1
    if not total:
        return {}
    return {
        "targets_read": hits / total,
        "target_tokens": total,
        "target_steps": steps,
        "targets_privacy": 1 - hits / total,
    }
