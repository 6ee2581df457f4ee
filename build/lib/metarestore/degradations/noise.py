"""Noise families: additive Gaussian, Poisson shot noise, salt-and-pepper."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

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
class GaussianNoise(Degradation):
    """Additive white Gaussian noise, i.i.d. over pixels and channels."""

    name: str = "gaussian_noise"
    description: str = "additive white Gaussian noise y = x + sigma * n, n ~ N(0, 1)"
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "sigma": ParamSpec(5 / 255, 50 / 255, "noise standard deviation, image units (0..1 scale)")})

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return x + float(params["sigma"]) * cpu_randn(tuple(x.shape), params["seed"], x)


@dataclass
class Awgn(GaussianNoise):
    """Additive white Gaussian noise on float values, *not* clipped to [0, 1]: the published denoising
    benchmarks' inputs (CBSD68, Kodak24 at sigma 15/25/50) and a linear signal before it is saved.

    A family of its own, not a flag of ``gaussian_noise`` (a saved photo's noise, clipped), because the two
    want different restorers near black and white: clipped noise has a mean there that must be taken off,
    unclipped noise none. One network trained on clipped noise loses 0.4 dB on unclipped noise, and trained
    on both without being told which, gains there what it loses on photos (docs/benchmarks.md,
    "Unclipped noise"); a told model learns a row for each."""

    name: str = "awgn"
    description: str = ("additive white Gaussian noise y = x + sigma * n, not clipped to [0, 1] (the float "
                        "inputs of the published denoising benchmarks)")
    clipped: bool = False


@dataclass
class PoissonNoise(Degradation):
    """Photon shot noise: y = Poisson(x * peak) / peak."""

    name: str = "poisson_noise"
    description: str = "Poisson shot noise y = Poisson(x * peak) / peak; fewer photons = noisier"
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "peak": ParamSpec(100.0, 3.0, "expected photon count at white (x = 1); interpolated geometrically "
                                      "over severity")})

    def sample(self, severity: float, generator: torch.Generator) -> Params:
        t = jittered(severity, generator)
        spec = self.specs["peak"]
        peak = math.exp(math.log(spec.low) + t * (math.log(spec.high) - math.log(spec.low)))
        return {"peak": float(peak), "seed": draw_seed(generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        peak = float(params["peak"])
        rates = x.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * peak
        counts = torch.poisson(rates, generator=cpu_generator(params["seed"]))
        return (counts / peak).to(x.device, x.dtype)


@dataclass
class SaltPepper(Degradation):
    """Impulse noise: a fraction of pixels (all channels together) set to black or white."""

    name: str = "salt_pepper"
    description: str = "salt-and-pepper impulse noise; a pixel hit is set to 1 (salt) or 0 (pepper)"
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "amount": ParamSpec(0.01, 0.2, "fraction of pixels replaced"),
        "salt_ratio": ParamSpec(0.5, 0.5, "fraction of replaced pixels set to white (the rest black)")})

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        b, _, h, w = x.shape
        g = cpu_generator(params["seed"])
        hit = torch.rand((b, 1, h, w), generator=g) < float(params["amount"])
        salt = torch.rand((b, 1, h, w), generator=g) < float(params["salt_ratio"])
        hit, salt = hit.to(x.device), salt.to(x.device, x.dtype)
        return torch.where(hit, salt, x)
