"""Does meta-learning pay? (issue 37) Models ("arms") evaluated the same way, side by side:

- **few-shot adaptation of the model's own adapter kind** (``learner.adapt``: its kind, its inner rates; no
  fitted operators, so that the comparison is of what meta-learning trains) with 1 / 5 / 10 shots and
  1 / 5 / 10 steps, on the held-out families (severity 0.5) and on the unseen suite
  (``evaluation.adaptation_bench.DEGRADATIONS`` less its in-training control);
- ``kind=auto`` as the server fits it (``inference.fit_as_served``) from 5 pairs of each held-out family;
- zero-shot, told and blind (the default path, ``inference.restore_blind``), on every trained family at
  severity 0.5.

Support pairs are centre crops of the first images of ``--images``, test crops those of the next ones (never
the same image); every degradation is drawn from a fixed seed, identical for every arm.

    python benchmarks/bench_meta_ab.py --arm meta=runs/base-meta/final --arm multitask=runs/base-mt/final \
        [--images ../shared/data/test/CBSD68] [--shots 1,5,10] [--steps 1,5,10] [--out runs/bench-meta-ab]

Writes results.csv (one row per arm, degradation, shots, steps) and summary.md (the tables of
docs/benchmarks.md, "Meta-learning against multitask").
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evaluation.adaptation_bench import DEGRADATIONS, IN_TRAINING_SPAN, degrade, load_crops
from metarestore.fewshot import Task
from metarestore.hub import load_model, model_families
from metarestore.inference import fit_as_served, restore_blind
from metarestore.metrics import psnr
from metarestore.model import kind_of
from metarestore.progress import Progress

HELD_OUT = ("motion_blur", "haze", "color_cast")
SEVERITY = 0.5


def suite() -> dict[str, Callable]:
    """Every degradation adapted to, by name: the held-out families, then the unseen operators. Each maps
    (clean batch, which side) to its degraded batch; the support side draws fresh noise."""
    out = {}
    for family in HELD_OUT:
        task = Task.sample(family, SEVERITY, "meta-ab", family)
        out[family] = lambda x, side, task=task: (task.degrade_support(x) if side == "support" else task.degrade(x))
    for name in DEGRADATIONS:
        if name not in IN_TRAINING_SPAN:
            out[name] = lambda x, side, name=name: degrade(name, x, seed=1 if side == "support" else 2)
    return out


def adaptation_rows(arm: str, learner, degradations: dict, support: torch.Tensor, test: torch.Tensor,
                    shots: list[int], steps: list[int], tick: Callable[[str], None]) -> list[dict]:
    rows = []
    for name, make in degradations.items():
        sx, tx = make(support, "support").clamp(0, 1), make(test, "test").clamp(0, 1)
        base = {"arm": arm, "degradation": name, "group": "held_out" if name in HELD_OUT else "unseen",
                "input": psnr(tx, test), "zero_shot": psnr(learner.restore(tx), test)}
        for k in shots:
            for s in steps:
                torch.manual_seed(0)
                params = {n: p.detach() for n, p in learner.adapt(sx[:k], support[:k], steps=s).items()}
                rows.append({**base, "shots": k, "steps": s, "adapted": psnr(learner.restore(tx, params), test)})
        if name in HELD_OUT:
            torch.manual_seed(0)
            auto = fit_as_served(learner, sx[:5], support[:5])
            rows.append({**base, "shots": 5, "steps": "auto", "adapted": psnr(auto.restore(tx), test),
                         "path": auto.path.name})
        tick(name)
    return rows


def trained_rows(arm: str, learner, families: list[str], test: torch.Tensor, tick: Callable[[str], None]) -> list[dict]:
    rows = []
    for family in families:
        x = Task.sample(family, SEVERITY, "meta-ab", family).degrade(test).clamp(0, 1)
        rows.append({"arm": arm, "degradation": family, "group": "trained", "input": psnr(x, test),
                     "zero_shot": psnr(learner.restore(x), test), "told": psnr(learner.restore(x, family=family), test),
                     "blind": psnr(restore_blind(learner, x), test)})
        tick(f"{family} told and blind")
    return rows


def ticker(progress: Progress) -> Callable[[str], None]:
    """A progress line (done, ETA) per call, naming what was just done."""
    done = itertools.count(1)
    return lambda what: progress.print(next(done), finished=what)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summary(rows: list[dict], arms: list[str], shots: list[int], steps: list[int]) -> list[str]:
    adapted = [r for r in rows if r["group"] != "trained" and r["steps"] != "auto"]
    first, *others = arms
    lines = ["Mean PSNR (dB) over the held-out families and the unseen suite, own adapter kind:", "",
             "| shots | steps | " + " | ".join(arms) + " | " + " | ".join(f"{o} - {first}" for o in others) + " |",
             "|---|---|" + "---|" * (2 * len(arms) - 1)]
    for k in shots:
        for s in steps:
            means = [mean(r["adapted"] for r in adapted if r["arm"] == a and r["shots"] == k and r["steps"] == s)
                     for a in arms]
            lines.append(f"| {k} | {s} | " + " | ".join(f"{m:.2f}" for m in means) + " | "
                         + " | ".join(f"{m - means[0]:+.2f}" for m in means[1:]) + " |")
    k, s = (5 if 5 in shots else shots[0]), max(steps)
    lines += arm_table(f"Per degradation, {k} shots, {s} steps (zero-shot in brackets):",
                       [r for r in adapted if r["shots"] == k and r["steps"] == s], arms,
                       lambda r: f"{r['adapted']:.2f} ({r['zero_shot']:.2f})")
    auto = [r for r in rows if r.get("steps") == "auto"]
    if auto:
        lines += arm_table("`kind=auto` as served, 5 pairs (path chosen):", auto, arms,
                           lambda r: f"{r['adapted']:.2f} ({r['path']})")
    trained = [r for r in rows if r["group"] == "trained"]
    if trained:
        lines += arm_table("Trained families at severity 0.5, told / blind (the default path):", trained, arms,
                           lambda r: f"{r['told']:.2f} / {r['blind']:.2f}")
        told = [mean(r["told"] for r in trained if r["arm"] == a) for a in arms]
        blind = [mean(r["blind"] for r in trained if r["arm"] == a) for a in arms]
        lines.append("| mean | | " + " | ".join(f"{t:.2f} / {b:.2f}" for t, b in zip(told, blind, strict=True)) + " |")
    return lines


def arm_table(title: str, rows: list[dict], arms: list[str], cell: Callable[[dict], str]) -> list[str]:
    """A markdown table of ``rows``: a line per degradation (its input's PSNR first), a column per arm."""
    lines = ["", title, "", "| degradation | input | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for name in dict.fromkeys(r["degradation"] for r in rows):
        mine = {r["arm"]: r for r in rows if r["degradation"] == name}
        lines.append(f"| {name} | {next(iter(mine.values()))['input']:.2f} | "
                     + " | ".join(cell(mine[a]) for a in arms) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", required=True, help="NAME=MODEL (a model URI or folder); "
                        "the first arm is the reference of the differences")
    parser.add_argument("--rates", action="append", default=[], help="NAME=MODEL: arm NAME adapts with MODEL's "
                        "inner rates (the same adapter kind; its weights untouched)")
    parser.add_argument("--images", default="../shared/data/test/CBSD68")
    parser.add_argument("--support-size", type=int, default=96)
    parser.add_argument("--test-size", type=int, default=128)
    parser.add_argument("--tests", type=int, default=6)
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--steps", default="1,5,10")
    parser.add_argument("--out", default="runs/bench-meta-ab")
    args = parser.parse_args()
    shots, steps = [int(v) for v in args.shots.split(",")], [int(v) for v in args.steps.split(",")]
    arms = dict(a.split("=", 1) for a in args.arm)
    rates = dict(r.split("=", 1) for r in args.rates)
    support = load_crops(args.images, args.support_size, max(shots))
    test = load_crops(args.images, args.test_size, max(shots) + args.tests)[max(shots):]
    degradations = suite()
    rows, started = [], time.perf_counter()
    for arm, uri in arms.items():
        learner, meta, _ = load_model(uri)
        learner.eval()
        if arm in rates:  # the rates another model adapts with, on these weights
            donor, donor_meta, _ = load_model(rates[arm])
            if kind_of(donor.model).name != kind_of(learner.model).name:
                raise SystemExit(f"error: --rates {arm}: {rates[arm]} adapts another kind than {uri}")
            learner.set_inner_lrs(donor_meta["inner_lr"])
        families = [f for f in model_families(meta)[0] if "+" not in f]  # the registry's families, not chains
        tick = ticker(Progress(len(degradations) + len(families), label=f"arm {arm}:"))
        rows += adaptation_rows(arm, learner, degradations, support, test, shots, steps, tick)
        rows += trained_rows(arm, learner, families, test, tick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"arms: {', '.join(f'{a} = {u}' + (f' (rates of {rates[a]})' if a in rates else '') for a, u in arms.items())}; support {max(shots)} crops of "
             f"{args.support_size} px, {args.tests} test crops of {args.test_size} px, {args.images}", "",
             *summary(rows, list(arms), shots, steps), "", f"{time.perf_counter() - started:.0f} s"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
