"""The core's commands (families, degrade, restore, info, export), added to ``metarestore`` by ``register(app)``.

They live here, not in ``metarestore/``, because the core has no command line; ``restore --endpoint`` also
reaches the serving client. Heavy imports happen inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI "
                        "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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
    if reason := degradations.not_an_image_family(family):
        fail(reason)  # the file would hold the clipped values: another family's output
    clean, grey = read_image(image)
    x = clean[None].float() / 255
    params = fam.sample(severity, cpu_generator(seed))
    y = fam(x, params)
    write_image(output, y, grey=grey)
    typer.echo(f"{output}: {fam.name} severity {severity:g} | PSNR {psnr(y, x):.2f} dB | params {json.dumps(params)}")


def restore(
    image: Annotated[Path, typer.Argument(help="Degraded input image.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the restored image.")],
    model: Annotated[str | None, typer.Option(help="The model: builtin:base (the default), a checkpoint directory, "
                                              "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="A metarestore server URL instead of a local model.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter id (with --endpoint).")] = None,
    token: Annotated[str | None, typer.Option(envvar="METARESTORE_TOKEN", help="Bearer token for --endpoint.")] = None,
    tracking_uri: TrackingUri = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    tile: Annotated[int, typer.Option(min=64, help="Tile size for large images (256: the fastest on CPU; "
                                      "larger on a GPU).")] = 256,
    degradation: Annotated[str | None, typer.Option(help="What happened to the image (e.g. jpeg, gaussian_blur), "
                                                    "for a model that can be told it (`metarestore info`: "
                                                    "degradations); default: blind, estimated from the image "
                                                    "and its file (`found:` says what; a clean photo is left "
                                                    "as it is).")] = None,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="Restore as the mean over the image's eight "
                                           "rotations and flips: 8x the time, a little better (local model).")] = False,
) -> None:
    """Restore an image with a local model or through a running server."""
    if model is not None and endpoint is not None:
        fail("give --model or --endpoint, not both")
    if ensemble and endpoint is not None:
        fail("--ensemble needs a local model, not --endpoint")
    if endpoint is not None:
        from serving.client import RestorerClient

        client = RestorerClient(endpoint, token=token)
        info = client.restore_file(image, output, adapter=adapter, degradation=degradation)
        if info.get("found"):
            undone = info.get("restored_as") or "none"
            typer.echo(f"found: {info['found']}" + ("; left as it is" if undone == "none" else
                                                    f"; undid {' then '.join(undone.split(','))}"))
        typer.echo(f"{output}: restored by {endpoint} (model version {info.get('model_version')}, "
                   f"adapter {info.get('adapter') or '-'})")
        return
    if adapter is not None:
        fail("--adapter needs --endpoint (adapters live on the server)")
    from metarestore.data import read_image, write_image
    from metarestore.degradations import not_an_image_family
    from metarestore.engine import resolve_device
    from metarestore.hub import DEFAULT_MODEL, load_model
    from metarestore.inference import restore_image

    dev = resolve_device(device)
    clean, grey = read_image(image)
    learner, metadata, ref = load_model(model or DEFAULT_MODEL, tracking_uri, dev)
    try:
        learner.hint(degradation)
    except ValueError as exc:
        fail(str(exc))
    if degradation and (reason := not_an_image_family(degradation)):
        fail(reason)
    x = clean[None].float().div(255).to(dev)
    if degradation:
        y = restore_image(learner, x, tile=tile, family=degradation, ensemble=ensemble)
        how = f", told {degradation}"
    else:  # blind: what the estimator finds is undone, or the image is left as it is
        from metarestore.estimator import load_estimator
        from metarestore.inference import restore_estimated

        estimate = load_estimator(device=dev)(x, image.read_bytes())
        typer.echo(f"found: {estimate.summary()}")
        y, steps = restore_estimated(learner, x, estimate, tile=tile, ensemble=ensemble)
        how = (", blind: undid " + " then ".join(map(str, steps)) if steps
               else ", blind: nothing to undo, left as it is")
    write_image(output, y, grey=grey)
    version = f" version {ref.version}" if ref.version else ""
    how += ", x8 ensemble" if ensemble else ""
    typer.echo(f"{output}: restored with {ref.name or ref.path}{version} ({metadata['algorithm']}, step "
               f"{metadata['step']}{how})")


def info(model: Annotated[str, typer.Argument(help="builtin:base, a checkpoint directory or an MLflow model "
                                               "URI.")] = "builtin:base",
         tracking_uri: TrackingUri = None) -> None:
    """Show a model's metadata: families, algorithm, inner learning rates, parameter counts."""
    from metarestore.hub import read_metadata, resolve

    ref = resolve(model, tracking_uri)
    meta = read_metadata(ref.path)
    shown = {k: meta[k] for k in ("name", "algorithm", "adapt", "families", "inner_lr", "inner_steps", "step",
                                  "parameters", "adaptable_parameters", "versions") if k in meta}
    from metarestore.degradations import image_families

    told = image_families(meta.get("config", {}).get("model", {}).get("hint_families") or [])
    if told:
        shown["degradations"] = told  # what `restore --degradation` may name
    shown["path"] = str(ref.path)
    if ref.version:
        shown["registered"] = f"{ref.name}/{ref.version}"
    typer.echo(json.dumps(shown, indent=1))


def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write (.onnx, .pt).")],
    model: Annotated[str, typer.Option(help="builtin:base (the default), a checkpoint directory or an MLflow "
                                       "model URI.")] = "builtin:base",
    format: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    adapter: Annotated[str | None, typer.Option(help="Adapter merged into the weights: a file (safetensors) or "
                                                "the ID of an adapter the server stored (see --adapter-dir). "
                                                "Paths with an operator step (deconv, tone, haze) cannot be "
                                                "merged.")] = None,
    adapter_dir: Annotated[str | None, typer.Option(help="Where the server stores adapters (a directory or an "
                                                    "fsspec URI; default ~/.cache/metarestore/adapters, the "
                                                    "server's default).")] = None,
    tracking_uri: TrackingUri = None,
    degradation: Annotated[str | None, typer.Option(help="Export the model told this degradation (a model that "
                                                    "can be told it; a told:F adapter sets it). Default: "
                                                    "blind.")] = None,
) -> None:
    """Export the model (an adapter merged in) to ONNX or TorchScript, with dynamic batch, height and width."""
    from metarestore.export import export as run_export

    info = run_export(model, format, output, adapter=adapter, tracking_uri=tracking_uri, adapter_dir=adapter_dir,
                      degradation=degradation)
    typer.echo(f"{info['path']}: {info['format']}, {info['bytes'] / 2**20:.1f} MiB; input '{info['input']}' "
               f"(N, 3, H, W) float32 in [0, 1], H and W >= {info['min_size']}; output '{info['output']}'")


def register(app: typer.Typer) -> None:
    """Add the core's commands to the metarestore CLI."""
    for command in (families, degrade, restore, info, export):
        app.command()(command)
