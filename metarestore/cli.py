"""The ``metarestore`` command. Heavy imports (torch, Ray, MLflow) happen inside commands so that
``--help`` is instant; user mistakes print one ``error:`` line and exit 2, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from metarestore.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Meta-trained adaptable image restoration: train, tune, evaluate and serve.")

TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI "
                        "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")]
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML (see configs/).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set train.steps=50 "
                   "(repeatable; the value is YAML).")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def families(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """List the degradation families with their parameters and ranges."""
    from metarestore import degradations

    described = [degradations.get(name).describe() for name in degradations.names()]
    if as_json:
        typer.echo(json.dumps(described, indent=1))
        return
    for family in described:
        typer.echo(f"{family['name']:<15} {family['description']}")
        for key, spec in family["params"].items():
            typer.echo(f"{'':<17}{key:<12} {spec['min']:g} .. {spec['max']:g}   {spec['description']}")


@app.command()
def degrade(
    image: Annotated[Path, typer.Argument(help="Input image (PNG, JPEG, BMP, TIFF).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the degraded image.")],
    family: Annotated[str, typer.Option("--family", "-f", help="Family name, or a chain such as gaussian_blur+jpeg.")],
    severity: Annotated[float, typer.Option(min=0.0, max=1.0, help="0 (mild) to 1 (strong).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed for the sampled parameters and noise.")] = 0,
) -> None:
    """Apply one degradation family to an image."""
    from metarestore import degradations
    from metarestore.data import read_image, write_image
    from metarestore.degradations.base import cpu_generator
    from metarestore.meta import psnr

    fam = degradations.get(family)
    clean, grey = read_image(image)
    x = clean[None].float() / 255
    params = fam.sample(severity, cpu_generator(seed))
    y = fam(x, params)
    write_image(output, y, grey=grey)
    typer.echo(f"{output}: {fam.name} severity {severity:g} | PSNR {psnr(y, x):.2f} dB | params {json.dumps(params)}")


@app.command()
def train(
    config: ConfigOpt = Path("configs/demo.yaml"),
    local: Annotated[bool, typer.Option("--local", help="One process, no Ray (the reference implementation).")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray Train workers (default: distributed.workers).")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(min=0.0, help="GPUs per worker (0: CPU).")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto, ray://HOST:10001 or HOST:6379 "
                                                "(default: start a local Ray in this process).")] = None,
    tracking_uri: TrackingUri = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output folder.")] = False,
    set_: SetOpt = None,
    register: Annotated[bool, typer.Option(help="Register the final model in the MLflow Model Registry.")] = True,
) -> None:
    """Meta-train a restorer: Ray Train over family-sharded workers, or --local in one process."""
    from metarestore.config import load_config

    cfg = load_config(config, set_ or [])
    if local:
        from metarestore.train_local import train_local

        info = train_local(cfg, tracking_uri=tracking_uri, resume=resume, register=register)
    else:
        from training.driver import train_distributed

        info = train_distributed(cfg, workers=workers, gpus_per_worker=gpus_per_worker, address=address,
                                 tracking_uri=tracking_uri, resume=resume, register=register)
    typer.echo(f"checkpoint: {info['checkpoint']}")
    if info.get("model_uri"):
        typer.echo(f"registered: {info['model_uri']} (also models:/{info['model_name']}@latest)")
    typer.echo(f"MLflow run: {info['run_id']} at {info['tracking_uri']}")


@app.command()
def restore(
    image: Annotated[Path, typer.Argument(help="Degraded input image.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the restored image.")],
    model: Annotated[str | None, typer.Option(help="Checkpoint directory, models:/NAME@ALIAS, models:/NAME/VERSION "
                                              "or runs:/RUN_ID/PATH.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="A metarestore server URL instead of a local model.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter id (with --endpoint).")] = None,
    token: Annotated[str | None, typer.Option(envvar="METARESTORE_TOKEN", help="Bearer token for --endpoint.")] = None,
    tracking_uri: TrackingUri = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    tile: Annotated[int, typer.Option(min=64, help="Tile size for large images.")] = 512,
) -> None:
    """Restore an image with a local model or through a running server."""
    if (model is None) == (endpoint is None):
        fail("give exactly one of --model or --endpoint")
    if endpoint is not None:
        from serving.client import RestorerClient

        client = RestorerClient(endpoint, token=token)
        info = client.restore_file(image, output, adapter=adapter)
        typer.echo(f"{output}: restored by {endpoint} (model version {info.get('model_version')}, "
                   f"adapter {info.get('adapter') or '-'})")
        return
    if adapter is not None:
        fail("--adapter needs --endpoint (adapters live on the server)")
    from metarestore.data import read_image, write_image
    from metarestore.engine import resolve_device
    from metarestore.hub import load_model
    from metarestore.inference import restore_image

    dev = resolve_device(device)
    clean, grey = read_image(image)
    learner, metadata, ref = load_model(model, tracking_uri, dev)
    y = restore_image(learner, clean[None].float().div(255).to(dev), tile=tile)
    write_image(output, y, grey=grey)
    version = f" version {ref.version}" if ref.version else ""
    typer.echo(f"{output}: restored with {ref.name or ref.path}{version} ({metadata['algorithm']}, step {metadata['step']})")


@app.command()
def info(model: Annotated[str, typer.Argument(help="Checkpoint directory or MLflow model URI.")],
         tracking_uri: TrackingUri = None) -> None:
    """Show a model's metadata: families, algorithm, inner learning rates, parameter counts."""
    from metarestore.hub import read_metadata, resolve

    ref = resolve(model, tracking_uri)
    meta = read_metadata(ref.path)
    shown = {k: meta[k] for k in ("name", "algorithm", "adapt", "families", "inner_lr", "inner_steps", "step",
                                  "parameters", "adaptable_parameters", "versions") if k in meta}
    shown["path"] = str(ref.path)
    if ref.version:
        shown["registered"] = f"{ref.name}/{ref.version}"
    typer.echo(json.dumps(shown, indent=1))


@app.command()
def showcase(
    model: Annotated[str, typer.Option(help="Checkpoint directory or MLflow model URI.")],
    out: Annotated[Path, typer.Option(help="Folder for showcase.png.")] = Path("runs/showcase"),
    severity: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.5,
    shots: Annotated[int, typer.Option(min=1, max=16, help="Support pairs for held-out families.")] = 4,
    steps: Annotated[int, typer.Option(min=0, max=50, help="adapt() steps for held-out families.")] = 5,
    tracking_uri: TrackingUri = None,
) -> None:
    """Restore held-out images for every family and print PSNR before and after (``make demo``)."""
    from evaluation.showcase import format_rows
    from evaluation.showcase import showcase as run_showcase
    from metarestore.hub import load_model

    learner, metadata, _ = load_model(model, tracking_uri)
    rows = run_showcase(learner, metadata, out, severity=severity, shots=shots, steps=steps)
    typer.echo(format_rows(rows))
    typer.echo(f"grid: {out / 'showcase.png'}")


@app.command()
def export(
    model: Annotated[str, typer.Option(help="Checkpoint directory or MLflow model URI.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write (.onnx, .pt).")],
    format: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    adapter: Annotated[Path | None, typer.Option(help="Adapter file (safetensors deltas) merged into the weights.")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Export the model (an adapter merged in) to ONNX or TorchScript, with dynamic batch, height and width."""
    from metarestore.export import export as run_export

    info = run_export(model, format, output, adapter=adapter, tracking_uri=tracking_uri)
    typer.echo(f"{info['path']}: {info['format']}, {info['bytes'] / 2**20:.1f} MiB; input '{info['input']}' "
               f"(N, 3, H, W) float32 in [0, 1], H and W >= {info['min_size']}; output '{info['output']}'")


def _register_packages() -> None:
    """training (tune), serving (serve, adapt), evaluation (evaluate) and cluster (submit, jobs) commands."""
    from cluster.commands import register as register_cluster
    from evaluation.commands import register as register_evaluation
    from serving.commands import register as register_serving
    from training.commands import register as register_training

    for register in (register_training, register_serving, register_evaluation, register_cluster):
        register(app)


_register_packages()


def main() -> None:
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
