"""Training losses and image-quality metrics (SSIM from torchmetrics; PSNR, defined once, from
``metarestore.metrics``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from metarestore.metrics import psnr, psnr_per_image
from metarestore.registry import Registry

__all__ = ["LOSSES", "charbonnier", "get_loss", "l1", "psnr", "psnr_capped_loss", "psnr_loss", "ssim"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((pred - target).pow(2) + eps * eps).mean()


def psnr_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Negative PSNR (NAFNet's PSNRLoss): the gradient is scaled by 1/MSE, so families whose inputs are
    already good (mild JPEG, blur) weigh as much as the badly damaged ones instead of being drowned out."""
    return -psnr_per_image(pred, target, eps).mean()


def psnr_capped_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative PSNR whose gain stops paying near 40 dB (an MSE floor of 1e-4): with a mixture of
    severities, per-image PSNR otherwise spends most of its weight (1/MSE) on the few nearly clean or
    flat patches, where a dB costs nothing, and the network learns to leave blur and JPEG alone."""
    return psnr_loss(pred, target, eps=1e-4)


LOSSES: Registry[LossFn] = Registry("loss", {"l1": l1, "charbonnier": charbonnier, "psnr": psnr_loss,
                                               "psnr_capped": psnr_capped_loss})


def get_loss(name: str) -> LossFn:
    return LOSSES[name]


@torch.no_grad()
def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(structural_similarity_index_measure(pred.clamp(0, 1), target, data_range=1.0))
