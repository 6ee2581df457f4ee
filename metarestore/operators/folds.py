"""Validation folds: how an adapter's candidates are scored on pairs they were not fitted on.

With K >= 2 pairs, leave-one-out (at most ``max_folds`` folds); with K = 1, the single pair is cut into
two halves along its longer side and each half is scored with what was fitted on the other; when the
halves would be too small (< ``MIN_HALF`` px), nothing can be validated (no folds: the adapter stays
zero-shot, the base model is never made worse unseen)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from metarestore.pixels import window

MIN_HALF = 32
# where each fold's held-out window lies, as fractions of the free range (top, left): corners first, so that
# a degradation that varies over the frame (vignetting, lens falloff) is seen by the scores, not only the
# centre, where it is weakest
WINDOW_PLACES = ((0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5))
FoldCallback = Callable[[list[int], int], None]  # (indices fitted on, index held out)


class Fold(NamedTuple):
    fit_x: torch.Tensor  # degraded pairs to fit on (K-1, C, H, W)
    fit_y: torch.Tensor  # their clean side
    held_x: torch.Tensor  # the held-out degraded pair (1, C, H, W)
    held_y: torch.Tensor
    fit: list[int]  # indices of the pairs fitted on (for K = 1: of the halves)
    held: int  # index of the pair held out


def split_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, C, H, W) image cut in two along its longer side (two same-size halves)."""
    h, w = x.shape[-2:]
    if w >= h:
        half = w // 2
        return x[..., :half], x[..., half:2 * half]
    half = h // 2
    return x[..., :half, :], x[..., half:2 * half, :]


def make_folds(support_x: torch.Tensor, support_y: torch.Tensor, max_folds: int,
               score_side: int | None = None) -> tuple[list[Fold], str]:
    """The validation folds and the scheme's name. With ``score_side``, each held-out pair is one
    ``score_side`` x ``score_side`` window (the same pixels for every candidate), fold n's at
    ``WINDOW_PLACES[n]``."""
    k = support_x.shape[0]
    if k >= 2:
        folds = []
        for i in range(min(k, max_folds)):
            fit = [j for j in range(k) if j != i]
            folds.append(Fold(support_x[fit], support_y[fit], support_x[i:i + 1], support_y[i:i + 1], fit, i))
        scheme = "leave-one-out"
    elif min(split_halves(support_x)[0].shape[-2:]) < MIN_HALF:
        return [], "none (one pair too small to split: zero-shot)"
    else:
        xs, ys = split_halves(support_x), split_halves(support_y)
        folds, scheme = [Fold(xs[0], ys[0], xs[1], ys[1], [0], 1), Fold(xs[1], ys[1], xs[0], ys[0], [1], 0)], "split-halves"
    if score_side is not None:
        places = [WINDOW_PLACES[n % len(WINDOW_PLACES)] for n in range(len(folds))]
        folds = [f._replace(held_x=window(f.held_x, score_side, score_side, place),
                            held_y=window(f.held_y, score_side, score_side, place))
                 for f, place in zip(folds, places, strict=True)]
    for fold in folds:
        if fold.held in fold.fit:  # a guard as well as documentation
            raise AssertionError("a validation fold scores a pair it fitted on")
    return folds, scheme


def each_fold(folds: list[Fold], on_fold: FoldCallback | None) -> Iterator[tuple[int, Fold]]:
    """(number, fold) for every fold, announcing each to ``on_fold`` first: every stage of the selection
    that fits or scores goes through here, so a caller (or a test) sees every fold it runs."""
    for n, fold in enumerate(folds):
        if on_fold is not None:
            on_fold(list(fold.fit), fold.held)
        yield n, fold
