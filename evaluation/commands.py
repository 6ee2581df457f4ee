"""CLI commands of the `evaluation` package, added to `metarestore` by `register(app)`.

Only typer at import time: heavy imports belong inside the command functions.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the metarestore CLI."""
