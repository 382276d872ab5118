"""One small registry used by every pluggable family (pruning methods, merge methods,
formats, kernels). Registration happens one way only: the `register` decorator."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from sparsemerge.errors import SparsemergeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def decorator(obj: T) -> T:
            if key in self._items and self._items[key] is not obj:
                raise RuntimeError(f"{self.family} {name!r} is registered twice")
            self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name.lower()]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise SparsemergeError(
                f"unknown {self.family} {name!r}; known {self.family}s: {known}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
