"""Adapter kinds: what the inner loop adapts, and how that state becomes the network's parameters.

One small class per kind, registered by name in ``KINDS`` (the only list of names: config validation and
the operator adapter's paths read it). A kind gives

- ``initial(model)``: the state the inner loop starts from, a flat dict of tensors whose names start with
  the module they belong to (so ``param_group`` finds their learning-rate group);
- ``parameters(model, state)``: the tensors that replace the module's own in the functional forward;
- ``delta`` / ``from_delta``: the small tensors a server stores per client, and the state back from them.

The subset kinds (``all``, ``decoder``, ``norm_bias``, ``film``) adapt some of the network's own
parameters: their state is those parameters. ``lora`` adapts low-rank factors kept outside the network
(the shipped weights load unchanged): every 1x1 convolution ``W`` runs as ``W + B @ A``, ``B`` starting at
zero, so adaptation starts exactly from the base model.
"""

from __future__ import annotations

import torch
from torch import nn

from metarestore.param_groups import param_group
from metarestore.registry import Registry

Params = dict[str, torch.Tensor]

KINDS: Registry[type[AdapterKind]] = Registry("adapter kind", error=ValueError)

register = KINDS.register


def get_kind(kind: str | AdapterKind) -> AdapterKind:
    """The kind named ``kind`` (an instance passes through)."""
    if isinstance(kind, AdapterKind):
        return kind
    return KINDS[kind]()  # an unknown name: a ValueError that lists the known


def kind_of(model: nn.Module, kind: str | AdapterKind | None = None) -> AdapterKind:
    """``kind``, or the one the model was configured with (``model.adapt``)."""
    return get_kind(model.adapt_mode if kind is None else kind)


class AdapterKind:
    name = ""
    inner_lr = 0.01  # inner learning rate when the learner's own (meta-learned) rates are for another kind
    # whether the network's forward broadcasts this kind's tensors over the batch: then a (T, ...) state
    # becomes a per-sample (T * N, ...) one and T tasks run as one plain batch, no vmap (``adapt``)
    per_sample = False

    def initial(self, model: nn.Module, detach: bool = False) -> Params:
        """The starting state; ``detach=True`` gives fresh leaves that leave the model untouched."""
        raise NotImplementedError

    def parameters(self, model: nn.Module, state: Params) -> Params:
        """Tensors that replace the module's own parameters of the same name in the forward."""
        raise NotImplementedError

    def delta(self, model: nn.Module, state: Params) -> Params:
        """The small tensors that store an adapted state (detached, on the CPU)."""
        raise NotImplementedError

    def from_delta(self, model: nn.Module, stored: Params) -> Params:
        raise NotImplementedError

    def check(self, model: nn.Module, state: Params) -> None:
        """``ValueError`` unless ``state`` holds exactly this kind's tensors, with their shapes, for ``model``."""
        expected = {n: p.shape for n, p in self.initial(model, detach=True).items()}
        if set(state) != set(expected):
            raise ValueError(f"{self.name} state does not match this model: expected {len(expected)} tensors "
                             f"({', '.join(sorted(expected)[:3])}, ...), got {len(state)}")
        for n, value in state.items():
            if value.shape != expected[n]:
                raise ValueError(f"{self.name} state: {n} is {tuple(value.shape)}, the model needs "
                                 f"{tuple(expected[n])}")
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(f"{self.name} state: {n} is not a finite floating-point tensor")

    def names(self, model: nn.Module) -> list[str]:
        return list(self.initial(model, detach=True))

    def count(self, model: nn.Module) -> int:
        """Adapted numbers per task."""
        return sum(p.numel() for p in self.initial(model, detach=True).values())


class Subset(AdapterKind):
    """Adapts the network's own parameters that ``adapts(name)`` selects; the rest stay meta-learned."""

    def adapts(self, name: str) -> bool:
        raise NotImplementedError

    def names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters() if self.adapts(n)]

    def initial(self, model: nn.Module, detach: bool = False) -> Params:
        params = {n: p for n, p in model.named_parameters() if self.adapts(n)}
        if detach:
            params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        return params

    def parameters(self, model: nn.Module, state: Params) -> Params:
        return state

    def delta(self, model: nn.Module, state: Params) -> Params:
        own = dict(model.named_parameters())
        return {n: (p.detach() - own[n].detach()).cpu() for n, p in state.items()}

    def from_delta(self, model: nn.Module, stored: Params) -> Params:
        own = dict(model.named_parameters())
        return {n: own[n].detach() + d.to(own[n].device, own[n].dtype) for n, d in stored.items()}


@register("all")
class All(Subset):
    def adapts(self, name: str) -> bool:
        return True


@register("decoder")
class Decoder(Subset):
    def adapts(self, name: str) -> bool:
        return param_group(name) in ("decoder", "ending")


@register("norm_bias")
class NormBias(Subset):
    def adapts(self, name: str) -> bool:
        return ".norm" in name or name.endswith(".bias")


@register("film")
class FiLM(Subset):
    """The per-block channel scale and shift (``NAFBlock.film_scale``/``film_shift``)."""

    per_sample = True  # (1, c, 1, 1) tensors that multiply and shift (N, c, H, W) activations

    def adapts(self, name: str) -> bool:
        return name.endswith(("film_scale", "film_shift"))


@register("lora")
class LoRA(AdapterKind):
    """Low-rank deltas on every dense 1x1 convolution: ``W (out, in)`` runs as ``W + B @ A`` with ``A``
    (rank, in) and ``B`` (out, rank), state ``<module>.lora_a`` / ``<module>.lora_b``.

    ``A`` starts with orthonormal rows drawn from a fixed seed (the same for every call, so adaptation is
    reproducible), ``B`` at zero: the first step moves ``W`` by ``-lr * dL/dW`` projected on ``A``'s rows,
    the scale of adapting ``W`` itself, restricted to ``rank`` input directions.
    """

    rank = 4
    seed = 0
    # the projection on ``rank`` of ``in`` directions makes a step ~rank/in as long as adapting W itself;
    # on the base model 0.3 gained most on 5 colour-cast pairs (+1.2 dB on the support, 5 steps) but
    # diverged on a blur with 10 steps on 64 px windows (held out: 4.9 dB, from 26.9); 0.1 is stable on both
    inner_lr = 0.1

    def __init__(self, rank: int | None = None):
        self.rank = self.rank if rank is None else int(rank)

    @staticmethod
    def targets(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
        return [(name, m) for name, m in model.named_modules()
                if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]

    def initial(self, model: nn.Module, detach: bool = False) -> Params:
        gen = torch.Generator().manual_seed(self.seed)
        state = {}
        for name, conv in self.targets(model):
            w = conv.weight
            rank = min(self.rank, conv.in_channels, conv.out_channels)
            q, _ = torch.linalg.qr(torch.randn(conv.in_channels, rank, generator=gen, dtype=torch.float64))
            state[f"{name}.lora_a"] = q.T.to(w.device, w.dtype).contiguous().requires_grad_(True)
            state[f"{name}.lora_b"] = torch.zeros(conv.out_channels, rank, device=w.device,
                                                  dtype=w.dtype, requires_grad=True)
        return state

    def parameters(self, model: nn.Module, state: Params) -> Params:
        out = {}
        for name, conv in self.targets(model):
            a, b = state[f"{name}.lora_a"], state[f"{name}.lora_b"]
            out[f"{name}.weight"] = conv.weight + (b @ a).view(conv.weight.shape)
        return out

    def delta(self, model: nn.Module, state: Params) -> Params:
        return {n: p.detach().cpu() for n, p in state.items()}

    def from_delta(self, model: nn.Module, stored: Params) -> Params:
        w = next(model.parameters())
        return {n: p.to(w.device, w.dtype) for n, p in stored.items()}


def adaptable_names(model: nn.Module, kind: str | AdapterKind | None = None) -> list[str]:
    """Names of the adapted state (for subset kinds: the network's parameters the inner loop adapts)."""
    return kind_of(model, kind).names(model)
