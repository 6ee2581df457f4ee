"""An exponential moving average of a network's weights (``train.ema_decay``, BasicSR's ``ema_decay``).

Why: at a training rate high enough to learn fast, consecutive checkpoints differ in global tone (low light,
contrast) by dB; their average restores better than any one of them (docs/benchmarks.md, "Averaged
weights"). The average is what a run validates, checkpoints as its model and ships; the live weights go on
training and travel in the checkpoint's training state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightEMA:
    """``average = d * average + (1 - d) * weights`` after every optimizer step.

    ``d`` warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates ``n`` (TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``), so a short run or one that starts averaging mid-way
    is not anchored to its starting weights. Non-float state (counters) is copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float, updates: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = updates
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def rate(self) -> float:
        """The decay of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.rate()
        self.updates += 1
        for name, value in model.state_dict().items():
            average = self.average[name]
            if average.is_floating_point():
                average.lerp_(value.detach(), 1.0 - d)
            else:
                average.copy_(value)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model computes with the average inside the block and gets its own weights back after it."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.average)
        try:
            yield
        finally:
            model.load_state_dict(live)
