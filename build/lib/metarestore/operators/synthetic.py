"""Operator-synthesised training: a fitted operator that can be *re-applied* (a JPEG codec setting, a
signal-dependent noise model) turns K clean support images into as many training pairs as needed. Each
step degrades a fresh window of the clean pairs (random offset, so that JPEG's 8x8 grid falls
differently; random flip and quarter turn; fresh noise), and the restorer's weights (adapter kind
``all``) take an Adam step on them. Five pairs then teach what five fixed pairs cannot: at JPEG quality 8
the base model gains about 1 dB on unseen images where plain gradient steps on the pairs gain nothing.

Also here: the signal-dependent noise model fitted from pairs (``fit_pair_noise``), with the clean image
known (``noise.fit_noise`` works from an operator's prediction instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from metarestore.meta.adapt import forward_with
from metarestore.model.kinds import get_kind

KIND = "all"
STEPS = 30
LR = 1e-3
WINDOW = 64  # at most this many px per side per step: a fit's cost does not grow with the images
WHITE = 0.2  # |correlation of horizontal neighbours| of a residual below this: it is noise


@dataclass
class PairNoiseFit:
    gain: float  # variance per unit signal
    floor: float  # variance at zero signal
    correlation: float  # of horizontal neighbours of the residual: ~0 for white noise
    residual: float  # relative RMS misfit of the variance line over the signal bins

    @property
    def good(self) -> bool:
        return abs(self.correlation) < WHITE and self.gain + self.floor > 1e-6 and self.residual < 0.5

    def apply(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        std = (self.gain * clean.double().clamp(0, 1) + self.floor).clamp(min=0).sqrt()
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
        return (clean.double() + std * noise).clamp(0, 1).to(clean.dtype)

    def as_dict(self) -> dict:
        return {"gain": self.gain, "floor": self.floor, "correlation": self.correlation, "residual": self.residual}


def fit_pair_noise(clean: torch.Tensor, degraded: torch.Tensor, bins: int = 12) -> PairNoiseFit:
    """``variance = gain * clean + floor`` by a weighted line fit over bins of the clean value; pixels whose
    degraded value is clipped at 0 or 1 are left out (their spread is not the noise's)."""
    c, d = clean.double().reshape(-1), degraded.double().reshape(-1)
    r = (degraded.double() - clean.double())
    a, b = r[..., :, 1:].reshape(-1), r[..., :, :-1].reshape(-1)
    correlation = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()).clamp(min=1e-12))
    keep = (d > 0) & (d < 1)
    c, res = c[keep], (d - c)[keep]
    xs, vs, ws = [], [], []
    if c.numel() >= 100:
        edges = torch.quantile(c[:: max(1, c.numel() // 200_000)], torch.linspace(0, 1, bins + 1, dtype=torch.float64))
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            inside = (c >= lo) & (c <= hi)
            if int(inside.sum()) >= 50:
                xs.append(float(c[inside].mean()))
                vs.append(float(res[inside].var()))
                ws.append(float(inside.sum()))
    if len(xs) < 2:
        var = float(res.var()) if res.numel() > 1 else 0.0
        return PairNoiseFit(0.0, var, correlation, 1.0)
    x, v, w = (torch.tensor(t, dtype=torch.float64) for t in (xs, vs, ws))
    design = torch.stack([x, torch.ones_like(x)], dim=1) * w.sqrt()[:, None]
    gain, floor = torch.linalg.lstsq(design, (v * w.sqrt())[:, None]).solution[:, 0].tolist()
    gain, floor = max(gain, 0.0), max(floor, 0.0)
    misfit = float(((gain * x + floor - v).square() * w).sum() / (v.square() * w).sum().clamp(min=1e-24))
    return PairNoiseFit(gain, floor, correlation, misfit**0.5)


Synthesise = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _window(clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random window (offset, flip, quarter turn) of every clean image, one per step."""
    h, w = clean.shape[-2:]
    size = min(WINDOW, h - 8 if h > 16 else h, w - 8 if w > 16 else w)
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    x = clean[..., top:top + size, left:left + size]
    if float(torch.rand(1, generator=generator)) < 0.5:
        x = x.flip(-1)
    return torch.rot90(x, int(torch.randint(0, 4, (1,), generator=generator)), (-2, -1)).contiguous()


def train_on_synthetic(learner, clean: torch.Tensor, synthesise: Synthesise, *, steps: int = STEPS,
                       lr: float = LR, seed: int = 0) -> dict[str, torch.Tensor]:
    """The ``all`` state of ``learner``'s network after ``steps`` Adam steps on pairs that ``synthesise``
    (clean window, generator) -> degraded window makes from the (K, C, H, W) ``clean`` images; the
    network itself is untouched (fresh leaves through ``forward_with``)."""
    model = learner.model
    kind = get_kind(KIND)
    params = kind.initial(model, detach=True)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = learner.device
    with torch.enable_grad():
        for _ in range(steps):
            y = _window(clean, generator)
            x = synthesise(y, generator)
            opt.zero_grad(set_to_none=True)
            loss = learner.loss_fn(forward_with(model, params, x.to(device), kind), y.to(device))
            loss.backward()
            opt.step()
    return {n: p.detach() for n, p in params.items()}
