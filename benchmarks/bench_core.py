"""Core benchmarks (docs/benchmarks.md): episode sampler throughput against the meta-step time, and the
meta-step time of every algorithm, at the demo config. CPU threads: all available (torch default).

    python benchmarks/bench_core.py [--config configs/demo.yaml] [--steps 10]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from metarestore.config import load_config
from metarestore.engine import MetaTrainer, plan_step


def time_sampler(trainer: MetaTrainer, episodes: int) -> float:
    tasks = [t for step in range(episodes // len(trainer.families) + 1) for t in plan_step(trainer.cfg, step)]
    tasks = tasks[:episodes]
    start = time.perf_counter()
    for task in tasks:
        trainer.sampler.episode(task)
    return episodes / (time.perf_counter() - start)


def time_steps(trainer: MetaTrainer, steps: int) -> list[float]:
    trainer.run_step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.run_step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--episodes", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    base = load_config(args.config)
    trainer = MetaTrainer(base, device="cpu")
    eps = time_sampler(trainer, args.episodes)
    tasks_per_step = len(plan_step(base, 0))
    print(f"\nepisode sampler: {eps:.0f} episodes/s ({1000 / eps:.1f} ms per episode of "
          f"{base.data.support}+{base.data.query} pairs at {base.data.patch_size}px)\n")
    print(f"| algorithm | meta-step (s), median of {args.steps} | tasks/s | sampling share of a step |")
    print("|---|---|---|---|")
    for algorithm in ("multitask", "fomaml", "reptile", "maml", "metasgd"):
        cfg = load_config(args.config, [f"meta.algorithm={algorithm}"])
        times = time_steps(MetaTrainer(cfg, device="cpu"), args.steps)
        step = statistics.median(times)
        share = tasks_per_step / eps / step
        print(f"| {algorithm} | {step:.3f} | {tasks_per_step / step:.1f} | {100 * share:.1f}% |")


if __name__ == "__main__":
    main()
