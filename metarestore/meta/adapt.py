"""``adapt()``: the one inner loop shared by training, evaluation and serving.

Built on ``torch.func``: the module is never copied; adapted parameters are a plain dict of tensors that
is passed to the module at call time (learn2learn's MAML, without cloning). The same call adapts one
task, support images ``(K, C, H, W)``, or a whole meta-step's tasks at once, support images
``(T, K, C, H, W)`` with parameters carrying a leading task dimension: ``torch.func.vmap`` then runs every
task's inner step in one batched forward and backward pass.

``functional_call`` swaps the parameters on the module for the duration of a call, so one module must not
be used from two threads at once (serving gives each concurrent call a module of its own).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

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


def per_task(params: Params, tasks: int) -> Params:
    """The same parameters for each of ``tasks`` tasks: a leading task dimension (a view, graph kept)."""
    return {n: p.expand(tasks, *p.shape) for n, p in params.items()}


def forward_with(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Run the model with ``params`` replacing its own (others come from the module).

    ``x`` of shape (T, N, C, H, W) with task-stacked ``params`` runs each task with its own parameters.
    """
    if x.dim() == 5:
        return vmap(lambda p, xi: functional_call(model, p, (xi,), strict=False))(params, x)
    return functional_call(model, params, (x,), strict=False)


def task_losses(loss_fn: LossFn, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One loss per task for (T, N, C, H, W) predictions and targets: a (T,) tensor."""
    return vmap(loss_fn)(pred, target)


def _inner_grads(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                 first_order: bool) -> list[torch.Tensor]:
    if x.dim() == 4:  # one task: plain autograd, the reference implementation
        loss = loss_fn(forward_with(model, params, x), y)
        return list(torch.autograd.grad(loss, list(params.values()), create_graph=not first_order))

    def loss_of(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (xi,), strict=False), yi)

    if first_order:  # no graph through the inner gradient: computed outside autograd's view
        with torch.no_grad():
            grads = vmap(grad(loss_of))({n: p.detach() for n, p in params.items()}, x, y)
    else:
        grads = vmap(grad(loss_of))(params, x, y)
    return [grads[n] for n in params]


def adapt(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, *, steps: int,
          lrs: LearningRates, params: Params | None = None, loss_fn: LossFn = l1,
          first_order: bool = False) -> Params:
    """Take ``steps`` gradient steps on the support pairs; returns the adapted parameters.

    ``params`` defaults to the model's adaptable parameters (graph-connected, for meta-training; given a
    leading task dimension when ``support_x`` has one); pass ``adaptable_params(model, detach=True)`` to
    adapt without touching the model. ``first_order=True`` drops the inner Jacobian.
    """
    if params is None:
        params = adaptable_params(model)
        if support_x.dim() == 5:
            params = per_task(params, support_x.shape[0])
    with torch.enable_grad():
        for _ in range(steps):
            grads = _inner_grads(model, params, support_x, support_y, loss_fn, first_order)
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
