"""One small registry used by every pluggable family (pruning methods, merge methods,
formats, kernels). Registration happens one way only: the `register` decorator.

A registry made with ``discover="package"`` imports every module of that package the first
time it is looked up (``get``, ``names``, ``in``, iteration), so a new member is one module
that registers itself: no import list to extend."""
from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Callable, Generic, Iterator, Optional, TypeVar

from sparsemerge.errors import SparsemergeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str, discover: Optional[str] = None) -> None:
        self.family = family
        self._items: dict[str, T] = {}
        self._discover = discover
        self._discovered = discover is None
        self._loading = False
        self._lock = threading.RLock()  # re-entrant: the importing thread looks us up again

    def _load(self) -> None:
        """Import every module of the ``discover`` package once (each registers its members);
        other threads wait until that is done instead of seeing a partial registry."""
        if self._discovered:
            return
        with self._lock:
            if self._discovered or self._loading:  # done, or a lookup made by the imports below
                return
            self._loading = True
            try:
                package = importlib.import_module(str(self._discover))
                for info in pkgutil.iter_modules(package.__path__):
                    importlib.import_module(f"{self._discover}.{info.name}")
                self._discovered = True
            finally:  # a broken module fails every lookup, not just the first
                self._loading = False

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def decorator(obj: T) -> T:
            if key in self._items and self._items[key] is not obj:
                raise RuntimeError(f"{self.family} {name!r} is registered twice")
            self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name.lower()]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise SparsemergeError(
                f"unknown {self.family} {name!r}; known {self.family}s: {known}"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
