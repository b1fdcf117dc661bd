"""Tiny random models built from configs, with a word-level tokenizer, saved as real HF folders."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    MistralModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
    Qwen3Config,
    Qwen3Model,
)

WORDS = [f"w{i}" for i in range(80)] + ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot"]
POSITIVE, NEGATIVE = ["good", "great", "fine"], ["bad", "awful", "poor"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def make_tokenizer(bert_style: bool) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
        )
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", vocab["[CLS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[CLS]", eos_token="[SEP]"
    )


def bert_config(layers: int = 3, hidden: int = 32) -> BertConfig:
    return BertConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )


def llama_config(layers: int = 3, hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )


# The decoder families SAP lists besides Llama: same sizes, each architecture's own config and model class.
DECODER_FAMILIES = {
    "llama": (LlamaConfig, LlamaModel),
    "qwen2": (Qwen2Config, Qwen2Model),
    "qwen3": (Qwen3Config, Qwen3Model),
    "mistral": (MistralConfig, MistralModel),
}


def decoder_config(family: str, layers: int = 3, hidden: int = 32):
    config_class, _ = DECODER_FAMILIES[family]
    if family == "llama":
        return llama_config(layers, hidden)
    return config_class(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )


def build_tiny_model(folder: Path, family: str, layers: int = 3, hidden: int = 32, seed: int = 0) -> Path:
    """Write a tiny random model ('bert', or a decoder family: 'llama', 'qwen2', 'qwen3', 'mistral') and its
    word-level tokenizer into folder (a loadable HF folder)."""
    torch.manual_seed(seed)
    if family == "bert":
        model = BertModel(bert_config(layers, hidden))
    elif family in DECODER_FAMILIES:
        model = DECODER_FAMILIES[family][1](decoder_config(family, layers, hidden))
    else:
        raise ValueError(f"family must be bert or one of {sorted(DECODER_FAMILIES)}, got {family!r}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer(bert_style=family == "bert").save_pretrained(folder)
    return folder


def learnable_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) rows whose label is readable from the text: a sentiment word among filler words."""
    rng = random.Random(seed)
    fillers = [w for w in WORDS if w.startswith("w")]
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(fillers, rng.randint(3, 8))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append((" ".join(words), label))
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path
