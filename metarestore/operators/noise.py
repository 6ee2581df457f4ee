"""Poisson-Gaussian noise, fitted once: ``variance = gain * signal + floor`` by a weighted line fit over
bins of the signal (camera noise has gain > 0), in two uses.

- ``fit_noise``: the noise around an operator's prediction of the degraded image (the adapter's report):
  its level robustly (the median absolute deviation of the residual's fine-scale part, insensitive to
  the operator's own misfit at edges) and whether it depends on the signal.
- ``fit_pair_noise``: the ``noise`` operator, from pairs whose clean side is the signal (pixels clipped
  at 0 or 1 left out); its path ``noise`` restores with the network retrained on pairs it synthesises
  (``synthetic.SyntheticOperator``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from metarestore.operators.base import register_operator
from metarestore.operators.synthetic import SyntheticOperator

MAD_TO_STD = 1.4826
WHITE = 0.2  # |correlation of horizontal neighbours| of a residual below this: it is noise
MIN_BIN = 50  # pixels a signal bin needs for its variance to count
Variance = Callable[[torch.Tensor], float]


def variance_line(signal: torch.Tensor, residual: torch.Tensor, bins: int, variance: Variance,
                  least: int = 2) -> tuple[float, float, tuple[torch.Tensor, ...]] | None:
    """``variance = gain * signal + floor`` fitted (least squares, weighted by the pixels) to the
    ``variance(residual)`` of quantile bins of ``signal``; (gain, floor, (bin signals, variances, weights)),
    or None when fewer than ``least`` bins hold ``MIN_BIN`` pixels."""
    flat = signal.reshape(-1)
    if flat.numel() < MIN_BIN:
        return None
    edges = torch.quantile(flat[:: max(1, flat.numel() // 200_000)], torch.linspace(0, 1, bins + 1, dtype=torch.float64))
    xs, vs, ws = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (signal >= lo) & (signal <= hi)
        n = int(inside.sum())
        if n >= MIN_BIN:
            xs.append(float(signal[inside].mean()))
            vs.append(variance(residual[inside]))
            ws.append(float(n))
    if len(xs) < least:
        return None
    x, v, w = (torch.tensor(t, dtype=torch.float64) for t in (xs, vs, ws))
    design = torch.stack([x, torch.ones_like(x)], dim=1) * w.sqrt()[:, None]
    gain, floor = torch.linalg.lstsq(design, (v * w.sqrt())[:, None]).solution[:, 0].tolist()
    return gain, floor, (x, v, w)


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
    line = variance_line(signal, residual, bins, lambda v: robust_std(v) ** 2, least=3)
    gain, floor = (line[0], line[1]) if line is not None else (0.0, sigma**2)
    # signal dependent when the signal term explains most of the variance at mid-grey
    dependent = gain > 0 and gain * 0.5 > max(floor, 0.0) and sigma > 1e-3
    return NoiseFit(sigma=sigma, gain=max(gain, 0.0) if dependent else 0.0,
                    floor=max(floor, 0.0) if dependent else sigma**2, signal_dependent=dependent)


@register_operator("noise")
@dataclass
class PairNoiseFit(SyntheticOperator):
    gain: float  # variance per unit signal
    floor: float  # variance at zero signal
    correlation: float  # of horizontal neighbours of the residual: ~0 for white noise
    residual: float  # relative RMS misfit of the variance line over the signal bins

    pre_steps = ("noise",)

    @classmethod
    def fit(cls, clean: torch.Tensor, degraded: torch.Tensor) -> PairNoiseFit:
        return fit_pair_noise(clean, degraded).keep(clean)

    @property
    def good(self) -> bool:
        return abs(self.correlation) < WHITE and self.gain + self.floor > 1e-6 and self.residual < 0.5

    def apply(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        std = (self.gain * clean.double().clamp(0, 1) + self.floor).clamp(min=0).sqrt()
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
        return (clean.double() + std * noise).clamp(0, 1).to(clean.dtype)

    def as_dict(self) -> dict:
        return {"gain": self.gain, "floor": self.floor, "correlation": self.correlation, "residual": self.residual}

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], header: dict, residual: float, learner) -> PairNoiseFit | None:
        if not header:
            return None
        try:
            fit = cls(**{k: float(header[k]) for k in ("gain", "floor", "correlation", "residual")})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad synthetic operator header: {exc}") from None
        return fit.read_network(tensors, learner)


def fit_pair_noise(clean: torch.Tensor, degraded: torch.Tensor, bins: int = 12) -> PairNoiseFit:
    """``variance = gain * clean + floor`` over bins of the clean value; pixels whose degraded value is
    clipped at 0 or 1 are left out (their spread is not the noise's)."""
    c, d = clean.double().reshape(-1), degraded.double().reshape(-1)
    r = (degraded.double() - clean.double())
    a, b = r[..., :, 1:].reshape(-1), r[..., :, :-1].reshape(-1)
    correlation = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()).clamp(min=1e-12))
    keep = (d > 0) & (d < 1)
    c, res = c[keep], (d - c)[keep]
    line = variance_line(c, res, bins, lambda v: float(v.var())) if c.numel() >= 100 else None
    if line is None:
        var = float(res.var()) if res.numel() > 1 else 0.0
        return PairNoiseFit(0.0, var, correlation, 1.0)
    gain, floor, (x, v, w) = line
    gain, floor = max(gain, 0.0), max(floor, 0.0)
    misfit = float(((gain * x + floor - v).square() * w).sum() / (v.square() * w).sum().clamp(min=1e-24))
    return PairNoiseFit(gain, floor, correlation, misfit**0.5)
