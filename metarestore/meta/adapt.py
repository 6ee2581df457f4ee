"""``adapt()``: the one inner loop shared by training, evaluation and serving.

Built on ``torch.func.functional_call``: the module is never copied; adapted parameters are a plain
dict of tensors that is passed to the module at call time (learn2learn's MAML, without cloning).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from metarestore.meta.losses import LossFn, l1
from metarestore.model import adaptable_names, param_group

Params = dict[str, torch.Tensor]
LearningRates = Mapping[str, float | torch.Tensor]


def group_lr(group: str, lrs: LearningRates) -> float | torch.Tensor:
    """Inner learning rate of a parameter group: its own rate, else ``default``."""
    if group in lrs:
        return lrs[group]
    if "default" not in lrs:
        raise KeyError(f"no inner learning rate for group {group!r} and no 'default'")
    return lrs["default"]


def lr_for(name: str, lrs: LearningRates) -> float | torch.Tensor:
    return group_lr(param_group(name), lrs)


def adaptable_params(model: nn.Module, mode: str | None = None, detach: bool = False) -> Params:
    """The parameters the inner loop adapts; ``detach=True`` gives fresh leaves (evaluation/serving)."""
    names = set(adaptable_names(model, mode))
    params = {n: p for n, p in model.named_parameters() if n in names}
    if detach:
        params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    return params


def forward_with(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Run the model with ``params`` replacing its own (others come from the module)."""
    return functional_call(model, params, (x,), strict=False)


def adapt(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, *, steps: int,
          lrs: LearningRates, params: Params | None = None, loss_fn: LossFn = l1,
          first_order: bool = False) -> Params:
    """Take ``steps`` gradient steps on the support pairs; returns the adapted parameters.

    ``params`` defaults to the model's adaptable parameters (graph-connected, for meta-training);
    pass ``adaptable_params(model, detach=True)`` to adapt without touching the model.
    ``first_order=True`` drops the inner Jacobian (no graph through the gradients).
    """
    if params is None:
        params = adaptable_params(model)
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_fn(forward_with(model, params, support_x), support_y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {name: p - lr_for(name, lrs) * g
                      for (name, p), g in zip(params.items(), grads, strict=True)}
    return params


def delta(model: nn.Module, params: Params) -> Params:
    """Adapted minus meta-learned values: the small adapter a server stores per client."""
    own = dict(model.named_parameters())
    return {n: (p.detach() - own[n].detach()).cpu() for n, p in params.items()}


def apply_delta(model: nn.Module, adapter: Params) -> Params:
    own = dict(model.named_parameters())
    return {n: own[n].detach() + d.to(own[n].device, own[n].dtype) for n, d in adapter.items()}
