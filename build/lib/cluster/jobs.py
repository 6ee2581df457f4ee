"""Ray Jobs for metarestore: submit ``metarestore train|tune|evaluate`` to a running cluster, follow,
inspect and stop jobs. A thin layer over Ray's ``JobSubmissionClient`` (the dashboard's Jobs API):

* the address is the Ray dashboard, ``http://HEAD:8265`` (not the GCS port 6379 nor ``ray://``);
* the token for a cluster with token authentication comes from Ray's standard places, in Ray's order:
  ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``; it is sent as an
  explicit ``Authorization: Bearer`` header, so ``RAY_AUTH_MODE`` need not be set in this process;
* the job's runtime environment is ``cluster/runtime_env.yaml``: the repository as ``working_dir``
  without ``.venv``, MLflow stores, run outputs, data and caches;
* the entrypoint is ``python -m metarestore_cli COMMAND ARGS...``, run by the cluster's Python.

Every failure a user can cause (cluster down, wrong token, unknown job id) is a ``JobsError`` with a
one-line message; the CLI prints it as ``error: ...``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from metarestore.errors import UserError

REPO = Path(__file__).resolve().parent.parent
RUNTIME_ENV_FILE = Path(__file__).with_name("runtime_env.yaml")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
COMMANDS = ("train", "tune", "evaluate")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 5.0
DEFAULT_EXCLUDES_VAR = "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"


class JobsError(UserError, RuntimeError):
    """The cluster cannot be reached or used, or a job does not exist."""


# --- address and token ------------------------------------------------------------------------------

def normalize_address(address: str | None) -> str:
    """The dashboard URL (``http://HOST:PORT``) from what the user gave."""
    address = (address or "").strip() or DEFAULT_ADDRESS
    if address == "auto" or address.startswith("ray://"):
        raise JobsError(f"--address {address}: jobs are submitted to the Ray dashboard, "
                        "e.g. http://HEAD:8265 (not 'auto' or a ray:// client address)")
    if "://" not in address:
        address = f"http://{address}"
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise JobsError(f"--address {address}: expected the Ray dashboard URL, e.g. http://HEAD:8265")
    if parsed.port in (6379, 10001):
        raise JobsError(f"--address {address}: port {parsed.port} is the "
                        f"{'GCS' if parsed.port == 6379 else 'Ray client'} port; jobs go to the dashboard, "
                        f"usually http://{parsed.hostname}:8265")
    return address.rstrip("/")


def find_token() -> tuple[str | None, str]:
    """(token, where it came from), in Ray's order: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "$RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_env:
        path = Path(path_env).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path_env}: cannot read the token ({exc.strerror})") from None
        if not token:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path_env}: the file is empty")
        return token, f"$RAY_AUTH_TOKEN_PATH ({path})"
    path = Path("~/.ray/auth_token").expanduser()
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, str(path)
    return None, "no token (none in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"


def auth_headers() -> dict[str, str]:
    token, _ = find_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_cluster(address: str, headers: dict[str, str], timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Fail within seconds, with a clear message, unless ``address`` is a Ray dashboard that accepts us.
    Returns the cluster's Ray version."""
    import requests

    try:
        response = requests.get(f"{address}/api/version", headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise JobsError(f"cannot reach the Ray dashboard at {address} ({exc.__class__.__name__}); is the "
                        "cluster up, and is this its dashboard address (http://HEAD:8265)?") from None
    _, source = find_token()
    if response.status_code == 401:
        raise JobsError(f"the Ray cluster at {address} requires a token and {source} was sent; set "
                        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token")
    if response.status_code == 403:
        raise JobsError(f"the Ray cluster at {address} rejected the token from {source}")
    try:
        version = response.json()["ray_version"] if response.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        version = None
    if not version:
        raise JobsError(f"{address} does not look like a Ray dashboard (HTTP {response.status_code} on "
                        "/api/version)")
    return version


@contextmanager
def _explicit_address() -> Iterator[None]:
    """JobSubmissionClient lets $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS override its address argument;
    the --address the user gave must win."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def quiet_sdk_logs() -> None:
    """The CLI's output is ours: hide the Jobs SDK's INFO lines (package upload, websocket closed), keep
    its warnings (a file too large to upload, ...)."""
    import logging

    import ray.dashboard.modules.dashboard_sdk  # noqa: F401 - they set their level at import
    import ray.dashboard.modules.job.sdk  # noqa: F401

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir"):
        logging.getLogger(name).setLevel(logging.WARNING)


def connect(address: str | None):
    """A ``JobSubmissionClient`` for the cluster at ``address`` (checked first, with a timeout)."""
    address = normalize_address(address)
    headers = auth_headers()
    check_cluster(address, headers)
    from ray.job_submission import JobSubmissionClient

    with _explicit_address():
        try:
            return JobSubmissionClient(address, headers=headers)
        except Exception as exc:  # noqa: BLE001 - the pre-check passed; anything now is one line too
            raise JobsError(f"cannot use the Ray Jobs API at {address}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


# --- what a job runs ----------------------------------------------------------------------------------

def runtime_env(working_dir: Path | None = None, tracking_uri: str | None = None,
                env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime environment: ``cluster/runtime_env.yaml`` with an absolute ``working_dir``."""
    env = yaml.safe_load(RUNTIME_ENV_FILE.read_text())
    root = Path(working_dir or REPO).expanduser().resolve()
    if not (root / "pyproject.toml").is_file() or not (root / "metarestore").is_dir():
        raise JobsError(f"{root} is not a metarestore source checkout (no pyproject.toml and metarestore/); "
                        "submit from a clone of the repository or pass --working-dir")
    env["working_dir"] = str(root)
    variables = dict(env.get("env_vars") or {})
    if tracking_uri:
        variables["MLFLOW_TRACKING_URI"] = tracking_uri
    variables.update(env_vars or {})
    env["env_vars"] = variables
    return env


def check_tracking_uri(uri: str) -> None:
    """A local relative store would land in the job's temporary working directory on the cluster."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise JobsError(f"--tracking-uri {uri}: a relative sqlite path would be resolved inside the job's "
                        "temporary working directory on the cluster; use an http(s):// tracking server "
                        "(or an absolute sqlite:////path on shared storage)")
    if "://" not in uri and not uri.startswith(("/", "databricks")):
        raise JobsError(f"--tracking-uri {uri}: give an http(s):// tracking server or an absolute path")


def _option_value(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def command_options(cli, command: str) -> set[str]:
    """The option names of ``metarestore COMMAND`` in ``cli``, the application's click group (the caller
    passes it: this package does not import the application). Raises JobsError if it has no such command."""
    cmd = cli.commands.get(command) if hasattr(cli, "commands") else None
    if cmd is None:
        raise JobsError(f"metarestore has no '{command}' command in this checkout")
    names = [opt for param in cmd.params for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]]
    return {name for name in names if name.startswith("--")}


def job_args(command: str, args: list[str], options: set[str]) -> list[str]:
    """The arguments the job's ``metarestore COMMAND`` gets: ``--address auto`` is added for commands that
    start Ray (``options``, the command's options, has ``--address``), so that they join the cluster the job
    runs on instead of starting a Ray of their own."""
    args = list(args)
    if "--address" in options and _option_value(args, "--address") is None:
        args += ["--address", "auto"]
    uri = _option_value(args, "--tracking-uri")
    if uri:
        check_tracking_uri(uri)
    return args


def entrypoint(command: str, args: list[str], python: str = "python") -> str:
    return shlex.join([python, "-m", "metarestore_cli", command, *args])


def output_warning(command: str, args: list[str]) -> str | None:
    """A warning when the job's results would stay in its temporary working directory."""
    if command == "train":
        overrides = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
        overrides += [a[len("--set="):] for a in args if a.startswith("--set=")]
        out = next((o.partition("=")[2] for o in overrides if o.startswith("train.output_dir=")), None)
        where = "--set train.output_dir=/shared/..."
    elif command in ("tune", "evaluate"):
        out, where = _option_value(args, "--out"), "--out /shared/..."
    else:
        return None
    if out and out.startswith(("/", "s3://", "gs://")):
        return None
    return (f"warning: the job's outputs go to a relative folder inside its temporary working directory on the "
            f"cluster; pass {where} (shared storage) to keep them")


def submit(client, command: str, args: list[str], *, options: set[str], tracking_uri: str | None = None,
           working_dir: Path | None = None, python: str = "python", entrypoint_num_cpus: float = 0,
           env_vars: dict[str, str] | None = None) -> str:
    """Submit ``metarestore COMMAND ARGS...`` (``options``: the command's option names, see
    ``command_options``); returns the submission id."""
    from metarestore.tracking import git_commit

    if command not in COMMANDS:
        raise JobsError(f"cannot submit '{command}': choose one of {', '.join(COMMANDS)}")
    if tracking_uri:
        check_tracking_uri(tracking_uri)
    args = job_args(command, args, options)
    env = runtime_env(working_dir, tracking_uri, env_vars)
    metadata = {"metarestore_command": command, "git_commit": git_commit()[:40],
                "submitted_by": os.environ.get("USER", "unknown")}
    # the excludes of runtime_env.yaml cover Ray's default ones (.git, .venv, venv, __pycache__): without
    # those defaults Ray does not warn that it skips them
    saved = os.environ.get(DEFAULT_EXCLUDES_VAR)
    os.environ[DEFAULT_EXCLUDES_VAR] = ""
    try:
        return client.submit_job(entrypoint=entrypoint(command, args, python), runtime_env=env,
                                 metadata=metadata, entrypoint_num_cpus=entrypoint_num_cpus)
    except Exception as exc:  # noqa: BLE001 - upload too large, cluster went away, ...
        raise JobsError(f"job submission failed: {_first_line(exc)}") from None
    finally:
        if saved is None:
            os.environ.pop(DEFAULT_EXCLUDES_VAR, None)
        else:
            os.environ[DEFAULT_EXCLUDES_VAR] = saved


# --- inspecting jobs ----------------------------------------------------------------------------------

def _call(job_id: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - RuntimeError from the SDK, ConnectionError, ...
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise JobsError(f"no job '{job_id}' on this cluster (metarestore jobs list shows them)") from None
        raise JobsError(f"job '{job_id}': {_first_line(exc)}") from None


def info(client, job_id: str):
    return _call(job_id, lambda: client.get_job_info(job_id))


def logs(client, job_id: str) -> str:
    return _call(job_id, lambda: client.get_job_logs(job_id))


def stop(client, job_id: str, wait_s: float = 30.0) -> tuple[bool, str]:
    """Ask the job to stop; returns (a stop was sent, status after waiting up to ``wait_s``)."""
    sent = _call(job_id, lambda: client.stop_job(job_id))
    deadline = time.monotonic() + wait_s
    status = str(info(client, job_id).status)
    while sent and status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1.0)
        status = str(info(client, job_id).status)
    return sent, status


def list_jobs(client) -> list:
    """Submitted jobs (not plain driver connections), oldest first."""
    try:
        jobs = client.list_jobs()
    except Exception as exc:  # noqa: BLE001
        raise JobsError(f"cannot list jobs: {_first_line(exc)}") from None
    return sorted((j for j in jobs if j.submission_id), key=lambda j: j.start_time or 0)


def follow(client, job_id: str, write: Callable[[str], None] = sys.stdout.write,
           poll_s: float = 2.0) -> str:
    """Stream the job's logs until it ends; returns its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    info(client, job_id)  # an unknown id is a clear error, not a websocket failure
    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - the stream broke (proxy, restart): fall back to polling
        write("\n(log stream interrupted; waiting for the job to end)\n")
    status = str(info(client, job_id).status)
    while status not in TERMINAL:
        time.sleep(poll_s)
        status = str(info(client, job_id).status)
    return status
