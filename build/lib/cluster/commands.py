"""CLI commands of the `cluster` package, added to `metarestore` by `register(app)`:

    metarestore submit train|tune|evaluate --address http://HEAD:8265 [--follow] [-- ARGS...]
    metarestore jobs list|status|logs|stop

Only typer at import time: heavy imports belong inside the command functions.
"""

from __future__ import annotations

import datetime as _dt
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

Address = Annotated[str, typer.Option(
    "--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"], show_default=True,
    help="The cluster's Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else "
         f"{DEFAULT_ADDRESS}). The token for a cluster with token authentication is read from "
         "$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")]
JobId = Annotated[str, typer.Argument(help="The job's submission id (raysubmit_...), as printed by submit.")]


class JobCommand(StrEnum):
    train = "train"
    tune = "tune"
    evaluate = "evaluate"


def _when(ms: int | None) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _follow(client, job_id: str, url: str) -> None:
    """Stream the job's logs to the end; exit 1 unless it SUCCEEDED. Ctrl-C leaves the job running."""
    from cluster import jobs

    try:
        status = jobs.follow(client, job_id, write=lambda s: typer.echo(s, nl=False))
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; job {job_id} keeps running (metarestore jobs stop {job_id} "
                   f"--address {url})", err=True)
        raise typer.Exit(130) from None
    message = jobs.info(client, job_id).message
    typer.echo(f"job {job_id} {status}" + (f": {message.strip().splitlines()[-1]}" if
                                            status != "SUCCEEDED" and message else ""))
    if status != "SUCCEEDED":
        raise typer.Exit(1)


def submit(
    ctx: typer.Context,
    command: Annotated[JobCommand, typer.Argument(help="What the job runs: metarestore train, tune or evaluate.")],
    args: Annotated[list[str] | None, typer.Argument(
        help="Arguments for the command, after '--', e.g. -- --config configs/demo.yaml --workers 4. Paths "
             "inside the repository are relative to it; outputs should go to shared storage (absolute "
             "paths, s3://...).", show_default=False)] = None,
    address: Address = DEFAULT_ADDRESS,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the job's logs until it ends; exit 1 "
                                         "unless it SUCCEEDED.")] = False,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking URI for the job (set as $MLFLOW_TRACKING_URI on the cluster): "
                               "a tracking server reachable from the cluster, e.g. http://mlflow:5000.")] = None,
    working_dir: Annotated[Path | None, typer.Option(
        help="Source checkout uploaded as the job's working directory (default: this repository).")] = None,
    python: Annotated[str, typer.Option(help="The cluster's Python that runs the entrypoint.")] = "python",
    entrypoint_num_cpus: Annotated[float, typer.Option(
        min=0, help="CPUs reserved for the job's driver (0: it only coordinates; Ray Train workers reserve "
                    "their own).")] = 0,
) -> None:
    """Submit metarestore train, tune or evaluate to a Ray cluster as a Ray job (prints the job id)."""
    from cluster import jobs

    client = jobs.connect(address)
    jobs.quiet_sdk_logs()
    url = jobs.normalize_address(address)
    pass_through = list(args or [])
    warning = jobs.output_warning(command.value, pass_through)
    options = jobs.command_options(ctx.find_root().command, command.value)  # the running application's
    job_id = jobs.submit(client, command.value, pass_through, options=options, tracking_uri=tracking_uri,
                         working_dir=working_dir, python=python, entrypoint_num_cpus=entrypoint_num_cpus)
    if warning:
        typer.echo(warning, err=True)
    typer.echo(f"job id: {job_id}")
    typer.echo(f"dashboard: {url}/#/jobs/{job_id}")
    if not follow:
        typer.echo(f"logs: metarestore jobs logs {job_id} --follow --address {url}")
        return
    _follow(client, job_id, url)


def jobs_list(address: Address = DEFAULT_ADDRESS) -> None:
    """List the jobs submitted to the cluster, oldest first."""
    from cluster import jobs

    found = jobs.list_jobs(jobs.connect(address))
    if not found:
        typer.echo("no jobs")
        return
    typer.echo(f"{'SUBMISSION ID':<30} {'STATUS':<10} {'STARTED':<20} ENTRYPOINT")
    for job in found:
        typer.echo(f"{job.submission_id:<30} {str(job.status):<10} {_when(job.start_time):<20} {job.entrypoint}")


def jobs_status(job_id: JobId, address: Address = DEFAULT_ADDRESS) -> None:
    """Show a job's status, entrypoint, times and, when it failed, why."""
    from cluster import jobs

    info = jobs.info(jobs.connect(address), job_id)
    typer.echo(f"{job_id}: {info.status}")
    typer.echo(f"entrypoint: {info.entrypoint}")
    typer.echo(f"started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
    if info.message:
        typer.echo(f"message: {info.message.strip()}")
    if getattr(info, "driver_exit_code", None) is not None:
        typer.echo(f"exit code: {info.driver_exit_code}")


def jobs_logs(job_id: JobId, address: Address = DEFAULT_ADDRESS,
              follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job "
                                                   "ends.")] = False) -> None:
    """Print a job's output (stdout and stderr of its entrypoint)."""
    from cluster import jobs

    client = jobs.connect(address)
    jobs.quiet_sdk_logs()
    if follow:
        _follow(client, job_id, jobs.normalize_address(address))
    else:
        typer.echo(jobs.logs(client, job_id), nl=False)


def jobs_stop(job_id: JobId, address: Address = DEFAULT_ADDRESS) -> None:
    """Stop a running job (its Ray Train workers and trials go with it)."""
    from cluster import jobs

    sent, status = jobs.stop(jobs.connect(address), job_id)
    typer.echo(f"{job_id}: {'stop requested; now ' if sent else 'already '}{status}")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the metarestore CLI."""
    app.command("submit", epilog="Example: metarestore submit train --address http://HEAD:8265 --follow -- "
                "--config configs/demo.yaml --workers 4 --tracking-uri http://mlflow:5000 "
                "--set train.output_dir=/mnt/shared/runs/demo --set distributed.storage_path=/mnt/shared/ray")(submit)
    jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster: list, status, logs, stop.")
    jobs_app.command("list")(jobs_list)
    jobs_app.command("status")(jobs_status)
    jobs_app.command("logs")(jobs_logs)
    jobs_app.command("stop")(jobs_stop)
    app.add_typer(jobs_app, name="jobs")
