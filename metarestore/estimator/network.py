"""The estimator's network: an image crop -> for every label, is it present (a logit) and how strong
(a severity in [0, 1]).

Two kinds of cue, two kinds of feature. Noise, blur, blocking and missing pixels are local textures: the
image and its high-pass residual through a stack of 3x3 convolutions (batch-normalised), each stage halving
the resolution, pooled over space by mean and standard
deviation (the strength of a texture and how even it is). Low light, contrast, colour cast and haze are
global tones: per-channel mean, spread and 2nd/98th percentiles of the input itself, which the pooled
convolutions would have to relearn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarestore.metrics import decibels


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.GELU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.GELU())


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """The image less its 3x3 local mean, per channel: what noise, blocking, blur and missing pixels change.
    Those traces are a few 8-bit levels on an image whose content spans all 255; a network fed the image
    alone must first learn to separate them (the first filters of image-forensics networks are high-pass
    for the same reason)."""
    c = x.shape[1]
    kernel = torch.full((c, 1, 3, 3), -1 / 9, device=x.device, dtype=x.dtype)
    kernel[:, :, 1, 1] += 1
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)


def tone_statistics(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 12): per channel mean, standard deviation, 2nd and 98th percentile."""
    flat = x.flatten(2)
    q = torch.quantile(flat, torch.tensor([0.02, 0.98], device=x.device, dtype=x.dtype), dim=2)  # (2, N, 3)
    return torch.cat([flat.mean(2), flat.std(2), q[0], q[1]], dim=1)


def radial_spectrum(x: torch.Tensor, bins: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, bins): the log power of the grey image's spectrum in rings of equal width from
    the lowest frequency to Nyquist (the mean removed, a Hann window against the edges). Blur falls off
    smoothly; bicubic resampling drops at a cut-off of its own and JPEG leaves peaks at multiples of 1/8."""
    grey = x.mean(1)
    h, w = grey.shape[-2:]
    window = torch.hann_window(h, device=x.device, dtype=x.dtype)[:, None] * \
        torch.hann_window(w, device=x.device, dtype=x.dtype)[None, :]
    power = torch.fft.rfft2((grey - grey.mean((-2, -1), keepdim=True)) * window).abs().square()
    fy = torch.fft.fftfreq(h, device=x.device).abs()[:, None]
    fx = torch.fft.rfftfreq(w, device=x.device)[None, :]
    ring = (torch.sqrt(fy**2 + fx**2) / 0.5 * bins).long().clamp(max=bins - 1).flatten()
    total = torch.zeros(x.shape[0], bins, device=x.device, dtype=x.dtype).index_add_(1, ring, power.flatten(1))
    count = torch.bincount(ring, minlength=bins).clamp_min(1).to(x.dtype)
    return decibels(total / count + 1e-10) / 40  # a few units at most


HIGH_PASS_GAIN = 10.0  # a 5-level (sigma 0.02) noise becomes a signal of about 0.2 next to the image's [-1, 1]


class EstimatorNet(nn.Module):
    """Crop -> (logits (N, L), severities (N, L)); any crop of at least 16 px a side."""

    def __init__(self, labels: tuple[str, ...] | list[str], widths: tuple[int, ...] = (16, 32, 48, 64, 96),
                 spectral_bins: int = 0):
        super().__init__()
        self.labels = tuple(labels)
        self.spectral_bins = spectral_bins  # 0: no spectrum feature (the estimator that ships)
        # one convolution at full resolution (it sees every pixel: noise, blocks), then stages at half,
        # a quarter, ... of it (a full-resolution stage costs 10x the rest on a CPU)
        stages = [nn.Sequential(nn.Conv2d(6, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), nn.GELU())]
        c = widths[0]
        for w in widths[1:]:
            stages.append(_stage(c, w, 2))
            c = w
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Linear(2 * c + 12 + spectral_bins, 128), nn.GELU(),
                                  nn.Linear(128, 2 * len(self.labels)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(torch.cat([x * 2 - 1, HIGH_PASS_GAIN * high_pass(x)], dim=1)).flatten(2)
        parts = [f.mean(2), f.std(2), tone_statistics(x)]
        if self.spectral_bins:
            parts.append(radial_spectrum(x, self.spectral_bins))
        pooled = torch.cat(parts, dim=1)
        logits, severity = self.head(pooled).chunk(2, dim=1)
        return logits, torch.sigmoid(severity)
