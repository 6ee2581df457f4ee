"""Fault injection for Ray Train tests, kept out of the production worker. Importable by Ray's worker
processes as ``tests.faults`` (the test session puts the repository on their PYTHONPATH)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any


def slow_train_func(config: dict[str, Any]) -> None:
    """``training.worker.train_func`` that writes its pid to ``config["pid_dir"]`` (so a test can kill it) and
    sleeps ``config["step_delay_s"]`` after every step (so the kill lands mid-run)."""
    import ray.train

    from training import worker

    rank = ray.train.get_context().get_world_rank()
    Path(config["pid_dir"], f"rank{rank}.pid").write_text(str(os.getpid()))
    delay = float(config["step_delay_s"])
    run_loop = worker.run_loop

    def slowed(trainer, hooks, *args, **kwargs):
        return run_loop(trainer, dataclasses.replace(hooks, after_step=lambda step: time.sleep(delay)), *args, **kwargs)

    worker.run_loop = slowed
    try:
        worker.train_func(config)
    finally:
        worker.run_loop = run_loop
