"""Ray overhead (docs/benchmarks.md): steady-state meta-steps/s of ``train --local``, Ray Train with 1
worker and with 2 workers, at equal total cores (2) and equal tasks per step (the demo config).

Throughput is read from the ``tasks_per_s`` metric the chief logs every ``log_every`` steps (windows
without validation or checkpoints), the first window dropped as warm-up; start-up is reported apart.

    python benchmarks/bench_distributed.py [--config configs/demo.yaml] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from metarestore.config import load_config


def steady_rate(uri: str, run_id: str) -> float:
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(run_id, "tasks_per_s")
    values = [m.value for m in sorted(history, key=lambda m: m.step)][1:-1]  # drop warm-up and the last
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mr-bench-"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = [f"train.steps={args.steps}", "train.log_every=5", f"train.val_every={args.steps}",
              f"train.checkpoint_every={args.steps}", "tracking.register=false"]
    rows = []

    from metarestore.train_local import train_local

    torch.set_num_threads(2)
    cfg = load_config(args.config, [*common, f"train.output_dir={root / 'local'}"])
    start = time.perf_counter()
    info = train_local(cfg, tracking_uri=uri, progress=False, register=False)
    rows.append(("train --local (1 process, 2 threads)", steady_rate(uri, info["run_id"]), time.perf_counter() - start))

    from cluster.ray_runtime import init_ray
    from training.driver import train_distributed

    init_ray(num_cpus=2)
    for workers, cpus in ((1, 2), (2, 1)):
        cfg = load_config(args.config, [*common, f"train.output_dir={root / f'ray{workers}'}",
                                        f"distributed.cpus_per_worker={cpus}"])
        start = time.perf_counter()
        info = train_distributed(cfg, workers=workers, tracking_uri=uri, register=False)
        rows.append((f"Ray Train, {workers} worker(s) x {cpus} CPU", steady_rate(uri, info["run_id"]),
                     time.perf_counter() - start))

    tasks = len(load_config(args.config).families.train) * load_config(args.config).meta.tasks_per_family
    base = rows[0][1]
    print(f"\n{tasks} tasks per step, {args.steps} steps\n")
    print("| mode | tasks/s (steady) | meta-steps/s | vs --local | wall time incl. start-up (s) |")
    print("|---|---|---|---|---|")
    for name, rate, wall in rows:
        print(f"| {name} | {rate:.2f} | {rate / tasks:.3f} | {100 * (rate / base - 1):+.1f}% | {wall:.0f} |")


if __name__ == "__main__":
    main()
