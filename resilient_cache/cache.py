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
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from pydantic import BaseModel, Field, computed_field
from redis.exceptions import RedisError

from resilient_cache import telemetry
from resilient_cache._tasks import cancel_and_wait
from resilient_cache.circuit import BreakerBoard, BreakerState, CircuitBreaker
from resilient_cache.errors import ConfigurationError
from resilient_cache.serializers import Serializer, get_serializer

logger = logging.getLogger("resilient_cache.cache")

#: What counts as "Redis failed" (a refused breaker is a RedisError too).
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)

#: Seconds a recompute is assumed to take (XFetch's delta) for a value this process never loaded
#: and before it has timed any load of its own.
DEFAULT_DELTA = 0.1

#: Compare-and-delete: release a lock only while it still holds our fencing token.
RELEASE_SCRIPT = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
    "else return 0 end"
)

# Instrument names (observable; one series per cache name).
CACHE_HITS = "resilient_cache.cache.hits"
CACHE_MISSES = "resilient_cache.cache.misses"
CACHE_LOADS = "resilient_cache.cache.loads"
CACHE_LOAD_TIME = "resilient_cache.cache.load_time"
CACHE_STALE_SERVED = "resilient_cache.cache.stale_served"
CACHE_ERRORS = "resilient_cache.cache.errors"
CACHE_WRITEBACK_DROPPED = "resilient_cache.cache.writeback.dropped"
CACHE_ENTRIES = "resilient_cache.cache.entries"
CACHE_NAME = "resilient_cache.cache.name"
CACHE_TIER = "resilient_cache.cache.tier"
CACHE_ERROR_SOURCE = "resilient_cache.cache.error.source"


class AsyncKeyValue(Protocol):
    """What MultiLayerCache needs of its Redis side: a RedisClusterClient, a raw redis-py
    client, or a RedisCircuitBreaker. ``execute_command`` serves PTTL and EVAL (the lock)."""

    def get(self, key: Any) -> Awaitable[Any]: ...
    def set(
        self, key: Any, value: Any, *, px: int | None = None, nx: bool = False
    ) -> Awaitable[Any]: ...
    def delete(self, *keys: Any) -> Awaitable[Any]: ...
    def execute_command(self, *args: Any, **kwargs: Any) -> Awaitable[Any]: ...


class MemoryTierOptions(BaseModel):
    max_size: int = Field(default=1000, ge=1, description="Entries kept (LRU beyond).")
    default_ttl: float = Field(default=300.0, gt=0, description="Seconds an entry is served.")
    cleanup_interval: float = Field(default=60.0, gt=0, description="Seconds between sweeps.")


class RedisTierOptions(BaseModel):
    default_ttl: float = Field(default=3600, gt=0, description="Seconds a value lives in Redis.")
    key_prefix: str = Field(default="", description="Prepended to every key in Redis.")


class CacheStats(BaseModel):
    """Counters of one cache (``cache.stats``). ``load_time`` is seconds spent in loaders."""

    memory_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    loads: int = 0
    load_time: float = 0.0
    stale_served: int = 0
    refreshes: int = 0
    redis_errors: int = 0
    loader_errors: int = 0
    writeback_queued: int = 0
    writeback_written: int = 0
    writeback_dropped: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def errors(self) -> int:
        return self.redis_errors + self.loader_errors


def _options(model: type[BaseModel], given: Any, where: str) -> Any:
    if isinstance(given, model):
        return given
    try:
        return model.model_validate(given or {})
    except Exception as err:
        raise ConfigurationError(f"MultiLayerCache {where}: {err}") from None


@dataclass
class _Entry:
    value: Any
    expires: float  # served from memory until then
    fresh_until: float  # the value's own expiry (its Redis TTL): early refresh aims here
    delta: float  # seconds its last recompute took (XFetch)
    keep_until: float  # kept for stale-if-error / degraded reads until then


class _Watch:
    """Taken by a read or load of a key; a write or delete of that key meanwhile marks it, and
    the result is then returned to the caller but not stored (no resurrection)."""

    __slots__ = ("stale",)

    def __init__(self) -> None:
        self.stale = False


@dataclass
class _Pending:
    """A write-back: ``payload`` to SET until ``expires`` (clock time), or a DEL when None."""

    payload: bytes | None
    expires: float


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
        for option, value, low in (
            ("lock_ttl", lock_ttl, 0.0),
            ("lock_poll_interval", lock_poll_interval, 0.0),
            ("none_ttl", none_ttl, 0.0),
            ("writeback_interval", writeback_interval, 0.0),
        ):
            if not value > low:
                raise ConfigurationError(f"MultiLayerCache {option}: must be > 0, got {value}")
        if beta < 0 or max_stale < 0 or writeback_max < 0 or scan_count < 1:
            raise ConfigurationError(
                "MultiLayerCache: beta, max_stale and writeback_max must be >= 0 and "
                "scan_count >= 1"
            )
        self.name = name
        self._client: Any = client
        self.memory_options: MemoryTierOptions = _options(MemoryTierOptions, memory, "memory")
        self.redis_options: RedisTierOptions = _options(RedisTierOptions, redis, "redis")
        self.serializer = get_serializer(serializer)
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
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._memory: OrderedDict[str, _Entry] = OrderedDict()
        self._next_sweep = clock() + self.memory_options.cleanup_interval
        self._inflight: dict[str, asyncio.Future[Any]] = {}  # key -> its load in flight
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._watches: dict[str, set[_Watch]] = {}
        self._key_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._writeback: OrderedDict[str, _Pending] = OrderedDict()
        self._flusher: asyncio.Task[None] | None = None
        self._avg_load: float | None = None
        self._closed = False
        self.stats = CacheStats()
        _register_instruments(self, meter_provider)

    # -- keys, watches, per-key write order -----------------------------------------------

    def _redis_key(self, key: str) -> str:
        return self.redis_options.key_prefix + key

    def _watch(self, key: str) -> _Watch:
        watch = _Watch()
        self._watches.setdefault(key, set()).add(watch)
        return watch

    def _unwatch(self, key: str, watch: _Watch) -> None:
        watches = self._watches.get(key)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[key]

    def _touch(self, key: str) -> None:
        """``key`` is being written or deleted: reads and loads in flight must not store."""
        for watch in self._watches.get(key, ()):
            watch.stale = True

    @contextlib.asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        """Redis writes of one key go out in call order (asyncio.Lock is FIFO)."""
        lock, users = self._key_locks.get(key) or (asyncio.Lock(), 0)
        self._key_locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._key_locks[key]
            if users <= 1:
                del self._key_locks[key]
            else:
                self._key_locks[key] = (lock, users - 1)

    # -- memory tier ----------------------------------------------------------------------

    def _memory_entry(self, key: str) -> _Entry | None:
        """The entry of ``key`` (fresh or kept for stale reads), or None."""
        entry = self._memory.get(key)
        if entry is not None and entry.keep_until <= self._clock():
            del self._memory[key]
            return None
        return entry

    def _memory_store(
        self,
        key: str,
        value: Any,
        *,
        fresh_until: float,
        memory_ttl: float | None = None,
        delta: float | None = None,
    ) -> None:
        now = self._clock()
        expires = min(now + (memory_ttl or self.memory_options.default_ttl), fresh_until)
        self._memory[key] = _Entry(
            value,
            expires,
            fresh_until,
            self._delta() if delta is None else delta,
            max(expires, fresh_until + self.max_stale),
        )
        self._memory.move_to_end(key)
        if now >= self._next_sweep:
            self._next_sweep = now + self.memory_options.cleanup_interval
            self._sweep(now)
        if len(self._memory) > self.memory_options.max_size:
            self._sweep(now)  # the dead go first, then the least recently used
            while len(self._memory) > self.memory_options.max_size:
                self._memory.popitem(last=False)

    def _sweep(self, now: float) -> None:
        for k in [k for k, entry in self._memory.items() if entry.keep_until <= now]:
            del self._memory[k]

    def _delta(self) -> float:
        return DEFAULT_DELTA if self._avg_load is None else self._avg_load

    def _servable_stale(self, entry: _Entry | None) -> bool:
        return entry is not None and self._clock() < entry.keep_until

    def _serve_kept(self, entry: _Entry) -> Any:
        """Serve a kept entry because Redis (or the loader) failed."""
        if self._clock() >= entry.fresh_until:
            self.stats.stale_served += 1
        else:
            self.stats.memory_hits += 1
        return entry.value

    # -- Redis tier -----------------------------------------------------------------------

    def _breaker_for(self, redis_key: str) -> list[CircuitBreaker]:
        client = self._client
        board = getattr(client, "breakers", None)
        if isinstance(board, BreakerBoard):
            found = [board.breakers[s] for s in ("cluster",) if s in board.breakers]
            try:
                node = client.get_cluster().get_node_from_key(redis_key)
            except Exception:  # no slot map yet, or not a cluster
                node = None
            if node is not None and node.name in board.breakers:
                found.append(board.breakers[node.name])
            return found
        breaker = getattr(client, "breaker", None)
        return [breaker] if isinstance(breaker, CircuitBreaker) else []

    def redis_refuses(self, key: str) -> bool:
        """Whether the breaker guarding ``key`` refuses calls now (degraded mode). A breaker
        whose open period is over lets the next call through as its probe."""
        for breaker in self._breaker_for(self._redis_key(key)):
            if breaker.state is BreakerState.ISOLATED:
                return True
            if breaker.state is BreakerState.OPEN and breaker.retry_after() > 0:
                return True
        return False

    def _redis_failed(self, err: BaseException, what: str) -> None:
        self.stats.redis_errors += 1
        logger.warning(
            "cache %s: Redis %s failed (%s); serving without it",
            self.name,
            what,
            type(err).__name__,
        )

    def _decode(self, raw: Any) -> tuple[bool, Any]:
        if raw is None:
            return False, None
        if isinstance(raw, str):
            raw = raw.encode()
        try:
            return True, self.serializer.loads(raw)
        except Exception as err:
            self.stats.redis_errors += 1
            logger.warning(
                "cache %s: a value in Redis could not be decoded with %s (%s); treated as a miss",
                self.name,
                self.serializer.name,
                type(err).__name__,
            )
            return False, None

    async def _redis_read(self, key: str) -> tuple[bool, Any, float | None]:
        """(found, value, seconds to live or None). Raises REDIS_FAILURES."""
        rkey = self._redis_key(key)
        if self.early_refresh:
            raw, pttl = await asyncio.gather(
                self._client.get(rkey), self._client.execute_command("PTTL", rkey)
            )
            ttl = pttl / 1000.0 if isinstance(pttl, int) and pttl > 0 else None
        else:
            raw, ttl = await self._client.get(rkey), None
        found, value = self._decode(raw)
        return found, value, ttl

    async def _take_loaded(self, key: str) -> tuple[bool, Any]:
        """(True, value) if another loader has stored ``key`` in Redis; it is also kept in
        memory. Raises REDIS_FAILURES."""
        found, value, remaining = await self._redis_read(key)
        if not found or (value is None and not self.cache_none):
            return False, None
        self.stats.redis_hits += 1
        fresh = self._clock() + (remaining or self.memory_options.default_ttl)
        self._memory_store(key, value, fresh_until=fresh)
        return True, value

    async def _redis_write(self, key: str, pending: _Pending) -> None:
        """SET (with the remaining TTL) or DEL. Raises REDIS_FAILURES."""
        rkey = self._redis_key(key)
        if pending.payload is None:
            await self._client.delete(rkey)
            return
        ms = int((pending.expires - self._clock()) * 1000)
        if ms > 0:
            await self._client.set(rkey, pending.payload, px=ms)

    async def _write_through(self, key: str, pending: _Pending, watch: _Watch | None) -> None:
        """Write ``pending`` to Redis now, in call order for the key, or queue it for write-back.
        A load (``watch`` given) is dropped if the key was written or deleted meanwhile."""
        async with self._key_lock(key):
            if watch is not None and watch.stale:
                return
            if self.redis_refuses(key):
                self._enqueue(key, pending)
                return
            try:
                await self._redis_write(key, pending)
            except REDIS_FAILURES as err:
                self._redis_failed(err, "write")
                self._enqueue(key, pending)
            else:
                self._writeback.pop(key, None)

    # -- write-back queue -----------------------------------------------------------------

    def _enqueue(self, key: str, pending: _Pending) -> None:
        if self.writeback_max == 0:
            self.stats.writeback_dropped += 1
            return
        self._writeback.pop(key, None)
        self._writeback[key] = pending
        self.stats.writeback_queued += 1
        while len(self._writeback) > self.writeback_max:
            self._writeback.popitem(last=False)
            self.stats.writeback_dropped += 1
        if not self._closed and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_loop(), name=f"resilient_cache.cache.{self.name}.writeback"
            )

    @property
    def writeback_pending(self) -> int:
        """Writes (and deletes) waiting for Redis to answer again."""
        return len(self._writeback)

    async def flush_writeback(self) -> int:
        """Try the queued writes now, oldest first; stop at the first failure. Returns how many
        reached Redis. Expired values are dropped, not written."""
        written = 0
        for key, pending in list(self._writeback.items()):
            async with self._key_lock(key):
                if self._writeback.get(key) is not pending:
                    continue  # replaced or done by a newer write of the key
                if pending.payload is not None and pending.expires <= self._clock():
                    del self._writeback[key]
                    continue
                if self.redis_refuses(key):
                    return written
                try:
                    await self._redis_write(key, pending)
                except REDIS_FAILURES as err:
                    logger.info(
                        "cache %s: write-back still failing (%s)", self.name, type(err).__name__
                    )
                    return written
                if self._writeback.get(key) is pending:
                    del self._writeback[key]
                written += 1
                self.stats.writeback_written += 1
        return written

    async def _flush_loop(self) -> None:
        while self._writeback and not self._closed:
            await asyncio.sleep(self.writeback_interval)
            try:
                await self.flush_writeback()
            except Exception:  # never let the background task die silently
                logger.exception("cache %s: write-back failed", self.name)

    # -- public API -----------------------------------------------------------------------

    async def get(self, key: str) -> Any:
        """The value of ``key`` from memory or Redis, or ``None``. When Redis fails, the last
        known value (within ``max_stale``) or ``None``."""
        found, value = await self._lookup(key)
        return value if found else None

    async def _lookup(self, key: str) -> tuple[bool, Any]:
        entry = self._memory_entry(key)
        if entry is not None and self._clock() < entry.expires:
            self._memory.move_to_end(key)
            self.stats.memory_hits += 1
            return True, entry.value
        found, value, _failed = await self._read_through(key, entry)
        return found, value

    async def _read_through(self, key: str, entry: _Entry | None) -> tuple[bool, Any, bool]:
        """Read Redis (not memory): (found, value, Redis failed). Stores a hit in memory; on a
        failure serves ``entry`` if still kept."""
        failed = self.redis_refuses(key)
        if not failed:
            watch = self._watch(key)
            try:
                found, value, ttl = await self._redis_read(key)
            except REDIS_FAILURES as err:
                self._redis_failed(err, "read")
                failed = True
            else:
                if found and (value is not None or self.cache_none):
                    self.stats.redis_hits += 1
                    if not watch.stale:
                        now = self._clock()
                        fresh = (
                            now + ttl
                            if ttl is not None
                            else now + (self.memory_options.default_ttl)
                        )
                        delta = entry.delta if entry is not None else None
                        self._memory_store(key, value, fresh_until=fresh, delta=delta)
                    return True, value, False
                if not watch.stale:
                    self._memory.pop(key, None)  # Redis is the authority: gone is gone
            finally:
                self._unwatch(key, watch)
        if failed and entry is not None and self._servable_stale(entry):
            return True, self._serve_kept(entry), True
        self.stats.misses += 1
        return False, None, failed

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
        _check_ttls("set", ttl, memory_ttl)
        payload = self.serializer.dumps(value)
        ttl = ttl or (self.none_ttl if value is None else self.redis_options.default_ttl)
        now = self._clock()
        self._touch(key)
        self._memory_store(key, value, fresh_until=now + ttl, memory_ttl=memory_ttl)
        await self._write_through(key, _Pending(payload, now + ttl), None)

    async def delete(self, key: str) -> None:
        """Remove ``key`` from both tiers (when Redis fails, the delete is queued)."""
        self._touch(key)
        self._memory.pop(key, None)
        await self._write_through(key, _Pending(None, math.inf), None)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values found, by key (memory first, then one Redis round per slot)."""
        result: dict[str, Any] = {}
        wanted: list[str] = []
        kept: dict[str, _Entry] = {}
        now = self._clock()
        for key in dict.fromkeys(keys):
            entry = self._memory_entry(key)
            if entry is not None and now < entry.expires:
                self._memory.move_to_end(key)
                self.stats.memory_hits += 1
                result[key] = entry.value
            else:
                wanted.append(key)
                if entry is not None:
                    kept[key] = entry
        if not wanted:
            return result
        refused = [k for k in wanted if self.redis_refuses(k)]
        ask = [k for k in wanted if k not in set(refused)]
        raws: list[Any] = []
        if ask:
            watches = {k: self._watch(k) for k in ask}
            try:
                raws = await self._mget([self._redis_key(k) for k in ask])
            except REDIS_FAILURES as err:
                self._redis_failed(err, "read")
                refused.extend(ask)
                ask = []
            finally:
                for k, w in watches.items():
                    self._unwatch(k, w)
            for key, raw in zip(ask, raws, strict=True):
                found, value = self._decode(raw)
                if found and (value is not None or self.cache_none):
                    self.stats.redis_hits += 1
                    if not watches[key].stale:
                        self._memory_store(
                            key, value, fresh_until=self._clock() + self.memory_options.default_ttl
                        )
                    result[key] = value
                else:
                    self.stats.misses += 1
                    if not watches[key].stale:
                        self._memory.pop(key, None)
        for key in refused:
            entry = kept.get(key)
            if entry is not None and self._servable_stale(entry):
                result[key] = self._serve_kept(entry)
            else:
                self.stats.misses += 1
        return result

    async def _mget(self, redis_keys: list[str]) -> list[Any]:
        mget = getattr(self._client, "mget_nonatomic", None)
        if mget is not None:  # one MGET per slot (the client splits them)
            return list(await mget(redis_keys))
        return list(await asyncio.gather(*(self._client.get(k) for k in redis_keys)))

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
        for key in [k for k in self._memory if k.startswith(prefix)]:
            del self._memory[key]
        for key in [k for k in self._writeback if k.startswith(prefix)]:
            del self._writeback[key]
        for key in [k for k in self._watches if k.startswith(prefix)]:
            self._touch(key)
        pattern = _glob_escape(self._redis_key(prefix)) + "*"
        deleted = 0
        batch: list[Any] = []
        async for rkey in self._scan(pattern):
            batch.append(rkey)
            if len(batch) >= self.scan_count:
                deleted += await self._delete_batch(batch)
                batch = []
            if deleted + len(batch) >= max_keys:
                logger.warning(
                    "cache %s: invalidate_prefix stopped after %d keys (max_keys)",
                    self.name,
                    max_keys,
                )
                break
        if batch:
            deleted += await self._delete_batch(batch)
        return deleted

    async def _delete_batch(self, keys: list[Any]) -> int:
        result = await self._client.delete(*keys)
        return int(result) if isinstance(result, int) else len(keys)

    async def _scan(self, pattern: str) -> AsyncIterator[Any]:
        client = self._client
        raw = client.get_cluster() if hasattr(client, "get_cluster") else None
        raw = raw if raw is not None else getattr(client, "redis", client)
        scanner = client if hasattr(client, "scan") else raw
        primaries = raw.get_primaries() if hasattr(raw, "get_primaries") else None
        if primaries is None:  # a single server
            async for rkey in scanner.scan_iter(match=pattern, count=self.scan_count):
                yield rkey
            return
        for node in primaries:
            cursor = 0
            while True:
                reply = await scanner.scan(
                    cursor, match=pattern, count=self.scan_count, target_nodes=node
                )
                cursors, keys = reply
                for rkey in keys:
                    yield rkey
                cursor = cursors.get(node.name, 0) if isinstance(cursors, dict) else cursors
                if not cursor:
                    break

    # -- get_or_set -----------------------------------------------------------------------

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
        entry = self._memory_entry(key)
        if entry is not None and self._clock() < entry.expires:
            self._memory.move_to_end(key)
            self.stats.memory_hits += 1
            self._maybe_refresh(key, entry, loader, ttl, memory_ttl, lock)
            return entry.value
        _check_ttls("get_or_set", ttl, memory_ttl)
        while True:
            flight = self._inflight.get(key)
            if flight is None:
                break
            try:
                # Shielded: a waiter that is cancelled leaves without cancelling the load.
                return await asyncio.shield(flight)
            except _LoadAbandoned:
                # The caller running the load was cancelled, and its load with it (no task
                # per miss: the first caller loads inline). A waiter was not cancelled:
                # it takes over, or joins whoever took over first.
                entry = self._memory_entry(key)
        # This caller runs the load; the others wait on its future (single flight).
        flight = asyncio.get_running_loop().create_future()
        self._inflight[key] = flight
        try:
            value = await self._fill(key, entry, loader, ttl, memory_ttl, lock)
            flight.set_result(value)
            return value
        except asyncio.CancelledError:
            flight.set_exception(_LoadAbandoned())
            raise
        except BaseException as err:
            flight.set_exception(err)
            raise
        finally:
            flight.exception()  # retrieved: waiters re-raise it; nobody logs it unread
            del self._inflight[key]  # before any waiter resumes

    async def _fill(
        self,
        key: str,
        entry: _Entry | None,
        loader: Loader,
        ttl: float | None,
        memory_ttl: float | None,
        lock: bool | None,
    ) -> Any:
        found, value, failed = await self._read_through(key, entry)
        if found:
            fresh = self._memory.get(key)
            if fresh is not None and not failed:
                self._maybe_refresh(key, fresh, loader, ttl, memory_ttl, lock)
            return value
        if (self.lock if lock is None else lock) and not failed:
            return await self._load_locked(key, entry, loader, ttl, memory_ttl)
        return await self._load(key, entry, loader, ttl, memory_ttl, redis_failed=failed)

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
        entry: _Entry | None,
        loader: Loader,
        ttl: float | None,
        memory_ttl: float | None,
        *,
        redis_failed: bool = False,
    ) -> Any:
        watch = self._watch(key)
        try:
            try:
                value, elapsed = await self._call_loader(loader)
            except Exception as err:
                self.stats.loader_errors += 1
                if entry is not None and self._servable_stale(entry):
                    logger.warning(
                        "cache %s: loader failed (%s); serving the last known value",
                        self.name,
                        type(err).__name__,
                    )
                    return self._serve_kept(entry)
                raise
            await self._store_loaded(key, value, elapsed, ttl, memory_ttl, watch, redis_failed)
            return value
        finally:
            self._unwatch(key, watch)

    async def _store_loaded(
        self,
        key: str,
        value: Any,
        elapsed: float,
        ttl: float | None,
        memory_ttl: float | None,
        watch: _Watch,
        redis_failed: bool,
    ) -> None:
        if value is None and not self.cache_none:
            return
        if watch.stale:
            return  # written or deleted while loading: the caller gets it, the cache does not
        ttl = ttl or (self.none_ttl if value is None else self.redis_options.default_ttl)
        now = self._clock()
        self._memory_store(key, value, fresh_until=now + ttl, memory_ttl=memory_ttl, delta=elapsed)
        pending = _Pending(self.serializer.dumps(value), now + ttl)
        if redis_failed:
            async with self._key_lock(key):
                if not watch.stale:
                    self._enqueue(key, pending)
            return
        await self._write_through(key, pending, watch)

    async def _load_locked(
        self,
        key: str,
        entry: _Entry | None,
        loader: Loader,
        ttl: float | None,
        memory_ttl: float | None,
    ) -> Any:
        """Take ``key:lock`` or wait (polling) for the holder's value, up to ``lock_ttl``; then
        load without the lock. Redis failing here means loading without it."""
        lock_key = self._redis_key(key) + ":lock"
        token = secrets.token_hex(16)
        deadline = self._clock() + self.lock_ttl
        while True:
            try:
                acquired = await self._client.set(
                    lock_key, token, nx=True, px=int(self.lock_ttl * 1000)
                )
            except REDIS_FAILURES as err:
                self._redis_failed(err, "lock")
                return await self._load(key, entry, loader, ttl, memory_ttl, redis_failed=True)
            if acquired:
                try:
                    # Someone may have stored it between our miss and the lock.
                    found, value = await self._take_loaded(key)
                    if found:
                        return value
                    return await self._load(key, entry, loader, ttl, memory_ttl)
                finally:
                    await self._release(lock_key, token)
            while self._clock() < deadline:
                await self._sleep(self.lock_poll_interval)
                try:
                    found, value = await self._take_loaded(key)
                    if found:
                        return value
                    holder = await self._client.get(lock_key)
                except REDIS_FAILURES as err:
                    self._redis_failed(err, "lock wait")
                    return await self._load(key, entry, loader, ttl, memory_ttl, redis_failed=True)
                if holder is None:
                    break  # released without a value (its loader failed): try to take it
            else:
                logger.warning(
                    "cache %s: no value after waiting %.1fs for another loader; loading",
                    self.name,
                    self.lock_ttl,
                )
                return await self._load(key, entry, loader, ttl, memory_ttl)

    async def _release(self, lock_key: str, token: str) -> None:
        try:
            await self._client.execute_command("EVAL", RELEASE_SCRIPT, 1, lock_key, token)
        except REDIS_FAILURES as err:  # it expires by itself after lock_ttl
            self._redis_failed(err, "unlock")

    # -- stale-while-revalidate -----------------------------------------------------------

    def _maybe_refresh(
        self,
        key: str,
        entry: _Entry,
        loader: Loader,
        ttl: float | None,
        memory_ttl: float | None,
        lock: bool | None,
    ) -> None:
        """XFetch: refresh in the background when ``now - delta*beta*log(rand) >= expiry``."""
        if not self.early_refresh or self._closed or key in self._refreshing:
            return
        rand = 1.0 - self._rng.random()  # (0, 1]: log() is defined
        now = self._clock()
        if now - entry.delta * self.beta * math.log(rand) < entry.fresh_until:
            return
        task = asyncio.get_running_loop().create_task(
            self._refresh(key, loader, ttl, memory_ttl, lock),
            name=f"resilient_cache.cache.{self.name}.refresh",
        )
        self._refreshing[key] = task
        task.add_done_callback(lambda _t: self._refreshing.pop(key, None))

    async def _refresh(
        self,
        key: str,
        loader: Loader,
        ttl: float | None,
        memory_ttl: float | None,
        lock: bool | None,
    ) -> None:
        self.stats.refreshes += 1
        lock_key = self._redis_key(key) + ":lock"
        token = secrets.token_hex(16)
        use_lock = (self.lock if lock is None else lock) and not self.redis_refuses(key)
        try:
            if use_lock:
                try:
                    taken = await self._client.set(
                        lock_key, token, nx=True, px=int(self.lock_ttl * 1000)
                    )
                except REDIS_FAILURES:
                    taken = False
                if not taken:
                    return  # another process refreshes it (or Redis is failing)
            watch = self._watch(key)
            try:
                value, elapsed = await self._call_loader(loader)
                await self._store_loaded(
                    key, value, elapsed, ttl, memory_ttl, watch, self.redis_refuses(key)
                )
            finally:
                self._unwatch(key, watch)
        except Exception as err:
            self.stats.loader_errors += 1
            logger.warning(
                "cache %s: early refresh failed (%s); keeping the current value",
                self.name,
                type(err).__name__,
            )
        finally:
            if use_lock:
                await self._release(lock_key, token)

    # -- lifecycle ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop background refreshes and the write-back task (queued writes are dropped;
        call :meth:`flush_writeback` first to try them)."""
        self._closed = True
        tasks = [*self._refreshing.values(), *([self._flusher] if self._flusher else [])]
        # cancel_and_wait, not one cancel(): redis-py can swallow a cancellation.
        await asyncio.gather(*(cancel_and_wait(task) for task in tasks))
        self._flusher = None

    def memory_size(self) -> int:
        """Entries held by the memory tier (fresh or kept for stale reads)."""
        return len(self._memory)


def _check_ttls(method: str, ttl: float | None, memory_ttl: float | None) -> None:
    # ``None`` means the default; 0 or less is a mistake, not "the default" nor "forever".
    for name, value in (("ttl", ttl), ("memory_ttl", memory_ttl)):
        if value is not None and not value > 0:
            raise ValueError(
                f"MultiLayerCache.{method}: {name} must be > 0 seconds (or None for the "
                f"default), got {value!r}"
            )


class _LoadAbandoned(Exception):
    """Set on a load's future when the caller running it was cancelled."""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# -- OpenTelemetry ----------------------------------------------------------------------------


class _CacheObservers:
    """The observable ``resilient_cache.cache.*`` instruments of one meter (an SDK meter keeps
    only the first callbacks of an instrument name), reading every cache registered on it."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._caches: weakref.WeakSet[MultiLayerCache] = weakref.WeakSet()
        counters: list[tuple[str, str, str, Callable[[MultiLayerCache], list[Any]]]] = [
            (
                CACHE_HITS,
                "{hit}",
                "Reads answered by a tier.",
                lambda c: [
                    (c.stats.memory_hits, {CACHE_TIER: "memory"}),
                    (c.stats.redis_hits, {CACHE_TIER: "redis"}),
                ],
            ),
            (CACHE_MISSES, "{miss}", "Reads neither tier had.", lambda c: [(c.stats.misses, {})]),
            (CACHE_LOADS, "{load}", "Loader calls.", lambda c: [(c.stats.loads, {})]),
            (CACHE_LOAD_TIME, "s", "Seconds in loaders.", lambda c: [(c.stats.load_time, {})]),
            (
                CACHE_STALE_SERVED,
                "{value}",
                "Values served past their expiry because Redis or the loader failed.",
                lambda c: [(c.stats.stale_served, {})],
            ),
            (
                CACHE_ERRORS,
                "{error}",
                "Redis and loader failures.",
                lambda c: [
                    (c.stats.redis_errors, {CACHE_ERROR_SOURCE: "redis"}),
                    (c.stats.loader_errors, {CACHE_ERROR_SOURCE: "loader"}),
                ],
            ),
            (
                CACHE_WRITEBACK_DROPPED,
                "{write}",
                "Write-backs dropped because the queue was full.",
                lambda c: [(c.stats.writeback_dropped, {})],
            ),
        ]
        for name, unit, description, read in counters:
            meter.create_observable_counter(
                name, [self._callback(read)], unit=unit, description=description
            )
        meter.create_observable_gauge(
            CACHE_ENTRIES,
            [self._callback(lambda c: [(c.memory_size(), {})])],
            unit="{entry}",
            description="Entries held by the memory tier.",
        )

    def add(self, cache: MultiLayerCache) -> None:
        self._caches.add(cache)

    def _callback(
        self, read: Callable[[MultiLayerCache], list[Any]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            totals: dict[tuple[Any, ...], tuple[float, dict[str, Any]]] = {}
            for cache in list(self._caches):
                for value, attributes in read(cache):
                    attrs = {CACHE_NAME: cache.name, **attributes}
                    series = tuple(sorted(attrs.items()))
                    totals[series] = (totals.get(series, (0, attrs))[0] + value, attrs)
            return [Observation(value, attrs) for value, attrs in totals.values()]

        return callback


_CACHE_OBSERVERS: weakref.WeakKeyDictionary[Any, _CacheObservers] = weakref.WeakKeyDictionary()


def _register_instruments(cache: MultiLayerCache, provider: metrics.MeterProvider | None) -> None:
    """Report ``cache`` through the ``resilient_cache.cache.*`` instruments, once, and only when
    an SDK meter provider is passed or set globally."""
    provider = provider or metrics.get_meter_provider()
    if not telemetry.metrics_enabled(provider):
        return
    if type(provider).__name__ == "_ProxyMeterProvider":
        provider = metrics.get_meter_provider()
    meter = telemetry.get_meter(provider)
    observers = _CACHE_OBSERVERS.get(meter)
    if observers is None:
        observers = _CACHE_OBSERVERS[meter] = _CacheObservers(meter)
    observers.add(cache)
