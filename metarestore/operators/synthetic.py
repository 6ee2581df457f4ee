"""Operator-synthesised training: a fitted operator that can be *re-applied* (a JPEG codec setting, a
signal-dependent noise model) turns K clean support images into as many training pairs as needed. Each
step degrades a fresh window of the clean pairs (random offset, so that JPEG's 8x8 grid falls
differently; random flip and quarter turn; fresh noise), and the restorer's weights (adapter kind
``all``) take an Adam step on them. Five pairs then teach what five fixed pairs cannot: at JPEG quality 8
the base model gains about 1 dB on unseen images where plain gradient steps on the pairs gain nothing.

``SyntheticOperator`` is the base of such operators (``codec.JpegFit``, ``noise.PairNoiseFit``): its one
pre-step restores with the retrained network, which it trains on first use and stores as its tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metarestore.meta.adapt import forward_with
from metarestore.model.kinds import get_kind
from metarestore.operators.base import Operator, stored

KIND = "all"
STEPS = 30
LR = 1e-3
WINDOW = 64  # at most this many px per side per step: a fit's cost does not grow with the images


class SyntheticOperator(Operator):
    """An operator whose pre-step is the restorer retrained on pairs it synthesises from the clean support
    (kept from ``fit``); subclasses fit themselves, ``apply`` (clean, generator) -> degraded, and name their
    pre-step in ``pre_steps``: it is ``classical`` too (the retrained network is the whole restoration)."""

    clean: torch.Tensor | None = None  # the clean support, kept until the network is trained
    trained: dict[str, torch.Tensor] | None = None  # the retrained network (adapter kind ``all``)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.classical = cls.pre_steps

    def keep(self, clean: torch.Tensor) -> SyntheticOperator:
        self.clean = clean
        return self

    def retrained(self, learner) -> dict[str, torch.Tensor]:
        """The network state, trained on first use; ``ValueError`` when the pairs do not fit this operator
        (its fit is not ``good``): training would only learn a wrong degradation."""
        if self.trained is None:
            if not self.good:
                raise ValueError(f"the support pairs do not fit the {self.name} model")
            if self.clean is None:
                raise ValueError(f"the {self.name} path needs the clean support pairs")
            self.trained = train_on_synthetic(learner, self.clean, self.apply)
        return self.trained

    def prepare(self, learner) -> None:
        self.retrained(learner)

    def restore(self, x: torch.Tensor, path=None, learner=None) -> torch.Tensor:
        return learner.restore(x, self.retrained(learner), kind=KIND)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"synthetic.{self.name}.{n}": stored(v) for n, v in (self.trained or {}).items()}

    def header(self) -> dict:
        return self.as_dict()

    def as_dict(self) -> dict:
        raise NotImplementedError

    def read_network(self, tensors: dict[str, torch.Tensor], learner) -> SyntheticOperator:
        """Its stored network (if any) back from ``tensors``, checked against ``learner``'s model."""
        prefix = f"synthetic.{self.name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state:
            get_kind(KIND).check(learner.model, state)
            own = next(learner.model.parameters())
            self.trained = {n: v.to(own.device, own.dtype) for n, v in state.items()}
        return self


Synthesise = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _window(clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random window (offset, flip, quarter turn) of every clean image, one per step."""
    h, w = clean.shape[-2:]
    size = min(WINDOW, h - 8 if h > 16 else h, w - 8 if w > 16 else w)
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    x = clean[..., top:top + size, left:left + size]
    if float(torch.rand(1, generator=generator)) < 0.5:
        x = x.flip(-1)
    return torch.rot90(x, int(torch.randint(0, 4, (1,), generator=generator)), (-2, -1)).contiguous()


def train_on_synthetic(learner, clean: torch.Tensor, synthesise: Synthesise, *, steps: int = STEPS,
                       lr: float = LR, seed: int = 0) -> dict[str, torch.Tensor]:
    """The ``all`` state of ``learner``'s network after ``steps`` Adam steps on pairs that ``synthesise``
    (clean window, generator) -> degraded window makes from the (K, C, H, W) ``clean`` images; the
    network itself is untouched (fresh leaves through ``forward_with``)."""
    model = learner.model
    kind = get_kind(KIND)
    params = kind.initial(model, detach=True)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = learner.device
    with torch.enable_grad():
        for _ in range(steps):
            y = _window(clean, generator)
            x = synthesise(y, generator)
            opt.zero_grad(set_to_none=True)
            loss = learner.loss_fn(forward_with(model, params, x.to(device), kind), y.to(device))
            loss.backward()
            opt.step()
    return {n: p.detach() for n, p in params.items()}
