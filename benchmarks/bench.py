"""What the split costs: split training and inference measured side by side with ordinary single-process
PEFT fine-tuning of the same model, in one run, on the same machine, data, batches and max length.

    python benchmarks/bench.py --quick     # `make bench-quick`: MiniLM split 2, under 2 minutes on 2 cores
    python benchmarks/bench.py             # `make bench`: + SmolLM2-135M split 6, memory, slow link
    python benchmarks/bench.py --slow-link # the quick set plus the slow-link mode

The split side is the real thing: a `sap-server` subprocess on loopback (`--port 0`) and, in this process,
the client (SplitTrainer over RemoteTopService: frozen bottom, d_chi noise, packed wire).
The single-process side is AutoModelForSequenceClassification with the same PEFT on the same top blocks,
frozen bottom blocks, AdamW, trained on the same batches. The two are timed in alternating chunks of
2 steps (ABBA order) so machine noise hits both alike; warm-up steps are not timed.

Threads: the single process is first timed at 1 torch thread and at one per core, and runs at the faster
(the baseline at its best: on 2 cores, two threads win on an idle machine and lose badly on a busy one,
where a parallel region waits for a descheduled thread). The server gets the same count. The split is
then timed the same way in its two ways of running (on batches used nowhere else), and runs the faster:
"overlap", the client's prefetch thread computing batch i+1 with half the threads while the server works
on batch i, and "sequential", no prefetch, the client using all the threads while the server waits for
it. On a machine where client and server share few cores the overlap only makes them fight over them
(a parallel region waits for its slowest thread); with a real network in between it hides the client's
work. --threads N sets N everywhere (both split modes are still tried).

Figures (ratios are split over single-process unless named otherwise):
- throughput_ratio: training examples/s. Measured on examples seen for the first time, so the split
  computes the bottom for each one (later epochs re-send cached noisy tensors and skip it).
- wire_bytes_ratio: bytes the client sent per training example (RemoteTopService counters: Forward and
  Backward requests, protobuf framing included) over a naive encoding: float32 hidden states, every
  sequence padded to --max-length, plus an int64 mask: max_length * (H * 4 + 8) bytes.
- predict_p50_ratio: inference latency at batch 32 (tokenize, bottom, noise, RPC vs tokenize, forward);
  p50 and p95 at batch 1 and 32 are reported too.
- full run: client peak RSS (bottom only) over a process that loads the full model, server RSS per extra
  session, and the slow link (step time = compute on loopback + transfer) for each wire dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch at run time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sap_common.openmp import prefer_short_spin  # noqa: E402

# This process is the split's client, so it starts as sap-client does: OpenMP's idle threads spin for a
# short time (sap_common/openmp.py). The single process runs here too; it trains as fast either way
# (benchmarks/README.md has the side-by-side check). GOMP_SPINCOUNT in the environment wins.
prefer_short_spin()

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sap_client.bottom import load_server_bottom  # noqa: E402
from sap_client.data import TextDataset, load_labelled_csv  # noqa: E402
from sap_client.privacy import Privatizer  # noqa: E402
from sap_client.remote import RemoteTopService  # noqa: E402
from sap_client.trainer import SplitTrainer, TrainConfig  # noqa: E402
from sap_common.codec import WIRE_DTYPES  # noqa: E402
from sap_common.dchi import eta_for_noise_ratio  # noqa: E402
from sap_common.devices import DTYPES  # noqa: E402
from sap_common.models.families import ENCODER, base_blocks, family_of  # noqa: E402
from sap_common.models.registry import resolve_model  # noqa: E402
from sap_common.peft import PeftConfig, apply_peft  # noqa: E402
from sap_server.launch import ServerProcess  # noqa: E402

DATA = REPO / "data" / "movie_snippets.csv"
RESULTS = REPO / "benchmarks" / "results"
WIRE_NAMES = tuple(DTYPES)
NOISE_KEY = b"sap-bench-noise-key"  # fixed: the bench is about cost, not secrecy
MASK_BYTES = 8  # int64 attention mask entry, in the naive encoding


@dataclass
class Settings:
    """One bench run's knobs (the same for both sides)."""

    batch_size: int = 16
    max_length: int = 64
    learning_rate: float = 5e-4
    noise_ratio: float = 0.25  # E||noise|| / mean||h||, as the demo
    wire_dtype: str = "bfloat16"  # the lean wire the throughput and bytes figures use
    warmup_steps: int = 3  # per side, untimed
    # Timed steps per side = rounds * steps_per_round, alternating every steps_per_round steps: this machine's
    # speed drifts by 20-30 % over seconds, and short chunks put both sides in the same stretch of it
    # (benchmarks/README.md: chunks of 6 steps gave ratios of 0.83-1.12 over six runs, of 2 steps 0.91-1.02).
    rounds: int = 20
    steps_per_round: int = 2
    predict_warmup: int = 2
    # batch -> timed calls; a batch-1 call takes about 15 ms, and the p50 of 16 moved by 0.1 from run to run
    predict_reps: dict[int, int] = field(default_factory=lambda: {1: 120, 32: 6})
    wire_steps: int = 3  # steps per wire dtype for the bytes-per-dtype figures
    second_epoch: bool = False  # also time the same batches again (the split re-sends its cached tensors)
    memory: bool = False  # client peak RSS vs full model, server RSS per session
    sessions: int = 6  # sessions opened for the per-session server memory
    slow_link: bool = False
    slow_steps: int = 8  # steps per wire dtype on each path (alternating in chunks of 2)
    mbit: float = 100.0
    rtt_ms: float = 40.0
    seed: int = 0
    threads: int | None = None  # torch threads of each process (bench and server); None: torch's default
    split_mode: str | None = None  # "overlap" or "sequential"; None: time both (calibration), keep the faster
    calibration_steps: int = 2  # timed steps per split mode and pass (each on fresh batches)

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            batch_size=self.batch_size, max_length=self.max_length, learning_rate=self.learning_rate, seed=self.seed
        )


QUICK_MODELS = (("minilm-l6", 2),)
FULL_MODELS = (("minilm-l6", 2), ("smollm2-135m", 6))


# --- the provider: a real sap-server subprocess ------------------------------------------------------


@contextmanager
def sap_server(
    model: str, split: int, *, max_sessions: int = 16, threads: int | None = None, timeout: float = 300.0
) -> Iterator[ServerProcess]:
    """`sap-server --port 0` on loopback (sap_server.launch); yields once it listens, stops it afterwards."""
    args = ["--model", model, "--split", str(split), "--port", "0", "--host", "127.0.0.1"]
    args += ["--max-sessions", str(max_sessions), "--device", "cpu"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:  # torch takes its intra-op thread count from these at start-up
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "sap_server.cli"]
    server = ServerProcess.start(args, env=env, cwd=REPO, timeout=timeout, command=command)
    try:
        yield server
    finally:
        server.stop(timeout=30)


def _stop(process: subprocess.Popen, log, timeout: float) -> None:
    """SIGTERM a helper process (the server, the slow-link proxy), SIGKILL it after timeout; close its pipes."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    process.stdout.close()
    log.close()


def _wait_for_line(process: subprocess.Popen, pattern: str, timeout: float, log=None) -> str:
    """Read the child's stdout until a line matches pattern; returns the first group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break  # the child exited
        match = re.search(pattern, line)
        if match:
            return match.group(1)
    detail = ""
    if log is not None:
        log.seek(0)
        detail = log.read()[-2000:]
    raise RuntimeError(f"{process.args[:4]} did not print {pattern!r} (exit code {process.poll()}):\n{detail}")


def server_rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS in /proc/PID/status), MiB: the server's, or a child's own."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads in this process (both sides share it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def thread_choices(settings: Settings) -> list[int]:
    """Torch thread counts the single process is calibrated over: --threads, or 1 and all cores."""
    return [settings.threads] if settings.threads else sorted({1, os.cpu_count() or 1})


SPLIT_MODES = ("overlap", "sequential")


def split_threads(settings: Settings, single_threads: int) -> tuple[int, int]:
    """(client, server) torch threads. --threads N: N each. Otherwise the server, which does most of the
    work (the top's forward and backward), gets what trains the single process fastest; the client, in
    overlap mode (its bottom and noise run beside the server's work), half of it, so that the two together
    do not oversubscribe the cores; in sequential mode it gets the server's count (see client_mode)."""
    if settings.threads:
        return settings.threads, settings.threads
    return max(1, single_threads // 2), single_threads


def client_mode(side: SplitSide, mode: str, overlap_threads: int, sequential_threads: int) -> None:
    """Run the split client in `mode`: overlap = prefetch on, fewer threads; sequential = prefetch off."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"split mode must be one of {SPLIT_MODES}, got {mode!r}")
    side.trainer.prefetch = mode == "overlap"
    side.threads = overlap_threads if mode == "overlap" else sequential_threads


def calibrate_split(
    side: SplitSide, batches: list[list[int]], settings: Settings, overlap_threads: int, sequential_threads: int
) -> dict[str, float]:
    """Seconds per step of the split in each mode on fresh batches (one untimed step per mode first, then
    interleaved passes of settings.calibration_steps steps each); leaves the side in the faster mode."""
    modes = [settings.split_mode] if settings.split_mode else list(SPLIT_MODES)
    steps = settings.calibration_steps
    needed = len(modes) * (1 + 2 * steps)
    if len(batches) < needed:
        raise ValueError(f"split calibration needs {needed} batches, got {len(batches)}")
    fresh = iter(batches)
    timings: dict[str, list[float]] = {mode: [] for mode in modes}
    for mode in modes:
        client_mode(side, mode, overlap_threads, sequential_threads)
        side.train([next(fresh)])
    for _ in range(2):
        for mode in modes:
            client_mode(side, mode, overlap_threads, sequential_threads)
            timings[mode].append(side.train([next(fresh) for _ in range(steps)]) / steps)
    per_step = {mode: statistics.mean(t) for mode, t in timings.items()}
    client_mode(side, min(per_step, key=per_step.get), overlap_threads, sequential_threads)
    return per_step


# --- the two sides -----------------------------------------------------------------------------------


class SplitSide:
    """The user: bottom + noise here, top on the server, through SplitTrainer.train_batches."""

    def __init__(
        self,
        address: str,
        data: TextDataset,
        settings: Settings,
        *,
        wire_dtype: str | None = None,
        cache_root: Path | None = None,
        shared: SplitSide | None = None,
        threads: int | None = None,
    ):
        self.data = data
        self.threads = threads or (shared.threads if shared else torch.get_num_threads())
        self.service = RemoteTopService(address, wire_dtype=WIRE_DTYPES[wire_dtype or settings.wire_dtype])
        if shared is None:  # download (or reuse) the bottom; later sides share it
            self.info = self.service.server_info()
            self.bottom, self.tokenizer, _ = load_server_bottom(self.service, self.info, cache_root=cache_root)
            self.service.bytes_received = 0
        else:
            self.info, self.bottom, self.tokenizer = shared.info, shared.bottom, shared.tokenizer
        self.trainer = SplitTrainer(self.bottom, self.tokenizer, self.service, settings.train_config())
        if shared is not None:  # the same way of running as the side it shares with (see calibrate_split)
            self.trainer.prefetch = shared.trainer.prefetch
        if shared is None:
            with torch_threads(self.threads):
                norm = self.trainer.mean_hidden_norm(data.texts[:256])
            self.eta = eta_for_noise_ratio(settings.noise_ratio, norm, self.info.hidden_size)
        else:
            self.eta = shared.eta
        self.trainer.privatizer = Privatizer(self.eta, key=NOISE_KEY)
        self.trainer.open(len(data.label_names))

    def train(self, batches: list[list[int]]) -> float:
        """Seconds for one optimizer step per batch."""
        with torch_threads(self.threads):  # the prefetch thread takes the count current when it starts
            started = time.perf_counter()
            self.trainer.train_batches(self.data, batches)
            return time.perf_counter() - started

    def predict(self, texts: list[str]) -> float:
        with torch_threads(self.threads):
            started = time.perf_counter()
            self.trainer.predict(texts, batch_size=len(texts))
            return time.perf_counter() - started

    def close(self) -> None:
        self.service.close_session(self.trainer.session_id)
        self.service.close()


class SingleSide:
    """Ordinary PEFT fine-tuning in one process: the unsplit sequence classifier, the same PEFT on the
    top blocks k..L-1, the bottom blocks and embeddings frozen, AdamW over the trainable parameters."""

    def __init__(self, model: str, split: int, data: TextDataset, settings: Settings):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = resolve_model(model)
        self.data, self.settings = data, settings
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tokenizer.pad_token is None:  # as sap_common.models.registry.load_model does
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=len(data.label_names), dtype=torch.float32, local_files_only=True
        )
        if self.model.config.pad_token_id is None:  # decoders find the last real token by it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        family = family_of(self.model.config)
        base = self.model.base_model
        blocks = base_blocks(base, family)
        head = self.model.classifier if family is ENCODER else self.model.score
        self.model.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            apply_peft(blocks[split:], family, PeftConfig())
        head.requires_grad_(True)
        # The frozen part runs as the split's bottom does (eval mode: no dropout), so both do the same math.
        self.frozen = [base.embeddings if family is ENCODER else base.embed_tokens, *blocks[:split]]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
        self.threads = torch.get_num_threads()

    def calibrate(self, batches: list[list[int]], choices: list[int], repeats: int = 2) -> dict[int, float]:
        """Seconds per step at each torch thread count (one untimed step each, then `repeats` interleaved
        passes); keeps the fastest. One thread can beat one per core on a small or shared machine: a
        parallel region waits for its slowest thread, and small matrices gain little from two."""
        timings: dict[int, list[float]] = {threads: [] for threads in choices}
        for threads in choices:
            self.threads = threads
            self.train(batches[:1])
        for _ in range(repeats):
            best = min((min(t) for t in timings.values() if t), default=None)
            for threads in choices:
                if best is not None and min(timings[threads]) > 2 * best:
                    continue  # clearly slower already: do not spend time confirming it
                self.threads = threads
                timings[threads].append(self.train(batches) / len(batches))
        per_step = {threads: statistics.mean(t) for threads, t in timings.items()}
        self.threads = min(per_step, key=per_step.get)
        return per_step

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.settings.max_length, return_tensors="pt"
        )

    def train(self, batches: list[list[int]]) -> float:
        """Seconds for one optimizer step per batch."""
        with torch_threads(self.threads):
            started = time.perf_counter()
            self.model.train()
            for module in self.frozen:
                module.eval()
            for batch in batches:
                inputs = self._encode([self.data.texts[i] for i in batch])
                logits = self.model(**inputs).logits  # (B, C)
                loss = F.cross_entropy(logits, torch.tensor([self.data.labels[i] for i in batch]))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss.item()
            return time.perf_counter() - started

    def predict(self, texts: list[str]) -> float:
        with torch_threads(self.threads):
            started = time.perf_counter()
            self.model.eval()
            with torch.no_grad():
                torch.softmax(self.model(**self._encode(texts)).logits.float(), dim=-1)
            return time.perf_counter() - started


# --- measurements ------------------------------------------------------------------------------------


def alternate(
    runs: dict[str, Callable[[object], float]],
    chunks: list,
    cpu: Callable[[], float] | None = None,
    per_chunk: dict[str, list[float]] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Run each side on every chunk, alternating which goes first (ABBA...): total wall seconds per side,
    and CPU seconds per side as counted by cpu() (both processes), which a busy machine disturbs less.
    per_chunk, if given, receives each side's wall seconds chunk by chunk."""
    names = list(runs)
    wall, cpu_used = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for index, chunk in enumerate(chunks):
        for name in names if index % 2 == 0 else names[::-1]:
            before = cpu() if cpu else 0.0
            seconds = runs[name](chunk)
            wall[name] += seconds
            cpu_used[name] += (cpu() - before) if cpu else 0.0
            if per_chunk is not None:
                per_chunk.setdefault(name, []).append(seconds)
    return wall, cpu_used


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads), plus those of process pid if given."""
    times = os.times()
    total = times.user + times.system
    if pid is not None:  # /proc/PID/stat: utime and stime are fields 14 and 15, after the ")" of the name
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile, q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure_training(
    split: SplitSide, single: SingleSide, batches: list[list[int]], settings: Settings, server_pid: int | None = None
) -> dict:
    """Throughput of both sides on the same batches, and the split's bytes per example."""
    warm = batches[: settings.warmup_steps]
    split.train(warm)
    single.train(warm)
    timed = batches[settings.warmup_steps :]
    size = settings.steps_per_round
    chunks = [timed[i : i + size] for i in range(0, len(timed), size)]
    sent_before = split.service.bytes_sent
    per_chunk: dict[str, list[float]] = {}
    seconds, cpu = alternate(
        {"split": split.train, "single": single.train}, chunks, cpu=lambda: cpu_seconds(server_pid), per_chunk=per_chunk
    )
    sent = split.service.bytes_sent - sent_before
    examples = sum(len(b) for b in timed)
    again = {}
    if settings.second_epoch:  # the same batches again: the split skips the bottom and the noise
        seconds_again, _ = alternate({"split": split.train, "single": single.train}, chunks)
        again = {
            "second_epoch_split_examples_per_s": examples / seconds_again["split"],
            "second_epoch_single_examples_per_s": examples / seconds_again["single"],
            "second_epoch_throughput_ratio": seconds_again["single"] / seconds_again["split"],
        }
    tokens = sum(
        len(ids)
        for b in timed
        for ids in split.tokenizer([split.data.texts[i] for i in b], truncation=True, max_length=settings.max_length)[
            "input_ids"
        ]
    )
    hidden = split.info.hidden_size
    naive = settings.max_length * (hidden * 4 + MASK_BYTES)
    return {
        "timed_steps": len(timed),
        "timed_examples": examples,
        "split_seconds": seconds["split"],
        "single_seconds": seconds["single"],
        "split_examples_per_s": examples / seconds["split"],
        "single_examples_per_s": examples / seconds["single"],
        "throughput_ratio": seconds["single"] / seconds["split"],
        # CPU seconds per example, client + server for the split: the cost a busy machine distorts less
        "split_cpu_seconds_per_example": cpu["split"] / examples,
        "single_cpu_seconds_per_example": cpu["single"] / examples,
        "cpu_ratio": cpu["split"] / cpu["single"] if cpu["single"] > 0 else None,
        # the spread behind the ratio: each chunk's seconds per step, chunk by chunk in the order they ran
        "chunk_steps": size,
        "split_seconds_per_step_by_chunk": [round(t / len(c), 4) for t, c in zip(per_chunk["split"], chunks)],
        "single_seconds_per_step_by_chunk": [round(t / len(c), 4) for t, c in zip(per_chunk["single"], chunks)],
        "wire_dtype": settings.wire_dtype,
        "bytes_sent_per_example": sent / examples,
        "naive_bytes_per_example": naive,
        "wire_bytes_ratio": sent / examples / naive,
        "real_tokens_per_example": tokens / examples,
        **again,
    }


def measure_predict(split: SplitSide, single: SingleSide, texts: list[str], settings: Settings) -> dict:
    """Latency p50/p95 (ms) per batch size, the two sides alternating call by call."""
    out = {}
    for batch, reps in settings.predict_reps.items():
        # consecutive batches of the held-out texts, wrapping around when they run out
        chunks = [
            [texts[(i * batch + j) % len(texts)] for j in range(batch)] for i in range(settings.predict_warmup + reps)
        ]
        for chunk in chunks[: settings.predict_warmup]:
            split.predict(chunk)
            single.predict(chunk)
        times: dict[str, list[float]] = {"split": [], "single": []}
        for index, chunk in enumerate(chunks[settings.predict_warmup :]):
            order = ("split", "single") if index % 2 == 0 else ("single", "split")
            for name in order:
                times[name].append((split if name == "split" else single).predict(chunk) * 1000)
        out[f"batch_{batch}"] = {
            "calls": reps,
            **{f"{name}_p{q}_ms": percentile(values, q) for name, values in times.items() for q in (50, 95)},
            "p50_ratio": percentile(times["split"], 50) / percentile(times["single"], 50),
            "p95_ratio": percentile(times["split"], 95) / percentile(times["single"], 95),
        }
    return out


def measure_wire(address: str, first: SplitSide, batches: list[list[int]], settings: Settings) -> dict:
    """Per wire dtype, on a fresh session: bytes sent per example and seconds per step."""
    out = {}
    naive = settings.max_length * (first.info.hidden_size * 4 + MASK_BYTES)
    for name in WIRE_NAMES:
        side = SplitSide(address, first.data, settings, wire_dtype=name, shared=first)
        try:
            side.train(batches[:1])  # warm-up: the channel and the session
            before = side.service.bytes_sent
            seconds = side.train(batches[1:])
            examples = sum(len(b) for b in batches[1:])
            sent = (side.service.bytes_sent - before) / examples
            out[name] = {
                "bytes_sent_per_example": sent,
                "wire_bytes_ratio": sent / naive,
                "step_seconds": seconds / len(batches[1:]),
            }
        finally:
            side.close()
    return out


@contextmanager
def slow_link_proxy(target: str, mbit: float, rtt_ms: float) -> Iterator[str]:
    """benchmarks/slow_link.py in its own process (so its timing does not share this one's GIL)."""
    log = tempfile.TemporaryFile(mode="w+")
    proxy = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("slow_link.py")),
            "--listen",
            "127.0.0.1:0",
            "--target",
            target,
            "--mbit",
            str(mbit),
            "--rtt-ms",
            str(rtt_ms),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        yield _wait_for_line(proxy, r"slow-link listening on (\S+)", 60, log)
    finally:
        _stop(proxy, log, timeout=10)


def measure_slow_link(address: str, first: SplitSide, batches: list[list[int]], settings: Settings) -> dict:
    """Per wire dtype: seconds per training step on plain loopback (compute) and through the slow link,
    the two paths alternating chunk by chunk on the same batches; transfer = slow link - loopback.
    `expected_transfer_seconds` is the floor the link sets: the bytes sent per step at its rate plus two
    round trips (Forward, then Backward)."""
    out = {"mbit": settings.mbit, "rtt_ms": settings.rtt_ms, "steps": len(batches) - 1}
    chunks = [batches[i : i + 2] for i in range(1, len(batches), 2)]
    with slow_link_proxy(address, settings.mbit, settings.rtt_ms) as slow_address:
        for name in WIRE_NAMES:
            paths = {
                "loopback": SplitSide(address, first.data, settings, wire_dtype=name, shared=first),
                "slow_link": SplitSide(slow_address, first.data, settings, wire_dtype=name, shared=first),
            }
            try:
                for side in paths.values():
                    side.train(batches[:1])  # warm-up: channel, session, the link's first round trips
                before = paths["slow_link"].service.bytes_sent
                seconds, _ = alternate({path: side.train for path, side in paths.items()}, chunks)
                sent_per_step = (paths["slow_link"].service.bytes_sent - before) / (len(batches) - 1)
            finally:
                for side in paths.values():
                    side.close()
            loopback, slow = (seconds[path] / (len(batches) - 1) for path in ("loopback", "slow_link"))
            out[name] = {
                "bytes_sent_per_step": sent_per_step,
                "step_seconds_loopback": loopback,
                "step_seconds_slow_link": slow,
                "compute_seconds": loopback,
                "transfer_seconds": slow - loopback,
                "expected_transfer_seconds": sent_per_step * 8 / (settings.mbit * 1e6) + 2 * settings.rtt_ms / 1000,
            }
    return out


def measure_server_sessions(
    server: ServerProcess, first: SplitSide, batch: list[int], settings: Settings, trainable_parameters: int
) -> dict:
    """Server RSS with 1 session vs N, each session opened, then each trained one step. The opened figure
    is the session's own weights (PEFT + head); after a step it adds gradients and AdamW state, and
    whatever the allocator keeps of the step's activations. Expected (weights, gradients and two AdamW
    moments in float32): 16 bytes per trainable parameter."""
    sides = [SplitSide(server.address, first.data, settings, shared=first)]
    try:
        sides[0].train([batch])
        one = server_rss_mib(server.pid)
        sides += [SplitSide(server.address, first.data, settings, shared=first) for _ in range(settings.sessions - 1)]
        opened = server_rss_mib(server.pid)
        for side in sides[1:]:
            side.train([batch])
        trained = server_rss_mib(server.pid)
    finally:
        for side in sides:
            side.close()
    extra = settings.sessions - 1
    return {
        "sessions": settings.sessions,
        "rss_one_session_mib": one,
        "rss_n_opened_mib": opened,
        "rss_n_trained_mib": trained,
        "mib_per_extra_session_opened": (opened - one) / extra,
        "mib_per_extra_session": (trained - one) / extra,
        "trainable_parameters": trainable_parameters,
        "expected_mib_per_session": trainable_parameters * 16 / 2**20,
    }


def measure_client_memory(model: str, split: int, address: str, texts: list[str], settings: Settings) -> dict:
    """Peak RSS of a process holding only the bottom (downloaded from the server) vs one that loads the
    full model, each running one forward over the same batch in its own fresh subprocess."""
    peaks, held = {}, {}
    with tempfile.TemporaryDirectory(prefix="sap-bench-") as tmp:
        batch = Path(tmp) / "texts.json"
        batch.write_text(json.dumps(texts[: settings.batch_size]))
        for role in ("bottom", "full"):
            result = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child-memory",
                    role,
                    "--model",
                    model,
                    "--split",
                    str(split),
                    "--server",
                    address,
                    "--texts",
                    str(batch),
                    "--max-length",
                    str(settings.max_length),
                    "--cache",
                    tmp,
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if result.returncode != 0:
                raise RuntimeError(f"memory child ({role}) failed:\n{result.stderr[-2000:]}")
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            peaks[role], held[role] = figures["peak_rss_mib"], figures["rss_mib"]
    return {
        "client_peak_rss_mib": peaks["bottom"],
        "full_model_peak_rss_mib": peaks["full"],
        "client_memory_ratio": peaks["bottom"] / peaks["full"],
        # what each holds after the forward (the peak includes loading: load_bottom holds the
        # bottom twice for a moment, the state dict and the model it is copied into)
        "client_rss_mib": held["bottom"],
        "full_model_rss_mib": held["full"],
        "client_rss_ratio": held["bottom"] / held["full"],
    }


def _child_memory(args: argparse.Namespace) -> None:
    """In a fresh process: load the bottom (role bottom) or the full model (role full), run one forward
    over the batch, print the peak RSS as JSON."""
    texts = json.loads(Path(args.texts).read_text())
    if args.child_memory == "bottom":
        with RemoteTopService(args.server) as service:
            bottom, tokenizer, _ = load_server_bottom(service, service.server_info(), cache_root=Path(args.cache))
        tokenizer.padding_side = "right"
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        with torch.no_grad():
            bottom(inputs["input_ids"], inputs["attention_mask"])
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = resolve_model(args.model)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token or tokenizer.unk_token
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, local_files_only=True)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        with torch.no_grad():
            model(**inputs)
    print(
        json.dumps(
            {
                "role": args.child_memory,
                "peak_rss_mib": peak_rss_mib(),
                "rss_mib": server_rss_mib(os.getpid()),
                "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB. Not ru_maxrss: Linux carries that over exec
    from the forking process, so a child of the (large) bench process would report the bench's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: the best there is


# --- one model ---------------------------------------------------------------------------------------


def batches_of(data: TextDataset, settings: Settings, steps: int) -> list[list[int]]:
    """`steps` batches of distinct examples in a seeded random order."""
    needed = steps * settings.batch_size
    if needed > len(data):
        raise ValueError(f"{steps} steps of {settings.batch_size} need {needed} examples; the data has {len(data)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    return [order[i : i + settings.batch_size] for i in range(0, needed, settings.batch_size)]


def bench_model(
    model: str, split: int, data: TextDataset, settings: Settings, *, log: Callable[[str], None] = print
) -> dict:
    """Every figure for one model cut at split, against one sap-server subprocess."""
    train_steps = settings.warmup_steps + settings.rounds * settings.steps_per_round
    calibration = len(SPLIT_MODES) * (1 + 2 * settings.calibration_steps)
    batches = batches_of(data, settings, train_steps + calibration)
    batches, calibration_batches = batches[:train_steps], batches[train_steps:]
    wire_batches = batches[: settings.wire_steps + 1]
    slow_batches = batches[: settings.slow_steps + 1]
    used = {i for b in batches for i in b}
    held = [t for i, t in enumerate(data.texts) if i not in used] or data.texts
    started = time.perf_counter()
    result: dict = {"model": model, "split": split}
    single = SingleSide(model, split, data, settings)
    # The baseline at its best: calibrated before the server starts, on the warm-up batches.
    calibration = single.calibrate(batches[: min(2, settings.warmup_steps)], thread_choices(settings))
    client_threads, server_threads = split_threads(settings, single.threads)
    result["threads"] = {
        "single": single.threads,
        "client": client_threads,
        "server": server_threads,
        "single_seconds_per_step_by_threads": calibration,
    }
    server_started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="sap-bench-cache-") as cache,
        sap_server(model, split, max_sessions=settings.sessions + 8, threads=server_threads) as server,
    ):
        result["server_start_seconds"] = time.perf_counter() - server_started
        log(f"[{model} k={split}] sap-server {server.address} ready after {result['server_start_seconds']:.1f} s")
        split_side = SplitSide(server.address, data, settings, cache_root=Path(cache), threads=client_threads)
        result.update(
            hidden_size=split_side.info.hidden_size,
            total_blocks=split_side.info.total_blocks,
            peft=split_side.info.peft,
            eta=split_side.eta,
            noise_ratio=settings.noise_ratio,
        )
        modes = calibrate_split(split_side, calibration_batches, settings, client_threads, server_threads)
        result["split_mode"] = "overlap" if split_side.trainer.prefetch else "sequential"
        result["split_seconds_per_step_by_mode"] = modes
        result["threads"]["client"] = split_side.threads
        log(
            f"[{model} k={split}] torch threads: {result['threads']}; split mode {result['split_mode']} "
            f"(s/step: {', '.join(f'{m} {v:.3f}' for m, v in modes.items())})"
        )
        result["training"] = measure_training(split_side, single, batches, settings, server.pid)
        result["noise_to_signal"] = split_side.trainer.privatizer.noise_to_signal
        log(f"[{model} k={split}] training: throughput ratio {result['training']['throughput_ratio']:.3f}")
        result["predict"] = measure_predict(split_side, single, held, settings)
        log(f"[{model} k={split}] predict: p50 ratio at 32 {result['predict']['batch_32']['p50_ratio']:.3f}")
        result["trainable_parameters"] = sum(p.numel() for p in single.model.parameters() if p.requires_grad)
        del single  # free the single-process model before the memory figures
        result["wire"] = measure_wire(server.address, split_side, wire_batches, settings)
        if settings.memory:
            result["server_sessions"] = measure_server_sessions(
                server, split_side, batches[0], settings, result["trainable_parameters"]
            )
            result["client_memory"] = measure_client_memory(model, split, server.address, data.texts, settings)
            log(
                f"[{model} k={split}] memory: client {result['client_memory']['client_memory_ratio']:.3f} of full, "
                f"{result['server_sessions']['mib_per_extra_session']:.1f} MiB per extra session"
            )
        if settings.slow_link:
            result["slow_link"] = measure_slow_link(server.address, split_side, slow_batches, settings)
            log(f"[{model} k={split}] slow link measured")
        split_side.close()
    result["seconds"] = time.perf_counter() - started
    return result


# --- report ------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_default_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "niceness": os.nice(0),
        "load_average_at_start": list(os.getloadavg()),
    }


def headline(result: dict) -> dict:
    """The figures `make bench-quick` prints on one line."""
    training, predict = result["training"], result["predict"]
    return {
        "model": result["model"],
        "split": result["split"],
        "throughput_ratio": round(training["throughput_ratio"], 4),
        "wire_bytes_ratio": round(training["wire_bytes_ratio"], 4),
        "predict_p50_ratio": round(predict["batch_32"]["p50_ratio"], 4),
        "predict_p50_ratio_batch_1": round(predict["batch_1"]["p50_ratio"], 4),
        "cpu_ratio": round(training["cpu_ratio"], 4) if training["cpu_ratio"] else None,
        "threads": {k: v for k, v in result["threads"].items() if k != "single_seconds_per_step_by_threads"},
        "split_mode": result["split_mode"],
        "split_examples_per_s": round(training["split_examples_per_s"], 2),
        "single_examples_per_s": round(training["single_examples_per_s"], 2),
        "bytes_sent_per_example": round(training["bytes_sent_per_example"], 1),
        "naive_bytes_per_example": training["naive_bytes_per_example"],
        "wire_dtype": training["wire_dtype"],
        "wire_bytes_ratio_float32": round(result["wire"]["float32"]["wire_bytes_ratio"], 4),
        "split_p50_ms_batch_32": round(predict["batch_32"]["split_p50_ms"], 2),
        "single_p50_ms_batch_32": round(predict["batch_32"]["single_p50_ms"], 2),
    }


def table(result: dict) -> str:
    """A readable table of one model's figures."""
    t, p, w, th = result["training"], result["predict"], result["wire"], result["threads"]
    rows = [
        ("figure", "split", "single process", "ratio (goal)"),
        (
            "training examples/s",
            f"{t['split_examples_per_s']:.1f}",
            f"{t['single_examples_per_s']:.1f}",
            f"{t['throughput_ratio']:.3f} (>= 0.90)",
        ),
        (
            "torch threads",
            f"client {th['client']} + server {th['server']}",
            f"{th['single']}",
            "single s/step: " + ", ".join(f"{n}: {v:.3f}" for n, v in th["single_seconds_per_step_by_threads"].items()),
        ),
        (
            "split mode",
            result["split_mode"],
            "",
            "split s/step: " + ", ".join(f"{m}: {v:.3f}" for m, v in result["split_seconds_per_step_by_mode"].items()),
        ),
        *(
            [
                (
                    "  second epoch (split re-sends cached tensors)",
                    f"{t['second_epoch_split_examples_per_s']:.1f}",
                    f"{t['second_epoch_single_examples_per_s']:.1f}",
                    f"{t['second_epoch_throughput_ratio']:.3f}",
                )
            ]
            if "second_epoch_throughput_ratio" in t
            else []
        ),
        (
            "training CPU ms / example (both processes)",
            f"{t['split_cpu_seconds_per_example'] * 1000:.1f}",
            f"{t['single_cpu_seconds_per_example'] * 1000:.1f}",
            f"{t['cpu_ratio']:.3f}" if t["cpu_ratio"] else "-",
        ),
        (
            f"bytes sent / example ({t['wire_dtype']})",
            f"{t['bytes_sent_per_example']:.0f}",
            f"naive {t['naive_bytes_per_example']}",
            f"{t['wire_bytes_ratio']:.3f} (<= 0.35)",
        ),
    ]
    for name in WIRE_NAMES:
        rows.append(
            (
                f"  bytes / example ({name})",
                f"{w[name]['bytes_sent_per_example']:.0f}",
                "",
                f"{w[name]['wire_bytes_ratio']:.3f}",
            )
        )
    for batch in (1, 32):
        b = p[f"batch_{batch}"]
        rows.append(
            (
                f"predict batch {batch} p50 / p95 ms",
                f"{b['split_p50_ms']:.1f} / {b['split_p95_ms']:.1f}",
                f"{b['single_p50_ms']:.1f} / {b['single_p95_ms']:.1f}",
                f"{b['p50_ratio']:.3f} / {b['p95_ratio']:.3f}",
            )
        )
    if "client_memory" in result:
        c, s = result["client_memory"], result["server_sessions"]
        rows.append(
            (
                "client peak RSS MiB (bottom vs full)",
                f"{c['client_peak_rss_mib']:.0f}",
                f"{c['full_model_peak_rss_mib']:.0f}",
                f"{c['client_memory_ratio']:.3f}",
            )
        )
        if "client_rss_mib" in c:
            rows.append(
                (
                    "client RSS MiB after loading (bottom vs full)",
                    f"{c['client_rss_mib']:.0f}",
                    f"{c['full_model_rss_mib']:.0f}",
                    f"{c['client_rss_ratio']:.3f}",
                )
            )
        rows.append(
            (
                "server RSS MiB per extra session (opened / trained)",
                f"{s['mib_per_extra_session_opened']:.1f} / {s['mib_per_extra_session']:.1f}",
                "",
                f"expected {s['expected_mib_per_session']:.1f} ({s['sessions']} sessions)",
            )
        )
    if "slow_link" in result:
        link = result["slow_link"]
        for name in WIRE_NAMES:
            d = link[name]
            rows.append(
                (
                    f"step s, {link['mbit']:g} Mbit/s {link['rtt_ms']:g} ms RTT, {name}",
                    f"{d['step_seconds_slow_link']:.3f}",
                    f"compute {d['compute_seconds']:.3f}",
                    f"transfer {d['transfer_seconds']:.3f} (floor {d['expected_transfer_seconds']:.3f})",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"{result['model']} split {result['split']} (hidden {result['hidden_size']}, "
        f"{result['total_blocks']} blocks, {result['peft']}, noise ratio {result['noise_ratio']}, "
        f"measured noise/signal {result['noise_to_signal']:.3f})"
    ]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def run(
    models: list[tuple[str, int]],
    settings: Settings,
    data: TextDataset,
    *,
    log: Callable[[str], None] = print,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """Bench every model; the report (machine, settings, one result per model). save(report) runs after
    each model, so a long run that is stopped keeps the models it finished."""
    started = time.perf_counter()
    report = {
        "machine": machine(),
        "settings": asdict(settings),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": [],
    }
    for model, split in models:
        report["results"].append(bench_model(model, split, data, settings, log=log))
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
        report["headline"] = headline(report["results"][0])
        report["complete"] = len(report["results"]) == len(models)
        report["seconds"] = time.perf_counter() - started
        if save is not None:
            save(report)
    return report


def parse_models(text: str) -> list[tuple[str, int]]:
    """'minilm-l6:2,smollm2-135m:6' -> [('minilm-l6', 2), ('smollm2-135m', 6)]."""
    models = []
    for item in text.split(","):
        name, _, split = item.strip().rpartition(":")
        if not name or not split.isdigit():
            raise argparse.ArgumentTypeError(f"expected MODEL:SPLIT[,MODEL:SPLIT...], got {text!r}")
        models.append((name, int(split)))
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM split 2 only; no memory figures (< 2 min)")
    parser.add_argument("--slow-link", action="store_true", help="also run the slow-link mode (on in the full run)")
    parser.add_argument(
        "--models", type=parse_models, help="MODEL:SPLIT,... (default minilm-l6:2 quick, + smollm2-135m:6 full)"
    )
    parser.add_argument("--data", type=Path, default=DATA, help=f"labelled CSV (default {DATA.relative_to(REPO)})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--noise-ratio", type=float, default=0.25)
    parser.add_argument("--wire-dtype", choices=WIRE_NAMES, default="bfloat16")
    parser.add_argument("--rounds", type=int, help="alternating timed chunks per side")
    parser.add_argument("--steps-per-round", type=int)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for every process (default: the single process and the server "
        "whichever of 1 and all cores trains the single process faster, the client half)",
    )
    parser.add_argument("--mbit", type=float, default=100.0, help="slow link: Mbit/s each way (default 100)")
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="slow link: round trip in ms (default 40)")
    parser.add_argument("--out", type=Path, help="JSON report (default benchmarks/results/bench[_quick].json)")
    # internal: one memory measurement in a fresh process
    parser.add_argument("--child-memory", choices=("bottom", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--split", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        _child_memory(args)
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    settings = Settings(
        batch_size=args.batch_size,
        max_length=args.max_length,
        noise_ratio=args.noise_ratio,
        wire_dtype=args.wire_dtype,
        mbit=args.mbit,
        rtt_ms=args.rtt_ms,
        threads=args.threads,
        memory=not args.quick,
        slow_link=args.slow_link or not args.quick,
        second_epoch=not args.quick,
    )
    if not args.quick:  # more timed steps: the full run has the time
        settings = replace(settings, rounds=24, predict_reps={1: 240, 32: 12})
    settings = replace(
        settings,
        rounds=args.rounds or settings.rounds,
        steps_per_round=args.steps_per_round or settings.steps_per_round,
    )
    models = args.models or list(QUICK_MODELS if args.quick else FULL_MODELS)
    out = args.out or RESULTS / ("bench_quick.json" if args.quick else "bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(
        models,
        settings,
        load_labelled_csv(args.data),
        save=lambda partial: out.write_text(json.dumps(partial, indent=2) + "\n"),
    )
    print()
    for result in report["results"]:
        print(table(result))
        print()
    print(
        f"{len(models)} model(s) in {report['seconds']:.0f} s on {report['machine']['cpu']} "
        f"({report['machine']['cores']} cores); report: {out}"
    )
    print(json.dumps(report["headline"]))  # the last line: one JSON object
    return 0


if __name__ == "__main__":
    sys.exit(main())
