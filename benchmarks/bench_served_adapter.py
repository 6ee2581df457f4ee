"""The cost and gain of a served adapter fit, in one process: ``metarestore.inference.fit_bounded`` with the
serving defaults (``serving.app.AppArgs``: pairs centre-cropped to ``adapt_side``, ``adapt_folds``
leave-one-out folds, the ``adapt_*`` step, window, scoring-window and budget settings) on 5 support pairs of one degradation,
for each kind asked; the gain is measured on 8 held-out crops of the same degradation (adapter against the
zero-shot restorer). Degradations:

- ``cast``: ``bench_serving.py``'s colour cast, 5 x 128x128 (the issue-16 target's pairs);
- ``blur``: a Gaussian blur (sigma 2) that no degradation family makes, 5 x 256x256 crops of photographs.

Prints a markdown table (p50 of ``--repeats`` fits after one warm-up).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_served_adapter.py --model builtin:base --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import skimage.data
import torch
from bench_serving import as_tensor, cast_pairs

BLUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def _blur(clean: torch.Tensor) -> torch.Tensor:
    from metarestore.operators.fourier import convolve

    t = torch.arange(-6, 7, dtype=torch.float64)
    kernel = torch.exp(-(t[:, None] ** 2 + t[None] ** 2) / 8)
    degraded = convolve(clean.double(), kernel / kernel.sum()).float().clamp(0, 1)
    return (degraded * 255).round() / 255


def blur_pairs(size: int = 256, held: int = 128) -> tuple[torch.Tensor, ...]:
    """5 support pairs of ``size`` px and 8 held-out pairs of ``held`` px (other places of the photographs)."""
    photos = [getattr(skimage.data, n)()[..., :3] for n in BLUR_PHOTOS]
    support = [p[:size, :size] for p in photos[:4]] + [skimage.data.astronaut()[200:200 + size, 200:200 + size]]
    tests = [p[-held:, -held:] for p in photos] + [photos[0][300:300 + held, :held], photos[1][:held, -held:]]

    def tensor(arrays):
        return torch.stack([torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255 for a in arrays])

    clean, test_clean = tensor(support), tensor(tests)
    return _blur(clean), clean, _blur(test_clean), test_clean


def cast(size: int = 128) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([as_tensor(a) for a in part]) for part in cast_pairs(size, 5, 8))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) over a batch."""
    mse = (a.clamp(0, 1).double() - b.double()).square().flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())


def main() -> None:
    from metarestore.hub import load_model
    from metarestore.inference import fit_bounded
    from serving.app import AppArgs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", default="auto,film")
    parser.add_argument("--degradations", default="cast,blur")
    parser.add_argument("--repeats", type=int, default=3, help="Timed fits per row (after one warm-up).")
    parser.add_argument("--steps", type=int, default=None, help="Gradient steps (default: the server's).")
    parser.add_argument("--folds", type=int, default=None, help="adapt_folds (default: the server's).")
    parser.add_argument("--patch", type=int, default=None, help="adapt_patch (default: the server's).")
    parser.add_argument("--validation-steps", type=int, default=None,
                        help="adapt_validation_steps (default: the server's).")
    parser.add_argument("--budget", type=float, default=None, help="adapt_budget_s (default: the server's; "
                        "0 or less: none).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    learner = load_model(args.model)[0]
    defaults = AppArgs()
    steps, folds = args.steps or defaults.adapt_steps, args.folds or defaults.adapt_folds
    sets = {"cast": cast, "blur": blur_pairs}
    print(f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}, {args.threads} thread(s), "
          f"{steps} steps, {folds} folds\n")
    print("| degradation | kind | path | steps used | held-out support: zero-shot -> adapted | fit p50 | "
          "fit CPU p50 | gain on 8 held-out crops |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.degradations.split(","):
        degraded, clean, test_x, test_y = sets[name]()
        zero = psnr(learner.restore(test_x), test_y)
        for kind in args.kinds.split(","):
            times, cpu = [], []
            for _ in range(max(1, args.repeats + 1)):
                start, begun = time.perf_counter(), time.process_time()
                adapter = fit_bounded(learner, degraded, clean, kind=kind, max_side=defaults.adapt_side,
                                      max_folds=folds, steps=steps, patch=args.patch or defaults.adapt_patch,
                                      **_fast_args(defaults, args))
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - begun)  # this process's CPU: steadier on a shared machine
            info = adapter.info
            gain = psnr(adapter.restore(test_x), test_y) - zero
            print(f"| {name} | {kind} | {info['path']} | {info['steps']} | {info['psnr_zero_shot']} -> "
                  f"{info['psnr_after']} | {statistics.median(times[1:] or times):.2f} s | "
                  f"{statistics.median(cpu[1:] or cpu):.2f} s | {gain:+.2f} dB |", flush=True)
    print(f"\nload average at the end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")


def _fast_args(defaults, args) -> dict:
    """The server's settings (or the command line's) of the fast fit, where this version of ``fit_bounded``
    knows them (so the script also measures earlier versions: ``PYTHONPATH=<old checkout>``)."""
    import inspect

    from metarestore.inference import fit_bounded

    known = inspect.signature(fit_bounded).parameters
    out = {}
    if "validation_steps" in known:
        out["validation_steps"] = args.validation_steps or defaults.adapt_validation_steps
    if "budget_s" in known:
        budget = defaults.adapt_budget_s if args.budget is None else args.budget
        out["budget_s"] = budget if budget and budget > 0 else None
    if "score_side" in known:
        out["score_side"] = getattr(defaults, "adapt_score_side", None)
    return out


if __name__ == "__main__":
    main()
