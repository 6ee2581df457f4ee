"""Named registries (the BasicSR shape): a table from name to class, filled by a decorator, is the one
source of the names a config may use (algorithms, adapter kinds). A leaf module."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, T]) -> Callable[[str], Callable[[T], T]]:
    """``register = registrar(TABLE)``; then ``@register("name")`` on a class sets its ``name`` and adds it."""
    def register(name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            cls.name = name
            table[name] = cls
            return cls
        return add
    return register
