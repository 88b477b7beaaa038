"""Auto-pipelining on the real cluster: shared writes, each caller its own reply, what never
joins a batch, redirects and error replies per command, and batches on spans and metrics.

The failure rules under faults (a primary killed under a batch, MOVED/ASK/TRYAGAIN during a
slot migration, CLUSTERDOWN, a manual failover) are in tests/chaos, which run with
auto-pipelining off and on; the cancellation storm is in tests/chaos/test_auto_pipeline_storm.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ResponseError

from resilient_cache import RedisClusterClient, create_redis_cluster
from resilient_cache import telemetry as t
from resilient_cache.backends.redis_py_autopipeline import AutoPipeline, can_batch
from resilient_cache.devcluster import DevCluster
from resilient_cache.pipeline import Command
from tests.conftest import async_wait_until
from tests.integration.test_telemetry import Otel, otel  # noqa: F401  # the OTLP fixture


@pytest.fixture
async def auto(cluster_nodes: str) -> AsyncIterator[RedisClusterClient]:
    client = create_redis_cluster(
        cluster_nodes, health_check_interval=0, autoload=False, auto_pipeline=True
    )
    async with client:
        yield client


def pipeliner(client: RedisClusterClient) -> AutoPipeline:
    auto = client._backend._auto  # type: ignore[attr-defined]
    assert isinstance(auto, AutoPipeline)
    return auto


async def test_concurrent_callers_share_writes_and_each_gets_its_own_reply(
    auto: RedisClusterClient,
) -> None:
    callers, rounds = 100, 20
    wrong: list[tuple[int, int, object]] = []

    async def caller(i: int) -> None:
        for r in range(rounds):
            value = f"{i}:{r}"
            await auto.set(f"ap:own:{i}", value)
            got = await auto.get(f"ap:own:{i}")
            if got != value.encode():
                wrong.append((i, r, got))

    before = pipeliner(auto).batches, pipeliner(auto).batched_commands
    await asyncio.gather(*(caller(i) for i in range(callers)))
    batches = pipeliner(auto).batches - before[0]
    commands = pipeliner(auto).batched_commands - before[1]
    assert wrong == []
    # Nearly every command went through a batch (one finding nothing else on its way to its
    # node goes alone), and 100 callers over 3 primaries share writes, several commands each.
    assert commands >= 0.9 * callers * rounds * 2, commands
    assert commands / batches >= 3, (commands, batches)


async def test_an_error_reply_belongs_to_its_own_command(auto: RedisClusterClient) -> None:
    await auto.set("ap:err:{t}", "a string")
    await auto.delete("ap:err:{t}:list")

    async def wrong_type() -> object:
        return await auto.lpush("ap:err:{t}", "x")  # a list command on a string

    results = await asyncio.gather(
        auto.get("ap:err:{t}"),
        wrong_type(),
        auto.rpush("ap:err:{t}:list", "y"),
        auto.get("ap:err:{t}"),
        return_exceptions=True,
    )
    assert results[0] == b"a string" and results[3] == b"a string"
    assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
    assert "a string" not in str(results[1])  # no argument in the error
    assert results[2] == 1


async def test_blocking_commands_never_hold_a_batch(
    auto: RedisClusterClient, devcluster: DevCluster
) -> None:
    key = "ap:block:{b}"
    await auto.delete(key)
    node = devcluster.primary_for_key(key)

    async def blocked_clients() -> int:
        info = await asyncio.to_thread(devcluster.admin(node).info, "clients")
        return int(info["blocked_clients"])

    assert await blocked_clients() == 0
    blocked = asyncio.create_task(auto.blpop([key], timeout=30))
    await async_wait_until(blocked_clients, 10, "the BLPOP to block on its node")
    # Twenty writes and reads on the same node while it waits: none of them waits behind it.
    readers = [f"ap:block:{{b}}:{i}" for i in range(20)]
    await asyncio.gather(*(auto.set(k, "v") for k in readers))
    assert await asyncio.gather(*(auto.get(k) for k in readers)) == [b"v"] * 20
    assert not blocked.done()
    await auto.rpush(key, "wake")
    assert await asyncio.wait_for(blocked, 10) == (key.encode(), b"wake")


def test_what_may_join_a_batch() -> None:
    class Node:
        host, port, name = "127.0.0.1", 7000, "127.0.0.1:7000"

    def routed(*call: object, **options: object) -> Command:
        command = Command.from_call(tuple(call), dict(options))
        command.node = Node()
        return command

    assert can_batch(routed("GET", "k"))
    assert can_batch(routed("SET", "k", "v", "EX", 5))
    assert can_batch(routed("EVALSHA", "abc", 1, "k"))
    assert not can_batch(Command.from_call(("GET", "k"), {}))  # routing chose no node
    assert not can_batch(routed("GET", "k", target_nodes=Node()))  # the caller chose one
    assert not can_batch(routed("PING"))  # no key
    assert not can_batch(routed("BLPOP", "k", 0))  # blocking
    assert not can_batch(routed("XREAD", "BLOCK", 0, "STREAMS", "s", "$"))
    assert not can_batch(routed("WATCH", "k"))  # connection state
    assert not can_batch(routed("SORT", "k", "BY", "nosort", "STORE", "d"))  # keys unknown


async def test_a_moved_reply_in_a_batch_is_followed_per_command(
    otel: Otel,  # noqa: F811
    cluster_nodes: str,
    devcluster: DevCluster,
) -> None:
    key = "ap:moved:{m}"
    async with otel.client(cluster_nodes, auto_pipeline=True) as client:
        await client.set(key, "v")
        owner = devcluster.primary_for_key(key)
        cluster = client.get_cluster()
        wrong = next(n for n in cluster.get_primaries() if n.port != owner.port)
        cluster.nodes_manager.slots_cache[client.keyslot(key)] = [wrong]  # a stale slot map
        other = "ap:moved:other"  # a key the wrong node does serve, in the same batch
        await client.set(other, "w")
        assert cluster.nodes_manager.get_node_from_slot(client.keyslot(key)) is wrong
        otel.flush()
        otel.receiver.clear()
        got = await asyncio.gather(client.get(key), client.get(other))
        assert got == [b"v", b"w"]
        # The slot map was patched: the next read goes straight to the owner.
        assert cluster.nodes_manager.get_node_from_slot(client.keyslot(key)).port == owner.port
        spans = otel.spans("GET")
    moved = [s for s in spans if s.events_named(t.EVENT_REDIRECT)]
    assert len(moved) == 1
    (redirect,) = moved[0].events_named(t.EVENT_REDIRECT)
    assert (redirect[t.REDIRECT_KIND], redirect[t.REDIRECT_FROM_PORT]) == ("MOVED", wrong.port)
    assert redirect["server.port"] == owner.port
    assert moved[0].attributes["server.port"] == owner.port


async def test_batches_are_on_spans_and_in_a_histogram(
    otel: Otel,  # noqa: F811
    cluster_nodes: str,
) -> None:
    async with otel.client(cluster_nodes, auto_pipeline=True) as client:
        keys = [f"ap:span:{{s}}:{i}" for i in range(8)]  # one slot: one node, one batch
        await asyncio.gather(*(client.set(k, "v") for k in keys))
        sizes = pipeliner(client).batched_commands, pipeliner(client).batches
        spans = otel.spans("SET")
        metrics = otel.metrics()
    assert len(spans) == 8
    # The first SET found nothing on its way to the node and went at once, alone; the other
    # seven, queued in the same loop turn, shared the next write.
    batch_sizes = sorted(s.attributes.get(t.BATCH_SIZE_ATTRIBUTE, 0) for s in spans)
    assert batch_sizes == [0] + [7] * 7, batch_sizes
    histogram = metrics[t.AUTO_PIPELINE_BATCH]
    assert histogram.kind == "histogram"
    assert sum(p.count or 0 for p in histogram.points) == sizes[1]
    assert sum(p.sum or 0 for p in histogram.points) == sizes[0]
    assert all("server.port" in p.attributes for p in histogram.points)


async def test_without_auto_pipelining_nothing_is_batched(cluster_nodes: str) -> None:
    client = create_redis_cluster(cluster_nodes, autoload=False, auto_pipeline=False)
    backend: Any = client._backend
    assert backend.execute.__name__ == "_execute_alone"
    async with client:
        # 50 overlapping commands to one slot: each goes alone. (The writer exists for
        # client.pipeline()'s node batches, which it never counts as auto-pipelined.)
        await asyncio.gather(*(client.incr("{nobatch}:n") for _ in range(50)))
        pipe = client.pipeline()
        pipe.set("{nobatch}:a", 1).get("{nobatch}:a")
        assert await pipe.execute() == [True, b"1"]
        assert await client.get("{nobatch}:n") == b"50"
        await client.delete("{nobatch}:n", "{nobatch}:a")
    assert (backend._auto.batches, backend._auto.batched_commands) == (0, 0)
