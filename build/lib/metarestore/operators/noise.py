"""Noise identification from the residual of a fitted operator: its level (robust: the median absolute
deviation of the residual's fine-scale part, insensitive to the operator's own misfit at edges) and
whether it depends on the signal, by a weighted line fit of ``variance = gain * signal + floor`` over
signal bins (Poisson-Gaussian camera noise has gain > 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAD_TO_STD = 1.4826


@dataclass
class NoiseFit:
    sigma: float  # overall standard deviation
    gain: float  # variance per unit signal (0 for signal-independent noise)
    floor: float  # variance at zero signal
    signal_dependent: bool

    def sigma_at(self, signal: float) -> float:
        return max(self.gain * signal + self.floor, 0.0) ** 0.5

    def as_dict(self) -> dict:
        return {"sigma": self.sigma, "gain": self.gain, "floor": self.floor,
                "signal_dependent": self.signal_dependent}


def _fine(r: torch.Tensor) -> torch.Tensor:
    """Differences of horizontal neighbours over sqrt 2: white noise keeps its std, smooth misfit goes."""
    return (r[..., :, 1:] - r[..., :, :-1]) / 2 ** 0.5


def robust_std(values: torch.Tensor) -> float:
    v = values.reshape(-1).double()
    return float(MAD_TO_STD * (v - v.median()).abs().median()) if v.numel() else 0.0


def fit_noise(predicted: torch.Tensor, degraded: torch.Tensor, bins: int = 8) -> NoiseFit:
    """Noise of ``degraded`` around the operator's ``predicted`` image (both (K, C, H, W))."""
    residual = _fine((degraded - predicted).double())
    signal = ((predicted[..., :, 1:] + predicted[..., :, :-1]) / 2).double()
    sigma = robust_std(residual)
    edges = torch.quantile(signal.reshape(-1)[:: max(1, signal.numel() // 200_000)],
                           torch.linspace(0, 1, bins + 1, dtype=torch.float64))
    xs, vs, ws = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (signal >= lo) & (signal <= hi)
        n = int(inside.sum())
        if n < 50:
            continue
        xs.append(float(signal[inside].mean()))
        vs.append(robust_std(residual[inside]) ** 2)
        ws.append(n)
    gain, floor = 0.0, sigma**2
    if len(xs) >= 3:
        x, v, w = (torch.tensor(a, dtype=torch.float64) for a in (xs, vs, ws))
        design = torch.stack([x, torch.ones_like(x)], dim=1) * w.sqrt()[:, None]
        coef = torch.linalg.lstsq(design, (v * w.sqrt())[:, None]).solution[:, 0]
        gain, floor = float(coef[0]), float(coef[1])
    # signal dependent when the signal term explains most of the variance at mid-grey
    dependent = gain > 0 and gain * 0.5 > max(floor, 0.0) and sigma > 1e-3
    return NoiseFit(sigma=sigma, gain=max(gain, 0.0) if dependent else 0.0,
                    floor=max(floor, 0.0) if dependent else sigma**2, signal_dependent=dependent)
