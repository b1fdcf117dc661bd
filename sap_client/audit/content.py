"""Which tokens carry content: what a user worries about leaking is words, not 'the' or punctuation.

A content token is a real token that is not a special token, has a letter or a digit, and whose text (the
decoded token, stripped and lower-cased) is not an English function word.
"""

from __future__ import annotations

import torch

# English function words (articles, pronouns, auxiliaries, prepositions, conjunctions, common particles)
# and the contraction pieces tokenizers split off.
FUNCTION_WORDS = frozenset(
    """
a an the this that these those there here
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves one ones
what which who whom whose when where why how whatever whoever
am is are was were be been being have has had having do does did doing done
will would shall should can could may might must ought
and or but nor so yet if then else than because as while until unless although though whether
of at by for with about against between into through during before after above below to from up down
in out on off over under again further once onto upon within without among along around across toward
towards via per
all any both each few more most other some such no not only own same too very just also even ever still
s t d ll m re ve n't nt don doesn didn isn aren wasn weren hasn haven hadn won wouldn shouldn couldn
can't cannot 's 're 've 'd 'll 'm
""".split()
)


def is_content(text: str) -> bool:
    """True when a token's text is a content word (or part of one)."""
    word = text.strip().lower()
    return any(ch.isalnum() for ch in word) and word not in FUNCTION_WORDS


def content_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, T) bool: real tokens that carry content (see the module docstring)."""
    special = set(tokenizer.all_special_ids)
    verdict: dict[int, bool] = {}
    ids = input_ids.tolist()
    real = attention_mask.bool().tolist()
    out = torch.zeros(input_ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids):
        for t, token in enumerate(row):
            if not real[b][t] or token in special:
                continue
            if token not in verdict:
                verdict[token] = is_content(tokenizer.decode([token]))
            out[b, t] = verdict[token]
    return out
