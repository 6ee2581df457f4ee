"""Held-out scores of candidate paths on validation folds (the one PSNR, ``metarestore.metrics.psnr``).

Paths without gradient steps are scored fold by fold, the network restoring every path's pre-stepped
image in one batched forward pass; an adapted path is scored on all folds at once, its folds' fit pairs
stacked on ``adapt()``'s task dimension."""

from __future__ import annotations

import torch

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
    same pre-steps."""
    pres: dict[str, torch.Tensor] = {}
    scores: dict[str, float] = {}
    for path in paths:
        try:
            pres[path.name] = pre_step(path, ops, held_x, learner)
        except FAILURES:
            scores[path.name] = float("-inf")
            continue
        if cache is not None:
            cache[pre_key(path)] = pres[path.name]
    net = [p for p in paths if p.name in pres and p.restorer == "net" and p.told is None]
    if net:
        out = learner.restore(torch.cat([pres[p.name] for p in net]))
        scores.update({p.name: psnr(out[i:i + 1], held_y) for i, p in enumerate(net)})
    for p in paths:  # told the family: a pass of its own (one hint per forward pass)
        if p.told is not None:
            scores[p.name] = psnr(told_passes(learner, pres[p.name], p), held_y)
    scores.update({p.name: psnr(pres[p.name], held_y) for p in paths if p.name in pres and p.restorer == "none"})
    return scores


def score_adapted(learner, path: Path, folds: list[Fold], fitted: list[Operators], steps: int,
                  patch: int | None, held_pres: list[dict] | None = None) -> list[float]:
    """Held-out PSNR of an adapted path in every fold, all folds adapted at once: fold t's state is fitted
    on fold t's pre-stepped pairs only (its own operators and windows), then every fold's held-out pair is
    restored with its own state in one batched forward."""
    fit_x = torch.stack([pre_step(path, fitted[n], f.fit_x, learner) for n, f in enumerate(folds)])
    fit_y = torch.stack([f.fit_y for f in folds])
    params = learner.adapt(fit_x, fit_y, steps=steps, kind=path.restorer, patch=patch, family=path.told)
    params = {n: p.detach() for n, p in params.items()}
    held_pres = held_pres or [{} for _ in folds]
    held = torch.stack([held_pres[n][pre_key(path)] if pre_key(path) in held_pres[n]
                        else pre_step(path, fitted[n], f.held_x, learner) for n, f in enumerate(folds)])
    out = learner.restore(held, params, kind=path.restorer, family=path.told)
    return [psnr(out[n:n + 1], f.held_y) for n, f in enumerate(folds)]
