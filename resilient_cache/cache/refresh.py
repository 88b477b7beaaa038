"""Stale-while-revalidate: XFetch's early refresh of a value nearing its expiry.

Every hit asks :meth:`EarlyRefresh.due`: ``now - delta * beta * log(rand()) >= expiry``, with
``expiry`` the value's own (Redis) expiry and ``delta`` how long its last load took. The closer
the expiry and the slower the load, the likelier a refresh; ``beta`` > 1 refreshes earlier.
A refresh runs in the background, one per key at a time, while callers keep getting the current
value; with the lock, one across processes (a process that cannot take the lock skips it). A
failed refresh keeps the current value.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.cache.lock import RedisLock, lock_key, new_token
from resilient_cache.cache.options import CacheStats
from resilient_cache.cache.redis_tier import REDIS_FAILURES, RedisTier

# One logger for every part of the cache (the name it had as one module).
logger = logging.getLogger("resilient_cache.cache")

#: Seconds a recompute is assumed to take (XFetch's delta) for a value this process never loaded
#: and before it has timed any load of its own.
DEFAULT_DELTA = 0.1


class EarlyRefresh:
    """The early refreshes of one cache. Off when ``enabled`` is false (nothing is ever due)."""

    def __init__(
        self,
        redis: RedisTier,
        lock: RedisLock,
        *,
        enabled: bool,
        beta: float,
        rng: random.Random,
        clock: Callable[[], float],
        stats: CacheStats,
    ) -> None:
        self._redis = redis
        self._lock = lock
        self.enabled = enabled
        self.beta = beta
        self._rng = rng
        self._clock = clock
        self._stats = stats
        self._running: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def due(self, key: str, delta: float, fresh_until: float) -> bool:
        """Whether to refresh ``key`` now: XFetch says so and no refresh of it is running.

        ``delta``: seconds its last load took; ``fresh_until``: its expiry, on the clock.
        """
        # Cheap checks first: the random draw is made only for a refresh that could start.
        if not self.enabled or self._closed or key in self._running:
            return False
        rand = 1.0 - self._rng.random()  # (0, 1]: log() is defined
        return self._clock() - delta * self.beta * math.log(rand) >= fresh_until

    def start(self, key: str, reload: Callable[[], Awaitable[None]], *, lock: bool) -> None:
        """Run ``reload()`` (load and store ``key``) in the background; with ``lock``, only if
        this process takes the key's lock."""
        task = asyncio.get_running_loop().create_task(
            self._refresh(key, reload, lock),
            name=f"resilient_cache.cache.{self._redis.name}.refresh",
        )
        self._running[key] = task
        task.add_done_callback(lambda _t: self._running.pop(key, None))

    async def _refresh(self, key: str, reload: Callable[[], Awaitable[None]], lock: bool) -> None:
        self._stats.refreshes += 1
        key_of_lock = lock_key(self._redis.key(key))
        token = new_token()
        use_lock = lock and not self._redis.refuses(key)
        try:
            if use_lock:
                try:
                    taken = await self._lock.acquire(key_of_lock, token)
                except REDIS_FAILURES:
                    taken = False
                if not taken:
                    return  # another process refreshes it (or Redis is failing)
            await reload()
        except Exception as err:
            self._stats.loader_errors += 1
            logger.warning(
                "cache %s: early refresh failed (%s); keeping the current value",
                self._redis.name,
                type(err).__name__,
            )
        finally:
            if use_lock:
                # Also when not known to be taken: a SET that failed may have set it anyway,
                # and compare-and-delete leaves another holder's lock alone.
                await self._lock.release(key_of_lock, token)

    def close(self) -> None:
        """Start no more refreshes."""
        self._closed = True

    async def aclose(self) -> None:
        """:meth:`close`, and stop the refreshes running."""
        self.close()
        # cancel_and_wait, not one cancel(): redis-py can swallow a cancellation.
        await asyncio.gather(*(cancel_and_wait(task) for task in list(self._running.values())))
