"""CLI commands of the `training` package (``train``, ``tune``), added to `metarestore` by `register(app)`.

Only typer at import time: heavy imports belong inside the command functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI "
                        "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")]
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML (see configs/).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set train.steps=50 "
                   "(repeatable; the value is YAML).")]


def train(
    config: ConfigOpt = Path("configs/demo.yaml"),
    local: Annotated[bool, typer.Option("--local", help="One process, no Ray (the reference implementation).")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray Train workers (default: distributed.workers).")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(min=0.0, help="GPUs per worker (0: CPU).")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto, ray://HOST:10001 or HOST:6379 "
                                                "(default: start a local Ray in this process).")] = None,
    tracking_uri: TrackingUri = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output folder.")] = False,
    resume_from: Annotated[Path | None, typer.Option("--resume-from", help="Continue from this checkpoint "
                                                     "folder (e.g. checkpoints/base-training), in a new MLflow "
                                                     "run (--local only).")] = None,
    init: Annotated[str | None, typer.Option("--init", help="Fine-tune from a model: base (the shipped "
                                             "model), builtin:NAME, models:/..., runs:/... or a folder. The "
                                             "network's shape comes from it.")] = None,
    set_: SetOpt = None,
    register: Annotated[bool, typer.Option(help="Register the final model in the MLflow Model Registry.")] = True,
) -> None:
    """Meta-train a restorer: Ray Train over family-sharded workers, or --local in one process."""
    from metarestore.config import load_config
    from metarestore.errors import UserError

    overrides = list(set_ or [])
    if init is not None:
        overrides.append(f"train.init={init if ':' in init or '/' in init else 'builtin:' + init}")
    cfg = load_config(config, overrides)
    if resume_from is not None and not local:
        raise UserError("--resume-from needs --local (Ray training resumes from its own storage with --resume)")
    if local:
        from metarestore.train_local import train_local

        info = train_local(cfg, tracking_uri=tracking_uri, resume=resume, register=register,
                           resume_from=resume_from)
    else:
        from training.driver import train_distributed

        info = train_distributed(cfg, workers=workers, gpus_per_worker=gpus_per_worker, address=address,
                                 tracking_uri=tracking_uri, resume=resume, register=register)
    typer.echo(f"checkpoint: {info['checkpoint']}")
    if info.get("model_uri"):
        typer.echo(f"registered: {info['model_uri']} (also models:/{info['model_name']}@latest)")
    typer.echo(f"MLflow run: {info['run_id']} at {info['tracking_uri']}")



def tune(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML with a search: section.")],
    out: Annotated[Path, typer.Option(help="Folder for trials.csv, best.yaml, plots and Tune state.")] = Path(
        "runs/search"),
    num_samples: Annotated[int | None, typer.Option(min=1, help="Trials (default: search.num_samples).")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="Trials at a time (default: "
                                                       "search.max_concurrent).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray Train workers per trial (default: "
                                                "distributed.workers).")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted search in --out; "
                                         "finished trials are not rerun.")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: a local Ray).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")] = None,
) -> None:
    """Search task weights, inner learning rates and other knobs with Ray Tune (Optuna TPE + ASHA)."""
    from training.tune import run_search
    from training.tune_report import format_summary

    summary = run_search(config, out, num_samples=num_samples, max_concurrent=max_concurrent,
                         tracking_uri=tracking_uri, resume=resume, address=address, workers=workers,
                         overrides=set_ or [])
    metric = summary["best"]
    typer.echo(format_summary(summary, "objective"))
    typer.echo(f"best: {metric['trial_id']} objective {metric['objective']:.4f} -> {summary['best_yaml']}")
    if summary.get("default"):
        default = summary["default"]
        typer.echo(f"default config: {default['trial_id']} objective {default['objective']:.4f} "
                   f"(step {default['last_step']})")
    typer.echo(f"trials: {summary['csv']} | plots: {', '.join(summary['plots'])} | "
               f"MLflow parent run {summary['parent_run_id']}")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the metarestore CLI."""
    app.command()(train)
    app.command()(tune)
