"""8-bit pixels and crops: the one home of turning [0, 1] floats into 8-bit values and of cutting windows
out of images (a leaf module: it imports nothing of the package)."""

from __future__ import annotations

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A float tensor in [0, 1] -> uint8 of the same shape, on the CPU: clamp, round (what saving does)."""
    return (x.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """The float a saved 8-bit image reads back as: clamp, round to 1/255 (same device and dtype)."""
    return (x.clamp(0, 1) * 255.0).round() / 255.0


def window(x: torch.Tensor, height: int, width: int, place: tuple[float, float]) -> torch.Tensor:
    """The ``height`` x ``width`` window of (..., H, W) at ``place``: fractions (top, left) of the free range,
    (0, 0) the top-left corner, (1, 1) the bottom-right; a side shorter than asked is kept whole."""
    h, w = x.shape[-2:]
    ch, cw = min(height, h), min(width, w)
    top, left = int(place[0] * (h - ch)), int(place[1] * (w - cw))
    return x[..., top:top + ch, left:left + cw]


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central ``height`` x ``width`` window of (..., H, W); a side shorter than asked is kept whole.
    top = (H - height) // 2, left = (W - width) // 2."""
    return window(x, height, width, (0.5, 0.5))


def random_crops(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``size`` x ``size`` window per pair of (K, C, H, W) ``x`` and ``y``, at the same place
    in both (sides shorter than ``size`` are kept whole)."""
    h, w = x.shape[-2:]
    ch, cw = min(size, h), min(size, w)
    tops = torch.randint(0, h - ch + 1, (x.shape[0],), generator=generator).tolist()
    lefts = torch.randint(0, w - cw + 1, (x.shape[0],), generator=generator).tolist()
    xs = torch.stack([x[i, :, t:t + ch, s:s + cw] for i, (t, s) in enumerate(zip(tops, lefts, strict=True))])
    ys = torch.stack([y[i, :, t:t + ch, s:s + cw] for i, (t, s) in enumerate(zip(tops, lefts, strict=True))])
    return xs, ys
