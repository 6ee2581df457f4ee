"""Held-out scores of candidate paths on validation folds (the one PSNR, ``metarestore.metrics.psnr``).

Paths without gradient steps are scored fold by fold, the network restoring every path's pre-stepped
image in one batched forward pass, each image told its own family (a told candidate costs a pass of its
own only where it runs several: ``told:F*3`` is one pass more than ``told:F*2``, kept per fold); an adapted
path is scored on all folds at once, its folds' fit pairs stacked on ``adapt()``'s task dimension."""

from __future__ import annotations

from collections.abc import Callable

import torch

from metarestore.meta.adapt import FIT_OPTIMIZER
from metarestore.metrics import psnr
from metarestore.operators.folds import Fold
from metarestore.operators.paths import Operators, Path, pre_step

FAILURES = (ValueError, RuntimeError, torch.linalg.LinAlgError)  # a path that cannot run scores -inf

__all__ = ["FAILURES", "pre_key", "psnr", "score_adapted", "score_plain", "told_passes"]


def pre_key(path: Path) -> tuple[str, float]:
    """What a pre-step's result depends on besides the fold (its operators) and the image."""
    return path.pre, path.balance


def told_passes(learner, x: torch.Tensor, path: Path) -> torch.Tensor:
    """The model as is (told ``path.told``, or blind) applied ``path.passes`` times."""
    for _ in range(path.passes):
        x = learner.restore(x, family=path.told)
    return x


def score_plain(learner, paths: list[Path], ops: Operators, held_x: torch.Tensor, held_y: torch.Tensor,
                cache: dict | None = None) -> dict[str, float]:
    """Held-out PSNR of paths without gradient steps on one fold, their operators ``ops`` fitted on the
    other pairs. ``cache`` (per fold) keeps the pre-stepped held-out images for the adapted paths on the
    same pre-steps, and the network's outputs for the repeated told paths of a later stage."""
    cache = {} if cache is None else cache
    pres: dict[str, torch.Tensor] = {}
    scores: dict[str, float] = {}
    for path in paths:
        try:
            pres[path.name] = pre_step(path, ops, held_x, learner)
        except FAILURES:
            scores[path.name] = float("-inf")
            continue
        cache[pre_key(path)] = pres[path.name]
    net = [p for p in paths if p.name in pres and p.restorer == "net"]
    outs = _restored(learner, net, pres, cache)
    scores.update({name: psnr(out, held_y) for name, out in outs.items()})
    scores.update({p.name: psnr(pres[p.name], held_y) for p in paths if p.name in pres and p.restorer == "none"})
    return scores


def _restored(learner, paths: list[Path], pres: dict[str, torch.Tensor], cache: dict) -> dict[str, torch.Tensor]:
    """The outputs of the network paths: every first pass not in ``cache`` in one batched forward (each
    image told its path's family), then the further passes of ``told:F*N``, each from the output one pass
    shorter (``cache`` keeps them: ``told:F*2`` builds on stage 1's ``told:F``)."""
    def key(path: Path, passes: int) -> tuple:
        return ("restored", *pre_key(path), path.told, passes)

    first = [p for p in paths if key(p, 1) not in cache]
    if first:
        # each image told its own family (None: blind): nine told candidates cost one pass, not nine
        out = learner.restore(torch.cat([pres[p.name] for p in first]), family=[p.told for p in first])
        cache.update({key(p, 1): out[i:i + 1] for i, p in enumerate(first)})
    for path in paths:
        for n in range(2, path.passes + 1):
            if key(path, n) not in cache:
                cache[key(path, n)] = learner.restore(cache[key(path, n - 1)], family=path.told)
    return {p.name: cache[key(p, p.passes)] for p in paths}


def score_adapted(learner, path: Path, folds: list[Fold], fitted: list[Operators], steps: int,
                  patch: int | None, held_pres: list[dict] | None = None, optimizer: str = FIT_OPTIMIZER,
                  on_step: Callable[[int], None] | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Held-out PSNR of an adapted path in every fold, all folds adapted at once: fold t's state is fitted
    on fold t's pre-stepped pairs only (its own operators and windows), then every fold's held-out pair is
    restored with its own state in one batched forward. Returns the scores and the folds' states (a leading
    fold dimension), which a fit of as many steps may keep instead of fitting again. ``on_step``:
    ``MetaLearner.adapt``'s (a budget's check after every step)."""
    fit_x = torch.stack([pre_step(path, fitted[n], f.fit_x, learner) for n, f in enumerate(folds)])
    fit_y = torch.stack([f.fit_y for f in folds])
    params = learner.adapt(fit_x, fit_y, steps=steps, kind=path.restorer, patch=patch, family=path.told,
                           optimizer=optimizer, on_step=on_step)
    params = {n: p.detach() for n, p in params.items()}
    held_pres = held_pres or [{} for _ in folds]
    held = torch.stack([held_pres[n][pre_key(path)] if pre_key(path) in held_pres[n]
                        else pre_step(path, fitted[n], f.held_x, learner) for n, f in enumerate(folds)])
    out = learner.restore(held, params, kind=path.restorer, family=path.told)
    return [psnr(out[n:n + 1], f.held_y) for n, f in enumerate(folds)], params
