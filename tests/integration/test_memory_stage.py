"""The memory stage against the real cluster: hits, bounds, TTLs, local invalidation, races.

Coherence across processes is tested in test_coherence.py; here it is off unless a test says so,
so that only this client's own writes invalidate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel

from resilient_cache import RedisClusterClient, create_redis_cluster
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, Handler
from resilient_cache.stages.memory import MemoryStage


def tier_of(client: RedisClusterClient) -> MemoryStage:
    stage = dict(zip(client.active_stages, client._stages, strict=True))["memory"]
    assert isinstance(stage, MemoryStage)
    return stage


@asynccontextmanager
async def memory_client(
    cluster_nodes: str, plugins: tuple[object, ...] = (), **memory: Any
) -> AsyncIterator[RedisClusterClient]:
    options: dict[str, Any] = {"enabled": True, "ttl": 30, "coherence": False, **memory}
    extra: dict[str, Any] = {}
    if plugins:
        extra["stages"] = ["memory", "gate", "timeout", "retry", "routing", "breaker"]
    client = create_redis_cluster(
        cluster_nodes,
        autoload=False,
        health_check_interval=0,
        memory=options,
        plugins=plugins,
        **extra,
    )
    async with client:
        yield client


async def test_hits_and_misses(cluster_nodes: str) -> None:
    async with memory_client(cluster_nodes) as client:
        tier = tier_of(client)
        await client.set("mem:hm", "v")
        assert [await client.get("mem:hm") for _ in range(3)] == [b"v"] * 3
        assert (tier.misses, tier.hits) == (1, 2)
        # Different arguments are different entries of one key.
        await client.hset("mem:hash", mapping={"a": "1", "b": "2"})
        assert await client.hget("mem:hash", "a") == b"1"
        assert await client.hget("mem:hash", "b") == b"2"
        assert await client.hget("mem:hash", "a") == b"1"
        assert await client.hgetall("mem:hash") == {b"a": b"1", b"b": b"2"}
        assert (tier.misses, tier.hits) == (4, 3)
        # str and bytes spellings of a key are one key for invalidation.
        assert await client.get(b"mem:hm") == b"v"
        await client.set("mem:hm", "w")
        assert await client.get(b"mem:hm") == b"w"
        assert await client.get("mem:hm") == b"w"


async def test_lru_by_entry_count(cluster_nodes: str) -> None:
    async with memory_client(cluster_nodes, max_size=3) as client:
        tier = tier_of(client)
        for i in range(4):
            await client.set(f"mem:lru:{i}", i)
        for i in range(3):
            await client.get(f"mem:lru:{i}")
        await client.get("mem:lru:0")  # 0 is now the most recently used
        await client.get("mem:lru:3")  # evicts 1, the least recently used
        assert len(tier) == 3
        assert tier.evictions == 1
        assert not tier.holds("mem:lru:1")
        assert all(tier.holds(f"mem:lru:{i}") for i in (0, 2, 3))


async def test_lru_by_bytes(cluster_nodes: str) -> None:
    value = "x" * 1000
    async with memory_client(cluster_nodes, max_bytes=3500) as client:
        tier = tier_of(client)
        for i in range(5):
            await client.set(f"mem:big:{i}", value)
            await client.get(f"mem:big:{i}")
            assert tier.bytes <= 3500
        assert len(tier) == 3
        assert tier.evictions == 2
        assert [tier.holds(f"mem:big:{i}") for i in range(5)] == [False, False, True, True, True]
        # A reply larger than the whole budget is not stored at all.
        await client.set("mem:huge", "y" * 5000)
        assert await client.get("mem:huge") == b"y" * 5000
        assert not tier.holds("mem:huge")
        assert len(tier) == 3


async def test_entry_ttl_is_capped_by_the_keys_ttl(cluster_nodes: str) -> None:
    async with memory_client(cluster_nodes, ttl=30) as client:
        tier = tier_of(client)
        await client.set("mem:ttl:px", "v", px=300)
        await client.set("mem:ttl:expire", "v")
        await client.expire("mem:ttl:expire", 1)
        await client.set("mem:ttl:plain", "v")
        before = time.monotonic()
        for key in ("mem:ttl:px", "mem:ttl:expire", "mem:ttl:plain"):
            assert await client.get(key) == b"v"
        expiry = {k: tier.expires_at(k) for k in ("mem:ttl:px", "mem:ttl:expire", "mem:ttl:plain")}
        assert expiry["mem:ttl:px"] <= before + 0.3
        assert expiry["mem:ttl:expire"] <= before + 1.0
        assert expiry["mem:ttl:plain"] >= before + 29
        await asyncio.sleep(0.35)
        assert await client.get("mem:ttl:px") is None  # Redis expired it; so did the tier
        # PERSIST / SET without EX lift the cap again.
        await client.persist("mem:ttl:expire")
        assert await client.get("mem:ttl:expire") == b"v"
        assert tier.expires_at("mem:ttl:expire") >= before + 29


async def test_writes_invalidate_locally(cluster_nodes: str) -> None:
    async with memory_client(cluster_nodes) as client:
        tier = tier_of(client)

        async def cached(key: str, expected: Any, read: Callable[[], Any] | None = None) -> None:
            reply = await (read() if read else client.get(key))
            assert reply == expected
            assert tier.holds(key)

        a, b = "mem:{inv}:a", "mem:{inv}:b"  # one slot, for RENAME/COPY
        await client.set(a, "1")
        await client.set(b, "2")
        await cached(a, b"1")
        await cached(b, b"2")
        await client.rename(a, b)
        assert not tier.holds(a) and not tier.holds(b)
        assert await client.get(a) is None
        assert await client.get(b) == b"1"

        await client.copy(b, a)
        assert not tier.holds(a)
        assert await client.get(a) == b"1"

        for write, written in (
            (lambda: client.delete(a), [a]),
            (lambda: client.unlink(a, b), [a, b]),
            (lambda: client.expire(b, 100), [b]),
            (lambda: client.incr(a), [a]),
            (lambda: client.execute_command("APPEND", a, "x"), [a]),
        ):
            await client.set(a, "5")
            await client.set(b, "6")
            await client.get(a)
            await client.get(b)
            assert tier.holds(a) and tier.holds(b)
            await write()
            assert [tier.holds(k) for k in (a, b)] == [k not in written for k in (a, b)]

        await client.rpush("mem:list", "x", "y")
        await cached("mem:list", [b"x", b"y"], lambda: client.lrange("mem:list", 0, -1))
        await client.lmove("mem:list", "mem:list", "LEFT", "RIGHT")
        assert not tier.holds("mem:list")
        assert await client.lrange("mem:list", 0, -1) == [b"y", b"x"]

        # FLUSHALL (and FLUSHDB) empties the whole tier.
        await client.set("mem:other", "o")
        await client.get("mem:other")
        assert len(tier) > 0
        await client.flushall()
        assert len(tier) == 0
        assert await client.get("mem:other") is None


async def test_pipelines_invalidate_every_written_key(cluster_nodes: str) -> None:
    async with memory_client(cluster_nodes) as client:
        tier = tier_of(client)
        keys = [f"mem:pipe:{i}" for i in range(4)]  # several slots
        for key in keys:
            await client.set(key, "old")
            await client.get(key)
        async with client.pipeline() as pipe:
            pipe.set(keys[0], "new").hset("mem:pipe:h", "f", "v").delete(keys[1])
            pipe.get(keys[2])  # a read in the batch does not invalidate
            await pipe.execute()
        assert [tier.holds(k) for k in keys] == [False, False, True, True]
        assert await client.get(keys[0]) == b"new"
        assert await client.get(keys[1]) is None

        # A transaction (one slot) too, including RENAME inside it.
        x, y = "mem:{tx}:x", "mem:{tx}:y"
        await client.set(x, "1")
        await client.set(y, "2")
        await client.get(x)
        await client.get(y)
        async with client.pipeline(transaction=True) as pipe:
            pipe.rename(x, y)
            await pipe.execute()
        assert not tier.holds(x) and not tier.holds(y)
        assert await client.get(y) == b"1"

        # A batch of reads only leaves the tier alone.
        await client.get(keys[3])
        async with client.pipeline() as pipe:
            pipe.get(keys[3]).get(keys[2])
            await pipe.execute()
        assert tier.holds(keys[3])


class _Gate:
    """A stage inside memory: holds the reply of one GET until released, after Redis answered."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.answered = asyncio.Event()
        self.release = asyncio.Event()
        self.served_by: list[str] = []  # "primary" / "replica" of every reply, in order

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        reply = await call_next(command)
        self.served_by.append(getattr(command.node, "server_type", "?"))
        if command.name == "GET" and command.args[0] == self.key:
            self.key = None
            self.answered.set()
            await self.release.wait()
        return reply


class _GatePlugin:
    def __init__(self) -> None:
        self.gate = _Gate()

    @hookimpl
    def resilient_cache_register_stages(self, registry: Any) -> None:
        class GateSettings(BaseModel):
            pass

        registry.add("gate", GateSettings, lambda settings, context: self.gate)


async def test_a_read_racing_a_write_does_not_store_the_older_reply(cluster_nodes: str) -> None:
    plugin = _GatePlugin()
    async with memory_client(cluster_nodes, plugins=(plugin,)) as client:
        tier = tier_of(client)
        gate = plugin.gate
        await client.set("mem:race", "old")
        gate.key = "mem:race"
        read = asyncio.ensure_future(client.get("mem:race"))
        await gate.answered.wait()  # Redis answered "old"; the reply is on its way up
        await client.set("mem:race", "new")  # the write lands in between
        gate.release.set()
        assert await read == b"old"  # the caller gets what Redis said at the time...
        assert not tier.holds("mem:race")  # ...but the tier did not keep it
        assert await client.get("mem:race") == b"new"
        assert await client.get("mem:race") == b"new"
        assert tier.hits == 1


async def test_key_prefixes(cluster_nodes: str) -> None:
    async with memory_client(cluster_nodes, key_prefixes=["pre:", "also:"]) as client:
        tier = tier_of(client)
        for key in ("pre:1", "also:1", "other:1"):
            await client.set(key, "v")
            await client.get(key)
            await client.get(key)
        assert tier.holds("pre:1") and tier.holds("also:1")
        assert not tier.holds("other:1")
        assert (tier.misses, tier.hits) == (2, 2)


async def test_coherence_starts_on_the_first_command_and_stops_on_disconnect(
    cluster_nodes: str,
) -> None:
    async with memory_client(cluster_nodes, coherence=True, key_prefixes=["mem:"]) as client:
        tier = tier_of(client)
        assert tier.coherence is not None and not tier.coherence.started
        assert not tier.serving
        await client.set("mem:co", "v")  # the first command starts it and waits for the links
        assert tier.serving
        assert len(tier.coherence.link_states()) == 3
        # This client's own SET comes back as a push too, and may land while the first GET
        # is in flight (then that reply is not stored): a hit follows within a few reads.
        for _ in range(5):
            assert await client.get("mem:co") == b"v"
            if tier.hits:
                break
            await asyncio.sleep(0.01)
        assert tier.hits == 1
    assert not tier.serving
    assert not tier.coherence.started
    assert len(tier) == 0


def test_written_keys_of_commands_missing_from_the_command_table() -> None:
    from resilient_cache.commands import written_keys

    assert written_keys("RENAME", ("a", "b"), ()) == ("a", "b")
    assert written_keys("SUNIONSTORE", ("d", "s1", "s2"), ()) == ("d",)
    assert written_keys("BITOP", ("AND", "d", "s"), ()) == ("d",)
    assert written_keys("EVAL", ("return 1", 2, "k1", "k2", "arg"), ()) == ("k1", "k2")
    assert written_keys("SORT", ("l", "BY", "w*", "STORE", "d"), ("l",)) == ("d",)
    assert written_keys("SORT", ("l",), ("l",)) == ()
    assert written_keys("BLPOP", ("a", "b", 0), ()) == ("a", "b")
    assert written_keys("BLMPOP", (0, 2, "a", "b", "LEFT"), ()) == ("a", "b")
    assert written_keys("HSET", ("h", "f", "v"), ("h",)) == ("h",)
    assert written_keys("CLUSTER INFO", (), ()) == ()
    assert written_keys("PUBLISH", ("chan", "msg"), ()) == ()
    # Whole-keyspace writes, and writes whose keys are unknown, flush everything.
    assert written_keys("FLUSHALL", (), ()) is None
    assert written_keys("FLUSHDB", ("ASYNC",), ()) is None
    assert written_keys("MIGRATE", ("h", 1, "", 0, 5, "KEYS", "a"), ()) is None
    assert written_keys("EVAL", ("return 1", "x"), ()) is None


async def test_replies_from_replicas_are_passed_on_but_never_stored(cluster_nodes: str) -> None:
    plugin = _GatePlugin()
    client = create_redis_cluster(
        cluster_nodes,
        autoload=False,
        health_check_interval=0,
        memory={"enabled": True, "ttl": 30, "coherence": False},
        routing={"read_from_replicas": True},
        plugins=(plugin,),
        stages=["memory", "gate", "timeout", "retry", "routing", "breaker"],
    )
    key = "mem:replica-read"
    async with client:
        tier = tier_of(client)
        await client.set(key, "v")
        served_by = plugin.gate.served_by
        for _ in range(12):  # round robin over the primary and its replica
            tier.invalidate(key)  # each read a miss
            await client.get(key)
            assert tier.holds(key) == (served_by[-1] == "primary"), served_by
        assert {"primary", "replica"} <= set(served_by[1:]), served_by
        assert tier.replica_replies == served_by[1:].count("replica")
