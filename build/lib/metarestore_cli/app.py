"""The Typer application and the one place that says which packages contribute commands.

Each module in ``COMMAND_MODULES`` has a ``register(app)`` that adds its commands. Those modules import
only typer (and light core modules) at load time, so that ``--help`` is instant; torch, Ray and MLflow
are imported inside the commands. User mistakes print one ``error:`` line and exit 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from metarestore.errors import UserError

# In --help order. A new package with commands adds its module here (and nothing else changes).
COMMAND_MODULES = (
    "metarestore_cli.core",  # families, degrade, restore, info, export
    "metarestore_cli.estimator",  # estimator estimate|train|report
    "training.commands",  # train, tune
    "serving.commands",  # serve, adapt
    "evaluation.commands",  # showcase, evaluate
    "cluster.commands",  # submit, jobs
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Meta-trained adaptable image restoration: train, tune, evaluate and serve.")

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main(argv: list[str] | None = None) -> None:
    """The ``metarestore`` entry point; ``argv`` (default: ``sys.argv[1:]``) lets tests run it in process."""
    try:
        app(args=argv)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
