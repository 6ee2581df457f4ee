"""The service is safe to share: one replica serving restores and adapter creations at once gives every
client exactly what it would get alone. Real Ray Serve on 127.0.0.1, real HTTP, real photographs."""

from __future__ import annotations

import io
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import skimage.data
import torch
from PIL import Image
from test_serving import (
    assert_error,
    blurred,
    decode,
    degrade,
    free_port,
    pairs_files,
    photo,
    quantised,
    restore,
)

pytestmark = pytest.mark.slow

APP = "safety"
TOL = 1.5 / 255  # the same model on the same pixels; a different batching may move a value by one 8-bit level


@pytest.fixture(scope="module")
def safe_server(ray_local, smoke_model, tmp_path_factory):
    from ray import serve

    from serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": smoke_model["checkpoint"], "num_replicas": 1, "num_cpus": 0.5, "tile": 256,
            "max_pixels": 1_000_000, "max_body_mb": 4, "adapter_dir": str(tmp_path_factory.mktemp("adapters")),
            "max_uploads": 16, "body_timeout_s": 2.0,
            "compute_slots": 2}  # two compute threads and model copies: concurrent work must not leak
    try:
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", args=args)
    finally:
        serve.shutdown()


def support(k: int, n: int = 4, size: int = 80) -> tuple[list, list]:
    """Pair set ``k``: crops of two photographs with colour casts of a severity of its own; set 4 is an
    unseen blur instead (its adapter takes an operator path)."""
    clean = [quantised(photo(("astronaut", "coffee")[i % 2], 30 * i + 11 * k, 40 * i + 7 * k, size))
             for i in range(n)]
    if k == 4:
        return [blurred(x) for x in clean], clean
    degraded = [degrade("color_cast", x, 0.5 + 0.1 * k, seed=k, noise_seed=i) for i, x in enumerate(clean)]
    return degraded, clean


def create(url: str, k: int, steps: int = 8) -> requests.Response:
    degraded, clean = support(k)
    return requests.post(f"{url}/v1/adapters", files=pairs_files(degraded, clean), data={"steps": str(steps)},
                         timeout=300)


def test_concurrent_restores_and_adaptations_equal_sequential(safe_server):
    url = safe_server.url
    images = [degrade("gaussian_noise", quantised(photo(name, 60 * i, 50 * i, 64)), 0.5, seed=i)
              for i, name in enumerate(["chelsea", "rocket", "astronaut", "coffee", "chelsea", "rocket"])]
    # one at a time: the reference
    plain = [decode(restore(url, x).content) for x in images]
    base = create(url, 0)
    assert base.status_code == 200, base.text
    base_id = base.json()["adapter_id"]
    adapted = [decode(restore(url, x, adapter=base_id).content) for x in images]
    alone = {k: create(url, k).json() for k in (1, 2, 3, 4)}
    probe = images[0]
    probe_alone = {k: decode(restore(url, probe, adapter=info["adapter_id"]).content) for k, info in alone.items()}

    # all at once on the one replica: 4 adapter creations, and restores with and without an adapter
    # for as long as the creations run (so they overlap whatever the machine's speed)
    with ThreadPoolExecutor(12) as pool:
        creations = {k: pool.submit(create, url, k) for k in (1, 2, 3, 4)}
        restores = []
        rounds = 0
        while not all(f.done() for f in creations.values()) and rounds < 40:
            restores += [(i, None, pool.submit(restore, url, images[i])) for i in range(len(images))]
            restores += [(i, base_id, pool.submit(restore, url, images[i], base_id)) for i in range(3)]
            rounds += 1
            time.sleep(0.2)
        created = {k: f.result() for k, f in creations.items()}
        answers = [(i, a, f.result()) for i, a, f in restores]

    assert all(r.status_code == 200 for r in created.values()), [r.text for r in created.values()]
    assert len(answers) >= 9
    for i, adapter, response in answers:
        assert response.status_code == 200, response.text
        expected = adapted[i] if adapter else plain[i]
        assert (decode(response.content) - expected).abs().max() <= TOL, (i, adapter)
    for k, response in created.items():
        info = response.json()
        assert info["path"] == alone[k]["path"], k
        for key in ("psnr_input", "psnr_zero_shot", "psnr_adapted"):
            assert abs(info[key] - alone[k][key]) <= 0.01, (k, key, info[key], alone[k][key])
        served = decode(restore(url, probe, adapter=info["adapter_id"]).content)
        assert (served - probe_alone[k]).abs().max() <= TOL, k
    assert len({r.json()["adapter_id"] for r in created.values()}) == 4


def test_four_concurrent_adapter_creations_all_succeed(safe_server):
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda k: create(safe_server.url, k, steps=3), (5, 6, 7, 8)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    ids = {r.json()["adapter_id"] for r in responses}
    assert len(ids) == 4
    for adapter_id in ids:
        assert requests.get(f"{safe_server.url}/v1/adapters/{adapter_id}", timeout=30).status_code == 200


# durable adapters ---------------------------------------------------------------------------------------
def test_adapters_are_listed_labelled_and_deleted_from_storage(safe_server):
    from pathlib import Path

    degraded, clean = support(9)
    response = requests.post(f"{safe_server.url}/v1/adapters", files=pairs_files(degraded[:1], clean[:1]),
                             data={"steps": "1", "label": "scanner 3"}, timeout=300)
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["label"] == "scanner 3"
    listed = requests.get(f"{safe_server.url}/v1/adapters", timeout=30).json()["adapters"]
    assert info["adapter_id"] in {a["adapter_id"] for a in listed}
    stored = Path(safe_server.args["adapter_dir"])
    assert (stored / f"{info['adapter_id']}.json").is_file()
    assert (stored / f"{info['adapter_id']}.safetensors").is_file()
    assert requests.delete(f"{safe_server.url}/v1/adapters/{info['adapter_id']}", timeout=30).status_code == 200
    assert not list(stored.glob(f"{info['adapter_id']}.*"))
    bad = requests.post(f"{safe_server.url}/v1/adapters", files=pairs_files(degraded[:1], clean[:1]),
                        data={"label": "x" * 201}, timeout=60)
    assert_error(bad, 400, "invalid_label")
    for h, w in ((1, 1), (3, 200)):  # too few pixels to fit anything: a 422 that names the minimum, not a 500
        tiny = requests.post(f"{safe_server.url}/v1/adapters", timeout=60,
                             files=pairs_files([d[..., :h, :w] for d in degraded[:2]], [c[..., :h, :w] for c in clean[:2]]))
        assert_error(tiny, 422, "adapter_fit_failed")
        assert "at least 8x8" in tiny.json()["error"]["message"], tiny.text


# image modes ----------------------------------------------------------------------------------------------
def encoded(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def served(url: str, data: bytes, content_type: str = "image/png") -> Image.Image:
    response = requests.post(f"{url}/v1/restore", data=data, headers={"Content-Type": content_type}, timeout=120)
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_image_modes_come_back_right(safe_server):
    url = safe_server.url
    grey8 = skimage.data.camera()[100:196, 100:196]
    reference = np.asarray(served(url, encoded(Image.fromarray(grey8))), dtype=np.float32)

    # 16-bit greyscale: the same picture at 16 bits comes back like the 8-bit one (scaled, not clipped)
    wide = served(url, encoded(Image.fromarray(grey8.astype(np.uint16) * 257)))
    assert wide.mode == "L" and np.abs(np.asarray(wide, dtype=np.float32) - reference).max() <= 2

    # EXIF orientation 6 (rotate 90 degrees clockwise to view): the answer is upright, as a viewer shows it
    photo_rgb = skimage.data.astronaut()[0:64, 0:96]
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = served(url, encoded(Image.fromarray(photo_rgb), "JPEG", quality=95, exif=exif), "image/jpeg")
    upright = served(url, encoded(Image.fromarray(np.rot90(photo_rgb, -1).copy()), "JPEG", quality=95),
                     "image/jpeg")
    assert rotated.size == (64, 96) == upright.size
    assert np.abs(np.asarray(rotated, dtype=np.float32) - np.asarray(upright, dtype=np.float32)).mean() < 8

    # transparency is composited on white; palette and CMYK images are colour images
    rgba = np.dstack([photo_rgb, np.zeros(photo_rgb.shape[:2], np.uint8)])
    clear = served(url, encoded(Image.fromarray(rgba)))
    white = served(url, encoded(Image.new("RGB", (96, 64), "white")))
    assert clear.mode == "RGB" and np.array_equal(np.asarray(clear), np.asarray(white))
    plain = np.asarray(served(url, encoded(Image.fromarray(photo_rgb))), dtype=np.float32)
    palette = served(url, encoded(Image.fromarray(photo_rgb).quantize(256)))
    assert palette.mode == "RGB" and np.abs(np.asarray(palette, dtype=np.float32) - plain).mean() < 10
    cmyk = served(url, encoded(Image.fromarray(photo_rgb).convert("CMYK"), "JPEG", quality=95), "image/jpeg")
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, dtype=np.float32) - plain).mean() < 8

    strip = encoded(Image.new("L", (2000, 4)))
    assert_error(requests.post(f"{url}/v1/restore", data=strip, headers={"Content-Type": "image/png"},
                               timeout=60), 422, "extreme_aspect_ratio")


# slow clients ---------------------------------------------------------------------------------------------
def stalled_upload(port: int) -> socket.socket:
    """A client that declares a 100,000-byte PNG body, sends 100 bytes of it and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/restore HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 100000\r\n\r\n" + b"\x89PNG\r\n\x1a\n" + bytes(92))
    return sock


def test_stalled_uploads_do_not_starve_a_healthy_client(safe_server):
    port = int(safe_server.url.rsplit(":", 1)[1])
    image = photo("coffee", 0, 0, 64)
    restore(safe_server.url, image)  # warm
    stalled = [stalled_upload(port) for _ in range(40)]
    try:
        time.sleep(1.0)  # they all reach the replica and hold what they can
        start = time.monotonic()
        while True:  # a polite client: retries a 503 after its Retry-After
            response = restore(safe_server.url, image)
            if response.status_code != 503:
                break
            assert response.json()["error"]["code"] == "too_many_uploads"
            time.sleep(float(response.headers.get("Retry-After", 1)))
        waited = time.monotonic() - start
        assert response.status_code == 200, response.text
        assert waited < 10, waited  # the replica's slots are not held for as long as the stalled clients wait
        # the stalled clients were answered: 408 (timed out) or 503 (over the upload cap)
        statuses = set()
        for sock in stalled:
            sock.settimeout(30)
            head = sock.recv(200).decode(errors="replace")
            statuses.add(head.split(" ")[1] if head.startswith("HTTP/1.1") else head[:20])
        assert statuses <= {"408", "503"}, statuses
    finally:
        for sock in stalled:
            sock.close()


def test_oversized_headers_are_refused(safe_server):
    response = requests.get(f"{safe_server.url}/v1/model", headers={"X-Junk": "a" * 40_000}, timeout=30)
    assert_error(response, 431, "headers_too_large")


# fuzzing the API from its own OpenAPI schema --------------------------------------------------------------
def test_schema_fuzz_no_server_errors(safe_server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{safe_server.url}/openapi.json")
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(base_url=safe_server.url, timeout=120)
            tried.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str)

        check()
    assert len(tried) >= 30 and any(s >= 400 for s in tried)
    tiny_images_are_a_4xx(safe_server.url)


def tiny_images_are_a_4xx(url: str) -> None:
    """What a schema cannot generate: real images too small to fit an adapter on (1x1; 3x200, a strip) are
    a 422 that says why; a 1x1 image restores."""
    def solid(width: int, height: int):
        return quantised(torch.full((1, 3, height, width), 0.5))

    for width, height in ((1, 1), (3, 200), (200, 3)):
        pair = solid(width, height)
        made = requests.post(f"{url}/v1/adapters", files=pairs_files([pair, pair], [pair, pair]), timeout=120)
        assert made.status_code == 422, (width, height, made.status_code, made.text[:300])
        assert made.json()["error"]["code"] in ("adapter_fit_failed", "extreme_aspect_ratio"), made.text
        assert re.search(r"\d+x\d+", made.json()["error"]["message"]), made.text  # names the size it needs
    one = restore(url, solid(1, 1))
    assert one.status_code == 200, one.text[:300]
    assert Image.open(io.BytesIO(one.content)).size == (1, 1)


# last: it restarts the store and the application ----------------------------------------------------------
def test_adapter_survives_store_kill_and_application_restart(safe_server):
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from serving.app import build_app

    url = safe_server.url
    made = create(url, 10, steps=2)
    assert made.status_code == 200, made.text
    adapter_id = made.json()["adapter_id"]
    probe = photo("chelsea", 0, 0, 64)
    before = decode(restore(url, probe, adapter=adapter_id).content)

    def store_actor():
        alive = list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:AdapterStore"), ("state", "=", "ALIVE")])
        return alive[0]

    killed = store_actor()
    ray.kill(ray.get_actor(killed["name"], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # Serve starts a new store replica, which reloads from storage
        try:
            if requests.get(f"{url}/v1/adapters/{adapter_id}", timeout=30).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(2)
    assert store_actor()["actor_id"] != killed["actor_id"]
    assert requests.get(f"{url}/v1/adapters/{adapter_id}", timeout=30).status_code == 200

    serve.delete(APP)
    serve.run(build_app(safe_server.args), name=APP, route_prefix="/")
    assert requests.get(f"{url}/v1/adapters/{adapter_id}", timeout=30).json()["adapter_id"] == adapter_id
    after = restore(url, probe, adapter=adapter_id)
    assert after.status_code == 200, after.text
    assert (decode(after.content) - before).abs().max() <= TOL
