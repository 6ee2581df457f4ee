"""``adapt()``: the one inner loop shared by training, evaluation and serving.

Built on ``torch.func``: the module is never copied; adapted parameters are a plain dict of tensors that
is passed to the module at call time (learn2learn's MAML, without cloning). The same call adapts one
task, support images ``(K, C, H, W)``, or a whole meta-step's tasks at once, support images
``(T, K, C, H, W)`` with parameters carrying a leading task dimension: every task's inner step runs in one
batched forward and backward pass, as one plain batch of T x K images when the kind's tensors broadcast
over the batch (``per_sample``: FiLM, each sample with its task's scale and shift), else under
``torch.func.vmap``.

What is adapted is the model's adapter kind (``metarestore.model.kinds``), or the ``kind`` a call names:
the adapted state is that kind's dict of tensors, mapped onto the network's parameters for every forward
(for the subset kinds, such as ``film``, the state *is* those parameters).

``functional_call`` swaps the parameters on the module for the duration of a call, so one module must not
be used from two threads at once (serving gives each concurrent call a module of its own).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from metarestore.meta.losses import LossFn, l1
from metarestore.model.kinds import AdapterKind, Params, kind_of
from metarestore.param_groups import param_group

Kind = str | AdapterKind | None
# inner learning rates by parameter group ("default": any group not named), or by parameter name (Meta-SGD's
# per-parameter rates: a tensor of the parameter's shape); one mapping, or one per step (a schedule)
LearningRates = Mapping[str, float | torch.Tensor]
Schedule = LearningRates | Sequence[LearningRates]


def group_lr(group: str, lrs: LearningRates) -> float | torch.Tensor:
    """Inner learning rate of a parameter group: its own rate, else ``default``."""
    if group in lrs:
        return lrs[group]
    if "default" not in lrs:
        raise KeyError(f"no inner learning rate for group {group!r} and no 'default'")
    return lrs["default"]


def lr_for(name: str, lrs: LearningRates) -> float | torch.Tensor:
    """A parameter's inner rate: its own (by name), else its group's."""
    return lrs[name] if name in lrs else group_lr(param_group(name), lrs)


def rates_at(schedule: Schedule, step: int) -> LearningRates:
    """Step ``step``'s rates: the one mapping, or the schedule's entry (a step past its end takes the last)."""
    if isinstance(schedule, Mapping):
        return schedule
    return schedule[min(step, len(schedule) - 1)]


def adaptable_params(model: nn.Module, kind: Kind = None, detach: bool = False) -> Params:
    """The state the inner loop starts from; ``detach=True`` gives fresh leaves (evaluation/serving)."""
    return kind_of(model, kind).initial(model, detach)


def per_task(params: Params, tasks: int) -> Params:
    """The same parameters for each of ``tasks`` tasks: a leading task dimension (a view, graph kept)."""
    return {n: p.expand(tasks, *p.shape) for n, p in params.items()}


_TIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _tied(model: nn.Module) -> bool:
    """Whether a parameter or buffer of ``model`` appears under two names (computed once per module)."""
    if model not in _TIED:
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        _TIED[model] = len({id(t) for _, t in named}) != len(named)
    return _TIED[model]


def _call(model: nn.Module, kind: AdapterKind, state: Params, x: torch.Tensor,
          hint: torch.Tensor | None = None) -> torch.Tensor:
    # untying walks every parameter of the module on every call (a tenth of a small adapter step's CPU
    # time): skipped when the model ties nothing, which gives the same result
    args = (x,) if hint is None else (x, hint)
    return functional_call(model, kind.parameters(model, state), args, strict=False, tie_weights=_tied(model))


def _flat_call(model: nn.Module, kind: AdapterKind, state: Params, x: torch.Tensor,
               hint: torch.Tensor | None) -> torch.Tensor:
    """T tasks' (T, N, ...) images as one plain batch of T * N, each sample with its task's state: for a
    kind whose tensors the forward broadcasts over the batch (``per_sample``). Plain eager: the fused
    layer norm and channels-last apply, which vmap cannot use (the batched step 1.25x faster)."""
    tasks, n = x.shape[:2]
    flat = {name: p.unsqueeze(1).expand(tasks, n, *p.shape[1:]).reshape(tasks * n, *p.shape[2:])
            for name, p in state.items()}
    hint = None if hint is None else hint.repeat_interleave(n)
    return _call(model, kind, flat, x.flatten(0, 1), hint).view_as(x)


def forward_with(model: nn.Module, params: Params, x: torch.Tensor, kind: Kind = None,
                 hint: torch.Tensor | None = None) -> torch.Tensor:
    """Run the model with the adapted state ``params`` (of ``kind``, default the model's) in place of its
    own parameters (the others come from the module).

    ``x`` of shape (T, N, C, H, W) with task-stacked ``params`` runs each task with its own parameters
    (and its own ``hint``, of shape (T,), for a family-conditioned model; ``None``: blind).
    """
    kind = kind_of(model, kind)
    if x.dim() == 5 and kind.per_sample:
        return _flat_call(model, kind, params, x, hint)
    if x.dim() == 5:
        if hint is None:
            return vmap(lambda p, xi: _call(model, kind, p, xi))(params, x)
        return vmap(lambda p, xi, hi: _call(model, kind, p, xi, hi))(params, x, hint)
    return _call(model, kind, params, x, hint)


def task_losses(loss_fn: LossFn, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One loss per task for (T, N, C, H, W) predictions and targets: a (T,) tensor."""
    return vmap(loss_fn)(pred, target)


def _inner_grads(model: nn.Module, kind: AdapterKind, params: Params, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: LossFn, first_order: bool, hint: torch.Tensor | None) -> list[torch.Tensor]:
    if x.dim() == 4:  # one task: plain autograd, the reference implementation
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()} if first_order else params
        loss = loss_fn(forward_with(model, leaves, x, kind, hint), y)
        return list(torch.autograd.grad(loss, list(leaves.values()), create_graph=not first_order))

    if kind.per_sample:  # one plain batch: the gradient of the sum is each task's own (tasks share nothing)
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()} if first_order else params
        with torch.enable_grad():
            losses = task_losses(loss_fn, _flat_call(model, kind, leaves, x, hint), y)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()), create_graph=not first_order)
        return [g.detach() for g in grads] if first_order else list(grads)

    def loss_of(p: Params, xi: torch.Tensor, yi: torch.Tensor, hi: torch.Tensor | None) -> torch.Tensor:
        return loss_fn(_call(model, kind, p, xi, hi), yi)

    dims = (0, 0, 0, None if hint is None else 0)
    if first_order:  # no graph through the inner gradient: computed outside autograd's view
        with torch.no_grad():
            grads = vmap(grad(loss_of), in_dims=dims)({n: p.detach() for n, p in params.items()}, x, y, hint)
    else:
        grads = vmap(grad(loss_of), in_dims=dims)(params, x, y, hint)
    return [grads[n] for n in params]


class SGD:
    """The inner loop's update: ``theta - rate * gradient`` with the rates of ``schedule`` (one mapping, or one
    per step), differentiable through rates that are tensors in a graph (Meta-SGD's). What meta-training
    adapts with, so the default of inference-time adaptation too."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def step(self, params: Params, grads: Sequence[torch.Tensor], n: int) -> Params:
        rates = rates_at(self.schedule, n)
        return {name: p - lr_for(name, rates) * g for (name, p), g in zip(params.items(), grads, strict=True)}


ADAM_LR = 0.01  # adapter fits' Adam rate, FiLM and LoRA alike (docs/benchmarks.md, "Adapters": steady fits)
FIT_OPTIMIZER = "adam"  # what every adapter fit steps with (``Adam``'s docstring says why)


class Adam:
    """Adam (Kingma & Ba) on an adapted state, element-wise, so a leading task dimension adapts each task on
    its own. For adapter fits at inference, where fixed rates are fragile: the PSNR loss's gradient grows as
    1/MSE, so a fit that starts far off (zero-shot posterize at 12.5 dB, an adapted fit reaching 36) takes
    steps hundreds of times larger at its end than at its start, and SGD at the meta-learned rates
    oscillates or diverges (LoRA on 4-bit posterize: 5 to 12 dB); Adam's step is bounded by ``lr`` per
    number whatever the gradient's scale (docs/benchmarks.md, "Adapters"). First order only."""

    def __init__(self, lr: float = ADAM_LR, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, params: Params, grads: Sequence[torch.Tensor], n: int) -> Params:
        (b1, b2), out = self.betas, {}
        for (name, p), g in zip(params.items(), grads, strict=True):
            m, v = self.moments.get(name, (torch.zeros_like(g), torch.zeros_like(g)))
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            self.moments[name] = (m, v)
            out[name] = p - self.lr * (m / (1 - b1 ** (n + 1))) / ((v / (1 - b2 ** (n + 1))).sqrt() + self.eps)
        return out


OPTIMIZERS = ("sgd", "adam")  # what inference-time adaptation may be asked to use


def inner_gradients(model: nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, *,
                    loss_fn: LossFn = l1, kind: Kind = None, hint: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The support loss's first-order gradient with respect to ``params`` (one task, or a task dimension):
    one step of an inference-time fit, whatever its update."""
    return _inner_grads(model, kind_of(model, kind), params, support_x, support_y, loss_fn, True, hint)


def adapt(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, *, steps: int,
          lrs: Schedule, params: Params | None = None, loss_fn: LossFn = l1,
          first_order: bool = False, kind: Kind = None, hint: torch.Tensor | None = None) -> Params:
    """Take ``steps`` gradient steps on the support pairs; returns the adapted state of ``kind`` (default
    the model's own adapter kind).

    ``params`` defaults to the kind's starting state (the model's own parameters, graph-connected, for
    meta-training; given a leading task dimension when ``support_x`` has one); pass
    ``adaptable_params(model, kind, detach=True)`` to adapt without touching the model.
    ``lrs``: one mapping of rates for every step, or a schedule, one per step (``rates_at``); rates that are
    tensors in a graph (Meta-SGD's) get the query loss's gradient. ``first_order=True`` drops the inner
    Jacobian. ``hint``: a family-conditioned model's row, one for the
    task (or (T,), one per task); ``None``: blind.
    """
    kind = kind_of(model, kind)
    if params is None:
        params = kind.initial(model)
        if support_x.dim() == 5:
            params = per_task(params, support_x.shape[0])
    # a frozen network's state (Meta-SGD learning only its rates) needs no gradient of its own, but the
    # inner gradient is taken with respect to it: a fresh leaf, which nothing upstream can miss
    params = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in params.items()}
    sgd = SGD(lrs)
    with torch.enable_grad():
        for step in range(steps):
            grads = _inner_grads(model, kind, params, support_x, support_y, loss_fn, first_order, hint)
            params = sgd.step(params, grads, step)
    return params


def delta(model: nn.Module, params: Params, kind: Kind = None) -> Params:
    """The small adapter a server stores per client (subset kinds: adapted minus meta-learned values)."""
    return kind_of(model, kind).delta(model, params)


def apply_delta(model: nn.Module, adapter: Params, kind: Kind = None) -> Params:
    """The adapted state back from a stored ``delta``."""
    return kind_of(model, kind).from_delta(model, adapter)
