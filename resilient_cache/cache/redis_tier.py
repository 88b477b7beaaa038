"""The Redis side of ``MultiLayerCache``: key prefix, serializer, breakers, and the commands.

Everything the cache sends to Redis for its values goes through :class:`RedisTier`: GET (with
PTTL when early refresh needs the value's expiry), SET PX / DEL, MGET. The lock
(``lock.py``) and prefix invalidation (``invalidation.py``) use the client it holds.

Failures: the commands raise :data:`REDIS_FAILURES`; the caller decides what degraded mode
means for it, and reports it with :meth:`RedisTier.failed` (counted, logged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.exceptions import RedisError

from resilient_cache.cache.options import CacheStats
from resilient_cache.circuit import BreakerBoard, BreakerState, CircuitBreaker
from resilient_cache.serializers import Serializer

# One logger for every part of the cache (the name it had as one module).
logger = logging.getLogger("resilient_cache.cache")

#: What counts as "Redis failed" (a refused breaker is a RedisError too).
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


class AsyncKeyValue(Protocol):
    """What MultiLayerCache needs of its Redis side: a RedisClusterClient, a raw redis-py
    client, or a RedisCircuitBreaker. ``execute_command`` serves PTTL and EVAL (the lock)."""

    def get(self, key: Any) -> Awaitable[Any]: ...
    def set(
        self, key: Any, value: Any, *, px: int | None = None, nx: bool = False
    ) -> Awaitable[Any]: ...
    def delete(self, *keys: Any) -> Awaitable[Any]: ...
    def execute_command(self, *args: Any, **kwargs: Any) -> Awaitable[Any]: ...


class RedisTier:
    """The Redis tier of the cache ``name``. ``read_ttl``: GET also reads the key's PTTL."""

    def __init__(
        self,
        name: str,
        client: AsyncKeyValue,
        *,
        key_prefix: str,
        serializer: Serializer,
        read_ttl: bool,
        stats: CacheStats,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        # Typed loosely: the breaker lookup, MGET and SCAN probe for what each kind of client has.
        self.client: Any = client
        self.key_prefix = key_prefix
        self.serializer = serializer
        self.read_ttl = read_ttl
        self._stats = stats
        self._clock = clock

    def key(self, key: str) -> str:
        """The Redis key of the cache key ``key``."""
        return self.key_prefix + key

    # -- degraded mode ------------------------------------------------------------------------

    def _breakers_for(self, redis_key: str) -> list[CircuitBreaker]:
        client = self.client
        board = getattr(client, "breakers", None)
        if isinstance(board, BreakerBoard):  # a RedisClusterClient: cluster and node breakers
            found = [board.breakers[s] for s in ("cluster",) if s in board.breakers]
            try:
                node = client.get_cluster().get_node_from_key(redis_key)
            except Exception:  # no slot map yet, or not a cluster
                node = None
            if node is not None and node.name in board.breakers:
                found.append(board.breakers[node.name])
            return found
        breaker = getattr(client, "breaker", None)  # a RedisCircuitBreaker
        return [breaker] if isinstance(breaker, CircuitBreaker) else []

    def refuses(self, key: str) -> bool:
        """Whether the breaker guarding ``key`` refuses calls now (degraded mode). A breaker
        whose open period is over lets the next call through as its probe."""
        for breaker in self._breakers_for(self.key(key)):
            if breaker.state is BreakerState.ISOLATED:
                return True
            if breaker.state is BreakerState.OPEN and breaker.retry_after() > 0:
                return True
        return False

    def failed(self, err: BaseException, what: str) -> None:
        """Count and log a Redis failure the cache works around."""
        self._stats.redis_errors += 1
        logger.warning(
            "cache %s: Redis %s failed (%s); serving without it",
            self.name,
            what,
            type(err).__name__,
        )

    # -- values -------------------------------------------------------------------------------

    def encode(self, value: Any) -> bytes:
        return self.serializer.dumps(value)

    def decode(self, raw: Any) -> tuple[bool, Any]:
        """(found, value) of a reply; a value that cannot be decoded counts as a miss."""
        if raw is None:
            return False, None
        if isinstance(raw, str):
            raw = raw.encode()
        try:
            return True, self.serializer.loads(raw)
        except Exception as err:
            self._stats.redis_errors += 1
            logger.warning(
                "cache %s: a value in Redis could not be decoded with %s (%s); treated as a miss",
                self.name,
                self.serializer.name,
                type(err).__name__,
            )
            return False, None

    # -- commands (each raises REDIS_FAILURES) ------------------------------------------------

    async def read(self, key: str) -> tuple[bool, Any, float | None]:
        """(found, value, seconds to live or None)."""
        rkey = self.key(key)
        if self.read_ttl:
            raw, pttl = await asyncio.gather(
                self.client.get(rkey), self.client.execute_command("PTTL", rkey)
            )
            ttl = pttl / 1000.0 if isinstance(pttl, int) and pttl > 0 else None
        else:
            raw, ttl = await self.client.get(rkey), None
        found, value = self.decode(raw)
        return found, value, ttl

    async def read_many(self, keys: list[str]) -> list[Any]:
        """The raw replies of ``keys``, in order: one MGET per slot (``mget_nonatomic``), or
        one GET per key, concurrently, from a client without it."""
        redis_keys = [self.key(k) for k in keys]
        mget = getattr(self.client, "mget_nonatomic", None)
        if mget is not None:  # the client splits the keys by slot
            return list(await mget(redis_keys))
        return list(await asyncio.gather(*(self.client.get(k) for k in redis_keys)))

    async def write(self, key: str, payload: bytes | None, expires: float) -> None:
        """SET ``payload`` for the time left until ``expires`` (nothing if none is left), or
        DEL when ``payload`` is None."""
        rkey = self.key(key)
        if payload is None:
            await self.client.delete(rkey)
            return
        ms = int((expires - self._clock()) * 1000)
        if ms > 0:
            await self.client.set(rkey, payload, px=ms)
