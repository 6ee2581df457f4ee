"""Meta-learning algorithms: one class each (learn2learn's shape), registered by name.

Every algorithm turns episodes into a gradient contribution, scaled by each task's weight over the
global weight sum, accumulated into ``.grad``. Summing those over tasks (in one process, or across
workers with an all-reduce) gives the weighted multi-task meta-gradient
``sum_t w_f(t) * grad L_t / sum_t w_f(t)``.

Two paths compute the same thing: ``batch_gradient`` runs all tasks of a step through the network
together (``adapt()`` with a task dimension), the one training uses; ``task_gradient`` runs one task at a
time with plain autograd, the reference the tests compare the batched path against.

- ``maml``: second-order MAML, query loss after ``adapt()`` differentiated through the inner loop.
  With ``zero_shot_weight`` w > 0 (default 1) the task objective is ``L_q(adapted) + w * L_q(initial)``:
  a plain MAML initialisation only has to be good *after* adaptation and can restore badly on its own,
  but a server restores most images without an adapter. The same holds for ``fomaml`` and ``metasgd``.
- ``fomaml``: first-order MAML, the same with the inner Jacobian dropped.
- ``metasgd``: MAML with learned inner learning rates (log-parameterised): one per parameter group, or
  (``meta.rates: parameter``) one per adapted number and inner step, learn2learn's MetaSGD with per-step
  rates; second order, or first order (``meta.first_order``: the rates still learn, through the update
  ``theta - rate * gradient``, with the inner gradient held constant). With the network frozen
  (``train.trainable: [log_rates]``) it learns how to adapt and nothing else: restoring without an adapter,
  told or blind, stays bit for bit the model it started from.
- ``reptile``: adaptable parameters move towards the adapted ones, ``(theta - phi) / (lr * steps)``
  (the mean inner gradient); the parameters the inner loop does not adapt get the first-order query
  gradient at ``phi`` so that they still learn.
- ``multitask``: no inner loop; the loss on support and query pairs. The baseline everything is compared to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from metarestore.data import Episode, EpisodeBatch, TaskSpec
from metarestore.meta.adapt import (
    OPTIMIZERS,
    SGD,
    Adam,
    LearningRates,
    Params,
    adapt,
    adaptable_params,
    forward_with,
    group_lr,
    inner_gradients,
    lr_for,
    per_task,
    task_losses,
)
from metarestore.meta.losses import get_loss
from metarestore.model import RestorationNet, adaptable_names, kind_of
from metarestore.param_groups import param_group
from metarestore.pixels import random_crops
from metarestore.registry import Registry

if TYPE_CHECKING:
    from metarestore.config import Config, MetaConfig

ALGORITHMS: Registry[type[MetaLearner]] = Registry("meta-learning algorithm")
OWN = "learner."  # a model file's keys for the learner's own tensors (Meta-SGD's rates), beside the network's

register = ALGORITHMS.register


def make_learner(model: nn.Module, cfg: MetaConfig) -> MetaLearner:
    """The learner of ``cfg.algorithm`` around ``model``."""
    return ALGORITHMS[cfg.algorithm](model, cfg)


def build_learner(cfg: Config, device: torch.device | str = "cpu", *, seed: int | None = None,
                  inner_lrs: dict[str, float] | None = None) -> MetaLearner:
    """The one way to build the learner a config describes, for training (``seed``: the same initial weights
    in every worker) and for loading (``inner_lrs``: the rates a checkpoint recorded, Meta-SGD's learned
    ones or the configured; the weights are loaded after)."""
    if seed is not None:
        torch.manual_seed(seed)
    learner = make_learner(RestorationNet.from_config(cfg.model), cfg.meta)
    if inner_lrs is not None:
        learner.set_inner_lrs(inner_lrs)
    return learner.to(device)


class MetaLearner(nn.Module):
    """A restoration network plus the inner-loop settings; subclasses are the algorithms."""

    name = ""
    learns_inner_lrs = False  # Meta-SGD: the rates are parameters, saved with the training state

    def __init__(self, model: nn.Module, cfg: MetaConfig):
        super().__init__()
        self.model = model
        self.inner_steps = cfg.inner_steps
        self.zero_shot_weight = cfg.zero_shot_weight
        self.loss_fn = get_loss(cfg.loss)
        self.groups = sorted({param_group(n) for n in adaptable_names(model)})
        self.fixed_lrs = {g: float(group_lr(g, cfg.inner_lr)) for g in self.groups}
        self.blind_fraction = cfg.blind_fraction

    @property
    def device(self) -> torch.device:
        """Where the model lives: ``adapt`` and ``restore`` take inputs anywhere and move them here."""
        return next(self.model.parameters()).device

    @property
    def hint_families(self) -> tuple[str, ...]:
        """The families its model can be told (``hint``, ``restore(family=...)``); empty for a blind model,
        and for a network without a family table at all."""
        return tuple(getattr(self.model, "hint_families", ()))

    @property
    def algorithm(self) -> str:
        return self.name

    # inner loop -----------------------------------------------------------------------------------
    def inner_lrs(self) -> dict[str, float | torch.Tensor]:
        return dict(self.fixed_lrs)

    def inner_lr_values(self) -> dict[str, float]:
        return {g: float(v.detach()) if torch.is_tensor(v) else float(v) for g, v in self.inner_lrs().items()}

    def set_inner_lrs(self, values: dict[str, float]) -> None:
        """Restore the inner rates a checkpoint recorded (``inner_lr_values`` of the trained learner)."""
        self.fixed_lrs = {g: float(values[g]) for g in self.groups}

    def rates(self) -> list[LearningRates]:
        """The inner loop's rates, one mapping per step (a step past the list takes its last): by parameter
        group here; by parameter name where Meta-SGD learns one rate per parameter."""
        return [self.inner_lrs()]

    # weights ----------------------------------------------------------------------------------------
    def weights(self, network: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What a model file holds: the network's weights (``network``, default the model's own: a run's
        weight average in their place) and, under ``learner.``, the learner's own tensors (Meta-SGD's learned
        rates; none for the other algorithms)."""
        network = self.model.state_dict() if network is None else network
        return {**network, **{OWN + k: v.detach() for k, v in self.own_state().items()}}

    def own_state(self) -> dict[str, torch.Tensor]:
        """The learner's ``state_dict`` without the network's (``model.``) part: Meta-SGD's rates."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a model file (``weights()``). A file without the learner's own tensors (a Meta-SGD model saved
        before they travelled with it) keeps the rates its metadata gave ``build_learner``."""
        network, own = split_weights(tensors)
        self.model.load_state_dict(network)
        if not own:
            return
        expected = self.own_state()
        if set(own) != set(expected):
            raise ValueError(f"the model file's learner tensors ({', '.join(sorted(own))}) are not this "
                             f"algorithm's ({', '.join(sorted(expected)) or 'none'})")
        with torch.no_grad():
            for k, v in own.items():
                expected[k].copy_(v)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None, *,
              kind: str | None = None, patch: int | None = None, seed: int = 0, family: str | None = None,
              optimizer: str = "sgd", on_step: Callable[[int], None] | None = None) -> Params:
        """Inference-time adaptation: fresh leaves, first order, the model itself untouched.

        ``kind`` (default the model's own) picks the adapter kind; another kind than the one the
        inner rates were (meta-)learned for uses that kind's own ``inner_lr``. With ``patch``, every step
        sees a fresh random ``patch``-px window of each pair (drawn from ``seed``) rather than the whole
        pairs: an adapted state acts the same everywhere in an image, so windows give nearly the same
        gradient at a fraction of the cost, whatever the images' size.

        ``support_x`` of shape (T, K, C, H, W) adapts T independent tasks at once (one batched forward and
        backward per step, ``adapt()``'s task dimension); the result carries a leading task dimension and
        equals adapting each task alone with ``seed + t`` (task t's windows come from its own generator).
        ``family``: the degradation, named to a family-conditioned model (``None``: blind). ``optimizer``:
        ``sgd``, the inner loop meta-training learned (its rates), or ``adam`` (``meta.adapt.Adam``: what adapter
        fits use, steady where the meta-learned rates are not). ``on_step(n)`` is
        called after each step with the steps done: a caller's progress or deadline (it may raise to stop)."""
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)})")
        support_x, support_y = support_x.to(self.device), support_y.to(self.device)
        own = kind_of(self.model)
        chosen = kind_of(self.model, kind)
        if chosen.name == own.name:
            lrs = [{k: v.detach() if torch.is_tensor(v) else float(v) for k, v in step.items()} for step in self.rates()]
        else:
            lrs = [{"default": chosen.inner_lr}]
        steps = self.inner_steps if steps is None else steps
        params = chosen.initial(self.model, detach=True)
        tasks = support_x.shape[0] if support_x.dim() == 5 else None
        if tasks is not None:
            params = {n: p.detach().expand(tasks, *p.shape).clone().requires_grad_(True) for n, p in params.items()}
        hint = self.hint(family)
        if hint is not None and tasks is not None:
            hint = hint.expand(tasks)
        update = SGD(lrs) if optimizer == "sgd" else Adam()
        whole = patch is None or max(support_x.shape[-2:]) <= patch
        generators = [torch.Generator().manual_seed(seed + t) for t in range(tasks or 1)]
        for step in range(steps):
            if whole:
                x, y = support_x, support_y
            elif tasks is None:
                x, y = random_crops(support_x, support_y, patch, generators[0])
            else:
                crops = [random_crops(support_x[t], support_y[t], patch, g) for t, g in enumerate(generators)]
                x, y = torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])
            grads = inner_gradients(self.model, params, x, y, loss_fn=self.loss_fn, kind=chosen, hint=hint)
            with torch.no_grad():  # first order: no graph across steps
                params = {n: p.requires_grad_(True) for n, p in update.step(params, grads, step).items()}
            if on_step is not None:
                on_step(step + 1)
        return params

    def hint(self, family: str | None | list[str | None]) -> torch.Tensor | None:
        """The row a family-conditioned model is told for ``family`` (a 0-dim tensor), or one row per image
        for a list of families (None in it: that image blind); ``None`` when blind. Naming a family to a
        model that cannot be told it is a ``ValueError`` that says what it knows."""
        if family is None or (isinstance(family, list) and all(f is None for f in family)):
            return None
        if not self.hint_families:
            raise ValueError("this model is not told the degradation (it was trained blind)")
        if isinstance(family, list):
            return self.model.condition.hints(family)
        return torch.tensor(self.model.condition.index(family), device=self.device)

    @torch.no_grad()
    def restore(self, x: torch.Tensor, params: Params | None = None, *, kind: str | None = None,
                family: str | None | list[str | None] = None) -> torch.Tensor:
        """Restore ``x``, with an adapted state of ``kind`` (default the model's own) when given, told the
        degradation ``family`` (or each image its own, a list: one pass for all) when the model takes one; the
        result is on ``x``'s device (the pass runs on the model's: a CPU caller can use a CUDA model)."""
        inp = x.to(self.device)
        hint = self.hint(family)
        out = self.model(inp, hint) if params is None else forward_with(self.model, params, inp, kind, hint)
        return out.clamp(0, 1).to(x.device)

    # outer loop -----------------------------------------------------------------------------------
    def hints(self, tasks: list[TaskSpec]) -> torch.Tensor | None:
        """A family-conditioned model's row per task, (T,): the task's family, or blind (0) for a
        ``blind_fraction`` of tasks drawn from each task's seed (so every worker and the per-task reference
        agree) and for a family the model cannot be told. ``None`` for a model that takes no hint."""
        condition = getattr(self.model, "condition", None)
        if not self.hint_families:
            return None
        named = [t.family if t.family in condition.families
                 and float(torch.rand((), generator=torch.Generator().manual_seed(t.seed))) >= self.blind_fraction
                 else None for t in tasks]
        return condition.hints(named)

    def _hint(self, episode: Episode) -> torch.Tensor | None:
        """One task's row (a 0-dim tensor), or ``None``."""
        hints = self.hints([episode.task])
        return None if hints is None else hints[0]

    def task_gradient(self, episode: Episode, scale: float) -> float:
        """Accumulate ``scale * gradient`` of one task into ``.grad``; returns its query loss."""
        raise NotImplementedError

    def batch_gradient(self, batch: EpisodeBatch, scales: torch.Tensor) -> torch.Tensor:
        """Accumulate ``sum_t scales[t] * gradient_t`` into ``.grad``; returns the (T,) query losses."""
        raise NotImplementedError

    def _zero_shot(self, x: torch.Tensor, y: torch.Tensor, hint: torch.Tensor | None) -> torch.Tensor:
        """Per-task losses of the unadapted model on (T, N, ...) images: one forward for all tasks."""
        if hint is not None:
            hint = hint.repeat_interleave(x.shape[1])
        return task_losses(self.loss_fn, self.model(x.flatten(0, 1), hint).view_as(y), y)


@register("multitask")
class MultiTask(MetaLearner):
    def task_gradient(self, episode: Episode, scale: float) -> float:
        ep = episode
        x, y = torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])
        loss = self.loss_fn(self.model(x, self._hint(ep)), y)
        (loss * scale).backward()
        return float(loss.detach())

    def batch_gradient(self, batch: EpisodeBatch, scales: torch.Tensor) -> torch.Tensor:
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        losses = self._zero_shot(x, y, self.hints(batch.tasks))
        (losses * scales).sum().backward()
        return losses.detach()


@register("fomaml")
class FOMAML(MetaLearner):
    first_order = True

    def task_gradient(self, episode: Episode, scale: float) -> float:
        ep, hint = episode, self._hint(episode)
        fast = adapt(self.model, ep.support_x, ep.support_y, steps=self.inner_steps, lrs=self.rates(),
                     loss_fn=self.loss_fn, first_order=self.first_order, hint=hint)
        loss = self.loss_fn(forward_with(self.model, fast, ep.query_x, hint=hint), ep.query_y)
        objective = loss
        if self.zero_shot_weight > 0:
            objective = loss + self.zero_shot_weight * self.loss_fn(self.model(ep.query_x, hint), ep.query_y)
        (objective * scale).backward()
        return float(loss.detach())

    def batch_gradient(self, batch: EpisodeBatch, scales: torch.Tensor) -> torch.Tensor:
        b, hint = batch, self.hints(batch.tasks)
        fast = adapt(self.model, b.support_x, b.support_y, steps=self.inner_steps, lrs=self.rates(),
                     loss_fn=self.loss_fn, first_order=self.first_order, hint=hint)
        losses = task_losses(self.loss_fn, forward_with(self.model, fast, b.query_x, hint=hint), b.query_y)
        objective = losses
        if self.zero_shot_weight > 0:
            objective = losses + self.zero_shot_weight * self._zero_shot(b.query_x, b.query_y, hint)
        (objective * scales).sum().backward()
        return losses.detach()


@register("maml")
class MAML(FOMAML):
    first_order = False


@register("metasgd")
class MetaSGD(MAML):
    """MAML whose inner learning rates are learned (log-parameterised) with the network: one per parameter
    group, or (``meta.rates: parameter``) one per adapted number and inner step, each starting at its
    group's configured rate."""

    learns_inner_lrs = True

    def __init__(self, model: nn.Module, cfg: MetaConfig):
        super().__init__(model, cfg)
        self.first_order = cfg.first_order
        self.per_parameter = cfg.rates == "parameter"
        if not self.per_parameter:
            self.log_lr = nn.ParameterDict({g: nn.Parameter(torch.tensor(math.log(v)))
                                            for g, v in self.fixed_lrs.items()})
            return
        self.layout = [(n, p.shape) for n, p in kind_of(model).initial(model, detach=True).items()]
        start = torch.cat([torch.full((shape.numel(),), math.log(lr_for(n, self.fixed_lrs))) for n, shape in self.layout])
        # (steps, adapted numbers): one row of rates per inner step
        self.log_rates = nn.Parameter(start.expand(max(1, cfg.inner_steps), -1).clone())

    def _per_name(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in self.layout:
            n = shape.numel()
            out[name] = row[offset:offset + n].view(shape)
            offset += n
        return out

    def rates(self) -> list[LearningRates]:
        if not self.per_parameter:
            return [self.inner_lrs()]
        return [self._per_name(row.exp()) for row in self.log_rates]

    def inner_lrs(self) -> dict[str, float | torch.Tensor]:
        if not self.per_parameter:
            return {g: self.log_lr[g].exp() for g in self.groups}
        # per parameter: each group's geometric mean over its numbers and steps (what metrics and metadata show)
        logs = self._per_name(self.log_rates.detach().mean(0))
        return {g: float(torch.cat([v.flatten() for n, v in logs.items() if param_group(n) == g]).mean().exp())
                for g in self.groups}

    def set_inner_lrs(self, values: dict[str, float]) -> None:
        with torch.no_grad():
            if not self.per_parameter:
                for g in self.groups:
                    self.log_lr[g].fill_(math.log(float(values[g])))
                return
            start = torch.cat([torch.full((shape.numel(),), math.log(float(values[param_group(n)])))
                               for n, shape in self.layout])
            self.log_rates.copy_(start.expand_as(self.log_rates))


@register("reptile")
class Reptile(MetaLearner):
    def task_gradient(self, episode: Episode, scale: float) -> float:
        ep, hint = episode, self._hint(episode)
        fast = self._adapted(ep.support_x, ep.support_y, hint)
        loss = self.loss_fn(forward_with(self.model, fast, ep.query_x, hint=hint), ep.query_y)
        self._accumulate(loss * scale, fast, lambda d: scale * d)
        return float(loss.detach())

    def batch_gradient(self, batch: EpisodeBatch, scales: torch.Tensor) -> torch.Tensor:
        b, hint = batch, self.hints(batch.tasks)
        fast = self._adapted(b.support_x, b.support_y, hint)
        losses = task_losses(self.loss_fn, forward_with(self.model, fast, b.query_x, hint=hint), b.query_y)
        self._accumulate((losses * scales).sum(), fast,
                         lambda d: (scales.view(-1, *[1] * (d.dim() - 1)) * d).sum(0))
        return losses.detach()

    def _adapted(self, x: torch.Tensor, y: torch.Tensor, hint: torch.Tensor | None) -> Params:
        start = adaptable_params(self.model, detach=True)
        if x.dim() == 5:
            start = per_task(start, x.shape[0])
        return adapt(self.model, x, y, steps=self.inner_steps, lrs=self.fixed_lrs, params=start,
                     loss_fn=self.loss_fn, first_order=True, hint=hint)

    def _accumulate(self, objective: torch.Tensor, fast: Params, weigh) -> None:
        """Frozen parameters: the query gradient at phi; adaptable ones: the (weighted) Reptile direction."""
        theta = adaptable_params(self.model)
        frozen = [p for n, p in self.model.named_parameters() if n not in theta]
        if frozen:
            _accumulate(frozen, torch.autograd.grad(objective, frozen))
        if self.inner_steps > 0:
            directions = [weigh((theta[n].detach() - fast[n].detach()) / (lr_for(n, self.fixed_lrs) * self.inner_steps))
                          for n in theta]
            _accumulate(list(theta.values()), directions)


def split_weights(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A model file's tensors as (the network's, the learner's own without their ``learner.`` prefix)."""
    return ({k: v for k, v in tensors.items() if not k.startswith(OWN)},
            {k[len(OWN):]: v for k, v in tensors.items() if k.startswith(OWN)})


def _accumulate(params: list[torch.Tensor], grads) -> None:
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
