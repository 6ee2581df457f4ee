"""The service is safe to share: one replica serving restores and adapter creations at once gives every
client exactly what it would get alone. Real Ray Serve on 127.0.0.1, real HTTP, real photographs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
from test_serving import decode, degrade, free_port, pairs_files, photo, quantised, restore

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
            "max_pixels": 1_000_000, "max_body_mb": 4}
    try:
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", args=args)
    finally:
        serve.shutdown()


def support(k: int, n: int = 4, size: int = 80) -> tuple[list, list]:
    """Pair set ``k``: crops of two photographs with colour casts of a severity of its own."""
    clean = [quantised(photo(("astronaut", "coffee")[i % 2], 30 * i + 11 * k, 40 * i + 7 * k, size))
             for i in range(n)]
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
        for key in ("psnr_before", "psnr_after", "psnr_input"):
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
