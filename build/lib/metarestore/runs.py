"""The life of one tracked run, the same for ``train --local``, ``train`` on Ray and ``tune``:
resolve and check the tracking store, put an old output folder aside, open (or reopen) the MLflow run,
and close it FINISHED, FAILED or KILLED (Ctrl-C) however the body ends."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metarestore.tracking import RunLogger, check_reachable, resolve_uri


def open_store(uri: str | None) -> str:
    """The resolved tracking URI, once the store answers: a down server is a clear error before any work.
    Resolving an already resolved URI returns it unchanged, so callers may check early and pass it on."""
    resolved = resolve_uri(uri)
    check_reachable(resolved)
    return resolved


def archive_existing(out_dir: Path) -> Path | None:
    """A fresh run never overwrites an old one: an existing output folder is renamed aside (BasicSR)."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    archived = out_dir.with_name(f"{out_dir.name}_archived_{time.strftime('%Y%m%d_%H%M%S')}")
    out_dir.rename(archived)
    print(f"previous output moved to {archived}", flush=True)
    return archived


@contextmanager
def tracked_run(uri: str | None, experiment: str, run_name: str, *, run_id: str | None = None,
                parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                params: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
                archive: Path | None = None) -> Iterator[RunLogger]:
    """Open the run (``run_id``: reopen it, as a resumed run does) and yield its logger.

    ``archive``: an output folder to put aside first (a fresh run only). ``params`` (or a function that
    returns them) are logged when the run is new. The run ends FINISHED when the body returns, KILLED on
    Ctrl-C and FAILED on any other exception, which propagates.
    """
    uri = open_store(uri)
    if archive is not None and run_id is None:
        archive_existing(archive)
    logger = RunLogger(uri, experiment, run_name, run_id=run_id, parent_run_id=parent_run_id, tags=tags)
    try:
        if logger.run_id != run_id and params is not None:  # a new run (also when run_id is not in this store)
            logger.params(params() if callable(params) else params)
        yield logger
    except BaseException as exc:
        logger.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    logger.finish()
