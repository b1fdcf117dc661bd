"""`sap-client train DATA.jsonl` with two real processes: a tiny decoder learns a completion task (held-out
perplexity falls), the provider's recorded traffic holds no vocabulary-sized tensor, and the run folder says what
it is (and what it does not protect)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from sap_common.recording import read_records
from sap_server.launch import ServerProcess
from tiny_models import WORDS, build_tiny_model

SCRIPTS = Path(sys.executable).parent
VOCAB, HIDDEN = 4 + len(WORDS), 32  # tests/tiny_models.py's vocabulary and hidden size


@pytest.fixture
def env(tmp_path):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SAP_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }


@pytest.fixture
def decoder(tmp_path) -> Path:
    """A tiny decoder whose token table is scaled by 8: at N(0, 0.02^2) its tied logits stay nearly flat whatever
    the blocks learn (tests/test_sft.py)."""
    folder = build_tiny_model(tmp_path / "decoder", "llama")
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(8.0)
    model.save_pretrained(folder)
    return folder


def _jsonl(path: Path, n: int) -> Path:
    rng = random.Random(0)
    fillers = [w for w in WORDS if w.startswith("w")]
    with path.open("w") as handle:
        for i in range(n):
            words = rng.sample(fillers, rng.randint(2, 5))
            words.insert(rng.randrange(len(words) + 1), "great" if i % 2 == 0 else "awful")
            completion = "good movie" if i % 2 == 0 else "bad plot"
            handle.write(json.dumps({"prompt": " ".join(words), "completion": completion}) + "\n")
    return path


def _client(args: list[str], env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(SCRIPTS / "sap-client"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def test_train_on_jsonl_fine_tunes_the_decoder_to_write_completions(decoder, tmp_path, env):
    data = _jsonl(tmp_path / "train.jsonl", 250)
    record, run = tmp_path / "recording", tmp_path / "run"
    run.mkdir()
    (run / "noise.key").write_text("5a" * 32 + "\n")  # the run's secret keys the tail's LoRA: a repeatable start
    server = ServerProcess.start(
        ["--model", str(decoder), "--split", "1", "--port", "0", "--record", str(record)], env=env
    )
    try:
        args = ["train", str(data), "--server", server.address, "--out", str(run), "--user-tail", "1"]
        flags = ["--epochs", "8", "--lr", "2e-2", "--batch-size", "16", "--eval-fraction", "0.2"]
        done = _client([*args, *flags], env)
        assert "eval perplexity" in done.stdout
        predict = ["predict", str(data), "--run", str(run), "--server", server.address, "--out", str(tmp_path / "p")]
        refused = _client(predict, env, ok=False)
        assert "is a generative run" in refused.stderr
        # the learned completion, written through the split (a new process: the run's adapter, tail and noise)
        generate = ["generate", "--run", str(run), "--server", server.address, "--greedy", "--max-new-tokens", "6"]
        one = _client([*generate, "--prompt", "w3 great w17 w40"], env)
        assert one.stdout.strip() == "good movie", one.stdout
        assert "tokens/s" in one.stderr and "wire bytes per token" in one.stderr
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps({"prompt": "w8 w22 awful"}) + "\n" + json.dumps({"prompt": "great w5"}) + "\n")
        out = tmp_path / "completions.jsonl"
        _client([*generate, "--data", str(prompts), "--out", str(out)], env)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(r["prompt"], r["completion"], r["stopped"]) for r in rows] == [
            ("w8 w22 awful", "bad plot", True),
            ("great w5", "good movie", True),
        ]
        sampled = [*generate[:-3], "--prompt", "w3 great w17 w40", "--temperature", "0.5"]
        assert _client(sampled, env).stdout == _client(sampled, env).stdout  # draws keyed by prompt and --seed
        # the audit of the recorded run: the chats from the hidden states, the replies from the gradients
        report_dir = tmp_path / "report"
        audit = ["audit", str(data), "--run", str(run), "--recorded", str(record), "--server", server.address]
        done = _client([*audit, "--out", str(report_dir), "--max-examples", "24"], env)
        assert "target tokens read from the gradients" in done.stdout
    finally:
        assert server.stop() == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["task"] == "generative" and report["examples"] == 24 and report["user_tail"] == 1
    # every target of every recorded step is paired (two reply tokens and the end of sequence per chat), and read
    # far above chance (1 in 92) through the user's tail: measured 0.63
    assert report["target_tokens"] == 8 * 200 * 3 and report["target_steps"] == 8 * 13
    assert report["targets_read"] >= 0.5, report
    assert report["eia_token_recovery"] >= 0.9, report  # no noise: the chats, from the hidden states
    assert "Target tokens" in (report_dir / "report.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "generative" and metrics["data_format"] == "prompt-completion"
    assert (metrics["train_examples"], metrics["eval_examples"]) == (200, 50)
    assert metrics["eval_perplexity_before"] > 100 and metrics["eval_perplexity"] < 6, metrics
    assert json.loads((run / "run.json").read_text())["task"] == "generative"
    assert (run / "head.safetensors").is_file() and (run / "tail").is_dir()  # the user's tail LoRA and blocks
    statement = (run / "privacy.md").read_text()
    assert "generative fine-tuning" in statement and "Treat every target token as exposed" in statement
    assert "Target tokens read from the recorded gradients" in statement  # the audit above, quoted
    records = read_records(record)
    assert sum(r.kind == "backward" for r in records) == metrics["steps"] == 8 * 13
    assert sum(r.kind == "generate" for r in records) >= 3 * 3  # a prompt piece and one per token after it
    for r in records:
        for name, tensor in r.tensors.items():
            assert VOCAB not in tensor.shape and (name == "attention_mask" or tensor.shape[-1] == HIDDEN), name


def test_train_on_jsonl_needs_a_decoder(tiny_bert, tmp_path, env):
    data = _jsonl(tmp_path / "train.jsonl", 20)
    server = ServerProcess.start(["--model", str(tiny_bert), "--split", "1", "--port", "0"], env=env)
    try:
        done = _client(["train", str(data), "--server", server.address, "--out", str(tmp_path / "run")], env, ok=False)
    finally:
        assert server.stop() == 0
    assert "generative fine-tuning needs a decoder" in done.stderr, done.stderr
