"""An in-process LRU whose entries also die at a set time: the store of both in-process tiers.

It holds no cache policy: the caller says when each entry dies and, if it wants a byte bound,
how big it is. The memory stage (``stages/memory.py``) and ``MultiLayerCache``'s memory tier
(``cache/memory.py``) both keep their entries in one.

- Reads (:meth:`get`) drop a dead entry and do not change recency; a caller that serves an
  entry says so with :meth:`touch` (a read that only looks, e.g. for a stale fallback, does not
  make the entry young).
- :meth:`hit` is the serving read in one call: the live value, made the most recently used.
- Writes (:meth:`set`) sweep out dead entries every ``cleanup_interval`` seconds, and before
  evicting for room: the dead go first, then the least recently used.
- ``on_drop(key, value)``, if given, hears of every entry the LRU drops by itself (dead, or
  evicted for room), so that a caller keeping an index of its own can follow; not of those
  the caller removes (:meth:`delete`, :meth:`clear`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class _Item(Generic[V]):
    value: V
    dies_at: float  # on the LRU's clock
    size: int  # estimated bytes, 0 when the LRU is not bounded in bytes


class TTLLRU(Generic[K, V]):
    """At most ``max_size`` entries (and ``max_bytes`` estimated bytes, if given), each dead
    from its own ``dies_at`` on. ``evictions`` counts live entries dropped for room."""

    def __init__(
        self,
        max_size: int,
        *,
        cleanup_interval: float,
        clock: Callable[[], float],
        max_bytes: float = math.inf,
        on_drop: Callable[[K, V], None] | None = None,
    ) -> None:
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.cleanup_interval = cleanup_interval
        self._clock = clock
        self._items: OrderedDict[K, _Item[V]] = OrderedDict()  # least recently used first
        self._next_sweep = clock() + cleanup_interval
        #: Estimated bytes held (the sum of the sizes given to :meth:`set`).
        self.bytes = 0
        self.evictions = 0
        self._on_drop = on_drop

    def __len__(self) -> int:
        """Entries held, dead ones not yet swept included."""
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first. Do not add or delete while iterating."""
        return iter(self._items)

    def get(self, key: K) -> V | None:
        """The live value of ``key``, or None. Recency is left alone (see :meth:`touch`)."""
        item = self._live(key)
        return None if item is None else item.value

    def hit(self, key: K) -> V | None:
        """The live value of ``key``, now the most recently used; None if absent or dead."""
        item = self._live(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item.value

    def _live(self, key: K) -> _Item[V] | None:
        """``key``'s item if it is alive; a dead one is dropped on the way."""
        item = self._items.get(key)
        if item is not None and item.dies_at <= self._clock():
            self._drop(key)
            return None
        return item

    def dies_at(self, key: K) -> float | None:
        """When ``key``'s entry dies (on the LRU's clock), or None if it is not held."""
        item = self._items.get(key)
        return None if item is None else item.dies_at

    def touch(self, key: K) -> None:
        """``key`` (held) was just used: it is evicted last."""
        self._items.move_to_end(key)

    def set(self, key: K, value: V, dies_at: float, size: int = 0) -> None:
        """Store ``value`` as the most recently used entry, until ``dies_at``."""
        now = self._clock()
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._items[key] = _Item(value, dies_at, size)
        self.bytes += size
        if now >= self._next_sweep:
            self._next_sweep = now + self.cleanup_interval
            self.sweep(now)
        if self._over():
            self.sweep(now)  # the dead make room before any live entry does
            while self._over():
                evicted, item = self._items.popitem(last=False)
                self.bytes -= item.size
                self.evictions += 1
                if self._on_drop is not None:
                    self._on_drop(evicted, item.value)

    def delete(self, key: K) -> bool:
        """Drop ``key``; whether it was held."""
        item = self._items.pop(key, None)
        if item is None:
            return False
        self.bytes -= item.size
        return True

    def sweep(self, now: float | None = None) -> int:
        """Drop every dead entry; how many went."""
        if now is None:
            now = self._clock()
        dead = [key for key, item in self._items.items() if item.dies_at <= now]
        for key in dead:
            self._drop(key)
        return len(dead)

    def clear(self) -> None:
        """Drop everything (``on_drop`` is not called)."""
        self._items.clear()
        self.bytes = 0

    def _drop(self, key: K) -> None:
        item = self._items.pop(key)
        self.bytes -= item.size
        if self._on_drop is not None:
            self._on_drop(key, item.value)

    def _over(self) -> bool:
        return len(self._items) > self.max_size or self.bytes > self.max_bytes
