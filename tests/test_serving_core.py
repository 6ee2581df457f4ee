"""The restorer core without Ray Serve: the shipped model (``builtin:base``), real photographs, and many
clients at once from their own threads. Every answer is what the library gives for that request alone:
one client's request (its image, family, adapter or fit) never changes another's result."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
import torch

from metarestore import degradations
from metarestore.inference import restore_estimated, restore_image
from serving.limits import ApiError

TOL = 1e-4  # the same model on the same pixels; a shared (batched) forward pass may move the last float bits
FAMILIES = ("gaussian_noise", "jpeg", "gaussian_blur")


@pytest.fixture(scope="module")
def served():
    """The core, and a function that runs one of its coroutines from any thread on the core's event loop
    (a replica has one loop; its clients are many)."""
    from serving.core import RestorerCore
    from serving.settings import AppArgs

    core = RestorerCore(AppArgs(model="builtin:base", compute_slots=2, max_batch_size=8, adapt_budget_s=None,
                                adapt_side=64, max_pixels=1_000_000))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coroutine, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    yield core, call
    call(core.aclose())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def photo(name: str, top: int, left: int, size: int = 64) -> torch.Tensor:
    array = getattr(skimage.data, name)()[top:top + size, left:left + size]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float() / 255


def degraded(family: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    fam = degradations.get(family)
    return fam(x, fam.sample(0.6, torch.Generator().manual_seed(seed))).clamp(0, 1)


def cast_pairs(k: int, shots: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair set ``k``: crops with a colour cast (a family the model never saw) of a severity of its own."""
    clean = torch.cat([photo(("astronaut", "coffee")[i % 2], 20 * i + 9 * k, 30 * i + 5 * k) for i in range(shots)])
    fam = degradations.get("color_cast")
    params = fam.sample(0.5 + 0.1 * k, torch.Generator().manual_seed(k))
    return fam(clean, params).clamp(0, 1), clean


def requests_of_every_kind() -> list[tuple]:
    """(kind, argument, image): told restores of three families, blind restores, fits of two pair sets."""
    images = [photo(n, t, left) for n, t, left in (("astronaut", 0, 0), ("coffee", 100, 100), ("chelsea", 50, 50),
                                                   ("rocket", 120, 200))]
    told = []
    for i, x in enumerate(images):
        for j in (0, 1):  # two families per image: same-size requests of several families at once
            family = FAMILIES[(i + j) % len(FAMILIES)]
            told.append(("told", family, degraded(family, x, 10 * j + i)))
    blind = [("blind", None, degraded("gaussian_noise", x, 20 + i)) for i, x in enumerate(images[:2])]
    return told + blind + [("fit", k, None) for k in (0, 1)]


def run(core, call, request):
    kind, arg, x = request
    if kind == "told":
        return call(core.restore_told(x, arg)).image
    if kind == "blind":
        return call(core.restore_blind(x)).image
    return call(core.fit(*cast_pairs(arg), steps=3, path="auto"))


def alone(core, request):
    """The library's own answer to one request, with nothing else running."""
    kind, arg, x = request
    if kind == "told":
        return restore_image(core.learner, x, tile=core.cfg.tile, family=arg)
    if kind == "blind":
        return restore_estimated(core.learner, x, core.estimator(x), tile=core.cfg.tile)[0]
    return None


def test_told_blind_and_adapted_restores_are_the_librarys(served):
    core, call = served
    x = degraded("gaussian_noise", photo("astronaut", 0, 0, 96), 0)
    told = call(core.restore_told(x, "gaussian_noise"))
    assert told.batch == 1 and told.forward_s > 0 and told.found is None
    assert (told.image - restore_image(core.learner, x, family="gaussian_noise")).abs().max() <= TOL

    blind = call(core.restore_blind(x))
    want, steps = restore_estimated(core.learner, x, core.estimator(x), tile=core.cfg.tile)
    assert blind.undone == [str(s) for s in steps] and "gaussian_noise" in blind.found
    assert (blind.image - want).abs().max() <= TOL and blind.estimate_s > 0

    pairs = cast_pairs(0)
    fitted = call(core.fit(*pairs, steps=3, path="film"))
    assert fitted.adapter.path.name == "film" and (fitted.shots, fitted.height, fitted.width) == (3, 64, 64)
    adapter = call(core.read_adapter(fitted.data))
    query = cast_pairs(5, shots=1)[0]
    adapted = call(core.restore_adapted("a", adapter, query))
    assert (adapted.image - adapter.restore(query)).abs().max() <= TOL
    assert (adapted.image - restore_image(core.learner, query)).abs().max() > 0.01, "the adapter changed it"


def test_what_cannot_be_restored_or_fitted_is_refused(served):
    core, call = served
    with pytest.raises(ApiError) as refused:
        core.check_degradation("haze", None)  # a family the model cannot be told
    assert refused.value.status == 400
    tiny = torch.full((2, 3, 1, 1), 0.5)
    with pytest.raises(ApiError) as refused:
        call(core.fit(tiny, tiny, steps=2))
    assert (refused.value.status, refused.value.code) == (422, "adapter_fit_failed")
    with pytest.raises(ApiError) as refused:
        call(core.read_adapter(b"not an adapter"))
    assert refused.value.status == 409
    assert call(core.restore_told(torch.full((1, 3, 1, 1), 0.5), "jpeg")).image.shape == (1, 3, 1, 1)


def test_concurrent_clients_get_what_each_would_get_alone(served):
    """Sixteen requests of every kind from eight threads at once: same-size told requests share forward
    passes, fits run beside them on the second model copy; each answer equals its request alone."""
    core, call = served
    todo = requests_of_every_kind()
    fits_alone = {k: call(core.fit(*cast_pairs(k), steps=3, path="auto")) for k in (0, 1)}
    with ThreadPoolExecutor(8) as clients:
        answers = list(clients.map(lambda r: run(core, call, r), todo + todo[::-1]))
    for request, answer in zip(todo + todo[::-1], answers, strict=True):
        kind, arg, x = request
        if kind == "fit":
            first = fits_alone[arg]
            assert answer.adapter.path.name == first.adapter.path.name, arg
            assert answer.adapter.info["scores"] == pytest.approx(first.adapter.info["scores"], abs=0.01), arg
            query = cast_pairs(5, shots=1)[0]
            assert (answer.adapter.restore(query) - first.adapter.restore(query)).abs().max() <= 1e-3, arg
        else:
            assert (answer - alone(core, request)).abs().max() <= TOL, (kind, arg)
