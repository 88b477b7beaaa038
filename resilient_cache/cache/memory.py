"""The memory tier of ``MultiLayerCache``: how long each value is served, fresh, and kept.

An entry has three times (docs/caching.md, "Stale-if-error"):

- ``expires``: served from memory until then (the memory TTL, capped by the value's expiry);
- ``fresh_until``: the value's own expiry, its Redis TTL (early refresh aims here);
- ``keep_until``: kept past both, up to ``max_stale`` after the value's expiry, for serving
  when Redis or the loader fails; the entry is dead (gone from the LRU) after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from resilient_cache.cache.options import CacheStats, MemoryTierOptions
from resilient_cache.ttl_lru import TTLLRU


@dataclass
class Entry:
    """A value in the memory tier."""

    value: Any
    expires: float  # served from memory until then
    fresh_until: float  # the value's own expiry (its Redis TTL): early refresh aims here
    delta: float  # seconds its last recompute took (XFetch)
    keep_until: float  # kept for stale-if-error / degraded reads until then


class MemoryTier:
    """The entries of one cache, in a :class:`~resilient_cache.ttl_lru.TTLLRU`."""

    def __init__(
        self,
        options: MemoryTierOptions,
        *,
        max_stale: float,
        stats: CacheStats,
        clock: Callable[[], float],
    ) -> None:
        self.default_ttl = options.default_ttl
        self.max_stale = max_stale
        self._stats = stats
        self._clock = clock
        self._lru: TTLLRU[str, Entry] = TTLLRU(
            options.max_size, cleanup_interval=options.cleanup_interval, clock=clock
        )

    def __len__(self) -> int:
        """Entries held (fresh or kept for stale reads)."""
        return len(self._lru)

    def hit(self, key: str) -> Entry | None:
        """The entry of ``key`` if memory serves it now (counted as a memory hit), else None."""
        entry = self._lru.get(key)
        if entry is not None and self._clock() < entry.expires:
            self._lru.touch(key)
            self._stats.memory_hits += 1
            return entry
        return None

    def entry(self, key: str) -> Entry | None:
        """The entry of ``key``, fresh or kept for stale reads, or None; nothing counted."""
        return self._lru.get(key)

    def store(
        self,
        key: str,
        value: Any,
        *,
        fresh_until: float,
        delta: float,
        memory_ttl: float | None = None,
    ) -> None:
        """Keep ``value``, whose own expiry is ``fresh_until``, for ``memory_ttl`` (or the
        default) at most; ``delta``: seconds its last recompute took."""
        expires = min(self._clock() + (memory_ttl or self.default_ttl), fresh_until)
        keep_until = max(expires, fresh_until + self.max_stale)
        self._lru.set(key, Entry(value, expires, fresh_until, delta, keep_until), keep_until)

    def delete(self, key: str) -> None:
        self._lru.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        for key in [k for k in self._lru if k.startswith(prefix)]:
            self._lru.delete(key)

    def kept(self, entry: Entry | None) -> bool:
        """Whether ``entry`` may still be served when Redis or the loader fails."""
        return entry is not None and self._clock() < entry.keep_until

    def serve_kept(self, entry: Entry) -> Any:
        """Serve a kept entry because Redis (or the loader) failed: a memory hit before the
        value's expiry, a stale value after it."""
        if self._clock() >= entry.fresh_until:
            self._stats.stale_served += 1
        else:
            self._stats.memory_hits += 1
        return entry.value
