"""One small registry used by every pluggable family (pruning methods, merge methods,
formats, kernels). Registration happens one way only: the `register` decorator.

A registry made with ``discover="package"`` imports every module of that package the first
time it is looked up (``get``, ``names``, ``in``, iteration), so a new member is one module
that registers itself: no import list to extend."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, Optional, TypeVar

from sparsemerge.errors import SparsemergeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str, discover: Optional[str] = None) -> None:
        self.family = family
        self._items: dict[str, T] = {}
        self._discover = discover

    def _load(self) -> None:
        """Import every module of the ``discover`` package once (each registers its members)."""
        if self._discover is None:
            return
        package_name, self._discover = self._discover, None  # first: the imports below look us up again
        import importlib
        import pkgutil

        try:
            package = importlib.import_module(package_name)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{package_name}.{info.name}")
        except BaseException:
            self._discover = package_name  # a broken module fails every lookup, not just the first
            raise

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
