"""The meta-training loop shared by ``train --local`` and every Ray Train worker.

What differs between the two is injected: which of the step's tasks this process runs, how gradients
are summed across processes, and how a checkpoint is persisted (a local folder, or ``ray.train.report``).
Rank 0 (the *chief*) alone logs to MLflow, validates and writes checkpoints.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metarestore.checkpoint import save_checkpoint
from metarestore.config import Config, dump
from metarestore.data import TaskSpec
from metarestore.engine import MetaTrainer, Reduce, plan_step
from metarestore.progress import Progress
from metarestore.tracking import RunLogger
from metarestore.viz import save_grid

GRID_COLUMNS = ["degraded", "zero-shot", "adapted", "clean"]


@dataclass
class LoopHooks:
    """How this process takes part in a run."""

    chief: bool = True
    reduce: Reduce | None = None
    select: Callable[[list[TaskSpec]], list[TaskSpec]] | None = None  # this worker's shard
    # called by every process at every report point; the chief passes metrics and a checkpoint dir
    report: Callable[[int, dict[str, float], Path | None], None] | None = None
    extra_state: dict[str, Any] = field(default_factory=dict)  # stored in checkpoints (e.g. MLflow run id)
    after_step: Callable[[int], None] | None = None  # e.g. a delay in fault-injection tests


def due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def write_checkpoint(trainer: MetaTrainer, directory: Path, extra_state: dict[str, Any]) -> Path:
    tensors, state = trainer.training_state()
    return save_checkpoint(directory, trainer.weights(), trainer.metadata(), tensors,
                           {**state, **extra_state})


def run_loop(trainer: MetaTrainer, hooks: LoopHooks, logger: RunLogger | None = None,
             progress: bool = True) -> dict[str, float]:
    """Train from ``trainer.step`` to ``train.steps``; returns the last validation metrics (chief)."""
    cfg = trainer.cfg
    last = cfg.train.steps
    bar = Progress(last, start=trainer.step)
    window_start, window_tasks = time.perf_counter(), 0
    latest_val: dict[str, float] = {}
    if trainer.step > 0 and trainer.step >= last:
        # resumed after its last step (killed before its final report was recorded): report its validation again
        report: dict[str, float] = {"step": float(trainer.step)}
        if hooks.chief:
            latest_val = trainer.validate().metrics
            report.update(latest_val)
            if progress:
                bar.write(f"  step {trainer.step} was the last: validated again, nothing to train")
        if hooks.report:
            hooks.report(trainer.step, report if hooks.chief else {}, None)
        return latest_val
    while trainer.step < last:
        tasks = plan_step(cfg, trainer.step)
        mine = hooks.select(tasks) if hooks.select else tasks
        metrics = trainer.run_step(mine, hooks.reduce)
        step = trainer.step  # steps done
        if hooks.after_step:
            hooks.after_step(step)
        window_tasks += len(tasks)
        reporting = due(step, cfg.train.val_every, last) or due(step, cfg.train.checkpoint_every, last)
        if hooks.chief and (due(step, cfg.train.log_every, last) or reporting):
            elapsed = time.perf_counter() - window_start
            metrics["tasks_per_s"] = window_tasks / elapsed if elapsed > 0 else 0.0
            window_start, window_tasks = time.perf_counter(), 0
            if progress:
                bar.print(step, loss=metrics["meta_loss"], **{"tasks/s": metrics["tasks_per_s"]})
            if logger:
                logger.metrics(metrics, step)
        if not reporting:
            continue
        report: dict[str, float] = {"step": float(step), "meta_loss": metrics["meta_loss"]}
        checkpoint_dir = None
        if hooks.chief:
            if due(step, cfg.train.val_every, last):
                result = trainer.validate()
                latest_val = result.metrics
                report.update(result.metrics)
                if logger:
                    logger.metrics(result.metrics, step)
                if progress:
                    bar.write(f"  validation @ {step}: input {result.metrics['val/psnr_input']:.2f} dB | zero-shot "
                              f"{result.metrics['val/psnr_zero_shot']:.2f} dB | adapted "
                              f"{result.metrics['val/psnr_adapted']:.2f} dB")
                if step == last:
                    grid = Path(tempfile.mkdtemp()) / "validation_grid.png"
                    save_grid(result.examples, GRID_COLUMNS, grid, title=f"{cfg.name}: held-out families, step {step}")
                    if logger:
                        logger.artifact(grid)
            if due(step, cfg.train.checkpoint_every, last):
                checkpoint_dir = write_checkpoint(trainer, Path(tempfile.mkdtemp()) / f"step-{step:06d}",
                                                  hooks.extra_state)
        if hooks.report:
            hooks.report(step, report if hooks.chief else {}, checkpoint_dir)
    return latest_val


def finalize(cfg: Config, checkpoint_dir: Path, logger: RunLogger | None, register: bool,
             out_dir: Path) -> dict[str, str]:
    """Chief only: log the final checkpoint and config, register the model; returns what was made."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.yaml"
    config_path.write_text(dump(cfg))
    info = {"checkpoint": str(checkpoint_dir)}
    if logger is None:
        return info
    logger.artifact(config_path)
    logger.artifact(checkpoint_dir, "checkpoint")
    logger.flush()
    if register and cfg.tracking.register:
        from metarestore.tracking import register_checkpoint

        try:
            version = register_checkpoint(logger.uri, logger.run_id, checkpoint_dir, cfg.tracking.registered_model)
            info.update(model_name=cfg.tracking.registered_model, model_version=version,
                        model_uri=f"models:/{cfg.tracking.registered_model}/{version}")
        except Exception as exc:  # noqa: BLE001 - an outage must not lose the trained model
            import warnings

            warnings.warn(f"model registration failed ({exc}); the checkpoint is at {checkpoint_dir}", stacklevel=2)
    (out_dir / "result.json").write_text(json.dumps({**info, "run_id": logger.run_id}, indent=1))
    return info


def run_params(cfg: Config, workers: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """MLflow params: the flattened config, every task weight and inner learning rate, workers, commit."""
    from metarestore.config import flatten
    from metarestore.meta.adapt import group_lr
    from metarestore.param_groups import INNER_LR_GROUPS
    from metarestore.tracking import git_commit

    params = flatten(cfg.to_dict())
    params.update({f"task_weight.{f}": cfg.families.weight(f) for f in cfg.families.train})
    params.update({f"inner_lr.{g}": group_lr(g, cfg.meta.inner_lr) for g in INNER_LR_GROUPS if g != "default"})
    params.update({"workers": workers, "git_commit": git_commit()})
    params.update(extra or {})
    return params
