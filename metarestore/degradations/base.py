"""A degradation family = a parameter sampler plus a deterministic operator (deepinv-style physics).

`sample(severity, generator)` turns a severity in [0, 1] into concrete parameters; `apply(x, params)`
is a pure function of the batch and those parameters. Any randomness an operator needs (a noise
realisation, an inpainting mask, a haze depth map) is drawn on the CPU from `params["seed"]`, so the same
parameters give the same output on CPU and CUDA.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

Params = dict[str, Any]


@dataclass(frozen=True)
class ParamSpec:
    """One documented parameter: its range over severity 0..1 (``low`` at 0, ``high`` at 1) and units."""

    low: float
    high: float
    description: str
    integer: bool = False

    def at(self, t: float) -> float:
        value = self.low + (self.high - self.low) * t
        return float(round(value)) if self.integer else float(value)

    def severity_of(self, value: float) -> float:
        """The severity in [0, 1] at which the parameter takes ``value`` (``at``'s inverse, clamped): what an
        estimate reads back from a measured parameter (a JPEG file's quality, a contrast factor)."""
        return min(1.0, max(0.0, (value - self.low) / (self.high - self.low)))

    def as_dict(self) -> dict[str, Any]:
        lo, hi = sorted((self.low, self.high))
        return {"min": lo, "max": hi, "at_severity_0": self.low, "at_severity_1": self.high,
                "description": self.description, "integer": self.integer}


def jittered(severity: float, generator: torch.Generator, spread: float = 0.1) -> float:
    """Severity plus a small uniform jitter, clamped to [0, 1], so tasks of one severity still vary."""
    u = torch.rand((), generator=generator).item()
    return min(1.0, max(0.0, float(severity) + spread * (2.0 * u - 1.0)))


def draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (), generator=generator).item())


def stable_seed(*parts: object) -> int:
    """A seed in [0, 2**31 - 1) from any printable parts, identical in every process and Python run
    (SHA-256, not Python's per-process salted ``hash``)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)


def cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


@dataclass
class Degradation:
    """Base class for a family. Subclasses set ``name``, ``description``, ``specs`` and implement
    ``sample`` and ``apply``."""

    name: str = ""
    description: str = ""
    specs: dict[str, ParamSpec] = field(default_factory=dict)
    # the output is an image, clamped to [0, 1] as a saved photo's values are; False for a family whose
    # values are a float measurement (``awgn``, the published denoising benchmarks' noise)
    clipped: bool = True

    def sample(self, severity: float, generator: torch.Generator) -> Params:
        """Default sampler: every spec at the jittered severity, plus a seed for the operator's noise."""
        t = jittered(severity, generator)
        params: Params = {key: spec.at(t) for key, spec in self.specs.items()}
        params["seed"] = draw_seed(generator)
        return params

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply the family, clamped to [0, 1] unless the family is not ``clipped``."""
        check_batch(x)
        y = self.apply(x, params)
        return (y.clamp(0.0, 1.0) if self.clipped else y).to(x.dtype)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "params": {key: spec.as_dict() for key, spec in self.specs.items()}}


def check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise ValueError(f"expected a float batch (B,C,H,W), got {tuple(x.shape)} {x.dtype}")


def reseed(params: Params, offset: int) -> Params:
    """The same parameters with every operator seed shifted: same degradation, fresh noise/mask."""
    if "chain" in params:
        return {**params, "chain": [reseed(p, offset) for p in params["chain"]]}
    if "seed" not in params:
        return dict(params)
    return {**params, "seed": (int(params["seed"]) + offset) % (2**31 - 1)}
