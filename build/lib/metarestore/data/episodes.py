"""Episodes for meta-learning: one task (family, severity, seed) -> K support and Q query pairs.

Everything an episode contains follows from its ``TaskSpec``, so any worker can build any task and a
sharded step sees exactly the data a single process would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metarestore import degradations
from metarestore.data.images import ImageSet
from metarestore.degradations.base import cpu_generator


@dataclass(frozen=True)
class TaskSpec:
    family: str
    severity: float
    seed: int


@dataclass
class Episode:
    task: TaskSpec
    params: dict[str, Any]
    support_x: torch.Tensor  # degraded
    support_y: torch.Tensor  # clean
    query_x: torch.Tensor
    query_y: torch.Tensor


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of a square patch (k in 0..7)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


class PatchSampler:
    """Random square patches with flips and rotations from an in-memory ImageSet."""

    def __init__(self, images: ImageSet, patch_size: int, augment: bool = True):
        self.images = images.at_least(patch_size)
        self.patch_size = patch_size
        self.augment = augment

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        p = self.patch_size
        out = torch.empty(n, 3, p, p, dtype=torch.uint8)
        picks = torch.randint(0, len(self.images), (n,), generator=generator).tolist()
        for i, idx in enumerate(picks):
            im = self.images.images[idx]
            h, w = im.shape[-2:]
            top = int(torch.randint(0, h - p + 1, (), generator=generator))
            left = int(torch.randint(0, w - p + 1, (), generator=generator))
            patch = im[:, top:top + p, left:left + p]
            if self.augment:
                patch = dihedral(patch, int(torch.randint(0, 8, (), generator=generator)))
            out[i] = patch
        return out.float().div_(255.0)


@dataclass
class EpisodeBatch:
    """The episodes of a meta-step stacked on a leading task dimension: (T, K or Q, C, H, W)."""

    tasks: list[TaskSpec]
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    @classmethod
    def stack(cls, episodes: list[Episode]) -> EpisodeBatch:
        fields = ("support_x", "support_y", "query_x", "query_y")
        return cls([e.task for e in episodes], *(torch.stack([getattr(e, f) for e in episodes]) for f in fields))

    def __len__(self) -> int:
        return len(self.tasks)


class EpisodeSampler:
    """Builds an Episode from a TaskSpec: clean patches, the task's parameters, degraded copies."""

    def __init__(self, images: ImageSet, patch_size: int, support: int, query: int, augment: bool = True):
        self.patches = PatchSampler(images, patch_size, augment)
        self.support, self.query = support, query

    def episode(self, task: TaskSpec, device: torch.device | str = "cpu") -> Episode:
        generator = cpu_generator(task.seed)
        family = degradations.get(task.family)
        clean = self.patches.sample(self.support + self.query, generator)
        params = family.sample(task.severity, generator)
        clean = clean.to(device)
        degraded = family(clean, params)
        k = self.support
        return Episode(task, params, degraded[:k], clean[:k], degraded[k:], clean[k:])

    def batch(self, tasks: list[TaskSpec], device: torch.device | str = "cpu") -> EpisodeBatch:
        return EpisodeBatch.stack([self.episode(task, device) for task in tasks])
