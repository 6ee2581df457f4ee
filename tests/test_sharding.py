"""Assigning families to Ray Train workers: pure logic, no Ray (fast, unlike test_training_ray.py)."""

from __future__ import annotations

from metarestore.data import TaskSpec
from training.sharding import assign_families, shard_tasks


def test_assignment_is_balanced_deterministic_and_covers_every_task():
    families = ["a", "b", "c", "d", "e"]
    costs = {"a": 5.0, "b": 1.0, "c": 1.0, "d": 3.0, "e": 2.0}
    assignment = assign_families(families, 2, costs)
    assert assignment == assign_families(families, 2, dict(reversed(costs.items())))
    loads = [sum(costs[f] for f in fams) for fams in assignment]
    assert max(loads) - min(loads) <= max(costs.values())
    assert sorted(f for fams in assignment for f in fams) == families
    # more workers than families: replicated, tasks of a family dealt among its owners, each exactly once
    replicated = assign_families(["a", "b"], 4)
    assert replicated == [["a"], ["b"], ["a"], ["b"]]
    tasks = [TaskSpec(f, 0.5, i) for i, f in enumerate(["a", "a", "b", "b", "a"])]
    shards = [shard_tasks(tasks, replicated, r) for r in range(4)]
    assert sorted(t.seed for s in shards for t in s) == list(range(5))
    assert [len(s) for s in shards] == [2, 1, 1, 1]
