"""CLI commands of the `evaluation` package (``showcase``, ``evaluate``), added to `metarestore` by `register(app)`.

Only typer at import time: heavy imports belong inside the command functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metarestore.errors import UserError

PROTOCOL_NAMES = "cbsd68-awgn, kodak24-awgn, live1-classic5-jpeg, set5-set14-sr"  # listed here: --help stays light
BASELINE_NAMES = ("bm3d, wiener, richardson_lucy, median, tv, unsharp, gamma, clahe, gray_world, stretch, "
                  "dark_channel, biharmonic")


def _numbers(text: str, flag: str, kind: type) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated {'integers' if kind is int else 'numbers'}, "
                        f"got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def showcase(
    model: Annotated[str, typer.Option(help="builtin:base (the default), a checkpoint directory or an MLflow "
                                       "model URI.")] = "builtin:base",
    out: Annotated[Path, typer.Option(help="Folder for showcase.png.")] = Path("runs/showcase"),
    severity: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.5,
    shots: Annotated[int, typer.Option(min=1, max=16, help="Support pairs for held-out families.")] = 4,
    steps: Annotated[int, typer.Option(min=0, max=50, help="Gradient steps of a held-out family's adapter, if "
                                       "its path adapts the restorer (a server's default: 10).")] = 10,
    data: Annotated[str, typer.Option(help="Images: 'embedded' (scikit-image's samples; the validation split "
                                      "restored, the training split as support pairs), 'model' (the model's "
                                      "own validation and training folders) or a folder (both from it).")] = "embedded",
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: "
                                                     "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")] = None,
) -> None:
    """Restore held-out images for every family and print PSNR before and after (``make demo``)."""
    from evaluation.showcase import format_rows
    from evaluation.showcase import showcase as run_showcase
    from metarestore.hub import load_model

    learner, metadata, _ = load_model(model, tracking_uri)
    rows = run_showcase(learner, metadata, out, severity=severity, shots=shots, steps=steps, data=data)
    typer.echo(format_rows(rows))
    typer.echo(f"grid: {out / 'showcase.png'}")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the metarestore CLI."""
    app.command()(showcase)

    @app.command(context_settings={"allow_extra_args": True})
    def evaluate(
        ctx: typer.Context,
        model: Annotated[str, typer.Option(help="Model under test: builtin:base (the default), a checkpoint "
                                           "directory, models:/NAME@ALIAS, models:/NAME/VERSION or "
                                           "runs:/RUN_ID/PATH.")] = "builtin:base",
        data: Annotated[list[str] | None, typer.Option(
            "--data", metavar="DIR", help="Image folder(s) or 'embedded' (scikit-image validation samples): --data A B, "
                           "--data A --data B or --data A,B. Default: embedded.")] = None,
        families: Annotated[str | None, typer.Option(help="Comma-separated families (or chains a+b); 'all' for "
                                                     "every family. Default: the model's trained and held-out "
                                                     "families.")] = None,
        severities: Annotated[str, typer.Option(help="Comma-separated severities in [0, 1].")] = "0.5",
        shots: Annotated[str, typer.Option(help="Support pairs for adaptation; 0 = zero-shot.")] = "0,5",
        steps: Annotated[str, typer.Option(help="adapt() steps for every shots > 0 (0 = zero-shot).")] = "0,1,5",
        baselines: Annotated[str, typer.Option(help=f"Classical baselines: all, none, or names ({BASELINE_NAMES}); "
                                               "each runs on the families it applies to.")] = "all",
        protocol: Annotated[str | None, typer.Option(help=f"A standard protocol ({PROTOCOL_NAMES}): fixed "
                                                     "levels, full images, measured as published tables "
                                                     "are; --data must name its datasets.")] = None,
        specialist_from: Annotated[str | None, typer.Option(help="A multitask model fine-tuned with the same "
                                                            "shots and steps (the 'specialist' rows).")] = None,
        compare: Annotated[str | None, typer.Option(help="A second model evaluated the same way, labelled by "
                                                    "its name.")] = None,
        crop: Annotated[int | None, typer.Option(min=0, help="Centre-crop images to this size (0: full images). "
                                                 "Default 256, full images for protocols.")] = None,
        support_size: Annotated[int, typer.Option(min=16, help="Side of the support patches (px).")] = 96,
        limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N images of each "
                                                  "dataset (all still serve as support).")] = None,
        seed: Annotated[int, typer.Option(help="Base seed of every degradation and support draw.")] = 0,
        out: Annotated[Path, typer.Option(help="Output folder (results.csv, summary.md, report.html, "
                                          "plots/, examples/).")] = Path("runs/eval"),
        tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: "
                                                         "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")] = None,
        experiment: Annotated[str, typer.Option(help="MLflow experiment of the evaluation run.")] = "metarestore-eval",
        track: Annotated[bool, typer.Option("--track/--no-track", help="Log an MLflow evaluation run.")] = True,
        address: Annotated[str | None, typer.Option(help="Ray cluster (auto, ray://HOST:10001, HOST:6379); "
                                                    "default: a local Ray in this process.")] = None,
        cpus_per_task: Annotated[float, typer.Option(min=0.1, help="CPUs per Ray task.")] = 1.0,
        gpus_per_task: Annotated[float, typer.Option(min=0.0, help="GPUs per Ray task (0: CPU).")] = 0.0,
        examples: Annotated[int, typer.Option(min=0, help="Images per dataset shown in the example grids.")] = 1,
        adapter: Annotated[str, typer.Option(help="How the adapted rows adapt: own (adapt() with the learner's "
                                             "own adapter kind: FiLM or LoRA; 'film' is an accepted alias) or "
                                             "auto (the adapter a server with default settings fits for "
                                             "path=auto: operator fits, FiLM, LoRA).")] = "own",
        told: Annotated[bool, typer.Option("--told/--blind", help="Name each condition's family to a model that "
                                           "can be told the degradation (rows 'model (told)'); others stay "
                                           "blind: estimated, then what was found undone, as `restore` does "
                                           "by default (a clean verdict leaves the image as it is).")] = False,
        ensemble: Annotated[bool, typer.Option("--ensemble", help="Restore with the x8 self-ensemble (the mean "
                                               "over eight rotations and flips; rows 'model x8'): 8x the time.")] = False,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar.")] = True,
    ) -> None:
        """Evaluate a model against classical baselines on benchmark images, with few-shot adaptation curves.

        Every method sees the same seeded degraded inputs. Writes results.csv (one row per image, condition, method, shots and steps), summary.md, report.html with plots and example grids under --out, and logs an MLflow evaluation run naming the model version.
        """  # noqa: E501 (one line: typer keeps docstring line breaks)
        import shlex
        import sys

        from evaluation.runner import Request
        from evaluation.runner import evaluate as run_evaluation

        specs = [part for item in [*(data or []), *ctx.args] for part in item.split(",") if part]
        wanted_families = None
        if families:
            wanted_families = [f.strip() for f in families.split(",") if f.strip()]
            if wanted_families == ["all"]:
                from metarestore import degradations

                wanted_families = degradations.names()
        request = Request(
            model=model, data=specs, families=wanted_families,
            severities=_numbers(severities, "--severities", float), shots=_numbers(shots, "--shots", int),
            steps=_numbers(steps, "--steps", int), baselines=baselines, protocol=protocol,
            specialist_from=specialist_from, compare=compare, crop=crop, support_size=support_size, limit=limit,
            seed=seed, out=out, tracking_uri=tracking_uri, experiment=experiment, track=track, address=address,
            cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task, examples=examples, told=told, adapter=adapter,
            ensemble=ensemble, progress=progress,
            command="metarestore " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        result = run_evaluation(request)
        from evaluation.report import markdown_table, methods_table, summarize

        typer.echo(markdown_table(methods_table(summarize(result.results))))
        for note in result.notes:
            typer.echo(f"note: {note}")
        typer.echo(f"results: {result.files['results']} ({len(result.results)} rows)")
        typer.echo(f"report: {result.files['report']}")
        if result.run_id:
            typer.echo(f"MLflow run: {result.run_id}")
