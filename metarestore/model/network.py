"""A compact NAFNet-style U-Net that restores the residual: ``output = input + net(input)``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from metarestore.model.blocks import NAFBlock, plain_eager
from metarestore.model.condition import CONDITIONS, PREFIX, DegradationCondition, FamilyCondition
from metarestore.model.kinds import kind_of

if TYPE_CHECKING:
    from metarestore.config import ModelConfig


class RestorationNet(nn.Module):
    """U-Net of NAFBlocks; accepts any H x W (pads to a multiple of 2**stages, then crops back).

    ``condition="degradation"`` adds a degradation encoder whose embedding scales and shifts every block's
    output (``metarestore.model.condition``); ``condition="family"`` a learned one per family of
    ``hint_families`` that ``forward``'s ``hint`` picks (blind without). Both start as a no-op, so the network
    computes the same.
    """

    def __init__(self, width: int = 16, enc_blocks=(1, 1, 2), middle_blocks: int = 2,
                 dec_blocks=(1, 1, 1), adapt: str = "film", channels: int = 3, condition: str = "none",
                 hint_families: tuple[str, ...] = ()):
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r} (known: {', '.join(CONDITIONS)})")
        self.adapt_mode = adapt
        self.intro = nn.Conv2d(channels, width, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        c = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle = nn.Sequential(*[NAFBlock(c) for _ in range(middle_blocks)])
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for n in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
        self.ending = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.ending.weight)  # start as the identity: the network learns the residual
        nn.init.zeros_(self.ending.bias)
        self.multiple = 2 ** len(enc_blocks)
        # registered last, so the conditioning parameters follow the network's own in ``parameters()``
        self.condition = None
        blocks = [b.film_scale.shape[1] for b in self.modules() if isinstance(b, NAFBlock)]
        if condition == "degradation":
            self.condition = DegradationCondition(blocks, channels)
        elif condition == "family":
            self.condition = FamilyCondition(blocks, hint_families)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RestorationNet:
        return cls(cfg.width, tuple(cfg.enc_blocks), cfg.middle_blocks, tuple(cfg.dec_blocks), cfg.adapt,
                   condition=cfg.condition, hint_families=tuple(cfg.hint_families))

    @property
    def hint_families(self) -> tuple[str, ...]:
        """The families a caller may name (``hint``); empty for a model that cannot be told."""
        return self.condition.families if isinstance(self.condition, FamilyCondition) else ()

    def forward(self, x: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
        """``hint``: a family-conditioned model's row per image, (N,) or one for all (``FamilyCondition.hints``);
        ``None`` is blind. Other models take no hint."""
        if hint is not None and not self.hint_families:
            raise ValueError("this model takes no degradation hint")
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.multiple, (-w) % self.multiple
        inp = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
        if _channels_last_pays(inp):
            inp = inp.contiguous(memory_format=torch.channels_last)
        modulations = None
        if isinstance(self.condition, FamilyCondition):
            modulations = iter(self.condition(x, hint))
        elif self.condition is not None:
            modulations = iter(self.condition(x))

        def run(stage: nn.Sequential, y: torch.Tensor) -> torch.Tensor:
            if modulations is None:
                return stage(y)
            for block in stage:
                y = block(y, next(modulations))
            return y

        y = _full_precision(self.intro, inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            y = run(encoder, y)
            skips.append(y)
            y = down(y)
        y = run(self.middle, y)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            y = run(decoder, up(y) + skip)
        y = _full_precision(self.ending, y) + inp
        return y[..., :h, :w].contiguous()  # the caller's usual layout


def _full_precision(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The image-facing convolutions in float32 even under autocast: a bf16 copy of the image keeps 8 bits of
    mantissa, and a global tone correction (contrast at 37 dB) needs more; both are a small share of the FLOPs."""
    if not torch.is_autocast_enabled(x.device.type):
        return conv(x)
    with torch.autocast(x.device.type, enabled=False):
        return conv(x.float())


def _channels_last_pays(x: torch.Tensor) -> bool:
    """On CPU, oneDNN's channels-last kernels and a layer norm without copies make forward + backward 1.25x
    faster (docs/benchmarks.md); vmap has no channels-last layout, an exported graph no layout at all."""
    return x.device.type == "cpu" and plain_eager()


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """``model.load_state_dict(state)``, strict, except for two ways a network may outgrow its checkpoint:

    - a conditioned model takes the weights of an unconditioned one: the conditioning parameters it lacks
      keep their (no-op) initial values;
    - a deeper model (more blocks at the end of a stage, same width) takes a shallower one's: the new blocks
      keep their initial values, which compute the identity (a NAFBlock's residual scales start at zero),
      and the conditioning's entries for them start at zero. So a run can grow mid-way
      (``--resume`` into a config with more blocks) and go on computing the same function;
    - a told model that names more families takes the weights of one that names fewer (the new ones come
      after the saved ones, as a config appends them to ``families.train``): their rows start as the blind
      row, what the model did for them untold.

    Returns the names of the parameters the state did not hold (left at their initial values)."""
    own = model.state_dict()
    new = _new_blocks(model, state)
    state = _more_rows(_grown(model, state, new), own)
    if not any(k.startswith(PREFIX) for k in state):
        new.add(PREFIX.rstrip("."))
    fresh = [k for k in own if k not in state and any(k.startswith(f"{n}.") for n in new)]
    model.load_state_dict({**{k: own[k] for k in fresh}, **state})
    return fresh


def _blocks(model: nn.Module) -> list[tuple[str, int]]:
    """(name, channels) of every NAFBlock in forward order, the order the conditioning's entries follow."""
    return [(n, m.film_scale.shape[1]) for n, m in model.named_modules() if isinstance(m, NAFBlock)]


def _new_blocks(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """The model's blocks the state has nothing of (when it holds some: it is a network's state), and the
    names of their maps in a degradation encoder."""
    names = [n for n, _ in _blocks(model)]
    held = {n for n in names if f"{n}.film_scale" in state}
    if not held:
        return set()
    return {n for n in names if n not in held} | {f"{PREFIX}modulations.{i}" for i, n in enumerate(names)
                                                 if n not in held}


def _grown(model: nn.Module, state: dict[str, torch.Tensor], new: set[str]) -> dict[str, torch.Tensor]:
    """The state with its conditioning re-laid for the model's blocks (zero entries for the new ones)."""
    if not new:
        return state
    blocks = _blocks(model)
    old = [(i, c) for i, (n, c) in enumerate(blocks) if n not in new]
    maps = f"{PREFIX}modulations."

    def renumbered(key: str) -> str:  # a degradation encoder's map of old block j is the map of block old[j]
        if not key.startswith(maps):
            return key
        j, rest = key[len(maps):].split(".", 1)
        return f"{maps}{old[int(j)][0]}.{rest}"

    state = {renumbered(k): v for k, v in state.items()}
    table = state.get(f"{PREFIX}table")
    if table is not None and table.shape[1] == 2 * sum(c for _, c in old):
        starts = [sum(c for _, c in blocks[:i]) for i in range(len(blocks))]
        width, old_width = sum(c for _, c in blocks), table.shape[1] // 2  # a row: scales, then shifts
        grown, at = table.new_zeros(table.shape[0], 2 * width), 0
        for i, c in old:
            for side in (0, 1):
                grown[:, side * width + starts[i]:side * width + starts[i] + c] = \
                    table[:, side * old_width + at:side * old_width + at + c]
            at += c
        state[f"{PREFIX}table"] = grown
    return state


def _more_rows(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with its told table grown to the model's rows, each new one a copy of the blind row."""
    key = f"{PREFIX}table"
    table, wanted = state.get(key), own.get(key)
    if table is None or wanted is None or table.shape[0] >= wanted.shape[0] or table.shape[1] != wanted.shape[1]:
        return state
    return {**state, key: torch.cat([table, table[:1].expand(wanted.shape[0] - table.shape[0], -1)])}


def count_parameters(model: nn.Module, kind: str | None = None) -> tuple[int, int]:
    """(all parameters, adapted numbers per task for ``kind``, default the model's own)."""
    return sum(p.numel() for p in model.parameters()), kind_of(model, kind).count(model)
