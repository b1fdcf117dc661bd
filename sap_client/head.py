"""UserHead: the task head a user keeps on its own machine (`sap-client train --private-head`).

The provider's top then ends in the pooled representation (B, H) (sap_common.models.families.PooledOutput); the user
computes the logits, the loss and dL/dpooled here, so neither logits nor dL/dlogits (whose one negative entry is the
label) cross the wire. The head's first weights are drawn from the run's secret, not from the seed the provider is
told: knowing them would hand the provider w_1 - w_0 at step one, the line every dL/dpooled of a binary task lies on.
"""

from __future__ import annotations

import hashlib
import hmac

import torch
from torch import nn

HEAD_STD = 0.02  # the initializer_range of the supported families (BERT, Llama, Qwen, Mistral, SmolLM2)


class UserHead(nn.Module):
    """A linear classifier over the pooled representation: (B, H) -> logits (B, C)."""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        if num_labels < 2 or hidden_size < 1:
            raise ValueError(f"a head needs num_labels >= 2 and hidden_size >= 1, got {num_labels} and {hidden_size}")
        self.classifier = nn.Linear(hidden_size, num_labels)

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)


def new_user_head(hidden_size: int, num_labels: int, key: bytes, std: float = HEAD_STD) -> UserHead:
    """A head whose weights are N(0, std^2) drawn from a generator keyed by the run's secret; bias zero."""
    head = UserHead(hidden_size, num_labels)
    seed = int.from_bytes(hmac.new(key, b"sap-user-head", hashlib.sha256).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=generator) * std)
        head.classifier.bias.zero_()
    return head
