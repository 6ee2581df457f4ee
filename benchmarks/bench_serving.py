"""Serving benchmark, in one run, of the application `metarestore serve` builds by default (one replica
with every CPU of the local Ray as torch threads, reached by direct ingress; `serving.settings.whole_machine`):
the model's forward pass in process at 1 and N threads against a lone client's `POST /v1/restore` (256x256
told and blind, 1024x1024) and the same through Serve's proxy, throughput with 1/4/8 clients against the raw
batched forward pass, adapter creation time (5 x 128 px pairs, path=auto) and the PSNR adapters gain; then
issue 36's targets, met or not. Prints markdown for docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_serving.py --model builtin:base            # the figures for the docs
    .venv/bin/python benchmarks/bench_serving.py --model builtin:base --quick    # a short run (noisier)
    .venv/bin/python benchmarks/bench_serving.py                        # trains the smoke model first (~1 min)
    .venv/bin/python benchmarks/bench_serving.py --model M --replicas 2 --threads 1   # compare settings
    .venv/bin/python benchmarks/bench_serving.py --model M --proxy      # every request through Serve's proxy

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
                    max_batch_pixels: int | None, family: str | None) -> dict:
    """The model alone, in this process: one image of each size (tiled as the server tiles), and a batch;
    256x256 also on one thread ("256_1") and told ``family`` ("256_told"). Run as the replica runs it: in a
    worker thread, with ``threads`` torch threads set in that thread."""
    from metarestore.inference import restore_image

    small, large = as_tensor(crops(256, 1)[0]), as_tensor(big_image(1024))
    batched = torch.cat([small] * batch)
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as worker:
        one = timed(lambda: worker.submit(restore_image, learner, small, tile=tile).result(), repeats)
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,)) as worker:
        def run(x, **kw):
            return lambda: worker.submit(restore_image, learner, x, tile=tile, **kw).result()

        return {
            "256_1": one,
            "256_told": timed(run(small, family=family), repeats) if family else None,
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


def post_restore(session: requests.Session, url: str, body: bytes, adapter: str | None = None,
                 degradation: str | None = None) -> requests.Response:
    params = {k: v for k, v in (("adapter", adapter), ("degradation", degradation)) if v}
    response = session.post(f"{url}/v1/restore", data=body, headers={"Content-Type": "image/png"},
                            params=params or None, timeout=300)
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


def latencies(url: str, bodies: list[bytes], degradation: str | None = None
              ) -> tuple[list[float], list[dict[str, float]]]:
    """Client latencies (ms) of one request at a time (blind, or told ``degradation``), and each answer's
    Server-Timing parts."""
    session = requests.Session()
    post_restore(session, url, bodies[0], degradation=degradation)
    times, parts = [], []
    for body in bodies:
        start = time.perf_counter()
        response = post_restore(session, url, body, degradation=degradation)
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
    return {"client": client, "server": [i["elapsed_ms"] for i in infos], "path": infos[0].get("path"),
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


def told_family(learner) -> str | None:
    """A family the model can be told (noise first: what the crops have), for the told rows; None: blind only."""
    known = list(getattr(learner.model, "hint_families", ()))
    return next((f for f in known if "noise" in f), known[0] if known else None)


def arguments() -> argparse.Namespace:
    from serving.settings import AppArgs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model URI or checkpoint directory (default: train the smoke config).")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ URIs.")
    parser.add_argument("--requests", type=int, default=100, help="Requests per 256x256 latency/throughput row.")
    parser.add_argument("--large-requests", type=int, default=20, help="Requests for the 1024x1024 row.")
    parser.add_argument("--adapters", type=int, default=10, help="Adapters created for the adapter timing "
                        "(0: skip the adapter rows).")
    parser.add_argument("--quick", action="store_true", help="A short run: 16 requests per row, 2 of 1024x1024, "
                        "4 adapters, no whole-image adaptation reference (noisier figures).")
    parser.add_argument("--steps", type=int, default=10, help="Adaptation steps per adapter.")
    parser.add_argument("--replicas", type=int, default=1, help="Restorer replicas.")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs of the local Ray (and of the machine "
                        "used; the replicas share them).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: its CPUs, "
                        "cpus / replicas); also the N of the in-process forward figures.")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--tile", type=int, default=AppArgs.model_fields["tile"].default)
    parser.add_argument("--niceness", type=lambda v: None if v == "ray" else int(v),
                        default=AppArgs.model_fields["niceness"].default, help="Of the replicas ('ray': Ray's 15).")
    parser.add_argument("--max-batch-pixels", type=int, default=AppArgs.model_fields["max_batch_pixels"].default)
    parser.add_argument("--proxy", action="store_true", help="Every request through Serve's proxy (as "
                        "`metarestore serve --proxy`, and always with --replicas N); default, as `metarestore "
                        "serve`: direct ingress, with 256x256 through the proxy measured too, in the same run.")
    parser.add_argument("--direct-ingress", action="store_true", help="(The default with one replica; kept for "
                        "earlier command lines.)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.large_requests, args.adapters = 16, 2, min(args.adapters, 4)
    if args.direct_ingress and (args.proxy or args.replicas != 1):
        parser.error("--direct-ingress measures one replica (each replica has its own URL), not with --proxy")
    args.direct = args.replicas == 1 and not args.proxy
    return args


def app_settings(args, model: str, adapter_dir: str):
    """What ``metarestore serve`` builds (one replica: ``whole_machine``), with this run's options."""
    from serving.settings import AppArgs, whole_machine

    cfg = AppArgs(model=model, tracking_uri=args.tracking_uri, num_replicas=args.replicas,
                  num_cpus=args.cpus / args.replicas, threads=args.threads, tile=args.tile,
                  max_batch_size=args.max_batch_size, max_batch_pixels=args.max_batch_pixels,
                  niceness=args.niceness, adapter_dir=adapter_dir)
    return whole_machine(cfg, args.cpus) if args.replicas == 1 else cfg


def main() -> None:
    args = arguments()

    import ray
    from ray import serve

    from cluster.ray_runtime import init_ray
    from metarestore.hub import load_model, portable_uri
    from metarestore.tracking import resolve_uri
    from serving.app import build_app, logging_config

    tmp = tempfile.TemporaryDirectory(prefix="metarestore-bench-")
    model = args.model or smoke_model(Path(tmp.name))
    model = portable_uri(model)  # replicas run in another directory
    if args.tracking_uri:
        args.tracking_uri = resolve_uri(args.tracking_uri)
    cfg = app_settings(args, model, str(Path(tmp.name) / "adapters"))
    threads = cfg.torch_threads()
    learner, _, _ = load_model(model, args.tracking_uri)
    family = told_family(learner)
    loads = [load()]
    forward = forward_figures(learner, threads, args.requests, args.large_requests, args.max_batch_size, args.tile,
                              args.max_batch_pixels, family)
    reference = reference_adapter(learner, threads, args.steps) if args.adapters and not args.quick else None
    loads.append(load())
    small = [png(c) for c in crops(256, args.requests)]
    large = [png(big_image(1024))] * max(1, args.large_requests)

    port, direct_port = free_port(), free_port()
    if args.direct:
        from serving.ingress import enable_direct_ingress

        enable_direct_ingress(port=direct_port)  # before Ray starts, as `metarestore serve` does
    init_ray(num_cpus=int(args.cpus))
    url = proxy_url = f"http://127.0.0.1:{port}"
    http_proxy = http_told = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config())
        serve.run(build_app(cfg), name="bench", route_prefix="/", logging_config=logging_config())
        if args.direct:
            from serving.ingress import direct_urls

            url = direct_urls("bench", "127.0.0.1")[0]
            assert url == f"http://127.0.0.1:{direct_port}", url
            http_proxy = latencies(proxy_url, small)  # the same requests through the proxy, for comparison
        http_small, http_large = latencies(url, small), latencies(url, large)
        if family:
            http_told = latencies(url, small, family)
        loads.append(load())
        rates = {clients: throughput(url, small, clients) for clients in (1, 4, 8)}
        adapters = adapter_figures(url, args.adapters, args.steps) if args.adapters else None
        loads.append(load())
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    report(args, cfg, model, learner, loads, forward, reference, http_small, http_large, http_told, http_proxy,
           family, rates, adapters)


def report(args, cfg, model, learner, loads, forward, reference, http_small, http_large, http_told, http_proxy,
           family, rates, adapters) -> None:
    """The figures as markdown: the table, where a lone request's time goes, issue 36's targets."""
    p50, p99 = (lambda v: percentile(v, 50)), (lambda v: percentile(v, 99))
    threads = cfg.torch_threads()
    raw_rate = 1000 * args.max_batch_size / min(p50(forward["batch"]), p50(forward["chunked"]))
    print(f"\nMachine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
          f"{torch.__version__}; model {model} ({sum(p.numel() for p in learner.model.parameters()):,} "
          f"parameters); {args.replicas} Restorer replica(s) x {cfg.num_cpus:g} CPU x {threads} torch "
          f"thread(s) at nice {15 if args.niceness is None else args.niceness}, max_batch_size "
          f"{args.max_batch_size}, max_batch_pixels {args.max_batch_pixels}, tile {args.tile}"
          f"{'; direct ingress at its own port (as `metarestore serve`)' if args.direct else '; through the proxy'}"
          f"; load average (1/5/15 min) during the run: {', '.join(loads)}.\n")
    print("| measurement | p50 | p99 | throughput |")
    print("|---|---|---|---|")
    print(f"| model forward alone, 256x256, 1 thread (in process) | {p50(forward['256_1']):.1f} ms | "
          f"{p99(forward['256_1']):.1f} ms | {1000 / p50(forward['256_1']):.2f} images/s |")
    rows = [("256x256 blind", forward["256"], http_small), ("1024x1024 blind", forward["1024"], http_large)]
    if http_told is not None:
        rows.insert(0, (f"256x256 told {family}", forward["256_told"], http_told))
    for size, fwd, (http, parts) in rows:
        served = [p["forward"] for p in parts]
        print(f"| model forward alone, {size}, {threads} threads (`restore_image`, in process) | {p50(fwd):.1f} ms "
              f"| {p99(fwd):.1f} ms | {1000 / p50(fwd):.2f} images/s |")
        print(f"| the same forward inside the replica (Server-Timing `forward`) | {p50(served):.1f} ms | "
              f"{p99(served):.1f} ms | |")
        print(f"| `POST /v1/restore`, {size}, 1 client | {p50(http):.1f} ms | {p99(http):.1f} ms | |")
        outside = [h - f - p.get("estimate", 0.0) for h, f, p in zip(http, served, parts, strict=True)]
        print(f"| the request path outside the forward pass and the estimate, {size} | {p50(outside):+.1f} ms | | |")
    if http_proxy is not None:
        http, parts = http_proxy
        print(f"| `POST /v1/restore`, 256x256 blind, 1 client, through Serve's proxy (same run) | {p50(http):.1f} ms "
              f"| {p99(http):.1f} ms | |")
        print(f"| the request path through the proxy outside the forward pass and the estimate | "
              f"{p50([h - p['forward'] - p.get('estimate', 0.0) for h, p in zip(http, parts, strict=True)]):+.1f}"
              f" ms | | |")
    print(f"| raw batched forward, {args.max_batch_size} x 256x256 in one pass | "
          f"{p50(forward['batch']):.1f} ms | | {1000 * args.max_batch_size / p50(forward['batch']):.2f} images/s |")
    print(f"| the same in passes of at most {args.max_batch_pixels} pixels (`max_batch_pixels`) | "
          f"{p50(forward['chunked']):.1f} ms | | {1000 * args.max_batch_size / p50(forward['chunked']):.2f} images/s |")
    for clients, (rate, mean_batch) in rates.items():
        print(f"| `POST /v1/restore` 256x256 blind, {clients} concurrent client(s) | | | {rate:.2f} images/s "
              f"({rate / raw_rate:.2f}x the faster raw batched; mean batch {mean_batch:.1f}) |")
    if adapters is not None:
        print(f"| adapter creation, 5 x 128x128, {args.steps} steps, path=auto (client; max) | "
              f"{p50(adapters['client']):.0f} ms | {max(adapters['client']):.0f} ms | |")
        print(f"| the same, server-side `elapsed_ms` (steps kept: {statistics.median(adapters['steps_used']):g}; "
              f"max) | {p50(adapters['server']):.0f} ms | {max(adapters['server']):.0f} ms | |")
    if reference is not None:
        print(f"| previous path: whole-image `learner.adapt`, {args.steps} steps + 2 restorations (in process) | "
              f"{p50(reference['times']):.0f} ms | | |")
    print("\nWhere a request's time goes, 1 client (p50 of each part, ms; Server-Timing from the replica; the hop "
          "is the client's latency less the replica's total: the proxy, the network and the client's own work):\n")
    names = ["read", "decode", "queue", "estimate", "forward", "encode", "total"]
    print("| image | " + " | ".join(names) + " | client | hop |")
    print("|---|" + "---|" * (len(names) + 2))
    parted = [(size, http) for size, _, http in rows]
    if http_proxy is not None:
        parted.insert(len(parted) - 1, ("256x256 blind via proxy", http_proxy))
    for size, (http, parts) in parted:
        hop = [h - p["total"] for h, p in zip(http, parts, strict=True)]
        cells = [f"{p50([p.get(n, 0.0) for p in parts]):.1f}" for n in names]
        print(f"| {size} | " + " | ".join(cells) + f" | {p50(http):.1f} | {p50(hop):.1f} |")
    if adapters is not None:
        previous = "" if reference is None else f"; the previous whole-image path: {reference['gain_held_out']:+.2f} dB"
        print(f"\nPSNR gained by the adapter on 8 held-out 128x128 crops of the same colour cast: "
              f"**{adapters['gain_held_out']:+.2f} dB** through the server (path {adapters['path']}; reported on its "
              f"evaluation patches: {adapters['gain_server']:+.2f} dB){previous}.")
    targets(args, forward, rows, rates, raw_rate, adapters, threads)


def targets(args, forward, rows, rates, raw_rate, adapters, threads) -> None:
    """Issue 36's "done when", each with what was measured."""
    p50, p99 = (lambda v: percentile(v, 50)), (lambda v: percentile(v, 99))
    print(f"\nIssue 36's targets (N = {threads} threads):\n")
    print("| target | measured | |")
    print("|---|---|---|")

    def row(target: str, measured: str, met: bool) -> None:
        print(f"| {target} | {measured} | {'met' if met else '**not met**'} |")

    for size, fwd, (http, parts) in rows[:-1]:  # the 256x256 rows
        if "blind" in size:  # the plan runs a told pass per family found: the replica's passes, and the estimate
            passes = p50([p["forward"] + p.get("estimate", 0.0) for p in parts])
            row(f"1 client, {size}: p50 <= the replica's passes + the estimate + 10 ms", f"{p50(http):.1f} ms "
                f"against {passes:.1f} + 10", p50(http) <= passes + 10)
        else:
            row(f"1 client, {size}: p50 <= N-thread forward + 10 ms", f"{p50(http):.1f} ms against "
                f"{p50(fwd):.1f} + 10", p50(http) <= p50(fwd) + 10)
        row(f"1 client, {size}: p99 <= 2x p50", f"{p99(http):.1f} ms against {2 * p50(http):.1f}",
            p99(http) <= 2 * p50(http))
    rate = rates[8][0]
    row("8 clients >= 0.9x the raw batched forward", f"{rate:.2f} images/s against {raw_rate:.2f} "
        f"({rate / raw_rate:.2f}x)", rate >= 0.9 * raw_rate)
    if adapters is not None:
        client = adapters["client"]
        row("adapter (5 x 128 px, 10 steps, auto): p50 <= 700 ms, max <= 1000 ms", f"p50 {p50(client):.0f} ms, "
            f"max {max(client):.0f} ms (client side, {len(client)} adapters)", p50(client) <= 700 and max(client) <= 1000)


if __name__ == "__main__":
    main()
