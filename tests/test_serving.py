"""The Ray Serve application, end to end: a real Serve instance on 127.0.0.1 serving the smoke model,
real HTTP, real photographs. One application (two replicas) is shared by the module; a second, small
one requires a bearer token and keeps adapters for 3 seconds."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import skimage.data
import torch
from PIL import Image

from cluster.ray_runtime import free_port
from metarestore import degradations
from metarestore.degradations.base import reseed
from metarestore.meta.losses import psnr

pytestmark = pytest.mark.slow

TOKEN = "test-token-0123456789"
METARESTORE = Path(sys.executable).with_name("metarestore")


# images ---------------------------------------------------------------------------------------------
def photo(name: str, top: int = 0, left: int = 0, size: int | None = None) -> torch.Tensor:
    """A crop of one of scikit-image's photographs as (1, 3, H, W) float in [0, 1]."""
    array = getattr(skimage.data, name)()
    if size is not None:
        array = array[top:top + size, left:left + size]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float() / 255


def png(x: torch.Tensor) -> bytes:
    array = (x[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def quantised(x: torch.Tensor) -> torch.Tensor:
    """What the server sees of a float image: its 8-bit PNG."""
    return decode(png(x))


def degrade(family: str, x: torch.Tensor, severity: float, seed: int, noise_seed: int | None = None):
    fam = degradations.get(family)
    params = fam.sample(severity, torch.Generator().manual_seed(seed))
    if noise_seed is not None:
        params = reseed(params, noise_seed)
    return quantised(fam(x, params))


# the application ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(ray_local, smoke_model, told_checkpoint, tmp_path_factory):
    from ray import serve

    from serving.adapters import AdapterStoreDeployment
    from serving.app import AppArgs, Restorer, build_app, logging_config

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"tracking_uri": smoke_model["tracking_uri"], "num_cpus": 0.5, "tile": 256,
              "max_pixels": 1_000_000, "max_body_mb": 4,
              "adapter_dir": str(tmp_path_factory.mktemp("adapters")),
              "adapt_budget_s": None}  # every candidate validated: the chosen path must not depend on the load
    # The registry model is downloaded by the replica: into a temporary cache, not ~/.cache.
    cache = {"env_vars": {"METARESTORE_CACHE": str(tmp_path_factory.mktemp("serving_cache"))}}
    secure = AppArgs(**common, model=smoke_model["model_uri"], token=TOKEN, adapter_ttl_s=3)
    try:
        serve.run(build_app({**common, "model": smoke_model["checkpoint"], "num_replicas": 2}),
                  name="restorer-test", route_prefix="/", logging_config=logging_config())
        serve.run(Restorer.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5, "runtime_env": cache})
                  .bind(secure, AdapterStoreDeployment.bind(secure.adapter_ttl_s, 2**20)),
                  name="restorer-auth", route_prefix="/secure", logging_config=logging_config())
        serve.run(build_app({**common, "model": told_checkpoint, "num_replicas": 1}), name="restorer-told",
                  route_prefix="/told", logging_config=logging_config())
        url = f"http://127.0.0.1:{port}"
        yield SimpleNamespace(url=url, secure=f"{url}/secure", checkpoint=smoke_model["checkpoint"],
                              told=f"{url}/told", told_checkpoint=told_checkpoint)
    finally:
        serve.shutdown()


def restore(url: str, x: torch.Tensor, adapter: str | None = None, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{url}/v1/restore", data=png(x), headers={"Content-Type": "image/png", **(headers or {})},
                         params={"adapter": adapter} if adapter else None, timeout=120)


def pairs_files(degraded: list[torch.Tensor], clean: list[torch.Tensor]) -> list:
    files = []
    for i, (d, c) in enumerate(zip(degraded, clean, strict=True)):
        files += [("degraded", (f"d{i}.png", png(d), "image/png")), ("clean", (f"c{i}.png", png(c), "image/png"))]
    return files


def assert_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error


# held-out family: one fixed, strong colour cast; the support pairs and the test images share it --------
CAST = {"family": "color_cast", "severity": 0.8, "seed": 0}
SUPPORT = [("astronaut", 0, 0), ("astronaut", 200, 200), ("astronaut", 300, 50), ("coffee", 0, 0),
           ("coffee", 200, 300)]
HELD_OUT_TEST = [("chelsea", 50, 50), ("chelsea", 100, 250), ("rocket", 100, 100), ("coffee", 250, 420)]


@pytest.fixture(scope="module")
def cast_adapter(server):
    clean = [quantised(photo(n, t, left, 128)) for n, t, left in SUPPORT]
    degraded = [degrade(CAST["family"], x, CAST["severity"], CAST["seed"], noise_seed=i) for i, x in enumerate(clean)]
    response = requests.post(f"{server.url}/v1/adapters", files=pairs_files(degraded, clean), data={"steps": "20"},
                             timeout=300)
    assert response.status_code == 200, response.text
    return response


# tests ----------------------------------------------------------------------------------------------
def test_health_model_info_and_docs(server):
    from metarestore.hub import load_learner
    from metarestore.model.network import count_parameters

    assert requests.get(f"{server.url}/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(f"{server.url}/v1/model", timeout=30).json()
    learner, metadata = load_learner(server.checkpoint)
    total, adaptable = count_parameters(learner.model)
    assert info["version"] == "local" and info["source"] == server.checkpoint
    assert info["name"] == metadata["name"] and info["algorithm"] == "fomaml" and info["adapt"] == "film"
    assert info["families"]["held_out"] == ["haze", "color_cast"]
    assert set(info["families"]["train"]) == {"gaussian_noise", "gaussian_blur", "jpeg", "low_light"}
    assert (info["parameters"], info["adaptable_parameters"]) == (total, adaptable) and 0 < adaptable < total
    assert info["limits"]["max_pixels"] == 1_000_000 and info["limits"]["max_shots"] == 16
    docs = requests.get(f"{server.url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = requests.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/restore", "/v1/adapters", "/v1/adapters/{adapter_id}", "/v1/model", "/healthz"} <= set(paths)


def test_blind_requests_say_what_was_found_and_clean_photos_come_back_as_sent(server):
    """Concurrent blind requests to the told model, each with its own answer: a clean photo comes back pixel
    for pixel ('none' undone), a JPEG file is found to be JPEG at its quality and undone told; the headers
    are documented in the OpenAPI schema."""
    clean = quantised(photo("coffee", 40, 60, 160))
    buf = io.BytesIO()
    Image.fromarray((clean[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=25)
    jpeg = buf.getvalue()

    def send(i: int) -> requests.Response:
        if i % 2:
            return requests.post(f"{server.told}/v1/restore", data=jpeg, headers={"Content-Type": "image/jpeg"},
                                 timeout=120)
        return restore(server.told, clean)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, range(6)))
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        if i % 2:
            assert response.headers["X-Degradation"].startswith("jpeg (p=1.00, quality 25)"), response.headers
            assert response.headers["X-Restored-As"].split(",")[0] == "jpeg"
            assert response.content == responses[1].content  # the same answer whatever else ran beside it
        else:
            assert response.headers["X-Degradation"].startswith("clean"), response.headers
            assert response.headers["X-Restored-As"] == "none"
            assert torch.equal(decode(response.content), clean)
    told = requests.post(f"{server.told}/v1/restore?degradation=jpeg", data=jpeg, timeout=120,
                         headers={"Content-Type": "image/jpeg"})
    assert "X-Degradation" not in told.headers  # told: nothing estimated
    if responses[1].headers["X-Restored-As"] == "jpeg":
        assert told.content == responses[1].content
    spec = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    headers = spec["paths"]["/v1/restore"]["post"]["responses"]["200"]["headers"]
    assert {"X-Degradation", "X-Restored-As"} <= set(headers)


def test_restore_improves_a_noisy_photo(server):
    clean = quantised(photo("chelsea", 20, 100, 256))
    noisy = degrade("gaussian_noise", clean, 0.7, seed=0)
    response = restore(server.url, noisy)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["X-Model-Version"] == "local" and response.headers["X-Adapter"] == "none"
    restored = decode(response.content)
    assert restored.shape == clean.shape
    assert psnr(restored, clean) > psnr(noisy, clean)

    as_form = requests.post(f"{server.url}/v1/restore", files={"image": ("noisy.png", png(noisy), "image/png")},
                            timeout=120)
    assert as_form.status_code == 200 and as_form.content == response.content  # same model, same bytes


def server_timing(response: requests.Response) -> dict[str, float]:
    """The ``Server-Timing`` header (RFC-style ``name;dur=ms`` metrics, comma-separated) as {name: ms}."""
    parts = {}
    for metric in response.headers["Server-Timing"].split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        (duration,) = (float(p.removeprefix("dur=")) for p in params if p.startswith("dur="))
        parts[name] = duration
    return parts


def test_restore_reports_where_its_time_went(server, cast_adapter):
    x = degrade("gaussian_noise", photo("rocket", 0, 0, 160), 0.5, seed=3)
    for adapter in (None, cast_adapter.json()["adapter_id"]):
        response = restore(server.url, x, adapter=adapter)
        assert response.status_code == 200, response.text
        parts = server_timing(response)
        # a blind request also says how long the degradation estimate took (it found the noise: a forward pass)
        steps = ["decode", "queue"] + ([] if adapter else ["estimate"]) + ["forward", "encode"]
        assert list(parts) == ["read"] + (["adapter"] if adapter else []) + steps + ["total"], parts
        assert all(v >= 0 for v in parts.values()) and parts["forward"] > 0, parts
        # the parts are consecutive slices of the replica's handling: they add up to its total (0.1 ms rounding)
        assert sum(v for k, v in parts.items() if k != "total") <= parts["total"] + 0.1 * len(parts), parts


def test_large_image_goes_through_tiles(server):
    from metarestore.hub import load_learner
    from metarestore.inference import restore_image

    image = degrade("gaussian_noise", photo("coffee"), 0.5, seed=1)  # 400 x 600 > tile 256
    response = restore(server.url, image)
    assert response.status_code == 200, response.text
    learner, _ = load_learner(server.checkpoint)
    expected = quantised(restore_image(learner, image, tile=256, overlap=32))
    served = decode(response.content)
    assert served.shape == image.shape
    assert (served - expected).abs().max() <= 1.5 / 255


def test_same_size_requests_are_batched(server):
    images = [degrade("gaussian_noise", photo("astronaut", 64 * i, 64 * i, 96), 0.5, seed=i) for i in range(4)]
    odd = degrade("gaussian_noise", photo("coffee", 0, 0, 80), 0.5, seed=9)
    alone = [restore(server.url, x).content for x in images]
    jobs = [images[i % 4] for i in range(16)] + [odd, odd]
    for _ in range(3):  # batching depends on arrival times: a few rounds make "never batched" a real failure
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(lambda x: restore(server.url, x), jobs))
        assert all(r.status_code == 200 for r in responses)
        for i, r in enumerate(responses[:16]):
            assert (decode(r.content) - decode(alone[i % 4])).abs().max() <= 1.5 / 255
        assert decode(responses[-1].content).shape == odd.shape
        if max(int(r.headers["X-Batch-Size"]) for r in responses) > 1:
            break
    else:
        pytest.fail("18 concurrent requests, three times, and no forward pass served more than one")


def test_told_requests_get_their_own_degradations_output_even_when_batched_together(server):
    """A model that can be told the degradation: concurrent requests naming different ones (or none) share
    forward passes only with their own kind, and each gets exactly what the model gives for its hint."""
    from metarestore.estimator import default_estimator
    from metarestore.hub import load_learner
    from metarestore.inference import restore_estimated

    info = requests.get(f"{server.told}/v1/model", timeout=30).json()
    learner, _ = load_learner(server.told_checkpoint)
    assert info["degradations"] == [f for f in learner.model.hint_families if f != "awgn"] != []  # images only
    x = quantised(degrade("gaussian_noise", photo("astronaut", 64, 64, 64), 0.5, seed=3))
    hints = [None, *info["degradations"]]
    expected = {h: learner.restore(x, family=h) for h in hints[1:]}
    expected[None] = restore_estimated(learner, x, default_estimator()(x))[0]  # none named: blind, as estimated
    assert not torch.allclose(expected[hints[1]], expected[hints[2]], atol=2 / 255), "the hints make no difference"

    def call(hint):
        params = {"degradation": hint} if hint else None
        return requests.post(f"{server.told}/v1/restore", data=png(x), headers={"Content-Type": "image/png"},
                             params=params, timeout=120)

    jobs = [hints[i % len(hints)] for i in range(4 * len(hints))]
    for _ in range(3):  # batching depends on arrival times: a few rounds make "never batched" a real failure
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(call, jobs))
        for hint, r in zip(jobs, responses, strict=True):
            assert r.status_code == 200, r.text
            assert (decode(r.content) - expected[hint]).abs().max() <= 1.5 / 255, hint
        if max(int(r.headers["X-Batch-Size"]) for r in responses) > 1:
            break
    else:
        pytest.fail("concurrent requests, three times, and no forward pass served more than one")
    assert_error(call("haze"), 400, "unknown_degradation")
    assert_error(call("awgn"), 400, "degradation_not_for_images")  # the model knows it; no PNG can show it
    both = requests.post(f"{server.told}/v1/restore", data=png(x), headers={"Content-Type": "image/png"},
                         params={"degradation": hints[1], "adapter": "x"}, timeout=120)
    assert_error(both, 400, "degradation_with_adapter")

    # an adapter may be the model told a family it knows (path told:F, or chosen by auto); its answers are that
    # row's output, and a family the model cannot be told is not a path
    fields = pairs_files([x], [expected[hints[1]]])
    made = requests.post(f"{server.told}/v1/adapters", files=fields, data={"path": f"told:{hints[1]}"}, timeout=300)
    assert made.status_code == 200, made.text
    assert made.json()["path"] == f"told:{hints[1]}"
    adapted = requests.post(f"{server.told}/v1/restore", data=png(x), headers={"Content-Type": "image/png"},
                            params={"adapter": made.json()["adapter_id"]}, timeout=120)
    assert (decode(adapted.content) - expected[hints[1]]).abs().max() <= 1.5 / 255
    twice = requests.post(f"{server.told}/v1/adapters", files=fields, data={"path": f"told:{hints[1]}*2"}, timeout=300)
    assert twice.status_code == 200, twice.text
    assert twice.json()["path"] == f"told:{hints[1]}*2"
    adapted = requests.post(f"{server.told}/v1/restore", data=png(x), headers={"Content-Type": "image/png"},
                            params={"adapter": twice.json()["adapter_id"]}, timeout=120)
    second_pass = learner.restore(expected[hints[1]], family=hints[1])
    assert (decode(adapted.content) - second_pass).abs().max() <= 1.5 / 255
    refused = requests.post(f"{server.told}/v1/adapters", files=fields, data={"path": "told:haze"}, timeout=300)
    assert_error(refused, 422, "invalid_kind")


def test_adapter_improves_a_held_out_degradation(server, cast_adapter):
    info = cast_adapter.json()
    assert set(info) >= {"adapter_id", "shots", "steps", "psnr_input", "psnr_zero_shot", "psnr_adapted",
                         "elapsed_ms", "expires_at"}
    assert info["shots"] == 5 and info["steps"] == 20 and info["psnr_adapted"] > info["psnr_zero_shot"]
    # the former names, kept for one release: the same figures
    assert (info["psnr_before"], info["psnr_after"]) == (info["psnr_zero_shot"], info["psnr_adapted"])
    assert cast_adapter.headers["X-Adapter"] == info["adapter_id"]
    gains = []
    for i, (name, top, left) in enumerate(HELD_OUT_TEST):
        clean = quantised(photo(name, top, left, 128))
        degraded = degrade(CAST["family"], clean, CAST["severity"], CAST["seed"], noise_seed=100 + i)
        plain = restore(server.url, degraded)
        adapted = restore(server.url, degraded, adapter=info["adapter_id"])
        assert adapted.status_code == 200 and adapted.headers["X-Adapter"] == info["adapter_id"]
        without, with_ = psnr(decode(plain.content), clean), psnr(decode(adapted.content), clean)
        assert with_ > without, (name, without, with_)
        gains.append(with_ - without)
    assert sum(gains) / len(gains) > 0.5, gains


# an unseen blur: the adapter fits the kernel and restores through it ---------------------------------------
BLUR_SUPPORT = [("astronaut", 0, 0), ("astronaut", 220, 180), ("coffee", 0, 0), ("coffee", 150, 300),
                ("rocket", 120, 200)]
BLUR_TEST = [("chelsea", 60, 80), ("astronaut", 300, 40)]


def blurred(x: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur (sigma 2, 13x13) no degradation family of the registry makes, as 8-bit PNG pixels."""
    from metarestore.operators.fourier import convolve

    t = torch.arange(-6, 7, dtype=torch.float64)
    kernel = torch.exp(-(t[:, None] ** 2 + t[None] ** 2) / 8)
    return quantised(convolve(x.double(), kernel / kernel.sum()).float().clamp(0, 1))


def create_adapter(url: str, degraded, clean, **data) -> requests.Response:
    return requests.post(f"{url}/v1/adapters", files=pairs_files(degraded, clean), data=data, timeout=600)


def test_auto_adapter_fits_an_unseen_blur_and_beats_zero_shot(server):
    clean = [quantised(photo(n, t, left, 96)) for n, t, left in BLUR_SUPPORT]
    response = create_adapter(server.url, [blurred(x) for x in clean], clean, steps="3")
    assert response.status_code == 200, response.text
    info = response.json()
    from metarestore.operators.paths import OPERATOR_OF

    # a path built on the kernel fitted from the pairs (deconvolution, HQS, Wiener or Richardson-Lucy)
    assert info["kind"] == "auto" and OPERATOR_OF.get(info["path"].split("@")[0]) == "kernel", info
    assert info["validation"] == "leave-one-out" and info["folds"] >= 2 and info["residuals"]["kernel"] < 0.5
    assert info["ruled_out"] == [], "a blur's fitted kernel is not the identity: no kernel path is ruled out"
    assert info["psnr_adapted"] > info["psnr_zero_shot"] and info["scores"][info["path"]] == info["psnr_adapted"]
    assert info["fit_ms"] > 0 and (info["fit_height"], info["fit_width"]) == (96, 96)
    assert requests.get(f"{server.url}/v1/adapters/{info['adapter_id']}", timeout=30).json() == info
    for name, top, left in BLUR_TEST:  # images the adapter never saw, blurred the same way
        clean_test = quantised(photo(name, top, left, 128))
        test = blurred(clean_test)
        plain, adapted = restore(server.url, test), restore(server.url, test, adapter=info["adapter_id"])
        assert adapted.status_code == 200 and adapted.headers["X-Adapter"] == info["adapter_id"]
        assert psnr(decode(adapted.content), clean_test) > psnr(decode(plain.content), clean_test) + 1.0, name


def test_adapter_path_forces_the_path_and_unknown_paths_are_refused(server):
    clean = [quantised(photo(n, t, left, 64)) for n, t, left in BLUR_SUPPORT[:3]]
    degraded = [blurred(x) for x in clean]
    forced = create_adapter(server.url, degraded, clean, steps="2", path="film")
    assert forced.status_code == 200, forced.text
    info = forced.json()
    assert (info["kind"], info["path"], info["steps_used"]) == ("film", "film", 2)
    assert info["final_fit"] == "fold average"  # validated with the request's steps: its folds' mean, no refit
    assert set(info["scores"]) == {"film", "zero_shot"} and info["psnr_adapted"] == info["scores"]["film"]
    image = degraded[0]
    assert restore(server.url, image, adapter=info["adapter_id"]).content != restore(server.url, image).content
    operator = create_adapter(server.url, degraded, clean, kind="deconv@0.01").json()  # the deprecated alias
    assert (operator["path"], operator["steps_used"], operator["final_fit"]) == ("deconv@0.01", 0, None)
    for bad in ("lasso", "deconv@x", "deconv@-1", "deconv@nan", "x" * 300):
        response = create_adapter(server.url, degraded, clean, path=bad)
        assert_error(response, 422, "invalid_kind")
        assert "auto" in response.json()["error"]["message"] and "film" in response.json()["error"]["message"]
    both = create_adapter(server.url, degraded, clean, path="film", kind="tone")
    assert_error(both, 422, "invalid_kind")


def test_a_forced_path_the_pairs_do_not_fit_is_a_422(server):
    """path=jpeg identifies a JPEG setting from the pairs; blurred pairs have none: a 4xx, not a 500."""
    clean = [quantised(photo(n, t, left, 64)) for n, t, left in BLUR_SUPPORT[:3]]
    response = create_adapter(server.url, [blurred(x) for x in clean], clean, path="jpeg", steps="2")
    assert_error(response, 422, "adapter_fit_failed")
    assert "jpeg" in response.json()["error"]["message"]
    assert restore(server.url, clean[0]).status_code == 200  # still serving


def test_adapters_of_the_previous_format_still_load(smoke_model):
    """Adapters stored before operator adapters (a safetensors file of FiLM deltas) restore as they did;
    anything else unreadable is a 409 that says to create the adapter again, never a 500."""
    from safetensors.torch import save

    from metarestore.hub import load_model
    from metarestore.meta.adapt import delta
    from serving.app import read_adapter
    from serving.limits import ApiError

    learner = load_model(smoke_model["checkpoint"])[0]
    clean = torch.cat([quantised(photo(n, t, left, 48)) for n, t, left in SUPPORT[:3]])
    degraded = torch.cat([degrade(CAST["family"], x[None], 0.8, 0) for x in clean])
    params = learner.adapt(degraded, clean, steps=2)
    old = save({n: t.contiguous() for n, t in delta(learner.model, params).items()})
    adapter = read_adapter(old, learner)
    assert adapter.path.name == "film"
    assert torch.allclose(adapter.restore(degraded), learner.restore(degraded, params), atol=1e-5)
    for bad in (save({"not.a.parameter": torch.zeros(3)}), b"not an adapter"):
        with pytest.raises(ApiError) as err:
            read_adapter(bad, learner)
        assert (err.value.status, err.value.code) == (409, "adapter_unreadable")


def test_adapter_works_on_the_other_replica(server, cast_adapter):
    creator = cast_adapter.headers["X-Replica"]
    adapter_id = cast_adapter.json()["adapter_id"]
    image = degrade("color_cast", quantised(photo("chelsea", 0, 0, 64)), 0.8, seed=0)
    seen = {}
    # Requests in concurrent rounds: Serve's router sends each to the less busy of two replicas, so
    # sequential requests can all land on one replica when the other still works on an earlier test's
    # request; concurrent ones spread over both. 20 rounds all on one replica is a failure.
    with ThreadPoolExecutor(4) as pool:
        for _ in range(20):
            for response in pool.map(lambda _: restore(server.url, image, adapter=adapter_id), range(4)):
                assert response.status_code == 200, response.text
                seen.setdefault(response.headers["X-Replica"], response.content)
            if len(seen) == 2 and creator in seen:
                break
    assert len(seen) == 2 and creator in seen, seen.keys()
    first, second = seen.values()
    assert first == second  # both replicas apply the same adapter


def test_adapter_get_delete(server):
    clean = [quantised(photo("coffee", 0, 0, 48))]
    degraded = [degrade("haze", clean[0], 0.5, seed=0)]
    created = requests.post(f"{server.url}/v1/adapters", files=pairs_files(degraded, clean), data={"steps": "2"},
                            timeout=120).json()
    adapter_id = created["adapter_id"]
    got = requests.get(f"{server.url}/v1/adapters/{adapter_id}", timeout=30)
    assert got.status_code == 200 and got.json()["shots"] == 1 and got.json()["expires_at"] == created["expires_at"]
    assert requests.delete(f"{server.url}/v1/adapters/{adapter_id}", timeout=30).status_code == 200
    assert_error(requests.get(f"{server.url}/v1/adapters/{adapter_id}", timeout=30), 404, "adapter_not_found")
    assert_error(requests.delete(f"{server.url}/v1/adapters/{adapter_id}", timeout=30), 404, "adapter_not_found")
    assert_error(restore(server.url, degraded[0], adapter=adapter_id), 404, "adapter_not_found")


def test_auth_and_adapter_expiry(server):
    secure = server.secure
    assert requests.get(f"{secure}/healthz", timeout=30).status_code == 200  # open to load balancers
    assert_error(requests.get(f"{secure}/v1/model", timeout=30), 401, "unauthorized")
    assert_error(requests.get(f"{secure}/v1/model", headers={"Authorization": "Bearer wrong"}, timeout=30),
                 401, "unauthorized")
    assert_error(restore(secure, photo("coffee", 0, 0, 32)), 401, "unauthorized")
    assert requests.get(f"{secure}/docs", timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    info = requests.get(f"{secure}/v1/model", headers=auth, timeout=30)
    assert info.status_code == 200 and info.json()["version"] == "1" and info.json()["name"] == "smoke"

    clean = quantised(photo("coffee", 0, 0, 32))
    response = requests.post(f"{secure}/v1/adapters", headers=auth, timeout=120, data={"steps": "1"},
                             files=pairs_files([degrade("haze", clean, 0.5, seed=0)], [clean]))
    assert response.status_code == 200, response.text
    adapter_id = response.json()["adapter_id"]
    used = restore(secure, clean, adapter=adapter_id, headers=auth)
    assert used.status_code == 200 and used.headers["X-Model-Version"] == "1"
    time.sleep(4)  # the adapter time-to-live of this application is 3 s
    assert_error(requests.get(f"{secure}/v1/adapters/{adapter_id}", headers=auth, timeout=30), 404,
                 "adapter_not_found")
    assert_error(restore(secure, clean, adapter=adapter_id, headers=auth), 404, "adapter_not_found")


# bad input ------------------------------------------------------------------------------------------
def _bomb() -> bytes:
    """A 20000 x 20000 (400 MP) PNG of a few hundred kB: decoding it would take 1.2 GB."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="GIF")
    return buf.getvalue()


def _pairs(degraded_sizes: list[int], clean_sizes: list[int]) -> list:
    def field(name: str, sizes: list[int]) -> list:
        return [(name, (f"{name}{i}.png", png(photo("coffee", 0, 0, s)), "image/png")) for i, s in enumerate(sizes)]
    return field("degraded", degraded_sizes) + field("clean", clean_sizes)


def _small() -> bytes:
    return png(photo("coffee", 0, 0, 16))


def _raw(data: bytes, content_type: str | None = "image/png", **kwargs) -> dict:
    return {"data": data, "headers": {"Content-Type": content_type} if content_type else {}, **kwargs}


# Each case builds its request lazily (the bomb alone is 50 MB to make): name -> (kwargs, status, code).
RESTORE_CASES = {
    "empty body": (lambda: _raw(b""), 400, "empty_body"),
    "corrupt bytes": (lambda: _raw(b"\x89PNG\r\n\x1a\n" + os.urandom(300)), 400, "invalid_image"),
    "truncated png": (lambda: _raw(png(photo("coffee", 0, 0, 64))[:400]), 400, "invalid_image"),
    "not an image": (lambda: _raw(b"hello, world", "image/jpeg"), 400, "invalid_image"),
    "gif bytes": (lambda: _raw(_gif()), 415, "unsupported_format"),
    "gif content type": (lambda: _raw(_gif(), "image/gif"), 415, "unsupported_media_type"),
    "text content type": (lambda: _raw(b"x", "text/plain"), 415, "unsupported_media_type"),
    "no content type": (lambda: _raw(_small(), None), 415, "unsupported_media_type"),
    "multipart without image": (lambda: {"files": {"picture": ("a.png", _small(), "image/png")}}, 400,
                                "missing_field"),
    "too many pixels": (lambda: _raw(png(torch.zeros(1, 3, 1000, 1001))), 413, "too_many_pixels"),
    "decompression bomb": (lambda: _raw(_bomb()), 413, "too_many_pixels"),
    "body too large": (lambda: _raw(b"\x89PNG\r\n\x1a\n" + bytes(5 * 2**20)), 413, "body_too_large"),
    "body too large, chunked": (lambda: _raw(bytes(2**20) for _ in range(5)), 413, "body_too_large"),
    "unknown adapter": (lambda: _raw(_small(), params={"adapter": "nope"}), 404, "adapter_not_found"),
    "degradation to a blind model": (lambda: _raw(_small(), params={"degradation": "jpeg"}), 400,
                                     "degradation_not_accepted"),
}
ADAPTER_CASES = {
    "not multipart": (lambda: _raw(_small()), 415, "unsupported_media_type"),
    "no pairs": (lambda: {"files": {"other": ("a.png", _small(), "image/png")}}, 400, "missing_field"),
    "pair count mismatch": (lambda: {"files": _pairs([32, 32, 32], [32, 32])}, 400, "pair_count_mismatch"),
    "pair size mismatch": (lambda: {"files": _pairs([32, 40], [32, 32])}, 400, "pair_size_mismatch"),
    "too many shots": (lambda: {"files": _pairs([8] * 17, [8] * 17)}, 400, "too_many_shots"),
    "too many steps": (lambda: {"files": _pairs([32], [32]), "data": {"steps": "51"}}, 400, "too_many_steps"),
    "zero steps": (lambda: {"files": _pairs([32], [32]), "data": {"steps": "0"}}, 400, "invalid_steps"),
    "steps not a number": (lambda: {"files": _pairs([32], [32]), "data": {"steps": "ten"}}, 400, "invalid_steps"),
    "corrupt pair": (lambda: {"files": [("degraded", ("d.png", b"\x89PNG\r\n\x1a\nxx", "image/png")),
                                        ("clean", ("c.png", _small(), "image/png"))]}, 400, "invalid_image"),
}


@pytest.mark.parametrize("case", RESTORE_CASES, ids=list(RESTORE_CASES))
def test_bad_restore_input_is_a_4xx(server, case):
    make, status, code = RESTORE_CASES[case]
    assert_error(requests.post(f"{server.url}/v1/restore", timeout=120, **make()), status, code)
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=list(ADAPTER_CASES))
def test_bad_adapter_input_is_a_4xx(server, case):
    make, status, code = ADAPTER_CASES[case]
    assert_error(requests.post(f"{server.url}/v1/adapters", timeout=120, **make()), status, code)
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200


def test_unknown_routes_and_methods_keep_the_error_shape(server):
    assert_error(requests.get(f"{server.url}/v2/nothing", timeout=30), 404, "not_found")
    assert_error(requests.get(f"{server.url}/v1/restore", timeout=30), 405, "method_not_allowed")


def test_still_serving_after_bad_input(server):
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    assert restore(server.url, photo("coffee", 0, 0, 64)).status_code == 200


# the CLI client ---------------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(METARESTORE), *args], capture_output=True, text=True, timeout=300)


def test_cli_restore_and_adapt(server, tmp_path):
    clean = [quantised(photo("astronaut", 0, 0, 96)), quantised(photo("coffee", 100, 100, 96))]
    paths = {}
    for i, x in enumerate(clean):
        paths[f"c{i}"] = tmp_path / f"clean{i}.png"
        paths[f"d{i}"] = tmp_path / f"degraded{i}.png"
        paths[f"c{i}"].write_bytes(png(x))
        paths[f"d{i}"].write_bytes(png(degrade("color_cast", x, 0.8, seed=0)))

    out = tmp_path / "restored.png"
    done = run_cli("restore", str(paths["d0"]), "-o", str(out), "--endpoint", server.url)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (96, 96) and "model version local" in done.stdout
    assert "found: " in done.stdout, done.stdout  # blind: what the server's estimator found

    done = run_cli("adapt", "--degraded", str(paths["d0"]), str(paths["d1"]), "--clean", str(paths["c0"]),
                   str(paths["c1"]), "--endpoint", server.url, "--steps", "3", "--path", "film")
    assert done.returncode == 0, done.stderr
    adapter_id = done.stdout.strip()
    made = requests.get(f"{server.url}/v1/adapters/{adapter_id}", timeout=30).json()
    assert (made["shots"], made["path"]) == (2, "film")
    assert f"{made['psnr_adapted']:.2f} dB with it" in done.stderr

    done = run_cli("restore", str(paths["d1"]), "-o", str(tmp_path / "adapted.jpg"), "--endpoint", server.url,
                   "--adapter", adapter_id)
    assert done.returncode == 0, done.stderr
    assert adapter_id in done.stdout and Image.open(tmp_path / "adapted.jpg").format == "JPEG"

    done = run_cli("restore", str(paths["d1"]), "-o", str(out), "--endpoint", server.url, "--adapter", "gone")
    assert done.returncode == 2 and done.stderr.startswith("error:") and "adapter_not_found" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_cli("adapt", "--degraded", str(paths["d0"]), "--clean", str(paths["c0"]), str(paths["c1"]),
                   "--endpoint", server.url)
    assert done.returncode == 2 and "pairs" in done.stderr and "Traceback" not in done.stderr


# the adapter store itself (no Ray) ----------------------------------------------------------------------
def test_adapter_store_ttl_and_lru_by_bytes():
    from serving.adapters import AdapterStore

    now = [1000.0]
    store = AdapterStore(ttl_s=60, max_bytes=3 * 400, clock=lambda: now[0])
    data = bytes(400)
    a, b, c = (store.put(data, {"n": i})["adapter_id"] for i in range(3))
    assert store.get(a) == ({"n": 0, **store.info(a)}, data)  # a is now the most recently used
    d = store.put(data, {"n": 3})["adapter_id"]  # over budget: the least recently used (b) goes
    assert store.info(b) is None and all(store.info(k) for k in (a, c, d))
    assert store.stats()["bytes"] == 1200
    with pytest.raises(ValueError):
        store.put(bytes(1201), {})
    now[0] += 61
    assert store.get(a) is None and store.stats()["adapters"] == 0
    assert not store.delete(c)


@pytest.mark.parametrize("level", [0, 1])  # 0: the stored PNG written here; 1: libpng / Pillow
@pytest.mark.parametrize("size", [(37, 53), (300, 250)])  # the second spans several zlib stored blocks
def test_png_responses_hold_exactly_the_restored_pixels_grey_in_grey_out(level, size):
    from metarestore.data.images import to_pil
    from metarestore.pixels import to_uint8
    from serving.limits import decode_image, encode_png

    image = torch.rand(1, 3, *size)
    colour = Image.open(io.BytesIO(encode_png(image, level=level)))
    assert colour.mode == "RGB" and colour.size == size[::-1]
    assert np.array_equal(np.asarray(colour), to_uint8(image[0]).permute(1, 2, 0).numpy())
    back, grey = decode_image(encode_png(image, level=level), max_pixels=100_000)
    assert not grey and torch.equal(back, to_uint8(image) / 255.0)
    luma = Image.open(io.BytesIO(encode_png(image, grey=True, level=level)))
    assert luma.mode == "L" and np.array_equal(np.asarray(luma), np.asarray(to_pil(image, grey=True)))
