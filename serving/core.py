"""The restorer behind the HTTP routes, without Ray Serve: what one replica computes.

``RestorerCore(settings)`` loads the model and owns everything a request's computation touches: the
model pool (one copy of the model per compute thread, so concurrent requests never share a module), the
batcher (same-size requests share a forward pass), the degradation estimator, and the thread pools that
keep the event loop free (compute: forward passes and fits; codec: PNG/JPEG decoding and encoding).
Its coroutines are the server's whole behaviour: restore told, blind (the estimator decides) or with
an adapter, and fit an adapter from pairs. The Serve deployment (``serving/app.py``) holds one core per
replica; tests drive it directly. Its coroutines run on one event loop (the batcher's queue lives there),
from as many client threads as wanted.

Requests the core refuses raise ``serving.limits.ApiError`` (a status and a message): the routes pass
them on as they are.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from metarestore.degradations import image_families, not_an_image_family
from metarestore.pixels import center_crop
from serving.batching import Batcher
from serving.limits import ApiError, decode_image, encode_png
from serving.settings import AppArgs


@dataclass
class Job:
    """One image waiting for a forward pass (after its adapter's operator pre-step, if any)."""

    x: torch.Tensor  # (1, 3, H, W)
    adapter: str | None  # requests share a pass only with the same adapter (None: the model's own state)
    params: dict[str, torch.Tensor] | None = None  # the adapter's adapted state (None: the model's own)
    kind: str | None = None  # the adapter kind of ``params`` (film, lora, ...)
    family: str | None = None  # the degradation named by the client, for a model that can be told it


@dataclass
class Restored:
    """A restored image and where its time went. ``found`` and ``undone`` only for blind requests: what
    the estimator found (a summary) and the families undone, in order (empty: the image as it came)."""

    image: torch.Tensor
    batch: int  # the size of the forward pass it shared (0: none ran)
    forward_s: float  # compute seconds: forward passes and operator pre-steps
    estimate_s: float = 0.0
    found: str | None = None
    undone: list[str] = field(default_factory=list)


@dataclass
class Fitted:
    """An adapter fitted on a request's pairs: the ``Adapter``, its bytes for the store, and the request."""

    adapter: object  # metarestore.operators.adapter.Adapter
    data: bytes
    asked: str  # auto or a path name
    shots: int
    height: int
    width: int
    steps: int
    fit_s: float


async def on(executor: Executor, fn, *args):
    """``fn(*args)`` on one of ``executor``'s threads (with the caller's context, as ``asyncio.to_thread``)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(context.run, fn, *args))


class RestorerCore:
    """The model, its batched forward pass, the estimator and the adapter fit of one replica."""

    def __init__(self, cfg: AppArgs):
        from metarestore.engine import resolve_device
        from metarestore.estimator import load_estimator
        from metarestore.hub import load_model
        from metarestore.inference import ModelPool, adapt_pixels
        from metarestore.model.network import count_parameters

        self.cfg = cfg
        self.threads = cfg.torch_threads()
        # torch's work runs on compute_slots threads (``threads`` OpenMP threads each), decoding and
        # encoding on single-threaded ones: more OpenMP threads than cores slow every forward pass ~2x.
        self.compute = ThreadPoolExecutor(cfg.compute_slots, thread_name_prefix="restorer-compute",
                                          initializer=torch.set_num_threads, initargs=(self.threads,))
        self.codec = ThreadPoolExecutor(4, thread_name_prefix="restorer-codec", initializer=torch.set_num_threads,
                                        initargs=(1,))
        self.device = resolve_device(cfg.device)
        self.learner, self.metadata, self.ref = load_model(cfg.model, cfg.tracking_uri, device=self.device)
        self.pool = ModelPool(self.learner, cfg.compute_slots, self.threads)  # self.learner itself never runs
        self.estimator = load_estimator(device=self.device)  # blind requests: what happened to the image
        self.version = str(self.ref.version) if self.ref.version else "local"
        self.model_sha256 = self.metadata.get("files", {}).get("model.safetensors", "")
        self.counts = count_parameters(self.learner.model)  # (parameters, adaptable parameters)
        self.batcher = Batcher(self._run_batch, cfg.max_batch_size, cfg.concurrent_batches,
                               cfg.batch_wait_timeout_s, executor=self.compute)
        self.adapt_pixels = adapt_pixels(self.learner, cfg.adapt_memory_mb)
        self.auto_paths = auto_paths(cfg.auto_paths, self.learner)

    async def aclose(self) -> None:
        """Stop the batcher and the threads (a replica never needs to; a test that made a core does)."""
        await self.batcher.aclose()
        self.compute.shutdown(wait=False, cancel_futures=True)
        self.codec.shutdown(wait=False, cancel_futures=True)

    # images in and out ------------------------------------------------------------------------------
    async def decode(self, data: bytes, what: str = "image") -> tuple[torch.Tensor, bool]:
        return await on(self.codec, decode_image, data, self.cfg.max_pixels, what, self.cfg.max_aspect)

    async def encode(self, image: torch.Tensor, grey: bool) -> bytes:
        return await on(self.codec, encode_png, image, grey, self.cfg.png_level)

    async def decode_pairs(self, pairs: list[tuple[bytes, bytes]]) -> tuple[torch.Tensor, torch.Tensor]:
        return await on(self.codec, self._decode_pairs, pairs)

    def _decode_pairs(self, pairs: list[tuple[bytes, bytes]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and check the pairs; pairs of different sizes are centre-cropped to the smallest."""
        cfg, xs, ys, total = self.cfg, [], [], 0
        for i, (d, c) in enumerate(pairs, 1):
            x, _ = decode_image(d, cfg.max_pixels, f"degraded image {i}", cfg.max_aspect)
            total += x.shape[-1] * x.shape[-2]
            if total > cfg.max_adapt_pixels:  # checked as we go: memory stays bounded
                raise ApiError(413, "too_many_pixels", f"the support images hold more than "
                               f"{cfg.max_adapt_pixels / 1e6:g} MP (send fewer or smaller pairs)")
            y, _ = decode_image(c, cfg.max_pixels, f"clean image {i}", cfg.max_aspect)
            if x.shape != y.shape:
                raise ApiError(400, "pair_size_mismatch", f"pair {i}: degraded is {x.shape[-1]}x{x.shape[-2]}, "
                               f"clean is {y.shape[-1]}x{y.shape[-2]}; each pair must be the same size")
            xs.append(x)
            ys.append(y)
        h, w = min(x.shape[-2] for x in xs), min(x.shape[-1] for x in xs)
        return torch.cat([center_crop(x, h, w) for x in xs]), torch.cat([center_crop(y, h, w) for y in ys])

    # restore ----------------------------------------------------------------------------------------
    def check_degradation(self, degradation: str | None, adapter: str | None) -> None:
        """A told request names a family this model can be told, and no adapter."""
        if degradation is None:
            return
        known = self.learner.hint_families
        if not known:
            raise ApiError(400, "degradation_not_accepted", "this model restores blind: it cannot be told the "
                           "degradation (leave out 'degradation')")
        if degradation not in known:
            raise ApiError(400, "unknown_degradation", f"degradation {degradation[:40]!r} is not one this model "
                           f"can be told: {', '.join(image_families(known))}")
        if reason := not_an_image_family(degradation):
            raise ApiError(400, "degradation_not_for_images", reason)
        if adapter:
            raise ApiError(400, "degradation_with_adapter", "give 'adapter' or 'degradation', not both: an "
                           "adapter already says what the degradation is")

    async def restore_told(self, x: torch.Tensor, family: str) -> Restored:
        """One batched pass of the model told ``family``."""
        y, batch, seconds = await self.batcher.submit(Job(x, None, family=family))
        return Restored(y, batch, seconds)

    async def restore_blind(self, x: torch.Tensor, data: bytes | None = None) -> Restored:
        """The default path (``inference.restore_estimated``, served): the estimate (from the pixels and, for
        a JPEG file, its quantization tables in ``data``) on a compute thread, then one batched pass per
        family it found; none: the image comes back as it came."""
        from metarestore.inference import blind_plan

        start = time.perf_counter()
        estimate = await on(self.compute, self.estimator, x, data)
        estimate_s = time.perf_counter() - start
        batch, forward_s = 0, 0.0
        steps = blind_plan(self.learner, estimate)
        for step in steps:
            y, batch, seconds = await self.batcher.submit(Job(x, None, family=step.family))
            x = step.keep(x, y)
            forward_s += seconds
        return Restored(x, batch, forward_s, estimate_s, estimate.summary(), [str(s) for s in steps])

    async def restore_adapted(self, adapter_id: str, adapter, x: torch.Tensor) -> Restored:
        """``Adapter.restore`` in two parts: the operator pre-step (if the path has one) on this request
        alone, in tiles, then the restorer (the model with the adapter's FiLM/LoRA state, or as it is) in the
        batched forward pass with the other requests of the same size and adapter. Classical paths (wiener,
        rl: no restorer) are answered unbatched."""
        pre_s = 0.0
        if adapter.path.pre != "none":
            start = time.perf_counter()
            x = await on(self.compute, self._pre_step, adapter, x)
            pre_s = time.perf_counter() - start
        path = adapter.path
        if path.restorer == "none":
            return Restored(x.clamp(0, 1), 1, pre_s)
        if not path.adapted:  # told:F*N: N batched passes
            forward_s, batch = 0.0, 0
            for _ in range(path.passes):
                x, batch, seconds = await self.batcher.submit(Job(x, adapter_id, family=path.told))
                forward_s += seconds
            return Restored(x, batch, pre_s + forward_s)
        y, batch, forward_s = await self.batcher.submit(Job(x, adapter_id, adapter.params, path.restorer,
                                                            family=path.told))
        return Restored(y, batch, pre_s + forward_s)

    def _pre_step(self, adapter, x: torch.Tensor) -> torch.Tensor:
        """The adapter's operator pre-step, in tiles (its memory stays bounded on large images like the
        model's), on this thread's own model copy (hqs restores with the model)."""
        from metarestore.inference import tiled
        from metarestore.operators.paths import pre_step

        with self.pool.borrow() as learner:
            return tiled(lambda t: pre_step(adapter.path, adapter.operators, t, learner), x,
                         self.cfg.tile, self.cfg.tile_overlap)

    def _run_batch(self, jobs: list[Job]) -> list[tuple[torch.Tensor, int, float]]:
        """Requests that queued together; same-size ones (and the same adapter) share a forward pass.
        Each gets (its image, the size of its pass, the seconds of its pass)."""
        from metarestore.inference import restore_image

        cfg, groups = self.cfg, {}
        for i, job in enumerate(jobs):
            h, w = job.x.shape[-2:]
            alone = i if max(h, w) > cfg.tile else -1  # tiled images go one by one: bounded memory
            groups.setdefault((h, w, job.adapter, job.family, alone), []).append(i)
        results: list[tuple[torch.Tensor, int, float]] = [None] * len(jobs)  # type: ignore[list-item]
        for members in groups.values():
            first = jobs[members[0]]
            batch = torch.cat([jobs[i].x for i in members]).to(self.device)  # tiles blend on the model's device
            with self.pool.borrow() as learner:  # this thread's own copy: nothing shared with other requests
                start = time.perf_counter()
                out = restore_image(learner, batch, first.params, tile=cfg.tile, overlap=cfg.tile_overlap,
                                    kind=first.kind, max_batch_pixels=cfg.max_batch_pixels,
                                    family=first.family).cpu()
                seconds = time.perf_counter() - start
            for j, i in enumerate(members):
                results[i] = (out[j:j + 1], len(members), seconds)
        return results

    # adapters ---------------------------------------------------------------------------------------
    async def read_adapter(self, data: bytes, adapter_id: str = "adapter"):
        """A stored adapter's bytes, parsed against this replica's model (an ``Adapter``; 409 if it cannot be)."""
        return await on(self.codec, read_adapter, data, self.learner, adapter_id)

    async def fit(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, path: str = "auto") -> Fitted:
        """An adapter for the pairs (``path``: auto or the path to use); 422 when they cannot be fitted."""
        from metarestore.operators.adapter import AdapterError

        try:
            return await on(self.compute, self._fit, support_x, support_y, steps, path)
        except AdapterError as exc:  # e.g. pairs too small, or path=jpeg on pairs no JPEG setting explains
            raise ApiError(422, "adapter_fit_failed", f"the pairs cannot be fitted with kind {path} ({exc})") from None

    def _fit(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, path: str) -> Fitted:
        """``fit_bounded`` on this thread's own model copy: pairs centre-cropped to ``adapt_side`` and the
        memory budget, at most ``adapt_folds`` leave-one-out folds, ``steps`` gradient steps per adapted
        path, each on ``adapt_patch``-px windows."""
        from metarestore.inference import fit_bounded

        cfg, start = self.cfg, time.perf_counter()
        with self.pool.borrow() as learner:  # this thread's own copy: nothing shared with other requests
            adapter = fit_bounded(learner, support_x, support_y, kind=path, paths=self.auto_paths,
                                  max_side=cfg.adapt_side, max_pixels=self.adapt_pixels, steps=steps,
                                  patch=cfg.adapt_patch, max_folds=cfg.adapt_folds,
                                  validation_steps=cfg.adapt_validation_steps, budget_s=cfg.adapt_budget_s,
                                  score_side=cfg.adapt_score_side)
            data = adapter.to_bytes()
        return Fitted(adapter, data, path, len(support_x), support_x.shape[-2], support_x.shape[-1], steps,
                      time.perf_counter() - start)


def auto_paths(names: list[str] | None, learner) -> list[str]:
    """The candidate paths of path=auto (default: the core's ``default_paths``). A bad name, or a family
    the model cannot be told, fails the deployment."""
    from metarestore.operators.paths import Path, default_paths

    paths = [Path.parse(n) for n in names] if names else default_paths(learner)
    for p in paths:
        learner.hint(p.told)
    if not paths:
        raise ValueError("auto_paths must name at least one path")
    return [p.name for p in paths]


def read_adapter(data: bytes, learner, adapter_id: str = "adapter"):
    """The core's ``read_adapter`` (this format or an earlier version's FiLM deltas); anything else is a
    409: the stored adapter cannot be used, the client must create it again."""
    from metarestore.operators.adapter import AdapterError
    from metarestore.operators.adapter import read_adapter as read

    try:
        return read(data, learner)
    except AdapterError as exc:
        raise ApiError(409, "adapter_unreadable", f"adapter {adapter_id[:64]} cannot be used ({exc}); create "
                       "it again") from None
