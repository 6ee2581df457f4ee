"""Does ``kind=auto`` choose well, and never below the input? (issue 39) For each degradation of the unseen
suite (``evaluation/blind_bench.UNSEEN``: no registry family makes them, no training saw them), an adapter is
fitted from K pairs as the server fits it (``inference.fit_as_served``: the server's defaults, its budget
included) with ``kind=auto``, and with each single path forced (the same defaults, no budget), and each is
scored on test crops of other images.

    python benchmarks/bench_adapter_choice.py [--model builtin:base] [--images ../shared/data/test/Kodak24]
        [--shots 5] [--tests 3] [--set budget_s=none --set validation_steps=3 ...] [--optimizer sgd]
        [--out runs/bench-adapter-choice]

``--set KEY=VALUE`` fits ``auto`` with one of the server's settings changed (``SERVED_FIT``'s keys; ``none``: no
budget, or whole held-out pairs for ``score_side``), to see what the choice would gain from more time or more
faithful validation; the forced paths stay as served. ``--optimizer sgd``: every fit (auto's and the forced
paths') with the meta-learned SGD rates instead of Adam.

Writes summary.md: per degradation the input, auto's choice and score, the best single path and its score,
and auto's gap to it; paths.csv: every forced path's score and auto's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from evaluation.blind_bench import UNSEEN, center_crop, tensor
from metarestore.data.images import load_folder
from metarestore.hub import load_model
from metarestore.inference import SERVED_FIT, SERVED_STEPS, fit_as_served
from metarestore.meta.adapt import FIT_OPTIMIZER, OPTIMIZERS
from metarestore.meta.losses import psnr
from metarestore.operators.paths import default_paths

SERVER = {**{k: v for k, v in SERVED_FIT.items() if k != "budget_s"}, "steps": SERVED_STEPS}  # a forced path: no budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--images", default="../shared/data/test/Kodak24")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--tests", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"auto with a server setting changed: {', '.join(SERVED_FIT)} (none: no budget / whole pairs)")
    parser.add_argument("--optimizer", default=FIT_OPTIMIZER, choices=OPTIMIZERS,
                        help="the update of every fit, auto's and the forced paths' (adam: what adapters use)")
    parser.add_argument("--out", default="runs/bench-adapter-choice")
    args = parser.parse_args()
    changed = settings(args.set)
    learner, meta, _ = load_model(args.model)
    images = [im.permute(1, 2, 0).numpy() for im in load_folder(args.images).images]
    paths = [p.name for p in default_paths(learner)]
    lines = [f"model {args.model} (step {meta.get('step')}), {args.images}: {args.shots} pairs of 128 px, "
             f"{args.tests} test crops of 256 px (other images); server defaults {SERVER}, auto's budget {SERVED_FIT['budget_s']} s"
             + (f"; auto with {changed}" if changed else "") + f"; fits: {args.optimizer}", "",
             "| degradation | input | auto: path | auto | best single path | best | auto - best | auto - input |",
             "|---|---|---|---|---|---|---|---|"]
    start = time.perf_counter()
    rows = []
    for name, op in UNSEEN.items():
        rng = np.random.default_rng(0)
        support = [center_crop(im, 128) for im in images[:args.shots]]
        tests = [center_crop(im, 256) for im in images[args.shots:args.shots + args.tests]]
        sx = torch.cat([tensor(op(c, rng)) for c in support])
        sy = torch.cat([tensor(c) for c in support])
        tx = torch.cat([tensor(op(c, rng)) for c in tests])
        ty = torch.cat([tensor(c) for c in tests])
        torch.manual_seed(0)
        auto = fit_as_served(learner, sx, sy, optimizer=args.optimizer, **changed)
        auto_score = psnr(auto.restore(tx), ty)
        singles = {}
        for path in paths:
            torch.manual_seed(0)
            try:
                singles[path] = psnr(fit_as_served(learner, sx, sy, kind=path, budget_s=None, optimizer=args.optimizer)
                                     .restore(tx), ty)
            except Exception as exc:  # noqa: BLE001 - a path that cannot fit these pairs is not a candidate
                print(f"{name}: {path} failed: {exc}")
        rows += [{"degradation": name, "path": path, "psnr": round(score, 2)} for path, score in singles.items()]
        rows.append({"degradation": name, "path": f"auto ({auto.path.name})", "psnr": round(auto_score, 2)})
        best = max(singles, key=singles.get)
        before = psnr(tx, ty)
        lines.append(f"| {name} | {before:.2f} | {auto.path.name} | {auto_score:.2f} | {best} | {singles[best]:.2f} | "
                     f"{auto_score - singles[best]:+.2f} | {auto_score - before:+.2f} |")
        print(lines[-1], flush=True)
    lines += ["", f"{time.perf_counter() - start:.0f} s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    pd.DataFrame(rows).to_csv(out / "paths.csv", index=False)
    print("\n".join(lines))


def settings(pairs: list[str]) -> dict:
    """``--set`` values: the server's fit settings by name, ``none`` for None, else numbers."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in SERVED_FIT or not value:
            raise SystemExit(f"error: --set {pair}: expected KEY=VALUE with KEY one of {', '.join(SERVED_FIT)}")
        out[key] = None if value == "none" else (float(value) if key == "budget_s" else int(value))
    return out


if __name__ == "__main__":
    main()
