"""Shared fixtures: one real local Ray per test session, real MLflow stores in temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray instance on 127.0.0.1 with token authentication left on (Ray 2.60's default)."""
    import ray

    from cluster.ray_runtime import init_ray

    # the dashboard stays on: without its State API, placement groups of trials ASHA stops early leak
    init_ray(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a temporary folder so nothing (mlflow.db, runs/, fetched models) lands in the repository or
    in ~/.cache, for subprocesses (the variable) and for commands run in this process (hub's own copy)."""
    from metarestore import hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METARESTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "CACHE", tmp_path / "cache")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def tracking_uri(workdir):
    return f"sqlite:///{workdir / 'mlflow.db'}"


def smoke_config(out: Path, *overrides: str):
    from metarestore.config import load_config

    return load_config(CONFIGS / "smoke.yaml", [f"train.output_dir={out}", *overrides])


@pytest.fixture
def clean_image(workdir):
    """A real photograph (scikit-image's astronaut, 128x128) written as PNG."""
    import skimage.data
    from PIL import Image

    path = workdir / "clean.png"
    Image.fromarray(skimage.data.astronaut()[100:228, 180:308]).save(path)
    return path


def cli_in_process(capsys, *args: str):
    """``metarestore ARGS`` through the entry point's own ``main()`` (its exit code and ``error:`` line),
    in this process: no interpreter start-up and torch import per call. Tests that need the installed
    command itself (exit codes of a real process, signals, kill-and-resume) run it as a subprocess."""
    import subprocess

    from metarestore_cli.app import main

    capsys.readouterr()  # what the test printed before is not the command's
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["metarestore", *args], code, captured.out, captured.err)


def pytest_collection_modifyitems(items):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory):
    """A model meta-trained in one process on the smoke config (a few seconds) and registered in a real
    sqlite MLflow store. Returns a dict: checkpoint, tracking_uri, model_uri (models:/...), run_id."""
    from metarestore.train_local import train_local

    root = tmp_path_factory.mktemp("smoke_model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = smoke_config(root / "run", "train.steps=60", "train.val_every=60", "tracking.registered_model=smoke")
    info = train_local(cfg, tracking_uri=uri, progress=False)
    return {"checkpoint": info["checkpoint"], "tracking_uri": uri, "model_uri": info["model_uri"],
            "run_id": info["run_id"], "root": root}


def start_mlflow_server(root: Path, port: int | None = None):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifacts). Returns (process, uri)."""
    import socket
    import subprocess
    import sys
    import time

    import requests

    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # seconds on a quiet machine; generous for a loaded one
    while time.time() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                return proc, uri
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    stop_process_group(proc)
    raise RuntimeError("mlflow server did not start")


def stop_process_group(proc, timeout: float = 10.0) -> None:
    """Stop a process we started (and its children) by its id: SIGTERM, then SIGKILL."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def perturbed_smoke_checkpoint(tmp_path_factory):
    """A checkpoint of the smoke config's network, untrained, its weights perturbed (seeded) so that every
    layer matters: for tests of the plumbing (export, the web page), where training adds nothing but time."""
    from metarestore.checkpoint import save_checkpoint
    from metarestore.engine import MetaTrainer

    root = tmp_path_factory.mktemp("export_model")
    trainer = MetaTrainer(smoke_config(root / "run"), device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return str(save_checkpoint(root / "model", trainer.model.state_dict(), trainer.metadata()))


@pytest.fixture(scope="session")
def told_checkpoint(tmp_path_factory):
    """Like ``perturbed_smoke_checkpoint``, with ``model.condition: family``: its table perturbed too, so that
    naming a degradation changes the output. It also trains ``awgn``, as the shipped model does: a family that
    float inputs can be told but no image can."""
    from metarestore.checkpoint import save_checkpoint
    from metarestore.engine import MetaTrainer

    root = tmp_path_factory.mktemp("told_model")
    trainer = MetaTrainer(smoke_config(root / "run", "model.condition=family",
                                       "families.train=[gaussian_noise, gaussian_blur, jpeg, low_light, awgn]"),
                          device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return str(save_checkpoint(root / "model", trainer.model.state_dict(), trainer.metadata()))
