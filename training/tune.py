"""``metarestore tune``: Ray Tune over task weights, inner learning rates and any other config key.

Each trial is a driver function that launches the distributed trainer (a ``TorchTrainer``, Train V2)
and reports through ``TuneReportCallback``; ASHA stops weak trials on the validation metric reported
every ``train.val_every`` steps. MLflow holds a parent run for the search and a nested child run per
trial. Results land in ``--out``: ``trials.csv``, ``best.yaml`` (trainable as is), plots.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from metarestore.config import ConfigError, dump, flatten, read_yaml
from metarestore.data import absolute_source
from metarestore.errors import ResumeError
from metarestore.runs import open_store, tracked_run
from training.search_space import SearchSpec, default_point, parse_search, trial_config, tune_space

STATE_FILE = "search.json"
EXPERIMENT = "search"
DRIVER_MEMORY = 64 * 2**20  # bytes of logical memory a trial's driver function reserves


def load_search_config(path: str | Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], SearchSpec]:
    """The base config and its search space. Data folders become absolute here, against the caller's
    directory: Tune runs every trial in a directory of its own, where a relative path means nothing."""
    base = read_yaml(path, overrides)
    data = base.get("data") or {}
    for key in ("train", "val"):
        if isinstance(data.get(key), str):
            data[key] = absolute_source(data[key])
    return base, parse_search(base)


def run_trial(config: dict[str, Any], base: dict[str, Any], out: str, tracking_uri: str, parent_run_id: str,
              workers: int | None) -> None:
    """One Tune trial: a child MLflow run and a distributed meta-training run of the sampled config."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.driver import absolute_paths, build_trainer
    from training.sharding import assign_families

    context = tune.get_context()
    trial_id = context.get_trial_id()
    cfg = trial_config(base, config)
    # every report carries the validation metric ASHA decides on: checkpoint exactly when validating
    cfg = absolute_paths(_with(cfg, output_dir=str(Path(out) / "trials" / trial_id),
                               checkpoint_every=cfg.train.val_every))
    ledger = Path(out) / "trials" / trial_id
    ledger.mkdir(parents=True, exist_ok=True)
    from metarestore.loop import run_params

    run_file = ledger / "mlflow_run_id"
    run_id = run_file.read_text().strip() if run_file.is_file() else None  # a relaunched trial keeps its run
    n = workers or cfg.distributed.workers
    with tracked_run(tracking_uri, cfg.tracking.experiment, f"trial-{trial_id}", run_id=run_id,
                     parent_run_id=parent_run_id, tags={"mode": "tune", "trial_id": trial_id},
                     params=lambda: {**run_params(cfg, n), "trial_id": trial_id,
                                     **{f"search.{k}": v for k, v in config.items()}}) as logger:
        run_file.write_text(logger.run_id)
        with open(Path(out) / "trials" / "started.log", "a") as fh:
            fh.write(f"{trial_id} {time.time():.0f}\n")
        trainer = build_trainer(cfg, workers=n, gpus_per_worker=cfg.distributed.gpus_per_worker,
                                assignment=assign_families(cfg.families.train, n, cfg.distributed.family_costs),
                                tracking_uri=tracking_uri, mlflow_run_id=logger.run_id, run_name=f"train-{trial_id}",
                                storage_path=str(Path(out) / "ray_train"), callbacks=[TuneReportCallback()],
                                extra={"progress": False})  # the search's console is one line per report (TrialLines)
        trainer.fit()


def _with(cfg, **train_fields):
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_fields))


def _scheduler(spec: SearchSpec, steps: int):
    if spec.scheduler.get("type", "asha") == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", max_t=steps, grace_period=int(spec.scheduler.get("grace_period", 1)),
                         reduction_factor=float(spec.scheduler.get("reduction_factor", 2)))


def _search_alg(spec: SearchSpec, base: dict[str, Any]):
    from ray.tune.search import ConcurrencyLimiter

    first = [default_point(base, spec)] if spec.include_default else None
    if spec.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=max(2, spec.num_samples // 3))
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler, points_to_evaluate=first),
                                  max_concurrent=spec.max_concurrent)
    if spec.algorithm == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent,
                                     points_to_evaluate=first)
    return None  # grid: Tune's default generator expands grid_search


def run_search(config_path: str | Path, out: str | Path, num_samples: int | None = None,
               max_concurrent: int | None = None, tracking_uri: str | None = None, resume: bool = False,
               address: str | None = None, workers: int | None = None, overrides: list[str] | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a search; returns a summary with the paths of what it wrote."""
    out = Path(out).resolve()
    state_file = out / STATE_FILE
    if resume:
        if not state_file.is_file():
            raise ResumeError(f"nothing to resume: {state_file} not found")
        state = json.loads(state_file.read_text())
        base, spec = state["base"], parse_search(state["base"])
    else:
        base, spec = load_search_config(config_path, overrides)
        if num_samples:
            spec.num_samples = num_samples
        if max_concurrent:
            spec.max_concurrent = max_concurrent
        if state_file.exists():
            raise ConfigError(f"{out} already holds a search: pass --resume to continue it, or another --out")
    base_cfg = trial_config(base, {})
    if base_cfg.train.val_every < 1:
        raise ConfigError("a search needs train.val_every >= 1: trials are compared on validation metrics")
    uri = open_store(tracking_uri or base_cfg.tracking.uri)
    parent_params = {"search.algorithm": spec.algorithm, "search.metric": spec.metric, "search.mode": spec.mode,
                     "search.num_samples": spec.num_samples, "search.max_concurrent": spec.max_concurrent,
                     "search.space": json.dumps({k: [d, a] for k, (d, a) in spec.space.items()}),
                     **{f"base.{k}": v for k, v in flatten(base_cfg.to_dict()).items()}}
    with tracked_run(uri, base_cfg.tracking.experiment, f"search-{base_cfg.name}", tags={"mode": "tune-parent"},
                     run_id=state["parent_run_id"] if resume else None, params=parent_params) as parent:
        if not resume:
            out.mkdir(parents=True, exist_ok=True)
            state = {"base": base, "parent_run_id": parent.run_id, "num_samples": spec.num_samples,
                     "max_concurrent": spec.max_concurrent, "workers": workers}
            state_file.write_text(json.dumps(state, indent=1))
            (out / "base.yaml").write_text(dump(base_cfg))
        return _search(spec, state, base, base_cfg, out, uri, address, resume, progress, parent)


def _search(spec: SearchSpec, state: dict[str, Any], base: dict[str, Any], base_cfg, out: Path, uri: str,
            address: str | None, resume: bool, progress: bool, parent) -> dict[str, Any]:
    """Run or resume the Tune experiment inside the open parent run; returns the summary."""
    import optuna
    from ray import tune

    from cluster.ray_runtime import init_ray
    from training.tune_report import TrialLines, write_results

    spec.num_samples, spec.max_concurrent = state["num_samples"], state["max_concurrent"]
    workers = state.get("workers") or base_cfg.distributed.workers
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # save experiment state often: resume loses little
    # Tune's reporter of Ray 2.x prints its configuration box and result paths even at verbose=0; the legacy one
    # prints nothing there, and the console is TrialLines' and this command's summary
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the searcher's and the report's studies: no lines
    init_ray(address)
    # The trial function only drives a TorchTrainer, whose workers reserve their own CPUs/GPUs. It asks for
    # no CPU at all (a token of memory, as Tune needs a non-empty request): even 0.01 CPU per trial would
    # leave 2 trials x 1-CPU workers unable to share a 2-CPU machine, and run them one after the other.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, out=str(out), tracking_uri=uri, parent_run_id=state["parent_run_id"],
                             workers=workers),
        tune.PlacementGroupFactory([{"memory": DRIVER_MEMORY}]))
    path = out / "ray_tune" / EXPERIMENT
    started = time.time()
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ResumeError(f"nothing to resume: no Tune experiment under {path}")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=tune_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=_search_alg(spec, base),
                                        scheduler=_scheduler(spec, base_cfg.train.steps),
                                        num_samples=spec.num_samples if spec.algorithm != "grid" else 1,
                                        max_concurrent_trials=spec.max_concurrent),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out / "ray_tune"),
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[TrialLines(spec.metric, spec.mode, spec.num_samples)] if progress else [],
                                      verbose=0))  # this project's lines (TrialLines), not Tune's status tables
    grid = tuner.fit()
    return write_results(grid, spec, base, base_cfg.train.steps, out, parent, time.time() - started)
