"""Degradation-aware conditioning: ``model.condition: degradation`` (blind, read from the image, in the manner
of AirNet and PromptIR) or ``family`` (told: the caller names the degradation, or leaves it blind).

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

CONDITIONS = ("none", "degradation", "family")
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


class FamilyCondition(nn.Module):
    """A learned (scale, shift) of every block per named degradation family, plus a blind row (index 0).

    Measured on the base model's run: a blind network cannot tell a mild blur from downsampling or JPEG and
    settles near the identity for all three, while trained on blur alone it gains +1.4 dB in 100 steps
    (docs/benchmarks.md); a learned encoder did not learn to separate them. When the client knows the
    degradation (it usually does: "this is a JPEG"), naming it removes the ambiguity. Training names the
    task's family except for a fraction of tasks (``meta.blind_fraction``), which train the blind row that
    a request without a hint uses. The table starts at zero (a no-op) and its entries are multiplied by
    ``GAIN``: AdamW moves a parameter by about the rate a step whatever its gradient, and a table added late
    in a run's schedule would otherwise grow too slowly to matter.
    """

    GAIN = 5.0

    def __init__(self, block_channels: list[int], families: list[str] | tuple[str, ...]):
        super().__init__()
        if not families:
            raise ValueError("model.condition: family needs the families it can be told (model.hint_families)")
        self.families = tuple(families)
        self.splits = list(block_channels)
        self.table = nn.Parameter(torch.zeros(len(self.families) + 1, 2 * sum(self.splits)))

    def index(self, family: str | None) -> int:
        """A family's row; ``None`` is the blind row."""
        if family is None:
            return 0
        if family not in self.families:
            raise ValueError(f"this model is not told {family!r}: it knows {', '.join(self.families)}")
        return 1 + self.families.index(family)

    def hints(self, families: list[str | None]) -> torch.Tensor:
        return torch.tensor([self.index(f) for f in families], dtype=torch.long, device=self.table.device)

    def forward(self, x: torch.Tensor, hint: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, in forward order: (scale, shift) of shape (N, c, 1, 1); ``hint``: (N,) rows, or one."""
        n = x.shape[0]
        rows = self.table[torch.zeros(n, dtype=torch.long, device=x.device) if hint is None
                          else hint.expand(n)] * self.GAIN
        scale, shift = rows.chunk(2, dim=1)
        return [(s[..., None, None], t[..., None, None])
                for s, t in zip(scale.split(self.splits, 1), shift.split(self.splits, 1), strict=True)]
