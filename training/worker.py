"""The per-worker training function (Ray Train V2): the shared loop with this worker's shard of
families, a gradient all-reduce, and checkpoints through ``ray.train.report``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from metarestore.checkpoint import load_checkpoint
from metarestore.config import from_dict
from metarestore.engine import MetaTrainer
from metarestore.loop import LoopHooks, run_loop
from metarestore.tracking import RunLogger
from training.sharding import shard_tasks


def all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat


def train_func(config: dict[str, Any]) -> None:
    """Runs in every worker. ``config``: the experiment dict, the family assignment, the MLflow run."""
    cfg = from_dict(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    trainer = MetaTrainer(cfg, device=device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_state(load_checkpoint(directory, training=True, device=str(device)))
        if rank == 0:
            sys.stdout.write(f"[rank 0] resumed from step {trainer.step}\n")  # not print: Train tees it twice

    chief = rank == 0
    logger = None
    if chief and config.get("mlflow_run_id"):
        logger = RunLogger(config["tracking_uri"], cfg.tracking.experiment, cfg.name, run_id=config["mlflow_run_id"])

    def report(step: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=checkpoint_dir.name)
        shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)

    assignment = config["assignment"]
    hooks = LoopHooks(chief=chief, reduce=all_reduce_sum if world > 1 else None,
                      select=lambda tasks: shard_tasks(tasks, assignment, rank), report=report,
                      extra_state={"mlflow_run_id": config.get("mlflow_run_id")})
    run_loop(trainer, hooks, logger, progress=chief and config.get("progress", True))
    if logger:
        logger.flush()  # the driver closes the run after the final checkpoint is registered
