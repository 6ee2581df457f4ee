"""Resolution and compression families: JPEG artefacts and bicubic down-up sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from metarestore.degradations.base import Degradation, Params, ParamSpec
from metarestore.pixels import to_uint8


@dataclass
class Jpeg(Degradation):
    """JPEG compression artefacts (blocking, ringing, colour bleeding)."""

    name: str = "jpeg"
    description: str = "JPEG encode/decode round trip (torchvision, CPU, 8-bit), grey for 1-channel batches"
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "quality": ParamSpec(90, 10, "JPEG quality factor 1..100 (lower = stronger artefacts)",
                             integer=True)})

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        quality = int(round(float(params["quality"])))
        mode = ImageReadMode.GRAY if x.shape[1] == 1 else ImageReadMode.RGB
        images = list(to_uint8(x).unbind(0))
        decoded = decode_jpeg(encode_jpeg(images, quality=quality), mode=mode)
        return (torch.stack(decoded).to(torch.float32) / 255.0).to(x.device, x.dtype)


@dataclass
class Downsample(Degradation):
    """Loss of resolution: antialiased bicubic downscale, then bicubic upscale to the original size."""

    name: str = "downsample"
    description: str = "bicubic down by `scale` (antialiased) then bicubic back up to (H, W)"
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "scale": ParamSpec(2.0, 4.0, "downscaling factor (dimensionless)")})

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        scale = float(params["scale"])
        h, w = x.shape[-2:]
        size = (max(1, round(h / scale)), max(1, round(w / scale)))
        small = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
