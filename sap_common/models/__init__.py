"""Model families, the split at block k, the bottom bundle, model aliases; set_training, which both sides use."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# The mode set_training last put each module tree in (weak: a module that goes away is forgotten).
_MODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_training(module: nn.Module, mode: bool) -> None:
    """module.train(mode), walking every submodule only when needed: train() on every call cost more than a tenth
    of a batch-1 forward of a small top. The root's own flag is not enough to skip it: a tree can be mixed (a top
    copied from an eval-mode model with a training-mode root, then new PEFT layers added), and a first train(True)
    that was skipped left the model's own dropout off until an evaluation flipped the whole tree, so a session's
    steps depended on whether it had evaluated before. So the first call on a tree always walks it. (Here, not in
    split.py: the client's command line imports this without loading transformers.)"""
    if module.training != mode or _MODES.get(module) is not mode:
        module.train(mode)
        _MODES[module] = mode
