"""MultiLayerCache: a memory tier in front of Redis, in front of a slow loader.

eval "$(python -m resilient_cache cluster up | grep ^export)"   # or your own cluster
python examples/multilayer_cache.py
python -m resilient_cache cluster down

It writes only keys under "example:cache:" and deletes them before it exits.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from typing import Any

from resilient_cache import MultiLayerCache, create_redis_cluster, parse_cluster_nodes

KEY_PREFIX = "example:cache:"  # the cache prepends it to every Redis key
CONCURRENT_CALLERS = 100

loader_calls: Counter[str] = Counter()


async def fetch_user(user_id: str) -> dict[str, Any]:
    """Stands in for a database query: slow, and counted so that we can see when it runs."""
    loader_calls[user_id] += 1
    await asyncio.sleep(0.2)
    return {"id": user_id, "name": f"User {user_id}"}


def load(user_id: str) -> Any:
    """get_or_set takes a loader without arguments: bind the id here."""
    return lambda: fetch_user(user_id)


async def timed(what: str, call: Any) -> Any:
    started = time.perf_counter()
    value = await call
    print(f"{what} -> {value!r} in {(time.perf_counter() - started) * 1000:.1f} ms")
    return value


async def main() -> int:
    if "REDIS_CLUSTER_NODES" not in os.environ:
        print("set REDIS_CLUSTER_NODES=host:port,... (e.g. from `resilient-cache cluster up`)")
        return 2
    cluster = create_redis_cluster(parse_cluster_nodes(os.environ["REDIS_CLUSTER_NODES"]))
    async with cluster:
        options: dict[str, Any] = {
            "memory": {"max_size": 1000, "default_ttl": 300, "cleanup_interval": 60},  # seconds
            "redis": {"default_ttl": 3600, "key_prefix": KEY_PREFIX},
        }
        cache = MultiLayerCache("example-users", cluster, **options)
        # A second cache over the same Redis: what another process of the service would see.
        other = MultiLayerCache("example-users", cluster, **options)
        keys = ["user:123", "user:456"]
        try:
            for key in keys:  # start fresh, should an earlier run have been interrupted
                await cache.delete(key)

            # 1. A miss runs the loader and stores the value in both tiers; the next call is
            #    answered from this process's memory, without a round trip.
            await timed("get_or_set user:123 (miss)", cache.get_or_set("user:123", load("123")))
            await timed("get_or_set user:123 (memory)", cache.get_or_set("user:123", load("123")))
            raw = await cluster.get(KEY_PREFIX + "user:123")
            ttl = await cluster.ttl(KEY_PREFIX + "user:123")
            print(f"Redis has {KEY_PREFIX}user:123 = {raw!r}, TTL {ttl} s")
            await timed("second cache, get user:123 (Redis tier)", other.get("user:123"))

            # 2. Single flight: 100 callers miss the same fresh key at once. The first one
            #    runs the loader; the other 99 wait for its result instead of each querying
            #    the database (no stampede).
            values = await asyncio.gather(
                *(cache.get_or_set("user:456", load("456")) for _ in range(CONCURRENT_CALLERS))
            )
            same = all(value == values[0] for value in values)
            print(
                f"single flight: {CONCURRENT_CALLERS} concurrent get_or_set of user:456, "
                f"loader called {loader_calls['456']} time(s), all got the same value: {same}"
            )

            # 3. delete() removes the key from memory and from Redis.
            await cache.delete("user:123")
            in_redis = bool(await cluster.exists(KEY_PREFIX + "user:123"))
            after = await cache.get("user:123")
            print(f"after delete: get user:123 -> {after!r}, still in Redis: {in_redis}")

            print(f"stats of cache {cache.name!r}:")
            for field, value in cache.stats.model_dump().items():
                shown = f"{value:.3f} s" if field == "load_time" else value
                print(f"  {field:<18} {shown}")
        finally:
            for key in keys:  # clean up, even after an error
                await cache.delete(key)
            # Stop their background work (write-back, refreshes) before the client goes.
            await cache.aclose()
            await other.aclose()
        left = await cluster.exists(*(KEY_PREFIX + key for key in keys))
        print(f"cleaned up: {left} example key(s) left")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
