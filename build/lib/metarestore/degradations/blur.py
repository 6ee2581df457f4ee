"""Blur families: (an)isotropic Gaussian blur and linear motion blur, both a depthwise convolution."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from metarestore.degradations._ops import depthwise_conv
from metarestore.degradations.base import Degradation, Params, ParamSpec, draw_seed, jittered

MAX_GAUSSIAN_KERNEL = 21


def gaussian_kernel(sigma_x: float, sigma_y: float, angle: float) -> torch.Tensor:
    """A normalised 2-D Gaussian (float64, CPU) with std ``sigma_x`` along the direction ``angle`` (radians)
    and ``sigma_y`` across it; odd size 2*ceil(3*max sigma)+1, at most 21."""
    radius = min(math.ceil(3.0 * max(sigma_x, sigma_y)), MAX_GAUSSIAN_KERNEL // 2)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    kernel = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return kernel / kernel.sum()


def motion_kernel(length: float, angle_deg: float, oversample: int = 8) -> torch.Tensor:
    """A normalised anti-aliased line ``length`` pixels long through the centre at ``angle_deg``
    (counter-clockwise from the x axis, image y pointing down), float64 on the CPU: the segment is
    rasterised on an ``oversample`` times finer grid and box-averaged back, so a horizontal line of
    length 3 is exactly [1/3, 1/3, 1/3]. Odd size 2*ceil(length/2 - 0.5)+1 (21 at length 21)."""
    half = max(float(length), 1.0) / 2.0
    radius = max(0, math.ceil(half - 0.5))
    size = 2 * radius + 1
    fine = size * oversample
    n = int(math.ceil(2 * half * oversample * 8))  # points at the centres of n equal pieces
    t = -half + (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * half / n)
    a = math.radians(angle_deg)
    # Coarse pixel j covers [j - 0.5, j + 0.5); fine pixel f covers [f/s - 0.5, (f + 1)/s - 0.5).
    fx = ((t * math.cos(a) + radius + 0.5) * oversample).floor().long().clamp(0, fine - 1)
    fy = ((-t * math.sin(a) + radius + 0.5) * oversample).floor().long().clamp(0, fine - 1)
    counts = torch.bincount(fy * fine + fx, minlength=fine * fine).to(torch.float64)
    kernel = counts.view(size, oversample, size, oversample).sum(dim=(1, 3))
    return kernel / kernel.sum()


@dataclass
class GaussianBlur(Degradation):
    """Defocus-like blur with an isotropic or anisotropic (rotated) Gaussian kernel."""

    name: str = "gaussian_blur"
    description: str = ("Gaussian blur; half the samples isotropic (sigma_y = sigma_x, angle 0), half "
                        "anisotropic (sigma_y <= sigma_x, random angle); kernel <= 21x21, reflect padding")
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "sigma_x": ParamSpec(0.5, 3.5, "std along the kernel's main axis, pixels (grows with severity)"),
        "sigma_y": ParamSpec(0.5, 3.5, "std across the main axis, pixels (= sigma_x when isotropic, "
                                       "else uniform in [0.5, sigma_x])"),
        "angle": ParamSpec(0.0, math.pi, "orientation of the main axis, radians (uniform, not severity)")})

    def sample(self, severity: float, generator: torch.Generator) -> Params:
        t = jittered(severity, generator)
        sigma_x = self.specs["sigma_x"].at(t)
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        if u[0] < 0.5:
            sigma_y, angle = sigma_x, 0.0
        else:
            low = self.specs["sigma_y"].low
            sigma_y = low + (sigma_x - low) * u[1]
            angle = math.pi * u[2]
        return {"sigma_x": float(sigma_x), "sigma_y": float(sigma_y), "angle": float(angle),
                "seed": draw_seed(generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        kernel = gaussian_kernel(float(params["sigma_x"]), float(params["sigma_y"]), float(params["angle"]))
        return depthwise_conv(x, kernel)


@dataclass
class MotionBlur(Degradation):
    """Linear (camera-shake) motion blur along one direction."""

    name: str = "motion_blur"
    description: str = "linear motion blur: an anti-aliased line kernel, reflect padding"
    specs: dict[str, ParamSpec] = field(default_factory=lambda: {
        "length": ParamSpec(3.0, 21.0, "blur length, pixels"),
        "angle": ParamSpec(0.0, 180.0, "motion direction, degrees from the x axis (uniform, not severity)")})

    def sample(self, severity: float, generator: torch.Generator) -> Params:
        t = jittered(severity, generator)
        angle = 180.0 * torch.rand((), generator=generator, dtype=torch.float64).item()
        return {"length": self.specs["length"].at(t), "angle": float(angle), "seed": draw_seed(generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return depthwise_conv(x, motion_kernel(float(params["length"]), float(params["angle"])))
