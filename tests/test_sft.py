"""Generative fine-tuning through the split over real gRPC (SFTTrainer): it equals single-process fine-tuning of the
same decoder on the same loss mask, no vocabulary-sized tensor crosses the wire, and a tiny decoder learns."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_equivalence import assert_all_moved, assert_same_params
from transformers import AutoModel, AutoModelForCausalLM

from conftest import running_server
from sap_client.audit.targets import next_token_targets, read_targets
from sap_client.bottom import load_server_bottom, load_server_tail
from sap_client.remote import RemoteTopService
from sap_client.sft import SFTTrainer, batch_tensors
from sap_client.sft_data import load_sft_jsonl
from sap_client.trainer import TrainConfig
from sap_common.errors import InvalidInputError
from sap_common.models.families import DECODER, base_blocks
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig, apply_peft
from sap_common.recording import read_records
from sap_server.provider import Provider
from tiny_models import WORDS, build_tiny_model

K, SEED, LR, BATCH, STEPS = 1, 0, 1e-2, 4, 4
TOL = 5e-5
VOCAB, HIDDEN = 4 + len(WORDS), 32  # tests/tiny_models.py's vocabulary and hidden size

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, seed: int) -> list[dict]:
    """prompt/completion pairs a tiny decoder can learn: the completion names the parity of the prompt's first word."""
    rng = random.Random(seed)
    fillers = [w for w in WORDS if w.startswith("w")]
    rows = []
    for _ in range(n):
        words = rng.sample(fillers, rng.randint(2, 5))
        rows.append({"prompt": " ".join(words), "completion": "good movie" if int(words[0][1:]) % 2 else "bad plot"})
    return rows


def _data(tmp_path: Path, tokenizer, n: int = BATCH * STEPS, seed: int = 0):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
    return load_sft_jsonl(path, tokenizer).examples


def _snapshot(named) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named}


def _split_run(folder: Path, tmp_path: Path, user_tail: int, method: str, record: Path | None = None):
    provider = Provider.from_loaded(load_model(str(folder)), split=K, peft=PeftConfig(method=method), record_dir=record)
    try:
        with running_server(provider) as address, RemoteTopService(address) as service:
            info = service.server_info()
            bottom, tokenizer, _ = load_server_bottom(service, info, cache_root=tmp_path / "bottoms")
            lm_end = load_server_tail(service, info, user_tail, tmp_path / "tail", lm_embedding=bottom.embeddings)
            config = TrainConfig(batch_size=BATCH, learning_rate=LR, seed=SEED, user_tail=user_tail, private_head=True)
            trainer = SFTTrainer(bottom, tokenizer, service, config, lm_end, head_key=b"the user's own secret")
            trainer.open_generative()
            session = provider.sessions.get(trainer.session_id)
            assert session.output == "hidden" and session.num_labels == 0
            assert len(session.top.blocks) == info.total_blocks - K - user_tail
            top = lambda: ((n, p) for n, p in session.top.named_parameters() if p.requires_grad)  # noqa: E731
            initial_top, initial_user = _snapshot(top()), trainer.user_state()
            examples = _data(tmp_path, tokenizer)
            losses = [trainer.sft_step(examples[s : s + BATCH]) for s in range(0, len(examples), BATCH)]
            final_top, final_user = _snapshot(top()), trainer.user_state()
            assert service.close_session(trainer.session_id) == STEPS
            return examples, losses, (initial_top, final_top), (initial_user, final_user), tokenizer
    finally:
        provider.close()


def _reference(folder: Path, examples, tokenizer, user_tail: int, method: str, initial_user):
    """The whole decoder in one process, as transformers runs it for causal LM fine-tuning (its own shifted,
    masked loss and tied output layer): the provider's PEFT on blocks K..L-1-M (seeded as the provider seeds it),
    the user's LoRA on the last M (from the split run's first values)."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    model.requires_grad_(False)
    base = model.model
    blocks = base_blocks(base, DECODER)
    served, tail = blocks[K : len(blocks) - user_tail], blocks[len(blocks) - user_tail :]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        apply_peft(served, DECODER, PeftConfig(method=method))
    apply_peft(tail, DECODER, PeftConfig(method="lora"))
    user = lambda: [  # noqa: E731
        (f"blocks.{i}.{n}", p) for i, block in enumerate(tail) for n, p in block.named_parameters() if p.requires_grad
    ]
    top = lambda: [  # noqa: E731
        (f"blocks.{i}.{n}", p) for i, block in enumerate(served) for n, p in block.named_parameters() if p.requires_grad
    ]
    with torch.no_grad():
        for name, param in user():
            param.copy_(initial_user[name])
    assert {n for n, _ in user()} == set(initial_user)
    optimizer = torch.optim.AdamW([p for _, p in top()] + [p for _, p in user()], lr=LR, weight_decay=0.0)
    model.train()
    losses = []
    for start in range(0, len(examples), BATCH):
        batch = examples[start : start + BATCH]
        longest = max(len(e) for e in batch)
        pad = lambda row, value: row + [value] * (longest - len(row))  # noqa: E731
        ids = torch.tensor([pad(e.input_ids, tokenizer.pad_token_id) for e in batch])
        mask = torch.tensor([pad([1] * len(e), 0) for e in batch])
        labels = torch.tensor([pad([t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)], -100) for e in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return _snapshot(top()), _snapshot(user()), losses


@pytest.mark.parametrize("user_tail", [0, 1], ids=["tail0", "tail1"])
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_generative_split_training_equals_single_process_training(tiny_llama, tmp_path, user_tail, method):
    examples, losses, (top0, top1), (user0, user1), tokenizer = _split_run(tiny_llama, tmp_path, user_tail, method)
    assert sum(not m for e in examples for m in e.loss_mask) > 0  # the prompts are not in the loss
    top, user, reference_losses = _reference(tiny_llama, examples, tokenizer, user_tail, method, user0)
    assert_all_moved(top0, top1, "split top")
    assert_same_params(top1, top, f"top after {STEPS} steps", tol=TOL)
    if user_tail:
        assert_all_moved(user0, user1, "user's tail LoRA")
        assert_same_params(user1, user, f"user's tail after {STEPS} steps", tol=TOL)
    else:
        assert user1 == {} and user == {}
    assert max(abs(a - b) for a, b in zip(losses, reference_losses, strict=True)) <= TOL, (losses, reference_losses)


@pytest.mark.parametrize("user_tail", [0, 1], ids=["tail0", "tail1"])
def test_no_vocabulary_sized_tensor_crosses_the_wire(tiny_llama, tmp_path, user_tail):
    """The provider's view (--record): packed hidden states in, their gradient in; nothing of the vocabulary's size,
    and no token id."""
    record = tmp_path / "recording"
    examples, *_ = _split_run(tiny_llama, tmp_path, user_tail, "lora", record=record)
    records = read_records(record)
    backward = [r for r in records if r.kind == "backward"]
    assert len(backward) == STEPS
    real_tokens = sum(len(e) for e in examples)
    assert sum(r.tensors["grad_hidden"].shape[0] for r in backward) == real_tokens
    for r in records:
        for name, tensor in r.tensors.items():
            assert VOCAB not in tensor.shape, (r.kind, name, tuple(tensor.shape))
            assert tensor.shape[-1] == HIDDEN or name == "attention_mask", (r.kind, name, tuple(tensor.shape))


def _keyword_rows(n: int, seed: int) -> list[dict]:
    """The completion says which sentiment word the prompt holds, among filler words."""
    rng = random.Random(seed)
    fillers = [w for w in WORDS if w.startswith("w")]
    rows = []
    for i in range(n):
        words = rng.sample(fillers, rng.randint(2, 5))
        words.insert(rng.randrange(len(words) + 1), "great" if i % 2 == 0 else "awful")
        rows.append({"prompt": " ".join(words), "completion": "good movie" if i % 2 == 0 else "bad plot"})
    return rows


def test_a_tiny_decoder_learns_a_completion_task_through_the_split(tmp_path):
    """A random tiny decoder's embedding table is N(0, 0.02^2): its tied logits stay nearly flat whatever the
    blocks do (the perplexity cannot fall below about 50 of the 92 words). Scaled by 8, the table gives the blocks
    room: measured, perplexity 258 before and 3.5-3.8 after 8 epochs (an answer that reads the keyword: 1)."""
    folder = build_tiny_model(tmp_path / "decoder", "llama")
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(8.0)
    model.save_pretrained(folder)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _keyword_rows(240, seed=0)))
    provider = Provider.from_loaded(load_model(str(folder)), split=K, peft=PeftConfig())
    try:
        with running_server(provider) as address, RemoteTopService(address) as service:
            info = service.server_info()
            bottom, tokenizer, _ = load_server_bottom(service, info, cache_root=tmp_path / "bottoms")
            lm_end = load_server_tail(service, info, 1, tmp_path / "tail", lm_embedding=bottom.embeddings)
            examples = load_sft_jsonl(path, tokenizer).examples
            config = TrainConfig(epochs=8, batch_size=16, learning_rate=2e-2, seed=SEED, user_tail=1, private_head=True)
            trainer = SFTTrainer(bottom, tokenizer, service, config, lm_end, head_key=b"fixed: a repeatable tail LoRA")
            metrics = trainer.fit_generative(examples[:200], examples[200:])
    finally:
        provider.close()
    assert metrics["eval_perplexity_before"] > 100, metrics
    assert metrics["eval_perplexity"] < 6, metrics
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 9))
    assert metrics["train_tokens"] == 8 * sum(len(e) for e in examples[:200])


def test_generative_fine_tuning_needs_a_decoder_with_tied_embeddings(tiny_bert, tmp_path):
    untied = build_tiny_model(tmp_path / "untied", "llama")
    config = json.loads((untied / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(config))
    for folder, message in [(tiny_bert, "need a decoder"), (untied, "tied models only")]:
        provider = Provider.from_loaded(load_model(str(folder)), split=K, peft=PeftConfig())
        try:
            with pytest.raises(InvalidInputError, match=message):
                provider.tail_bundle(0, lm_head=True)
        finally:
            provider.close()


@pytest.mark.parametrize("user_tail", [0, 1], ids=["tail0", "tail1"])
def test_the_target_reader_reads_completions_from_the_recorded_gradients(tiny_llama, tmp_path, user_tail):
    """The provider's view (--record) of a generative run: every gradient row whose loss term has a target names
    it, with or without a user-kept block, on a tiny decoder (completions of random filler words)."""
    record = tmp_path / "recording"
    examples, *_ = _split_run(tiny_llama, tmp_path, user_tail, "lora", record=record)
    records = read_records(record)
    forwards = {(r.session, r.step): r for r in records if r.kind == "forward"}
    model = AutoModel.from_pretrained(tiny_llama)  # the provider's own copy of the pretrained model
    hits = total = 0
    for step, backward in enumerate(sorted((r for r in records if r.kind == "backward"), key=lambda r: r.step)):
        batch = examples[step * BATCH : (step + 1) * BATCH]
        _, mask, targets = batch_tensors(batch, 0)
        assert torch.equal(forwards[(backward.session, backward.step)].tensors["attention_mask"].long(), mask)
        want = next_token_targets(targets, mask)
        guess = read_targets(backward.tensors["grad_hidden"], model.embed_tokens.weight, model.norm.weight)
        chosen = want != -100
        hits += int((guess[chosen] == want[chosen]).sum())
        total += int(chosen.sum())
    assert total == sum(sum(e.loss_mask) for e in examples)
    assert hits / total >= 0.95, (hits, total)
