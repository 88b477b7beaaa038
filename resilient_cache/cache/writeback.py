"""Writes to Redis: in call order per key, and queued for write-back while Redis is away.

Every write of the cache (a ``set``, a loaded value, a ``delete``) goes through
:meth:`WriteBack.write`: sent now unless the key's breaker refuses calls, queued when refused or
when sending fails. The queue holds one entry per key (the newest wins, so a later ``delete``
replaces an earlier ``set``), is bounded (the oldest is dropped and counted), and is replayed
oldest first by a background task every ``interval`` seconds while it is not empty, stopping at
the first failure. A value is written with the TTL it has left; one that expired meanwhile is
dropped.

Writes of one key, direct or replayed, go out one at a time in call order (:class:`KeyLocks`),
so a write-back never overtakes a newer write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.cache.options import CacheStats
from resilient_cache.cache.redis_tier import REDIS_FAILURES, RedisTier
from resilient_cache.cache.watches import Watch

# One logger for every part of the cache (the name it had as one module).
logger = logging.getLogger("resilient_cache.cache")


@dataclass
class Pending:
    """A write: ``payload`` to SET until ``expires`` (clock time), or a DEL when None."""

    payload: bytes | None
    expires: float

    @classmethod
    def delete(cls) -> Pending:
        return cls(None, math.inf)


class KeyLocks:
    """One FIFO lock per key with writes in progress (none kept for idle keys)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, users)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Redis writes of one key go out in call order (asyncio.Lock is FIFO)."""
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class WriteBack:
    """The Redis writes of one cache and its write-back queue of at most ``max_size`` entries.

    Iterating gives the queued keys, oldest first. ``sleep`` may be replaced on a built instance
    (tests do, through ``MultiLayerCache._sleep``).
    """

    def __init__(
        self,
        redis: RedisTier,
        *,
        max_size: int,
        interval: float,
        stats: CacheStats,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._redis = redis
        self.max_size = max_size
        self.interval = interval
        self._stats = stats
        self._clock = clock
        self.sleep = sleep
        self._queue: OrderedDict[str, Pending] = OrderedDict()  # oldest first
        self._locks = KeyLocks()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[str]:
        return iter(self._queue)

    async def write(self, key: str, pending: Pending, watch: Watch | None = None) -> None:
        """Write ``pending`` to Redis now, in call order for the key, or queue it. A load's
        write (``watch`` given) is dropped if the key was written or deleted meanwhile."""
        async with self._locks.hold(key):
            if watch is not None and watch.stale:
                return
            if self._redis.refuses(key):
                self._enqueue(key, pending)
                return
            try:
                await self._redis.write(key, pending.payload, pending.expires)
            except REDIS_FAILURES as err:
                self._redis.failed(err, "write")
                self._enqueue(key, pending)
            else:
                self._queue.pop(key, None)  # an older queued write of the key is superseded

    async def queue(self, key: str, pending: Pending, watch: Watch) -> None:
        """Queue a load's write without trying Redis (it just failed), in call order for the
        key; dropped if the key was written or deleted meanwhile."""
        async with self._locks.hold(key):
            if not watch.stale:
                self._enqueue(key, pending)

    def drop_prefix(self, prefix: str) -> None:
        """Forget the queued writes of every key starting with ``prefix``."""
        for key in [k for k in self._queue if k.startswith(prefix)]:
            del self._queue[key]

    def _enqueue(self, key: str, pending: Pending) -> None:
        if self.max_size == 0:
            self._stats.writeback_dropped += 1
            return
        self._queue.pop(key, None)  # re-queued as the newest
        self._queue[key] = pending
        self._stats.writeback_queued += 1
        while len(self._queue) > self.max_size:
            self._queue.popitem(last=False)
            self._stats.writeback_dropped += 1
        if not self._closed and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_loop(), name=f"resilient_cache.cache.{self._redis.name}.writeback"
            )

    async def flush(self) -> int:
        """Try the queued writes now, oldest first; stop at the first failure. Returns how many
        reached Redis. Expired values are dropped, not written."""
        written = 0
        for key, pending in list(self._queue.items()):
            async with self._locks.hold(key):
                if self._queue.get(key) is not pending:
                    continue  # replaced or done by a newer write of the key
                if pending.payload is not None and pending.expires <= self._clock():
                    del self._queue[key]
                    continue
                if self._redis.refuses(key):
                    return written
                try:
                    await self._redis.write(key, pending.payload, pending.expires)
                except REDIS_FAILURES as err:
                    logger.info(
                        "cache %s: write-back still failing (%s)",
                        self._redis.name,
                        type(err).__name__,
                    )
                    return written
                if self._queue.get(key) is pending:
                    del self._queue[key]
                written += 1
                self._stats.writeback_written += 1
        return written

    async def _flush_loop(self) -> None:
        while self._queue and not self._closed:
            await self.sleep(self.interval)
            try:
                await self.flush()
            except Exception:  # never let the background task die silently
                logger.exception("cache %s: write-back failed", self._redis.name)

    def close(self) -> None:
        """Start no more background task (what is queued stays queued)."""
        self._closed = True

    async def aclose(self) -> None:
        """:meth:`close`, and stop the background task."""
        self.close()
        # cancel_and_wait, not one cancel(): redis-py can swallow a cancellation.
        await cancel_and_wait(self._flusher)
        self._flusher = None
