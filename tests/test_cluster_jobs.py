"""A real two-node Ray cluster on this machine, token authentication on, driven through the CLI.

The head and a second node are two ``ray start --block`` processes (each its own process group), with
an isolated ``RAY_TMPDIR`` so that nothing here is visible to another ``ray.init()`` on the machine.
Each node offers one CPU, so the two 1-CPU Ray Train workers of the smoke training cannot share a node.
Everything started here is stopped by its process group id, and the test checks nothing is left.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (our RAY_TMPDIR): everything our nodes started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stop_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM our ``ray start --block`` process (it drains its node and stops the node's processes),
    then SIGTERM and finally SIGKILL the process group it leads for anything left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)  # killpg succeeded: something was still in the group


class RayCluster:
    def __init__(self, root: Path):
        self.root = root
        self.tmpdir = str(root / "t")
        self.token = secrets.token_hex(32)
        self.token_file = root / "auth_token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
        env.update(RAY_TMPDIR=self.tmpdir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file),
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the cluster's `python` is this venv's
                   RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", METARESTORE_CACHE=str(root / "cache"),
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5")  # a test cluster need not drain for 30 s
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        (gcs, dash, client, *p) = _free_ports(15)
        self.gcs_port, self.dashboard = gcs, f"http://127.0.0.1:{dash}"

        def node_ports(q: list[int]) -> list[str]:
            return ["--dashboard-agent-listen-port", str(q[0]), "--dashboard-agent-grpc-port", str(q[1]),
                    "--runtime-env-agent-port", str(q[2]), "--metrics-export-port", str(q[3]),
                    "--node-manager-port", str(q[4]), "--object-manager-port", str(q[5])]

        # every Ray process of ours looks for the cluster at RAY_ADDRESS, never at other clusters on the machine
        self.env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
        # one temp dir per node, as on separate machines (a shared session dir duplicates the log streams)
        self._start("head", ["--head", "--temp-dir", str(self.root / "h"), "--node-ip-address", "127.0.0.1",
                             "--port", str(gcs),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--include-dashboard", "true", "--ray-client-server-port", str(client),
                             "--num-cpus", "1", "--num-gpus", "0",
                             *node_ports(p[:6])])
        self.wait(lambda: self.get("/api/version").status_code == 200, "the head's dashboard")
        self._start("worker", ["--address", f"127.0.0.1:{gcs}", "--temp-dir", str(self.root / "w"),
                               "--num-cpus", "1", "--num-gpus", "0", *node_ports(p[6:12])])
        self.wait(lambda: len(self.alive_nodes()) == 2, "two alive nodes")

    def wait(self, ready, what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc, log in zip(self.procs, self.logs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"{log.name} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if ready():
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(1)
        raise TimeoutError(f"timed out waiting for {what}")

    def get(self, path: str, **params) -> requests.Response:
        return requests.get(self.dashboard + path, params=params, timeout=10,
                            headers={"Authorization": f"Bearer {self.token}"})

    def state(self, resource: str, **filters) -> list[dict]:
        """Ray's State API (the dashboard's /api/v0), e.g. state("actors", class_name="RayTrainWorker")."""
        params = {"detail": "true", "limit": "10000", "filter_keys": list(filters),
                  "filter_predicates": ["="] * len(filters), "filter_values": list(filters.values())}
        body = self.get(f"/api/v0/{resource}", **params).json()
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return self.state("nodes", state="ALIVE")

    def stop(self) -> list[int]:
        """Stop every node (worker first) by its process group; returns pids that were still left."""
        for proc in reversed(self.procs):
            _stop_group(proc)
        leftovers = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            leftovers = _pids_with_env(f"RAY_TMPDIR={self.tmpdir}")
            if not leftovers:
                break
            time.sleep(1)
        for pid in leftovers:  # ours beyond doubt (our unique RAY_TMPDIR in their environment)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="mrc-", dir="/tmp"))  # short: Ray's unix socket paths are limited
    ray_cluster = RayCluster(root)
    try:
        ray_cluster.start()
        yield ray_cluster
    finally:
        leftovers = ray_cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"processes left after stopping the nodes: {leftovers}"
        assert not any(_pids_with_env(f"RAY_TMPDIR={ray_cluster.tmpdir}"))


def cli(cluster: RayCluster, *args: str, token: str | None = "file", timeout: float = JOB_TIMEOUT_S,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``metarestore ARGS`` as a user runs it: its own process, the token from RAY_AUTH_TOKEN_PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                        "RAY_AUTH_MODE")}
    env["HOME"] = str(cluster.root / "home")  # no ~/.ray/auth_token of this machine's user
    if token == "file":
        env["RAY_AUTH_TOKEN_PATH"] = str(cluster.token_file)
    elif token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "metarestore_cli", *args], env=env, cwd=cwd or cluster.root,
                          capture_output=True, text=True, timeout=timeout)


def _job_id(output: str) -> str:
    match = re.search(r"^job id: (\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)


@pytest.fixture(scope="module")
def train_job(cluster):
    """The smoke training submitted through the CLI and followed to the end."""
    out = cluster.root / "out"
    db = cluster.root / "mlflow.db"
    result = cli(cluster, "submit", "train", "--address", cluster.dashboard, "--follow", "--",
                 "--config", "configs/smoke.yaml", "--workers", "2", "--tracking-uri", f"sqlite:///{db}",
                 "--set", f"train.output_dir={out}", "--set", "train.steps=10")
    return {"result": result, "out": out, "uri": f"sqlite:///{db}", "id": _job_id(result.stdout)}


def test_training_job_runs_on_both_nodes(cluster, train_job):
    result = train_job["result"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"job {train_job['id']} SUCCEEDED" in result.stdout
    assert f"dashboard: {cluster.dashboard}/#/jobs/{train_job['id']}" in result.stdout
    assert "Uploading package" not in result.stderr and "is now ignored by default" not in result.stderr

    # the Ray Train workers of this job, from Ray's State API: one per node
    job = cluster.get(f"/api/jobs/{train_job['id']}").json()
    assert job["status"] == "SUCCEEDED" and job["job_id"]
    workers = cluster.state("actors", class_name="RayTrainWorker", job_id=job["job_id"])
    assert len(workers) == 2, workers
    nodes = {node["node_id"]: node for node in cluster.alive_nodes()}
    assert len(nodes) == 2
    assert {w["node_id"] for w in workers} == set(nodes)
    assert {nodes[w["node_id"]]["is_head_node"] for w in workers} == {True, False}  # the head and the other node

    # the MLflow run and the checkpoint
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=train_job["uri"])
    experiment = client.get_experiment_by_name("metarestore-smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id in result.stdout  # the job's own output names it
    metadata = json.loads((train_job["out"] / "final" / "metadata.json").read_text())
    assert metadata["step"] == 10


def test_bad_argument_fails_and_the_logs_say_why(cluster, train_job):
    result = cli(cluster, "submit", "train", "--address", cluster.dashboard, "--follow", "--",
                 "--config", "does/not/exist.yaml")
    job_id = _job_id(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"job {job_id} FAILED" in result.stdout

    logs = cli(cluster, "jobs", "logs", job_id, "--address", cluster.dashboard)
    assert logs.returncode == 0, logs.stderr
    assert "error: config file not found: does/not/exist.yaml" in logs.stdout
    assert "Traceback" not in logs.stdout

    status = cli(cluster, "jobs", "status", job_id, "--address", cluster.dashboard)
    assert status.returncode == 0, status.stderr
    assert f"{job_id}: FAILED" in status.stdout
    assert "metarestore_cli train --config does/not/exist.yaml --address auto" in status.stdout

    listing = cli(cluster, "jobs", "list", "--address", cluster.dashboard)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:]}
    assert rows[train_job["id"]] == "SUCCEEDED"
    assert rows[job_id] == "FAILED"


def test_stop_a_running_job(cluster, train_job):
    out = cluster.root / "long"
    result = cli(cluster, "submit", "train", "--address", cluster.dashboard, "--",
                 "--config", "configs/smoke.yaml", "--workers", "2", "--tracking-uri",
                 f"sqlite:///{cluster.root / 'long.db'}", "--set", f"train.output_dir={out}",
                 "--set", "train.steps=100000")
    assert result.returncode == 0, result.stderr
    job_id = _job_id(result.stdout)
    cluster.wait(lambda: cluster.get(f"/api/jobs/{job_id}").json()["status"] == "RUNNING", "RUNNING")
    stopped = cli(cluster, "jobs", "stop", job_id, "--address", cluster.dashboard)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{job_id}: stop requested; now STOPPED" in stopped.stdout
    again = cli(cluster, "jobs", "stop", job_id, "--address", cluster.dashboard)
    assert f"{job_id}: already STOPPED" in again.stdout


def test_token_and_address_errors_are_one_line(cluster):
    wrong = cli(cluster, "jobs", "list", "--address", cluster.dashboard, token="0" * 64)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (f"error: the Ray cluster at {cluster.dashboard} rejected the token from "
                                    "$RAY_AUTH_TOKEN")

    missing = cli(cluster, "submit", "train", "--address", cluster.dashboard, token=None)
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"error: the Ray cluster at {cluster.dashboard} requires a token")
    assert len(missing.stderr.strip().splitlines()) == 1

    unknown = cli(cluster, "jobs", "status", "raysubmit_doesnotexist", "--address", cluster.dashboard)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("error: no job 'raysubmit_doesnotexist' on this cluster "
                                      "(metarestore jobs list shows them)")

    (port,) = _free_ports(1)
    down = cli(cluster, "jobs", "list", "--address", f"http://127.0.0.1:{port}", timeout=30)
    assert down.returncode == 2
    assert down.stderr.startswith(f"error: cannot reach the Ray dashboard at http://127.0.0.1:{port}")
