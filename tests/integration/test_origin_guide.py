"""Every usage example of the original package's guide, in Python naming, on a real cluster."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from resilient_cache import (
    CircuitBreakerOpenError,
    MultiLayerCache,
    RedisCircuitBreaker,
    RedisClusterClient,
    create_redis_cluster,
    parse_cluster_nodes,
)
from tests.conftest import async_wait_until


async def test_quick_start_environment_and_basic_usage(cluster_nodes, monkeypatch) -> None:
    monkeypatch.setenv("REDIS_CLUSTER_NODES", cluster_nodes)
    import os

    nodes = parse_cluster_nodes(os.environ["REDIS_CLUSTER_NODES"])
    cluster = create_redis_cluster(
        nodes,
        max_retries=3,
        retry_delay=1.0,
        health_check_interval=30.0,
        circuit_breaker_threshold=5,
        autoload=False,
    )
    async with cluster:
        await cluster.execute_command("set", "mykey", "myvalue", "EX", 3600)
        assert await cluster.execute_command("get", "mykey") == b"myvalue"
        assert 0 < await cluster.ttl("mykey") <= 3600

        stats = await cluster.get_stats()
        assert (stats.connected_nodes, stats.total_nodes) == (6, 6)
        assert stats.health == "healthy"

        metrics = cluster.get_metrics()
        assert metrics.commands.total >= 3
        assert metrics.commands.successful / metrics.commands.total * 100 == 100.0
        assert metrics.latency.p95 > 0


async def test_individual_node_variables(devcluster, cluster_nodes, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    lines = []
    for n, node in enumerate(devcluster.nodes[:3], start=1):
        lines += [f"REDIS_NODE_{n}_HOST={node.host}", f"REDIS_NODE_{n}_PORT={node.port}"]
    Path(".env").write_text("\n".join(lines) + "\n")  # the guide puts them in .env
    cluster = create_redis_cluster(autoload=False, health_check_interval=0)
    assert len(cluster.settings.cluster_nodes) == 3
    async with cluster:
        assert await cluster.set("from-numbered-nodes", 1)


async def test_multi_layer_cache_with_redis_circuit_breaker(cluster_nodes) -> None:
    cluster = create_redis_cluster(
        parse_cluster_nodes(cluster_nodes), autoload=False, health_check_interval=0
    )
    async with cluster:
        redis_circuit_breaker = RedisCircuitBreaker(
            redis=cluster.get_cluster(), failure_threshold=5, reset_timeout=60.0
        )
        cache = MultiLayerCache(
            "my-cache",
            redis_circuit_breaker,
            memory={"max_size": 1000, "default_ttl": 300, "cleanup_interval": 60},
            redis={"default_ttl": 3600, "key_prefix": "app:"},
        )
        loads = 0

        async def fetch_user_from_database(user_id: str) -> dict[str, str]:
            nonlocal loads
            loads += 1
            await asyncio.sleep(0.01)
            return {"id": user_id, "name": "Ada"}

        results = await asyncio.gather(
            *(
                cache.get_or_set("user:123", lambda: fetch_user_from_database("123"))
                for _ in range(50)
            )
        )
        assert all(r == {"id": "123", "name": "Ada"} for r in results)
        assert loads == 1  # one loader call for 50 concurrent misses
        raw = await cluster.get_cluster().get("app:user:123")
        assert json.loads(raw) == {"id": "123", "name": "Ada"}
        assert 0 < await cluster.ttl("app:user:123") <= 3600

        # A second cache (another process, say) finds it in Redis, not the loader.
        other = MultiLayerCache("my-cache", cluster, redis={"key_prefix": "app:"})
        assert await other.get_or_set("user:123", lambda: fetch_user_from_database("x")) == {
            "id": "123",
            "name": "Ada",
        }
        assert loads == 1


async def test_connection_pooling_options(cluster_nodes) -> None:
    cluster = create_redis_cluster(
        parse_cluster_nodes(cluster_nodes),
        redis_options={
            "socket_connect_timeout": 10,
            "socket_timeout": 5,
            "socket_keepalive": True,
            "max_connections": 25,
        },
        autoload=False,
        health_check_interval=0,
    )
    async with cluster:
        raw: RedisCluster = cluster.get_cluster()
        assert isinstance(raw, RedisCluster)
        kwargs = raw.get_connection_kwargs()
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (5, 10)
        assert kwargs["max_connections"] == 25
        assert await cluster.ping()


async def test_circuit_breaker_tuning_and_manual_reset(cluster_nodes) -> None:
    cluster = create_redis_cluster(
        parse_cluster_nodes(cluster_nodes),
        circuit_breaker_threshold=5,
        circuit_breaker_timeout=60.0,
        max_retries=3,
        retry_delay=1.0,
        autoload=False,
        health_check_interval=0,
    )
    async with cluster:
        assert cluster.settings.breaker.threshold == 5
        assert cluster.settings.breaker.reset_timeout == 60.0
        assert not cluster.is_circuit_breaker_open()
        node = cluster.get_cluster().get_node_from_key("guarded")
        cluster.isolate_node(node.name)  # as a run of failures would
        assert cluster.is_circuit_breaker_open()
        assert cluster.is_circuit_breaker_open(node.name)
        with pytest.raises(CircuitBreakerOpenError, match="Circuit breaker is open"):
            await cluster.get("guarded")
        cluster.manual_reset_circuit_breaker()
        assert not cluster.is_circuit_breaker_open()
        assert await cluster.get("guarded") is None


async def test_health_monitoring_statistics(cluster_nodes) -> None:
    cluster = create_redis_cluster(
        parse_cluster_nodes(cluster_nodes),
        health_check_interval=0.2,
        health_check_timeout=5.0,
        autoload=False,
    )
    async with cluster:
        stats = await cluster.get_stats()
        assert stats.total_nodes == 6
        assert (stats.primary_nodes, stats.replica_nodes) == (3, 3)
        assert stats.health == "healthy"
        for node in stats.nodes:
            assert node.role in ("primary", "replica")
            assert node.status == "connected"
            assert node.used_memory_human and node.used_memory_human[-1] in "BKMG"
            assert node.connected_clients >= 1
        probes_before = cluster._monitor.probes
        await async_wait_until(
            lambda: _ready(cluster._monitor.probes > probes_before + 1),
            10,
            "the background monitor to probe twice",
        )


async def _ready(value: bool) -> bool:
    return value


async def test_graceful_shutdown(cluster_nodes) -> None:
    cluster = create_redis_cluster(cluster_nodes, autoload=False, health_check_interval=0.1)
    await cluster.connect()
    await cluster.set("bye", 1)
    await cluster.disconnect()
    await cluster.disconnect()  # idempotent
    with pytest.raises(redis.exceptions.ConnectionError, match="disconnected"):
        await cluster.get("bye")
    assert cluster._monitor._task is None


async def test_migration_dual_write_and_fallback(cluster_nodes, standalone_redis) -> None:
    single = redis.asyncio.Redis.from_url(standalone_redis)
    cluster: RedisClusterClient = create_redis_cluster(
        parse_cluster_nodes(cluster_nodes), autoload=False, health_check_interval=0
    )

    async def set_with_dual_write(key: str, value: str) -> None:
        await asyncio.gather(single.set(key, value), cluster.execute_command("set", key, value))

    async def get_with_fallback(key: str) -> bytes | None:
        try:
            return await cluster.execute_command("get", key)
        except Exception:
            return await single.get(key)

    async with cluster:
        await set_with_dual_write("migrating", "v1")
        assert await single.get("migrating") == b"v1"
        assert await get_with_fallback("migrating") == b"v1"
        node = cluster.get_cluster().get_node_from_key("migrating")
        cluster.isolate_node(node.name)  # the cluster path fails: the fallback answers
        assert await get_with_fallback("migrating") == b"v1"
    await single.aclose()


async def test_standalone_backend_from_redis_url(standalone_redis, monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", standalone_redis)
    single = create_redis_cluster(autoload=False, health_check_interval=0)
    assert single.backend.name == "standalone"
    async with single:
        await single.set("plain", "redis")
        assert await single.get("plain") == b"redis"
        stats = await single.get_stats()
        assert (stats.total_nodes, stats.health) == (1, "healthy")


async def test_disconnect_drains_commands_in_flight(cluster_nodes) -> None:
    """SIGTERM handler style: disconnect() while commands run; they finish, new ones are refused,
    nothing is left pending."""
    cluster = create_redis_cluster(cluster_nodes, autoload=False, health_check_interval=0.1)
    await cluster.connect()
    # BLPOP on an empty list holds a command in flight for 0.3 s.
    in_flight = [asyncio.create_task(cluster.blpop([f"drain:{n}"], timeout=0.3)) for n in range(5)]
    await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()
    await cluster.disconnect()
    assert asyncio.get_running_loop().time() - started < cluster.settings.drain_timeout
    assert [await t for t in in_flight] == [None] * 5  # finished normally, not cut off
    with pytest.raises(redis.exceptions.ConnectionError, match="disconnected"):
        await cluster.get("drain:0")
    pending = [t for t in asyncio.all_tasks() if "resilient_cache" in t.get_name()]
    assert pending == []


async def test_disconnect_does_not_wait_forever(cluster_nodes) -> None:
    cluster = create_redis_cluster(
        cluster_nodes,
        autoload=False,
        health_check_interval=0,
        drain_timeout=0.2,
        timeout={"deadline": 30.0},
        socket_timeout=30.0,
    )
    await cluster.connect()
    stuck = asyncio.create_task(cluster.blpop(["drain:never"], timeout=10))
    await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()
    await cluster.disconnect()
    assert asyncio.get_running_loop().time() - started < 2.0
    with pytest.raises(redis.exceptions.ConnectionError):  # its connection was closed
        await stuck


async def test_health_monitor_lets_a_recovered_node_probe_early(cluster_nodes) -> None:
    cluster = create_redis_cluster(
        cluster_nodes, autoload=False, health_check_interval=0.2, circuit_breaker_timeout=600.0
    )
    async with cluster:
        node = cluster.get_cluster().get_node_from_key("early-probe")
        breaker = cluster.breakers.get(node.name)
        for _ in range(breaker.threshold):  # as a burst of failures would
            breaker.on_failure()
        assert cluster.is_circuit_breaker_open(node.name)
        # The node answers the monitor's probes, so the 600 s open period is cut short.
        await async_wait_until(
            lambda: _ready(breaker.retry_after() == 0.0), 5, "the monitor to allow a probe"
        )
        assert await cluster.set("early-probe", 1)
        assert not cluster.is_circuit_breaker_open(node.name)
