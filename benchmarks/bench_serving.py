"""Serving benchmark, in one run: the model's forward pass against `POST /v1/restore` (256x256 and
1024x1024), the request path's overhead, throughput with 1/4/8 clients against the raw batched forward
pass, adapter creation time and the PSNR adapters gain. Prints markdown for docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_serving.py                        # trains the smoke model first (~1 min)
    .venv/bin/python benchmarks/bench_serving.py --model runs/cbsd432/final
    .venv/bin/python benchmarks/bench_serving.py --model M --replicas 2 --threads 1   # compare settings
    .venv/bin/python benchmarks/bench_serving.py --model builtin:base --direct-ingress  # skip the proxy hop

Starts its own local Ray (2 CPUs) and Serve on 127.0.0.1; everything is stopped at the end. The clients
share the CPU with the server: run it on a quiet machine (the load average is printed with the figures).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
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

from cluster.ray_runtime import free_port

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


def timed(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def forward_figures(learner, threads: int, repeats: int, large_repeats: int, batch: int, tile: int,
                    max_batch_pixels: int | None) -> dict:
    """The model alone, in this process: one image of each size (tiled as the server tiles), and a batch.
    Run as the replica runs it: in a worker thread, with ``threads`` torch threads set in that thread."""
    from metarestore.inference import restore_image

    small, large = as_tensor(crops(256, 1)[0]), as_tensor(big_image(1024))
    batched = torch.cat([small] * batch)
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,)) as worker:
        def run(x, **kw):
            return lambda: worker.submit(restore_image, learner, x, tile=tile, **kw).result()

        return {
            "256": timed(run(small), repeats),
            "1024": timed(run(large), max(1, large_repeats), warmup=1),
            "batch": timed(run(batched), max(3, repeats // batch)),
            "chunked": timed(run(batched, max_batch_pixels=max_batch_pixels), max(3, repeats // batch)),
        }


def big_image(size: int) -> np.ndarray:
    """A size x size noisy photograph (astronaut, resized)."""
    image = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(1)
    return np.clip(np.asarray(image, dtype=np.float32) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)


def post_restore(session: requests.Session, url: str, body: bytes, adapter: str | None = None) -> requests.Response:
    response = session.post(f"{url}/v1/restore", data=body, headers={"Content-Type": "image/png"},
                            params={"adapter": adapter} if adapter else None, timeout=300)
    response.raise_for_status()
    return response


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: read;dur=0.3, decode;dur=2.1, ...`` as {name: ms}."""
    parts = {}
    for metric in header.split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        durations = [float(p[4:]) for p in params if p.startswith("dur=")]
        if name and durations:
            parts[name] = durations[0]
    return parts


def latencies(url: str, bodies: list[bytes]) -> tuple[list[float], list[dict[str, float]]]:
    """Client latencies (ms) of one request at a time, and each answer's Server-Timing parts."""
    session = requests.Session()
    post_restore(session, url, bodies[0])
    times, parts = [], []
    for body in bodies:
        start = time.perf_counter()
        response = post_restore(session, url, body)
        times.append((time.perf_counter() - start) * 1000)
        parts.append(server_timing(response.headers.get("Server-Timing", "")))
    return times, parts


def throughput(url: str, bodies: list[bytes], clients: int) -> tuple[float, float]:
    """(images per second, mean forward-pass batch size) with ``clients`` concurrent clients."""
    sessions = [requests.Session() for _ in range(clients)]
    batch_sizes: list[int] = []

    def client(i: int) -> None:
        for body in bodies[i::clients]:
            batch_sizes.append(int(post_restore(sessions[i], url, body).headers["X-Batch-Size"]))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return len(bodies) / (time.perf_counter() - start), statistics.mean(batch_sizes)


CAST = np.array([1.25, 1.0, 0.8], dtype=np.float32)  # a colour cast: a held-out degradation


def cast_pairs(size: int, shots: int, held_out: int) -> tuple[list, list, list, list]:
    """(degraded, clean) support pairs and held-out test pairs of different crops, one colour cast."""
    clean = crops(size, shots + held_out)
    degraded = [np.clip(c * CAST, 0, 255).astype(np.uint8) for c in clean]
    return degraded[:shots], clean[:shots], degraded[shots:], clean[shots:]


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def adapter_figures(url: str, repeats: int, steps: int, shots: int = 5, size: int = 128) -> dict:
    """Adapter creation time (client and server side), the server's reported gain, and the gain on held-out
    images of the same degradation restored through HTTP with and without the adapter."""
    degraded, clean, test_degraded, test_clean = cast_pairs(size, shots, 8)
    files = []
    for d, c in zip(degraded, clean, strict=True):
        files += [("degraded", ("d.png", png(d), "image/png")), ("clean", ("c.png", png(c), "image/png"))]
    client, infos = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        response = requests.post(f"{url}/v1/adapters", files=files, data={"steps": str(steps)}, timeout=300)
        response.raise_for_status()
        client.append((time.perf_counter() - start) * 1000)
        infos.append(response.json())
    client, infos = client[1:], infos[1:]  # the first is a warm-up
    session, gains = requests.Session(), []
    for d, c in zip(test_degraded, test_clean, strict=True):
        plain = np.asarray(Image.open(io.BytesIO(post_restore(session, url, png(d)).content)))
        adapted = np.asarray(Image.open(io.BytesIO(post_restore(session, url, png(d), infos[0]["adapter_id"])
                                                   .content)))
        gains.append(psnr_db(adapted, c) - psnr_db(plain, c))
    for info in infos:
        requests.delete(f"{url}/v1/adapters/{info['adapter_id']}", timeout=30)
    return {"client": client, "server": [i["elapsed_ms"] for i in infos],
            "steps_used": [i["steps_used"] for i in infos], "gain_server": infos[0]["psnr_adapted"] - infos[0]["psnr_zero_shot"],
            "gain_held_out": statistics.mean(gains)}


def reference_adapter(learner, threads: int, steps: int, shots: int = 5, size: int = 128) -> dict:
    """The previous server path, in this process: ``learner.adapt`` on the whole support images, then
    both restorations of the support images for psnr_before/after. Its time and its held-out gain."""
    from metarestore.meta.losses import psnr

    torch.set_num_threads(threads)
    degraded, clean, test_degraded, test_clean = (torch.cat([as_tensor(a) for a in part])
                                                  for part in cast_pairs(size, shots, 8))

    def run():
        params = learner.adapt(degraded, clean, steps=steps)
        learner.restore(degraded), learner.restore(degraded, params)
        return params

    times = timed(run, 3, warmup=1)
    params = learner.adapt(degraded, clean, steps=steps)
    gain = psnr(learner.restore(test_degraded, params), test_clean) - psnr(learner.restore(test_degraded), test_clean)
    return {"times": times, "gain_held_out": gain}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    from serving.app import AppArgs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model URI or checkpoint directory (default: train the smoke config).")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ URIs.")
    parser.add_argument("--requests", type=int, default=100, help="Requests per 256x256 latency/throughput row.")
    parser.add_argument("--large-requests", type=int, default=20, help="Requests for the 1024x1024 row.")
    parser.add_argument("--adapters", type=int, default=5, help="Adapters created for the adapter timing "
                        "(0: skip the adapter rows).")
    parser.add_argument("--steps", type=int, default=10, help="Adaptation steps per adapter.")
    parser.add_argument("--replicas", type=int, default=1, help="Restorer replicas.")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs of the local Ray (and of the machine "
                        "used; the replicas share them).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: its CPUs, "
                        "cpus / replicas); also used for the in-process forward figures.")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--tile", type=int, default=AppArgs.model_fields["tile"].default)
    parser.add_argument("--niceness", type=lambda v: None if v == "ray" else int(v),
                        default=AppArgs.model_fields["niceness"].default, help="Of the replicas ('ray': Ray's 15).")
    parser.add_argument("--max-batch-pixels", type=int, default=AppArgs.model_fields["max_batch_pixels"].default)
    parser.add_argument("--direct-ingress", action="store_true", help="Ray Serve direct ingress: the clients "
                        "call the replica's own HTTP server (one replica); 256x256 through the proxy is measured "
                        "too, in the same run.")
    args = parser.parse_args()
    if args.direct_ingress and args.replicas != 1:
        parser.error("--direct-ingress measures one replica (each replica has its own URL)")

    import ray
    from ray import serve

    from cluster.ray_runtime import init_ray
    from metarestore.hub import load_model, portable_uri
    from metarestore.tracking import resolve_uri
    from serving.app import build_app, logging_config

    cpus_per_replica = args.cpus / args.replicas
    threads = args.threads or max(1, round(cpus_per_replica))
    tmp = tempfile.TemporaryDirectory(prefix="metarestore-bench-")
    model = args.model or smoke_model(Path(tmp.name))
    model = portable_uri(model)  # replicas run in another directory
    if args.tracking_uri:
        args.tracking_uri = resolve_uri(args.tracking_uri)
    learner, _, _ = load_model(model, args.tracking_uri)
    loads = [load()]
    forward = forward_figures(learner, threads, args.requests, args.large_requests, args.max_batch_size, args.tile,
                              args.max_batch_pixels)
    reference = reference_adapter(learner, threads, args.steps) if args.adapters else None
    loads.append(load())
    small = [png(c) for c in crops(256, args.requests)]
    large = [png(big_image(1024))] * max(1, args.large_requests)

    if args.direct_ingress:
        from serving.ingress import enable_direct_ingress

        enable_direct_ingress()  # before Ray starts
    init_ray(num_cpus=int(args.cpus))
    port = free_port()
    url = proxy_url = f"http://127.0.0.1:{port}"
    http_proxy = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config())
        serve.run(build_app({"model": model, "tracking_uri": args.tracking_uri, "num_replicas": args.replicas,
                             "num_cpus": cpus_per_replica, "threads": threads, "tile": args.tile,
                             "max_batch_size": args.max_batch_size, "max_batch_pixels": args.max_batch_pixels,
                             "niceness": args.niceness,
                             "adapter_dir": str(Path(tmp.name) / "adapters")}),
                  name="bench", route_prefix="/", logging_config=logging_config())
        if args.direct_ingress:
            from serving.ingress import direct_urls

            url = direct_urls("bench", "127.0.0.1")[0]
            http_proxy = latencies(proxy_url, small)  # the same requests through the proxy, for comparison
        http_small, http_large = latencies(url, small), latencies(url, large)
        loads.append(load())
        rates = {clients: throughput(url, small, clients) for clients in (1, 4, 8)}
        adapters = adapter_figures(url, args.adapters, args.steps) if args.adapters else None
        loads.append(load())
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    p50, p99 = (lambda v: percentile(v, 50)), (lambda v: percentile(v, 99))
    raw_rate = 1000 * args.max_batch_size / statistics.median(forward["batch"])
    print(f"\nMachine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
          f"{torch.__version__}; model {model} ({sum(p.numel() for p in learner.model.parameters()):,} "
          f"parameters); {args.replicas} Restorer replica(s) x {cpus_per_replica:g} CPU x {threads} torch "
          f"thread(s) at nice {15 if args.niceness is None else args.niceness}, max_batch_size {args.max_batch_size}, max_batch_pixels {args.max_batch_pixels}, tile "
          f"{args.tile}{'; direct ingress (clients call the replica, not the proxy)' if args.direct_ingress else ''}"
          f"; load average (1/5/15 min) "
          f"during the run: {', '.join(loads)}.\n")
    print("| measurement | p50 | p99 | throughput |")
    print("|---|---|---|---|")
    for size, fwd, (http, parts) in (("256x256", forward["256"], http_small), ("1024x1024", forward["1024"], http_large)):
        served = [p["forward"] for p in parts]
        print(f"| model forward alone, {size} (`restore_image`, in process) | {p50(fwd):.1f} ms | {p99(fwd):.1f} ms "
              f"| {1000 / statistics.median(fwd):.2f} images/s |")
        print(f"| the same forward inside the replica (Server-Timing `forward`) | {p50(served):.1f} ms | "
              f"{p99(served):.1f} ms | |")
        print(f"| `POST /v1/restore`, {size}, 1 client | {p50(http):.1f} ms | {p99(http):.1f} ms | |")
        print(f"| overhead of the request path, {size} (HTTP - the replica's forward, per request) | "
              f"{p50([h - f for h, f in zip(http, served, strict=True)]):+.1f} ms | | |")
    if http_proxy is not None:
        http, parts = http_proxy
        print(f"| `POST /v1/restore`, 256x256, 1 client, through Serve's proxy (same run) | {p50(http):.1f} ms | "
              f"{p99(http):.1f} ms | |")
        print(f"| overhead of the request path through the proxy, 256x256 | "
              f"{p50([h - p['forward'] for h, p in zip(http, parts, strict=True)]):+.1f} ms | | |")
    print(f"| raw batched forward, {args.max_batch_size} x 256x256 in one pass | "
          f"{p50(forward['batch']):.1f} ms | | {raw_rate:.2f} images/s |")
    print(f"| the same in passes of at most {args.max_batch_pixels} pixels (`max_batch_pixels`) | "
          f"{p50(forward['chunked']):.1f} ms | | {1000 * args.max_batch_size / p50(forward['chunked']):.2f} images/s |")
    for clients, (rate, mean_batch) in rates.items():
        print(f"| `POST /v1/restore` 256x256, {clients} concurrent client(s) | | | {rate:.2f} images/s "
              f"({rate / raw_rate:.2f}x raw batched; mean batch {mean_batch:.1f}) |")
    if adapters is not None and reference is not None:
        print(f"| adapter creation, 5 x 128x128, {args.steps} steps (client) | {p50(adapters['client']):.0f} ms | "
              f"{p99(adapters['client']):.0f} ms | |")
        print(f"| the same, server-side `elapsed_ms` (steps kept: {statistics.median(adapters['steps_used']):g}) | "
              f"{p50(adapters['server']):.0f} ms | {p99(adapters['server']):.0f} ms | |")
        print(f"| previous path: whole-image `learner.adapt`, {args.steps} steps + 2 restorations (in process) | "
              f"{p50(reference['times']):.0f} ms | | |")
    print("\nWhere a request's time goes, 1 client (p50 of each part, ms; Server-Timing from the replica; the hop "
          "is the client's latency less the replica's total: the proxy, the network and the client's own work):\n")
    names = ["read", "decode", "queue", "forward", "encode", "total"]
    print("| image | " + " | ".join(names) + " | client | hop |")
    print("|---|" + "---|" * (len(names) + 2))
    rows = [("256x256", http_small), ("1024x1024", http_large)]
    if http_proxy is not None:
        rows.insert(1, ("256x256 via proxy", http_proxy))
    for size, (http, parts) in rows:
        hop = [h - p["total"] for h, p in zip(http, parts, strict=True)]
        cells = [f"{p50([p.get(n, 0.0) for p in parts]):.1f}" for n in names]
        print(f"| {size} | " + " | ".join(cells) + f" | {p50(http):.1f} | {p50(hop):.1f} |")
    if adapters is not None and reference is not None:
        print(f"\nPSNR gained by the adapter on 8 held-out 128x128 crops of the same colour cast: "
              f"**{adapters['gain_held_out']:+.2f} dB** through the server (reported on its evaluation patches: "
              f"{adapters['gain_server']:+.2f} dB); the previous whole-image path: {reference['gain_held_out']:+.2f} dB.")


if __name__ == "__main__":
    main()
