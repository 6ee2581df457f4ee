"""Blind restoration without harm (issue 39): the default path (the estimator, then what it found undone,
or nothing) against the input, the model's raw blind row and told, on LIVE1 and Kodak24 centre crops.

    python benchmarks/bench_blind.py [--model builtin:base] [--estimator DIR] [--sets LIVE1,Kodak24]
        [--data ../shared/data/test] [--images 8] [--crop 256] [--out runs/bench-blind]

Writes results.csv (one row per image and case) and summary.md (means per set, the worst drop against the
input per case, and the figures issue 39's done-when asks for).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.blind_bench import cases, center_crop, evaluate_case, tensor
from metarestore.data.images import load_folder
from metarestore.estimator import load_estimator
from metarestore.hub import load_model
from metarestore.inference import told_families
from metarestore.metrics import MSE_FLOOR
from metarestore.progress import Progress

# what ``psnr`` gives two identical images (its MSE floor): an image returned as it came
IDENTICAL_DB = -10 * math.log10(MSE_FLOOR)


def identical(v: float) -> bool:
    return v >= IDENTICAL_DB - 1e-6


def fmt(v: float) -> str:
    return "identical" if identical(v) else f"{v:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:base")
    parser.add_argument("--estimator", default=None, help="estimator checkpoint (default: the shipped one)")
    parser.add_argument("--data", default="../shared/data/test")
    parser.add_argument("--sets", default="LIVE1,Kodak24")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--no-trained", action="store_true", help="skip the registry families' cases")
    parser.add_argument("--out", default="runs/bench-blind")
    args = parser.parse_args()
    learner, meta, _ = load_model(args.model)
    estimator = load_estimator(args.estimator)
    told = told_families(learner)
    rows = []
    start = time.perf_counter()
    for set_name in args.sets.split(","):
        images = load_folder(Path(args.data) / set_name).images[:args.images]
        progress = Progress(len(images), label=f"{set_name} image")
        for index, image in enumerate(images):
            clean = center_crop(image.permute(1, 2, 0).numpy(), args.crop)
            reference = tensor(clean)
            for case in cases(clean, index, told, trained=not args.no_trained):
                rows.append({"set": set_name, "image": index, **evaluate_case(learner, estimator, case, reference)})
            progress.print(index + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = ["set", "image", "case", "group", "input", "default", "blind_row", "told", "found", "summary"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"model {args.model} (step {meta.get('step')}), estimator {args.estimator or 'shipped'}, "
             f"{args.images} centre crops of {args.crop} px per set, {time.perf_counter() - start:.0f} s", "",
             "| set | case | input | default (blind) | raw blind row | told | default - input, worst image | found |",
             "|---|---|---|---|---|---|---|---|"]
    worst_overall = math.inf
    for set_name in args.sets.split(","):
        names = list(dict.fromkeys(r["case"] for r in rows if r["set"] == set_name))
        for name in names:
            rs = [r for r in rows if r["set"] == set_name and r["case"] == name]
            mean = {k: float(np.mean([min(r[k], 99.0) for r in rs])) for k in ("input", "default", "blind_row")}
            told = [r["told"] for r in rs if "told" in r]
            drop = min(min(r["default"], 99.0) - min(r["input"], 99.0) for r in rs)
            worst_overall = min(worst_overall, drop)
            found = ", ".join(f"{k} x{v}" for k, v in sorted(
                {f: sum(r['found'] == f for r in rs) for f in {r['found'] for r in rs}}.items(), key=lambda t: -t[1]))
            default = "identical" if all(identical(r["default"]) for r in rs) else fmt(mean["default"])
            given = "(itself)" if all(identical(r["input"]) for r in rs) else fmt(mean["input"])
            lines.append(f"| {set_name} | {name} | {given} | {default} | {fmt(mean['blind_row'])} | "
                         f"{fmt(float(np.mean(told))) if told else '-'} | {drop:+.2f} | {found} |")
    lines += ["", f"worst change against the input over every image and case: {worst_overall:+.2f} dB"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
