"""Haze identification: the atmospheric scattering model ``d = t c + (1 - t) A`` with a per-pixel
transmission t and one airlight colour A.

From the support pairs, every pixel's change ``d - c`` points from c towards A, so A is the point
closest (least squares, weighted by the change's size) to all the lines through c along d - c: a 3x3
linear system. The dark channel prior (He, Sun and Tang, CVPR 2009) then estimates t on a new image,
``t = 1 - omega * dark(d / A)``, where omega, normally fixed at 0.95, is fitted from the pairs' true
transmissions; the known A replaces the prior's guess from the brightest pixels, which a coloured
airlight fools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarestore.operators.base import Operator, register_operator, stored

PATCH = 7
T_MIN = 0.1


def dark_channel(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): the minimum over colours and a ``patch`` x ``patch`` window."""
    m = x.amin(dim=1, keepdim=True)
    pad = patch // 2
    return -F.max_pool2d(F.pad(-m, (pad, pad, pad, pad), mode="replicate"), patch, stride=1)


def estimate_airlight(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """The prior's own airlight guess per image (B, C): the brightest colour among the 0.1 % of pixels
    with the largest dark channel."""
    dark = dark_channel(x, patch).flatten(1)
    n = max(1, dark.shape[1] // 1000)
    idx = dark.topk(n, dim=1).indices
    flat = x.flatten(2)
    return torch.stack([flat[b][:, idx[b]].amax(dim=1) for b in range(x.shape[0])]).clamp(1e-3, 1)


def dehaze(x: torch.Tensor, airlight: torch.Tensor | None = None, omega: float = 0.95,
           patch: int = PATCH) -> torch.Tensor:
    """Dark channel prior dehazing of (B, 3, H, W) with a given airlight (C,) or the prior's guess."""
    a = estimate_airlight(x, patch) if airlight is None else airlight.to(x)[None].expand(x.shape[0], -1)
    a = a[:, :, None, None].clamp(min=1e-3)
    t = (1.0 - omega * dark_channel(x / a, patch)).clamp(min=T_MIN)
    # the window minimum makes t blocky: smooth it over the same window (a guided filter would keep edges)
    pad = patch // 2
    t = F.avg_pool2d(F.pad(t, (pad, pad, pad, pad), mode="replicate"), patch, stride=1).clamp(min=T_MIN)
    return ((x - a) / t + a).clamp(0, 1)


@register_operator("haze")
@dataclass
class HazeFit(Operator):
    """The ``haze`` operator (path ``haze``): colour images only; no forward model (the transmission of a
    new image is the prior's estimate, known only when restoring)."""

    airlight: torch.Tensor  # (C,)
    omega: float
    residual: float  # relative RMS distance of the pairs' change vectors from the airlight model

    pre_steps = ("haze",)
    channels = 3

    @classmethod
    def fit(cls, clean: torch.Tensor, degraded: torch.Tensor) -> HazeFit:
        return fit_haze(clean, degraded)

    def restore(self, x: torch.Tensor, path=None, learner=None) -> torch.Tensor:
        return dehaze(x, self.airlight, self.omega)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"haze.airlight": stored(self.airlight)}

    def header(self) -> dict:
        return {"omega": self.omega}

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], header: dict, residual: float, learner) -> HazeFit | None:
        if "haze.airlight" not in tensors:
            return None
        return cls(tensors["haze.airlight"], float(header.get("omega") or 0.95), residual)


def fit_haze(clean: torch.Tensor, degraded: torch.Tensor) -> HazeFit:
    c = clean.permute(0, 2, 3, 1).reshape(-1, clean.shape[1]).double()
    d = degraded.permute(0, 2, 3, 1).reshape(-1, clean.shape[1]).double()
    change = d - c
    size = change.norm(dim=1)
    keep = size > max(1e-3, float(size.quantile(0.5)) * 0.5)
    if int(keep.sum()) < 10:
        keep = size > 0
    u = change[keep] / size[keep, None]
    w = size[keep] ** 2
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    proj = eye[None] - u[:, :, None] * u[:, None, :]  # (N, C, C): orthogonal to each change direction
    lhs = (w[:, None, None] * proj).sum(0)
    rhs = (w[:, None, None] * proj @ c[keep, :, None]).sum(0)[:, 0]
    airlight = torch.linalg.lstsq(lhs + 1e-9 * eye, rhs[:, None]).solution[:, 0].clamp(1e-3, 1.5)
    # true transmission of every pixel, then the omega that makes the dark channel predict it
    along = ((airlight - c) * (d - c)).sum(1) / (airlight - c).square().sum(1).clamp(min=1e-6)
    haze = along.clamp(0, 1).reshape(clean.shape[0], 1, *clean.shape[-2:])  # 1 - t
    dark = dark_channel(degraded.double() / airlight[None, :, None, None])
    omega = float((haze * dark).sum() / dark.square().sum().clamp(min=1e-12))
    omega = min(max(omega, 0.0), 1.0)
    off_line = (proj @ (airlight - c[keep])[:, :, None])[:, :, 0].norm(dim=1)
    residual = float((w * off_line.square()).sum().sqrt() / (w * (airlight - c[keep]).square().sum(1))
                     .sum().sqrt().clamp(min=1e-12))
    return HazeFit(airlight.to(torch.float32), omega, residual)
