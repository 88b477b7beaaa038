"""``MultiLayerCache``: a memory tier in front of Redis in front of a loader, composed.

This module holds the read, write and load paths: what is served, stored and counted when.
Each mechanism they use is a part of its own, built and owned by the cache:

- ``memory.MemoryTier``: how long values are served, fresh and kept in memory (on
  ``lru.TTLLRU``);
- ``redis_tier.RedisTier``: keys, serializer, breakers, and the commands for values;
- ``watches.Watches``: a write stops reads and loads of the key in flight from storing;
- ``single_flight.SingleFlight``: one load per key in this process;
- ``lock.RedisLock``: one load per key across processes (``lock=True``);
- ``writeback.WriteBack``: writes in call order per key, queued while Redis is away;
- ``refresh.EarlyRefresh``: XFetch's refresh before expiry (``early_refresh=True``);
- ``invalidation.delete_prefix``: SCAN-based ``invalidate_prefix`` in Redis;
- ``instruments``: the OpenTelemetry instruments reading ``stats``.

Every part reads time from the cache's ``clock`` and sleeps with its ``sleep``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from opentelemetry import metrics

from resilient_cache.cache.instruments import register_instruments
from resilient_cache.cache.invalidation import delete_prefix
from resilient_cache.cache.lock import RedisLock, lock_key
from resilient_cache.cache.memory import Entry, MemoryTier
from resilient_cache.cache.options import (
    CacheStats,
    MemoryTierOptions,
    RedisTierOptions,
    check_options,
    check_ttls,
    parse_tier_options,
)
from resilient_cache.cache.redis_tier import REDIS_FAILURES, AsyncKeyValue, RedisTier
from resilient_cache.cache.refresh import DEFAULT_DELTA, EarlyRefresh
from resilient_cache.cache.single_flight import SingleFlight
from resilient_cache.cache.watches import Watch, Watches
from resilient_cache.cache.writeback import Pending, WriteBack
from resilient_cache.serializers import Serializer, get_serializer

# One logger for every part of the cache (the name it had as one module).
logger = logging.getLogger("resilient_cache.cache")

Loader = Callable[[], Any]


class MultiLayerCache:
    """``MultiLayerCache(name, client, memory={...}, redis={...}, **options)``.

    Memory entries are the objects themselves: do not mutate what you get back.
    See docs/caching.md for the options.
    """

    def __init__(
        self,
        name: str,
        client: AsyncKeyValue,
        *,
        memory: dict[str, Any] | MemoryTierOptions | None = None,
        redis: dict[str, Any] | RedisTierOptions | None = None,
        serializer: str | Serializer = "json",
        lock: bool = False,
        lock_ttl: float = 10.0,
        lock_poll_interval: float = 0.05,
        early_refresh: bool = False,
        beta: float = 1.0,
        max_stale: float = 0.0,
        cache_none: bool = False,
        none_ttl: float = 60.0,
        writeback_max: int = 1000,
        writeback_interval: float = 1.0,
        scan_count: int = 500,
        meter_provider: metrics.MeterProvider | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        check_options(
            lock_ttl=lock_ttl,
            lock_poll_interval=lock_poll_interval,
            none_ttl=none_ttl,
            writeback_interval=writeback_interval,
            beta=beta,
            max_stale=max_stale,
            writeback_max=writeback_max,
            scan_count=scan_count,
        )
        self.name = name
        self.memory_options = parse_tier_options(MemoryTierOptions, memory, "memory")
        self.redis_options = parse_tier_options(RedisTierOptions, redis, "redis")
        self.serializer = get_serializer(serializer)
        if self.serializer.name == "pickle":
            # Once per cache: each cache is its own decision to trust its key space.
            prefix = self.redis_options.key_prefix
            logger.warning(
                "cache %s: serializer 'pickle' trusts every writer of its key space (%s): "
                "anyone who can write those keys can run code in this process; "
                "see docs/caching.md, Serializers",
                name,
                f"Redis keys starting with {prefix!r}" if prefix else "no key_prefix: any key",
            )
        self.lock = lock
        self.lock_ttl = lock_ttl
        self.lock_poll_interval = lock_poll_interval
        self.early_refresh = early_refresh and beta > 0
        self.beta = beta
        self.max_stale = max_stale
        self.cache_none = cache_none
        self.none_ttl = none_ttl
        self.writeback_max = writeback_max
        self.writeback_interval = writeback_interval
        self.scan_count = scan_count
        self.stats = CacheStats()
        self._clock = clock
        self._avg_load: float | None = None  # seconds, moving average of this cache's loads
        self._memory = MemoryTier(
            self.memory_options, max_stale=max_stale, stats=self.stats, clock=clock
        )
        self._redis = RedisTier(
            name,
            client,
            key_prefix=self.redis_options.key_prefix,
            serializer=self.serializer,
            read_ttl=self.early_refresh,  # XFetch needs the expiry of values read
            stats=self.stats,
            clock=clock,
        )
        self._watches = Watches()
        self._flights = SingleFlight()
        self._lock = RedisLock(
            name,
            client,
            ttl=lock_ttl,
            poll_interval=lock_poll_interval,
            clock=clock,
            sleep=sleep,
            on_failure=self._redis.failed,
        )
        self._writeback = WriteBack(
            self._redis,
            max_size=writeback_max,
            interval=writeback_interval,
            stats=self.stats,
            clock=clock,
            sleep=sleep,
        )
        self._refresh = EarlyRefresh(
            self._redis,
            self._lock,
            enabled=self.early_refresh,
            beta=beta,
            rng=rng or random.Random(),
            clock=clock,
            stats=self.stats,
        )
        register_instruments(self, meter_provider)

    @property
    def _sleep(self) -> Callable[[float], Awaitable[None]]:
        return self._lock.sleep

    @_sleep.setter
    def _sleep(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        # The parts that wait share the cache's sleep, also when tests swap it on a built cache.
        self._lock.sleep = sleep
        self._writeback.sleep = sleep

    def _delta(self) -> float:
        """XFetch's delta for a value this process did not load: its own loads' average
        (``DEFAULT_DELTA`` before its first)."""
        return DEFAULT_DELTA if self._avg_load is None else self._avg_load

    # -- reads ------------------------------------------------------------------------------

    async def get(self, key: str) -> Any:
        """The value of ``key`` from memory or Redis, or ``None``. When Redis fails, the last
        known value (within ``max_stale``) or ``None``."""
        entry = self._memory.hit(key)
        if entry is not None:
            return entry.value
        found, value, _failed = await self._read_through(key, self._memory.entry(key))
        return value if found else None

    async def _read_through(self, key: str, entry: Entry | None) -> tuple[bool, Any, bool]:
        """Read Redis (not memory): (found, value, Redis failed). Stores a hit in memory; on a
        failure serves ``entry`` if still kept."""
        failed = self._redis.refuses(key)
        if not failed:
            watch = self._watches.watch(key)
            try:
                found, value, ttl = await self._redis.read(key)
            except REDIS_FAILURES as err:
                self._redis.failed(err, "read")
                failed = True
            else:
                if found and (value is not None or self.cache_none):
                    self.stats.redis_hits += 1
                    if not watch.stale:
                        now = self._clock()
                        fresh = now + (ttl if ttl is not None else self.memory_options.default_ttl)
                        delta = entry.delta if entry is not None else self._delta()
                        self._memory.store(key, value, fresh_until=fresh, delta=delta)
                    return True, value, False
                if not watch.stale:
                    self._memory.delete(key)  # Redis is the authority: gone is gone
            finally:
                self._watches.unwatch(key, watch)
        if failed and entry is not None and self._memory.kept(entry):
            return True, self._memory.serve_kept(entry), True
        self.stats.misses += 1
        return False, None, failed

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values found, by key (memory first, then one Redis round per slot)."""
        result: dict[str, Any] = {}
        wanted: list[str] = []
        kept: dict[str, Entry] = {}
        for key in dict.fromkeys(keys):
            entry = self._memory.hit(key)
            if entry is not None:
                result[key] = entry.value
                continue
            wanted.append(key)
            entry = self._memory.entry(key)
            if entry is not None:
                kept[key] = entry
        if not wanted:
            return result
        refused = [k for k in wanted if self._redis.refuses(k)]
        ask = [k for k in wanted if k not in set(refused)]
        raws: list[Any] = []
        if ask:
            watches = {k: self._watches.watch(k) for k in ask}
            try:
                raws = await self._redis.read_many(ask)
            except REDIS_FAILURES as err:
                self._redis.failed(err, "read")
                refused.extend(ask)
                ask = []
            finally:
                for k, w in watches.items():
                    self._watches.unwatch(k, w)
            for key, raw in zip(ask, raws, strict=True):
                found, value = self._redis.decode(raw)
                if found and (value is not None or self.cache_none):
                    self.stats.redis_hits += 1
                    if not watches[key].stale:
                        fresh = self._clock() + self.memory_options.default_ttl
                        self._memory.store(key, value, fresh_until=fresh, delta=self._delta())
                    result[key] = value
                else:
                    self.stats.misses += 1
                    if not watches[key].stale:
                        self._memory.delete(key)
        for key in refused:
            entry = kept.get(key)
            if entry is not None and self._memory.kept(entry):
                result[key] = self._memory.serve_kept(entry)
            else:
                self.stats.misses += 1
        return result

    # -- writes -----------------------------------------------------------------------------

    async def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        memory_ttl: float | None = None,
    ) -> None:
        """Store ``value`` in memory and Redis; ``ttl`` is the Redis TTL (and caps the memory
        one), ``memory_ttl`` the memory tier's. When Redis fails the write is queued."""
        check_ttls("set", ttl, memory_ttl)
        payload = self._redis.encode(value)
        ttl = ttl or (self.none_ttl if value is None else self.redis_options.default_ttl)
        now = self._clock()
        self._watches.touch(key)
        self._memory.store(
            key, value, fresh_until=now + ttl, delta=self._delta(), memory_ttl=memory_ttl
        )
        await self._writeback.write(key, Pending(payload, now + ttl))

    async def delete(self, key: str) -> None:
        """Remove ``key`` from both tiers (when Redis fails, the delete is queued)."""
        self._watches.touch(key)
        self._memory.delete(key)
        await self._writeback.write(key, Pending.delete())

    async def set_many(
        self,
        values: Mapping[str, Any],
        *,
        ttl: float | None = None,
        memory_ttl: float | None = None,
    ) -> None:
        """``set`` of every item, the Redis writes concurrently (keys may span slots)."""
        await asyncio.gather(
            *(self.set(k, v, ttl=ttl, memory_ttl=memory_ttl) for k, v in values.items())
        )

    async def invalidate_prefix(self, prefix: str, *, max_keys: int = 100_000) -> int:
        """Drop every key starting with ``prefix``: from memory at once (and from the write-back
        queue), then from Redis by SCAN on every primary (``scan_count`` keys a round) and DEL in
        batches. Stops after ``max_keys`` Redis keys (logged). Returns the Redis keys deleted.
        Raises the Redis error if Redis fails (memory is already clean then)."""
        self._memory.delete_prefix(prefix)
        self._writeback.drop_prefix(prefix)
        self._watches.touch_prefix(prefix)
        return await delete_prefix(
            self._redis.client,
            self._redis.key(prefix),
            scan_count=self.scan_count,
            max_keys=max_keys,
            cache_name=self.name,
        )

    @property
    def writeback_pending(self) -> int:
        """Writes (and deletes) waiting for Redis to answer again."""
        return len(self._writeback)

    async def flush_writeback(self) -> int:
        """Try the queued writes now, oldest first; stop at the first failure. Returns how many
        reached Redis. Expired values are dropped, not written."""
        return await self._writeback.flush()

    def redis_refuses(self, key: str) -> bool:
        """Whether the breaker guarding ``key`` refuses calls now (degraded mode). A breaker
        whose open period is over lets the next call through as its probe."""
        return self._redis.refuses(key)

    # -- get_or_set -------------------------------------------------------------------------

    async def get_or_set(
        self,
        key: str,
        loader: Loader,
        *,
        ttl: float | None = None,
        memory_ttl: float | None = None,
        lock: bool | None = None,
    ) -> Any:
        """The cached value of ``key``; on a miss ``loader()`` (sync or async), once per key in
        this process however many callers miss together (and once across processes with
        ``lock=True``); the result is stored in both tiers."""
        entry = self._memory.hit(key)
        if entry is not None:
            if self._refresh.due(key, entry.delta, entry.fresh_until):
                self._start_refresh(key, loader, ttl, memory_ttl, lock)
            return entry.value
        check_ttls("get_or_set", ttl, memory_ttl)
        return await self._flights.run(key, lambda: self._fill(key, loader, ttl, memory_ttl, lock))

    async def _fill(
        self,
        key: str,
        loader: Loader,
        ttl: float | None,
        memory_ttl: float | None,
        lock: bool | None,
    ) -> Any:
        """The load of a miss: Redis, else the loader (under the lock if asked for)."""
        # Memory is read again here, not passed on: a caller that takes over a cancelled
        # load runs this later than its own miss.
        entry = self._memory.entry(key)
        found, value, failed = await self._read_through(key, entry)
        if found:
            fresh = self._memory.entry(key)
            if (
                fresh is not None
                and not failed
                and self._refresh.due(key, fresh.delta, fresh.fresh_until)
            ):
                self._start_refresh(key, loader, ttl, memory_ttl, lock)
            return value
        if (self.lock if lock is None else lock) and not failed:
            return await self._lock.load_once(
                lock_key(self._redis.key(key)),
                find=lambda: self._take_loaded(key),
                load=lambda: self._load(key, entry, loader, ttl, memory_ttl),
                load_degraded=lambda: self._load(
                    key, entry, loader, ttl, memory_ttl, redis_failed=True
                ),
            )
        return await self._load(key, entry, loader, ttl, memory_ttl, redis_failed=failed)

    async def _take_loaded(self, key: str) -> tuple[bool, Any]:
        """(True, value) if another loader has stored ``key`` in Redis; it is also kept in
        memory. Raises REDIS_FAILURES."""
        found, value, remaining = await self._redis.read(key)
        if not found or (value is None and not self.cache_none):
            return False, None
        self.stats.redis_hits += 1
        fresh = self._clock() + (remaining or self.memory_options.default_ttl)
        self._memory.store(key, value, fresh_until=fresh, delta=self._delta())
        return True, value

    async def _call_loader(self, loader: Loader) -> tuple[Any, float]:
        started = self._clock()
        value = loader()
        if inspect.isawaitable(value):
            value = await value
        elapsed = max(0.0, self._clock() - started)
        self.stats.loads += 1
        self.stats.load_time += elapsed
        self._avg_load = elapsed if self._avg_load is None else 0.8 * self._avg_load + 0.2 * elapsed
        return value, elapsed

    async def _load(
        self,
        key: str,
        entry: Entry | None,
        loader: Loader,
        ttl: float | None,
        memory_ttl: float | None,
        *,
        redis_failed: bool = False,
    ) -> Any:
        watch = self._watches.watch(key)
        try:
            try:
                value, elapsed = await self._call_loader(loader)
            except Exception as err:
                self.stats.loader_errors += 1
                if entry is not None and self._memory.kept(entry):
                    logger.warning(
                        "cache %s: loader failed (%s); serving the last known value",
                        self.name,
                        type(err).__name__,
                    )
                    return self._memory.serve_kept(entry)
                raise
            await self._store_loaded(key, value, elapsed, ttl, memory_ttl, watch, redis_failed)
            return value
        finally:
            self._watches.unwatch(key, watch)

    async def _store_loaded(
        self,
        key: str,
        value: Any,
        elapsed: float,
        ttl: float | None,
        memory_ttl: float | None,
        watch: Watch,
        redis_failed: bool,
    ) -> None:
        if value is None and not self.cache_none:
            return
        if watch.stale:
            return  # written or deleted while loading: the caller gets it, the cache does not
        ttl = ttl or (self.none_ttl if value is None else self.redis_options.default_ttl)
        now = self._clock()
        self._memory.store(key, value, fresh_until=now + ttl, delta=elapsed, memory_ttl=memory_ttl)
        pending = Pending(self._redis.encode(value), now + ttl)
        if redis_failed:
            await self._writeback.queue(key, pending, watch)
        else:
            await self._writeback.write(key, pending, watch)

    # -- early refresh ----------------------------------------------------------------------

    def _start_refresh(
        self,
        key: str,
        loader: Loader,
        ttl: float | None,
        memory_ttl: float | None,
        lock: bool | None,
    ) -> None:
        self._refresh.start(
            key,
            lambda: self._reload(key, loader, ttl, memory_ttl),
            lock=self.lock if lock is None else lock,
        )

    async def _reload(
        self, key: str, loader: Loader, ttl: float | None, memory_ttl: float | None
    ) -> None:
        """Load ``key`` again and store it (an early refresh). Raises the loader's error."""
        watch = self._watches.watch(key)
        try:
            value, elapsed = await self._call_loader(loader)
            redis_failed = self._redis.refuses(key)
            await self._store_loaded(key, value, elapsed, ttl, memory_ttl, watch, redis_failed)
        finally:
            self._watches.unwatch(key, watch)

    # -- lifecycle --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop background refreshes and the write-back task (queued writes are dropped;
        call :meth:`flush_writeback` first to try them)."""
        # Both stop starting tasks before either waits: nothing new starts during the wait.
        self._refresh.close()
        self._writeback.close()
        await asyncio.gather(self._refresh.aclose(), self._writeback.aclose())

    def memory_size(self) -> int:
        """Entries held by the memory tier (fresh or kept for stale reads)."""
        return len(self._memory)
