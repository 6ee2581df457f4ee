"""Training recipes compared at the same CPU-time budget (issue 17), in one run.

Each recipe (an experiment YAML) trains with ``metarestore train --local`` on one torch thread, all
recipes at once (one core each: same machine, same load). The number of steps each may take is set from
its own measured CPU time per step (two short probes, so start-up costs cancel), so every recipe finishes
its whole learning-rate schedule within the budget. Then one ``metarestore evaluate`` scores all the
final models on the same seeded CBSD68 crops: the trained families at one severity, zero-shot (``--told``:
a recipe whose model can be told the degradation, ``model.condition: family``, is told each family).

    python benchmarks/bench_recipe.py --configs configs/cbsd432.yaml configs/base.yaml --budget-min 15

CPU time (user + system of each training process, from ``os.wait4``) rather than wall time, so the
comparison holds when other work shares the machine; the table says what each recipe got.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def train(config: Path, steps: int, out: Path, extra: list[str]) -> subprocess.Popen:
    """Start one training process (one torch thread, no validation, no registration)."""
    sets = [f"train.steps={steps}", f"train.output_dir={out}", "train.val_every=1000000000",
            f"train.checkpoint_every={max(steps, 1)}", "train.log_every=1000000", *extra]
    cmd = [str(BIN / "metarestore"), "train", "--local", "--config", str(config), "--no-register"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen]) -> dict[str, float]:
    """CPU seconds (user + system) of each process, by name; fails loudly if one failed, and never
    leaves a training process behind (interrupted or failed)."""
    cpu: dict[str, float] = {}
    pids = {p.pid: name for name, p in procs.items()}
    try:
        while pids:
            pid, status, usage = os.wait4(-1, 0)
            if pid not in pids:
                continue
            name = pids.pop(pid)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"error: training {name} failed (see its .log)")
            cpu[name] = usage.ru_utime + usage.ru_stime
    finally:
        for pid in pids:
            procs[pids[pid]].terminate()
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", type=Path, required=True)
    ap.add_argument("--budget-min", type=float, default=15.0, help="CPU minutes per recipe.")
    ap.add_argument("--probe", type=int, nargs=2, default=(3, 13), help="Steps of the two probes.")
    ap.add_argument("--data", default="../shared/data/test/CBSD68")
    ap.add_argument("--images", type=int, default=16, help="CBSD68 images scored (crops).")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--severity", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "recipe-ab")
    ap.add_argument("--told", action="store_true", help="Tell each family to the models that can be told it.")
    ap.add_argument("--set", nargs="*", default=[], help="Overrides for every recipe (key=value).")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [c.stem for c in args.configs]
    if len(set(names)) != len(names):
        raise SystemExit("error: recipe names (file stems) must differ")
    recipes = dict(zip(names, args.configs, strict=True))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` too stops the training processes

    # 1. CPU seconds per step, from the difference of two probes (start-up and data loading cancel)
    lo, hi = args.probe
    cpu = {}
    for steps in (lo, hi):
        procs = {n: train(c, steps, args.out / f"{n}-probe{steps}", args.set) for n, c in recipes.items()}
        cpu[steps] = wait_all(procs)
    # the probes' difference; never below the longer probe's mean (noise on a loaded machine)
    per_step = {n: max((cpu[hi][n] - cpu[lo][n]) / (hi - lo), 0.5 * cpu[hi][n] / hi) for n in names}
    startup = {n: cpu[lo][n] - lo * per_step[n] for n in names}
    budget = args.budget_min * 60
    steps = {n: max(1, int((budget - startup[n]) / per_step[n])) for n in names}
    for n in names:
        print(f"{n}: {per_step[n]:.2f} CPU s/step (start-up {startup[n]:.0f} s) -> {steps[n]} steps", flush=True)

    # 2. every recipe at once, one thread each
    start = time.perf_counter()
    procs = {n: train(c, steps[n], args.out / n, args.set) for n, c in recipes.items()}
    used = wait_all(procs)
    wall = time.perf_counter() - start

    # 3. one evaluation of every final model on the same inputs
    families = []
    for c in args.configs:
        for f in yaml.safe_load(c.read_text())["families"]["train"]:
            if f not in families:
                families.append(f)
    cmd = [str(BIN / "metarestore"), "evaluate", "--model", str(args.out / names[0] / "final"),
           "--data", args.data, "--families", ",".join(families), "--severities", str(args.severity),
           "--shots", "0", "--steps", "0", "--baselines", "none", "--limit", str(args.images),
           "--crop", str(args.crop), "--no-track", "--no-progress", "--out", str(args.out / "eval"),
           "--told" if args.told else "--blind"]
    for n in names[1:]:
        cmd += ["--compare", str(args.out / n / "final")]
    subprocess.run(cmd, cwd=ROOT, check=True)
    frame = pd.read_csv(args.out / "eval" / "results.csv")
    frame["method"] = frame["method"].replace({"model": names[0], "model (told)": f"{names[0]} (told)",
                                               "identity": "input"})  # --model's label
    table = frame.pivot_table(index="family", columns="method", values="psnr", aggfunc="mean")
    table.loc["mean"] = table.mean()

    print(f"\nCPU budget {args.budget_min:g} min per recipe; wall {wall / 60:.1f} min; load average "
          f"{os.getloadavg()[0]:.1f}; CBSD68 first {args.images} images, {args.crop} px crops, severity "
          f"{args.severity}, zero-shot{', told' if args.told else ''}\n")
    print("| recipe | steps | CPU s/step | CPU min used |")
    print("|---|---|---|---|")
    for n in names:
        print(f"| {n} | {steps[n]} | {per_step[n]:.2f} | {used[n] / 60:.1f} |")
    print()
    print("| family | " + " | ".join(table.columns) + " |")
    print("|---|" + "---|" * len(table.columns))
    for family, row in table.iterrows():
        print(f"| {family} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()
