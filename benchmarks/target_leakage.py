"""Target tokens read from the gradients of generative fine-tuning (`make target-leakage`).

For each mode: a provider with --record (in process, through LocalTopService: the same sessions and recorder a
sap-server runs) and SFTTrainer steps on real dialogue (data/movie_dialog.jsonl, the first EXAMPLES chats, loss on
the replies); then sap_client.audit.targets.read_targets on every recorded Backward gradient, scored against the
reply tokens each row's loss term predicts. This reader ignores the norm's Jacobian: it is a lower bound on what
the provider can read.

    python benchmarks/target_leakage.py [--model smollm2-135m] [--split 6] [--examples 96] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sap_client.audit.targets import next_token_targets, read_targets  # noqa: E402
from sap_client.bottom import load_server_bottom, load_server_tail  # noqa: E402
from sap_client.commands import _generative_noise  # noqa: E402
from sap_client.privacy import NoiseConfig  # noqa: E402
from sap_client.rundir import RunDir  # noqa: E402
from sap_client.sft import SFTTrainer, batch_tensors  # noqa: E402
from sap_client.sft_data import load_sft_jsonl  # noqa: E402
from sap_client.trainer import TrainConfig  # noqa: E402
from sap_common.models.registry import load_model  # noqa: E402
from sap_common.peft import PeftConfig  # noqa: E402
from sap_common.recording import read_records  # noqa: E402
from sap_server.local import LocalTopService  # noqa: E402
from sap_server.provider import Provider  # noqa: E402

MODES = {"user-tail 0": (0, None), "user-tail 1": (1, None), "user-tail 0, noise 0.25": (0, 0.25)}
BATCH, LR, SEED, MAX_LENGTH = 8, 1e-3, 0, 96


def run_mode(model: str, split: int, tail: int, noise_ratio: float | None, data: Path, count: int, work: Path) -> dict:
    started = time.time()
    provider = Provider.from_loaded(load_model(model), split=split, peft=PeftConfig(), record_dir=work / "recording")
    try:
        service = LocalTopService(provider)
        info = service.server_info()
        bottom, tokenizer, _ = load_server_bottom(service, info, cache_root=work / "bottoms")
        embedding = bottom.embeddings
        assert isinstance(embedding, torch.nn.Embedding)
        lm_end = load_server_tail(service, info, tail, work / "tail", lm_embedding=embedding)
        examples = load_sft_jsonl(data, tokenizer, max_length=MAX_LENGTH).examples[:count]
        config = TrainConfig(batch_size=BATCH, learning_rate=LR, seed=SEED, user_tail=tail, private_head=True)
        run = RunDir(work / "run").create()
        trainer = SFTTrainer(bottom, tokenizer, service, config, lm_end, head_key=run.noise_key())
        noise = NoiseConfig(noise_ratio=noise_ratio) if noise_ratio else NoiseConfig()
        trainer.privatizer = _generative_noise(noise, trainer, examples, run)
        trainer.open_generative()
        batches = [examples[s : s + BATCH] for s in range(0, len(examples), BATCH)]
        losses = [trainer.sft_step(batch) for batch in batches]
        # what the provider knows: its pretrained final norm and the tied table (the bottom it served)
        norm = provider.sessions.base.norm.weight.detach()
        table = provider.sessions.base.get_input_embeddings().weight.detach()
        backward = sorted((r for r in read_records(work / "recording") if r.kind == "backward"), key=lambda r: r.step)
        hits = total = 0
        for batch, record in zip(batches, backward, strict=True):
            _, mask, targets = batch_tensors(batch, trainer.pad_id)
            want = next_token_targets(targets, mask)
            guess = read_targets(record.tensors["grad_hidden"].float(), table, norm)
            chosen = want != -100
            hits += int((guess[chosen] == want[chosen]).sum())
            total += int(chosen.sum())
    finally:
        provider.close()
    return {
        "targets_read": hits / total,
        "targets": total,
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "noise_to_signal": trainer.privatizer.noise_to_signal if trainer.privatizer else 0.0,
        "seconds": round(time.time() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", type=int, default=6)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "movie_dialog.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    rows = []
    for mode, (tail, noise_ratio) in MODES.items():
        with tempfile.TemporaryDirectory(prefix="sap-target-leakage-") as work:
            row = {
                "mode": mode,
                **run_mode(args.model, args.split, tail, noise_ratio, args.data, args.examples, Path(work)),
            }
        print(row, flush=True)
        rows.append(row)
    import transformers

    lines = [
        "# Target tokens read from the gradients of generative fine-tuning",
        "",
        f"`python benchmarks/target_leakage.py {' '.join(argv or sys.argv[1:])}` (make target-leakage): "
        f"{args.model} split {args.split}, LoRA, the first {args.examples} examples of {args.data.name} (loss on "
        f"the completions), batch {BATCH}, lr {LR}, seed {SEED}, one pass. Read: `read_targets` (the lowest "
        "<E_v, gamma * g> over the vocabulary; the norm's Jacobian ignored, so a lower bound) on every recorded "
        "Backward gradient row that has a target, against that target.",
        "",
        "| mode | targets read | target tokens | noise/signal | seconds |",
        "|---|---|---|---|---|",
        *(
            f"| {r['mode']} | {r['targets_read']:.3f} | {r['targets']} | {r['noise_to_signal']:.2f} | {r['seconds']} |"
            for r in rows
        ),
        "",
        f"Wall time {sum(r['seconds'] for r in rows):.0f} s; python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs.",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "target_leakage.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
