"""Split generation over real gRPC: greedy generation with noise off equals transformers' own single-process
`generate` of the same fine-tuned decoder token for token; the provider's cache lives for one call (freed at the end
or after --generation-timeout); repeating a prompt sends exactly the same noised vectors."""

from __future__ import annotations

import time

import pytest
import torch
from test_sft import BATCH, LR, SEED, K, _data, _snapshot
from transformers import AutoModel, AutoModelForCausalLM

from conftest import running_server
from sap_client.bottom import load_server_bottom, load_server_tail
from sap_client.generation import Sampling, generate_steps, generate_tokens
from sap_client.privacy import Privatizer
from sap_client.remote import RemoteTopService
from sap_client.sft import SFTTrainer
from sap_client.trainer import TrainConfig
from sap_common.errors import InvalidInputError, ResourceLimitError, ServerUnavailableError
from sap_common.models.families import DECODER, base_blocks
from sap_common.models.registry import load_model
from sap_common.peft import PeftConfig, apply_peft
from sap_common.recording import read_records
from sap_common.service import SessionSpec
from sap_server.generation import Generations
from sap_server.provider import Provider
from tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 12
PROMPTS = ([5, 17, 30, 41], [9, 12], [60, 7, 33, 21, 48, 11])


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A tiny decoder whose greedy text changes token now and then: a random one's tied logits are nearly flat (its
    table is N(0, 0.02^2)) and it repeats the prompt's last token; a larger table and louder blocks give the
    context a say (measured: each prompt's 12 greedy tokens change token 1-2 times)."""
    folder = build_tiny_model(tmp_path_factory.mktemp("decoder"), "llama")
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(8.0)
        for block in model.layers:
            block.mlp.down_proj.weight.mul_(100.0)
            block.self_attn.o_proj.weight.mul_(100.0)
    model.save_pretrained(folder)
    return folder


def _trained(folder, tmp_path, service, provider, user_tail: int, privatizer=None, steps: int = 4):
    """An SFTTrainer over the server's bottom and tail after `steps` LoRA steps on a tiny completion task, with its
    session still open; (trainer, the provider's trained top weights)."""
    info = service.server_info()
    bottom, tokenizer, _ = load_server_bottom(service, info, cache_root=tmp_path / "bottoms")
    lm_end = load_server_tail(service, info, user_tail, tmp_path / f"tail{user_tail}", lm_embedding=bottom.embeddings)
    config = TrainConfig(batch_size=BATCH, learning_rate=LR, seed=SEED, user_tail=user_tail, private_head=True)
    trainer = SFTTrainer(bottom, tokenizer, service, config, lm_end, privatizer, head_key=b"the user's own secret")
    trainer.open_generative()
    examples = _data(tmp_path, tokenizer, n=BATCH * steps)
    for start in range(0, len(examples), BATCH):
        trainer.sft_step(examples[start : start + BATCH])
    top = provider.sessions.get(trainer.session_id).top
    return trainer, _snapshot((n, p) for n, p in top.named_parameters() if p.requires_grad)


def _single_process(folder, user_tail: int, top: dict, user: dict):
    """The whole fine-tuned decoder in one transformers model: the provider's LoRA on blocks K..L-1-M, the user's on
    the last M, with the split run's trained values."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    blocks = base_blocks(model.model, DECODER)
    served, tail = blocks[K : len(blocks) - user_tail], blocks[len(blocks) - user_tail :]
    apply_peft(served, DECODER, PeftConfig(method="lora"))
    apply_peft(tail, DECODER, PeftConfig(method="lora"))
    with torch.no_grad():
        for part, values in ((served, top), (tail, user)):
            named = [
                (f"blocks.{i}.{n}", p) for i, b in enumerate(part) for n, p in b.named_parameters() if p.requires_grad
            ]
            assert {n for n, _ in named} == set(values)
            for name, param in named:
                param.copy_(values[name])
    return model


def _hf_greedy(model, prompt: list[int], eos: int | None) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy generate (its DynamicCache): the new tokens and the logits (N, V) each came from."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits)


@pytest.mark.parametrize("user_tail", [0, 1], ids=["tail0", "tail1"])
def test_greedy_split_generation_equals_single_process_generate(decoder, tmp_path, user_tail):
    provider = Provider.from_loaded(load_model(str(decoder)), split=K, peft=PeftConfig(method="lora"))
    try:
        with running_server(provider) as address, RemoteTopService(address) as service:
            trainer, top = _trained(decoder, tmp_path, service, provider, user_tail)
            greedy = Sampling(max_new_tokens=NEW_TOKENS, greedy=True)
            eos = trainer.tokenizer.eos_token_id
            split = [list(generate_steps(trainer, trainer.session_id, list(p), greedy)) for p in PROMPTS]
            user = trainer.user_state()
    finally:
        provider.close()
    reference = _single_process(decoder, user_tail, top, user)
    base = AutoModelForCausalLM.from_pretrained(decoder).eval()
    for prompt, steps in zip(PROMPTS, split, strict=True):
        tokens, logits = _hf_greedy(reference, list(prompt), eos)
        assert [token for token, _ in steps] == tokens  # token for token
        ours = torch.stack([step_logits for _, step_logits in steps])
        assert torch.allclose(ours, logits, atol=1e-4, rtol=1e-4), (ours - logits).abs().max()
        # the fine-tuned weights are what generates: the base model's logits are elsewhere
        _, base_logits = _hf_greedy(base, list(prompt), eos)
        if base_logits.shape == logits.shape:
            assert (base_logits - logits).abs().max() > 1e-2
    assert any(len(set(token for token, _ in steps)) > 1 for steps in split)  # not one token over and over


def test_the_provider_sees_hidden_states_only_and_a_repeated_prompt_sends_the_same_vectors(decoder, tmp_path):
    """With noise on, the recorded Generate pieces: (n, H) vectors only; one prompt generated twice sends identical
    vectors (its noise is keyed by the tokens), another prompt gets other noise."""
    record = tmp_path / "recording"
    provider = Provider.from_loaded(load_model(str(decoder)), split=K, peft=PeftConfig(), record_dir=record)
    privatizer = Privatizer(50.0, key=b"k" * 32)
    try:
        with running_server(provider) as address, RemoteTopService(address) as service:
            trainer, _ = _trained(decoder, tmp_path, service, provider, 1, privatizer, steps=1)
            sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0)
            before = len(read_records(record))
            runs = [list(generate_tokens(trainer, trainer.session_id, list(p), sampling)) for p in (PROMPTS[0],) * 2]
            other = list(generate_tokens(trainer, trainer.session_id, list(PROMPTS[1]), sampling))
    finally:
        provider.close()
    assert runs[0] == runs[1] and other
    pieces = [r for r in read_records(record)[before:] if r.kind == "generate"]
    first, second = pieces[: len(runs[0])], pieces[len(runs[0]) : 2 * len(runs[0])]
    assert len(first) == len(runs[0]) - (runs[0][-1] == trainer.tokenizer.eos_token_id) or len(first) == len(runs[0])
    assert [r.step for r in first] == [0] + list(range(len(PROMPTS[0]), len(PROMPTS[0]) + len(first) - 1))
    assert first[0].tensors["hidden_states"].shape == (1, len(PROMPTS[0]), 32)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.tensors["hidden_states"], b.tensors["hidden_states"])
    third = pieces[2 * len(runs[0])]
    assert not torch.allclose(third.tensors["hidden_states"][0, 0], first[0].tensors["hidden_states"][0, 0])


def _hidden_session(service) -> str:
    return service.open_session(SessionSpec(num_labels=0, output="hidden", user_tail=1))


def test_an_idle_generation_ends_and_frees_its_cache(decoder):
    provider = Provider.from_loaded(load_model(str(decoder)), split=K, peft=PeftConfig())
    generations = Generations(max_running=1, idle_timeout=0.5)
    try:
        with running_server(provider, generations=generations) as address, RemoteTopService(address) as service:
            session_id = _hidden_session(service)
            remote = service.generation(session_id)
            assert remote.step(torch.randn(3, 32)).shape == (3, 32)
            assert generations.running == 1
            deadline = time.monotonic() + 10
            while generations.running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert generations.running == 0  # the call ended by itself: its cache is gone
            with pytest.raises(ServerUnavailableError, match="--generation-timeout"):
                remote.step(torch.randn(1, 32))
            remote.close()
            with service.generation(session_id) as fresh:  # the slot is free again
                assert fresh.step(torch.randn(2, 32)).shape == (2, 32)
    finally:
        provider.close()


def test_generations_beyond_the_limit_and_on_a_classification_session_are_refused(decoder):
    provider = Provider.from_loaded(load_model(str(decoder)), split=K, peft=PeftConfig())
    generations = Generations(max_running=1, idle_timeout=30)
    try:
        with running_server(provider, generations=generations) as address, RemoteTopService(address) as service:
            session_id = _hidden_session(service)
            with service.generation(session_id) as first:
                first.step(torch.randn(2, 32))
                with pytest.raises(ResourceLimitError, match="--max-generations"):
                    with service.generation(session_id) as second:
                        second.step(torch.randn(2, 32))
            classify = service.open_session(SessionSpec(num_labels=2))
            with pytest.raises(InvalidInputError, match="packed hidden states"):
                with service.generation(classify) as refused:
                    refused.step(torch.randn(2, 32))
            with pytest.raises(InvalidInputError, match=r"expected \(N_real, 32\)"):
                with service.generation(session_id) as wrong:
                    wrong.step(torch.randn(2, 16))
    finally:
        provider.close()
