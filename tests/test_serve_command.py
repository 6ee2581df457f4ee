"""`metarestore serve` as a user runs it: a process of its own that starts its own Ray (even with
$RAY_ADDRESS pointing at another cluster), serves with bearer auth, and stops cleanly on SIGTERM; by default
(one local replica) the replica's own HTTP server answers at --port (direct ingress) with every CPU of that
Ray, and every port binds 127.0.0.1 only. (One server start covers both paths: the proxy keeps answering
on a port of its own.)"""

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
from conftest import cli_in_process, stop_process_group

CLI = str(Path(sys.executable).with_name("metarestore"))


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(data.astronaut()[:96, :96])).save(buffer, format="PNG")
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


def test_direct_ingress_refuses_several_replicas(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METARESTORE_CACHE", str(tmp_path / "cache"))
    result = cli_in_process(capsys, "serve", "--direct-ingress", "--replicas", "2", "--port", str(free_port()))
    assert result.returncode == 2
    assert "error:" in result.stderr and "one replica" in result.stderr, result.stderr


def test_direct_ingress_is_the_default_where_it_applies():
    from serving.commands import _direct_ingress

    assert _direct_ingress(None, None, 1)  # `metarestore serve`: one local replica, reached directly
    assert not _direct_ingress(None, "auto", 1) and not _direct_ingress(None, None, 2)  # a cluster, replicas
    assert not _direct_ingress(False, None, 1) and _direct_ingress(True, None, 1)  # --proxy, --direct-ingress


def test_a_lone_local_replica_takes_the_machine():
    from serving.settings import AppArgs, whole_machine

    default = AppArgs()
    assert (default.num_cpus, default.torch_threads(), default.compute_slots) == (0.5, 1, 1)  # config.yaml's
    mine = whole_machine(default, 2.0)
    assert (mine.num_cpus, mine.torch_threads(), mine.compute_slots) == (2.0, 2, 1)
    assert whole_machine(AppArgs(threads=1), 4).torch_threads() == 1  # a threads setting is kept
    assert whole_machine(default, 0.5).num_cpus == 1.0


@pytest.mark.slow
def test_serve_command_serves_and_stops_on_sigterm(ray_local, smoke_model, tmp_path):
    """The default command: direct ingress at --port, every CPU of its own local Ray for the one replica."""
    port = free_port()
    env = {**os.environ, "SERVE_TOKEN": "s3cret", "METARESTORE_CACHE": str(tmp_path / "cache")}
    assert env.get("RAY_ADDRESS"), "the test session's Ray is exported: serve must not join it"
    log = tmp_path / "serve.log"
    env.pop("RAY_SERVE_ENABLE_DIRECT_INGRESS", None)  # the command alone must turn it on
    with log.open("w") as out:
        proc = subprocess.Popen(
            [CLI, "serve", "--model", smoke_model["checkpoint"], "--host", "127.0.0.1",
             "--port", str(port), "--token-env", "SERVE_TOKEN", "--adapter-dir", str(tmp_path / "ad"),
             "--tracking-uri", smoke_model["tracking_uri"]],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = proxy = f"http://127.0.0.1:{port}"  # url: the replica's own server; proxy: once printed
    try:
        deadline = time.time() + 240  # a Ray start plus a replica; generous on a loaded machine
        while time.time() < deadline and proc.poll() is None:
            if "Ctrl-C to stop" in log.read_text():  # printed once serve.run has returned
                break
            time.sleep(1)
        assert proc.poll() is None, log.read_text()[-3000:]
        text = log.read_text()
        found = re.search(rf"at http://127\.0\.0\.1:{port} \(1 replica\(s\) x (\d+) CPU, (\d+) torch thread\(s\), "
                          r"bearer token .*through Serve's proxy: http://127\.0\.0\.1:(\d+)\)", text)
        assert found, text[-3000:]
        assert found.group(1) == found.group(2) and int(found.group(1)) >= 1  # the machine's CPUs, as threads
        proxy = f"http://127.0.0.1:{found.group(3)}"
        assert found.group(3) != str(port)
        assert requests.get(f"{proxy}/healthz", timeout=10).status_code == 200
        assert requests.post(f"{proxy}/v1/restore", data=_png(), headers={"Content-Type": "image/png"},
                             timeout=60).status_code == 401
        restored = requests.post(f"{proxy}/v1/restore", data=_png(), timeout=120,
                                 headers={"Content-Type": "image/png", "Authorization": "Bearer s3cret"})
        assert restored.status_code == 200, restored.text
        assert Image.open(io.BytesIO(restored.content)).size == (96, 96)
        direct = url

        # the same app through the replica's own server: auth, errors, raw bodies and multipart forms
        auth = {"Authorization": "Bearer s3cret"}
        assert requests.get(f"{direct}/healthz", timeout=10).status_code == 200
        refused = requests.post(f"{direct}/v1/restore", data=_png(), headers={"Content-Type": "image/png"},
                                timeout=60)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        wrong = requests.post(f"{direct}/v1/restore", data=b"xx", timeout=60,
                              headers={"Content-Type": "text/plain", **auth})
        assert wrong.status_code == 415 and wrong.json()["error"]["code"] == "unsupported_media_type"
        raw = requests.post(f"{direct}/v1/restore", data=_png(), headers={"Content-Type": "image/png", **auth},
                            timeout=120)
        assert raw.status_code == 200, raw.text
        assert raw.content == restored.content and raw.headers["X-Replica"] == restored.headers["X-Replica"]
        assert "read;dur=" in raw.headers["Server-Timing"]
        form = requests.post(f"{direct}/v1/restore", files={"image": ("a.png", _png(), "image/png")},
                             headers=auth, timeout=120)
        assert form.status_code == 200 and form.content == raw.content
        # this machine only: the replica's port and the proxy's listen on 127.0.0.1, on no other address
        assert _listening_addresses(int(found.group(3))) == {"127.0.0.1"}
        assert _listening_addresses(port) == {"127.0.0.1"}
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "shutting down" in text
        assert "POST /v1/restore" not in text and "CALL " not in text, text[-3000:]  # no access log by default
    finally:
        stop_process_group(proc)
    for gone in (url, proxy):
        with pytest.raises(requests.RequestException):
            requests.get(f"{gone}/healthz", timeout=2)
