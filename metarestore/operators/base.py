"""The one interface every degradation operator has, and the one table of them (deepinv's physics shape:
an operator is an object that knows its forward model, its inverse and its own parameters).

An operator is fitted from (clean, degraded) support pairs, ``apply``-s its forward model to clean images
(where it has one), ``restore``-s degraded images (the pre-step of the adaptation paths it serves), reports
how well the pairs obey it (``residual``) and serialises its own tensors and settings. The paths it serves
are named by its ``pre_steps``; nothing outside its own module knows them. Registering a new operator is
one decorator on its class plus one import line in ``operators/catalog.py``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from metarestore.registry import Registry

OPERATORS: Registry[type[Operator]] = Registry("operator")  # name -> class, filled by ``register_operator``
register_operator = OPERATORS.register


class Operator:
    """A degradation model fitted on support pairs (subclasses are dataclasses with a ``residual``)."""

    name: ClassVar[str]  # set by ``@register_operator("name")``
    pre_steps: ClassVar[tuple[str, ...]] = ()  # the path pre-steps that undo it (``deconv``, ``tone``, ...)
    classical: ClassVar[tuple[str, ...]] = ()  # pre-steps that are a whole restoration: no restorer after
    refines: ClassVar[dict[str, str]] = {}  # pre-step -> the pre-step it refines (scored only where that helps)
    channels: ClassVar[int | None] = None  # the only channel count it models (None: any)
    residual: float  # relative misfit of the model on the pairs it was fitted on

    @classmethod
    def fit(cls, clean: torch.Tensor, degraded: torch.Tensor) -> Operator:
        """The operator that best maps the (K, C, H, W) ``clean`` images onto the ``degraded`` ones."""
        raise NotImplementedError

    @property
    def good(self) -> bool:
        """Whether the pairs obey this model well enough to build on it (synthesise pairs, ...)."""
        return True

    @property
    def cannot_help(self) -> bool:
        """Whether this fit shows in closed form that its pre-steps can only harm (nothing to undo)."""
        return False

    def apply(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The forward model: what the degradation makes of (B, C, H, W) ``clean`` images."""
        raise NotImplementedError(f"the {self.name} model is fitted in the restoring direction only")

    def predict(self, clean: torch.Tensor) -> torch.Tensor:
        """The degraded image the model expects for ``clean`` without its randomness, around which the
        adapter reports the noise (the clean image itself for a model fitted in the restoring direction)."""
        return clean

    def restore(self, x: torch.Tensor, path=None, learner=None) -> torch.Tensor:
        """Undo the degradation on (B, C, H, W) ``x`` as pre-step ``path.pre`` does (``learner``: the
        restorer, for pre-steps that use it)."""
        raise NotImplementedError

    def prepare(self, learner) -> None:
        """Do now what restoring would otherwise do on first use (train a network), so it can be stored."""

    # storage: tensor names unique to the operator (``kernel``, ``tone.curves``, ...), the header JSON-able
    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def header(self) -> dict:
        return {}

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], header: dict, residual: float, learner) -> Operator | None:
        """The operator back from an adapter's ``tensors`` and its own ``header`` (None when the adapter
        holds none); ``ValueError`` when they are not a valid one."""
        raise NotImplementedError


def stored(x: torch.Tensor) -> torch.Tensor:
    """Float tensors to float32, contiguous, on the CPU: how an operator's tensors are stored."""
    return x.detach().float().cpu().contiguous()
