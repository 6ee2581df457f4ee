"""Core benchmarks (docs/benchmarks.md): the episode sampler, and the meta-step of every algorithm with
the reference per-task path (fp32) and the batched path (fp32, and bf16 autocast) side by side (one step of
each in turn), in tasks/s, patches/s, achieved GFLOP/s and the fraction of this CPU's fp32 peak.

    python benchmarks/bench_core.py [--config configs/demo.yaml] [--steps 6] [--threads 2]
    python benchmarks/bench_core.py --config configs/base.yaml --sweep 8,16,36,72,144   # per-patch cost by batch
    python benchmarks/bench_core.py --config configs/base.yaml --knobs 72   # fp32 / channels-last / bf16 / compile

Model FLOPs come from ``torch.utils.flop_counter`` on one per-task step (convolutions and matrix
products, forward and backward; both paths compute the same model FLOPs). The peak is
cores x clock (``cpu MHz`` of /proc/cpuinfo) x 64 fp32 FLOP per cycle (two 512-bit FMA pipes, AVX-512,
as on AMD Zen 5; pass ``--flop-per-cycle`` for another CPU).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from metarestore.config import load_config
from metarestore.engine import MetaTrainer, cpu_has_bf16_units, plan_step, resolve_precision
from metarestore.meta import ALGORITHMS


def time_sampler(trainer: MetaTrainer, episodes: int) -> float:
    tasks = [t for step in range(episodes // len(trainer.families) + 1) for t in plan_step(trainer.cfg, step)]
    tasks = tasks[:episodes]
    start = time.perf_counter()
    for task in tasks:
        trainer.sampler.episode(task)
    return episodes / (time.perf_counter() - start)


def per_task_step(trainer: MetaTrainer) -> None:
    """The reference path: the step's tasks one after another (what training ran before batching)."""
    tasks = plan_step(trainer.cfg, trainer.step)
    trainer.optimizer.zero_grad(set_to_none=True)
    for task in tasks:
        trainer.learner.task_gradient(trainer.sampler.episode(task), 1.0 / len(tasks))
    trainer.optimizer.step()
    trainer.step += 1


def interleaved_times(paths: list[tuple], steps: int) -> list[list[float]]:
    """Seconds per step of each (step function, trainer), one step of each in turn per round (after a
    warm-up of each): a machine whose speed drifts during the run slows every path alike, so the ratios of
    one round compare like with like."""
    for step, trainer in paths:
        step(trainer)
    times = [[] for _ in paths]
    for _ in range(steps):
        for (step, trainer), own in zip(paths, times, strict=True):
            start = time.perf_counter()
            step(trainer)
            own.append(time.perf_counter() - start)
    return times


def median_ratio(reference: list[float], times: list[float]) -> float:
    """The median over rounds of reference / time: a speed-up measured within each round."""
    return statistics.median(a / b for a, b in zip(reference, times, strict=True))


def batched_step(trainer: MetaTrainer) -> None:
    trainer.run_step()


def step_flops(trainer: MetaTrainer) -> int:
    with FlopCounterMode(display=False) as counter:
        per_task_step(trainer)
    return counter.get_total_flops()


def peak_gflops(cores: int, flop_per_cycle: int) -> tuple[float, float]:
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")]
    clock = max(mhz) / 1000 if mhz else 0.0
    return clock, cores * clock * flop_per_cycle


def batch_sweep(cfg, sizes: list[int], repeats: int = 3) -> None:
    """Forward + backward of the config's network on n patches at once: the cost per patch by batch size
    (what ``train.max_batch_patches`` is chosen from)."""
    from metarestore.model import RestorationNet

    torch.manual_seed(0)
    model = RestorationNet.from_config(cfg.model)
    x = torch.rand(max(sizes), 3, cfg.data.patch_size, cfg.data.patch_size)
    print(f"| patches at once | forward + backward (s), best of {repeats} | per patch (ms) |")
    print("|---|---|---|")
    for n in sizes:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x[:n]).square().mean().backward()
            times.append(time.perf_counter() - start)
        print(f"| {n} | {min(times):.3f} | {1000 * min(times) / n:.1f} |", flush=True)


def knobs(cfg, n: int, repeats: int = 3) -> None:
    """Forward + backward of n patches under each CPU knob: the evidence for what is on by default."""
    from metarestore.model import RestorationNet

    torch.manual_seed(0)
    model = RestorationNet.from_config(cfg.model)
    x = torch.rand(n, 3, cfg.data.patch_size, cfg.data.patch_size)

    def run(net, inp, bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(inp).float().square().mean().backward()

    start = time.perf_counter()
    compiled = torch.compile(model)
    run(compiled, x)
    compile_s = time.perf_counter() - start
    cases = [("fp32 (default)", lambda: run(model, x)),
             ("channels-last", lambda: run(model.to(memory_format=torch.channels_last),
                                          x.contiguous(memory_format=torch.channels_last))),
             ("bf16 autocast", lambda: run(model.to(memory_format=torch.contiguous_format), x, bf16=True)),
             (f"torch.compile (compiling took {compile_s:.0f} s)", lambda: run(compiled, x))]
    print(f"| {n} patches of {cfg.data.patch_size} px, forward + backward | best of {repeats} (s) | vs fp32 |")
    print("|---|---|---|")
    base = None
    for name, fn in cases:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        base = base or min(times)
        print(f"| {name} | {min(times):.3f} | {base / min(times):.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (key=value)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--flop-per-cycle", type=int, default=64)
    parser.add_argument("--algorithms", default=",".join(sorted(ALGORITHMS)))
    parser.add_argument("--sweep", help="only the per-patch cost at these batch sizes, e.g. 8,36,72,144")
    parser.add_argument("--knobs", type=int, help="only fp32 / channels-last / bf16 / compile on this many patches")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = ["data.train=embedded", "data.val=embedded", *args.set]  # the data does not change the cost
    base = load_config(args.config, overrides)
    if args.sweep:
        batch_sweep(base, [int(n) for n in args.sweep.split(",")])
        return
    if args.knobs:
        knobs(base, args.knobs)
        return
    clock, peak = peak_gflops(args.threads, args.flop_per_cycle)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} "
          f"threads; fp32 peak {peak:.0f} GFLOP/s ({args.threads} x {clock:.2f} GHz x {args.flop_per_cycle})")
    trainer = MetaTrainer(base, device="cpu")
    eps = time_sampler(trainer, args.episodes)
    tasks = len(plan_step(base, 0))
    patches = tasks * (base.data.support + base.data.query)
    print(f"config {args.config}: {tasks} tasks per step, {base.data.support}+{base.data.query} patches of "
          f"{base.data.patch_size}px, width {base.model.width}")
    print(f"episode sampler: {eps:.0f} episodes/s\n")
    auto = resolve_precision("auto", torch.device("cpu"))
    print(f"train.precision auto is {auto} on this CPU (bf16 units: {cpu_has_bf16_units()})\n")
    print("| algorithm | GFLOP per step | per-task: s/step | tasks/s | GFLOP/s | % peak | batched fp32: s/step | tasks/s "
          "| patches/s | GFLOP/s | % peak | speed-up | batched bf16: s/step | tasks/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for algorithm in args.algorithms.split(","):
        def fresh(precision: str, algorithm: str = algorithm) -> MetaTrainer:
            return MetaTrainer(load_config(args.config, [*overrides, f"meta.algorithm={algorithm}",
                                                         f"train.precision={precision}"]), device="cpu")

        flops = step_flops(fresh("fp32")) / 1e9
        # the reference (fp32, no autocast), the batched step in fp32 and in bf16 autocast
        times = interleaved_times([(per_task_step, fresh("fp32")), (batched_step, fresh("fp32")),
                                   (batched_step, fresh("bf16"))], args.steps)
        old, new, bf16 = (statistics.median(t) for t in times)
        ratio_new, ratio_bf16 = (median_ratio(times[0], t) for t in times[1:])

        row = (f"| {algorithm} | {flops:.1f} | {old:.3f} | {tasks / old:.1f} | {flops / old:.0f} | "
               f"{100 * flops / old / peak:.0f}% | {new:.3f} | {tasks / new:.1f} | {patches / new:.0f} | "
               f"{flops / new:.0f} | {100 * flops / new / peak:.0f}% | {ratio_new:.2f}x | "
               f"{bf16:.3f} | {tasks / bf16:.1f} | {ratio_bf16:.2f}x |")
        print(row, flush=True)


if __name__ == "__main__":
    main()
