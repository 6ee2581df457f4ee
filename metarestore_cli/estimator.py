"""``metarestore estimator``: what the degradation estimator finds in an image, how to train it, and its
confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

group = typer.Typer(no_args_is_help=True, help="The degradation estimator behind blind restoration: estimate, "
                    "train, report.")


@group.command()
def estimate(
    image: Annotated[Path, typer.Argument(help="An image file (a JPEG file's quantization tables count too).")],
    estimator: Annotated[str | None, typer.Option(help="Estimator checkpoint directory (default: the shipped "
                                                  "one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Every label's probability and severity.")] = False,
) -> None:
    """What happened to an image: the families found (with probability and strength), or clean, and its
    noise level."""
    from metarestore.data import read_image
    from metarestore.estimator import load_estimator

    x = read_image(image)[0].float() / 255
    found = load_estimator(estimator)(x, image.read_bytes(), noise=True)
    typer.echo(json.dumps(found.as_dict(), indent=1) if as_json else f"{image}: {found.summary()}")


@group.command()
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint directory (overwritten as it goes; resumable).")] =
        Path("runs/estimator"),
    data: Annotated[str, typer.Option(help="A folder of clean photos, or 'embedded'.")] =
        "../shared/data/train/CBSD432",
    steps: Annotated[int, typer.Option(min=1)] = 6000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(min=0)] = 2e-3,
    seed: int = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out's checkpoint.")] = False,
    spectral_bins: Annotated[int, typer.Option(min=0, help="Rings of the radial power spectrum fed to the head "
                                               "(0: none, as the shipped estimator).")] = 0,
) -> None:
    """Train the estimator on crops of clean photos degraded by the registry: clean, one family, or a chain."""
    from metarestore.estimator.train import train_estimator

    path = train_estimator(data, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, resume=resume,
                           spectral_bins=spectral_bins)
    typer.echo(f"estimator: {path} (publish: python -m metarestore.checkpoint publish {path} "
               "metarestore/estimator/weights)")


@group.command()
def report(
    data: Annotated[str, typer.Option(help="A folder of clean photos the estimator never trained on.")] =
        "../shared/data/test/CBSD68",
    estimator: Annotated[str | None, typer.Option(help="Estimator checkpoint (default: the shipped one).")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many images.")] = None,
    crop: Annotated[int, typer.Option(min=32)] = 256,
    out: Annotated[Path, typer.Option(help="Where report.md and confusion.png go.")] = Path("runs/estimator-report"),
) -> None:
    """The confusion matrix at severities 0.25 / 0.5 / 0.75 (clean included), chains, calibration."""
    from evaluation.estimator_report import plot, run
    from metarestore.data.images import load_images
    from metarestore.estimator import load_estimator

    images = load_images(data).images[:limit]
    result = run(load_estimator(estimator), images, crop=crop)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{len(images)} images of {data}, centre crops of {crop} px", ""]
    for severity in result.matrices:
        lines += [f"severity {severity}: {100 * result.accuracy(severity):.1f}% right, clean photos left clean "
                  f"{100 * result.clean_kept(severity):.0f}% (rows: true; columns: found; % of the row)", "",
                  result.markdown(severity), ""]
    lines += ["chains at severity 0.5, found exactly: " + ", ".join(
        f"{name} {exact}/{total}" for name, (exact, total) in result.chains.items()),
        f"expected calibration error over every label's probability: {result.expected_calibration_error():.3f}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(result, out / "confusion.png")
    typer.echo("\n".join(lines))
    typer.echo(f"report: {out / 'report.md'}, plot: {out / 'confusion.png'}")


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="estimator")
