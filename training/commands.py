"""CLI commands of the `training` package (``tune``), added to `metarestore` by `register(app)`.

Only typer at import time: heavy imports belong inside the command functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


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
    app.command()(tune)
