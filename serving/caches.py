"""The service's in-memory caches: cachetools' LRU with thread safety and, for forecasts, one computation per key.

Forecasts take seconds to compute, so concurrent misses on one key wait for the first computation instead of
repeating it. Response bodies are cheap to rebuild from a cached forecast, so two threads may both make one; the
body cache is bounded by bytes (``getsizeof=len``), not by entries, because a city-wide GeoJSON is megabytes and a
top-20 JSON a few kilobytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cachetools import LRUCache

V = TypeVar("V")


class ComputeOnceCache(Generic[V]):
    """Thread-safe LRU of ``size`` entries; concurrent misses on a key wait for the first computation."""

    def __init__(self, size: int):
        self._data: LRUCache[Hashable, V] = LRUCache(maxsize=size)
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, threading.Lock] = {}

    @property
    def size(self) -> int:
        return int(self._data.maxsize)

    def __len__(self) -> int:
        return len(self._data)

    def peek(self, key: Hashable) -> V | None:
        """The value when it is already computed (no work, never waits: safe on the event loop), else None."""
        with self._lock:
            return self._data.get(key)  # a read moves the key to the recent end

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, bool]:
        """(value, hit)."""
        with self._lock:
            if key in self._data:
                return self._data[key], True  # a read moves the key to the recent end
            gate = self._inflight.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._data:
                    return self._data[key], True
            try:
                value = compute()
                with self._lock:
                    self._data[key] = value
            finally:
                with self._lock:
                    self._inflight.pop(key, None)
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class BodyCache:
    """Thread-safe LRU of response bodies bounded by their total size in bytes; bodies larger than
    ``max_item_bytes`` are served but not kept (one would evict many small ones)."""

    def __init__(self, max_bytes: int, max_item_bytes: int):
        self.max_bytes, self.max_item_bytes = max_bytes, max_item_bytes
        self._data: LRUCache[Hashable, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._lock = threading.Lock()

    @property
    def current_bytes(self) -> int:
        return int(self._data.currsize)

    def peek(self, key: Hashable) -> bytes | None:
        with self._lock:
            return self._data.get(key)

    def get_or_make(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        found = self.peek(key)
        if found is not None:
            return found
        body = make()  # two threads may both make it: the bodies are identical
        if len(body) <= self.max_item_bytes:
            with self._lock:
                self._data.setdefault(key, body)
        return body
