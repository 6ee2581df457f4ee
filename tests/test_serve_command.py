"""`metarestore serve` as a user runs it: a process of its own that starts its own Ray (even with
$RAY_ADDRESS pointing at another cluster), serves with bearer auth, and stops cleanly on SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from skimage import data

from cluster.ray_runtime import free_port
from conftest import stop_process_group

pytestmark = pytest.mark.slow


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(data.astronaut()[:96, :96])).save(buffer, format="PNG")
    return buffer.getvalue()


def test_serve_command_serves_and_stops_on_sigterm(ray_local, smoke_model, tmp_path):
    port = free_port()
    env = {**os.environ, "SERVE_TOKEN": "s3cret", "METARESTORE_CACHE": str(tmp_path / "cache")}
    assert env.get("RAY_ADDRESS"), "the test session's Ray is exported: serve must not join it"
    log = tmp_path / "serve.log"
    cli = str(Path(sys.executable).with_name("metarestore"))
    with log.open("w") as out:
        proc = subprocess.Popen(
            [cli, "serve", "--model", smoke_model["checkpoint"], "--host", "127.0.0.1", "--port", str(port),
             "--cpus-per-replica", "0.5", "--token-env", "SERVE_TOKEN", "--adapter-dir", str(tmp_path / "ad"),
             "--tracking-uri", smoke_model["tracking_uri"]],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240  # a Ray start plus a replica; generous on a loaded machine
        while time.time() < deadline and proc.poll() is None:
            if "Ctrl-C to stop" in log.read_text():  # printed once serve.run has returned
                break
            time.sleep(1)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        assert requests.post(f"{url}/v1/restore", data=_png(), headers={"Content-Type": "image/png"},
                             timeout=60).status_code == 401
        restored = requests.post(f"{url}/v1/restore", data=_png(), timeout=120,
                                 headers={"Content-Type": "image/png", "Authorization": "Bearer s3cret"})
        assert restored.status_code == 200, restored.text
        assert Image.open(io.BytesIO(restored.content)).size == (96, 96)
        text = log.read_text()
        assert f"at http://127.0.0.1:{port}" in text
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "shutting down" in text
        assert "POST /v1/restore" not in text and "CALL " not in text, text[-3000:]  # no access log by default
    finally:
        stop_process_group(proc)
    with pytest.raises(requests.RequestException):
        requests.get(f"{url}/healthz", timeout=2)
