"""The in-memory cache of loaded objects: bounded, thread-safe, single-flight per key."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["MemoryCache"]

T = TypeVar("T")


class _Flight:
    """One running load that other threads asking for the same key wait for."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class MemoryCache:
    """A bounded, thread-safe LRU of loaded objects with single-flight loading per key.

    However many threads ask for a key at once, ``factory`` runs once and they all get
    its object (or its exception), also with ``maxsize=0`` (nothing kept afterwards).
    Several loaders may share one instance, so an identical version is loaded once.
    """

    def __init__(self, maxsize: int) -> None:
        from cachetools import LRUCache

        self.maxsize = maxsize
        self._data: LRUCache[Hashable, Any] | None = LRUCache(maxsize) if maxsize > 0 else None
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, _Flight] = {}

    def get(self, key: Hashable) -> Any | None:
        if self._data is None:
            return None
        with self._lock:
            return self._data.get(key)

    def get_or_load(self, key: Hashable, factory: Callable[[], T]) -> tuple[T, bool]:
        """``(object, loaded_now)``: the cached object for ``key``, or ``factory()`` run once."""
        with self._lock:
            if self._data is not None and key in self._data:
                return self._data[key], False
            flight = self._inflight.get(key)
            leader = flight is None
            if flight is None:
                flight = self._inflight[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value, False
        try:
            value = factory()
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.value = value
            if self._data is not None:
                with self._lock:
                    self._data[key] = value
            return value, True
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            flight.done.set()

    def discard(self, key: Hashable) -> None:
        with self._lock:
            if self._data is not None:
                self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            if self._data is not None:
                self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return 0 if self._data is None else len(self._data)
