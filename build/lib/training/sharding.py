"""Which worker runs which degradation families.

Rule (deterministic given the costs, logged to MLflow and kept in ``run.json`` for resumes):

- **More families than workers**: longest-processing-time first. Families sorted by measured seconds
  per task (descending, ties by name) each go to the worker with the smallest load so far (ties to the
  lowest rank). Every family has exactly one owner.
- **More workers than families**: families are replicated. Worker ``r`` owns family ``r mod F``; the
  tasks of a family with several owners are dealt round-robin among them (its ``i``-th task of the step
  goes to owner ``i mod owners``), so set ``meta.tasks_per_family`` to at least the number of replicas.

Whatever the assignment, every task of the step runs exactly once, and the weight normaliser is the
sum over the whole step, so the all-reduced gradient is the single-process one.
"""

from __future__ import annotations

import time
from collections import defaultdict

from metarestore.config import Config
from metarestore.data import TaskSpec


def assign_families(families: list[str], workers: int, costs: dict[str, float] | None = None) -> list[list[str]]:
    """Families owned by each rank (a list per rank)."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    costs = costs or {}
    if workers >= len(families):
        return [[families[rank % len(families)]] for rank in range(workers)]
    order = sorted(families, key=lambda f: (-costs.get(f, 1.0), f))
    loads = [0.0] * workers
    owned: list[list[str]] = [[] for _ in range(workers)]
    for family in order:
        rank = min(range(workers), key=lambda r: (loads[r], r))
        owned[rank].append(family)
        loads[rank] += costs.get(family, 1.0)
    return [sorted(fams, key=families.index) for fams in owned]


def shard_tasks(tasks: list[TaskSpec], assignment: list[list[str]], rank: int) -> list[TaskSpec]:
    """This rank's share of a step's tasks."""
    owners: dict[str, list[int]] = defaultdict(list)
    for r, fams in enumerate(assignment):
        for family in fams:
            owners[family].append(r)
    missing = {t.family for t in tasks} - set(owners)
    if missing:
        raise ValueError(f"families without a worker: {sorted(missing)}")
    seen: dict[str, int] = defaultdict(int)
    mine = []
    for task in tasks:
        family_owners = owners[task.family]
        if family_owners[seen[task.family] % len(family_owners)] == rank:
            mine.append(task)
        seen[task.family] += 1
    return mine


def measure_family_costs(cfg: Config, repeats: int = 3) -> dict[str, float]:
    """Seconds per task for each training family (episode plus its meta-gradient), measured once in the
    driver. Families differ by their operator (JPEG, Poisson, masks...). Rounds go over all families in
    turn and each family keeps its fastest time, so a moment of load elsewhere on the machine cannot make
    one family look expensive and unbalance the assignment."""
    from metarestore.engine import MetaTrainer, plan_step

    trainer = MetaTrainer(cfg, device="cpu")
    by_family = {t.family: t for t in plan_step(cfg, 0)}
    times: dict[str, list[float]] = {family: [] for family in by_family}
    for round_ in range(repeats + 1):
        for family, task in by_family.items():
            start = time.perf_counter()
            trainer.learner.task_gradient(trainer.sampler.episode(task), 0.0)
            if round_ > 0:  # the first round warms up
                times[family].append(time.perf_counter() - start)
    trainer.learner.zero_grad(set_to_none=True)
    return {family: round(min(values), 4) for family, values in times.items()}
