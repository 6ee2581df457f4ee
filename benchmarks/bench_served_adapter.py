"""The cost of a served adapter fit, in one process: ``metarestore.inference.fit_bounded`` with the serving
defaults (``serving.app.AppArgs``: pairs centre-cropped to ``adapt_side``, ``adapt_folds`` leave-one-out
folds, 10 gradient steps on 64 px windows per adapted path) on 5 pairs of 256x256 crops of scikit-image photographs blurred by a Gaussian
(sigma 2) that no degradation family makes; for kind auto and for kind film. Prints a markdown table.

    .venv/bin/python benchmarks/bench_served_adapter.py --model builtin:base --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import skimage.data
import torch


def pairs(size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    from metarestore.operators.fourier import convolve

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
              skimage.data.astronaut()[200:, 200:]]
    clean = torch.stack([torch.from_numpy(np.ascontiguousarray(p[:size, :size])).permute(2, 0, 1).float() / 255
                         for p in photos])
    t = torch.arange(-6, 7, dtype=torch.float64)
    kernel = torch.exp(-(t[:, None] ** 2 + t[None] ** 2) / 8)
    degraded = convolve(clean.double(), kernel / kernel.sum()).float().clamp(0, 1)
    return (degraded * 255).round() / 255, clean


def main() -> None:
    from metarestore.hub import load_model
    from metarestore.inference import fit_bounded
    from serving.app import AppArgs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", default="auto,film")
    parser.add_argument("--sides", default="", help="adapt_side values to compare (default: the server's).")
    parser.add_argument("--folds", type=int, default=None, help="adapt_folds (default: the server's).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    learner = load_model(args.model)[0]
    defaults = AppArgs()
    degraded, clean = pairs()
    print(f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}, {args.threads} thread(s)\n")
    print("| kind | side | folds | path | zero-shot | adapted (held out) | fit time |")
    print("|---|---|---|---|---|---|---|")
    for side in [int(s) for s in args.sides.split(",") if s] or [defaults.adapt_side]:
        for kind in args.kinds.split(","):
            folds = args.folds or defaults.adapt_folds
            start = time.perf_counter()
            adapter = fit_bounded(learner, degraded, clean, kind=kind, max_side=side, max_folds=folds,
                                  steps=defaults.adapt_steps, patch=defaults.adapt_patch)
            info = adapter.info
            print(f"| {kind} | {side} | {folds} | {info['path']} | {info['psnr_zero_shot']} | {info['psnr_after']} | "
                  f"{time.perf_counter() - start:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
