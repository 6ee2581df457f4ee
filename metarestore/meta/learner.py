"""Meta-learning algorithms as one per-task gradient rule each.

Every algorithm turns one episode into a gradient contribution, scaled by the task's weight over the
global weight sum, accumulated into ``.grad``. Summing those over tasks (in one process, or across
workers with an all-reduce) gives the weighted multi-task meta-gradient
``sum_t w_f(t) * grad L_t / sum_t w_f(t)``.

- ``maml``: second-order MAML, query loss after ``adapt()`` differentiated through the inner loop.
  With ``zero_shot_weight`` w > 0 (default 1) the task objective is ``L_q(adapted) + w * L_q(initial)``:
  a plain MAML initialisation only has to be good *after* adaptation and can restore badly on its own,
  but a server restores most images without an adapter. The same holds for ``fomaml`` and ``metasgd``.
- ``fomaml``: first-order MAML, the same with the inner Jacobian dropped.
- ``metasgd``: MAML with learned per-group inner learning rates (log-parameterised, second order).
- ``reptile``: adaptable parameters move towards the adapted ones, ``(theta - phi) / (lr * steps)``
  (the mean inner gradient); the parameters the inner loop does not adapt get the first-order query
  gradient at ``phi`` so that they still learn.
- ``multitask``: no inner loop; the loss on support and query pairs. The baseline everything is compared to.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metarestore.config import MetaConfig
from metarestore.data import Episode
from metarestore.meta.adapt import Params, adapt, adaptable_params, forward_with, group_lr, lr_for
from metarestore.meta.losses import get_loss
from metarestore.model import adaptable_names, param_group


class MetaLearner(nn.Module):
    """A restoration network plus the inner-loop settings (and, for Meta-SGD, learned rates)."""

    def __init__(self, model: nn.Module, cfg: MetaConfig):
        super().__init__()
        self.model = model
        self.algorithm = cfg.algorithm
        self.inner_steps = cfg.inner_steps
        self.zero_shot_weight = cfg.zero_shot_weight
        self.loss_fn = get_loss(cfg.loss)
        self.groups = sorted({param_group(n) for n in adaptable_names(model)})
        initial = {g: float(group_lr(g, cfg.inner_lr)) for g in self.groups}
        self.fixed_lrs = initial
        self.log_lr = None
        if self.algorithm == "metasgd":
            self.log_lr = nn.ParameterDict({g: nn.Parameter(torch.tensor(math.log(v))) for g, v in initial.items()})

    # inner loop -----------------------------------------------------------------------------------
    def inner_lrs(self) -> dict[str, float | torch.Tensor]:
        if self.log_lr is not None:
            return {g: self.log_lr[g].exp() for g in self.groups}
        return dict(self.fixed_lrs)

    def inner_lr_values(self) -> dict[str, float]:
        return {g: float(v.detach()) if torch.is_tensor(v) else float(v) for g, v in self.inner_lrs().items()}

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None) -> Params:
        """Inference-time adaptation: fresh leaves, first order, the model itself untouched."""
        lrs = {g: float(v) for g, v in self.inner_lrs().items()}
        return adapt(self.model, support_x, support_y, steps=self.inner_steps if steps is None else steps,
                     lrs=lrs, params=adaptable_params(self.model, detach=True), loss_fn=self.loss_fn,
                     first_order=True)

    @torch.no_grad()
    def restore(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        out = self.model(x) if params is None else forward_with(self.model, params, x)
        return out.clamp(0, 1)

    # outer loop -----------------------------------------------------------------------------------
    def task_gradient(self, episode: Episode, scale: float) -> float:
        """Accumulate ``scale * gradient`` of this task into ``.grad``; returns its query loss."""
        ep, loss_fn = episode, self.loss_fn
        if self.algorithm == "multitask":
            x = torch.cat([ep.support_x, ep.query_x])
            y = torch.cat([ep.support_y, ep.query_y])
            loss = loss_fn(self.model(x), y)
            (loss * scale).backward()
            return float(loss.detach())
        if self.algorithm == "reptile":
            return self._reptile(ep, scale)
        first_order = self.algorithm == "fomaml"
        fast = adapt(self.model, ep.support_x, ep.support_y, steps=self.inner_steps, lrs=self.inner_lrs(),
                     loss_fn=loss_fn, first_order=first_order)
        loss = loss_fn(forward_with(self.model, fast, ep.query_x), ep.query_y)
        objective = loss
        if self.zero_shot_weight > 0:
            objective = loss + self.zero_shot_weight * loss_fn(self.model(ep.query_x), ep.query_y)
        (objective * scale).backward()
        return float(loss.detach())

    def _reptile(self, ep: Episode, scale: float) -> float:
        lrs = self.fixed_lrs
        theta = adaptable_params(self.model)
        fast = adapt(self.model, ep.support_x, ep.support_y, steps=self.inner_steps, lrs=lrs,
                     params=adaptable_params(self.model, detach=True), loss_fn=self.loss_fn, first_order=True)
        loss = self.loss_fn(forward_with(self.model, fast, ep.query_x), ep.query_y)
        frozen = [(n, p) for n, p in self.model.named_parameters() if n not in theta]
        if frozen:
            grads = torch.autograd.grad(loss, [p for _, p in frozen])
            _accumulate([p for _, p in frozen], [scale * g for g in grads])
        if self.inner_steps > 0:
            steps = self.inner_steps
            directions = [(theta[n].detach() - fast[n].detach()) / (lr_for(n, lrs) * steps) for n in theta]
            _accumulate(list(theta.values()), [scale * d for d in directions])
        return float(loss.detach())


def _accumulate(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    """All gradients as one vector (zeros where a parameter got none), for a single all-reduce."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def set_flat_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
