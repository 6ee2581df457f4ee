"""PSNR, defined once: torchmetrics' per-image definition (data range 1, the mean over images of each
image's PSNR), which the training loss, evaluation and the adapter's held-out scores all use, so that an
adapter is chosen by the very figure evaluation reports. A leaf module (torch only)."""

from __future__ import annotations

import torch

MSE_FLOOR = 1e-12  # a metric's floor: identical images score 120 dB, not infinity


def decibels(power: torch.Tensor) -> torch.Tensor:
    """``10 log_10(power)``: the one place a ratio becomes decibels (PSNR; the estimator's log spectrum)."""
    return 10.0 * torch.log10(power)


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """PSNR in dB of each image of a (B, ...) batch against ``target``, images in [0, 1]: ``-10 log_10(mse
    + eps)`` with the mean squared error over each image's pixels (``eps`` bounds it, e.g. for a loss)."""
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return -decibels(mse + eps)


@torch.no_grad()
def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean PSNR (dB) over the images of a (B, C, H, W) batch (a (C, H, W) tensor is one image), the
    prediction clamped to [0, 1], in float64."""
    pred, target = (pred[None] if pred.ndim == 3 else pred), (target[None] if target.ndim == 3 else target)
    return float(psnr_per_image(pred.clamp(0, 1).double(), target.double(), eps=MSE_FLOOR).mean())
