"""The restoration network and which of its parameters the inner loop adapts."""

from metarestore.model.network import (
    STAGES,
    RestorationNet,
    adaptable_names,
    count_parameters,
    is_adaptable,
    param_group,
)

__all__ = ["STAGES", "RestorationNet", "adaptable_names", "count_parameters", "is_adaptable", "param_group"]
