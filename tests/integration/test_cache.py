"""MultiLayerCache against the real local cluster: multi-slot batches, prefix invalidation on
every primary, single flight, races, the cross-process lock with real processes, degraded mode."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import msgpack
import pytest

from resilient_cache import MultiLayerCache, RedisCircuitBreaker, RedisClusterClient

ROOT = Path(__file__).resolve().parents[2]


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


async def test_get_set_delete_and_batches_across_slots(client: RedisClusterClient) -> None:
    prefix = _prefix()
    cache = MultiLayerCache("batch", client, redis={"key_prefix": prefix, "default_ttl": 60})
    values = {f"user:{n}": {"n": n} for n in range(40)}
    slots = {client.keyslot(prefix + k) for k in values}
    assert len(slots) > 10  # really spans slots (and primaries)
    await cache.set_many(values)
    assert json.loads(await client.get(prefix + "user:7")) == {"n": 7}
    assert 0 < await client.ttl(prefix + "user:7") <= 60

    # A second cache (another process) reads them from Redis in one round per slot.
    other = MultiLayerCache("batch", client, redis={"key_prefix": prefix})
    got = await other.get_many([*values, "missing"])
    assert got == values
    assert other.stats.redis_hits == 40 and other.stats.misses == 1
    assert await other.get_many(values) == values
    assert other.stats.memory_hits == 40

    await cache.delete("user:7")
    assert await client.get(prefix + "user:7") is None
    assert await cache.get("user:7") is None
    assert await cache.get("user:8") == {"n": 8}


async def test_invalidate_prefix_scans_every_primary(client: RedisClusterClient) -> None:
    prefix = _prefix()
    cache = MultiLayerCache("inv", client, redis={"key_prefix": prefix})
    await cache.set_many({f"a:{n}": n for n in range(300)})
    await cache.set_many({f"b:{n}": n for n in range(20)})
    owners = {client.get_cluster().get_node_from_key(f"{prefix}a:{n}").name for n in range(300)}
    assert len(owners) == 3
    deleted = await cache.invalidate_prefix("a:")
    assert deleted == 300
    assert cache.memory_size() == 20
    assert await client.get(prefix + "a:5") is None
    assert await cache.get("a:5") is None
    assert await cache.get("b:5") == 5
    # Bounded: max_keys stops early and says how many went.
    await cache.set_many({f"c:{n}": n for n in range(50)})
    assert await cache.invalidate_prefix("c:", max_keys=10) >= 10
    # Glob characters in a prefix are literal.
    await cache.set("d*x", 1)
    await cache.set("dzx", 2)
    assert await cache.invalidate_prefix("d*") == 1
    assert await cache.get("dzx") == 2


async def test_200_concurrent_misses_one_load(client: RedisClusterClient) -> None:
    cache = MultiLayerCache("flight", client, redis={"key_prefix": _prefix()})
    calls = 0

    async def loader() -> dict[str, int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {"v": 1}

    results = await asyncio.gather(*(cache.get_or_set("hot", loader) for _ in range(200)))
    assert results == [{"v": 1}] * 200
    assert calls == 1
    assert cache.stats.loads == 1


async def test_a_cancelled_first_caller_does_not_cancel_the_others(
    client: RedisClusterClient,
) -> None:
    cache = MultiLayerCache("cancel", client, redis={"key_prefix": _prefix()})
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def loader() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return f"load {calls}"

    first = asyncio.create_task(cache.get_or_set("slow", loader))
    await asyncio.wait_for(started.wait(), 5)  # the first caller's load is running
    others = [asyncio.create_task(cache.get_or_set("slow", loader)) for _ in range(5)]
    await asyncio.sleep(0)  # let them join the load in flight
    started.clear()
    first.cancel()  # its load stops with it; one waiter takes over
    await asyncio.wait_for(started.wait(), 5)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*others), 5) == ["load 2"] * 5
    assert first.cancelled()
    assert calls == 2  # the cancelled load, and the one load the five shared
    assert await cache.get("slow") == "load 2"  # stored as usual


async def test_ttls_of_zero_or_less_are_refused(client: RedisClusterClient) -> None:
    cache = MultiLayerCache("ttl", client, redis={"key_prefix": _prefix()})
    with pytest.raises(ValueError, match=r"MultiLayerCache.set: ttl must be > 0"):
        await cache.set("k", "v", ttl=0)
    with pytest.raises(ValueError, match=r"get_or_set: memory_ttl must be > 0"):
        await cache.get_or_set("k", lambda: "v", memory_ttl=-1)
    assert await cache.get("k") is None  # nothing was stored


async def test_set_delete_races_never_resurrect(client: RedisClusterClient) -> None:
    prefix = _prefix()
    cache = MultiLayerCache("race", client, redis={"key_prefix": prefix})
    rng = random.Random(5)
    for round_ in range(30):
        key = f"k{round_ % 3}"
        ops = [("set", n) for n in range(3)] + [("delete", None)] * 2
        rng.shuffle(ops)
        # A load in flight too: it started before every write, so it must not win.
        started = asyncio.Event()

        async def loader(started: asyncio.Event = started) -> str:
            started.set()
            await asyncio.sleep(rng.uniform(0, 0.01))
            return "loaded"

        await cache.delete(key)
        load = asyncio.create_task(cache.get_or_set(key, loader))
        await started.wait()
        await asyncio.gather(
            *(cache.set(key, arg) if op == "set" else cache.delete(key) for op, arg in ops)
        )
        await load
        last_op, last_arg = ops[-1]
        expected = last_arg if last_op == "set" else None
        raw = await client.get(prefix + key)
        assert (json.loads(raw) if raw is not None else None) == expected, (round_, ops)
        assert await cache.get(key) == expected


async def test_breaker_client_raw_client_and_msgpack(client: RedisClusterClient) -> None:
    prefix = _prefix()
    raw = client.get_cluster()
    for backend in (RedisCircuitBreaker(redis=raw), raw):
        cache = MultiLayerCache(
            "compat", backend, redis={"key_prefix": prefix}, serializer="msgpack", lock=True
        )
        assert await cache.get_or_set("blob", lambda: {"b": b"\x00\xff"}) == {"b": b"\x00\xff"}
        assert msgpack.unpackb(await raw.get(prefix + "blob")) == {"b": b"\x00\xff"}
        assert await raw.get(prefix + "blob:lock") is None  # released
        assert await cache.invalidate_prefix("bl") == 1


async def test_degraded_while_the_breaker_is_open_then_write_back(
    client: RedisClusterClient,
) -> None:
    prefix = _prefix()
    cache = MultiLayerCache("degraded", client, redis={"key_prefix": prefix}, lock=True)
    node = client.get_cluster().get_node_from_key(prefix + "user:1").name
    client.isolate_node(node)
    try:
        started = time.monotonic()
        assert await cache.get_or_set("user:1", lambda: "from-db") == "from-db"
        assert time.monotonic() - started < 0.5  # nothing waited for Redis
        assert cache.redis_refuses("user:1")
        assert cache.writeback_pending == 1
        assert await cache.get_or_set("user:1", lambda: "again") == "from-db"  # memory
    finally:
        client.manual_reset_circuit_breaker(node)
    assert await cache.flush_writeback() == 1
    assert json.loads(await client.get(prefix + "user:1")) == "from-db"
    assert cache.stats.writeback_written == 1
    await cache.aclose()


LOCK_WORKER = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from resilient_cache import MultiLayerCache, create_redis_cluster

    nodes, prefix, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])

    async def main():
        client = create_redis_cluster(nodes, autoload=False, health_check_interval=0)
        async with client:
            cache = MultiLayerCache(
                "proc", client, redis={"key_prefix": prefix}, lock=True, lock_ttl=10,
                lock_poll_interval=0.02,
            )
            async def loader():
                await client.incr(prefix + "loads")
                await asyncio.sleep(0.5)
                return {"pid": os.getpid()}
            await client.ping()
            await asyncio.sleep(max(0.0, start_at - time.time()))
            value = await asyncio.gather(*(cache.get_or_set("shared", loader) for _ in range(20)))
            assert all(v == value[0] for v in value)
            print(json.dumps(value[0]))

    asyncio.run(main())
    """
)


async def test_cross_process_lock_loads_once(client: RedisClusterClient, cluster_nodes) -> None:
    prefix = _prefix()
    start_at = time.time() + 3.0
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            LOCK_WORKER,
            cluster_nodes,
            prefix,
            str(start_at),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(5)
    ]
    outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    values = {out.decode().strip() for out, _ in outputs}
    assert len(values) == 1  # every process got the one loaded value
    assert int(await client.get(prefix + "loads")) == 1
    assert await client.get(prefix + "shared:lock") is None
