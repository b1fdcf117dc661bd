"""The audit's strongest inversion attacks on tiny models (no gRPC): sequential MAP decoding for causal decoders,
the learned inverter trained on public text, and `auto` reporting the strongest of the attacks it ran."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sap_client.audit.attacks import AttackConfig, simulated_mechanism
from sap_client.audit.inversion import optimization_inversion, token_recovery
from sap_client.audit.learned import LearnedConfig, train_inverter
from sap_client.audit.probe import fit_token_probe
from sap_client.audit.runner import simulated_audit
from sap_client.audit.sequential import SequentialConfig, extend, first_position_outputs, sequential_inversion
from sap_client.data import TextDataset
from sap_client.privacy import Privatizer
from sap_client.trainer import SplitTrainer, TrainConfig
from sap_common.dchi import eta_for_noise_ratio
from sap_common.models.registry import load_model
from sap_common.models.split import BottomModel, split_base
from tiny_models import SPECIALS, WORDS, build_tiny_model, learnable_rows

VOCAB = len(SPECIALS) + len(WORDS)
pytestmark = pytest.mark.usefixtures("one_thread")
# A shortlist far smaller than the vocabulary, so that finding the token is the attack's work, not a full scan.
SMALL = SequentialConfig(probe_candidates=4, embedding_candidates=4, gradient_candidates=4, beam=3)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("deep-llama"), "llama", layers=4, hidden=48, seed=3)


def _bottom(folder: Path, k: int) -> tuple[BottomModel, object]:
    loaded = load_model(str(folder))
    loaded.tokenizer.padding_side = "right"
    bottom, _ = split_base(loaded.base, k)
    bottom.eval()
    return bottom, loaded.tokenizer


def _batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _texts(n: int, seed: int) -> list[str]:
    return [text for text, _ in learnable_rows(n, seed=seed)]


def _received(bottom: BottomModel, ids, mask, ratio: float | None, key: bytes = b"user") -> tuple[torch.Tensor, float]:
    """What the provider receives (through the client's own Privatizer) and the eta used."""
    with torch.no_grad():
        hidden = bottom(ids, mask)
    if ratio is None:
        return hidden * mask.unsqueeze(-1), None
    eta = eta_for_noise_ratio(ratio, hidden[mask.bool()].norm(dim=-1).mean().item(), hidden.shape[-1])
    return Privatizer(eta, key=key)(hidden, mask, ids, None, [bytes([i]) for i in range(len(ids))]), eta


def _public(bottom: BottomModel, tokenizer, texts: list[str]) -> list[tuple]:
    out = []
    for start in range(0, len(texts), 16):
        ids, mask = _batch(tokenizer, texts[start : start + 16])
        with torch.no_grad():
            out.append((bottom(ids, mask), mask, ids))
    return out


def test_extend_with_a_kv_cache_equals_the_full_forward(deep_llama):
    bottom, tokenizer = _bottom(deep_llama, 3)
    ids, mask = _batch(tokenizer, _texts(3, seed=1))
    with torch.no_grad():
        full = bottom(ids, mask)
        table = bottom.input_embedding_matrix()
        prefix, outputs = None, []
        for t in range(ids.shape[1]):
            # the true token and two others as candidates of each prefix: only the true one continues the prefix
            candidates = torch.stack([ids[:, t], (ids[:, t] + 1) % VOCAB, (ids[:, t] + 7) % VOCAB], dim=1)
            out, new = extend(bottom, prefix, table[candidates], t)
            outputs.append(out[:, 0])
            prefix = {
                layer: (
                    torch.cat([prefix[layer][0], k[:, :, :1]], 2) if prefix else k[:, :, :1],
                    torch.cat([prefix[layer][1], v[:, :, :1]], 2) if prefix else v[:, :, :1],
                )
                for layer, (k, v) in new.items()
            }
    real = mask.bool()
    torch.testing.assert_close(torch.stack(outputs, 1)[real], full[real], atol=1e-5, rtol=1e-5)


def test_sequential_inversion_recovers_a_causal_model_and_beats_optimization(deep_llama):
    bottom, tokenizer = _bottom(deep_llama, 3)
    ids, mask = _batch(tokenizer, _texts(12, seed=1))
    probe_rows = [(h, m, i) for h, m, i in _public(bottom, tokenizer, _texts(200, seed=9))]
    hidden = torch.cat([h[m.bool()] for h, m, _ in probe_rows])
    probe = fit_token_probe(hidden, torch.cat([i[m.bool()] for _, m, i in probe_rows]), bottom.input_embedding_matrix())
    first = first_position_outputs(bottom)
    before = {name: p.detach().clone() for name, p in bottom.named_parameters()}

    clean, _ = _received(bottom, ids, mask, None)
    exact = token_recovery(
        sequential_inversion(clean, mask, bottom, probe=probe, first_outputs=first, config=SMALL), ids, mask
    )["recovery"]
    assert exact >= 0.99
    noisy, _ = _received(bottom, ids, mask, 6.0)
    heavy = token_recovery(
        sequential_inversion(noisy, mask, bottom, probe=probe, first_outputs=first, config=SMALL), ids, mask
    )["recovery"]
    assert heavy < exact - 0.3  # heavy noise: clearly fewer
    # the same received vectors at a moderate noise, both attacks
    moderate, _ = _received(bottom, ids, mask, 1.5)
    sequential = token_recovery(
        sequential_inversion(moderate, mask, bottom, probe=probe, first_outputs=first, config=SMALL), ids, mask
    )["recovery"]
    optimization = token_recovery(optimization_inversion(moderate, mask, bottom, steps=200), ids, mask)["recovery"]
    print(
        f"sequential: {exact:.3f} clean, {heavy:.3f} at R 6; at R 1.5 {sequential:.3f} vs optimization "
        f"{optimization:.3f}"
    )
    assert sequential > optimization
    for name, p in bottom.named_parameters():
        assert torch.equal(p, before[name]), name


def test_sequential_inversion_refuses_an_encoder(tiny_bert):
    bottom, tokenizer = _bottom(tiny_bert, 1)
    ids, mask = _batch(tokenizer, _texts(2, seed=1))
    with pytest.raises(ValueError, match="causal decoder"):
        sequential_inversion(torch.zeros(*ids.shape, 32), mask, bottom)


def test_sequential_config_validates():
    with pytest.raises(ValueError, match="beam"):
        SequentialConfig(beam=0)
    with pytest.raises(ValueError, match="both are 0"):
        SequentialConfig(probe_candidates=0, embedding_candidates=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_learned_inverter_trained_on_disjoint_public_text_beats_chance(family, tiny_bert, tiny_llama):
    bottom, tokenizer = _bottom(tiny_bert if family == "bert" else tiny_llama, 2)
    victims, public = _texts(24, seed=1), _texts(400, seed=2)
    public = [text for text in public if text not in set(victims)]
    assert not set(public) & set(victims)  # the attacker never trains on a victim's text
    ids, mask = _batch(tokenizer, victims)
    received, eta = _received(bottom, ids, mask, 1.0)
    inverter = train_inverter(
        _public(bottom, tokenizer, public),
        simulated_mechanism(Privatizer(eta, key=b"other")),
        config=LearnedConfig(width=64, layers=1, epochs=8, lr=3e-3),
    )
    recovered = token_recovery(inverter(received, mask), ids, mask)["recovery"]
    print(f"learned inverter ({family}, k = 2, R 1): {recovered:.3f}")
    assert recovered > 10 / VOCAB  # chance is 1 / VOCAB, about 0.011


def test_auto_reports_the_strongest_attack_it_ran(tiny_bert):
    """One attack made strictly stronger than the other, each way round: the audit's figure is the stronger one's."""
    bottom, tokenizer = _bottom(tiny_bert, 2)
    trainer = SplitTrainer(bottom, tokenizer, None, TrainConfig(batch_size=12))
    texts = _texts(12, seed=1)
    with torch.no_grad():
        ids, mask = trainer.encode(texts)
        norm = bottom(ids, mask)[mask.bool()].norm(dim=-1).mean().item()
    trainer.privatizer = Privatizer(eta_for_noise_ratio(1.0, norm, 32), key=b"user")
    data = TextDataset(texts, [], [])
    public = _texts(300, seed=2)
    reports = {}
    for name, steps, epochs in (("learned stronger", 1, 8), ("optimization stronger", 300, 1)):
        config = AttackConfig(steps=steps, learned=LearnedConfig(width=32, layers=1, epochs=epochs))
        reports[name] = report = simulated_audit(trainer, data, None, config, public=public)
        assert report["attacks_run"] == ["optimization", "learned"]
        by_attack = {kind: figures["recovery"] for kind, figures in report["eia_attacks"].items()}
        assert report["eia_token_recovery"] == max(by_attack.values())
        assert report["eia_privacy"] == 1 - max(by_attack.values())
        assert report["eia_token_recovery_content"] == max(
            f["recovery_content"] for f in report["eia_attacks"].values()
        )
    learned, optimization = reports["learned stronger"], reports["optimization stronger"]
    print({name: {k: round(v["recovery"], 3) for k, v in r["eia_attacks"].items()} for name, r in reports.items()})
    assert learned["eia_attacks"]["learned"]["recovery"] > learned["eia_attacks"]["optimization"]["recovery"]
    assert learned["attack"] == "learned"
    assert optimization["eia_attacks"]["optimization"]["recovery"] > optimization["eia_attacks"]["learned"]["recovery"]
    assert optimization["attack"] == "optimization"
    assert learned["public_examples"] == 300
