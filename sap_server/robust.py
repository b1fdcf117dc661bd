"""Noise-robust starting adapters (sap-server --start-adapter): the provider, which holds the model and some public
text, trains the top's PEFT weights so that the top fed d_chi-noised bottom outputs reproduces what the frozen top
makes of the clean ones. A user's session may start from such an adapter instead of from the usual zero-effect
PEFT start; the user's own training then begins with a top that already undoes part of the noise.

What leaves the user is unchanged (the same mechanism, the same eta), so the privacy of a run that starts from an
adapter is that of plain d_chi noise at its eta; the adapter only changes what the provider's top does with it. No
user data is used: the provider trains on its own text, with its own noise draws.

    python -m sap_server.robust --model minilm-l6 --split 4 --public data/convention_paragraphs.csv \
        --noise-ratio 2 --out robust-r2.safetensors
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sap_common.dchi import eta_for_noise_ratio, sample_dchi_noise
from sap_common.errors import InvalidInputError, ModelLoadError
from sap_common.models.families import DECODER, PackedOutput, family_of
from sap_common.models.registry import LoadedModel
from sap_common.models.split import BottomModel, TopModel, split_base
from sap_common.peft import PEFT_METHODS, PeftConfig
from sap_server.registry import build_session_top

log = logging.getLogger(__name__)
FORMAT = "sap-start-adapter-1"


@dataclass(frozen=True)
class RobustSettings:
    """How a starting adapter is trained: the noise it is made robust to and the training budget."""

    noise_ratio: float  # the mechanism: eta such that E||n|| = noise_ratio * the mean clean norm on the public text
    rescale: bool = False  # the user's --rescale-noised: every noised vector rescaled to the mean clean norm
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    max_length: int = 64
    held_out: int = 64  # public texts kept out of training to measure the error before and after
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_ratio) and self.noise_ratio > 0):
            raise ValueError(f"noise ratio must be positive and finite, got {self.noise_ratio!r}")
        for name in ("steps", "batch_size", "max_length", "held_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning rate must be positive, got {self.learning_rate!r}")


@dataclass
class StartAdapter:
    """A starting adapter: the trainable block weights of a top (names "blocks.<i>...") and what they were made for."""

    state: dict[str, torch.Tensor]
    meta: dict

    def check_fits(self, model_id: str, split: int, peft: PeftConfig) -> None:
        made_for = (self.meta.get("model_id"), self.meta.get("split"), self.meta.get("peft"))
        if made_for != (model_id, split, asdict(peft)):
            raise ModelLoadError(
                f"this starting adapter was made for {made_for[0]} split {made_for[1]} {made_for[2]}; "
                f"this server serves {model_id} split {split} {asdict(peft)}"
            )


def _output_norm(base: Any) -> nn.Module:
    """What every head reads the last block through: a decoder's final norm (encoders' blocks end normed)."""
    return base.norm if family_of(base.config) is DECODER else nn.Identity()


class _Tokens:
    """Public texts -> (input_ids, mask) batches, right-padded as the client pads."""

    def __init__(self, loaded: LoadedModel, max_length: int):
        self.tokenizer = loaded.tokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"]


def noised(clean: torch.Tensor, eta: float, rescale_norm: float | None, generator: torch.Generator) -> torch.Tensor:
    """The user's mechanism on packed real-token vectors (N, H): h + d_chi noise, then optionally rescaled."""
    sent = clean + sample_dchi_noise(tuple(clean.shape), eta, generator=generator, dtype=clean.dtype)
    if rescale_norm is not None:
        sent = sent * (rescale_norm / sent.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return sent


class _Objective:
    """||norm(top(noised h)) - norm(frozen top(h))||^2 over the real tokens, relative to ||norm(frozen top(h))||^2."""

    def __init__(self, bottom: BottomModel, reference: TopModel, trainee: TopModel, output_norm: nn.Module):
        self.bottom, self.reference, self.trainee, self.output_norm = bottom, reference, trainee, output_norm

    def terms(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        eta: float,
        rescale_norm: float | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared error, squared target norm) summed over the batch's real tokens; the error carries a graph."""
        real = mask.bool()
        with torch.no_grad():
            hidden = self.bottom(input_ids, mask)
            target = self.output_norm(self.reference(hidden, mask))  # (N, H)
            sent = torch.zeros_like(hidden)
            sent[real] = noised(hidden[real], eta, rescale_norm, generator)
        got = self.output_norm(self.trainee(sent, mask))
        return (got - target).pow(2).sum(), target.pow(2).sum()

    def relative_error(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        eta: float,
        rescale_norm: float | None,
        seed: int,
    ) -> float:
        """The held-out relative error, with the same noise draws each time it is measured."""
        generator = torch.Generator().manual_seed(seed)
        error = scale = 0.0
        with torch.no_grad():
            for input_ids, mask in batches:
                e, s = self.terms(input_ids, mask, eta, rescale_norm, generator)
                error, scale = error + e.item(), scale + s.item()
        return error / scale


def mean_clean_norm(bottom: BottomModel, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean L2 norm of the bottom's output over the real tokens (what --noise-ratio measures on the user's side)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids, mask in batches:
            norms = bottom(input_ids, mask).norm(dim=-1)
            total += norms[mask.bool()].sum().item()
            count += int(mask.sum())
    return total / count


def fit_start_adapter(
    loaded: LoadedModel,
    split: int,
    peft: PeftConfig,
    texts: Sequence[str],
    settings: RobustSettings,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> StartAdapter:
    """Train a starting adapter for `split`/`peft` on the provider's public texts (the last settings.held_out of them
    measure the error); progress(step, loss) after each step. The loaded model is put in eval mode and frozen (its
    weights are never changed: the adapter's are new parameters)."""
    if len(texts) <= settings.held_out:
        raise InvalidInputError(
            f"{len(texts)} public texts: need more than the {settings.held_out} held out to measure the error"
        )
    base = loaded.base
    base.eval()  # no dropout: the target is the frozen top's deterministic output
    bottom, template = split_base(base, split)
    for param in base.parameters():
        param.requires_grad_(False)
    reference = TopModel(template.config, template.blocks, template.first_index, template.rotary, PackedOutput())
    trainee = build_session_top(template, base, peft, 2, settings.seed, output="hidden")
    trainee.eval()
    params = [p for name, p in trainee.named_parameters() if p.requires_grad and name.startswith("blocks.")]
    if not params:
        raise ModelLoadError(f"{peft.method} leaves nothing to train in the top's blocks")
    tokens = _Tokens(loaded, settings.max_length)
    train_texts, held_texts = list(texts[: -settings.held_out]), list(texts[-settings.held_out :])
    size = settings.batch_size
    held = [tokens(held_texts[i : i + size]) for i in range(0, len(held_texts), size)]
    norm = mean_clean_norm(bottom, held)
    eta = eta_for_noise_ratio(settings.noise_ratio, norm, base.config.hidden_size)
    rescale_norm = norm if settings.rescale else None
    objective = _Objective(bottom, reference, trainee, _output_norm(base))
    held_seed = settings.seed + 1
    before = objective.relative_error(held, eta, rescale_norm, held_seed)
    log.info("mean clean norm %.3f, eta %.4g; held-out relative error %.4f before", norm, eta, before)

    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    order = torch.Generator().manual_seed(settings.seed)
    noise = torch.Generator().manual_seed(settings.seed + 2)
    permutation: list[int] = []
    for step in range(1, settings.steps + 1):
        if len(permutation) < size:
            permutation += torch.randperm(len(train_texts), generator=order).tolist()
        picked, permutation = permutation[:size], permutation[size:]
        input_ids, mask = tokens([train_texts[i] for i in picked])
        error, scale = objective.terms(input_ids, mask, eta, rescale_norm, noise)
        loss = error / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, loss.item())
    after = objective.relative_error(held, eta, rescale_norm, held_seed)
    log.info("held-out relative error %.4f after %d steps", after, settings.steps)
    state = {
        name: p.detach().to("cpu", torch.float32).clone()
        for name, p in trainee.named_parameters()
        if p.requires_grad and name.startswith("blocks.")
    }
    meta = {
        "format": FORMAT,
        "model_id": loaded.model_id,
        "split": split,
        "peft": asdict(peft),
        "settings": asdict(settings),
        "public_texts": len(train_texts),
        "mean_clean_norm": norm,
        "eta": eta,
        "relative_error_before": before,
        "relative_error_after": after,
    }
    return StartAdapter(state, meta)


def save_start_adapter(adapter: StartAdapter, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in adapter.state.items()}
    save_file(tensors, str(path), metadata={"sap": json.dumps(adapter.meta)})


def load_start_adapter_file(path: Path) -> StartAdapter:
    """Read a file fit_start_adapter's CLI wrote; ModelLoadError if it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("sap")
        state = load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # missing, or not a safetensors file
        raise ModelLoadError(f"cannot read starting adapter {path}: {exc}") from exc
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not a SAP starting adapter (python -m sap_server.robust writes them)")
    return StartAdapter(state, meta)


def read_public_texts(path: Path, column: str = "text") -> list[str]:
    """A CSV's `column`, or a JSONL file's "text" field or its "messages" contents joined (one text per line)."""
    try:
        if path.suffix == ".jsonl":
            texts = []
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    text = row.get("text") or " ".join(str(m.get("content", "")) for m in row.get("messages", []))
                    if not text.strip():
                        raise InvalidInputError(f"{path}:{number}: no text")
                    texts.append(text)
            return texts
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if column not in (reader.fieldnames or []):
                raise InvalidInputError(f"{path} has no column {column!r} (columns: {reader.fieldnames})")
            return [row[column] for row in reader if row[column].strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"cannot read public text {path}: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    from sap_common.models.registry import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="python -m sap_server.robust",
        description="Train a noise-robust starting adapter for `sap-server --start-adapter NAME=FILE`: the top's PEFT "
        "weights trained on the provider's public text so that the top fed d_chi-noised inputs reproduces the frozen "
        "top's output on clean ones. No user data is used; what users send is unchanged.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias or folder (default {DEFAULT_MODEL})")
    parser.add_argument("--split", type=int, required=True, help="the split the server will serve")
    parser.add_argument("--peft", choices=PEFT_METHODS, default="lora", help="the server's --peft (default lora)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8, as sap-server)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16, as sap-server)")
    parser.add_argument("--adapter-size", type=int, default=64, help="Adapter width (default 64, as sap-server)")
    parser.add_argument("--public", type=Path, required=True, help="the provider's public text: CSV or JSONL")
    parser.add_argument("--text-column", default="text", help="the CSV's text column (default text)")
    parser.add_argument("--max-texts", type=int, default=4000, help="most public texts used (default 4000)")
    parser.add_argument("--noise-ratio", type=float, required=True, help="the noise ratio R users will train at")
    parser.add_argument("--rescale", action="store_true", help="robust to --rescale-noised (users who rescale)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per step (default 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="noise, order and PEFT start (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        peft = PeftConfig(
            method=args.peft, lora_r=args.lora_r, lora_alpha=args.lora_alpha, adapter_size=args.adapter_size
        )
        settings = RobustSettings(
            noise_ratio=args.noise_ratio,
            rescale=args.rescale,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            max_length=args.max_length,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    from tqdm import tqdm

    from sap_common.errors import SapError
    from sap_common.models.registry import load_model

    try:
        texts = read_public_texts(args.public, args.text_column)[: args.max_texts]
        loaded = load_model(args.model)
        with tqdm(total=settings.steps, desc="robust adapter", unit="step") as bar:

            def show(step: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")

            adapter = fit_start_adapter(loaded, args.split, peft, texts, settings, progress=show)
        save_start_adapter(adapter, args.out)
    except SapError as exc:
        print(f"robust: error: {exc}", file=sys.stderr)
        return 1
    meta = adapter.meta
    print(
        f"wrote {args.out}: held-out relative error {meta['relative_error_before']:.4f} -> "
        f"{meta['relative_error_after']:.4f} at noise ratio {settings.noise_ratio:g} (eta {meta['eta']:.4g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
