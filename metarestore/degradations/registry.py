"""One registry of degradation families, shared by training, evaluation and serving.

A name may be a chain ``"gaussian_blur+jpeg"``: the families applied left to right form one task.
"""

from __future__ import annotations

from typing import Any

import torch

from metarestore.degradations.base import Degradation, Params
from metarestore.errors import UserError
from metarestore.registry import Registry


class UnknownFamilyError(UserError, KeyError):
    """A family name that is not registered."""


REGISTRY: Registry[Degradation] = Registry("degradation family", error=UnknownFamilyError)


def register(family: Degradation) -> Degradation:
    return REGISTRY.add(family.name, family)


class Chain(Degradation):
    """Families applied in order; parameters are the list of each member's parameters."""

    def __init__(self, members: list[Degradation]):
        super().__init__(name="+".join(m.name for m in members),
                         description=" then ".join(m.name for m in members), clipped=members[-1].clipped)
        self.members = members

    def sample(self, severity: float, generator: torch.Generator) -> Params:
        return {"chain": [m.sample(severity, generator) for m in self.members]}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        for member, member_params in zip(self.members, params["chain"], strict=True):
            x = member(x, member_params)
        return x

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "members": [m.describe() for m in self.members]}


def names() -> list[str]:
    """Registered single families, in registration order."""
    return list(REGISTRY)


def get(name: str) -> Degradation:
    """A family by name, or a chain for ``a+b+...``; unknown names raise a one-line error."""
    members = [REGISTRY[part.strip()] for part in name.split("+")]  # unknown: UnknownFamilyError
    return members[0] if len(members) == 1 else Chain(members)


def image_families(family_names: list[str] | tuple[str, ...]) -> list[str]:
    """Those of ``family_names`` that an 8-bit image can show (a request's PNG, ``restore``'s input): the
    clipped ones. ``awgn`` leaves values outside [0, 1], which no image file holds: its noise in a saved
    image is ``gaussian_noise``."""
    return [name for name in family_names if get(name).clipped]


def not_an_image_family(name: str) -> str | None:
    """Why an image cannot be said to show family ``name`` (a one-line message), or None when it can."""
    if get(name).clipped:
        return None
    return (f"{name} describes values outside [0, 1], which an image file cannot hold; name what the saved image "
            "shows (its noise: gaussian_noise)")


def validate(family_names: list[str]) -> None:
    for name in family_names:
        get(name)
