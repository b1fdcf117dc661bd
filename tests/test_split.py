"""Unit tests of model splitting and the bottom bundle: bottom-then-top equals the unsplit model (no gRPC)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2Model

from sap_common.errors import ModelLoadError, UnsupportedModelError
from sap_common.models.bundle import (
    META,
    TOKENIZER_DIR,
    WEIGHTS,
    bundle_files,
    bundle_sha256,
    export_bottom,
    load_bottom,
)
from sap_common.models.registry import load_model
from sap_common.models.split import split_base, split_sequence_classifier

TOL = 1e-5
# Different lengths, so the batch is right-padded and the padding mask matters.
TEXTS = [
    "good movie",
    "w1 w2 w3 w4 w5 bad plot w6",
    "great",
    "w7 w8 poor w9 w10 w11 w12 w13 w14 w15",
]


def _encode(folder: Path, texts: list[str] = TEXTS) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    mask = batch["attention_mask"]
    if len(texts) > 1:
        assert len(set(mask.sum(-1).tolist())) > 1, "the test batch must hold texts of different lengths"
        assert (mask[:, 0] == 1).all() and (mask[:, -1] == 0).any(), "the test batch must be right-padded"
    return batch["input_ids"], mask


def _classifier(folder: Path, num_labels: int = 3):
    torch.manual_seed(0)  # the head of a headless checkpoint is initialised at random
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels).eval()


def _num_blocks(folder: Path) -> int:
    return AutoConfig.from_pretrained(folder).num_hidden_layers


@pytest.mark.parametrize("where", ["first", "second", "last"])
def test_bottom_then_top_equals_unsplit_model(tiny_model, where):
    total = _num_blocks(tiny_model)
    k = {"first": 0, "second": 1, "last": total - 1}[where]
    model = _classifier(tiny_model)
    input_ids, mask = _encode(tiny_model)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits  # (B, 3)
        bottom, top = split_sequence_classifier(model, k)
        hidden = bottom(input_ids, mask)  # (B, T, H)
        logits = top(hidden, mask)
    assert bottom.split == k and len(top.blocks) == total - k and top.first_index == k
    assert hidden.shape == (*input_ids.shape, model.config.hidden_size)
    assert logits.shape == expected.shape == (len(TEXTS), 3)
    diff = (logits - expected).abs().max().item()
    assert diff <= TOL, f"split at k={k}: max abs logit diff {diff:.3g} > {TOL}"
    # Not vacuous: the examples get different logits, so a wrong pooled token would show.
    assert (expected[0] - expected[1]).abs().max() > 1e-4


@pytest.mark.parametrize("layers", [1, 4])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_split_equals_unsplit_for_other_depths(tmp_path, family, layers):
    from tiny_models import build_tiny_model

    folder = build_tiny_model(tmp_path / family, family, layers=layers, seed=1)
    model = _classifier(folder)
    input_ids, mask = _encode(folder)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits
        for k in sorted({0, layers // 2, layers - 1}):
            bottom, top = split_sequence_classifier(model, k)
            diff = (top(bottom(input_ids, mask), mask) - expected).abs().max().item()
            assert diff <= TOL, f"{family}, {layers} blocks, k={k}: max abs logit diff {diff:.3g}"


def test_padding_does_not_change_a_text_logits(tiny_model):
    """The split model's logits of a text do not depend on how much padding its batch adds."""
    model = _classifier(tiny_model)
    bottom, top = split_sequence_classifier(model, 1)
    input_ids, mask = _encode(tiny_model)
    alone_ids, alone_mask = _encode(tiny_model, TEXTS[:1])
    assert alone_ids.shape[1] < input_ids.shape[1]
    with torch.no_grad():
        batched = top(bottom(input_ids, mask), mask)[0]
        alone = top(bottom(alone_ids, alone_mask), alone_mask)[0]
    diff = (batched - alone).abs().max().item()
    assert diff <= TOL, f"padding changed the logits of a text by {diff:.3g}"


@pytest.mark.parametrize("k", [-1, "L", "L+1"])
def test_out_of_range_split_raises_model_load_error(tiny_model, k):
    total = _num_blocks(tiny_model)
    k = {"L": total, "L+1": total + 1}.get(k, k)
    model = _classifier(tiny_model)
    with pytest.raises(ModelLoadError, match=rf"k={k}\b.*0\.\.{total - 1}"):
        split_sequence_classifier(model, k)
    with pytest.raises(ModelLoadError):
        split_base(model.base_model, k)


def test_split_shares_modules_with_the_model(tiny_model):
    """The split reuses the model's modules (no copy): a weight change shows on both sides."""
    model = _classifier(tiny_model)
    bottom, top = split_sequence_classifier(model, 1)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in bottom.parameters())
    assert all(id(p) in ids for p in top.parameters())
    bottom_ids = {id(p) for p in bottom.parameters()}
    assert not bottom_ids & {id(p) for p in top.blocks.parameters()}, "a block is on both sides"


def test_top_without_head_raises(tiny_model):
    loaded = load_model(str(tiny_model))
    bottom, top = split_base(loaded.base, 1)
    input_ids, mask = _encode(tiny_model)
    with torch.no_grad(), pytest.raises(ModelLoadError, match="head"):
        top(bottom(input_ids, mask), mask)


# --- bottom bundle -------------------------------------------------------------------------------


def _export(folder: Path, k: int, target: Path):
    loaded = load_model(str(folder))
    bottom, _ = split_base(loaded.base, k)
    target.mkdir(parents=True, exist_ok=True)
    meta = export_bottom(bottom, loaded.tokenizer, loaded.model_id, loaded.base.config.num_hidden_layers, target)
    return bottom, meta


@pytest.mark.parametrize("k", [0, 1, 2])
def test_bundle_round_trip_gives_identical_bottom(tiny_model, tmp_path, k):
    original, meta = _export(tiny_model, k, tmp_path / "bundle")
    assert {WEIGHTS, META, "config.json"} <= set(bundle_files(tmp_path / "bundle"))
    assert any(name.startswith(f"{TOKENIZER_DIR}/") for name in bundle_files(tmp_path / "bundle"))
    loaded, tokenizer, loaded_meta = load_bottom(tmp_path / "bundle")
    assert loaded_meta == meta
    assert meta.split == k and meta.total_blocks == _num_blocks(tiny_model)
    assert loaded.split == k and loaded.family is original.family
    assert not loaded.training
    # The same weights, under the same names.
    ours, theirs = original.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs after the round trip"
    # The same outputs, from the bundled tokenizer.
    tokenizer.padding_side = "right"
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    input_ids, mask = _encode(tiny_model)
    assert torch.equal(batch["input_ids"], input_ids) and torch.equal(batch["attention_mask"], mask)
    with torch.no_grad():
        expected, got = original(input_ids, mask), loaded(input_ids, mask)
    assert got.shape == expected.shape == (*input_ids.shape, meta.hidden_size)
    assert (got - expected).abs().max().item() == 0.0


def test_bundle_holds_no_top_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file

    _export(tiny_model, 1, tmp_path / "bundle")
    names = load_file(str(tmp_path / "bundle" / WEIGHTS)).keys()
    assert any(n.startswith("blocks.0.") for n in names)
    assert not any(n.startswith(("blocks.1.", "blocks.2.")) for n in names), "top blocks leaked into the bundle"
    assert AutoConfig.from_pretrained(tmp_path / "bundle").num_hidden_layers == 1


def test_bundle_sha256_is_stable_and_detects_a_changed_byte(tiny_model, tmp_path):
    _export(tiny_model, 1, tmp_path / "a")
    _export(tiny_model, 1, tmp_path / "b")
    first = bundle_sha256(tmp_path / "a")
    assert len(first) == 64 and bundle_sha256(tmp_path / "a") == first
    assert bundle_sha256(tmp_path / "b") == first, "exporting the same bottom twice gave different hashes"
    for relative in bundle_files(tmp_path / "a"):
        changed = tmp_path / "changed"
        shutil.rmtree(changed, ignore_errors=True)
        shutil.copytree(tmp_path / "a", changed)
        data = bytearray((changed / relative).read_bytes())
        data[len(data) // 2] ^= 0x01
        (changed / relative).write_bytes(bytes(data))
        assert bundle_sha256(changed) != first, f"flipping a bit of {relative} kept the hash"
    # A renamed file changes it too (paths are hashed with the bytes).
    renamed = tmp_path / "renamed"
    shutil.copytree(tmp_path / "a", renamed)
    (renamed / META).rename(renamed / "other.json")
    assert bundle_sha256(renamed) != first


def test_bundle_of_another_split_has_another_hash(tiny_model, tmp_path):
    _export(tiny_model, 1, tmp_path / "k1")
    _export(tiny_model, 2, tmp_path / "k2")
    assert bundle_sha256(tmp_path / "k1") != bundle_sha256(tmp_path / "k2")


def test_load_bottom_rejects_a_folder_without_metadata(tmp_path):
    with pytest.raises(ModelLoadError, match=META):
        load_bottom(tmp_path)


# --- model loading ------------------------------------------------------------------------------


def test_unsupported_model_type_raises_unsupported_model_error(tmp_path):
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported.*bert.*llama"):
        load_model(str(folder))


def test_load_model_of_a_missing_folder_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path / "nowhere"))


def test_load_model_gives_a_frozen_eval_base(tiny_model):
    loaded = load_model(str(tiny_model))
    assert not loaded.base.training
    assert not any(p.requires_grad for p in loaded.base.parameters())
    assert loaded.tokenizer.pad_token_id == 0


def test_a_sessions_steps_do_not_depend_on_an_evaluation_before_them(tiny_bert, tmp_path):
    """A top with dropout: the first training forward switches the whole tree to training mode whether or not the
    session evaluated first (a mixed tree, an eval-mode model under a training-mode root with new PEFT layers, once
    kept the model's own dropout off until an evaluation flipped it, so a session moved to another replica and
    evaluated there before resuming trained differently)."""
    import json
    import shutil

    from sap_common.models.registry import load_model
    from sap_common.peft import PeftConfig
    from sap_common.service import SessionSpec
    from sap_server.local import LocalTopService
    from sap_server.provider import Provider
    from session_steps import batch, step

    folder = tmp_path / "bert-with-dropout"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (folder / "config.json").write_text(json.dumps(config))
    provider = Provider.from_loaded(load_model(str(folder)), split=1, peft=PeftConfig())
    try:
        service = LocalTopService(provider)
        spec = SessionSpec(num_labels=2, learning_rate=1e-2, seed=5)
        plain, evaluated = service.open_session(spec), service.open_session(spec)
        hidden, mask, _ = batch(5, 100)
        service.evaluate(evaluated, hidden, mask)
        for n in range(1, 4):
            step(service, plain, 5, n)
            step(service, evaluated, 5, n)
        a = provider.sessions.get(plain).trainable_state()
        b = provider.sessions.get(evaluated).trainable_state()
    finally:
        provider.close()
    assert all(torch.equal(a[k], b[k]) for k in a)
