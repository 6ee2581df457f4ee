"""`metarestore serve --direct-ingress`: the replica's own HTTP server (Ray Serve direct ingress) restores
images with the same app (auth, errors, multipart forms), and every port it opens binds 127.0.0.1 only."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
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

CLI = str(Path(sys.executable).with_name("metarestore"))


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(data.astronaut()[:80, :96])).save(buffer, format="PNG")
    return buffer.getvalue()


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` on this machine (Linux /proc/net)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def test_direct_ingress_refuses_several_replicas(tmp_path):
    result = subprocess.run([CLI, "serve", "--direct-ingress", "--replicas", "2", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "METARESTORE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert "error:" in result.stderr and "one replica" in result.stderr, result.stderr


@pytest.mark.slow
def test_direct_ingress_restores_on_127_0_0_1(tmp_path):
    port = free_port()
    env = {**os.environ, "SERVE_TOKEN": "s3cret", "METARESTORE_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_SERVE_ENABLE_DIRECT_INGRESS", None)  # the flag alone must turn it on
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [CLI, "serve", "--direct-ingress", "--host", "127.0.0.1", "--port", str(port), "--cpus-per-replica",
             "0.5", "--token-env", "SERVE_TOKEN", "--adapter-dir", str(tmp_path / "ad")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240  # a Ray start plus a replica; generous on a loaded machine
        while time.time() < deadline and proc.poll() is None and "Ctrl-C to stop" not in log.read_text():
            time.sleep(1)
        text = log.read_text()
        assert proc.poll() is None and "Ctrl-C to stop" in text, text[-3000:]
        found = re.search(r"at http://127\.0\.0\.1:(\d+) \(1 replica\(s\).*through Serve's proxy: "
                          rf"http://127\.0\.0\.1:{port}\)", text)
        assert found, text[-3000:]
        direct = int(found.group(1))
        assert direct != port
        url = f"http://127.0.0.1:{direct}"
        auth = {"Authorization": "Bearer s3cret"}

        # the same app through the replica's own server: auth, errors, raw bodies and multipart forms
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        refused = requests.post(f"{url}/v1/restore", data=_png(), headers={"Content-Type": "image/png"}, timeout=60)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        wrong = requests.post(f"{url}/v1/restore", data=b"xx", headers={"Content-Type": "text/plain", **auth},
                              timeout=60)
        assert wrong.status_code == 415 and wrong.json()["error"]["code"] == "unsupported_media_type"
        raw = requests.post(f"{url}/v1/restore", data=_png(), headers={"Content-Type": "image/png", **auth},
                            timeout=120)
        assert raw.status_code == 200, raw.text
        assert Image.open(io.BytesIO(raw.content)).size == (96, 80)
        assert "read;dur=" in raw.headers["Server-Timing"]
        form = requests.post(f"{url}/v1/restore", files={"image": ("a.png", _png(), "image/png")}, headers=auth,
                             timeout=120)
        assert form.status_code == 200 and form.content == raw.content
        # the proxy still answers, with the same replica behind it
        proxied = requests.post(f"http://127.0.0.1:{port}/v1/restore", data=_png(), timeout=120,
                                headers={"Content-Type": "image/png", **auth})
        assert proxied.status_code == 200 and proxied.headers["X-Replica"] == raw.headers["X-Replica"]

        # this machine only: the replica's port and the proxy's listen on 127.0.0.1, on no other address
        assert _listening_addresses(direct) == {"127.0.0.1"}
        assert _listening_addresses(port) == {"127.0.0.1"}

        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)
    with pytest.raises(requests.RequestException):
        requests.get(f"{url}/healthz", timeout=2)
