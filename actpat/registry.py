"""One generic name -> entry registry behind datasets, objectives, adapters, allocators, pruners,
zero-shot tasks and report sections.

A registry refuses a second entry under a taken name (a silent overwrite would change results
without a word) and answers an unknown name with a ``UserError`` that lists what exists.
It reads like a dict: ``name in R``, ``R[name]``, ``sorted(R)``, ``len(R)``, ``R.items()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one ``kind`` ("allocation", "pruner", ...) by name, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a taken name is refused (ValueError)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered; choose another name")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``: ``@REGISTRY.register("name")``."""
        def deco(entry: T) -> T:
            return self.add(name, entry)
        return deco

    def remove(self, name: str) -> T:
        """Take an entry out again (tests that register a temporary one)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry, or ``UserError("unknown <kind> 'name'; available: a, b")``."""
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} '{name}'; available: {', '.join(self._entries)}")
        return self._entries[name]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
