"""The cross-process stampede lock: one loader for a key across processes.

``SET <key>:lock <random token> NX PX <ttl>``; released by a compare-and-delete script, so a
holder whose lock already expired (and was taken by another) never deletes the other's. The
lock is advisory: the token protects only its own release, and ``ttl`` must be well above the
slowest load.

:meth:`RedisLock.load_once` is the protocol of a miss (docs/caching.md, "Across processes"):
the winner looks once more and loads; a loser polls for the winner's value, takes the lock if it
disappears without one, and loads without it once ``ttl`` has passed. Redis failing on the way
means loading without the lock (degraded mode).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from resilient_cache.cache.redis_tier import REDIS_FAILURES

# One logger for every part of the cache (the name it had as one module).
logger = logging.getLogger("resilient_cache.cache")

#: Compare-and-delete: release a lock only while it still holds our fencing token.
RELEASE_SCRIPT = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
    "else return 0 end"
)

#: Looks for a value another process stored: (found, value). Raises REDIS_FAILURES.
Find = Callable[[], Awaitable[tuple[bool, Any]]]
Load = Callable[[], Awaitable[Any]]


def lock_key(redis_key: str) -> str:
    """The lock of ``redis_key`` (in the same slot only if the key has a hash tag)."""
    return redis_key + ":lock"


def new_token() -> str:
    """A fencing token: tells our lock from the next holder's."""
    return secrets.token_hex(16)


class RedisLock:
    """Locks of the cache ``name``, held ``ttl`` seconds, waited for every ``poll_interval``.

    ``on_failure(err, what)`` reports a Redis failure the lock worked around. ``sleep`` may be
    replaced on a built instance (tests do, through ``MultiLayerCache._sleep``).
    """

    def __init__(
        self,
        name: str,
        client: Any,
        *,
        ttl: float,
        poll_interval: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        on_failure: Callable[[BaseException, str], None],
    ) -> None:
        self.name = name
        self._client = client
        self.ttl = ttl
        self.poll_interval = poll_interval
        self._clock = clock
        self.sleep = sleep
        self._on_failure = on_failure

    async def acquire(self, key: str, token: str) -> bool:
        """Take lock ``key`` with ``token`` if nobody holds it. Raises REDIS_FAILURES."""
        return bool(await self._client.set(key, token, nx=True, px=int(self.ttl * 1000)))

    async def release(self, key: str, token: str) -> None:
        """Release lock ``key`` if it still holds ``token``; never raises a Redis failure."""
        try:
            await self._client.execute_command("EVAL", RELEASE_SCRIPT, 1, key, token)
        except REDIS_FAILURES as err:  # it expires by itself after ttl
            self._on_failure(err, "unlock")

    async def load_once(self, key: str, *, find: Find, load: Load, load_degraded: Load) -> Any:
        """Take lock ``key`` and ``load()``, or wait (polling ``find()``) for the holder's value,
        up to ``ttl``; then ``load()`` without the lock. When Redis fails: ``load_degraded()``.
        """
        token = new_token()
        deadline = self._clock() + self.ttl
        while True:
            try:
                acquired = await self.acquire(key, token)
            except REDIS_FAILURES as err:
                self._on_failure(err, "lock")
                return await load_degraded()
            if acquired:
                try:
                    # Someone may have stored it between our miss and the lock.
                    found, value = await find()
                    if found:
                        return value
                    return await load()
                finally:
                    await self.release(key, token)
            while self._clock() < deadline:
                await self.sleep(self.poll_interval)
                try:
                    found, value = await find()
                    if found:
                        return value
                    holder = await self._client.get(key)
                except REDIS_FAILURES as err:
                    self._on_failure(err, "lock wait")
                    return await load_degraded()
                if holder is None:
                    break  # released without a value (its loader failed): try to take it
            else:
                logger.warning(
                    "cache %s: no value after waiting %.1fs for another loader; loading",
                    self.name,
                    self.ttl,
                )
                return await load()
