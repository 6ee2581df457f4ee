"""From an estimate to what blind restoration does: the families to undo, in order, or nothing.

Doing no harm comes first. A clean verdict, an unsure one (nothing at or above the threshold) or a family
the model cannot be told (it would guess, and a guess is what shifted the tones of clean photos) all mean
"leave the image as it is". Families that explain the same thing (``labels.ALTERNATIVES``: two kinds of
noise, kinds of softness, tone curves) are one finding: only the likeliest is undone, never several on top
of each other.
"""

from __future__ import annotations

from collections.abc import Iterable

from metarestore.estimator.estimate import Estimate


def plan(estimate: Estimate, told: Iterable[str]) -> list[str]:
    """The families to undo, in the estimate's undo order (the last applied first); ``[]``: leave the image
    as it is. ``told``: the families the model can be told."""
    present = estimate.present  # one per group of alternatives already (``Estimate.present``)
    told = set(told)
    if any(family not in told for family in present):
        return []
    return present
