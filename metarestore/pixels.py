"""8-bit pixels and centre crops: the one home of turning [0, 1] floats into 8-bit values and of cutting
the central window of an image (a leaf module: it imports nothing of the package)."""

from __future__ import annotations

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A float tensor in [0, 1] -> uint8 of the same shape, on the CPU: clamp, round (what saving does)."""
    return (x.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """The float a saved 8-bit image reads back as: clamp, round to 1/255 (same device and dtype)."""
    return (x.clamp(0, 1) * 255.0).round() / 255.0


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central ``height`` x ``width`` window of (..., H, W); a side shorter than asked is kept whole.
    top = (H - height) // 2, left = (W - width) // 2."""
    h, w = x.shape[-2:]
    ch, cw = min(height, h), min(width, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]
