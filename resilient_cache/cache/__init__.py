"""``MultiLayerCache``: a memory tier in front of Redis, with stampede protection and degraded mode.

Reads look in memory, then Redis, then call the loader; a value loaded is written to both tiers.

- Single flight: concurrent misses of one key in this process share one loader call; with
  ``lock=True`` processes also agree on one loader through a Redis lock (``SET key:lock NX PX``
  with a random fencing token, released by a compare-and-delete script).
- Stale-while-revalidate: a hit close to the value's expiry refreshes it early in the
  background (XFetch: when ``now - delta * beta * log(rand()) >= expiry``), one refresh per key.
- Stale-if-error: when Redis or the loader fails, the last known value is served up to
  ``max_stale`` seconds past its expiry.
- Degraded mode: while the breaker of the key's node is open (or Redis errors) nothing waits for
  Redis; writes that could not reach Redis go to a bounded write-back queue, replayed once Redis
  answers again.

docs/caching.md describes every option. Pure logic on an injected clock, like the breakers.

The modules, one job each (``multilayer`` composes the others):

- ``multilayer``: ``MultiLayerCache``, the read, write and load paths;
- ``options``: tier options, ``CacheStats``, option and TTL checks;
- ``memory``: the memory tier's entries and their lifetimes, on
  ``resilient_cache.ttl_lru.TTLLRU`` (the memory stage's store too);
- ``redis_tier``: keys, serializer, breakers and commands of the Redis tier;
- ``watches``: a write stops reads and loads of the key in flight from storing;
- ``single_flight``: one load per key in this process;
- ``lock``: one load per key across processes;
- ``writeback``: writes in call order per key, and the write-back queue;
- ``refresh``: XFetch's early refresh;
- ``invalidation``: SCAN-based prefix invalidation in Redis;
- ``instruments``: instrument names and the observers reporting caches.

Everything importable from ``resilient_cache.cache`` before it became a package still is.
"""

from resilient_cache.cache.instruments import (
    CACHE_ENTRIES,
    CACHE_ERROR_SOURCE,
    CACHE_ERRORS,
    CACHE_HITS,
    CACHE_LOAD_TIME,
    CACHE_LOADS,
    CACHE_MISSES,
    CACHE_NAME,
    CACHE_OBSERVERS,
    CACHE_STALE_SERVED,
    CACHE_TIER,
    CACHE_WRITEBACK_DROPPED,
)
from resilient_cache.cache.lock import RELEASE_SCRIPT
from resilient_cache.cache.multilayer import Loader, MultiLayerCache
from resilient_cache.cache.options import CacheStats, MemoryTierOptions, RedisTierOptions
from resilient_cache.cache.redis_tier import REDIS_FAILURES, AsyncKeyValue
from resilient_cache.cache.refresh import DEFAULT_DELTA

#: The observers of each meter, under the name they had in the single module (tests read it).
_CACHE_OBSERVERS = CACHE_OBSERVERS

__all__ = [
    "CACHE_ENTRIES",
    "CACHE_ERRORS",
    "CACHE_ERROR_SOURCE",
    "CACHE_HITS",
    "CACHE_LOADS",
    "CACHE_LOAD_TIME",
    "CACHE_MISSES",
    "CACHE_NAME",
    "CACHE_STALE_SERVED",
    "CACHE_TIER",
    "CACHE_WRITEBACK_DROPPED",
    "DEFAULT_DELTA",
    "REDIS_FAILURES",
    "RELEASE_SCRIPT",
    "AsyncKeyValue",
    "CacheStats",
    "Loader",
    "MemoryTierOptions",
    "MultiLayerCache",
    "RedisTierOptions",
]
