"""Telemetry logic without a server: query text masking, span events of the retry and breaker
stages (in-memory exporter, fake clock), the observable instruments' bookkeeping, and the
latency snapshot against exact quantiles."""

from __future__ import annotations

import math
import random

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache import telemetry as t
from resilient_cache.circuit import BreakerBoard
from resilient_cache.errors import CircuitBreakerOpenError
from resilient_cache.pipeline import Command, batch_command
from resilient_cache.stages.breaker import BreakerStage
from resilient_cache.stages.retry import RetrySettings, RetryStage
from resilient_cache.stages.tracing import (
    MAX_QUERY_TEXT_KEYS,
    MAX_QUERY_TEXT_LENGTH,
    TracingStage,
    query_text,
)


class Node:
    def __init__(self, port: int) -> None:
        self.host, self.port, self.name = "10.0.0.1", port, f"10.0.0.1:{port}"


def test_query_text_masks_every_argument() -> None:
    assert query_text(Command("SET", ("k", "v", "EX", 5))) == "SET ? ? ? ?"
    assert query_text(Command("PING")) == "PING"
    assert query_text(Command("AUTH", ("user", "pw")), include_keys=True) == "AUTH ? ?"
    assert query_text(Command("HELLO", ("3", "AUTH", "u", "p")), include_keys=True) == (
        "HELLO ? ? ? ?"
    )
    assert query_text(Command("SET", ("k", "v")), include_keys=True) == "SET k ?"
    assert query_text(Command("SET", ("k", "k")), include_keys=True) == "SET k k"  # same text
    batch = batch_command([(("SET", "k", "v"), {}), ((b"get", "k"), {})], False, True)
    assert query_text(batch) == query_text(batch, include_keys=True) == "SET; GET"


def test_include_keys_on_a_20000_key_mget_is_capped() -> None:
    # Once 11 s of comparing every argument with every key; how fast it is now is measured by
    # benchmarks/bench_telemetry.py, not asserted here.
    keys = [f"user:{i:05d}" for i in range(20_000)]
    text = query_text(Command.from_call(("MGET", *keys), {}), include_keys=True)
    shown = text.split(" ... ")[0].split()[1:]
    assert shown == keys[:MAX_QUERY_TEXT_KEYS]
    assert text.endswith(f" ... ({20_000 - MAX_QUERY_TEXT_KEYS} more)")
    assert len(text) <= MAX_QUERY_TEXT_LENGTH
    # Without the keys: '?' each, capped the same way.
    masked = query_text(Command.from_call(("MGET", *keys), {}))
    assert len(masked) <= MAX_QUERY_TEXT_LENGTH and masked.startswith("MGET ? ? ?")
    count = int(masked.rsplit("(", 1)[1].split()[0])
    assert masked.count("?") + count == 20_000


def test_query_text_is_cut_between_whole_parts_within_the_length() -> None:
    long_keys = [f"{i:03d}" + "x" * 300 for i in range(20)]
    text = query_text(Command.from_call(("MGET", *long_keys), {}), include_keys=True)
    assert len(text) <= MAX_QUERY_TEXT_LENGTH
    head, marker = text.split(" ... ")
    shown = head.split()[1:]
    assert shown == long_keys[: len(shown)] and 0 < len(shown) < 20  # no key cut in two
    assert marker == f"({20 - len(shown)} more)"
    # Values stay '?' and count among the arguments left out.
    pairs = [arg for i in range(300) for arg in (f"k{i}", f"v{i}")]
    text = query_text(Command.from_call(("MSET", *pairs), {}), include_keys=True)
    assert text.startswith("MSET k0 ? k1 ? k2 ?") and "v0" not in text
    assert text.endswith(f"k{MAX_QUERY_TEXT_KEYS - 1} ? ... ({600 - 2 * MAX_QUERY_TEXT_KEYS} more)")
    # A batch of many commands: their names, cut the same way.
    batch = batch_command([(("GET", f"k{i}"), {}) for i in range(5_000)], False, True)
    text = query_text(batch)
    assert len(text) <= MAX_QUERY_TEXT_LENGTH and text.startswith("GET; GET; ")
    assert text.count("GET") + int(text.rsplit("(", 1)[1].split()[0]) == 5_000
    # Short texts are untouched; an unhashable key is never shown, the others are.
    assert query_text(Command.from_call(("MGET", "a", "b"), {}), include_keys=True) == "MGET a b"
    odd = (bytearray(b"a"), "b")
    assert query_text(Command("MGET", odd, keys=odd), include_keys=True) == "MGET ? b"


def test_scope_attributes() -> None:
    assert t.scope_attributes("10.0.0.1:7000") == {
        "server.address": "10.0.0.1",
        "server.port": 7000,
    }
    assert t.scope_attributes("cluster") == {t.BREAKER_SCOPE: "cluster"}


def _tracer() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_retry_and_breaker_events_on_the_command_span(clock) -> None:
    provider, exporter = _tracer()
    board = BreakerBoard(clock=clock, threshold=2, reset_timeout=60.0)
    stats = t.CommandStats()
    stats.instruments = t.Instruments(MeterProvider().get_meter("x"))
    retry = RetryStage(
        RetrySettings(max_retries=3, delay=0.1),
        stats,
        clock,
        clock.sleep,
        board=board,
        span_events=True,
    )
    breaker = BreakerStage(board, span_events=True)
    nodes = iter([Node(7000), Node(7000), Node(7000), Node(7001)])

    async def route(command: Command, call_next):  # stands in for the routing stage
        command.node = next(nodes)
        return await call_next(command)

    async def backend(command: Command):
        if command.node.port == 7000:
            raise RedisConnectionError("Error connecting to 10.0.0.1:7000")
        return b"ok"

    tracing = TracingStage(provider.get_tracer("t"), True)

    async def after_breaker(command):
        return await breaker(command, backend)

    async def after_route(command):
        return await route(command, after_breaker)

    async def after_retry(command):
        return await retry(command, after_route)

    board.get("10.0.0.1:7001")  # another node is known to answer
    assert await tracing(Command("GET", ("k",)), after_retry) == b"ok"
    (span,) = exporter.get_finished_spans()
    names = [e.name for e in span.events]
    # Two connection errors open the breaker (threshold 2); the third attempt is refused
    # while the failover is awaited; the fourth goes to the new node.
    assert names == [
        t.EVENT_RETRY,
        t.EVENT_RETRY,
        t.EVENT_BREAKER_REFUSED,
        t.EVENT_FAILOVER_WAIT,
    ]
    first = dict(span.events[0].attributes)
    assert first == {
        "server.address": "10.0.0.1",
        "server.port": 7000,
        t.ATTEMPT: 1,
        "error.type": "ConnectionError",
        t.RETRY_DELAY: first[t.RETRY_DELAY],
    }
    assert 0 < first[t.RETRY_DELAY] <= 0.1
    refused = dict(span.events[2].attributes)
    assert refused[t.BREAKER_STATE_ATTRIBUTE] == "open" and refused["server.port"] == 7000
    assert span.attributes["server.port"] == 7001
    assert span.attributes[t.ATTEMPTS_ATTRIBUTE] == 4


async def test_no_events_without_span_events(clock) -> None:
    provider, exporter = _tracer()
    board = BreakerBoard(clock=clock)
    board.get("cluster").isolate()
    stage = BreakerStage(board)  # span_events off: decided at build time

    async def backend(command):
        return None

    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("cmd"), pytest.raises(CircuitBreakerOpenError):
        await stage(Command("GET", ("k",)), backend)
    (span,) = exporter.get_finished_spans()
    assert span.events == ()


def test_running_total_never_drops() -> None:
    running = t._Running()

    class Source:
        def __init__(self, value: int) -> None:
            self.value = value

    a, b = Source(5), Source(3)
    assert running.observe([a, b], lambda s: s.value) == 8
    a.value = 7
    assert running.observe([a], lambda s: s.value) == 10  # b went away: its 3 stay counted
    assert running.observe([a], lambda s: s.value) == 10


def test_observable_instruments_read_the_clients() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("x")
    instruments = t.Instruments(meter)
    board = BreakerBoard()
    board.listeners.append(instruments.breaker_changed)
    stats = t.CommandStats()
    stats.record(0.001, True, attempts=3)

    class Client:
        _closed = False

    client = Client()
    source = t.ObservedClient(client, stats, board, None, None)
    instruments.observe(source)
    board.get("10.0.0.1:7000").isolate()

    data = reader.get_metrics_data()
    points = {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert points[t.ATTEMPTS][0].value == 3
    (state,) = points[t.BREAKER_STATE]
    assert state.value == 3 and state.attributes["server.port"] == 7000
    (transition,) = points[t.BREAKER_TRANSITIONS]
    assert dict(transition.attributes)[t.BREAKER_TO] == "isolated"
    assert t.MEMORY_HITS not in points  # no memory tier, no series
    assert t.CLUSTER_HEALTH not in points  # no probe yet


def test_percentiles_within_5_percent_of_exact_quantiles() -> None:
    """Exponential latencies (mean 2 ms): the snapshot's p50/p95/p99 against the
    distribution's exact quantiles, -mean * ln(1 - q)."""
    rng = random.Random(11)
    stats = t.CommandStats(window=50_000)
    for _ in range(50_000):
        stats.record(rng.expovariate(1 / 0.002), ok=True)
    snap = stats.snapshot().latency
    for q, got in ((0.50, snap.p50), (0.95, snap.p95), (0.99, snap.p99)):
        exact_ms = -2.0 * math.log(1 - q)
        assert got == pytest.approx(exact_ms, rel=0.05), (q, got, exact_ms)
    assert snap.avg == pytest.approx(2.0, rel=0.05)
