"""The registered operators, and what the paths derive from them. Importing an operator's module
registers it (``@register_operator`` on its class); a new operator is one more import line here.
The order of these lines is the order operators are fitted and their pre-steps listed."""

from __future__ import annotations

# ruff: noqa: I001  (the import order below is the operators' order)

import metarestore.operators.kernel  # noqa: F401  deconv, hqs, wiener, rl
import metarestore.operators.tone  # noqa: F401  tone
import metarestore.operators.haze  # noqa: F401  haze
import metarestore.operators.codec  # noqa: F401  jpeg
import metarestore.operators.noise  # noqa: F401  noise
from metarestore.operators.base import OPERATORS, Operator
from metarestore.registry import Registry

# pre-step -> the operator it undoes, for every registered operator ("none" undoes nothing)
BY_PRE_STEP: Registry[type[Operator]] = Registry("pre-step", ((p, op) for op in OPERATORS.values()
                                                               for p in op.pre_steps))
PRE_STEPS: tuple[str, ...] = ("none", *BY_PRE_STEP)
CLASSICAL: frozenset[str] = frozenset(p for op in OPERATORS.values() for p in op.classical)  # no restorer after
REFINES: dict[str, str] = {p: base for op in OPERATORS.values() for p, base in op.refines.items()}


def operator_of(pre: str) -> type[Operator] | None:
    """The operator pre-step ``pre`` undoes (None for ``none``)."""
    return BY_PRE_STEP.get(pre)
