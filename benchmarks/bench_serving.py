"""Serving benchmark: restore latency against the bare forward pass, throughput with and without dynamic
batching, adapter creation time. Prints a markdown table for docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_serving.py                        # trains the smoke model first (~1 min)
    .venv/bin/python benchmarks/bench_serving.py --model runs/demo/final --requests 400

Starts its own local Ray (2 CPUs) and Serve on 127.0.0.1, one Restorer replica; everything is stopped
at the end. Run it on a quiet machine: the clients share the CPU with the server.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import skimage.data
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def crops(size: int, count: int) -> list[np.ndarray]:
    """Real photographs, noisy (the restorer's job), cut into size x size crops."""
    rng = np.random.default_rng(0)
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        image = getattr(skimage.data, name)()
        for top in range(0, image.shape[0] - size + 1, size):
            for left in range(0, image.shape[1] - size + 1, size):
                crop = image[top:top + size, left:left + size].astype(np.float32)
                out.append(np.clip(crop + rng.normal(0, 20, crop.shape), 0, 255).astype(np.uint8))
    return (out * (count // len(out) + 1))[:count]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def smoke_model(root: Path) -> str:
    from metarestore.config import load_config
    from metarestore.train_local import train_local

    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"train.output_dir={root / 'run'}"])
    info = train_local(cfg, tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False, register=False)
    return info["checkpoint"]


def forward_times(model: str, tracking_uri: str | None, threads: int, repeats: int) -> list[float]:
    """The model's own forward (``learner.restore``) on one 256x256 image, in this process."""
    from metarestore.hub import load_model

    torch.set_num_threads(threads)
    learner, _, _ = load_model(model, tracking_uri)
    x = torch.from_numpy(crops(256, 1)[0]).permute(2, 0, 1)[None].float() / 255
    for _ in range(3):
        learner.restore(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        learner.restore(x)
        times.append((time.perf_counter() - start) * 1000)
    return times


def latencies(url: str, bodies: list[bytes]) -> list[float]:
    session, times = requests.Session(), []
    for body in bodies:
        start = time.perf_counter()
        response = session.post(f"{url}/v1/restore", data=body, headers={"Content-Type": "image/png"}, timeout=300)
        response.raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    return times


def throughput(url: str, bodies: list[bytes], clients: int) -> tuple[float, float]:
    """(images per second, mean forward-pass batch size) with ``clients`` concurrent clients."""
    sessions = [requests.Session() for _ in range(clients)]
    batch_sizes: list[int] = []

    def client(i: int) -> None:
        for body in bodies[i::clients]:
            response = sessions[i].post(f"{url}/v1/restore", data=body, headers={"Content-Type": "image/png"},
                                        timeout=300)
            response.raise_for_status()
            batch_sizes.append(int(response.headers["X-Batch-Size"]))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return len(bodies) / (time.perf_counter() - start), statistics.mean(batch_sizes)


def adapter_times(url: str, repeats: int, shots: int = 5, size: int = 128, steps: int = 10) -> tuple[list, list]:
    clean = crops(size, shots)
    cast = np.array([1.25, 1.0, 0.8], dtype=np.float32)
    degraded = [np.clip(c * cast, 0, 255).astype(np.uint8) for c in clean]
    files = []
    for d, c in zip(degraded, clean, strict=True):
        files += [("degraded", ("d.png", png(d), "image/png")), ("clean", ("c.png", png(c), "image/png"))]
    client, server = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        response = requests.post(f"{url}/v1/adapters", files=files, data={"steps": str(steps)}, timeout=300)
        response.raise_for_status()
        client.append((time.perf_counter() - start) * 1000)
        server.append(response.json()["elapsed_ms"])
        requests.delete(f"{url}/v1/adapters/{response.json()['adapter_id']}", timeout=30)
    return client, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model URI or checkpoint directory (default: train the smoke config).")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ URIs.")
    parser.add_argument("--requests", type=int, default=200, help="Requests per latency/throughput measurement.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients for the throughput runs.")
    parser.add_argument("--adapters", type=int, default=5, help="Adapters created for the adapter timing.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the replica (and of the "
                        "bare forward measurement).")
    args = parser.parse_args()

    import ray
    from ray import serve

    from metarestore.tracking import resolve_uri
    from serving.app import build_app

    tmp = tempfile.TemporaryDirectory(prefix="metarestore-bench-")
    model = args.model or smoke_model(Path(tmp.name))
    if not model.startswith(("models:/", "runs:/")):
        model = str(Path(model).resolve())  # replicas run in another directory
    if args.tracking_uri:
        args.tracking_uri = resolve_uri(args.tracking_uri)
    forward = forward_times(model, args.tracking_uri, args.threads, max(20, args.requests // 2))
    bodies = [png(c) for c in crops(256, args.requests)]

    from cluster.ray_runtime import init_ray

    init_ray(num_cpus=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for batch in (8, 1):
            serve.run(build_app({"model": model, "tracking_uri": args.tracking_uri, "num_replicas": 1,
                                 "num_cpus": 1, "threads": args.threads, "max_batch_size": batch}),
                      name="bench", route_prefix="/")
            latencies(url, bodies[:5])  # warm-up
            lat = latencies(url, bodies[: max(20, args.requests // 2)])
            rate, mean_batch = throughput(url, bodies, args.clients)
            rows.append((batch, lat, rate, mean_batch))
            if batch == 8:
                adapt_client, adapt_server = adapter_times(url, args.adapters)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    print(f"\nMachine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
          f"{torch.__version__}, {args.threads} torch threads; one Restorer replica; 256x256 PNG images; "
          f"{args.requests} requests per row.\n")
    print("| measurement | p50 | p99 | throughput |")
    print("|---|---|---|---|")
    print(f"| model forward alone (`learner.restore`, 256x256) | {percentile(forward, 50):.1f} ms | "
          f"{percentile(forward, 99):.1f} ms | {1000 / statistics.median(forward):.1f} images/s |")
    for batch, lat, rate, mean_batch in rows:
        what = "batching on (max_batch_size 8)" if batch > 1 else "batching off (max_batch_size 1)"
        print(f"| HTTP restore, 1 client, {what} | {percentile(lat, 50):.1f} ms | {percentile(lat, 99):.1f} ms | |")
        print(f"| HTTP restore, {args.clients} concurrent clients, {what} | | | {rate:.1f} images/s "
              f"(mean batch {mean_batch:.1f}) |")
    print(f"| adapter creation, 5 shots of 128x128, 10 steps (client) | {percentile(adapt_client, 50):.0f} ms | "
          f"{percentile(adapt_client, 99):.0f} ms | |")
    print(f"| adapter creation, server-side `elapsed_ms` | {percentile(adapt_server, 50):.0f} ms | "
          f"{percentile(adapt_server, 99):.0f} ms | |")


if __name__ == "__main__":
    main()
