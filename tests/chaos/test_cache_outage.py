"""MultiLayerCache with the whole cluster frozen (SIGSTOP): answers keep coming, from memory,
stale values or the loader, each within a bound; writes reach Redis after SIGCONT."""

from __future__ import annotations

import asyncio
import json
import time

import redis

from resilient_cache import MultiLayerCache, create_redis_cluster
from tests.conftest import async_wait_until

DEADLINE = 1.0
BOUND = DEADLINE + 0.5  # one command deadline, plus scheduling slack


async def _timed(coro):
    started = time.monotonic()
    value = await coro
    return time.monotonic() - started, value


async def test_get_or_set_through_a_frozen_cluster_then_write_back(ready_cluster) -> None:
    cluster = ready_cluster
    client = create_redis_cluster(
        cluster.startup_nodes,
        timeout={"deadline": DEADLINE},
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        max_retries=2,
        retry_delay=0.05,
        circuit_breaker_threshold=2,
        circuit_breaker_timeout=1.0,
        health_check_interval=0,
        autoload=False,
    )
    cache = MultiLayerCache(
        "outage",
        client,
        memory={"default_ttl": 0.5},  # memory expires fast: reads go to (frozen) Redis
        redis={"default_ttl": 120, "key_prefix": "outage:"},
        max_stale=60.0,
        early_refresh=False,
        writeback_interval=0.2,
    )
    known = [f"known:{n}" for n in range(10)]
    fresh = [f"new:{n}" for n in range(10)]
    async with client:
        for key in known:
            assert await cache.get_or_set(key, lambda key=key: {"k": key}) == {"k": key}
        await cache.set("short", "old", ttl=1)  # expires in Redis during the outage
        loads_before = cache.stats.loads

        for node in cluster.nodes:
            cluster.pause(node)
        try:
            await asyncio.sleep(1.2)  # "short" is now past its expiry, within max_stale
            for _round in range(3):
                results = await asyncio.gather(
                    *(_timed(cache.get_or_set(k, lambda: "loader")) for k in known),
                    _timed(cache.get_or_set("short", lambda: "new")),
                    *(_timed(cache.get_or_set(k, lambda k=k: f"loaded {k}")) for k in fresh),
                )
                assert all(elapsed <= BOUND for elapsed, _ in results), results
                values = [value for _, value in results]
                assert values[:10] == [{"k": k} for k in known]  # kept memory entries
                assert values[10] == "old"  # stale, within max_stale
                assert values[11:] == [f"loaded {k}" for k in fresh]
            assert cache.stats.stale_served >= 3
            assert cache.stats.loads == loads_before + len(fresh)  # once each, then memory
            assert cache.writeback_pending == len(fresh)
            # Breakers open by now: answers come without waiting for Redis at all.
            elapsed, value = await _timed(cache.get_or_set("new:0", lambda: "x"))
            assert value == "loaded new:0"
            # Well below the 0.5 s socket timeout, so no socket wait was involved; the margin
            # over "at once" is for a busy 2-core machine.
            assert elapsed < 0.4, elapsed
        finally:
            for node in cluster.nodes:
                cluster.resume(node)
        cluster.wait_ready(timeout=60)

        async def written_back() -> bool:
            return cache.writeback_pending == 0

        await async_wait_until(written_back, 30, "the write-back queue to drain", interval=0.2)

        async def in_redis() -> bool:
            try:
                raws = [await client.get(f"outage:{k}") for k in fresh]
            except redis.RedisError:
                return False
            return [json.loads(r) if r else None for r in raws] == [f"loaded {k}" for k in fresh]

        await async_wait_until(in_redis, 10, "the loaded values in Redis", interval=0.2)
        assert cache.stats.writeback_written >= len(fresh)
        assert 60 < await client.ttl("outage:new:0") <= 120  # the remaining TTL, not a new one
    await cache.aclose()
