"""The utility/privacy table of the paper, reproduced on real data (`make privacy-table`).

For each model, split k, noise ratio R (E||n|| = R * mean||h|| at the split) and CTI off/on, with a frozen
bottom and LoRA on the provider's top:
- utility: the client's real training loop (SplitTrainer: bottom, privatizer, CTI) against the provider's
  real session code (LocalTopService, the code the gRPC servicer calls; tests/test_equivalence.py shows the
  two give identical weights), then accuracy on held-out movie snippets;
- EIA: the audit's embedding inversion on what that client sends for its first training snippets, by every
  attack that applies (`sap-client audit --attack auto`: nearest neighbour at k = 0, optimization at k >= 1,
  sequential decoding for decoders, an inverter learned on public snippets), the strongest reported;
- AIA: the party of convention paragraphs, predicted by an MLP on mean-pooled sent vectors (an
  auxiliary half trains it, the disjoint victim half scores it).
Plus, at one operating point, the trained bottom, BitFit and Adapter; then a CTI study (CTI against no CTI at
equal privacy, over three seeds, with `--rescale-noised`). Two more studies run on request only: as DESIGN's
client sends (h + n), and with three passes over the data.
Cells run two at a time in worker processes (--workers), the slowest model's first. Each cell is written
to its folder as it finishes, so an interrupted run resumes where it stopped; the table, CSV and PNG are
rebuilt from every cell at the end.

    python benchmarks/privacy_table.py [--quick] [--workers 2] [--out benchmarks/results]
    python benchmarks/privacy_table.py --hn-study       # CTI as sent without rescaling, h + n (not in make)
    python benchmarks/privacy_table.py --epochs-study   # CTI with three passes over the data (not in make)
    python benchmarks/privacy_table.py --rescale-study  # only the rescaled CTI study (part of the full run)
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import logging
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from sap_client.audit.attacks import AttackConfig
from sap_client.audit.learned import LearnedConfig
from sap_client.audit.runner import attribute_report, sent_representations, simulated_audit
from sap_client.audit.sequential import SequentialConfig
from sap_client.bottom import load_server_bottom
from sap_client.commands import fit_noise
from sap_client.data import TextDataset, load_labelled_csv
from sap_client.privacy import NoiseConfig
from sap_client.rundir import KEY, RunDir
from sap_client.trainer import SplitTrainer, TrainConfig
from sap_common.peft.config import PeftConfig
from sap_server.local import LocalTopService
from sap_server.provider import Provider

log = logging.getLogger("privacy_table")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelGrid:
    model: str
    splits: tuple[int, ...]
    ratios: tuple[float, ...]  # noise ratios R besides "no noise"
    train_examples: int
    eval_examples: int
    learning_rate: float
    eia_examples: int  # optimization attack (k >= 1): snippets attacked, each truncated to eia_length
    eia_steps: int
    eia_lr: float
    nn_examples: int = 200  # k = 0: nearest neighbour is cheap, so more snippets (every attack sees the same ones)
    eia_length: int = 32
    cti_max_at: tuple[float, ...] = ()  # CTI with --cti-rows max (label-independent noise) too, at these R
    cell_cost: float = 1.0  # a cell's run time relative to the others' (the scheduler starts costly cells first)


@dataclass
class Grid:
    models: list[ModelGrid]
    extras_at: tuple[str, int, float]  # (model, split, R): trained bottom, BitFit and Adapter here
    aia_examples: int = 1000
    aia_length: int = 128
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0
    eia_temperature: float = 0.2
    notes: list[str] = field(default_factory=list)
    snippets: str = "data/movie_snippets.csv"  # text,label (relative to the repository root)
    paragraphs: str = "data/convention_paragraphs.csv"  # text,party
    # The provider's public text (the probe of the sequential attack, the learned inverter): snippets from the
    # middle of the file, disjoint from every training set (the first rows) and the held-out set (the last).
    public_start: int = 4000
    public_examples: int = 1000
    inverter: LearnedConfig = field(default_factory=lambda: LearnedConfig(epochs=4))
    sequential: SequentialConfig = field(default_factory=SequentialConfig)


@dataclass
class CtiStudy:
    """CTI on against off at one split, repeated over seeds (one seed moves accuracy by several points).

    Every seed runs the CTI-off curve and the CTI cells; the CTI cells are compared with the off curve at
    the same EIA privacy, seed by seed and on the means."""

    model: str
    split: int
    seeds: tuple[int, ...]
    off_ratios: tuple[float, ...]
    cti_ratios: tuple[float, ...]
    cti_rows: tuple[str, ...] = ("label", "max")
    exempt_ratios: tuple[float, ...] = ()  # --cti-mode exempt (no noise on the top tokens), max rows
    exempt_top: float = 0.02
    epochs: int = 1  # passes over the training snippets (the sent vectors are the same in every pass)
    rescale: bool = False  # every noised vector rescaled to the mean hidden-state norm before it is sent
    folder: str = "cti_study"  # under the table's folder
    title: str = "CTI over several seeds"
    how: str = "`python benchmarks/privacy_table.py` runs it after the grid"


FULL = Grid(
    models=[
        ModelGrid(
            "minilm-l6",
            (0, 1, 2, 4),
            (2, 4, 8),
            train_examples=2000,
            eval_examples=500,
            learning_rate=1e-3,
            eia_examples=8,
            eia_steps=100,
            eia_lr=0.03,
        ),
        ModelGrid(
            "smollm2-135m",
            (6,),
            (0.25, 1, 2),
            train_examples=512,
            eval_examples=500,
            learning_rate=1e-3,
            eia_examples=4,
            eia_steps=200,
            eia_lr=0.03,
            nn_examples=0,
            cell_cost=3.0,
        ),
    ],
    extras_at=("minilm-l6", 2, 2.0),
)
# The CTI-off curve brackets the CTI cells' privacy: label rows at R 1 (about 0.5) and R 2 (about 0.9), exempt
# at R 2 (about 0.6).
FULL_CTI_STUDY = CtiStudy(
    "minilm-l6",
    4,
    seeds=(0, 1, 2),
    off_ratios=(1.5, 2, 2.5, 3, 4),
    cti_ratios=(1, 2),
    cti_rows=("label",),
    exempt_ratios=(2,),
    how="`python benchmarks/privacy_table.py --hn-study` runs it (not part of `make privacy-table`)",
)
# Is one pass over the data what keeps CTI from paying? The same comparison where CTI's privacy is about 0.5
# and 0.6, with three passes (not part of make privacy-table: 15 cells, 21 minutes more).
EPOCHS_CTI_STUDY = CtiStudy(
    "minilm-l6",
    4,
    seeds=(0, 1, 2),
    off_ratios=(1.5, 2, 2.5),
    cti_ratios=(1,),
    cti_rows=("label",),
    exempt_ratios=(2,),
    epochs=3,
    folder="cti_study_3_epochs",
    title="CTI with three passes over the training snippets",
    how="`python benchmarks/privacy_table.py --epochs-study` runs it (not part of `make privacy-table`)",
)
# The exempt mode's clean vectors go unread because the noisy ones, being longer, draw the top's attention
# (benchmarks/cti_attention.py). Rescaling every noised vector to the mean hidden-state norm (`sap-client
# --rescale-noised`) is post-processing of the d_chi output (the guarantee holds for it) and removes that
# imbalance: the same comparison with it. Part of make privacy-table (15 cells, about 14 minutes).
RESCALE_CTI_STUDY = CtiStudy(
    "minilm-l6",
    4,
    seeds=(0, 1, 2),
    off_ratios=(1.5, 2, 2.5),
    cti_ratios=(1,),
    cti_rows=("label",),
    exempt_ratios=(2,),
    rescale=True,
    folder="cti_study_rescaled",
    title="CTI with every noised vector rescaled to the mean hidden-state norm",
    how="`python benchmarks/privacy_table.py` runs it after the grid (`--rescale-study` runs only it)",
)
QUICK_CTI_STUDY = CtiStudy(
    "minilm-l6", 2, seeds=(0, 1), off_ratios=(2, 4), cti_ratios=(2,), cti_rows=("max",), exempt_ratios=(4,)
)
QUICK = Grid(
    models=[
        ModelGrid(
            "minilm-l6",
            (0, 2),
            (4,),
            train_examples=64,
            eval_examples=64,
            learning_rate=1e-3,
            eia_examples=2,
            eia_steps=5,
            eia_lr=0.03,
            nn_examples=8,
            eia_length=16,
            cti_max_at=(4,),
        )
    ],
    extras_at=("minilm-l6", 2, 4.0),
    aia_examples=64,
    aia_length=32,
    public_examples=64,
    inverter=LearnedConfig(width=32, layers=1, epochs=1),
    sequential=SequentialConfig(probe_candidates=8, embedding_candidates=8, gradient_candidates=4, beam=2),
)


def _cell_id(
    model: str, split: int, ratio: float | None, cti: bool, peft: str, train_bottom: bool, cti_rows: str = "label"
) -> str:
    noise = "none" if ratio is None else f"R{ratio:g}"
    shaped = ("_cti" + ("-max" if cti_rows == "max" else "")) if cti else ""
    return f"{Path(model).name}_k{split}_{noise}{shaped}_{peft}{'_trained-bottom' if train_bottom else ''}"


def _datasets(spec: ModelGrid, grid: Grid) -> tuple[TextDataset, TextDataset, TextDataset, list[int], list[str]]:
    """(training snippets, held-out snippets, AIA paragraphs, their parties, the provider's public snippets)."""
    snippets = load_labelled_csv(ROOT / grid.snippets, "text", "label")
    train = snippets.subset(list(range(spec.train_examples)))
    # held-out snippets from the far end of the file: disjoint from every training set above
    held = snippets.subset(list(range(len(snippets) - spec.eval_examples, len(snippets))))
    end = min(grid.public_start + grid.public_examples, len(snippets) - spec.eval_examples)
    if grid.public_start < spec.train_examples or end <= grid.public_start:
        raise ValueError(f"public snippets {grid.public_start}..{end} overlap the training or held-out snippets")
    attacked = set(train.texts)
    public = [t for t in snippets.texts[grid.public_start : end] if t not in attacked]  # a duplicated text too
    paragraphs = load_labelled_csv(ROOT / grid.paragraphs, "text", "party")
    order = torch.randperm(len(paragraphs), generator=torch.Generator().manual_seed(grid.seed))
    aia = paragraphs.subset(sorted(order[: grid.aia_examples].tolist()))
    return train, held, TextDataset(aia.texts, [], []), aia.labels, public


class Cell:
    """One row of the table: train through the split with these settings, then attack what was sent."""

    def __init__(
        self,
        grid: Grid,
        spec: ModelGrid,
        provider: Provider,
        service: LocalTopService,
        pretrained,
        tokenizer,
        data,
        work: Path,
    ):
        self.grid, self.spec, self.provider, self.service = grid, spec, provider, service
        self.pretrained, self.tokenizer = pretrained, tokenizer
        self.train, self.held, self.paragraphs, self.parties, self.public = data
        self.work = work
        self._clean_paragraphs: list = []
        # what the attacks build once per bottom (public hidden states, the position-0 table) and once per noise
        # mechanism (the probe, the learned inverter): shared by the cells of this provider
        self._attack_cache: dict = {}

    def run(
        self,
        ratio: float | None,
        cti: bool,
        train_bottom: bool,
        cti_rows: str = "label",
        seed: int | None = None,
        cti_mode: str = "scale",
        cti_top: float = 0.1,
        epochs: int = 1,
        rescale: bool = False,
    ) -> dict:
        grid, spec = self.grid, self.spec
        seed = grid.seed if seed is None else seed
        split = self.provider.info.split
        bottom = copy.deepcopy(self.pretrained) if train_bottom else self.pretrained
        config = TrainConfig(
            batch_size=grid.batch_size,
            max_length=grid.max_length,
            seed=seed,
            learning_rate=spec.learning_rate,
            train_bottom=train_bottom,
            epochs=epochs,
        )
        trainer = SplitTrainer(bottom, self.tokenizer, self.service, config)
        run = RunDir(Path(tempfile.mkdtemp(dir=self.work))).create()
        # the noise key comes from the seed (a real client draws a random one), so that a cell can be re-run
        run.file(KEY).write_text(hashlib.sha256(f"sap privacy table noise key {seed}".encode()).hexdigest() + "\n")
        noise = NoiseConfig(
            noise_ratio=ratio,
            cti=cti,
            cti_rows=cti_rows,
            cti_mode=cti_mode,
            cti_top=cti_top,
            rescale_noised=rescale and ratio is not None,
        )  # as `sap-client --rescale-noised`
        trainer.privatizer = fit_noise(noise, trainer, self.train, run) if ratio is not None else None
        started = time.perf_counter()
        metrics = trainer.fit(self.train, self.held)
        self.service.close_session(trainer.session_id)
        train_seconds = time.perf_counter() - started

        started = time.perf_counter()
        nn = split == 0
        examples = spec.nn_examples if nn else spec.eia_examples
        attack_view = SplitTrainer(
            bottom,
            self.tokenizer,
            self.service,
            TrainConfig(batch_size=examples, max_length=grid.max_length if nn else spec.eia_length),
            trainer.privatizer,
        )
        # every attack that applies, the strongest reported (sap-client audit --attack auto)
        attack = AttackConfig(
            steps=spec.eia_steps,
            lr=spec.eia_lr,
            temperature=grid.eia_temperature,
            seed=seed,
            sequential=grid.sequential,
            learned=replace(grid.inverter, seed=seed),
        )
        # the inverter and the probe depend on the mechanism only (eta and the CTI table come from the training
        # snippets, the same for every seed), so the cells of a study's seeds share them
        mechanism = json.dumps([ratio, cti, cti_rows, cti_mode, cti_top, rescale, nn])
        eia = simulated_audit(
            attack_view,
            self.train.subset(list(range(examples))),
            None,
            attack,
            attacker=self.pretrained,
            public=self.public,
            cache=self._attack_cache,
            mechanism=mechanism,
        )
        pooled_view = SplitTrainer(
            bottom,
            self.tokenizer,
            self.service,
            TrainConfig(batch_size=32, max_length=grid.aia_length),
            trainer.privatizer,
        )
        # the paragraphs' clean bottom outputs are the same in every frozen-bottom cell: computed once
        clean = [] if train_bottom else self._clean_paragraphs
        aia = attribute_report(sent_representations(pooled_view, self.paragraphs, clean), self.parties, seed)
        privatizer = trainer.privatizer
        return {
            "model": self.provider.info.model_id,
            "split": split,
            "total_blocks": self.provider.info.total_blocks,
            "peft": self.provider.info.peft,
            "train_bottom": train_bottom,
            "seed": seed,
            "epochs": epochs,
            "rescale": rescale,
            "noise_ratio": ratio,
            "cti": cti,
            "cti_rows": cti_rows if cti else None,
            "cti_mode": cti_mode if cti else None,
            "cti_top": cti_top if cti and cti_mode == "exempt" else None,
            "eta": privatizer.eta if privatizer else None,
            "noise_to_signal": privatizer.noise_to_signal if privatizer else 0.0,
            "accuracy": metrics["eval_accuracy"],
            "eval_majority": metrics["eval_majority"],
            "train_examples": metrics["train_examples"],
            "eval_examples": metrics["eval_examples"],
            "eia_attack": eia["attack"],
            "eia_tokens": eia["eia_tokens"],
            "eia_examples": eia["examples"],
            "eia_recovery": eia["eia_token_recovery"],
            "eia_recovery_content": eia["eia_token_recovery_content"],
            "eia_attacks": {kind: f["recovery"] for kind, f in eia["eia_attacks"].items()},
            "public_examples": eia["public_examples"],
            "eia_recovery_without_special": eia["eia_token_recovery_without_special"],
            "eia_privacy": eia["eia_privacy"],
            "aia_accuracy": aia["aia_accuracy"],
            "aia_baseline": aia["aia_baseline"],
            "aia_privacy": aia["aia_privacy"],
            "aia_victims": aia["aia_victims"],
            "train_seconds": round(train_seconds, 1),
            "attack_seconds": round(time.perf_counter() - started, 1),
        }


@dataclass(frozen=True)
class Task:
    """One cell to run: which provider it needs (model, split, PEFT method), its name, seed and settings."""

    model: str
    split: int
    method: str
    name: str
    seed: int
    settings: dict
    out_dir: Path

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.name}.json"

    @property
    def signature(self) -> tuple:
        """What the cell computes: two tasks with one signature give the same figures."""
        s = self.settings
        return _signature(
            self.model,
            self.split,
            self.method,
            s["train_bottom"],
            self.seed,
            s["ratio"],
            s["cti"],
            s.get("cti_rows", "label"),
            s.get("cti_mode", "scale"),
            s.get("cti_top"),
            s.get("epochs", 1),
            s.get("rescale", False),
        )


def _signature(
    model: str,
    split: int,
    method: str,
    train_bottom: bool,
    seed: int,
    ratio: float | None,
    cti: bool,
    rows: str | None,
    mode: str | None,
    top: float | None,
    epochs: int = 1,
    rescale: bool = False,
) -> tuple:
    return (
        Path(model).name,
        split,
        method,
        bool(train_bottom),
        seed,
        ratio,
        bool(cti),
        rows if cti else None,
        (mode or "scale") if cti else None,
        top if cti and mode == "exempt" else None,
        epochs,
        bool(rescale),
    )


def _row_signature(row: dict) -> tuple:
    return _signature(
        row["model"],
        row["split"],
        row["peft"],
        row["train_bottom"],
        row["seed"],
        row["noise_ratio"],
        row["cti"],
        row.get("cti_rows"),
        row.get("cti_mode"),
        row.get("cti_top"),
        row.get("epochs", 1),
        row.get("rescale", False),
    )


def grid_tasks(grid: Grid, cells_dir: Path) -> list[Task]:
    """Every cell of the grid: per split, no noise, then each R with CTI off and on (+ max rows at cti_max_at),
    and the extras (trained bottom, BitFit, Adapter) at their operating point."""
    extra_model, extra_split, extra_ratio = grid.extras_at
    tasks = []
    for spec in grid.models:
        for split in spec.splits:
            plan = [(None, False, False, "label")] + [
                (r, cti, False, "label") for r in spec.ratios for cti in (False, True)
            ]
            plan += [(r, True, False, "max") for r in spec.ratios if r in spec.cti_max_at]
            extras = (spec.model, split) == (extra_model, extra_split)
            if extras:
                plan.append((extra_ratio, False, True, "label"))  # the trained bottom, at the operating point
            for method, cells in [("lora", plan)] + [
                (m, [(extra_ratio, False, False, "label")]) for m in (("bitfit", "adapter") if extras else ())
            ]:
                tasks += [
                    Task(
                        spec.model,
                        split,
                        method,
                        _cell_id(spec.model, split, ratio, cti, method, bottom, rows),
                        grid.seed,
                        {"ratio": ratio, "cti": cti, "train_bottom": bottom, "cti_rows": rows},
                        cells_dir,
                    )
                    for ratio, cti, bottom, rows in cells
                ]
    return tasks


def _study_cell_id(study: CtiStudy, seed: int, ratio: float, rows: str | None, exempt: bool = False) -> str:
    kind = "off" if rows is None else f"cti-exempt{study.exempt_top:g}-{rows}" if exempt else f"cti-{rows}"
    passes = f"_e{study.epochs}" if study.epochs != 1 else ""
    rescaled = "_rescaled" if study.rescale else ""
    return f"{Path(study.model).name}_k{study.split}_s{seed}_R{ratio:g}_{kind}{passes}{rescaled}"


def study_tasks(study: CtiStudy, study_dir: Path, shared: list[Task] = ()) -> list[Task]:
    """Every cell of the CTI study: per seed, the CTI-off curve, the CTI cells and the exempt cells; less those
    that a task in `shared` (the grid's) computes already (`study_rows` takes them from there)."""
    plan = [(seed, r, None, False) for seed in study.seeds for r in study.off_ratios]
    plan += [(seed, r, rows, False) for seed in study.seeds for r in study.cti_ratios for rows in study.cti_rows]
    plan += [(seed, r, "max", True) for seed in study.seeds for r in study.exempt_ratios]
    tasks = [
        Task(
            study.model,
            study.split,
            "lora",
            _study_cell_id(study, seed, ratio, rows, exempt),
            seed,
            {
                "ratio": ratio,
                "cti": rows is not None,
                "train_bottom": False,
                "cti_rows": rows or "label",
                "cti_mode": "exempt" if exempt else "scale",
                "cti_top": study.exempt_top,
                "epochs": study.epochs,
                "rescale": study.rescale,
            },
            study_dir,
        )
        for seed, ratio, rows, exempt in plan
    ]
    done_elsewhere = {task.signature for task in shared}
    return [task for task in tasks if task.signature not in done_elsewhere]


def study_rows(study: CtiStudy, study_cells: list[dict], grid_rows: list[dict]) -> list[dict]:
    """The study's cells: its own, and the grid's cells that are part of its plan."""
    planned = {task.signature for task in study_tasks(study, Path("."))}
    have = {_row_signature(row) for row in study_cells}
    return study_cells + [row for row in grid_rows if _row_signature(row) in planned - have]


def schedule(grid: Grid, tasks: list[Task]) -> list[Task]:
    """The cells still to run (no JSON yet), the slowest model's first: with several workers taking cells in
    this order, the long cells start early instead of leaving one worker busy at the end. Within a model the
    order is kept, so that a worker mostly meets cells of the provider it already holds."""
    cost = {spec.model: spec.cell_cost for spec in grid.models}
    todo = [task for task in tasks if not task.path.exists()]
    return sorted(todo, key=lambda task: -cost.get(task.model, 0))  # sorted() is stable


# One worker's state: the provider (model, split, method) it holds and the Cell built on it, reused while the
# next cell needs the same provider; and the data sets per model.
_WORKER: dict = {}


def _start_worker(grid: Grid, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s %(message)s")
    _WORKER.clear()
    _WORKER.update(grid=grid, key=None, data={})


def _unload() -> None:
    if _WORKER.get("key") is not None:
        _WORKER["provider"].close()
        _WORKER["work"].cleanup()
        _WORKER["key"] = None


def _run_task(task: Task) -> dict:
    """Run one cell in this worker (loading its provider unless held already) and write its JSON."""
    grid = _WORKER["grid"]
    spec = next(m for m in grid.models if m.model == task.model)
    if _WORKER["key"] != (task.model, task.split, task.method):
        _unload()
        provider = Provider.load(task.model, task.split, PeftConfig(method=task.method))
        service = LocalTopService(provider)
        work = tempfile.TemporaryDirectory(prefix="sap-privacy-table-")
        pretrained, tokenizer, _ = load_server_bottom(service, provider.info, Path(work.name) / "bottoms")
        pretrained.eval()
        if task.model not in _WORKER["data"]:
            _WORKER["data"][task.model] = _datasets(spec, grid)
        cell = Cell(grid, spec, provider, service, pretrained, tokenizer, _WORKER["data"][task.model], Path(work.name))
        _WORKER.update(key=(task.model, task.split, task.method), provider=provider, work=work, cell=cell)
    log.info("cell %s", task.name)
    torch.manual_seed(task.seed)
    result = _WORKER["cell"].run(seed=task.seed, **task.settings)
    task.out_dir.mkdir(parents=True, exist_ok=True)
    partial = task.path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    partial.replace(task.path)  # a cell's JSON is whole or absent: an interrupted run resumes cleanly
    log.info(
        "cell %s: accuracy %.3f, EIA privacy %.3f, AIA accuracy %.3f (train %.0f s, attacks %.0f s)",
        task.name,
        result["accuracy"],
        result["eia_privacy"],
        result["aia_accuracy"],
        result["train_seconds"],
        result["attack_seconds"],
    )
    return result


def run_tasks(grid: Grid, tasks: list[Task], workers: int = 1) -> None:
    """Run the cells in order: in this process (workers = 1), or spread over worker processes that share the
    machine's cores (each gets cores // workers torch threads; a cell's own timings then include the sharing)."""
    if workers <= 1 or len(tasks) <= 1:
        _start_worker(grid, None)
        try:
            for task in tasks:
                _run_task(task)
        finally:
            _unload()
        return
    import multiprocessing
    import os
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(grid, threads),
    ) as pool:
        futures = [pool.submit(_run_task, task) for task in tasks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0].exception()


# --- the report -----------------------------------------------------------------------------------------

COLUMNS = [
    "model",
    "split",
    "peft",
    "train_bottom",
    "noise_ratio",
    "cti",
    "cti_rows",
    "eta",
    "noise_to_signal",
    "accuracy",
    "eval_majority",
    "eia_attack",
    "eia_recovery",
    "eia_recovery_without_special",
    "eia_recovery_content",
    "eia_privacy",
    "eia_tokens",
    "eia_by_attack",
    "aia_accuracy",
    "aia_baseline",
    "aia_privacy",
    "train_seconds",
    "attack_seconds",
]


CTI_KINDS = ("off", "label", "max")  # CTI off; on with each text's class row (DESIGN); on with the max row


def cti_kind(row: dict) -> str:
    if not row["cti"]:
        return "off"
    rows = row.get("cti_rows") or "label"
    return f"exempt {row['cti_top']:g}, {rows}" if row.get("cti_mode") == "exempt" else rows


def load_cells(cells_dir: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in cells_dir.glob("*.json")]
    return sorted(
        rows,
        key=lambda r: (
            r["model"] != "minilm-l6",
            r["split"],
            r["peft"] != "lora",
            r["train_bottom"],
            r["noise_ratio"] or 0.0,
            CTI_KINDS.index(cti_kind(r)),
        ),
    )


def _by_attack(row: dict) -> str:
    """Each attack's token recovery, 'optimization 0.120; learned 0.450' (cells from before auto: the one attack)."""
    attacks = row.get("eia_attacks") or {row["eia_attack"]: row["eia_recovery"]}
    return "; ".join(f"{kind} {value:.3f}" for kind, value in attacks.items())


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{**row, "eia_by_attack": _by_attack(row)} for row in rows])


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    # one panel per CTI kind that has noisy cells (the no-noise point starts every line)
    kinds = [k for k in CTI_KINDS if any(r["noise_ratio"] is not None and cti_kind(r) == k for r in rows)] or ["off"]
    figure, axes = plt.subplots(1, len(kinds), figsize=(5.8 * len(kinds), 4.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, kind in zip(axes, kinds):
        for model, split in sorted({(r["model"], r["split"]) for r in rows}):
            line = frontier(rows, model, split, kind)
            ax.plot(
                [r["eia_privacy"] for r in line], [r["accuracy"] for r in line], marker="o", label=f"{model} k={split}"
            )
            for r in line:
                ax.annotate(
                    f"{r['noise_ratio'] or 0:g}",
                    (r["eia_privacy"], r["accuracy"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_title(
            f"CTI {'off' if kind == 'off' else f'on, {kind} rows'} (frozen bottom, LoRA; labels: R)", fontsize=10
        )
        ax.set_xlabel("empirical privacy against embedding inversion (1 - tokens recovered)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on held-out movie snippets")
    axes[-1].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | k | PEFT | bottom | R | CTI | noise/signal sent | accuracy | tokens recovered, each attack "
        "| strongest | tokens recovered | content tokens | EIA privacy | AIA accuracy (baseline) | AIA privacy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['split']} | {r['peft']} | {'trained' if r['train_bottom'] else 'frozen'} "
            f"| {_fmt(r['noise_ratio'] if r['noise_ratio'] is None else float(r['noise_ratio']), 2)} "
            f"| {cti_kind(r)} | {_fmt(float(r['noise_to_signal']), 2)} | {_fmt(r['accuracy'])} | {_by_attack(r)} "
            f"| {r['eia_attack']} | {_fmt(r['eia_recovery'])} | {_fmt(r.get('eia_recovery_content'))} "
            f"| {_fmt(r['eia_privacy'])} | {_fmt(r['aia_accuracy'])} ({_fmt(r['aia_baseline'])}) "
            f"| {_fmt(r['aia_privacy'])} |"
        )
    return lines


def _noise(row: dict) -> str:
    return "none" if row["noise_ratio"] is None else f"R {row['noise_ratio']:g}"


def frontier(rows: list[dict], model: str, split: int, kind: str) -> list[dict]:
    """The frozen-bottom LoRA cells of one split with one CTI kind (no noise first), ordered by noise."""
    line = [
        r
        for r in rows
        if (r["model"], r["split"], r["peft"], r["train_bottom"]) == (model, split, "lora", False)
        and (r["noise_ratio"] is None or cti_kind(r) == kind)
    ]
    return sorted(line, key=lambda r: r["noise_ratio"] or 0.0)


def accuracy_at_privacy(line: list[dict], privacy: float) -> float | None:
    """Accuracy of a CTI-off curve at a given EIA privacy (linear between its points; None outside it)."""
    points = sorted((r["eia_privacy"], r["accuracy"]) for r in line)
    for (p0, a0), (p1, a1) in zip(points, points[1:]):
        if p0 <= privacy <= p1:
            return a0 if p1 == p0 else a0 + (a1 - a0) * (privacy - p0) / (p1 - p0)
    return None


def findings(rows: list[dict]) -> list[str]:
    """What the table shows, computed from the cells: the checks of the issue, stated with their figures."""
    lines = []
    splits = sorted({(r["model"], r["split"]) for r in rows})
    # 1. privacy against split depth at each noise ratio (CTI off, frozen, LoRA)
    ratios = sorted({r["noise_ratio"] for r in rows if r["noise_ratio"] is not None})
    for model in sorted({m for m, _ in splits}):
        depth = [k for m, k in splits if m == model]
        if len(depth) < 2:
            continue
        lines.append(
            f"- **Privacy against split depth** ({model}, CTI off; EIA privacy at k = {', '.join(map(str, depth))}):"
        )
        for ratio in [None] + ratios:
            cells = {
                r["split"]: r["eia_privacy"]
                for r in rows
                if r["model"] == model
                and r["peft"] == "lora"
                and not r["train_bottom"]
                and not r["cti"]
                and r["noise_ratio"] == ratio
            }
            if len(cells) == len(depth):
                figures = " / ".join(f"{cells[k]:.2f}" for k in depth)
                lines.append(f"  - R = {'none' if ratio is None else f'{ratio:g}'}: {figures}")
    # 2. privacy against noise (smaller eta = larger R), per split
    lines.append("- **Privacy against noise** (CTI off; EIA privacy as R grows, i.e. as eta falls):")
    for model, split in splits:
        line = frontier(rows, model, split, "off")
        lines.append(f"  - {model} k = {split}: " + ", ".join(f"{_noise(r)} {r['eia_privacy']:.2f}" for r in line))
    # 3. CTI: accuracy at similar privacy
    lines.append(
        "- **CTI** (accuracy of each CTI-on cell against the CTI-off curve of the same split, "
        "interpolated at the same EIA privacy):"
    )
    for model, split in splits:
        off = frontier(rows, model, split, "off")
        for r in frontier(rows, model, split, "label") + frontier(rows, model, split, "max"):
            if r["noise_ratio"] is None:
                continue
            reference = accuracy_at_privacy(off, r["eia_privacy"])
            versus = (
                "outside the CTI-off curve"
                if reference is None
                else f"CTI off at that privacy: {reference:.3f} ({r['accuracy'] - reference:+.3f})"
            )
            lines.append(
                f"  - {model} k = {split}, R {r['noise_ratio']:g}, {cti_kind(r)} rows: privacy {r['eia_privacy']:.2f}, "
                f"accuracy {r['accuracy']:.3f}; {versus}"
            )
    # 4. the operating point nearest the paper's +62 % privacy for about -1 % accuracy
    candidates = []
    for model, split in splits:
        base = next(
            (
                r
                for r in rows
                if (r["model"], r["split"], r["peft"], r["train_bottom"]) == (model, split, "lora", False)
                and r["noise_ratio"] is None
            ),
            None,
        )
        if base is None:
            continue
        for r in rows:
            if (r["model"], r["split"]) == (model, split) and r["noise_ratio"] is not None:
                gain, loss = r["eia_privacy"] - base["eia_privacy"], base["accuracy"] - r["accuracy"]
                candidates.append((abs(gain - 0.62) + 10 * abs(loss - 0.01), gain, loss, r, base))
    if candidates:
        _, gain, loss, r, base = min(candidates, key=lambda c: c[0])
        lines.append(
            f"- **Nearest to the paper's operating point** (+62 points of EIA privacy for about 1 point "
            f"of accuracy; distance = |gain - 0.62| + 10 |loss - 0.01|): {r['model']} k = {r['split']}, "
            f"{r['peft']}, {'trained' if r['train_bottom'] else 'frozen'} bottom, R {r['noise_ratio']:g}, "
            f"CTI {cti_kind(r)}: EIA privacy {base['eia_privacy']:.2f} -> "
            f"{r['eia_privacy']:.2f} ({gain:+.2f}), accuracy {base['accuracy']:.3f} -> {r['accuracy']:.3f} "
            f"({-loss:+.3f})."
        )
        cheap = [c for c in candidates if c[2] <= 0.015]
        if not cheap:
            lines.append(
                "- **Most privacy for at most 1.5 points of accuracy**: no noisy cell loses 1.5 points or less."
            )
        else:
            _, gain, loss, r, base = max(cheap, key=lambda c: c[1])
            lines.append(
                f"- **Most privacy for at most 1.5 points of accuracy**: {r['model']} k = {r['split']}, "
                f"R {r['noise_ratio']:g}, CTI {cti_kind(r)}: privacy {gain:+.2f} "
                f"(to {r['eia_privacy']:.2f}), accuracy {-loss:+.3f} (to {r['accuracy']:.3f})."
            )
    return lines


def study_findings(study: CtiStudy, cells: list[dict]) -> list[str]:
    """The CTI study's table and its comparison at equal privacy, per seed and on the means over seeds."""

    def order(kind: str) -> int:
        return CTI_KINDS.index(kind) if kind in CTI_KINDS else len(CTI_KINDS)

    configs = sorted({(cti_kind(r), float(r["noise_ratio"])) for r in cells}, key=lambda c: (order(c[0]), c[1]))
    seeds = sorted({r["seed"] for r in cells})
    by = {(cti_kind(r), float(r["noise_ratio"]), r["seed"]): r for r in cells}
    passes = "one pass" if study.epochs == 1 else f"{study.epochs} passes"
    rescaled = ", every noised vector rescaled to the mean hidden-state norm" if study.rescale else ""
    lines = [
        f"Model {study.model}, split k = {study.split}, frozen bottom, LoRA, {passes} over the training "
        f"snippets{rescaled}; seeds {', '.join(map(str, seeds))} "
        "(each seed: data order, adapter initialisation, noise key, attack start). "
        f"{study.how}; cells in privacy_table/{study.folder}/.",
        "",
        f"Study: `{json.dumps({k: v for k, v in asdict(study).items() if k not in ('folder', 'title', 'how')})}`",
        "",
        "| CTI | R | noise/signal sent | accuracy per seed | mean accuracy | EIA privacy per seed | mean EIA privacy |",
        "|---|---|---|---|---|---|---|",
    ]
    means = {}
    for c in configs:
        got = [by[(*c, s)] for s in seeds if (*c, s) in by]
        acc = [r["accuracy"] for r in got]
        priv = [r["eia_privacy"] for r in got]
        means[c] = (sum(priv) / len(priv), sum(acc) / len(acc))
        lines.append(
            f"| {c[0]} | {c[1]:g} | {sum(float(r['noise_to_signal']) for r in got) / len(got):.2f} "
            f"| {' / '.join(f'{a:.3f}' for a in acc)} | {means[c][1]:.3f} "
            f"| {' / '.join(f'{p:.2f}' for p in priv)} | {means[c][0]:.2f} |"
        )
    lines += [
        "",
        "CTI against the CTI-off curve at the same EIA privacy (linear between the off points; each seed "
        "against its own off curve, and the means against the mean curve):",
    ]
    for c in configs:
        if c[0] == "off":
            continue
        per_seed = []
        for s in seeds:
            off = [
                {"eia_privacy": by[(k, r, s)]["eia_privacy"], "accuracy": by[(k, r, s)]["accuracy"]}
                for k, r in configs
                if k == "off" and (k, r, s) in by
            ]
            mine = by.get((*c, s))
            reference = accuracy_at_privacy(off, mine["eia_privacy"]) if mine else None
            per_seed.append(None if reference is None else mine["accuracy"] - reference)
        mean_off = [{"eia_privacy": p, "accuracy": a} for (k, _), (p, a) in means.items() if k == "off"]
        reference = accuracy_at_privacy(mean_off, means[c][0])
        shown = ", ".join("outside" if d is None else f"{d:+.3f}" for d in per_seed)
        inside = [d for d in per_seed if d is not None]
        lines.append(
            f"- {c[0]} rows, R {c[1]:g}: mean privacy {means[c][0]:.2f}, mean accuracy {means[c][1]:.3f}; "
            + (
                "outside the mean off curve"
                if reference is None
                else f"off curve there {reference:.3f} ({means[c][1] - reference:+.3f})"
            )
            + f"; per seed {shown}"
            + (
                f" (mean {sum(inside) / len(inside):+.3f}, {sum(d > 0 for d in inside)} of {len(inside)} above)"
                if inside
                else ""
            )
        )
    return lines


def _versions() -> str:
    import peft
    import transformers

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}; {platform.machine()}, {torch.get_num_threads()} threads"
    )


def write_report(
    grid: Grid,
    rows: list[dict],
    out: Path,
    command: str,
    measured: dict | None,
    studies: list[tuple[CtiStudy, list[dict]]] = (),
) -> None:
    """privacy_table.md (table, computed findings, each study that has cells, the written discussion), .csv, .png."""
    write_csv(rows, out / "privacy_table.csv")
    write_plot(rows, out / "privacy_table.png")
    settings = json.dumps(asdict(grid))
    lines = [
        "# Utility and privacy of the split, on real data",
        "",
        f"Written by `{command}` ({_versions()}); seed {grid.seed} (data order, adapter "
        "initialisation, noise key, attacks); the CTI study at the end repeats its cells over several seeds."
        + (
            f" Wall time of the last whole run ({measured['cells']} cells, finished {measured['finished']}): "
            f"{measured['seconds'] // 60} min {measured['seconds'] % 60:02d} s."
            if measured
            else ""
        ),
        "",
        f"Grid: `{settings}`",
        "",
        "R is the noise ratio E||n|| / mean||h|| at the split (the eta that gives it is in the CSV). Accuracy: "
        "held-out movie snippets after one epoch through the split. EIA: tokens of the first training "
        "snippets recovered from what the client sends, by every attack that applies (`sap-client audit "
        "--attack auto`): nn = exact position-aware nearest neighbour at k = 0; optimization = relaxed "
        "one-hot inversion through the provider's pretrained bottom; sequential = MAP decoding left to "
        "right with a shortlist and a beam (decoders); learned = an inverter trained on "
        f"{grid.public_examples} public snippets (rows {grid.public_start}.., disjoint from every training "
        "and held-out snippet) under the same mechanism and settings. EIA privacy = 1 - the strongest "
        "attack's recovery; content tokens = non-special, non-function-word tokens. "
        "AIA: party of convention paragraphs from mean-pooled sent vectors; privacy = 1 - accuracy. "
        "Files: privacy_table.csv, privacy_table.png, privacy_table/cells/*.json.",
        "",
    ]
    lines += markdown_table(rows)
    lines += ["", "## What the cells show (computed)", ""] + findings(rows)
    for study, study_cells in studies:
        if study_cells:
            lines += ["", f"## {study.title} (computed)", ""] + study_findings(study, study_cells)
    discussion = Path(__file__).with_name("privacy_table_discussion.md")  # written by a person, after a run
    if discussion.exists():
        lines += ["", discussion.read_text().rstrip()]
    (out / "privacy_table.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid (a smoke test, minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--models", nargs="+", metavar="MODEL", help="run only these models' rows of the grid")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from the cells only")
    extra = parser.add_mutually_exclusive_group()
    extra.add_argument(
        "--epochs-study",
        action="store_true",
        help="run only the CTI study with three passes over the data (MiniLM k = 4, three seeds, "
        "15 cells, about 21 min; not part of make privacy-table), then rebuild the report",
    )
    extra.add_argument(
        "--hn-study",
        action="store_true",
        help="run only the CTI study as DESIGN's client sends (h + n, no rescaling; MiniLM k = 4, three "
        "seeds, 21 cells beyond the grid's; not part of make privacy-table), then rebuild the report",
    )
    extra.add_argument(
        "--rescale-study",
        action="store_true",
        help="run only the CTI study with every noised vector rescaled to the mean hidden-state norm "
        "(MiniLM k = 4, three seeds, 15 cells, about 14 min; the full run includes it), then "
        "rebuild the report",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="cells run at once, in separate processes sharing the cores (default 2: on 2 cores two "
        "1-thread cells finish sooner than one 2-thread cell after the other)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    grid = QUICK if args.quick else FULL
    if args.models:
        unknown = set(args.models) - {m.model for m in grid.models}
        if unknown:
            parser.error(f"unknown model(s) {sorted(unknown)}; the grid has {[m.model for m in grid.models]}")
        grid = replace(grid, models=[m for m in grid.models if m.model in args.models])
    name = "privacy_table_quick" if args.quick else "privacy_table"
    out = args.out if not args.quick else args.out / name
    cells_dir = args.out / name / "cells"
    extra_study = (
        EPOCHS_CTI_STUDY
        if args.epochs_study
        else FULL_CTI_STUDY
        if args.hn_study
        else RESCALE_CTI_STUDY
        if args.rescale_study
        else None
    )
    if args.quick and extra_study:
        parser.error(
            "--epochs-study, --hn-study and --rescale-study run on the full grid's model and data; no quick form"
        )
    if extra_study and extra_study.model not in {m.model for m in grid.models}:
        parser.error(f"that study needs {extra_study.model} in --models")
    studies = [QUICK_CTI_STUDY] if args.quick else [FULL_CTI_STUDY, EPOCHS_CTI_STUDY, RESCALE_CTI_STUDY]
    default_studies = [QUICK_CTI_STUDY] if args.quick else [RESCALE_CTI_STUDY]  # what a plain run computes
    started = time.perf_counter()
    if not args.report_only:
        if extra_study:
            tasks = study_tasks(extra_study, args.out / name / extra_study.folder, shared=grid_tasks(grid, cells_dir))
        else:
            tasks = grid_tasks(grid, cells_dir)
            for default in default_studies:
                if default.model in {m.model for m in grid.models}:
                    tasks += study_tasks(default, args.out / name / default.folder, shared=tasks)
        todo = schedule(grid, tasks)
        log.info("%d cells, %d to run, %d worker(s)", len(tasks), len(todo), args.workers)
        run_tasks(grid, todo, args.workers)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/privacy_table.py" + (" --quick" if args.quick else "")
    rows = load_cells(cells_dir)
    # a study is shown when it has cells of its own (the grid's shared cells alone are not a study)
    found = [
        (s, study_rows(s, own, rows))
        for s in studies
        if (own := [json.loads(p.read_text()) for p in sorted((args.out / name / s.folder).glob("*.json"))])
    ]
    seconds = time.perf_counter() - started
    if extra_study:
        log.info("%s: %.1f min", extra_study.title, seconds / 60)
    # the header's wall time is the whole table's: only a run of the grid (and its study) measures it, and it
    # is kept beside the cells so that a --report-only rebuild still shows it
    timing = args.out / name / "run.json"
    if not (args.report_only or extra_study):
        timing.write_text(
            json.dumps(
                {
                    "command": command,
                    "seconds": round(seconds),
                    "cells": len(tasks),
                    "finished": time.strftime("%Y-%m-%d %H:%M"),
                },
                indent=1,
            )
            + "\n"
        )
    measured = json.loads(timing.read_text()) if timing.is_file() else None
    write_report(grid, rows, out, command, measured, found)
    print(f"wrote {out / 'privacy_table.md'}, .csv and .png from {len(list(cells_dir.glob('*.json')))} cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
