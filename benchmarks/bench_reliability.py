"""Reliability benchmark against a real server at the default limits: malformed requests (no 5xx allowed),
a Restorer replica killed under load, stalled uploads held open next to a healthy client, and the peak
memory of a replica per request kind. Prints markdown for docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_reliability.py                    # trains the smoke model first (~1 min)
    .venv/bin/python benchmarks/bench_reliability.py --model runs/cbsd432/final --malformed 1000

Starts its own local Ray (2 CPUs) and Serve on 127.0.0.1 with 2 Restorer replicas x 1 CPU and the
defaults of serving.app.AppArgs otherwise; everything is stopped at the end. Memory is each replica
process's resident set read from /proc (peak: VmHWM, reset before each request kind through
/proc/PID/clear_refs; Linux, and the replicas must be this user's processes).
"""

from __future__ import annotations

import argparse
import io
import random
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from bench_serving import big_image, crops, free_port, load, png, smoke_model
from PIL import Image

APP = "reliability"


# malformed requests -----------------------------------------------------------------------------------
def malformed_requests(count: int, seed: int = 0) -> list[dict]:
    """``count`` bad requests (kwargs for requests.request), drawn from many kinds of wrongness."""
    rng = random.Random(seed)
    good = png(crops(64, 1)[0])
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, format="PNG")
    huge_header = bytearray(bomb.getvalue())
    huge_header[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # IHDR: 100k x 100k

    def flipped() -> bytes:
        data = bytearray(good)
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(8, len(data))] = rng.randrange(256)
        return bytes(data)

    def restore(body: bytes, ctype: str = "image/png", **extra) -> dict:
        return {"method": "POST", "path": "/v1/restore", "data": body, "headers": {"Content-Type": ctype}, **extra}

    def adapter(files: list, data: dict | None = None) -> dict:
        return {"method": "POST", "path": "/v1/adapters", "files": files, "data": data or {}}

    kinds = [
        lambda: restore(b""),
        lambda: restore(rng.randbytes(rng.randint(1, 5000))),
        lambda: restore(good[: rng.randint(1, len(good) - 1)]),  # truncated
        lambda: restore(flipped()),  # corrupted chunks
        lambda: restore(bytes(huge_header)),  # claims 10 gigapixels
        lambda: restore(gif.getvalue()),
        lambda: restore(good, rng.choice(["text/plain", "application/json", "", "image/gif", "image/bmp"])),
        lambda: restore(good, "multipart/form-data; boundary=zz"),  # not multipart at all
        lambda: {"method": "POST", "path": "/v1/restore", "files": {"other": ("a.png", good, "image/png")}},
        lambda: restore(good, params={"adapter": rng.choice(["nope", "x" * 300, "../../etc/passwd", "%00"])}),
        lambda: adapter([("degraded", ("d.png", good, "image/png"))]),  # no clean
        lambda: adapter([("degraded", ("d.png", good, "image/png")), ("clean", ("c.png", flipped(), "image/png"))]),
        lambda: adapter([("degraded", ("d.png", good, "image/png")), ("clean", ("c.png", good, "image/png"))],
                        {"steps": rng.choice(["-1", "0", "abc", "1e9", "51", ""])}),
        lambda: adapter([("degraded", ("d.png", good, "image/png")), ("clean", ("c.png", good, "image/png"))],
                        {"label": "\x00" * rng.randint(1, 300)}),
        lambda: adapter([("degraded", ("d.png", good, "image/png"))] * 17 + [("clean", ("c.png", good, "image/png"))]
                        * 17),
        lambda: {"method": "POST", "path": "/v1/adapters", "data": rng.randbytes(200),
                 "headers": {"Content-Type": "multipart/form-data; boundary=" + "b" * rng.randint(1, 80)}},
        lambda: {"method": rng.choice(["PUT", "PATCH", "DELETE"]), "path": "/v1/restore", "data": good},
        lambda: {"method": "GET", "path": rng.choice(["/v1/adapters/" + "z" * rng.randint(1, 500), "/nope",
                                                      "/v1/restore", "/v1/../../x"])},
        lambda: {"method": "DELETE", "path": "/v1/adapters/does-not-exist"},
        lambda: restore(good, headers={"Content-Type": "image/png", "X-Pad": "p" * 20_000}),  # header too big
    ]
    picks = [rng.randrange(len(kinds)) for _ in range(count)]
    return [{**kinds[k](), "kind": k} for k in picks]


def send(url: str, spec: dict) -> tuple[int, bool]:
    """(status, whether the body is the API's error shape)."""
    spec = dict(spec)
    method, path = spec.pop("method"), spec.pop("path")
    spec.pop("kind")
    try:
        response = requests.request(method, url + path, timeout=120, **spec)
    except requests.RequestException:
        return -1, False
    try:
        error = response.json()["error"]
        shaped = bool(error["code"]) and bool(error["message"])
    except Exception:
        shaped = False
    return response.status_code, shaped


def malformed_figures(url: str, count: int) -> dict:
    specs = malformed_requests(count)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda spec: send(url, spec), specs))
    statuses = [s for s, _ in results]
    odd = sorted({(spec["kind"], status, shaped) for spec, (status, shaped) in zip(specs, results, strict=True)
                  if status < 400 or status >= 500 or not shaped})
    return {"sent": count, "4xx": sum(400 <= s < 500 for s in statuses), "5xx": sum(s >= 500 for s in statuses),
            "other": sum(s < 400 for s in statuses), "unshaped_4xx": sum(400 <= s < 500 and not ok for s, ok in results),
            "codes": sorted(set(statuses)), "odd": odd}


# a replica killed under load ------------------------------------------------------------------------------
def replicas(deployment: str) -> list[dict]:
    from ray.util.state import list_actors

    found = list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:{deployment}"), ("state", "=", "ALIVE")])
    return [{"name": a.name, "pid": a.pid} for a in found]


def kill_figures(url: str, clients: int, before_s: float, after_s: float) -> dict:
    import ray

    body = png(crops(256, 1)[0])
    stop, outcomes = threading.Event(), []  # (time, ok)

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                ok = session.post(f"{url}/v1/restore", data=body, headers={"Content-Type": "image/png"},
                                  timeout=120).status_code == 200
            except requests.RequestException:
                ok = False
            outcomes.append((time.monotonic(), ok))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(before_s)
    victim = replicas("Restorer")[0]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
    recovered_at = None
    deadline = killed_at + max(after_s, 120)
    while time.monotonic() < deadline:
        alive = replicas("Restorer")
        if len(alive) >= 2 and victim["name"] not in {a["name"] for a in alive} and recovered_at is None:
            recovered_at = time.monotonic()
        if recovered_at is not None and time.monotonic() > killed_at + after_s:
            break
        time.sleep(0.25)
    stop.set()
    for t in threads:
        t.join()
    failed = [t for t, ok in outcomes if not ok]
    return {"requests": len(outcomes), "failed": len(failed),
            "recovery_s": None if recovered_at is None else recovered_at - killed_at,
            "last_failure_s": max(failed) - killed_at if failed else None}


# stalled uploads -------------------------------------------------------------------------------------------
def stalled_upload(port: int) -> socket.socket:
    """Declares a 100,000-byte PNG body, sends 100 bytes of it and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/restore HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 100000\r\n\r\n" + b"\x89PNG\r\n\x1a\n" + bytes(92))
    return sock


def healthy_latencies(url: str, body: bytes, count: int) -> tuple[list[float], int]:
    """Latency of a polite client (retries a 503 after its Retry-After) and the number of 503s it saw."""
    session, times, refused = requests.Session(), [], 0
    for _ in range(count):
        start = time.perf_counter()
        while True:
            response = session.post(f"{url}/v1/restore", data=body, headers={"Content-Type": "image/png"},
                                    timeout=120)
            if response.status_code != 503:
                break
            refused += 1
            time.sleep(float(response.headers.get("Retry-After", "1")))
        response.raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    return times, refused


def stalled_figures(url: str, port: int, stalled: int, count: int) -> dict:
    body = png(crops(256, 1)[0])
    alone, _ = healthy_latencies(url, body, count)
    sockets = [stalled_upload(port) for _ in range(stalled)]
    try:
        time.sleep(1.0)
        held, refused = healthy_latencies(url, body, count)
    finally:
        for sock in sockets:
            sock.close()
    return {"stalled": stalled, "alone_p50": statistics.median(alone), "held_p50": statistics.median(held),
            "held_max": max(held), "refused": refused}


# memory -------------------------------------------------------------------------------------------------------
def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_figures(url: str) -> list[tuple[str, float, float, float]]:
    """(request kind, replica RSS before MiB, peak MiB, after MiB): the largest over the replicas."""
    small, large = png(crops(256, 1)[0]), png(big_image(1024))
    shots = crops(128, 5)
    pairs = [("degraded", ("d.png", png(np.clip(c * [1.25, 1.0, 0.8], 0, 255).astype(np.uint8)), "image/png"))
             for c in shots] + [("clean", ("c.png", png(c), "image/png")) for c in shots]
    side = 500  # 16 pairs of 500x500: the default max_adapt_pixels (4 MP) of support images
    wide = [big_image(side)] * 16
    wide_pairs = [("degraded", ("d.png", png(w), "image/png")) for w in wide] + \
                 [("clean", ("c.png", png(w), "image/png")) for w in wide]
    kinds = [
        ("restore 256x256", lambda: requests.post(f"{url}/v1/restore", data=small,
                                                  headers={"Content-Type": "image/png"}, timeout=600)),
        ("restore 1024x1024", lambda: requests.post(f"{url}/v1/restore", data=large,
                                                    headers={"Content-Type": "image/png"}, timeout=600)),
        ("adapter, 5 x 128x128, 10 steps", lambda: requests.post(f"{url}/v1/adapters", files=pairs,
                                                                  data={"steps": "10"}, timeout=600)),
        ("adapter, 16 x 500x500 (4 MP, the limit), 10 steps",
         lambda: requests.post(f"{url}/v1/adapters", files=wide_pairs, data={"steps": "10"}, timeout=600)),
    ]
    rows = []
    for what, call in kinds:
        pids = [r["pid"] for r in replicas("Restorer")]
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = {pid: proc_kb(pid, "VmRSS") for pid in pids}
        for _ in range(2):  # twice: routing may pick either replica; the peak is per process
            response = call()
            response.raise_for_status()
        time.sleep(1.0)
        growth = {pid: proc_kb(pid, "VmHWM") - before[pid] for pid in pids}
        pid = max(growth, key=growth.get)
        rows.append((what, before[pid] / 1024, proc_kb(pid, "VmHWM") / 1024, proc_kb(pid, "VmRSS") / 1024))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model URI or checkpoint directory (default: train the smoke config).")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ URIs.")
    parser.add_argument("--malformed", type=int, default=400, help="Malformed requests to send.")
    parser.add_argument("--clients", type=int, default=4, help="Clients restoring while a replica is killed.")
    parser.add_argument("--stalled", type=int, default=40, help="Stalled uploads held open (default limit: "
                        "32 per replica).")
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.ray_runtime import init_ray
    from metarestore.hub import portable_uri
    from metarestore.tracking import resolve_uri
    from serving.app import build_app

    tmp = tempfile.TemporaryDirectory(prefix="metarestore-reliability-")
    model = args.model or smoke_model(Path(tmp.name))
    model = portable_uri(model)  # replicas run in another directory
    tracking = resolve_uri(args.tracking_uri) if args.tracking_uri else None
    init_ray(num_cpus=2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    loads = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": model, "tracking_uri": tracking, "num_replicas": 2, "num_cpus": 1,
                             "adapter_dir": str(Path(tmp.name) / "adapters")}), name=APP, route_prefix="/")
        loads.append(load())
        memory = memory_figures(url)
        loads.append(load())
        malformed = malformed_figures(url, args.malformed)
        loads.append(load())
        stalled = stalled_figures(url, port, args.stalled, 10)
        loads.append(load())
        kill = kill_figures(url, args.clients, before_s=5.0, after_s=20.0)
        loads.append(load())
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    print(f"\nModel {model}; 2 Restorer replicas x 1 CPU, AppArgs defaults otherwise; load average (1/5/15 min) "
          f"during the run: {', '.join(loads)}.\n")
    print(f"**Malformed requests**: {malformed['sent']} sent (20 kinds: random/truncated/corrupted bytes, a "
          f"100k x 100k header, GIF, wrong content types, broken multipart, bad fields, 17 pairs, unknown "
          f"routes/methods, 20 KB headers): **{malformed['5xx']} 5xx**, {malformed['4xx']} 4xx "
          f"({malformed['unshaped_4xx']} without the error JSON), {malformed['other']} other; statuses seen: "
          f"{malformed['codes']}; (kind, status, error JSON) of the rest: {malformed['odd']} (-1: no HTTP answer).\n")
    recovery = "not within 120 s" if kill["recovery_s"] is None else f"{kill['recovery_s']:.1f} s"
    last = "none" if kill["last_failure_s"] is None else f"{kill['last_failure_s']:+.1f} s"
    print(f"**Replica killed under load** ({args.clients} clients restoring 256x256 continuously, one of the 2 "
          f"Restorer replicas killed with `ray.kill`): {kill['failed']} of {kill['requests']} requests failed "
          f"(last failure at {last} from the kill); the replacement replica was running after {recovery}.\n")
    print(f"**Stalled uploads**: {stalled['stalled']} clients each declaring a 100 KB body and sending 100 bytes; "
          f"a healthy client's 256x256 restore p50 {stalled['alone_p50']:.0f} ms alone, "
          f"{stalled['held_p50']:.0f} ms (max {stalled['held_max']:.0f} ms) while they are held open, "
          f"{stalled['refused']} 503 (retried after Retry-After).\n")
    print("| request kind (at the default limits) | replica RSS before | peak | after (1 s later) |")
    print("|---|---|---|---|")
    for what, before, peak, after in memory:
        print(f"| {what} | {before:.0f} MiB | {peak:.0f} MiB (+{peak - before:.0f}) | {after:.0f} MiB |")


if __name__ == "__main__":
    main()
