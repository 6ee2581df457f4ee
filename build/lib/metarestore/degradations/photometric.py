"""Photometric families: low light, colour cast, contrast reduction, haze."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from metarestore.degradations._ops import cpu_randn
from metarestore.degradations.base import (
    Degradation,
    Params,
    ParamSpec,
    cpu_generator,
    draw_seed,
    jittered,
)


@dataclass
class LowLight(Degradation):
    """Under-exposure: darkening by exposure and gamma, plus Gaussian read noise."""

    name: str = "low_light"
    description: str = "y = exposure * x ** gamma + noise_sigma * n, n ~ N(0, 1)"
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "exposure": ParamSpec(1.0, 0.1, "multiplicative exposure factor"),
        "gamma": ParamSpec(1.0, 2.5, "power applied to the image (> 1 darkens mid-tones)"),
        "noise_sigma": ParamSpec(0.0, 0.03, "std of additive read noise after darkening, image units")})

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        dark = float(params["exposure"]) * x.clamp_min(0.0) ** float(params["gamma"])
        return dark + float(params["noise_sigma"]) * cpu_randn(tuple(x.shape), params["seed"], x)


@dataclass
class ColorCast(Degradation):
    """Colour cast / wrong white balance: one gain per RGB channel."""

    name: str = "color_cast"
    description: str = ("per-channel gains 1 + strength * direction (random unit 3-vector), strength 0 at "
                        "severity 0 to 0.5 at severity 1, clamped to [0.5, 1.5]; grey input uses the mean "
                        "gain")
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        key: ParamSpec(0.5, 1.5, f"gain of the {colour} channel (range; 1.0 at severity 0)")
        for key, colour in (("gain_r", "red"), ("gain_g", "green"), ("gain_b", "blue"))})

    def sample(self, severity: float, generator: torch.Generator) -> Params:
        strength = 0.5 * jittered(severity, generator)
        direction = torch.randn(3, generator=generator, dtype=torch.float64)
        direction = direction / direction.norm().clamp_min(1e-12)
        gains = (1.0 + strength * direction).clamp(0.5, 1.5).tolist()
        params: Params = dict(zip(("gain_r", "gain_g", "gain_b"), gains, strict=True))
        params["seed"] = draw_seed(generator)
        return params

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        gains = [float(params[key]) for key in ("gain_r", "gain_g", "gain_b")]
        if x.shape[1] == 1:
            return x * (sum(gains) / 3.0)
        return x * torch.tensor(gains, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)


@dataclass
class Contrast(Degradation):
    """Contrast reduction towards each image's mean intensity."""

    name: str = "contrast"
    description: str = "y = m + factor * (x - m), m the per-image mean over C, H, W"
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "factor": ParamSpec(1.0, 0.2, "contrast factor (1 = unchanged)")})

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return mean + (x - mean) * float(params["factor"])


def depth_maps(batch: int, height: int, width: int, seed: int, grid: int = 4) -> torch.Tensor:
    """Smooth synthetic depth (B,1,H,W) in [0.2, 1] on the CPU: a grid x grid random field, bicubic
    upsampled and normalised per image."""
    coarse = torch.rand((batch, 1, grid, grid), generator=cpu_generator(seed), dtype=torch.float32)
    depth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
    low = depth.amin(dim=(2, 3), keepdim=True)
    high = depth.amax(dim=(2, 3), keepdim=True)
    return 0.2 + 0.8 * (depth - low) / (high - low).clamp_min(1e-6)


@dataclass
class Haze(Degradation):
    """Haze / fog from the atmospheric scattering model over a smooth synthetic depth map."""

    name: str = "haze"
    description: str = ("I = J * t + A * (1 - t), t = exp(-beta * d); d a smooth random depth map in "
                        "[0.2, 1] per image (from `seed`)")
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "beta": ParamSpec(0.3, 2.5, "scattering coefficient, per unit depth"),
        "airlight": ParamSpec(0.7, 1.0, "atmospheric light A, image units")})

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        b, _, h, w = x.shape
        depth = depth_maps(b, h, w, params["seed"]).to(x.device, x.dtype)
        t = torch.exp(-float(params["beta"]) * depth)
        return x * t + float(params["airlight"]) * (1.0 - t)
