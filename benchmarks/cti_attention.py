"""Where does the provider's first top block look when CTI's exempt mode sends a few vectors clean?

A probe for the privacy table's CTI discussion (not part of any make target; about 10 s). MiniLM at split
k = 4: the client sends the input of block 4. Snippets that hold one of the sentiment words the exempt mode
picks (its top tokens per class on the table's training snippets) keep those words' vectors clean; every
other real token gets d_chi noise at ratio R, as `--cti-mode exempt` does. The script prints the share of
the tokens that are clean and how much of block 4's attention (pretrained weights: LoRA starts as the
identity) lands on them, from [CLS] (the position the classifier reads) and averaged over every query,
with three noise draws per R.

    python benchmarks/cti_attention.py [--snippets 64] [--ratios 0 1 2 4]
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from sap_common.dchi import eta_for_noise_ratio, sample_dchi_noise
from sap_common.models.registry import resolve_model

ROOT = Path(__file__).resolve().parent.parent
SPLIT = 4
# the exempt mode's top tokens per class (--cti-top 0.02) on the table's 2,000 training snippets
CLEAN_WORDS = (
    "dull",
    "fails",
    "bad",
    "worse",
    "badly",
    "generic",
    "enjoyable",
    "moving",
    "compelling",
    "entertaining",
    "wonderful",
    "refreshing",
)


def attention_probs(block, x: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Block's self-attention probabilities for input x (B, T, H): (B, heads, T, T), padding keys masked."""
    b, t, _ = x.shape
    q = block.attention.self.query(x).view(b, t, heads, -1).transpose(1, 2)
    k = block.attention.self.key(x).view(b, t, heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snippets", type=int, default=64, help="snippets that hold a clean word (default 64)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0, 1, 2, 4], help="noise ratios R")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    folder = resolve_model("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    with (ROOT / "data" / "movie_snippets.csv").open(newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)][:2000]  # the table's training snippets
    texts = [t for t in texts if set(CLEAN_WORDS) & set(tokenizer.tokenize(t))][: args.snippets]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[SPLIT]  # what the client sends, (B, T, H)
    clean = torch.isin(batch["input_ids"], torch.tensor(tokenizer.convert_tokens_to_ids(list(CLEAN_WORDS)))) & mask
    mean_norm = hidden[mask].norm(dim=-1).mean().item()
    block, heads = model.encoder.layer[SPLIT], model.config.num_attention_heads
    share = (clean.sum(-1) / mask.sum(-1)).mean().item()
    print(f"minilm-l6, k = {SPLIT}: {len(texts)} snippets, clean (exempt) tokens {share:.3f} of the real tokens")
    print("| R | noisy / clean input norm | [CLS]'s attention on the clean tokens | every query's |")
    print("|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for ratio in args.ratios:
        cls_on_clean, all_on_clean, norm_ratio = [], [], []
        for _ in range(3 if ratio else 1):
            x = hidden.clone()
            if ratio:
                eta = eta_for_noise_ratio(ratio, mean_norm, x.shape[-1])
                x = x + sample_dchi_noise(x.shape, eta, generator=generator) * (mask & ~clean).unsqueeze(-1)
            x = x * mask.unsqueeze(-1)
            with torch.no_grad():
                probs = attention_probs(block, x, mask, heads)
            on_clean = (probs * clean[:, None, None, :]).sum(-1)  # (B, heads, T)
            cls_on_clean.append(on_clean[:, :, 0].mean().item())
            all_on_clean.append(((on_clean * mask[:, None, :]).sum() / (mask.sum() * heads)).item())
            norm_ratio.append(x[mask & ~clean].norm(dim=-1).mean().item() / x[clean].norm(dim=-1).mean().item())
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        print(f"| {ratio:g} | {mean(norm_ratio):.2f} | {mean(cls_on_clean):.4f} | {mean(all_on_clean):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
