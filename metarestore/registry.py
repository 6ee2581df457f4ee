"""Named registries (the BasicSR shape): one type, ``Registry``, for every table of names in the project
(algorithms, adapter kinds, operators, degradation families, losses, evaluation baselines and protocols).
A registry is the one source of the names a config, a path or a command line may use, so validation and
``--help`` read it instead of a list kept beside it. A leaf module."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A table from name to entry (a dict: ``name in R``, ``R[name]``, ``list(R)`` in registration order).

    ``what`` names the entries in errors: an unknown name raises ``error`` (``KeyError`` unless said) with
    one line that lists the known ones; a name registered twice is a ``ValueError`` (two modules claiming
    one name is a bug, not an override).
    """

    def __init__(self, what: str, entries: Mapping[str, T] | Iterable[tuple[str, T]] = (), *,
                 error: type[Exception] = KeyError):
        super().__init__()
        self.what, self.error = what, error
        for name, entry in (entries.items() if isinstance(entries, Mapping) else entries):
            self.add(name, entry)

    def add(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """``@R.register("name")`` on a class (which gets ``name`` as its ``name``) or a function."""
        def add(entry: T) -> T:
            if isinstance(entry, type):
                entry.name = name
            return self.add(name, entry)
        return add

    def __missing__(self, name: str) -> T:
        raise self.error(f"unknown {self.what} {name!r}; known: {', '.join(self)}")
