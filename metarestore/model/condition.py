"""Degradation-aware conditioning (``model.condition: degradation``), in the manner of AirNet and PromptIR.

A blind restorer sees a mildly soft image and cannot tell whether it was blurred, downsampled or
compressed, so it learns a compromise near the identity for all three. Here a small encoder reads the
input image (a few strided convolutions, averaged over space: any H x W) into an embedding, and a linear
map per NAFBlock turns that embedding into a channel-wise scale and shift applied to the block's output:
``y * (1 + scale) + shift``. Those maps start at zero, so a conditioned network computes exactly what the
unconditioned one with the same weights does, and it loads an unconditioned checkpoint (its conditioning
parameters, all under ``condition.``, keep their initial values).
"""

from __future__ import annotations

import torch
from torch import nn

CONDITIONS = ("none", "degradation")
PREFIX = "condition."  # every conditioning parameter's name starts with this


class DegradationEncoder(nn.Module):
    """Image -> embedding: strided 3x3 convolutions (each halves the resolution), spatial mean, linear."""

    def __init__(self, channels: int = 3, hidden: tuple[int, ...] = (16, 32, 64), dim: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for h in hidden:
            layers += [nn.Conv2d(c, h, 3, stride=2, padding=1), nn.GELU()]
            c = h
        self.features = nn.Sequential(*layers)
        self.project = nn.Linear(c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x).mean((-2, -1)))


class DegradationCondition(nn.Module):
    """The encoder plus one zero-initialised linear map per block (``block_channels``, in forward order)."""

    def __init__(self, block_channels: list[int], channels: int = 3, dim: int = 32):
        super().__init__()
        self.encoder = DegradationEncoder(channels, dim=dim)
        self.modulations = nn.ModuleList(nn.Linear(dim, 2 * c) for c in block_channels)
        for m in self.modulations:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, dim) embeddings."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, in forward order: (scale, shift) of shape (N, c, 1, 1)."""
        e = self.embed(x)
        return [tuple(m(e)[..., None, None].chunk(2, dim=1)) for m in self.modulations]
