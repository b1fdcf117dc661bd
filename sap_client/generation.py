"""Split generation (sap-client generate): a fine-tuned decoder writes text through the split, token by token.

For each piece of the sequence (the prompt, then each token just chosen) the user's bottom runs with its own
key/value cache, the piece's vectors go through the one send function (SplitTrainer.to_send, with the run's
noise), the provider's top answers the piece's hidden states from its own cache (TopService.generation), and the
user's tail, final norm and output layer (with their cache) give the next token's distribution here: the chosen
token, like the logits, never leaves this machine.

A piece's noise is keyed by the run's secret and the sequence's tokens up to the piece's end, so generating from
the same prompt again sends exactly the same vectors (nothing new to average); sampling draws are keyed by the
prompt and --seed, so the same prompt and seed give the same text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sap_client.sft import SFTTrainer, ids_noise_key
from sap_common.models import set_training
from sap_common.models.families import KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (the most likely), or drawn at temperature from the smallest set of
    tokens whose probability reaches top_p."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    greedy: bool = False
    seed: int = 0
    ignore_eos: bool = False  # write max_new_tokens whatever comes (benchmarks: the same length on both sides)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from logits (V,)."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    # keep the tokens before the cumulative mass reaches top_p, and the one that reaches it
    keep = (ordered.cumsum(0) - ordered) < sampling.top_p
    kept = ordered * keep
    pick = torch.multinomial(kept / kept.sum(), 1, generator=generator)
    return int(order[pick])


def _sampling_seed(secret: bytes, prompt: list[int], seed: int) -> int:
    digest = hashlib.sha256(b"sample\0" + secret + ids_noise_key(prompt) + seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stop_ids(tokenizer) -> set[int]:
    """Token ids that end a generation: the tokenizer's end of sequence (a chat model's end of turn)."""
    return {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()


def generate_tokens(trainer: SFTTrainer, session_id: str, prompt: list[int], sampling: Sampling) -> Iterator[int]:
    """The tokens generated after prompt (ids), one by one as they are chosen, through the session's top; ends
    after an end-of-sequence token (which is yielded) or max_new_tokens. trainer: the run's SFTTrainer (bottom,
    tail and head, privatizer, service)."""
    for token, _ in generate_steps(trainer, session_id, prompt, sampling):
        yield token


@torch.no_grad()
def generate_steps(
    trainer: SFTTrainer, session_id: str, prompt: list[int], sampling: Sampling
) -> Iterator[tuple[int, torch.Tensor]]:
    """generate_tokens, with the next-token logits (V,) each token was chosen from."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    device = trainer.device
    set_training(trainer.bottom, False)
    set_training(trainer.lm_end, False)
    bottom_cache, tail_cache = KVCache(), KVCache()
    generator = torch.Generator().manual_seed(_sampling_seed(trainer.head_key, prompt, sampling.seed))
    stops = set() if sampling.ignore_eos else stop_ids(trainer.tokenizer)
    ids = list(prompt)
    piece = torch.tensor([ids], dtype=torch.long, device=device)
    with trainer.service.generation(session_id) as remote:
        for _ in range(sampling.max_new_tokens):
            mask = torch.ones_like(piece)
            hidden = trainer.bottom(piece, mask, bottom_cache)  # (1, n, H)
            sent = trainer.to_send(hidden, mask, piece, None, [ids_noise_key(ids)])
            returned = remote.step(sent[0])  # (n, H): the top's last block at the piece's positions
            logits = trainer.lm_end(returned.to(device).float().unsqueeze(0), mask, tail_cache)  # (1, n, V)
            token = choose(logits[0, -1], sampling, generator)
            yield token, logits[0, -1]
            if token in stops:
                return
            ids.append(token)
            piece = torch.tensor([[token]], dtype=torch.long, device=device)
