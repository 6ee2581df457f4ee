"""Degradation registry: ``get(name)`` returns a family; ``names()`` lists them."""

from metarestore.degradations import families as _families  # noqa: F401  (registers the families)
from metarestore.degradations.base import Degradation, Params, ParamSpec
from metarestore.degradations.registry import (
    Chain,
    UnknownFamilyError,
    get,
    image_families,
    names,
    not_an_image_family,
    register,
    validate,
)

__all__ = ["Chain", "Degradation", "ParamSpec", "Params", "UnknownFamilyError", "get", "image_families", "names",
           "not_an_image_family", "register", "validate"]
