"""The bulkhead stage on the real cluster: 200 concurrent callers, a per-node limit that holds
(measured by a stage placed inside it), fast refusals when the queue is full, and the
``resilient_cache.bulkhead.*`` instruments as they reach an OTLP endpoint."""

from __future__ import annotations

import asyncio

import redis

from resilient_cache import BulkheadFullError
from resilient_cache.stages.bulkhead import IN_FLIGHT, QUEUED, REJECTED
from tests.probes import ConcurrencyProbe

from .test_telemetry import Otel, otel  # noqa: F401 - the fixture

STAGES = ["metrics", "timeout", "retry", "routing", "bulkhead", "probe", "breaker"]


async def test_per_node_limit_holds_under_200_callers(otel: Otel, cluster_nodes: str) -> None:  # noqa: F811
    probe = ConcurrencyProbe(hold=0.002)  # hold the slot a little, so callers pile up
    client = otel.client(
        cluster_nodes,
        stages=STAGES,
        plugins=[probe],
        bulkhead={"max_in_flight_per_node": 4, "max_queue": 1000, "queue_timeout": 10},
    )
    keys = [f"bulk:{{{n}}}" for n in range(200)]
    async with client:
        replies = await asyncio.gather(*(client.get(k) for k in keys))
        assert replies == [None] * len(keys)
        stage = client.stage("bulkhead")
        assert (stage.in_flight, stage.queued, stage.rejected) == (0, 0, 0)
    assert probe.peak and max(probe.peak.values()) == 4, probe.peak
    assert len(probe.peak) == 3  # three primaries, each held to 4
    metrics = otel.metrics()
    assert metrics[IN_FLIGHT].total() == 0
    assert metrics[QUEUED].total() == 0
    assert metrics[REJECTED].total() == 0


async def test_a_full_queue_refuses_at_once_and_is_counted(otel: Otel, cluster_nodes: str) -> None:  # noqa: F811
    probe = ConcurrencyProbe(hold=0.002)  # hold the slot a little, so callers pile up
    client = otel.client(
        cluster_nodes,
        stages=STAGES,
        plugins=[probe],
        bulkhead={"max_in_flight_per_node": 2, "max_queue": 3, "queue_timeout": 10},
    )
    keys = [f"bulk:{{{n}}}" for n in range(100)]
    async with client:
        outcomes = await asyncio.gather(*(client.get(k) for k in keys), return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, BulkheadFullError)]
        served = [o for o in outcomes if o is None]
        assert refused and len(refused) + len(served) == len(keys), outcomes
        assert all(not err.waited for err in refused)  # the queue was full: no wait at all
        assert all(isinstance(err, redis.ConnectionError) for err in refused)
        assert not client.is_circuit_breaker_open()  # the breaker never counted them
        assert client.get_metrics().commands.retried == 0  # nor did the retry stage retry them
        rejected = client.stage("bulkhead").rejected
    assert rejected == len(refused)
    assert max(probe.peak.values()) <= 2
    assert otel.metrics()[REJECTED].total() == rejected
