"""The privacy/utility frontier (`make frontier`): held-out accuracy against strongest-attack EIA privacy, for plain
d_chi noise at several noise ratios and for each defence, per model, split and seed.

Each cell is a real run of the user's training loop against the provider's real session code (LocalTopService, what
the gRPC servicer calls), with the provider recording what it receives (`sap-server --record` in-process). Privacy
is measured on that recording: `sap-client audit --recorded`'s attacks (every one that applies, the strongest
counted) on the first training texts, inverting through the provider's copy of the pretrained bottom, with the
held-out snippets as the provider's public text (disjoint from every attacked text). EIA privacy = 1 - the
strongest attack's token recovery. A defence is compared with plain d_chi at the same privacy, seed by seed: the
plain curve's accuracy is interpolated linearly in privacy between its two nearest cells.

    python benchmarks/frontier.py                      # the full grid (hours on 2 cores; cells are kept)
    python benchmarks/frontier.py --quick              # a smoke run of the whole pipeline (minutes)
    python benchmarks/frontier.py --report-only        # rebuild the table and plot from the kept cells

Defences: trained-bottom (--train-bottom at --bottom-lr, DEFAULT_BOTTOM_LEARNING_RATE unless given), learned-filter
(--learned-filter, its default training; the attacks know the filter), cti (--cti, scale mode), rescale
(--rescale-noised). Results: benchmarks/results/frontier/ (cells/*.json, frontier.md, frontier.png).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sap_client.audit.attacks import AttackConfig  # noqa: E402
from sap_client.audit.learned import LearnedConfig  # noqa: E402
from sap_client.audit.recorded import recorded_audit  # noqa: E402
from sap_client.bottom import load_server_bottom  # noqa: E402
from sap_client.commands import fit_noise  # noqa: E402
from sap_client.data import TextDataset, load_labelled_csv  # noqa: E402
from sap_client.filter import FilterConfig, train_filter  # noqa: E402
from sap_client.privacy import NoiseConfig  # noqa: E402
from sap_client.rundir import KEY, RunDir  # noqa: E402
from sap_client.trainer import DEFAULT_BOTTOM_LEARNING_RATE, SplitTrainer, TrainConfig  # noqa: E402
from sap_common.peft import PeftConfig  # noqa: E402
from sap_common.recording import read_records  # noqa: E402
from sap_server.local import LocalTopService  # noqa: E402
from sap_server.provider import Provider  # noqa: E402

log = logging.getLogger("frontier")
RESULTS = ROOT / "benchmarks" / "results" / "frontier"
DEFENCES = ("plain", "trained-bottom", "learned-filter", "cti", "rescale")


@dataclass(frozen=True)
class Budget:
    train: int = 9000  # the first rows of data/movie_snippets.csv
    held: int | None = 1603  # the last rows, held out (None: all after the training rows): 9,000 + 1,603 is the file
    epochs: int = 3
    batch_size: int = 16
    max_length: int = 64
    learning_rate: float = 1e-3
    audited: int = 24  # training texts attacked on the recording (the first rows)
    attack_steps: int = 100  # the optimization attack
    inverter_epochs: int = 4  # the learned inverter, on the public text


@dataclass(frozen=True)
class Cell:
    model: str
    split: int
    defence: str  # one of DEFENCES
    ratio: float | None  # --noise-ratio; None: no noise (plain only)
    seed: int

    @property
    def name(self) -> str:
        noise = "none" if self.ratio is None else f"R{self.ratio:g}"
        return f"{self.model}_k{self.split}_{self.defence}_{noise}_s{self.seed}"


# SmolLM2's top is about ten times MiniLM's compute: at MiniLM's budget one cell takes hours on a core, so its
# cells train on a smaller budget (stated in the table), held out on the same last rows as MiniLM's.
MODEL_BUDGETS = {"smollm2-135m": Budget(train=2000, epochs=1)}


def _data(budget: Budget) -> tuple[TextDataset, TextDataset]:
    """The first budget.train rows, and the held-out rows: the last budget.held ones (or every other row)."""
    snippets = load_labelled_csv(ROOT / "data" / "movie_snippets.csv")
    start = budget.train if budget.held is None else len(snippets) - budget.held
    if budget.train > start or start >= len(snippets):
        raise ValueError(f"--train {budget.train} and --held {budget.held} do not fit in {len(snippets)} snippets")
    return snippets.subset(list(range(budget.train))), snippets.subset(list(range(start, len(snippets))))


def run_cell(
    cell: Cell,
    budget: Budget,
    train: TextDataset,
    held: TextDataset,
    work: Path,
    cache: dict,
    filter_weight: float = FilterConfig.privacy_weight,
    filter_steps: int = FilterConfig.steps,
    bottom_lr: float = DEFAULT_BOTTOM_LEARNING_RATE,
) -> dict:
    """Train through the split with the cell's settings while the provider records, then attack the recording."""
    record = work / "record"
    provider = Provider.load(cell.model, cell.split, PeftConfig(method="lora"), record_dir=record)
    try:
        service = LocalTopService(provider)
        pretrained, tokenizer, _ = load_server_bottom(service, provider.info, work.parent / "bottoms")
        pretrained.eval()
        trained = cell.defence == "trained-bottom"
        config = TrainConfig(
            epochs=budget.epochs,
            batch_size=budget.batch_size,
            max_length=budget.max_length,
            learning_rate=budget.learning_rate,
            seed=cell.seed,
            train_bottom=trained,
            bottom_learning_rate=bottom_lr,
        )
        torch.manual_seed(cell.seed)
        trainer = SplitTrainer(copy.deepcopy(pretrained) if trained else pretrained, tokenizer, service, config)
        run = RunDir(work / "run").create()
        # the noise key comes from the seed (a real client draws a random one), so that a cell can be re-run
        run.file(KEY).write_text(hashlib.sha256(f"sap frontier noise key {cell.seed}".encode()).hexdigest() + "\n")
        noise = NoiseConfig(noise_ratio=cell.ratio, cti=cell.defence == "cti", rescale_noised=cell.defence == "rescale")
        trainer.privatizer = fit_noise(noise, trainer, train, run) if cell.ratio is not None else None
        filtered = None
        if cell.defence == "learned-filter":
            started = time.perf_counter()
            settings = FilterConfig(seed=cell.seed, privacy_weight=filter_weight, steps=filter_steps)
            trainer.filter, filtered = train_filter(trainer, train, trainer.privatizer, settings)
            filtered["seconds"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        metrics = trainer.fit(train, held)
        service.close_session(trainer.session_id)
        train_seconds = time.perf_counter() - started

        started = time.perf_counter()
        view = SplitTrainer(pretrained, tokenizer, service, TrainConfig(batch_size=8), trainer.privatizer)
        view.filter = trainer.filter  # the provider is taken to know the filter's weights (sap_client/filter.py)
        attack = AttackConfig(
            steps=budget.attack_steps,
            seed=cell.seed,
            learned=LearnedConfig(epochs=budget.inverter_epochs, seed=cell.seed),
        )
        # the attacks depend on the mechanism the provider simulates, not on the defence: plain and trained-bottom
        # cells of one noise ratio and seed share the public hidden states, the probe and the learned inverter
        mechanism = json.dumps(
            [cell.ratio, cell.defence in ("cti", "rescale", "learned-filter") and cell.defence, cell.seed]
        )
        forwards = [r for r in read_records(record) if r.kind == "forward"]
        audited = train.subset(list(range(budget.audited)))
        report = recorded_audit(
            view,
            audited,
            forwards,
            attack,
            public=held.texts,
            cache=cache.setdefault((cell.model, cell.split), {}),
            mechanism=mechanism,
        )
    finally:
        provider.close()
    return {
        **asdict(cell),
        "budget": asdict(budget),
        "bottom_learning_rate": bottom_lr if trained else None,
        "learned_filter": filtered,
        "eta": trainer.privatizer.eta if trainer.privatizer else None,
        "noise_to_signal": trainer.privatizer.noise_to_signal if trainer.privatizer else 0.0,
        "accuracy": metrics["eval_accuracy"],
        "history": metrics["history"],
        "eia_recovery": report["eia_token_recovery"],
        "eia_privacy": 1 - report["eia_token_recovery"],
        "eia_attack": report["attack"],
        "eia_attacks": {kind: f["recovery"] for kind, f in report["eia_attacks"].items()},
        "eia_tokens": report["eia_tokens"],
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "attack_seconds": round(time.perf_counter() - started, 1),
    }


# --- the comparison ----------------------------------------------------------------------------------------------


def plain_accuracy_at(plain: list[dict], privacy: float) -> tuple[float | None, str]:
    """The plain curve's accuracy at this privacy (linear between the two plain cells that bracket it), and how it
    was found; None where the privacy lies beyond every plain cell."""
    points = sorted((c["eia_privacy"], c["accuracy"]) for c in plain)
    for (p0, a0), (p1, a1) in zip(points, points[1:]):
        if p0 <= privacy <= p1:
            weight = 0.0 if p1 == p0 else (privacy - p0) / (p1 - p0)
            return a0 + weight * (a1 - a0), "interpolated"
    if points and privacy < points[0][0]:
        return points[0][1], "below the plain curve: its least private cell"
    return None, "beyond the plain curve"


def _curve(cell: dict) -> tuple:
    """What a plain curve is drawn for: model, split, seed and training budget."""
    return cell["model"], cell["split"], cell["seed"], json.dumps(cell["budget"], sort_keys=True)


def comparisons(cells: list[dict], plain_from: list[dict] = ()) -> list[dict]:
    """Each defence cell against the plain curve of its model, split, seed and budget: its plain cells among cells,
    or else among plain_from (another run's cells, e.g. the main grid's)."""
    rows = []
    for cell in cells:
        if cell["defence"] == "plain":
            continue
        curve = _curve(cell)
        plain = [c for c in cells if c["defence"] == "plain" and _curve(c) == curve] or [
            c for c in plain_from if c["defence"] == "plain" and _curve(c) == curve
        ]
        reference, how = plain_accuracy_at(plain, cell["eia_privacy"])
        rows.append(
            {
                **{k: cell[k] for k in ("model", "split", "defence", "ratio", "seed", "accuracy", "eia_privacy")},
                "plain_accuracy": reference,
                "gain": None if reference is None else cell["accuracy"] - reference,
                "how": how,
            }
        )
    return rows


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(
    cells: list[dict],
    command: str,
    seconds: float,
    planned: list[str] | None = None,
    plain_from: list[dict] = (),
    plain_from_name: str | None = None,
) -> str:
    """The table; planned: the names of every cell of the command's grid (the report says which are missing);
    plain_from: another run's cells, whose plain ones the defence cells are compared with where this run has none."""
    threads = "/".join(str(t) for t in sorted({c.get("threads", "?") for c in cells}, key=str))
    lines = [
        "# Privacy/utility frontier: plain d_chi against each defence",
        "",
        f"Command: `{command}`; torch {torch.__version__}, Python {platform.python_version()}, "
        f"{threads} torch thread(s) per cell on {platform.machine()}; wall time of the cells: {seconds / 60:.0f} min "
        f"(training and attacks, summed over the cells kept in cells/).",
        "",
        *_progress(cells, planned),
        *_budgets(cells),
        *_bottom_rates(cells),
        "EIA privacy = 1 - the strongest attack's token recovery. With a trainable bottom every epoch sends a text "
        "through a different bottom; the audit pairs each text with the recorded vectors nearest to what the "
        "pretrained bottom would send, i.e. the least trained ones.",
        "",
        "| model | k | defence | R | seed | noise/signal | accuracy (per epoch) | EIA privacy | strongest attack |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(cells, key=lambda c: (c["model"], c["split"], c["defence"], c["ratio"] or 0, c["seed"]))
    for c in order:
        epochs = ", ".join(f"{h['eval_accuracy']:.3f}" for h in c["history"])
        lines.append(
            f"| {c['model']} | {c['split']} | {c['defence']} | {_f(c['ratio'], 2)} | {c['seed']} | "
            f"{c['noise_to_signal']:.2f} | {c['accuracy']:.3f} ({epochs}) | {c['eia_privacy']:.3f} | "
            f"{c['eia_attack']} {c['eia_recovery']:.3f} |"
        )
    rows = comparisons(cells, plain_from)
    if rows:
        source = f" (its plain cells from {plain_from_name} where this run has none)" if plain_from_name else ""
        lines += [
            "",
            f"Each defence cell against plain d_chi of the same model, split and seed at the same EIA privacy{source}:",
            "",
            "| model | k | defence | R | seed | EIA privacy | accuracy | plain at that privacy | gain, points |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: (r["model"], r["split"], r["defence"], r["ratio"] or 0, r["seed"])):
            gain = "-" if r["gain"] is None else f"{100 * r['gain']:+.1f}"
            lines.append(
                f"| {r['model']} | {r['split']} | {r['defence']} | {_f(r['ratio'], 2)} | {r['seed']} | "
                f"{r['eia_privacy']:.3f} | {r['accuracy']:.3f} | {_f(r['plain_accuracy'])} ({r['how']}) | {gain} |"
            )
    return "\n".join(lines) + "\n"


def _budgets(cells: list[dict]) -> list[str]:
    """One paragraph per training budget, naming the models trained on it."""
    models: dict[str, list[str]] = {}
    for c in cells:
        names = models.setdefault(json.dumps(c["budget"], sort_keys=True), [])
        if c["model"] not in names:
            names.append(c["model"])
    lines = []
    for text, names in models.items():
        b = json.loads(text)
        held = "every row after them" if b["held"] is None else f"the last {b['held']} rows"
        lines += [
            f"Budget of {', '.join(sorted(names))}: the first {b['train']} rows of data/movie_snippets.csv, "
            f"{b['epochs']} epoch(s), batch {b['batch_size']}, lr {b['learning_rate']}, LoRA; accuracy on {held}. "
            f"Privacy: every attack that applies on the provider's recording of the run, through its pretrained "
            f"bottom, on the first {b['audited']} training texts ({b['attack_steps']} optimization steps, the learned "
            f"inverter {b['inverter_epochs']} epochs on the held-out rows as the provider's public text).",
            "",
        ]
    return lines


def _bottom_rates(cells: list[dict]) -> list[str]:
    rates = sorted({c["bottom_learning_rate"] for c in cells if c["defence"] == "trained-bottom"})
    if not rates:
        return []
    return [f"The trainable bottom's learning rate (AdamW, every bottom weight): {', '.join(map(str, rates))}.", ""]


def _progress(cells: list[dict], planned: list[str] | None) -> list[str]:
    if not planned:
        return []
    done = {Cell(c["model"], c["split"], c["defence"], c["ratio"], c["seed"]).name for c in cells}
    missing = [name for name in planned if name not in done]
    extra = sorted(done - set(planned))
    # cells a run outside the default grid added (another --defences or --ratios): in the tables, named here
    outside = [f"Also here, outside the grid: {', '.join(extra)}.", ""] if extra else []
    if not missing:
        return [f"Every one of the grid's {len(planned)} cells is here.", "", *outside]
    by_panel: dict[str, int] = {}
    for name in missing:
        panel = "_".join(name.split("_")[:2])
        by_panel[panel] = by_panel.get(panel, 0) + 1
    return [
        f"**Partial: {len(planned) - len(missing)} of the grid's {len(planned)} cells are done** (the command keeps "
        f"finished cells and runs the rest); missing: "
        + ", ".join(f"{count} of {panel}" for panel, count in by_panel.items())
        + ".",
        "",
        *outside,
    ]


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = sorted({(c["model"], c["split"]) for c in cells})
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    seeds = sorted({c["seed"] for c in cells})
    markers = dict(zip(seeds, "os^Dv*"))
    for ax, (model, split) in zip(axes[0], panels):
        # one colour per defence, one marker per seed; each seed's cells of a defence joined in order of privacy
        for colour, defence in enumerate(DEFENCES):
            for seed in seeds:
                line = sorted(
                    (
                        c
                        for c in cells
                        if (c["model"], c["split"], c["defence"], c["seed"]) == (model, split, defence, seed)
                    ),
                    key=lambda c: c["eia_privacy"],
                )
                if line:
                    ax.plot(
                        [c["eia_privacy"] for c in line],
                        [c["accuracy"] for c in line],
                        color=f"C{colour}",
                        marker=markers[seed],
                        linestyle="-" if defence == "plain" else ":",
                        label=f"{defence}, seed {seed}",
                        alpha=0.8,
                    )
        ax.set_title(f"{model} k = {split}", fontsize=10)
        ax.set_xlabel("EIA privacy (1 - strongest attack's token recovery)")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def grid(
    models: list[tuple[str, int]],
    seeds: list[int],
    ratios: list[float],
    defences: dict[str, list[float]],
    plain: bool = True,
):
    for model, split in models:
        for seed in seeds:
            if plain:
                yield Cell(model, split, "plain", None, seed)
                for ratio in ratios:
                    yield Cell(model, split, "plain", ratio, seed)
            for defence, defence_ratios in defences.items():
                for ratio in defence_ratios:
                    yield Cell(model, split, defence, ratio, seed)


def _model_budgets() -> str:
    return "; ".join(f"{m}: {b.train} rows, {b.epochs} epoch(s)" for m, b in MODEL_BUDGETS.items())


def _models(text: str) -> tuple[str, int]:
    model, _, split = text.partition(":")
    return model, int(split)


def _defence(text: str) -> tuple[str, list[float]]:
    name, _, ratios = text.partition(":")
    if name not in DEFENCES[1:]:
        raise argparse.ArgumentTypeError(f"defence must be one of {DEFENCES[1:]}, got {name!r}")
    return name, [float(r) for r in ratios.split(",") if r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        type=_models,
        default=[("minilm-l6", 2), ("minilm-l6", 4), ("smollm2-135m", 6)],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ratios", nargs="+", type=float, default=[2.0, 3.0, 4.0, 6.0, 8.0], help="plain d_chi cells")
    parser.add_argument(
        "--defences",
        nargs="*",
        type=_defence,
        default=[("trained-bottom", [3.0]), ("learned-filter", [1.0, 2.0]), ("cti", [3.0]), ("rescale", [3.0])],
        help="NAME:R,R,...",
    )
    parser.add_argument(
        "--filter-privacy-weight",
        type=float,
        default=FilterConfig.privacy_weight,
        help="learned-filter cells: the filter's weight on the inversion model's confusion",
    )
    parser.add_argument(
        "--bottom-lr",
        type=float,
        default=DEFAULT_BOTTOM_LEARNING_RATE,
        help=f"trained-bottom cells: the bottom's learning rate (default {DEFAULT_BOTTOM_LEARNING_RATE}, as "
        f"sap-client train --bottom-lr); use another --out for another rate, the cells' names do not carry it",
    )
    parser.add_argument(
        "--train", type=int, help=f"training rows, every model (default {Budget.train}; {_model_budgets()})"
    )
    parser.add_argument("--epochs", type=int, help=f"every model (default {Budget.epochs}; {_model_budgets()})")
    parser.add_argument(
        "--held",
        type=int,
        default=1603,
        help="held-out rows after the training rows (accuracy; the attacks' public text)",
    )
    parser.add_argument(
        "--defences-only",
        action="store_true",
        help="run only the defence cells (the plain ones may be under way in another process)",
    )
    parser.add_argument("--quick", action="store_true", help="the pipeline on a tiny budget (a smoke test)")
    parser.add_argument("--report-only", action="store_true", help="rebuild frontier.md and the plot from cells/")
    parser.add_argument(
        "--plain-from",
        type=Path,
        help="another run's folder (e.g. benchmarks/results/frontier) whose plain cells the defence cells are "
        "compared with where this run has none (a --defences-only run in its own --out)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    filter_steps = 10 if args.quick else FilterConfig.steps
    quick = Budget(train=400, held=200, epochs=1, audited=8, attack_steps=10, inverter_epochs=1)

    def budget_of(model: str) -> Budget:
        if args.quick:
            return quick
        base = MODEL_BUDGETS.get(model, Budget())
        return replace(base, train=args.train or base.train, epochs=args.epochs or base.epochs, held=args.held)

    if args.quick:
        args.seeds, args.ratios, args.models = args.seeds[:1], args.ratios[:2], args.models[:1]
        if args.out == RESULTS:  # a smoke run never mixes its cells into the kept results
            args.out = Path(tempfile.mkdtemp(prefix="sap-frontier-quick-"))
    cells_dir = args.out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        data: dict[Budget, tuple[TextDataset, TextDataset]] = {}
        cache: dict = {}
        with tempfile.TemporaryDirectory(prefix="sap-frontier-") as scratch:
            for cell in grid(args.models, args.seeds, args.ratios, dict(args.defences), not args.defences_only):
                path = cells_dir / f"{cell.name}.json"
                budget = budget_of(cell.model)
                kept = json.loads(path.read_text()) if path.is_file() else None
                if kept is not None and kept["budget"] == asdict(budget):
                    if cell.defence == "trained-bottom" and kept["bottom_learning_rate"] != args.bottom_lr:
                        parser.error(
                            f"{path} was trained at bottom lr {kept['bottom_learning_rate']}, not {args.bottom_lr}: "
                            f"give another --out"
                        )
                    continue  # a finished cell of this budget is kept, not repeated
                if budget not in data:
                    data[budget] = _data(budget)
                train, held = data[budget]
                log.info("cell %s", cell.name)
                # a cell's recording (gigabytes at the 9,000 x 3 budget) goes when the cell ends; the bottoms stay
                with tempfile.TemporaryDirectory(dir=scratch) as work:
                    result = run_cell(
                        cell,
                        budget,
                        train,
                        held,
                        Path(work),
                        cache,
                        args.filter_privacy_weight,
                        filter_steps,
                        args.bottom_lr,
                    )
                path.write_text(json.dumps(result, indent=1) + "\n")
                log.info("%s: accuracy %.3f, EIA privacy %.3f", cell.name, result["accuracy"], result["eia_privacy"])
    cells = [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))]
    if not args.report_only:
        cells = [c for c in cells if c["budget"] == asdict(budget_of(c["model"]))]
    if not cells:
        parser.error(f"no cells in {cells_dir}")
    panels = {(c["model"], c["split"]) for c in cells}
    if len({(c["model"], c["split"], json.dumps(c["budget"], sort_keys=True)) for c in cells}) > len(panels):
        parser.error(f"{cells_dir} holds cells of one model and split on different budgets: move one set away")
    seconds = sum(c["train_seconds"] + c["attack_seconds"] for c in cells)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = ("python benchmarks/frontier.py " + " ".join(given)).strip()
    plain = not args.defences_only
    planned = [cell.name for cell in grid(args.models, args.seeds, args.ratios, dict(args.defences), plain)]
    # comparisons() keeps only the plain cells of these
    other_cells, plain_from_name = [], None
    if args.plain_from is not None:
        if not (args.plain_from / "cells").is_dir():
            parser.error(f"--plain-from {args.plain_from}: no cells/ folder there")
        other_cells = [json.loads(p.read_text()) for p in sorted((args.plain_from / "cells").glob("*.json"))]
        plain_from_name = str(args.plain_from)
    (args.out / "frontier.md").write_text(markdown(cells, command, seconds, planned, other_cells, plain_from_name))
    plot(cells, args.out / "frontier.png")
    print(f"{len(cells)} cells; {args.out / 'frontier.md'}, {args.out / 'frontier.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
