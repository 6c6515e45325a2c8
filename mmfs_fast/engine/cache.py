"""The Engine's style caches: w+ per text prompt and per caller-given reference-image key."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch


class LRUCache:
    """A bounded, thread-safe least-recently-used map with hit/miss counts."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.hits = self.misses = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        return {"size": len(self), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}


def cached_styles(cache: LRUCache, keys: Sequence[Hashable], items: Sequence, compute: Callable) -> torch.Tensor:
    """The w+ of each item: cached ones looked up by their key, the others computed in one
    batch (``compute(list of items)``) and cached."""
    found = {key: w for key in dict.fromkeys(keys) if (w := cache.get(key)) is not None}
    todo = {key: item for key, item in zip(keys, items) if key not in found}
    if todo:
        for key, w in zip(todo, compute(list(todo.values()))):
            found[key] = w
            cache.put(key, w)
    return torch.stack([found[key] for key in keys])
