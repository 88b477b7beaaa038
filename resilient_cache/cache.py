"""``MultiLayerCache``: a memory tier in front of Redis with ``get_or_set`` (first version).

Reads look in memory, then Redis, then call the loader; a value loaded is written to both tiers.
Concurrent misses of one key in this process share one loader call (single flight). When Redis
fails (an open breaker, a dead node), reads fall back to the loader and writes to Redis are
skipped with a warning: the cache degrades, the application keeps answering.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from resilient_cache.errors import ConfigurationError

logger = logging.getLogger("resilient_cache.cache")


class AsyncKeyValue(Protocol):
    """What MultiLayerCache needs of its Redis side: a RedisClusterClient, a raw redis-py
    client, or a RedisCircuitBreaker."""

    def get(self, key: Any) -> Awaitable[Any]: ...
    def set(self, key: Any, value: Any, *, ex: int | None = None) -> Awaitable[Any]: ...
    def delete(self, *keys: Any) -> Awaitable[Any]: ...


class MemoryTierOptions(BaseModel):
    max_size: int = Field(default=1000, ge=1, description="Entries kept (LRU beyond).")
    default_ttl: float = Field(default=300.0, gt=0, description="Seconds an entry lives.")
    cleanup_interval: float = Field(default=60.0, gt=0, description="Seconds between sweeps.")


class RedisTierOptions(BaseModel):
    default_ttl: int = Field(default=3600, ge=1, description="Seconds a value lives in Redis.")
    key_prefix: str = Field(default="", description="Prepended to every key in Redis.")


class CacheStats(BaseModel):
    memory_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    loads: int = 0
    redis_errors: int = 0


def _options(model: type[BaseModel], given: Any, where: str) -> Any:
    try:
        return model.model_validate(given or {})
    except Exception as err:
        raise ConfigurationError(f"MultiLayerCache {where}: {err}") from None


class MultiLayerCache:
    """``MultiLayerCache(name, client, memory={...}, redis={...})``.

    Values are stored in Redis as JSON. Memory entries are the loaded objects themselves: do not
    mutate what you get back.
    """

    def __init__(
        self,
        name: str,
        client: AsyncKeyValue,
        *,
        memory: dict[str, Any] | MemoryTierOptions | None = None,
        redis: dict[str, Any] | RedisTierOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._client = client
        self.memory_options: MemoryTierOptions = _options(MemoryTierOptions, memory, "memory")
        self.redis_options: RedisTierOptions = _options(RedisTierOptions, redis, "redis")
        self._clock = clock
        self._memory: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._next_sweep = clock() + self.memory_options.cleanup_interval
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self.stats = CacheStats()

    def _redis_key(self, key: str) -> str:
        return self.redis_options.key_prefix + key

    # -- memory tier ----------------------------------------------------------------------

    def _memory_get(self, key: str) -> tuple[bool, Any]:
        entry = self._memory.get(key)
        if entry is None:
            return False, None
        if entry[0] <= self._clock():
            del self._memory[key]
            return False, None
        self._memory.move_to_end(key)
        return True, entry[1]

    def _memory_set(self, key: str, value: Any, ttl: float | None = None) -> None:
        now = self._clock()
        self._memory[key] = (now + (ttl or self.memory_options.default_ttl), value)
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_options.max_size:
            self._memory.popitem(last=False)
        if now >= self._next_sweep:
            self._next_sweep = now + self.memory_options.cleanup_interval
            for k in [k for k, (expires, _) in self._memory.items() if expires <= now]:
                del self._memory[k]

    # -- public API -----------------------------------------------------------------------

    async def get(self, key: str) -> Any:
        """The value of ``key`` from memory or Redis, or ``None``."""
        found, value = self._memory_get(key)
        if found:
            self.stats.memory_hits += 1
            return value
        try:
            raw = await self._client.get(self._redis_key(key))
        except RedisError as err:
            self.stats.redis_errors += 1
            logger.warning(
                "cache %s: Redis read failed (%s); serving without it",
                self.name,
                type(err).__name__,
            )
            return None
        if raw is None:
            self.stats.misses += 1
            return None
        self.stats.redis_hits += 1
        value = json.loads(raw)
        self._memory_set(key, value)
        return value

    async def set(self, key: str, value: Any, *, ttl: int | None = None) -> None:
        """Store ``value`` (JSON-serialisable) in memory and Redis."""
        payload = json.dumps(value)
        self._memory_set(key, value)
        try:
            await self._client.set(
                self._redis_key(key), payload, ex=ttl or self.redis_options.default_ttl
            )
        except RedisError as err:
            self.stats.redis_errors += 1
            logger.warning(
                "cache %s: Redis write failed (%s); kept in memory only",
                self.name,
                type(err).__name__,
            )

    async def delete(self, key: str) -> None:
        """Remove ``key`` from both tiers."""
        self._memory.pop(key, None)
        await self._client.delete(self._redis_key(key))

    async def get_or_set(
        self, key: str, loader: Callable[[], Any], *, ttl: int | None = None
    ) -> Any:
        """The cached value of ``key``; on a miss, ``loader()`` (sync or async) once per key
        however many callers miss at the same time, and the result is stored in both tiers."""
        found, value = self._memory_get(key)
        if found:
            self.stats.memory_hits += 1
            return value
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await self.get(key)
            if value is None:
                self.stats.loads += 1
                value = loader()
                if inspect.isawaitable(value):
                    value = await value
                await self.set(key, value, ttl=ttl)
            future.set_result(value)
            return value
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # mark retrieved: waiters re-raise it, nobody logs it twice
            raise
        finally:
            del self._inflight[key]
