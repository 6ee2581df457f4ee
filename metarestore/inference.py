"""Restoring whole images: one forward pass, or overlapping tiles so memory stays bounded; a pool of
model copies for servers that restore and adapt in several threads at once."""

from __future__ import annotations

import copy
import queue
from collections.abc import Iterator
from contextlib import contextmanager

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
