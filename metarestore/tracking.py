"""MLflow tracking: the URI, a run logger that survives server outages, model registration.

Only one process per run logs (rank 0). A tracking server that is down *at start* is a clear error
within seconds (``check_reachable``); one that goes down *mid-run* only produces a warning: failed
calls are queued and retried on the next call and at the end, so training never dies of it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from metarestore.errors import UserError

log = logging.getLogger(__name__)
# a new sqlite store's schema set-up ("Creating initial MLflow database tables...", alembic's migrations) is
# MLflow's business, not a line the user waits for
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

DEFAULT_URI = "sqlite:///mlflow.db"
MLFLOW_REGISTRY_LINES = ("Successfully registered model", "Registered model", "Created version")
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


_NOT_IN_A_KEY = re.compile(r"[^\w\-. /]")  # MLflow's keys: alphanumerics, _ - . space /


def mlflow_key(name: str) -> str:
    """``name`` as an MLflow param or metric key: a chain's ``+`` (``gaussian_noise+jpeg``, noise then JPEG)
    reads ``_then_``, anything else MLflow refuses ``_``; a refused key would fail its whole batch."""
    return _NOT_IN_A_KEY.sub("_", name.replace("+", "_then_"))


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used (server down, bad URI)."""


def resolve_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; sqlite and file paths made
    absolute so that Ray workers (which run in another directory) write to the same store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and path != ":memory:":
            return f"sqlite:///{Path(path).resolve()}"
    elif parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri).resolve().as_uri()
    return uri


def artifact_root(uri: str) -> str | None:
    """Where a local store keeps artifacts: ``mlruns/`` beside the sqlite file (not the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


@contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """Point MLflow's tracking and registry URIs at ``uri`` for a block, then restore them.

    Some MLflow calls (``start_run``, ``log_model``, ``download_artifacts``) only read the process-global
    URIs, and setting them also exports ``MLFLOW_*_URI`` to the environment: left behind, they would send a
    later client in this process, or a subprocess it starts, to the wrong store.
    """
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        _model_registry.utils._registry_uri = saved[1]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fail_fast_http() -> None:
    """No MLflow-internal HTTP retries: an outage would block each call for minutes. RunLogger queues
    failed calls and retries them itself, without stalling training."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless the tracking store answers (checked before any Ray work)."""
    import requests

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as exc:
            raise TrackingError(f"MLflow tracking server {uri} is not reachable ({exc.__class__.__name__}); "
                                "start it or pass another --tracking-uri") from None
        if response.status_code != 200:
            raise TrackingError(f"MLflow tracking server {uri} answered {response.status_code} on /health")
    elif parsed.scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow sqlite store folder does not exist: {folder}")
    elif parsed.scheme not in ("file", "databricks", "postgresql", "mysql", "mssql"):
        raise TrackingError(f"unsupported tracking URI {uri!r}")


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def get_or_create_experiment(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


class RunLogger:
    """One MLflow run. Calls that fail (server outage) are queued, warned about, and retried later."""

    def __init__(self, uri: str | None, experiment: str, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None):
        from mlflow.tracking import MlflowClient

        fail_fast_http()
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = get_or_create_experiment(self.client, experiment, self.uri)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            run_id = run.info.run_id
        elif not self._reopen(run_id):  # resumed against another store (a checkpoint from another machine)
            print(f"note: MLflow run {run_id} is not in {self.uri}: logging to a new run", flush=True)
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
        self.run_id = run_id
        self.pending: deque[Callable[[], Any]] = deque()
        self.outage_warned = False

    def _reopen(self, run_id: str) -> bool:
        """Mark ``run_id`` running again; False when this store has no such run (other errors propagate)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return False
        return True

    def _call(self, fn: Callable[[], Any]) -> None:
        self.pending.append(fn)
        self.flush()

    def flush(self) -> bool:
        """Send queued calls in order; stop at the first failure (kept for later). True when empty."""
        while self.pending:
            try:
                self.pending[0]()
            except Exception as exc:  # noqa: BLE001 - any transport error means "try later"
                if getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
                    warnings.warn(f"MLflow refused a logging call, dropped: {str(exc)[:200]}", stacklevel=3)
                    self.pending.popleft()  # the store refuses it for good: retrying would block the rest
                    continue
                if not self.outage_warned:
                    warnings.warn(f"MLflow logging failed ({exc.__class__.__name__}: {str(exc)[:200]}); "
                                  "training continues and logging will be retried", stacklevel=3)
                    self.outage_warned = True
                return False
            self.pending.popleft()
        if self.outage_warned:
            log.warning("MLflow logging recovered")
            self.outage_warned = False
        return True

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i:i + 100]
            self._call(lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(mlflow_key(k), float(v), stamp, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            chunk = items[i:i + 500]
            self._call(lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(lambda: self.client.log_batch(self.run_id, tags=items))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._call(lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, status: str = "FINISHED", retries: int = 3, wait_s: float = 2.0) -> bool:
        """Flush what is queued (a few tries) and close the run; False if something could not be sent."""
        for attempt in range(retries):
            if self.flush():
                break
            time.sleep(wait_s * (attempt + 1))
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"could not close MLflow run {self.run_id}: {exc}", stacklevel=2)
            return False
        return not self.pending


def register_checkpoint(uri: str | None, run_id: str, checkpoint_dir: str | Path, model_name: str) -> str:
    """Log the checkpoint as an MLflow models-from-code pyfunc in ``run_id`` and register a new version.

    The pyfunc loads the safetensors checkpoint (no pickle). MLflow resolves ``models:/NAME@latest`` to
    the newest version by itself (``latest`` is reserved), so the new version is ``@latest`` at once.
    Returns the version number.
    """
    import mlflow

    fail_fast_http()
    uri = resolve_uri(uri)
    # the console is ours: "Failed to infer model signature" (images of any size have none to infer), and the
    # registry's lines MLflow prints (MLFLOW_REGISTRY_LINES), which the caller's "registered: models:/..." says
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    printed = io.StringIO()
    try:
        with mlflow_uris(uri), mlflow.start_run(run_id=run_id), redirect_stderr(printed):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), artifacts={"checkpoint": str(checkpoint_dir)},
                pip_requirements=["metarestore", "torch", "safetensors"], registered_model_name=model_name,
                await_registration_for=60)
    finally:
        pyfunc_log.setLevel(level)
        sys.stderr.writelines(line for line in printed.getvalue().splitlines(keepends=True)
                              if not line.startswith(MLFLOW_REGISTRY_LINES))
    return str(info.registered_model_version)
