"""bench_cache's contenders: ours (``create_redis_cluster`` and ``MultiLayerCache``), cashews'
two-level cache and aiocache's memory + Redis caches composed by hand. cashews and aiocache come
with the ``bench`` extra.

Only the public API of resilient_cache is used, so these keep working while the memory stage and
MultiLayerCache grow options.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from resilient_cache import ConfigurationError, MultiLayerCache, create_redis_cluster

TTL = 600  # seconds, every tier of every contender: nothing expires during a run
VALUE = {"id": 42, "name": "user-42", "tags": ["a", "b"], "score": 0.5}  # JSON- and pickle-able


# --------------------------------------------------------------------------- building ours


def ours_client(nodes: str | None, url: str | None, memory: bool) -> Any:
    """``create_redis_cluster`` on the cluster (``nodes``) or the standalone server (``url``);
    with ``memory``, the memory stage on and a TTL longer than the run. If a newer MemorySettings
    refuses these fields, fall back to ``{"enabled": True}``."""
    where: dict[str, Any] = {"url": url, "backend": "standalone"} if url else {}
    extra: dict[str, Any] = {}
    if memory:
        extra["memory"] = {"enabled": True, "ttl": float(TTL), "max_size": 10_000}
    try:
        return create_redis_cluster(nodes, health_check_interval=0, **where, **extra)
    except ConfigurationError:
        if not memory:
            raise
        return create_redis_cluster(
            nodes, health_check_interval=0, **where, memory={"enabled": True}
        )


def ours_cache(name: str, client: Any, prefix: str, **options: Any) -> MultiLayerCache | None:
    """A MultiLayerCache with both TTLs longer than the run and cashews' local size (10 000).
    ``options`` are further keyword arguments; None if this version does not take them."""
    try:
        try:
            return MultiLayerCache(
                name,
                client,
                memory={"max_size": 10_000, "default_ttl": float(TTL)},
                redis={"default_ttl": TTL, "key_prefix": prefix},
                **options,
            )
        except ConfigurationError:  # options renamed: the defaults, keys kept apart by name
            return MultiLayerCache(name, client, **options)
    except TypeError:
        if not options:
            raise
        return None


# --------------------------------------------------------------------------- contenders


class Loads:
    """The loader of every contender, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def load(self) -> Any:  # a coroutine function: cashews checks iscoroutinefunction
        self.calls += 1
        return VALUE


@dataclass
class Contender:
    name: str
    setup: str  # one line: what exactly it is
    get_or_set: Callable[[str], Awaitable[Any]]  # through memory, Redis, the loader
    write_redis_only: Callable[[str], Awaitable[Any]]  # another writer: Redis, not our memory
    loads: Loads
    close: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    standalone: bool = True  # its Redis is the standalone server (commandstats apply)


async def make_ours(
    client: Any, name: str, prefix: str, standalone: bool, **options: Any
) -> Contender | None:
    """Ours: a reader MultiLayerCache, and a writer one (its own memory tier) on the same client
    and key prefix. None if this version does not take ``options``."""
    loads = Loads()
    reader = ours_cache(f"{name}-reader", client, prefix, **options)
    writer = ours_cache(f"{name}-writer", client, prefix, **options)
    if reader is None or writer is None:
        return None

    async def get_or_set(key: str) -> Any:
        return await reader.get_or_set(key, loads.load, ttl=TTL)

    async def write(key: str) -> Any:
        await writer.set(key, VALUE, ttl=TTL)

    where = "the cluster" if not standalone else "url=redis://127.0.0.1:PORT/0"
    extra = "".join(f", {k}={v!r}" for k, v in options.items())
    return Contender(
        name,
        f"MultiLayerCache(memory max_size 10000, default_ttl {TTL}{extra}) over "
        f"create_redis_cluster({where}), default pipeline; get_or_set(key, loader, ttl={TTL})",
        get_or_set,
        write,
        loads,
        standalone=standalone,
    )


async def make_cashews(port: int) -> tuple[list[Contender], list[Callable[[], Awaitable[Any]]]]:
    """cashews' two-level cache: the Redis backend with ``client_side=True`` (BcastClientSide,
    an in-process Memory(size=10000) in front of Redis, invalidated by Redis 6+ CLIENT TRACKING
    BCAST on the key prefix). ``Cache.get_or_set`` and the ``@cache`` decorator, one instance."""
    from cashews import Cache

    url = f"redis://127.0.0.1:{port}/0"
    prefix = "cashews:"
    reader = Cache(name="bench-reader")
    reader.setup(url, client_side=True, client_side_prefix=prefix)
    await reader.init()
    # Another writer: a plain cashews Redis backend (same pickle serializer) writing the key
    # under the client-side prefix, as another process's client-side cache would.
    writer = Cache(name="bench-writer")
    writer.setup(url)
    await writer.init()
    closers: list[Callable[[], Awaitable[Any]]] = [reader.close, writer.close]

    loads_api = Loads()

    async def get_or_set(key: str) -> Any:
        return await reader.get_or_set(key, loads_api.load, expire=TTL)

    async def write_api(key: str) -> Any:
        await writer.set(prefix + key, VALUE, expire=TTL)

    loads_deco = Loads()

    @reader(ttl=TTL, key="deco:{key}")
    async def load(key: str) -> Any:
        return await loads_deco.load()

    async def write_deco(key: str) -> Any:
        await writer.set(prefix + "deco:" + key, VALUE, expire=TTL)

    base = (
        f"cashews Cache().setup('redis://…', client_side=True): Memory(size=10000) in front of "
        f"Redis, CLIENT TRACKING BCAST invalidation; pickle; expire={TTL}"
    )
    return [
        Contender("cashews", base + "; cache.get_or_set(key, loader)", get_or_set, write_api,
                  loads_api),
        Contender("cashews @cache", base + f"; @cache(ttl={TTL}, key='deco:{{key}}')", load,
                  write_deco, loads_deco),
    ], closers  # fmt: skip


async def make_aiocache(port: int, timeout: float | None, name: str, namespace: str) -> Contender:
    """aiocache has no two-level cache (its ``cached`` decorator takes one backend): a
    ``Cache(Cache.MEMORY)`` in front of a ``Cache(Cache.REDIS)``, composed by hand."""
    from aiocache import Cache

    options: dict[str, Any] = {} if timeout == 5 else {"timeout": timeout}
    memory = Cache(Cache.MEMORY, namespace=namespace, **options)
    remote = Cache(Cache.REDIS, endpoint="127.0.0.1", port=port, namespace=namespace, **options)
    loads = Loads()

    async def get_or_set(key: str) -> Any:
        value = await memory.get(key)
        if value is not None:
            return value
        value = await remote.get(key)
        if value is None:
            value = await loads.load()
            await remote.set(key, value, ttl=TTL)
        await memory.set(key, value, ttl=TTL)
        return value

    async def write(key: str) -> Any:
        await remote.set(key, VALUE, ttl=TTL)  # Redis only: this memory tier has not seen it

    return Contender(
        name,
        f"aiocache Cache(Cache.MEMORY) then Cache(Cache.REDIS), get/set by hand, ttl={TTL}, "
        f"timeout={timeout} (default 5: every op in asyncio.wait_for); Redis values JSON",
        get_or_set,
        write,
        loads,
        close=[memory.close, remote.close],
    )
