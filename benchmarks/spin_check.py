"""Does the short OpenMP spin of the split's processes (sap_common/openmp.py) slow ordinary training?

Trains the bench's single-process baseline (MiniLM, LoRA on blocks 2-5, batch 16 x 64) in fresh
processes, alternating libgomp's default spin count (300,000, set explicitly) and sap's 10,000, and prints
examples/s for each. `make bench` uses the short spin in its own process, where the baseline runs too;
this is the check that the baseline is not handicapped by it.

    python benchmarks/spin_check.py [--rounds 3] [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SPINS = ("300000", "10000")  # libgomp's default, sap's


def child(steps: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench  # noqa: E402 - after GOMP_SPINCOUNT is in the environment (the parent set it)

    from sap_client.data import load_labelled_csv  # noqa: E402

    settings = bench.Settings()
    data = load_labelled_csv(bench.DATA)
    batches = bench.batches_of(data, settings, steps + 3)
    single = bench.SingleSide("minilm-l6", 2, data, settings)
    single.threads = os.cpu_count() or 1
    single.train(batches[:3])  # warm-up
    seconds = single.train(batches[3:])
    print(json.dumps({"spin": os.environ["GOMP_SPINCOUNT"], "examples_per_s": steps * settings.batch_size / seconds}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="processes per spin count (alternating)")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps)
        return 0
    rates: dict[str, list[float]] = {spin: [] for spin in SPINS}
    for _ in range(args.rounds):
        for spin in SPINS:
            env = {**os.environ, "GOMP_SPINCOUNT": spin, "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--steps", str(args.steps)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=900,
            )
            rates[spin].append(json.loads(out.stdout.strip().splitlines()[-1])["examples_per_s"])
            print(f"GOMP_SPINCOUNT={spin}: {rates[spin][-1]:.2f} examples/s", flush=True)
    means = {spin: statistics.mean(r) for spin, r in rates.items()}
    print(
        json.dumps(
            {"single_examples_per_s": means, "short_over_default": means["10000"] / means["300000"], "runs": rates}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
