"""``metarestore train --local``: meta-training in one process, no Ray.

It is the reference the distributed trainer must match, and the quickest way to try a config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from metarestore.checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints
from metarestore.config import Config
from metarestore.engine import MetaTrainer
from metarestore.errors import ResumeError
from metarestore.loop import LoopHooks, finalize, run_loop, run_params, write_checkpoint
from metarestore.runs import open_store, tracked_run


def train_local(cfg: Config, tracking_uri: str | None = None, resume: bool = False, progress: bool = True,
                register: bool = True, resume_from: str | Path | None = None) -> dict:
    """``resume``: continue from the newest checkpoint in the output folder (and its MLflow run);
    ``resume_from``: continue from a checkpoint folder copied from elsewhere (another machine, a commit)
    in a new MLflow run."""
    uri = open_store(tracking_uri or cfg.tracking.uri)
    out = cfg.output_dir
    checkpoints = out / "checkpoints"
    trainer = MetaTrainer(cfg)
    run_id = None
    source = Path(resume_from) if resume_from is not None else None
    if resume and source is None:
        found = list_checkpoints(checkpoints)
        if not found:
            raise ResumeError(f"nothing to resume: no checkpoint under {checkpoints}")
        source = found[-1]
    if source is not None:
        ckpt = load_checkpoint(source, training=True, device=str(trainer.device))
        trainer.load_state(ckpt)
        if resume_from is None:
            run_id = ckpt.training_state.get("mlflow_run_id")
        print(f"resuming from {source} (step {trainer.step})", flush=True)

    def keep(step: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            checkpoints.mkdir(parents=True, exist_ok=True)
            target = checkpoints / checkpoint_dir.name
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(checkpoint_dir), target)
            prune_checkpoints(checkpoints, cfg.train.keep_checkpoints)

    with tracked_run(uri, cfg.tracking.experiment, cfg.name, run_id=run_id, tags={"mode": "local"},
                     params=lambda: run_params(cfg, workers=1, extra={"mode": "local", "device": str(trainer.device),
                                                                          "precision": trainer.precision}),
                     archive=None if source is not None else out) as logger:
        print(f"MLflow run {logger.run_id} at {uri} | device {trainer.device}, {trainer.precision} | "
              f"{len(cfg.families.train)} families x {cfg.meta.tasks_per_family} task(s) per step", flush=True)
        extra = {"mlflow_run_id": logger.run_id}
        metrics = run_loop(trainer, LoopHooks(chief=True, report=keep, extra_state=extra), logger, progress)
        final = write_checkpoint(trainer, out / "final", extra)
        info = finalize(cfg, final, logger, register, out)
    return {**info, "run_id": logger.run_id, "tracking_uri": uri, "metrics": metrics, "output_dir": str(out)}


__all__ = ["ResumeError", "train_local"]
