"""Few-shot restoration, the one protocol behind validation, the showcase, evaluation and the server's
adapters: a task (one family's drawn parameters), support pairs and query images degraded by it, ``adapt()``
on the support, restoration of the query, scores.

The noise rule: the query is degraded by the task as drawn; the support pairs by the same parameters with
fresh noise (operator seeds shifted by ``SUPPORT_NOISE``). Adaptation must learn the degradation, not memorise
one noise realisation, and the query stays what every other method (baselines, zero-shot) sees.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from metarestore import degradations
from metarestore.degradations.base import Params, cpu_generator, reseed, stable_seed
from metarestore.meta import MetaLearner, psnr

SUPPORT_NOISE = 1  # the operator-seed offset of the support pairs

Restore = Callable[[MetaLearner, torch.Tensor, Params | None], torch.Tensor]
Score = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class Task:
    """A degradation task: a family and its concrete parameters."""

    family: str
    params: Params

    @classmethod
    def sample(cls, family: str, severity: float, *seed_parts: object) -> Task:
        """Draw the parameters at ``severity`` from a seed made of ``seed_parts`` (``stable_seed``)."""
        return cls(family, degradations.get(family).sample(severity, cpu_generator(stable_seed(*seed_parts))))

    def degrade(self, clean: torch.Tensor) -> torch.Tensor:
        """The query side: the task as drawn."""
        return degradations.get(self.family)(clean, self.params)

    def degrade_support(self, clean: torch.Tensor) -> torch.Tensor:
        """The support side: the same parameters, fresh noise."""
        return degradations.get(self.family)(clean, reseed(self.params, SUPPORT_NOISE))


@dataclass
class FewShot:
    """What one few-shot run produced: outputs, the adapted parameters, and scores against ``query_y``
    (``input``, ``zero_shot``, ``adapted``; only those that were computed, none without ``query_y``)."""

    zero_shot: torch.Tensor | None = None
    adapted: torch.Tensor | None = None
    params: Params | None = None
    scores: dict[str, float] = field(default_factory=dict)


def _restore(learner: MetaLearner, x: torch.Tensor, params: Params | None, family: str | None = None) -> torch.Tensor:
    return learner.restore(x, params, family=family)


def few_shot(learner: MetaLearner, query_x: torch.Tensor, support: tuple[torch.Tensor, torch.Tensor] | None = None,
             *, steps: int | None = None, query_y: torch.Tensor | None = None, zero_shot: bool = True,
             restore: Restore = _restore, score: Score = psnr, family: str | None = None) -> FewShot:
    """Restore ``query_x`` zero-shot (unless ``zero_shot=False``) and, given ``support`` (degraded, clean)
    pairs, after ``learner.adapt(*support, steps=steps)`` (``steps=None``: the learner's own). ``restore``
    turns (learner, batch, params) into an output (e.g. tiled, ``inference.restore_image``); ``family``
    names the degradation to a model that can be told it (``restore`` then takes it as a keyword)."""
    if family is not None:
        restore = functools.partial(restore, family=family)
    result = FewShot()
    if zero_shot:
        result.zero_shot = restore(learner, query_x, None)
    if support is not None:
        result.params = learner.adapt(support[0], support[1], steps=steps, family=family)
        result.adapted = restore(learner, query_x, result.params)
    if query_y is not None:
        outputs = {"input": query_x, "zero_shot": result.zero_shot, "adapted": result.adapted}
        result.scores = {key: score(out, query_y) for key, out in outputs.items() if out is not None}
    return result
