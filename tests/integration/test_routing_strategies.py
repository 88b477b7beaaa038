"""The read strategies, replica health rules, the per-call override and hedged reads on the real
dev cluster (three primaries, one replica each, all on 127.0.0.1).

A stage placed right after routing (``nodelog``) records where each attempt went; Redis's own
counters (``INFO commandstats``) confirm that replicas served reads themselves, not by
redirecting them. Faults are short and real: ``CLIENT PAUSE`` on a replica (slow, or lagging
behind its primary) and ``SIGSTOP`` of a replica for well under the cluster's node timeout.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from resilient_cache import Command, Handler, RedisClusterClient, create_redis_cluster, hookimpl
from resilient_cache.devcluster import DevCluster
from resilient_cache.stages.routing import EVENT_HEDGE, HEDGES, ReplicaRoutingStage
from tests.conftest import async_wait_until

STAGES = ["timeout", "retry", "routing", "nodelog", "breaker"]


class _NoSettings(BaseModel):
    pass


class NodeLog:
    """Placed after routing: ``[command name, node sent to, node that answered]`` per attempt,
    in the order they were sent (the answering node filled in when the attempt ends)."""

    def __init__(self) -> None:
        self.attempts: list[list[str]] = []

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        attempt = [command.name, command.node.name if command.node is not None else "?", ""]
        self.attempts.append(attempt)
        try:
            return await call_next(command)
        finally:
            attempt[2] = command.node.name if command.node is not None else "?"

    def nodes(self, name: str = "GET") -> list[str]:
        return [sent for command, sent, _ in self.attempts if command == name]

    def clear(self) -> None:
        self.attempts.clear()

    @hookimpl
    def resilient_cache_register_stages(self, registry: Any) -> None:
        registry.add("nodelog", _NoSettings, lambda settings, context: self)


class Topology:
    """The client's slot map, as seen for some keys: which primary and replica serve each."""

    def __init__(self, client: RedisClusterClient) -> None:
        self._slots = client.get_cluster().nodes_manager.slots_cache
        self._client = client

    def nodes_of(self, key: str) -> list[Any]:
        return self._slots[self._client.keyslot(key)]

    def primary(self, key: str) -> str:
        return str(self.nodes_of(key)[0].name)

    def replica(self, key: str) -> str:
        return str(self.nodes_of(key)[1].name)


@asynccontextmanager
async def routed_client(
    devcluster: DevCluster, log: NodeLog, routing: dict[str, Any], **options: Any
) -> AsyncIterator[RedisClusterClient]:
    client = create_redis_cluster(
        devcluster.startup_nodes,
        stages=options.pop("stages", STAGES),
        plugins=[log],
        autoload=False,
        health_check_interval=0,
        routing=routing,
        **options,
    )
    async with client:
        # A cluster lists its replicas in CLUSTER SLOTS some seconds after it reports ready.
        slots = client.get_cluster().nodes_manager

        async def replicas_listed() -> bool:
            await client.backend.refresh_topology()
            return len(slots.slots_cache) == 16384 and all(
                len(nodes) == 2 for nodes in slots.slots_cache.values()
            )

        await async_wait_until(replicas_listed, 30, "every slot's replica in the slot map", 0.5)
        yield client


def keys_per_shard(client: RedisClusterClient, per_shard: int = 4) -> dict[str, list[str]]:
    """Fresh keys, ``per_shard`` for each primary (by name)."""
    topology, prefix = Topology(client), uuid.uuid4().hex[:8]
    found: dict[str, list[str]] = {}
    index = 0
    while len(found) < 3 or min(len(keys) for keys in found.values()) < per_shard:
        key = f"route:{prefix}:{index}"
        index += 1
        keys = found.setdefault(topology.primary(key), [])
        if len(keys) < per_shard:
            keys.append(key)
    return found


def wait_replicated(devcluster: DevCluster) -> None:
    """Every replica has applied everything its primary has."""

    def caught_up() -> bool:
        for primary in devcluster.primaries():
            replica = devcluster.replica_of(primary)
            assert replica is not None
            head = devcluster.info(primary, "replication")["master_repl_offset"]
            if devcluster.info(replica, "replication").get("slave_repl_offset") != head:
                return False
        return True

    devcluster.wait_for(caught_up, 10, "the replicas to catch up")


def gets_served(devcluster: DevCluster) -> dict[int, int]:
    """GETs each node has run itself, by port (``INFO commandstats``)."""
    return {
        node.port: int(devcluster.info(node, "commandstats").get("cmdstat_get", {}).get("calls", 0))
        for node in devcluster.nodes
    }


def ports(names: list[str]) -> set[int]:
    return {int(name.rsplit(":", 1)[1]) for name in names}


async def write_all(client: RedisClusterClient, keys: list[str]) -> None:
    for key in keys:
        await client.set(key, key)


# -- the strategies ------------------------------------------------------------------------------


async def test_round_robin_replicas_never_reads_from_a_primary(devcluster, cluster_nodes) -> None:
    log = NodeLog()
    async with routed_client(devcluster, log, {"strategy": "round_robin_replicas"}) as client:
        shards = keys_per_shard(client)
        keys = [key for keys in shards.values() for key in keys]
        await write_all(client, keys)
        assert await client.incr(keys[0] + ":n") == 1
        wait_replicated(devcluster)
        primaries = {p.port for p in devcluster.primaries()}
        replicas = {r.port for r in devcluster.replicas()}
        assert ports(log.nodes("SET")) <= primaries and ports(log.nodes("INCR")) <= primaries
        before = gets_served(devcluster)
        for key in keys * 2:
            assert await client.get(key) == key.encode()
        sent = log.nodes("GET")
        assert len(sent) == 2 * len(keys)
        assert ports(sent) == replicas  # every replica served, and only replicas
        # Answered where sent (no MOVED back to a primary), and run by the replicas themselves.
        assert all(to == answered for name, to, answered in log.attempts if name == "GET")
        after = gets_served(devcluster)
        assert sum(after[port] - before[port] for port in replicas) >= len(sent)
        assert sum(after[port] - before[port] for port in primaries) == 0


async def test_replica_preferred_and_the_per_call_override(devcluster, cluster_nodes) -> None:
    log = NodeLog()
    async with routed_client(devcluster, log, {"strategy": "replica_preferred"}) as client:
        topology = Topology(client)
        shards = keys_per_shard(client, per_shard=2)
        keys = [key for keys in shards.values() for key in keys]
        await write_all(client, keys)
        wait_replicated(devcluster)
        for key in keys:
            assert await client.get(key) == key.encode()
        assert log.nodes() == [topology.replica(key) for key in keys]

        log.clear()
        with client.primary_reads():
            await client.set(keys[0], "new")
            assert await client.get(keys[0]) == b"new"  # read your write: on the primary
            assert await asyncio.create_task(client.get(keys[1])) == keys[1].encode()
        assert log.nodes() == [topology.primary(keys[0]), topology.primary(keys[1])]
        log.clear()
        await client.get(keys[1])
        assert log.nodes() == [topology.replica(keys[1])]

        # A replica's open breaker never blocks its shard: its reads move to the primary.
        log.clear()
        client.isolate_node(topology.replica(keys[1]))
        assert await client.get(keys[1]) == keys[1].encode()
        assert log.nodes() == [topology.primary(keys[1])]
        client.manual_reset_circuit_breaker()


async def test_batches_follow_the_strategy_or_their_primaries(devcluster, cluster_nodes) -> None:
    """A read-only batch in one slot is routed like a read; a batch over several slots, and a
    transaction, read from primaries (redis-py's pipeline would spread them over replicas)."""
    log = NodeLog()
    async with routed_client(devcluster, log, {"strategy": "round_robin_replicas"}) as client:
        topology = Topology(client)
        tag = uuid.uuid4().hex[:8]
        same_slot = [f"{{batch:{tag}}}:{n}" for n in range(3)]
        spread = [key for keys in keys_per_shard(client, per_shard=2).values() for key in keys]
        await write_all(client, same_slot + spread)
        wait_replicated(devcluster)
        replicas = {r.port for r in devcluster.replicas()}
        primaries = {p.port for p in devcluster.primaries()}

        async def read_batch(keys: list[str], transaction: bool = False) -> dict[int, int]:
            before = gets_served(devcluster)
            async with client.pipeline(transaction=transaction) as pipe:
                for key in keys:
                    pipe.get(key)
                assert await pipe.execute() == [key.encode() for key in keys]
            after = gets_served(devcluster)
            return {port: n - before[port] for port, n in after.items() if n > before[port]}

        log.clear()
        served = await read_batch(same_slot)
        assert log.nodes("PIPELINE") == [topology.replica(same_slot[0])]
        assert set(served) == ports([topology.replica(same_slot[0])])
        served = await read_batch(spread)
        assert set(served) <= primaries and sum(served.values()) == len(spread)
        served = await read_batch(same_slot, transaction=True)
        assert set(served) == ports([topology.primary(same_slot[0])])
        with client.primary_reads():
            served = await read_batch(same_slot)
        assert set(served) == ports([topology.primary(same_slot[0])])
        assert not set(served) & replicas


async def test_read_from_replicas_takes_turns_with_the_primary(devcluster, cluster_nodes) -> None:
    log = NodeLog()
    async with routed_client(devcluster, log, {"read_from_replicas": True}) as client:
        topology = Topology(client)
        key = keys_per_shard(client, per_shard=1).popitem()[1][0]
        await client.set(key, "v")
        wait_replicated(devcluster)
        for _ in range(10):
            assert await client.get(key) == b"v"
        counts = Counter(log.nodes())
        assert counts == Counter({topology.primary(key): 5, topology.replica(key): 5})


async def test_random_replica_reads_from_replicas(devcluster, cluster_nodes) -> None:
    log = NodeLog()
    async with routed_client(devcluster, log, {"strategy": "random_replica"}) as client:
        topology = Topology(client)
        keys = [k for keys in keys_per_shard(client, per_shard=3).values() for k in keys]
        await write_all(client, keys)
        wait_replicated(devcluster)
        for key in keys:
            assert await client.get(key) == key.encode()
        assert log.nodes() == [topology.replica(key) for key in keys]


async def test_zone_reads_from_the_preferred_nodes_first(devcluster, cluster_nodes) -> None:
    log = NodeLog()
    async with routed_client(devcluster, log, {"strategy": "replica_preferred"}) as probe:
        shards = keys_per_shard(probe, per_shard=2)
        topology = Topology(probe)
        (key_a, _), (key_b, _), _ = shards.values()
        replica_a, primary_b = topology.replica(key_a), topology.primary(key_b)
    for prefer, expected in (
        # Shard A's replica by host:port; shard B has no preferred node: its replica.
        ([f"127.0.0.1:{replica_a.rsplit(':')[1]}"], [replica_a, topology.replica(key_b)]),
        # Shard B's primary matches: it serves its shard's reads.
        ([primary_b], [topology.replica(key_a), primary_b]),
    ):
        log = NodeLog()
        routing = {"strategy": "zone", "prefer": prefer}
        async with routed_client(devcluster, log, routing) as client:
            await write_all(client, [key_a, key_b])
            wait_replicated(devcluster)
            for _ in range(3):
                assert [await client.get(key_a), await client.get(key_b)] == [
                    key_a.encode(),
                    key_b.encode(),
                ]
            assert log.nodes() == expected * 3
    # A CIDR holding every node: the primary and the replica take turns.
    log = NodeLog()
    async with routed_client(
        devcluster, log, {"strategy": "zone", "prefer": ["127.0.0.0/8"]}
    ) as client:
        for _ in range(4):
            await client.get(key_a)
        assert Counter(log.nodes()) == Counter({topology.primary(key_a): 2, replica_a: 2})


# It compares latencies measured on the spot: with both cores busy the replica's PING time and
# the primary's average can swap (a CI-like run with two CPU burners failed it). `make chaos`
# runs it; `make test` does not.
@pytest.mark.chaos_slow
async def test_latency_moves_reads_off_a_slow_replica_and_back(devcluster, cluster_nodes) -> None:
    """CLIENT PAUSE on a replica makes its reads really slow for 300 ms: the reads move to the
    primary and stay there; two health probes later (the replica served nothing in between)
    the replica's PING time stands for it and it serves again."""
    log = NodeLog()
    routing = {"strategy": "latency", "latency_tolerance": 3.0}
    async with routed_client(devcluster, log, routing) as client:
        topology = Topology(client)
        key = keys_per_shard(client, per_shard=1).popitem()[1][0]
        replica, primary = topology.replica(key), topology.primary(key)
        facts = client.backend.node_facts
        await client.set(key, "v")
        wait_replicated(devcluster)
        for _ in range(20):  # opens the connections (a first read pays for its handshake)
            assert await client.get(key) == b"v"
        await client.get_stats()
        await client.get_stats()  # both nodes' averages now from warm round trips
        log.clear()
        for _ in range(20):
            assert await client.get(key) == b"v"
        shown = (log.nodes(), facts.latency(primary), facts.latency(replica))
        assert replica in log.nodes() and primary in log.nodes(), shown  # near-equal: shared
        paused = devcluster.node_by_port(int(replica.rsplit(":", 1)[1]))
        devcluster.admin(paused).execute_command("CLIENT", "PAUSE", 300, "ALL")
        log.clear()
        for _ in range(20):
            assert await client.get(key) == b"v"
        shown = (log.nodes(), facts.latency(primary), facts.latency(replica))
        assert log.nodes().count(replica) == 1, shown  # the one read that met the pause
        assert log.nodes()[-10:] == [primary] * 10, shown
        assert (facts.latency(replica) or 0) > 10 * (facts.latency(primary) or 1), shown
        await async_wait_until(
            lambda: asyncio.to_thread(lambda: devcluster.admin(paused).ping()), 5, "the unpause"
        )
        await client.get_stats()  # the replica served since the last probe: averaged in
        await client.get_stats()  # it served nothing since: its PING time stands
        log.clear()
        for _ in range(20):
            assert await client.get(key) == b"v"
        shown = (log.nodes(), facts.latency(primary), facts.latency(replica))
        assert replica in log.nodes(), shown


async def test_a_lagging_replica_serves_no_reads_until_it_catches_up(
    devcluster, cluster_nodes
) -> None:
    """CLIENT PAUSE WRITE on a replica stops it applying its replication stream (INFO still
    answers): 100 kB written to the primary is 100 kB of lag, beyond max_lag."""
    log = NodeLog()
    routing = {"strategy": "replica_preferred", "max_lag": 10_000}
    async with routed_client(devcluster, log, routing) as client:
        topology = Topology(client)
        key = keys_per_shard(client, per_shard=1).popitem()[1][0]
        await client.set(key, "old")
        wait_replicated(devcluster)
        await client.get_stats()
        replica, primary = topology.replica(key), topology.primary(key)
        assert client.backend.node_facts.lag(replica, primary) == 0
        assert await client.get(key) == b"old"
        lagging = devcluster.node_by_port(int(replica.rsplit(":", 1)[1]))
        admin = devcluster.admin(lagging)
        admin.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
        try:
            await client.set(key, "x" * 100_000)
            stats = await client.get_stats()
            assert (client.backend.node_facts.lag(replica, primary) or 0) >= 100_000
            (seen,) = [n for n in stats.nodes if f"{n.host}:{n.port}" == replica]
            assert seen.link_up is True and seen.status == "connected"  # only lagging
            log.clear()
            assert await client.get(key) == b"x" * 100_000  # from the primary
            assert log.nodes() == [primary]
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        wait_replicated(devcluster)
        await client.get_stats()
        log.clear()
        assert await client.get(key) == b"x" * 100_000
        assert log.nodes() == [replica]


# -- hedged reads --------------------------------------------------------------------------------


def _our_connections(devcluster: DevCluster, node: Any, name: str) -> int:
    return sum(1 for c in devcluster.admin(node).client_list() if c.get("name") == name)


async def test_a_read_stuck_on_a_frozen_replica_is_answered_by_the_hedge(
    devcluster, cluster_nodes
) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    log = NodeLog()
    name = f"hedge-{uuid.uuid4().hex[:6]}"
    routing = {"strategy": "replica_preferred", "hedge_after": 0.05}
    async with routed_client(
        devcluster,
        log,
        routing,
        stages=["tracing", "metrics", *STAGES],
        client_name=name,
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    ) as client:
        topology = Topology(client)
        keys = keys_per_shard(client, per_shard=20).popitem()[1]
        await write_all(client, keys)
        wait_replicated(devcluster)
        assert await client.get(keys[0]) == keys[0].encode()  # a connection to the replica
        replica_node = topology.nodes_of(keys[0])[1]
        replica, primary = replica_node.name, topology.primary(keys[0])
        assert log.nodes() == [replica]
        connected = sum(c.is_connected for c in replica_node._connections)
        frozen = devcluster.node_by_port(replica_node.port)
        on_server = _our_connections(devcluster, frozen, name)
        assert connected >= 1 and on_server >= 1
        stage = client.stage("routing")
        assert isinstance(stage, ReplicaRoutingStage)
        log.clear()
        exporter.clear()
        devcluster.pause(frozen)
        try:
            assert await client.get(keys[1]) == keys[1].encode()
            assert (stage.hedges, stage.hedges_won) == (1, 1)
            assert log.nodes() == [replica, primary]  # the read, then its hedge
            # The loser was cancelled: redis-py dropped its connection, reply still due.
            await async_wait_until(
                _async(
                    lambda: sum(c.is_connected for c in replica_node._connections) == connected - 1
                ),
                0.5,
                "the loser's connection to be dropped",
                interval=0.01,
            )
        finally:
            devcluster.resume(frozen)
        devcluster.wait_ready(30)
        await async_wait_until(
            _async(lambda: _our_connections(devcluster, frozen, name) == on_server - 1),
            5,
            "the replica to see the loser's connection closed",
        )
        # Every later reply is the caller's own (no reply left behind on a reused connection).
        log.clear()
        replies = [await client.get(key) for key in keys]
        assert replies == [key.encode() for key in keys]
        assert set(log.nodes()) == {replica}

    (span,) = [
        s for s in exporter.get_finished_spans() if any(e.name == EVENT_HEDGE for e in s.events)
    ]
    (event,) = [e for e in span.events if e.name == EVENT_HEDGE]
    assert dict(event.attributes or {})["server.port"] == int(primary.rsplit(":", 1)[1])
    assert dict(event.attributes or {})["resilient_cache.hedge.won"] is True
    assert span.attributes is not None and span.attributes["server.port"] == int(
        primary.rsplit(":", 1)[1]
    )
    hedges = {
        point.attributes["resilient_cache.hedge.won"]: point.value
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == HEDGES
        for point in metric.data.data_points
    }
    assert hedges == {True: 1, False: 0}


async def test_the_hedge_budget_caps_hedges_on_a_frozen_replica(devcluster, cluster_nodes) -> None:
    log = NodeLog()
    routing = {"strategy": "replica_preferred", "hedge_after": 0.05, "hedge_budget": 0.1}
    async with routed_client(devcluster, log, routing) as client:
        topology = Topology(client)
        keys = keys_per_shard(client, per_shard=20).popitem()[1]
        await write_all(client, keys)
        wait_replicated(devcluster)
        for key in keys[:5]:
            assert await client.get(key) == key.encode()  # warm: 5 reads in the window
        stage = client.stage("routing")
        assert isinstance(stage, ReplicaRoutingStage) and stage.budget is not None
        replica_node = topology.nodes_of(keys[0])[1]
        frozen = devcluster.node_by_port(replica_node.port)
        devcluster.pause(frozen)
        try:
            reads = [asyncio.create_task(client.get(key)) for key in keys]
            allowed = math.ceil(max(1.0, 0.1 * (5 + len(keys))))  # 3 of 25 reads

            async def every_timer_fired_and_the_hedges_answered() -> bool:
                fired = stage.hedges + stage.over_budget == len(keys)
                return fired and sum(read.done() for read in reads) >= allowed

            await async_wait_until(
                every_timer_fired_and_the_hedges_answered, 0.6, "the hedged reads", 0.01
            )
            assert stage.budget.reads == 5 + len(keys)
            assert (stage.hedges, stage.hedges_won) == (allowed, allowed)
            assert stage.over_budget == len(keys) - allowed
            assert sum(read.done() for read in reads) == allowed  # the rest wait for it
        finally:
            devcluster.resume(frozen)
        replies = await asyncio.gather(*reads)
        assert replies == [key.encode() for key in keys]
        devcluster.wait_ready(30)


def _async(predicate: Any) -> Any:
    async def check() -> Any:
        return predicate()

    return check
