"""Restoring whole images: one forward pass, or overlapping tiles so memory stays bounded; a pool of
model copies for servers that restore and adapt in several threads at once; adapters fitted at a bounded
cost."""

from __future__ import annotations

import copy
import math
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from metarestore.meta import MetaLearner
from metarestore.meta.adapt import FIT_OPTIMIZER, Params
from metarestore.pixels import center_crop

if TYPE_CHECKING:
    from metarestore.estimator import Estimate
    from metarestore.estimator.plan import Step
    from metarestore.operators.adapter import Adapter


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _window(tile_h: int, tile_w: int, overlap: int, device) -> torch.Tensor:
    """Weights that fall off linearly over the overlap, so seams blend instead of showing."""
    def ramp(n: int) -> torch.Tensor:
        w = torch.ones(n, device=device)
        k = min(overlap, n // 2)
        if k > 0:
            edge = torch.arange(1, k + 1, device=device, dtype=torch.float32) / (k + 1)
            w[:k], w[-k:] = edge, edge.flip(0)
        return w
    return ramp(tile_h)[:, None] * ramp(tile_w)[None, :]


def self_ensemble(restore: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The mean of ``restore`` over the eight rotations and flips of ``x``, each mapped back (the "x8"
    test-time ensemble of EDSR, BasicSR and KAIR): eight passes for +0.04 to +0.37 dB per family
    with the base model (docs/benchmarks.md)."""
    total = torch.zeros_like(x)
    for turns in range(4):
        for flip in (False, True):
            t = torch.rot90(x, turns, (-2, -1))
            t = t.flip(-1) if flip else t
            y = restore(t)
            y = y.flip(-1) if flip else y
            total += torch.rot90(y, -turns, (-2, -1))
    return total / 8


@torch.no_grad()
def restore_image(learner: MetaLearner, x: torch.Tensor, params: Params | None = None, tile: int | None = 256,
                  overlap: int = 32, kind: str | None = None, max_batch_pixels: int | None = None,
                  family: str | None = None, ensemble: bool = False) -> torch.Tensor:
    """Restore a (B, 3, H, W) batch in [0, 1], with an adapted state ``params`` of adapter ``kind``
    (default the model's own) when given; images larger than ``tile`` go through in tiles. On CPU 256 px
    tiles are the fastest (a 1024x1024 image: 1.8x faster than 512 px tiles, whose activations leave the
    caches; 128 px tiles repeat too much overlap; docs/benchmarks.md). On a GPU larger tiles are better.

    ``max_batch_pixels`` bounds the pixels of one forward pass: a batch goes through in chunks of that
    many pixels (at least one image or tile each). On CPU the activations of a small pass stay in the
    caches: 8 images of 256x256 at once cost 2.5x more per image than one at a time (docs/benchmarks.md).
    The result is the same either way. ``family`` names the degradation to a model that can be told it.
    ``ensemble``: every image or tile restored as the mean over its eight rotations and flips
    (``self_ensemble``), at eight times the cost."""
    if max_batch_pixels is not None and len(x) > 1:
        h, w = x.shape[-2:]
        side_h, side_w = (h, w) if tile is None else (min(h, tile), min(w, tile))  # one image, or one tile
        per_pass = max(1, max_batch_pixels // (side_h * side_w))
        if per_pass < len(x):
            return torch.cat([restore_image(learner, chunk, params, tile, overlap, kind, family=family,
                                            ensemble=ensemble) for chunk in x.split(per_pass)])
    told = {} if family is None else {"family": family}  # restorers of adapters' paths take no family

    def run(inp: torch.Tensor) -> torch.Tensor:
        if ensemble:
            return self_ensemble(lambda t: learner.restore(t, params, kind=kind, **told), inp)
        return learner.restore(inp, params, kind=kind, **told)

    return tiled(run, x, tile, overlap)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int | None = 256,
          overlap: int = 32) -> torch.Tensor:
    """``fn`` (any image-to-image map of the same size) on a (B, C, H, W) batch, in overlapping tiles
    blended with linear ramps when the image is larger than ``tile``: memory stays bounded whatever the
    image's size. Images that fit in one tile go through whole (and unclamped)."""
    h, w = x.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        return fn(x)
    out = torch.zeros_like(x)
    weight = torch.zeros(1, 1, h, w, device=x.device)
    stride = max(1, tile - overlap)
    for top in _starts(h, tile, stride):
        for left in _starts(w, tile, stride):
            patch = x[..., top:top + tile, left:left + tile]
            win = _window(patch.shape[-2], patch.shape[-1], overlap, x.device)
            out[..., top:top + tile, left:left + tile] += fn(patch) * win
            weight[..., top:top + tile, left:left + tile] += win
    return (out / weight).clamp(0, 1)


def told_families(learner: MetaLearner) -> list[str]:
    """The families an image can show that ``learner``'s model can be told (empty for a model without a
    family table)."""
    from metarestore.degradations import image_families

    return image_families(learner.hint_families)


def blind_plan(learner: MetaLearner, estimate: Estimate) -> list[Step]:
    """What blind restoration does with ``estimate``: the steps to undo in order (``[]``: leave the image as
    it is). A model that can be told families undoes each found one told (``estimator.plan``); a model
    without a family table has only its blind pass, run when the estimate finds anything at all."""
    from metarestore.estimator.plan import Step, plan

    told = told_families(learner)
    if told:
        return plan(estimate, told)
    return [Step(None)] if estimate.present else []


def apply_step(learner: MetaLearner, x: torch.Tensor, step: Step, **kwargs) -> torch.Tensor:
    """One step of a blind plan: the model told ``step.family``, keeping ``step.strength`` of its change."""
    return step.keep(x, restore_image(learner, x, family=step.family, **kwargs))


def restore_estimated(learner: MetaLearner, x: torch.Tensor, estimate: Estimate, **kwargs
                      ) -> tuple[torch.Tensor, list[Step]]:
    """Blind restoration as every default path does it (CLI, server, showcase, evaluation): undo what the
    estimate found, last applied first, each told to the model; or return ``x`` itself, untouched, when the
    estimate finds nothing, is unsure, or finds what the model cannot undo. ``kwargs``: ``restore_image``'s.
    Returns the output and the plan it followed."""
    steps = blind_plan(learner, estimate)
    for step in steps:
        x = apply_step(learner, x, step, **kwargs)
    return x, steps


def restore_as_asked(learner: MetaLearner, x: torch.Tensor, params: Params | None = None,
                     family: str | None = None, **kwargs) -> torch.Tensor:
    """The model told ``family`` or with an adapted state ``params``; with neither, the default blind path
    (``restore_blind``). ``kwargs``: ``restore_image``'s. What ``evaluate`` and ``showcase`` score."""
    if params is None and family is None:
        return restore_blind(learner, x, **kwargs)
    return restore_image(learner, x, params, family=family, **kwargs)


def restore_blind(learner: MetaLearner, x: torch.Tensor, estimator=None, **kwargs) -> torch.Tensor:
    """``restore_estimated`` for a (B, 3, H, W) batch, each image estimated on its own (default: the shipped
    estimator): the blind column of ``evaluate`` and ``showcase``. ``kwargs``: ``restore_image``'s."""
    from metarestore.estimator import default_estimator

    estimator = estimator or default_estimator()
    return torch.cat([restore_estimated(learner, image[None], estimator(image), **kwargs)[0] for image in x])


class ModelPool:
    """Independent copies of a learner, lent to one thread at a time.

    ``torch.func.functional_call`` (behind ``adapt()`` and ``restore(x, params)``) swaps parameters *on
    the module* for the duration of a call, so two threads sharing a module see each other's parameters.
    A server borrows a copy for each forward pass or adaptation: no two threads ever touch the same
    module, and the number of copies bounds how many computations (and their memory) run at once.

    ``threads``: torch's intra-op thread count for the borrowing thread. It is per OS thread, so worker
    threads would otherwise compute with torch's default (OMP_NUM_THREADS, else every core).
    """

    def __init__(self, learner: MetaLearner, size: int, threads: int | None = None):
        if size < 1:
            raise ValueError("a model pool needs at least one copy")
        self.size, self.threads = size, threads
        self._free: queue.SimpleQueue[MetaLearner] = queue.SimpleQueue()
        for _ in range(size):  # the original stays untouched: callers may read its parameters any time
            self._free.put(copy.deepcopy(learner))

    @contextmanager
    def borrow(self) -> Iterator[MetaLearner]:
        """A copy for this thread only; waits while all are lent."""
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        learner = self._free.get()
        try:
            yield learner
        finally:
            self._free.put(learner)


def adapt_bytes_per_pixel(learner: MetaLearner, probe: int = 32) -> int:
    """Estimated peak memory of ``adapt()`` per support pixel: the model's activations per pixel (counted
    on a small probe) x 4 bytes x 4 (kept for backward, their gradients, and the forward's temporaries).
    A server derives the most pixels it fits an adapter on from its memory budget with it."""
    floats = 0

    def count(module, inputs, output):
        nonlocal floats
        if torch.is_tensor(output) and not list(module.children()):
            floats += output.numel()

    hooks = [m.register_forward_hook(count) for m in learner.model.modules()]
    try:
        with torch.no_grad():
            learner.model(torch.zeros(1, 3, probe, probe, device=learner.device))
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, floats * 4 * 4 // (probe * probe))


def adapt_pixels(learner: MetaLearner, memory_mb: float) -> int:
    """The most support pixels an adapter fit may hold within ``memory_mb`` (``adapt_bytes_per_pixel``; at
    least 256): a server's bound from its ``adapt_memory_mb``."""
    return max(256, int(memory_mb * 2**20) // adapt_bytes_per_pixel(learner))


def fit_bounded(learner: MetaLearner, support_x: torch.Tensor, support_y: torch.Tensor, *, kind: str = "auto",
                paths: Iterable[str] | None = None, max_side: int = 128, max_pixels: int = 1_000_000,
                steps: int = 10, max_folds: int = 2, patch: int | None = 64, validation_steps: int | None = None,
                budget_s: float | None = None, score_side: int | None = 64, optimizer: str = FIT_OPTIMIZER) -> Adapter:
    """``fit_adapter`` at a bounded cost, for servers: every pair is centre-cropped to at most ``max_side``
    and to at most ``max_pixels`` over all pairs (the fit's memory and time grow with the pixels it sees,
    and a kernel, tone curve or FiLM scale is the same everywhere in an image, so a centre crop tells as
    much as the whole); each gradient step of an adapted restorer sees one random ``patch``-px window
    per pair. ``validation_steps``, ``budget_s`` and ``score_side``: ``fit_adapter``'s (gradient steps per
    candidate in validation, by default the final fit's, whose fold states the chosen path then keeps; a
    wall-clock budget for validating the adapted candidates; candidates scored on one window of this side of
    each held-out pair, a corner per fold).
    ``optimizer``: ``fit_adapter``'s (Adam unless asked).

    ``kind="auto"``: the path is chosen among ``paths`` (default: the core's) by held-out validation.
    Any other kind is a path name that is used whatever its score; it is still validated against the
    zero-shot restorer on the same folds, so its info reports an honest held-out gain too. The info
    gains ``kind``, ``fit_height`` and ``fit_width``.
    """
    from metarestore.operators.adapter import fit_adapter

    start = time.perf_counter()
    k, _, h, w = support_x.shape
    side = max(16, min(max_side, math.isqrt(max(1, max_pixels // k))))
    fit_h, fit_w = min(h, side), min(w, side)
    x, y = center_crop(support_x, fit_h, fit_w), center_crop(support_y, fit_h, fit_w)
    args = {"steps": steps, "max_folds": max_folds, "patch": patch, "validation_steps": validation_steps,
            "budget_s": budget_s, "score_side": score_side, "optimizer": optimizer}
    if kind == "auto":
        adapter = fit_adapter(learner, x, y, paths=paths, **args)
    else:  # the asked path, scored against the zero-shot restorer on the same folds
        adapter = fit_adapter(learner, x, y, paths=["zero_shot"], force=kind, **args)
    adapter.info.update(kind=kind, fit_height=fit_h, fit_width=fit_w,
                        fit_ms=round((time.perf_counter() - start) * 1000, 1))
    return adapter


# What a server with default settings fits (``serving/settings.py``'s ``adapt_*`` defaults; a test holds them
# equal), so that the showcase and ``evaluate --adapter auto`` show what a client of ``POST /v1/adapters`` gets.
SERVED_STEPS = 10
SERVED_MEMORY_MB = 2048.0
SERVED_FIT = {"max_side": 128, "max_folds": 2, "validation_steps": None, "budget_s": 0.6, "score_side": 64,
              "patch": 32}


def fit_as_served(learner: MetaLearner, support_x: torch.Tensor, support_y: torch.Tensor, *,
                  steps: int = SERVED_STEPS, kind: str = "auto", paths: Iterable[str] | None = None,
                  optimizer: str = FIT_OPTIMIZER, **changed: Any) -> Adapter:
    """``fit_bounded`` as a server with default settings calls it (the same crop, folds, budget and memory
    bound), for whoever must show what the product does with these pairs. ``steps=0``: only the paths without
    gradient steps are candidates (their restorer is the model as it is). ``changed``: ``SERVED_FIT`` settings
    that differ from the server's defaults (``budget_s=None``: what the choice gains from more time).
    ``optimizer``: ``fit_bounded``'s (a server fits with Adam)."""
    unknown = set(changed) - set(SERVED_FIT)
    if unknown:
        raise ValueError(f"not a served fit setting: {', '.join(sorted(unknown))} (known: {', '.join(SERVED_FIT)})")
    from metarestore.operators.paths import default_paths

    if steps == 0 and paths is None:
        paths = [p.name for p in default_paths(learner) if not p.adapted]
    return fit_bounded(learner, support_x, support_y, kind=kind, paths=paths, steps=max(steps, 1), optimizer=optimizer,
                       max_pixels=adapt_pixels(learner, SERVED_MEMORY_MB), **{**SERVED_FIT, **changed})
