"""UserHead: the task head a user keeps on its own machine (`sap-client train --private-head`), and with
`--user-tail M` the model's last M blocks before it.

The provider's top then ends in the pooled representation (B, H) (sap_common.models.families.PooledOutput), or,
with a tail, in the packed output (N_real, H) of block L-M-1 (PackedOutput); the user computes the logits, the loss
and the gradient of what it received here, so neither logits nor dL/dlogits (whose one negative entry is the label)
cross the wire. The head's first weights, and the tail's LoRA, are drawn from the run's secret, not from the seed
the provider is told: knowing the head would hand the provider w_1 - w_0 at step one, the line every dL/dpooled of
a binary task lies on. The tail's pretrained weights are the provider's own: only its LoRA is the user's.
"""

from __future__ import annotations

import hashlib
import hmac

import torch
from torch import nn

from sap_common.checkpoint import GLOBAL_RNG_LOCK
from sap_common.models.split import TopModel
from sap_common.peft import PeftConfig, apply_peft

HEAD_STD = 0.02  # the initializer_range of the supported families (BERT, Llama, Qwen, Mistral, SmolLM2)


def _keyed_seed(key: bytes, purpose: bytes) -> int:
    return int.from_bytes(hmac.new(key, purpose, hashlib.sha256).digest()[:8], "little")


class UserHead(nn.Module):
    """A linear classifier over the pooled representation: (B, H) -> logits (B, C); with a tail, the tail's
    blocks first: packed hidden states (N_real, H) + the (B, T) mask they were sent with -> logits (B, C)."""

    def __init__(self, hidden_size: int, num_labels: int, tail: TopModel | None = None):
        super().__init__()
        if num_labels < 2 or hidden_size < 1:
            raise ValueError(f"a head needs num_labels >= 2 and hidden_size >= 1, got {num_labels} and {hidden_size}")
        self.tail = tail
        self.classifier = nn.Linear(hidden_size, num_labels)

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    @property
    def tail_blocks(self) -> int:
        return 0 if self.tail is None else len(self.tail.blocks)

    def forward(self, returned: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.tail is not None:
            if attention_mask is None:
                raise ValueError("a head with a tail needs the attention mask the packed rows were sent with")
            mask = attention_mask.to(returned.device).bool()
            zeros = returned.new_zeros(*mask.shape, returned.shape[-1])
            hidden = zeros.masked_scatter(mask.unsqueeze(-1), returned)  # (B, T, H), zero padding; keeps the graph
            returned = self.tail(hidden, mask.long())  # pooled (B, H)
        return self.classifier(returned)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of what trains here (the classifier, the tail's LoRA), by name: what a run keeps."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        if params.keys() != state.keys():
            missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
            raise ValueError(f"the kept head does not fit: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, param in params.items():
                if state[name].shape != param.shape:
                    raise ValueError(f"kept head tensor {name} has shape {tuple(state[name].shape)}, not {param.shape}")
                param.copy_(state[name])


def new_user_head(
    hidden_size: int, num_labels: int, key: bytes, std: float = HEAD_STD, tail: TopModel | None = None
) -> UserHead:
    """A head whose weights are N(0, std^2) drawn from a generator keyed by the run's secret, bias zero; with a tail
    (pretrained, frozen), the user's own LoRA on its attention projections, drawn from the same secret."""
    if tail is not None:
        apply_user_lora(tail, key)
    head = UserHead(hidden_size, num_labels, tail)
    generator = torch.Generator().manual_seed(_keyed_seed(key, b"sap-user-head"))
    with torch.no_grad():
        head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=generator) * std)
        head.classifier.bias.zero_()
    return head


def apply_user_lora(tail: TopModel, key: bytes) -> None:
    """Freeze the tail's pretrained weights and put the user's own LoRA on its blocks' attention projections, its
    first weights drawn from the run's secret (the provider never learns them)."""
    tail.requires_grad_(False)
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):  # LoRA draws from the global generator
        torch.manual_seed(_keyed_seed(key, b"sap-user-tail"))
        apply_peft(list(tail.blocks), tail.family, PeftConfig(method="lora"))


def tail_dropout_seed(key: bytes) -> int:
    """What the tail's dropout draws are seeded from (with the step): the run's secret, so a resume redraws them."""
    return _keyed_seed(key, b"sap-user-tail-dropout")
