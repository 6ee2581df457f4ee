"""The inner learning rate of FiLM adapters, swept on a model (docs/benchmarks.md, "The inner rate").

    python benchmarks/bench_inner_lr.py --model builtin:base --images ../shared/data/test/CBSD68 [--scales 1,0.3,0.1]
        [--rates-from MODEL]

5 support crops of 128 px and the next 8 as test crops; for each degradation, the gain over zero-shot of a
`kind=film` adapter (10 steps, 2 folds, 32 px windows, 64 px scoring window) with the model's inner rates
times each scale.
"""

from __future__ import annotations

import argparse

import torch

from evaluation.adaptation_bench import degrade, load_crops
from metarestore.hub import load_model
from metarestore.meta.losses import psnr
from metarestore.operators.adapter import fit_adapter

CAST = torch.tensor([1.25, 1.0, 0.8]).view(1, 3, 1, 1)
DEGRADATIONS = {"colour cast": lambda x: (x * CAST).clamp(0, 1),
                **{name: (lambda x, n=name: degrade(n, x, seed=1)) for name in ("camera_shake", "camera_noise", "jpeg_q8")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--images", default=None, help="folder of PNGs (default: scikit-image photographs)")
    parser.add_argument("--scales", default="1,0.3,0.1")
    parser.add_argument("--rates-from", default=None, help="a model whose inner rates to sweep instead of --model's "
                        "own (its weights unused)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    learner, _, _ = load_model(args.model)
    if args.rates_from:
        learner.set_inner_lrs(load_model(args.rates_from)[1]["inner_lr"])
    crops = load_crops(args.images, 128, 13)
    support, test = crops[:5], crops[5:]
    rates = dict(learner.fixed_lrs)
    scales = [float(s) for s in args.scales.split(",")]
    print(f"inner rates {rates}\n\n| degradation | zero-shot | " + " | ".join(f"x{s:g}" for s in scales) + " |")
    print("|---" * (len(scales) + 2) + "|")
    for name, apply in DEGRADATIONS.items():
        sx, tx = apply(support), apply(test)
        zero = psnr(learner.restore(tx), test)
        gains = []
        for scale in scales:
            learner.fixed_lrs = {g: v * scale for g, v in rates.items()}
            adapter = fit_adapter(learner, sx, support, paths=["film"], steps=10, max_folds=2, patch=32, score_side=64)
            gains.append(psnr(adapter.restore(tx), test) - zero)
        learner.fixed_lrs = rates
        print(f"| {name} | {zero:.2f} | " + " | ".join(f"{g:+.2f}" for g in gains) + " |", flush=True)


if __name__ == "__main__":
    main()
