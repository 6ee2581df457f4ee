"""Restoring whole images: one forward pass, or overlapping tiles so memory stays bounded."""

from __future__ import annotations

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
