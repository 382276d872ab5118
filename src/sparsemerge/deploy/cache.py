"""A size-bounded LRU cache: the most recently used entries whose bytes fit ``capacity``."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

from sparsemerge.errors import SparsemergeError


class LRUCache:
    """``get`` moves an entry to the front; ``put`` evicts from the back until the total
    bytes (``sizeof(value)``) fit ``capacity``. An entry larger than ``capacity`` is not kept."""

    def __init__(self, capacity: int, sizeof: Callable[[Any], int]) -> None:
        if capacity < 0:
            raise SparsemergeError(f"cache capacity must be >= 0 bytes, got {capacity}")
        self.capacity = int(capacity)
        self._sizeof = sizeof
        self._items: "OrderedDict[Hashable, tuple[Any, int]]" = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> Optional[Any]:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: Any) -> bool:
        """Insert (or refresh) ``key``; returns whether it was kept."""
        size = int(self._sizeof(value))
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]
        if size > self.capacity:
            return False
        while self.nbytes + size > self.capacity and self._items:
            _, (_, old) = self._items.popitem(last=False)
            self.nbytes -= old
            self.evictions += 1
        self._items[key] = (value, size)
        self.nbytes += size
        return True

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        return list(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0
