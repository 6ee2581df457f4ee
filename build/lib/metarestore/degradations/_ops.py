"""Small tensor helpers shared by the degradation families (noise draws, depthwise convolution)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarestore.degradations.base import cpu_generator


def cpu_randn(shape: tuple[int, ...], seed: int, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``seed`` (float32), then moved to ``like``'s device and
    dtype: the same seed gives the same noise on every device."""
    noise = torch.randn(shape, generator=cpu_generator(seed), dtype=torch.float32)
    return noise.to(like.device, like.dtype)


def pad_mode(x: torch.Tensor, pad: int) -> str:
    """Reflect padding where the image is large enough for it, else replicate."""
    return "reflect" if pad < x.shape[-2] and pad < x.shape[-1] else "replicate"


def depthwise_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel of ``x`` (B,C,H,W) with one odd-sized square ``kernel`` (k,k), same size out.

    On CUDA the convolution runs in float64, which has no TF32 path, so CPU and CUDA agree to ~1e-6."""
    k = kernel.shape[-1]
    pad = k // 2
    work = torch.float64 if x.is_cuda else torch.float32
    channels = x.shape[1]
    weight = kernel.to(x.device, work).expand(channels, 1, k, k)
    xp = F.pad(x.to(work), (pad, pad, pad, pad), mode=pad_mode(x, pad))
    return F.conv2d(xp, weight, groups=channels).to(x.dtype)
