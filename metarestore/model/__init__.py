"""The restoration network and the adapter kinds (which state the inner loop adapts)."""

from metarestore.model.kinds import KINDS, AdapterKind, adaptable_names, get_kind, kind_of
from metarestore.model.network import RestorationNet, count_parameters
from metarestore.param_groups import STAGES, param_group

__all__ = ["KINDS", "STAGES", "AdapterKind", "RestorationNet", "adaptable_names", "count_parameters", "get_kind",
           "kind_of", "param_group"]
