"""What the split costs for generative work: fine-tuning (SFT) and generation through the split, measured side by
side with the same model fine-tuned and generating in one process, in one run, on the same machine and data.

    python benchmarks/generative_bench.py            # part of `make bench` (SmolLM2-135M split 6, about 4 min)
    python benchmarks/generative_bench.py --quick    # part of `make bench-quick`: fewer steps and tokens

The split side is the real thing: a `sap-server` subprocess on loopback and, in this process, SFTTrainer over
RemoteTopService (frozen bottom, --user-tail 1 with the user's LoRA, d_chi noise at noise ratio 0.25, packed
wire), then split generation (Generate stream, key/value caches on both sides, each piece noised). The
single-process side is AutoModelForCausalLM with the same LoRA on the same blocks (the provider's on k..L-2, the
user's on L-1), AdamW, the same batches and loss mask; and transformers' own greedy `generate` (its KV cache).
The two sides alternate chunk by chunk (ABBA order); warm-up steps are not timed.

Figures (ratios are split over single-process):
- sft_tokens_per_s_ratio: training tokens per second (every token of the batch, prompt and reply).
- generation_tokens_per_s_ratio: generated tokens per second, greedy, the same prompts and number of tokens.
- bytes_per_generated_token: wire bytes (both ways, framing included) per generated token; bytes_per_train_token
  likewise for SFT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from sap_common.openmp import prefer_short_spin  # noqa: E402

prefer_short_spin()  # this process is the split's client, started as sap-client starts (sap_common/openmp.py)

import torch  # noqa: E402

from sap_client.bottom import load_server_bottom, load_server_tail  # noqa: E402
from sap_client.generation import Sampling, generate_tokens  # noqa: E402
from sap_client.privacy import Privatizer  # noqa: E402
from sap_client.remote import RemoteTopService  # noqa: E402
from sap_client.sft import SFTTrainer, batch_tensors, lm_loss  # noqa: E402
from sap_client.sft_data import generation_prompt, load_sft_jsonl, read_prompts  # noqa: E402
from sap_client.trainer import TrainConfig  # noqa: E402
from sap_common.dchi import eta_for_noise_ratio  # noqa: E402
from sap_common.models.families import DECODER, base_blocks  # noqa: E402
from sap_common.models.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from sap_common.peft import PeftConfig, apply_peft  # noqa: E402
from sap_server.launch import ServerProcess  # noqa: E402

DATA = REPO / "data" / "movie_dialog.jsonl"
SPLIT, TAIL, LR, SEED, BATCH, MAX_LENGTH, NOISE_RATIO = 6, 1, 1e-3, 0, 8, 64, 0.25


class SingleSide:
    """The decoder fine-tuned and generating in one process (see the module docstring)."""

    def __init__(self, folder: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        self.model.requires_grad_(False)
        blocks = base_blocks(self.model.model, DECODER)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            apply_peft(blocks[SPLIT : len(blocks) - TAIL], DECODER, PeftConfig())
        apply_peft(blocks[len(blocks) - TAIL :], DECODER, PeftConfig())
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)

    def train(self, batch, pad_id: int) -> None:
        ids, mask, targets = batch_tensors(batch, pad_id)
        self.model.train()
        loss = lm_loss(self.model(input_ids=ids, attention_mask=mask).logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def generate(self, prompt: list[int], tokens: int) -> int:
        self.model.eval()
        ids = torch.tensor([prompt])
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=self.model.config.eos_token_id,
        )
        return out.shape[1] - len(prompt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens (make bench-quick)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "generative_bench.json")
    args = parser.parse_args()
    chunks, steps_per_chunk, prompts_count, new_tokens = (2, 1, 2, 16) if args.quick else (4, 2, 4, 32)
    started = time.time()
    folder = resolve_model(DEFAULT_MODEL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="sap-genbench-"))
    server = ServerProcess.start(["--model", DEFAULT_MODEL, "--split", str(SPLIT), "--port", "0"], env=env)
    try:
        service = RemoteTopService(server.address)
        info = service.server_info()
        bottom, tokenizer, _ = load_server_bottom(service, info, cache_root=work / "bottoms")
        lm_end = load_server_tail(service, info, TAIL, work / "tail", lm_embedding=bottom.embeddings)
        service.bytes_sent = service.bytes_received = 0
        config = TrainConfig(batch_size=BATCH, learning_rate=LR, seed=SEED, user_tail=TAIL, private_head=True)
        split = SFTTrainer(bottom, tokenizer, service, config, lm_end, head_key=b"bench: a fixed user secret")
        examples = load_sft_jsonl(DATA, tokenizer, max_length=MAX_LENGTH).examples
        needed = (1 + chunks * steps_per_chunk) * BATCH
        train, held = examples[:needed], examples[needed : needed + prompts_count + 1]
        norm = split.mean_hidden_norm_of(train[:64])
        split.privatizer = Privatizer(eta_for_noise_ratio(NOISE_RATIO, norm, info.hidden_size), key=b"b" * 32)
        split.open_generative()
        single = SingleSide(folder)
        batches = [train[i : i + BATCH] for i in range(0, needed, BATCH)]
        # warm-up (untimed): one step each side
        split.sft_step(batches[0])
        single.train(batches[0], split.pad_id)
        seconds = {"split": 0.0, "single": 0.0}
        tokens = 0
        wire_before = service.bytes_sent + service.bytes_received
        for index in range(chunks):
            chunk = batches[1 + index * steps_per_chunk : 1 + (index + 1) * steps_per_chunk]
            tokens += sum(len(e) for batch in chunk for e in batch)
            for side in ("split", "single") if index % 2 == 0 else ("single", "split"):
                begin = time.perf_counter()
                for batch in chunk:
                    split.sft_step(batch) if side == "split" else single.train(batch, split.pad_id)
                seconds[side] += time.perf_counter() - begin
        train_wire = service.bytes_sent + service.bytes_received - wire_before
        # generation: greedy, the same held-out prompts and number of tokens on both sides
        prompts = [generation_prompt(p, "messages", tokenizer) for p in _held_prompts(held)][:prompts_count]
        # both sides write exactly new_tokens (the single one: min_new_tokens)
        greedy = Sampling(max_new_tokens=new_tokens, greedy=True, ignore_eos=True)
        list(generate_tokens(split, split.session_id, prompts[0], Sampling(max_new_tokens=2, greedy=True)))
        single.generate(prompts[0], 2)
        generation = {"split": 0.0, "single": 0.0}
        generated = {"split": 0, "single": 0}
        wire_before = service.bytes_sent + service.bytes_received
        for index, prompt in enumerate(prompts):
            for side in ("split", "single") if index % 2 == 0 else ("single", "split"):
                begin = time.perf_counter()
                if side == "split":
                    generated[side] += len(list(generate_tokens(split, split.session_id, prompt, greedy)))
                else:
                    generated[side] += single.generate(prompt, new_tokens)
                generation[side] += time.perf_counter() - begin
        generation_wire = service.bytes_sent + service.bytes_received - wire_before
        service.close_session(split.session_id)
        service.close()
    finally:
        server.stop()
    sft_rate = {side: tokens / s for side, s in seconds.items()}
    gen_rate = {side: generated[side] / s for side, s in generation.items()}
    result = {
        "model": DEFAULT_MODEL,
        "split": SPLIT,
        "user_tail": TAIL,
        "noise_ratio": NOISE_RATIO,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "timed_sft_steps": chunks * steps_per_chunk,
        "sft_tokens_per_s": sft_rate,
        "sft_tokens_per_s_ratio": sft_rate["split"] / sft_rate["single"],
        "bytes_per_train_token": train_wire / tokens,
        "prompts": len(prompts),
        "new_tokens_per_prompt": new_tokens,
        "generation_tokens_per_s": gen_rate,
        "generation_tokens_per_s_ratio": gen_rate["split"] / gen_rate["single"],
        "bytes_per_generated_token": generation_wire / generated["split"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "wall_seconds": time.time() - started,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _held_prompts(held) -> list[dict]:
    """The held-out chats' user turns (the replies are what would be generated)."""
    records = read_prompts(DATA)
    lines = {e.line for e in held}
    return [{"messages": [m for m in records[n - 1]["messages"] if m["role"] != "assistant"]} for n in sorted(lines)]


if __name__ == "__main__":
    sys.exit(main())
