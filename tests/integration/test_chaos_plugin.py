"""The chaos plugin (plugins/chaos) on the real cluster: found by its entry point, placed by
REDIS_STAGES, and each fault reaching the retry stage, the breakers and the caller as documented
in docs/chaos.md; reproducible with a seed; its span events and counter on an OTLP endpoint."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
import resilient_cache_chaos
from redis.exceptions import ClusterDownError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resilient_cache import (
    CircuitBreakerOpenError,
    CommandInDoubtError,
    CommandTimeoutError,
    RedisClusterClient,
    create_redis_cluster,
)
from resilient_cache.devcluster import DevCluster
from tests.conftest import async_wait_until

from .test_telemetry import Otel, otel  # noqa: F401 - the fixture

INSIDE_RETRY = "metrics,timeout,retry,routing,chaos,breaker"
AFTER_BREAKER = "metrics,timeout,retry,routing,breaker,chaos"
OUTSIDE_RETRY = "metrics,chaos,timeout,retry,routing,breaker"
DOCS = Path(__file__).parents[2] / "docs" / "chaos.md"


def chaos_client(
    nodes: str, stages: str, chaos: dict[str, Any], **options: Any
) -> RedisClusterClient:
    """A client with the chaos stage on (rate 1 unless told), 2 quick retries unless told."""
    options.setdefault("retry", {"max_retries": 2, "delay": 0.01})
    return create_redis_cluster(
        nodes,
        autoload=False,  # only the built-ins and the plugin passed here
        plugins=[resilient_cache_chaos],
        health_check_interval=0,
        stages=stages,
        chaos={"enabled": True, "rate": 1.0, **chaos},
        **options,
    )


def key_elsewhere(devcluster: DevCluster, node: Any) -> str:
    """A key another primary than ``node`` serves."""
    return next(
        f"chaos:elsewhere:{i}"
        for i in range(1000)
        if devcluster.primary_for_key(f"chaos:elsewhere:{i}") != node
    )


def refused_by(node: Any) -> str:
    return rf"^Error 111 connecting to {re.escape(node.address)}\. Connection refused\."


async def test_found_by_its_entry_point_and_placed_by_redis_stages(
    cluster_nodes: str, monkeypatch: pytest.MonkeyPatch, devcluster: DevCluster
) -> None:
    """plugins/chaos is installed by `make test` as a real distribution: autoload finds it."""
    monkeypatch.setenv("REDIS_STAGES", INSIDE_RETRY)
    monkeypatch.setenv("REDIS_CHAOS__ENABLED", "true")
    monkeypatch.setenv("REDIS_CHAOS__RATE", "1")
    monkeypatch.setenv("REDIS_CHAOS__COMMANDS", '["GET"]')
    cluster = create_redis_cluster(cluster_nodes, health_check_interval=0)
    assert cluster.stage_specs["chaos"].plugin == "chaos"  # the entry point's name
    assert cluster.active_stages == INSIDE_RETRY.split(",")
    key = "chaos:found"
    async with cluster:
        assert await cluster.set(key, "v")  # not a matching command
        with pytest.raises(RedisConnectionError, match=refused_by(devcluster.primary_for_key(key))):
            await cluster.get(key)
    monkeypatch.setenv("REDIS_CHAOS__ENABLED", "false")  # the default: not even built
    assert "chaos" not in create_redis_cluster(cluster_nodes, health_check_interval=0).active_stages


async def test_connection_error_inside_retry_is_retried_even_for_incr(
    cluster_nodes: str, client: RedisClusterClient, devcluster: DevCluster
) -> None:
    key = "chaos:incr-refused"
    await client.delete(key)
    chaotic = chaos_client(cluster_nodes, INSIDE_RETRY, {"fault": "connection_error"})
    async with chaotic:
        with pytest.raises(
            RedisConnectionError, match=refused_by(devcluster.primary_for_key(key))
        ) as info:
            await chaotic.incr(key)
        assert not isinstance(info.value, CommandInDoubtError)  # never sent: not in doubt
        assert info.value.attempts == 3  # type: ignore[attr-defined]
        assert chaotic.get_metrics().commands.retried == 2
    assert await client.get(key) is None  # none of the three reached Redis


async def test_connection_error_outside_retry_reaches_the_caller_at_once(
    cluster_nodes: str,
) -> None:
    chaotic = chaos_client(cluster_nodes, OUTSIDE_RETRY, {"fault": "connection_error"})
    async with chaotic:
        with pytest.raises(RedisConnectionError, match=r"^Error 111 connecting to 127\.0\.0\.1:"):
            await chaotic.incr("chaos:incr-outside")
        metrics = chaotic.get_metrics().commands
    assert (metrics.failed, metrics.retried) == (1, 0)  # one attempt, no retry


async def test_timeout_is_a_connect_timeout_retried_even_for_incr(
    cluster_nodes: str, client: RedisClusterClient, devcluster: DevCluster
) -> None:
    key = "chaos:incr-timeout"
    await client.delete(key)
    owner = devcluster.primary_for_key(key)
    chaotic = chaos_client(cluster_nodes, INSIDE_RETRY, {"fault": "timeout"})
    async with chaotic:
        with pytest.raises(RedisTimeoutError) as info:
            await chaotic.incr(key)
    assert str(info.value) == f"Timeout connecting to {owner.address}"
    assert not isinstance(info.value, CommandTimeoutError)  # not the deadline
    assert info.value.attempts == 3  # type: ignore[attr-defined]
    assert await client.get(key) is None


async def test_clusterdown_is_retried_with_backoff(cluster_nodes: str) -> None:
    chaotic = chaos_client(cluster_nodes, INSIDE_RETRY, {"fault": "clusterdown"})
    async with chaotic:
        with pytest.raises(ClusterDownError, match=r"^The cluster is down") as info:
            await chaotic.lpush("chaos:clusterdown", "x")  # not idempotent: still safe
    assert info.value.attempts == 3  # type: ignore[attr-defined]
    assert info.value.status_code == "CLUSTERDOWN"


async def test_tryagain_without_a_deadline_uses_up_max_retries(cluster_nodes: str) -> None:
    chaotic = chaos_client(cluster_nodes, "retry,routing,chaos,breaker", {"fault": "tryagain"})
    async with chaotic:
        with pytest.raises(TryAgainError) as info:
            await chaotic.get("chaos:tryagain")
    assert info.value.attempts == 3  # type: ignore[attr-defined]


async def test_tryagain_with_a_deadline_is_retried_until_it(cluster_nodes: str) -> None:
    """A migration step clears in milliseconds: with a deadline, TRYAGAIN is retried every
    50 ms without using up max_retries, until the deadline is near."""
    chaotic = chaos_client(
        cluster_nodes,
        INSIDE_RETRY,
        {"fault": "tryagain"},
        retry={"max_retries": 0},
        timeout={"deadline": 0.6},
    )
    async with chaotic:
        # TryAgainError as the next wait would pass the deadline; CommandTimeoutError when a
        # busy machine stretched the last wait past it. Either way, many attempts.
        with pytest.raises((TryAgainError, CommandTimeoutError)) as info:
            await chaotic.get("chaos:tryagain-deadline")
    assert info.value.attempts > 2  # type: ignore[union-attr]


async def test_moved_reaches_the_caller_unretried_and_the_breaker_stays_closed(
    cluster_nodes: str, devcluster: DevCluster
) -> None:
    key = "chaos:moved"
    owner = devcluster.primary_for_key(key)
    chaotic = chaos_client(
        cluster_nodes,
        AFTER_BREAKER,
        {"fault": "moved", "key_prefixes": [key]},
        breaker={"threshold": 1},
    )
    async with chaotic:
        for _ in range(3):
            with pytest.raises(MovedError) as info:
                await chaotic.get(key)
        assert chaotic.get_metrics().commands.retried == 0
        assert not chaotic.is_circuit_breaker_open()  # a reply: the node answered
        err = info.value
        assert err.slot_id == chaotic.keyslot(key)
        assert (err.host, err.port) != (owner.host, owner.port)  # where the slot "moved"
        assert f"{err.host}:{err.port}" in {n.address for n in devcluster.nodes}
        assert not hasattr(err, "attempts")


async def test_breakers_count_injected_connection_errors_as_real(
    cluster_nodes: str, devcluster: DevCluster
) -> None:
    key = "chaos:breaker"
    owner = devcluster.primary_for_key(key)
    chaotic = chaos_client(
        cluster_nodes,
        AFTER_BREAKER,
        {"fault": "connection_error", "key_prefixes": [key]},
        retry={"max_retries": 5, "delay": 0.01, "failover_wait": 0},  # no failover to wait for
        breaker={"threshold": 2},
    )
    async with chaotic:
        with pytest.raises(CircuitBreakerOpenError) as info:
            await chaotic.get(key)
        assert info.value.attempts == 3  # type: ignore[attr-defined]  # 2 failures, 1 refusal
        assert chaotic.is_circuit_breaker_open(owner.address)
        assert await chaotic.get(key_elsewhere(devcluster, owner)) is None  # the others answer
        with pytest.raises(CircuitBreakerOpenError):  # refused fast, not sent
            await chaotic.get(key)


async def test_latency_adds_at_least_the_configured_delay(cluster_nodes: str) -> None:
    chaotic = chaos_client(
        cluster_nodes, INSIDE_RETRY, {"fault": "latency", "latency": 0.3, "commands": ["GET"]}
    )
    async with chaotic:
        await chaotic.set("chaos:latency", "v")
        start = time.monotonic()
        assert await chaotic.get("chaos:latency") == b"v"  # late, but answered
        assert time.monotonic() - start >= 0.3  # a lower bound only


async def test_node_down_fails_one_node_then_heals(
    cluster_nodes: str, devcluster: DevCluster
) -> None:
    key = "chaos:down"
    owner = devcluster.primary_for_key(key)
    elsewhere = key_elsewhere(devcluster, owner)
    chaotic = chaos_client(
        cluster_nodes,
        INSIDE_RETRY,
        {"fault": "node_down", "down_for": 1.5, "commands": ["GET"]},
        retry={"max_retries": 0},
    )
    async with chaotic:
        start = time.monotonic()
        with pytest.raises(RedisConnectionError, match=refused_by(owner)):
            await chaotic.get(key)  # takes its node down
        assert await chaotic.get(elsewhere) is None  # the other shards answer

        async def answered() -> bool:
            try:
                await chaotic.get(key)
            except RedisConnectionError:
                return False
            return True

        await async_wait_until(answered, timeout=30, what="the node to heal")
        assert time.monotonic() - start >= 1.5


async def run_seeded(nodes: str, seed: int, count: int) -> list[bool]:
    """Which of ``count`` sequential GETs got a fault."""
    chaotic = chaos_client(nodes, OUTSIDE_RETRY, {"rate": 0.3, "seed": seed, "commands": ["GET"]})
    faults = []
    async with chaotic:
        for i in range(count):
            try:
                await chaotic.get(f"chaos:seeded:{i}")
            except RedisConnectionError:
                faults.append(True)
            else:
                faults.append(False)
    return faults


async def test_a_seeded_run_injects_the_same_faults_twice(cluster_nodes: str) -> None:
    first = await run_seeded(cluster_nodes, 1234, 40)
    second = await run_seeded(cluster_nodes, 1234, 40)
    assert first == second
    draws = random.Random(1234)
    assert first == [draws.random() < 0.3 for _ in range(40)]
    assert 0 < sum(first) < 40


async def test_faults_reach_an_otlp_endpoint_as_span_events_and_a_counter(
    otel: Otel,  # noqa: F811 - the fixture
    cluster_nodes: str,
    devcluster: DevCluster,
) -> None:
    key = "chaos:otlp"
    owner = devcluster.primary_for_key(key)
    client = otel.client(
        cluster_nodes,
        plugins=[resilient_cache_chaos],
        stages="tracing,metrics,timeout,retry,routing,chaos,breaker",
        retry={"max_retries": 2, "delay": 0.01},
        chaos={"enabled": True, "rate": 1.0, "fault": "connection_error", "commands": ["GET"]},
    )
    async with client:
        with pytest.raises(RedisConnectionError):
            await client.get(key)
    (span,) = otel.spans("GET")
    faults = span.events_named(resilient_cache_chaos.EVENT_FAULT)
    assert faults == 3 * [
        {
            "resilient_cache.chaos.kind": "connection_error",
            "db.operation.name": "GET",
            "server.address": owner.host,
            "server.port": owner.port,
        }
    ]
    assert len(span.events_named("resilient_cache.retry")) == 2
    counter = otel.metrics()[resilient_cache_chaos.FAULTS]
    assert counter.monotonic and counter.unit == "{fault}"
    assert counter.total(**{"resilient_cache.chaos.kind": "connection_error"}) == 3


async def test_the_application_test_in_docs_chaos_md_passes(cluster_nodes: str) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    (source,) = [b for b in blocks if b.startswith("# tests/test_visits_under_chaos.py")]
    namespace: dict[str, Any] = {}
    exec(compile(source, str(DOCS), "exec"), namespace)
    await namespace["test_visit_counter_survives_20_percent_connection_errors"](cluster_nodes)
