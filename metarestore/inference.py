"""Restoring whole images: one forward pass, or overlapping tiles so memory stays bounded; a pool of
model copies for servers that restore and adapt in several threads at once."""

from __future__ import annotations

import copy
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from metarestore.meta import MetaLearner
from metarestore.meta.adapt import Params


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


@torch.no_grad()
def restore_image(learner: MetaLearner, x: torch.Tensor, params: Params | None = None, tile: int | None = 512,
                  overlap: int = 32) -> torch.Tensor:
    """Restore a (B, 3, H, W) batch in [0, 1]; images larger than ``tile`` go through in tiles."""
    h, w = x.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        return learner.restore(x, params)
    out = torch.zeros_like(x)
    weight = torch.zeros(1, 1, h, w, device=x.device)
    stride = max(1, tile - overlap)
    for top in _starts(h, tile, stride):
        for left in _starts(w, tile, stride):
            patch = x[..., top:top + tile, left:left + tile]
            win = _window(patch.shape[-2], patch.shape[-1], overlap, x.device)
            out[..., top:top + tile, left:left + tile] += learner.restore(patch, params) * win
            weight[..., top:top + tile, left:left + tile] += win
    return (out / weight).clamp(0, 1)


class ModelPool:
    """Independent copies of a learner, lent to one thread at a time.

    ``torch.func.functional_call`` (behind ``adapt()`` and ``restore(x, params)``) swaps parameters *on
    the module* for the duration of a call, so two threads sharing a module see each other's parameters.
    A server borrows a copy for each forward pass or adaptation: no two threads ever touch the same
    module, and the number of copies bounds how many computations (and their memory) run at once.
    """

    def __init__(self, learner: MetaLearner, size: int):
        if size < 1:
            raise ValueError("a model pool needs at least one copy")
        self.size = size
        self._free: queue.SimpleQueue[MetaLearner] = queue.SimpleQueue()
        for _ in range(size):  # the original stays untouched: callers may read its parameters any time
            self._free.put(copy.deepcopy(learner))

    @contextmanager
    def borrow(self) -> Iterator[MetaLearner]:
        """A copy for this thread only; waits while all are lent."""
        learner = self._free.get()
        try:
            yield learner
        finally:
            self._free.put(learner)


def adapt_bytes_per_pixel(learner: MetaLearner, probe: int = 32) -> int:
    """Estimated peak memory of ``adapt()`` per support pixel: the model's activations per pixel (counted
    on a small probe) x 4 bytes x 4 (kept for backward, their gradients, and the forward's temporaries).
    A server derives the most pixels it adapts on from its memory budget with it."""
    floats = 0

    def count(module, inputs, output):
        nonlocal floats
        if torch.is_tensor(output) and not list(module.children()):
            floats += output.numel()

    hooks = [m.register_forward_hook(count) for m in learner.model.modules()]
    try:
        with torch.no_grad():
            learner.model(torch.zeros(1, 3, probe, probe))
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, floats * 4 * 4 // (probe * probe))


@dataclass
class Adaptation:
    """What ``adapt_on_patches`` found: the adapted parameters and how they did on the evaluation patches."""

    params: Params
    steps: int  # steps taken before the evaluation loss stopped improving (the best step's count)
    psnr_input: float  # degraded evaluation patches against clean ones
    psnr_before: float  # restored without adaptation
    psnr_after: float  # restored with ``params`` (never below psnr_before: step 0 is a candidate)


def _patch_corners(gen: torch.Generator, count: int, h: int, w: int, size: int) -> list[tuple[int, int]]:
    tops = torch.randint(0, h - size + 1, (count,), generator=gen).tolist()
    lefts = torch.randint(0, w - size + 1, (count,), generator=gen).tolist()
    return list(zip(tops, lefts, strict=True))


def _patches(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, per_image: int,
             size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_image`` random size x size patches of every pair, the same place in both images."""
    xs, ys = [], []
    for i in range(x.shape[0]):
        for top, left in _patch_corners(gen, per_image, x.shape[-2], x.shape[-1], size):
            xs.append(x[i, :, top:top + size, left:left + size])
            ys.append(y[i, :, top:top + size, left:left + size])
    return torch.stack(xs), torch.stack(ys)


def adapt_on_patches(learner: MetaLearner, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, *,
                     patch: int = 64, step_pixels: int = 40_000, eval_pixels: int = 20_000, patience: int = 2,
                     lr_scale: float = 1.0, seed: int = 0) -> Adaptation:
    """Few-shot adaptation at a cost independent of the images' size.

    Each of at most ``steps`` first-order steps (the learner's own ``adapt()``, loss and inner rates, the
    rates times ``lr_scale``) sees fresh random ``patch``-sized crops of the support pairs, about
    ``step_pixels`` in all: the adaptable parameters of a restorer (FiLM scales and shifts, a decoder)
    act the same everywhere in an image, so a sample of its patches gives nearly the gradient of the
    whole and memory stays bounded. Fixed evaluation patches (about ``eval_pixels``) are scored before
    and after every step; the parameters with the best score are returned, and adaptation stops after
    ``patience`` steps without improvement. The model itself is never modified.
    """
    from metarestore.meta.adapt import adapt, adaptable_params
    from metarestore.meta.losses import psnr

    k, _, h, w = support_x.shape
    size = max(8, min(patch, h, w, int((step_pixels / k) ** 0.5)))  # one patch per pair fits the budget
    gen = torch.Generator().manual_seed(seed)
    eval_x, eval_y = _patches(support_x, support_y, gen, max(1, round(eval_pixels / (k * size * size))), size)
    per_step = max(1, round(step_pixels / (k * size * size)))
    lrs = {g: float(v) * lr_scale for g, v in learner.inner_lrs().items()}
    params = adaptable_params(learner.model, detach=True)

    def score(p: Params) -> float:
        return psnr(learner.restore(eval_x, p), eval_y)

    best, best_params, best_step = score(params), params, 0
    before = best
    for step in range(1, steps + 1):
        x, y = _patches(support_x, support_y, gen, per_step, size)
        params = adapt(learner.model, x, y, steps=1, lrs=lrs, params=params, loss_fn=learner.loss_fn,
                       first_order=True)
        params = {n: p.detach().requires_grad_(True) for n, p in params.items()}  # no graph across steps
        now = score(params)
        if now > best:
            best, best_params, best_step = now, params, step
        elif step - best_step >= patience:
            break
    return Adaptation({n: p.detach() for n, p in best_params.items()}, best_step, psnr(eval_x, eval_y), before,
                      best)
