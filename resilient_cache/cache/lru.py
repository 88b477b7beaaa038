"""An in-process LRU whose entries also die at a set time: the memory tier's store.

It holds no cache policy: the caller says when each entry dies and, if it wants a byte bound,
how big it is. That keeps it usable by any in-process tier (``MultiLayerCache`` today; the
memory stage's store has the same shape).

- Reads (:meth:`get`) drop a dead entry and do not change recency; a caller that serves an
  entry says so with :meth:`touch` (a read that only looks, e.g. for a stale fallback, does not
  make the entry young).
- Writes (:meth:`set`) sweep out dead entries every ``cleanup_interval`` seconds, and before
  evicting for room: the dead go first, then the least recently used.
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

    def __len__(self) -> int:
        """Entries held, dead ones not yet swept included."""
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first. Do not add or delete while iterating."""
        return iter(self._items)

    def get(self, key: K) -> V | None:
        """The live value of ``key``, or None. Recency is left alone (see :meth:`touch`)."""
        item = self._items.get(key)
        if item is None:
            return None
        if item.dies_at <= self._clock():
            self._drop(key)
            return None
        return item.value

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
                _key, item = self._items.popitem(last=False)
                self.bytes -= item.size
                self.evictions += 1

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

    def _drop(self, key: K) -> None:
        self.bytes -= self._items.pop(key).size

    def _over(self) -> bool:
        return len(self._items) > self.max_size or self.bytes > self.max_bytes
