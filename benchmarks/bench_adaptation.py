"""Few-shot adaptation on unseen degradations (evaluation/adaptation_bench.py, docs/benchmarks.md).

    python benchmarks/bench_adaptation.py --model runs/smoke/final [--images ../shared/data/test/CBSD68]
        [--shots 1,5,10] [--size 64] [--out runs/adaptation]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from evaluation.adaptation_bench import markdown_table, plot, run
from metarestore.hub import load_model
from metarestore.meta.adapt import FIT_OPTIMIZER, OPTIMIZERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or models:/ URI")
    parser.add_argument("--images", default=None, help="folder of PNGs (default: scikit-image photographs)")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--degradations", default=None, help="comma list (default: all)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tests", type=int, default=4)
    parser.add_argument("--film-steps", type=int, default=5)
    parser.add_argument("--max-folds", type=int, default=5)
    parser.add_argument("--optimizer", default=FIT_OPTIMIZER, choices=OPTIMIZERS,
                        help="the automatic adapter's update (adam: what adapters use; sgd: the meta-learned rates)")
    parser.add_argument("--out", default="runs/adaptation")
    args = parser.parse_args()
    torch.manual_seed(0)
    learner, _, _ = load_model(args.model)
    start = time.perf_counter()
    rows = run(learner, shots=tuple(int(s) for s in args.shots.split(",")),
               degradations=args.degradations.split(",") if args.degradations else None, source=args.images,
               size=args.size, tests=args.tests, film_steps=args.film_steps, max_folds=args.max_folds,
               optimizer=args.optimizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "adaptation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "adaptation_curves.png")
    for k in sorted({int(r["shots"]) for r in rows}):
        print(f"\n{k} shot(s), mean RGB PSNR on the test crops (dB):\n" + markdown_table(rows, k))
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s -> {out}")


if __name__ == "__main__":
    main()
