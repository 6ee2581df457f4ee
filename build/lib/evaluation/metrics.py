"""Scoring one restored image against its reference: PSNR and SSIM (torchmetrics, through
``metarestore.meta.losses``), and LPIPS when its weights are already on this machine.

A condition says how to measure, so protocol numbers compare with published tables: 8-bit outputs
(``quantize``), the BT.601 luma channel (``y_channel``, as super-resolution and JPEG papers report),
and a border shave. LPIPS (AlexNet, torchmetrics) needs torchvision's ImageNet AlexNet weights in the
torch hub cache; nothing is ever downloaded: without them the column is empty and the report says why.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from evaluation.conditions import Condition
from metarestore.meta.losses import psnr, ssim
from metarestore.pixels import quantize


def to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma in [16/255, 235/255], MATLAB's ``rgb2ycbcr`` (what SR/JPEG tables use): (B, 1, H, W)."""
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (16.0 + (x * weights).sum(dim=1, keepdim=True)) / 255.0


def shave(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border:-border, border:-border] if border > 0 else x


def lpips_weights() -> Path:
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / AlexNet_Weights.DEFAULT.url.rsplit("/", 1)[-1]


def lpips_status() -> tuple[bool, str]:
    """(available, note) without downloading anything."""
    path = lpips_weights()
    if path.is_file():
        return True, "LPIPS: AlexNet variant (torchmetrics), lower is better"
    return False, (f"LPIPS skipped: its AlexNet weights are not in the torch hub cache ({path}); "
                   "put them there to get the column")


_LPIPS: dict[str, torch.nn.Module] = {}


def lpips_model(device: torch.device | str) -> torch.nn.Module:
    """One LPIPS network per process and device."""
    key = str(device)
    if key not in _LPIPS:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        _LPIPS[key] = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device).eval()
    return _LPIPS[key]


@torch.no_grad()
def score(output: torch.Tensor, clean: torch.Tensor, cond: Condition, with_lpips: bool = False) -> dict[str, float]:
    """PSNR (dB), SSIM and LPIPS (NaN unless ``with_lpips``) of one (1, 3, H, W) output."""
    output = quantize(output) if cond.quantize else output.clamp(0, 1)
    out, ref = (to_y(output), to_y(clean)) if cond.y_channel else (output, clean)
    out, ref = shave(out, cond.shave), shave(ref, cond.shave)
    scores = {"psnr": psnr(out, ref), "ssim": ssim(out, ref), "lpips": math.nan}
    if with_lpips:
        metric = lpips_model(output.device)
        scores["lpips"] = float(metric(shave(output, cond.shave), shave(clean, cond.shave)))
        metric.reset()
    return scores
