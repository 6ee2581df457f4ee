"""``metarestore train``: the Ray Train V2 driver.

Before any Ray work it checks the tracking store, measures per-family costs, assigns families to
workers and opens the MLflow run; then a ``TorchTrainer`` runs ``train_func`` on every worker; at the
end the latest checkpoint becomes ``<output_dir>/final``, is logged and registered.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.ray_runtime import init_ray
from metarestore.checkpoint import load_checkpoint
from metarestore.config import Config
from metarestore.data import absolute_source
from metarestore.errors import ResumeError
from metarestore.loop import finalize, run_params
from metarestore.runs import archive_existing, open_store, tracked_run
from training.sharding import assign_families, measure_family_costs

RUN_FILE = "run.json"


def absolute_paths(cfg: Config) -> Config:
    """Ray workers run in their own directories: make every path in the config absolute (``train.init`` too
    when it is a folder here, not builtin: or an MLflow URI)."""
    data = dataclasses.replace(cfg.data, train=absolute_source(cfg.data.train), val=absolute_source(cfg.data.val))
    init = cfg.train.init
    if init and ":" not in init and Path(init).expanduser().exists():
        init = str(Path(init).expanduser().resolve())
    train = dataclasses.replace(cfg.train, output_dir=str(cfg.output_dir.resolve()), init=init)
    return dataclasses.replace(cfg, data=data, train=train)


def build_trainer(cfg: Config, *, workers: int, gpus_per_worker: float, assignment: list[list[str]],
                  tracking_uri: str, mlflow_run_id: str | None, run_name: str, storage_path: str,
                  callbacks: list | None = None, extra: dict[str, Any] | None = None,
                  train_loop: Callable[[dict[str, Any]], None] | None = None):
    """A TorchTrainer for this experiment (also used by every Ray Tune trial). ``train_loop``: the
    per-worker function (default ``training.worker.train_func``; fault-injection tests wrap it)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.worker import train_func

    resources = {"CPU": cfg.distributed.cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    loop_config = {"experiment": cfg.to_dict(), "assignment": assignment, "tracking_uri": tracking_uri,
                   "mlflow_run_id": mlflow_run_id, "threads": max(1, int(cfg.distributed.cpus_per_worker)),
                   "use_gpu": gpus_per_worker > 0, **(extra or {})}
    return TorchTrainer(
        train_loop or train_func, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=cfg.distributed.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints)),
                             # Ray Train's own INFO lines (worker group, each report) stay in Ray's log files
                             logging_config=LoggingConfig(log_level="WARNING")))


def train_distributed(cfg: Config, workers: int | None = None, gpus_per_worker: float | None = None,
                      address: str | None = None, tracking_uri: str | None = None, resume: bool = False,
                      register: bool = True, extra: dict[str, Any] | None = None,
                      train_loop: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    cfg = absolute_paths(cfg)
    uri = open_store(tracking_uri or cfg.tracking.uri)  # a down server is a clear error now, before any Ray work
    workers = workers or cfg.distributed.workers
    gpus = cfg.distributed.gpus_per_worker if gpus_per_worker is None else gpus_per_worker
    out = cfg.output_dir
    run_file = out / RUN_FILE
    if resume:
        if not run_file.is_file():
            raise ResumeError(f"nothing to resume: {run_file} not found (was this output folder trained with Ray?)")
        state = json.loads(run_file.read_text())
        if state["workers"] != workers:
            raise ResumeError(f"the run used {state['workers']} workers; resume it with --workers {state['workers']}")
    else:
        archive_existing(out)  # before measuring: the costs are part of the new run's state
        costs = cfg.distributed.family_costs or measure_family_costs(cfg)
        state = {"run_name": f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", "workers": workers,
                 "storage_path": cfg.distributed.storage_path or str(out / "ray"), "family_costs": costs,
                 "assignment": assign_families(cfg.families.train, workers, costs)}
    extra_params = {"mode": "ray", "gpus_per_worker": gpus, "assignment": json.dumps(state["assignment"]),
                    "family_costs": json.dumps(state["family_costs"])}
    with tracked_run(uri, cfg.tracking.experiment, cfg.name, run_id=state.get("mlflow_run_id"), tags={"mode": "ray"},
                     params=lambda: run_params(cfg, workers, extra=extra_params)) as logger:
        if state.get("mlflow_run_id") != logger.run_id:  # a new run, or the recorded one is not in this store
            state["mlflow_run_id"] = logger.run_id
            out.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps(state, indent=1))
        for rank, fams in enumerate(state["assignment"]):
            print(f"worker {rank}: {', '.join(fams)}", flush=True)
        print(f"MLflow run {logger.run_id} at {uri}", flush=True)

        init_ray(address)
        trainer = build_trainer(cfg, workers=workers, gpus_per_worker=gpus, assignment=state["assignment"],
                                tracking_uri=uri, mlflow_run_id=logger.run_id, run_name=state["run_name"],
                                storage_path=state["storage_path"], extra=extra, train_loop=train_loop)
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        final = out / "final"
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with result.checkpoint.as_directory() as directory:
            shutil.copytree(directory, tmp)
        load_checkpoint(tmp, training=True)  # verify before it replaces anything
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        info = finalize(cfg, final, logger, register, out)
    return {**info, "run_id": logger.run_id, "tracking_uri": uri, "metrics": result.metrics or {},
            "output_dir": str(out), "ray_path": result.path}
