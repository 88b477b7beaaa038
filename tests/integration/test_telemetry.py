"""Telemetry on the wire: spans and metrics exported over OTLP/HTTP from commands run against
the real cluster, decoded by a receiver as a collector would (tests/otlp_receiver.py).

Every client here gets its own TracerProvider / MeterProvider; the global providers are never
touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from resilient_cache import CircuitBreakerOpenError, RedisClusterClient, create_redis_cluster
from resilient_cache import telemetry as t
from resilient_cache.devcluster import DevCluster
from tests.otlp_receiver import DecodedMetric, DecodedSpan, OtlpReceiver

# Distinctive strings that must never reach an exported byte.
SECRET_KEY = "tk-SECRETKEY-7f3a"
SECRET_VALUE = "tv-SECRETVALUE-91c2"
SECRET_PASSWORD = "tp-SECRETPASSWORD-44d0"
SECRET_USER = "tu-leakcheck"


@dataclass
class Otel:
    receiver: OtlpReceiver
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def flush(self) -> None:
        assert self.tracer_provider.force_flush(10_000)
        assert self.meter_provider.force_flush(10_000)

    def spans(self, name: str | None = None) -> list[DecodedSpan]:
        self.flush()
        return [s for s in self.receiver.spans() if name is None or s.name == name]

    def metrics(self) -> dict[str, DecodedMetric]:
        self.flush()
        return self.receiver.metrics()

    def client(self, nodes: str, **options: object) -> RedisClusterClient:
        options.setdefault("health_check_interval", 0)
        return create_redis_cluster(
            nodes,
            autoload=False,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            **options,
        )


@pytest.fixture
def otel() -> Iterator[Otel]:
    with OtlpReceiver() as receiver:
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.traces_url))
        )
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=receiver.metrics_url), export_interval_millis=3_600_000
        )
        meter_provider = MeterProvider(metric_readers=[reader])
        yield Otel(receiver, tracer_provider, meter_provider)
        tracer_provider.shutdown()
        meter_provider.shutdown()


@pytest.fixture
async def traced(otel: Otel, cluster_nodes: str) -> AsyncIterator[RedisClusterClient]:
    async with otel.client(cluster_nodes) as client:
        yield client


def _one(spans: list[DecodedSpan]) -> DecodedSpan:
    assert len(spans) == 1, [(s.name, s.attributes) for s in spans]
    return spans[0]


async def test_command_spans_follow_the_redis_semantic_conventions(
    otel: Otel, traced: RedisClusterClient, devcluster: DevCluster
) -> None:
    await traced.set("telemetry:semconv", "v", ex=60)
    assert await traced.get("telemetry:semconv") == b"v"
    owner = devcluster.primary_for_key("telemetry:semconv")

    set_span = _one(otel.spans("SET"))
    get_span = _one(otel.spans("GET"))
    for span, operation, text in ((set_span, "SET", "SET ? ? ? ?"), (get_span, "GET", "GET ?")):
        assert span.kind == "SPAN_KIND_CLIENT"
        assert span.scope == t.INSTRUMENTATION_NAME
        assert span.status == "STATUS_CODE_UNSET"
        assert span.attributes == {
            "db.system.name": "redis",
            "db.operation.name": operation,
            "db.query.text": text,
            "server.address": owner.host,
            "server.port": owner.port,
        }
        assert span.events == []  # the happy path adds nothing
        assert span.parent_span_id == ""


async def test_span_is_a_child_of_the_callers_span(otel: Otel, traced: RedisClusterClient) -> None:
    tracer = otel.tracer_provider.get_tracer("the-app")
    with tracer.start_as_current_span("handle-request") as parent:
        await traced.get("telemetry:parent")
    context = parent.get_span_context()
    span = _one(otel.spans("GET"))
    assert span.trace_id == format(context.trace_id, "032x")
    assert span.parent_span_id == format(context.span_id, "016x")


async def test_sampled_out_commands_export_nothing(cluster_nodes: str) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    with OtlpReceiver() as receiver:
        provider = TracerProvider(sampler=ALWAYS_OFF)
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.traces_url))
        )
        client = create_redis_cluster(
            cluster_nodes, autoload=False, health_check_interval=0, tracer_provider=provider
        )
        async with client:
            assert "tracing" in client.active_stages
            await client.get("telemetry:sampled-out")
        provider.force_flush()
        assert receiver.spans() == []
        provider.shutdown()


async def test_pipeline_and_transaction_are_one_span_each(
    otel: Otel, traced: RedisClusterClient
) -> None:
    async with traced.pipeline() as pipe:
        pipe.set("{telemetry}:p1", "a").get("{telemetry}:p1").incr("{telemetry}:p2")
        await pipe.execute()
    async with traced.pipeline(transaction=True) as tx:
        tx.set("{telemetry}:t1", "a").get("{telemetry}:t1")
        await tx.execute()

    batch = _one(otel.spans("PIPELINE"))
    assert batch.attributes["db.operation.name"] == "PIPELINE"
    assert batch.attributes["db.operation.batch.size"] == 3
    assert batch.attributes["db.query.text"] == "SET; GET; INCRBY"
    assert "server.address" in batch.attributes  # one slot: routed to its primary
    transaction = _one(otel.spans("MULTI"))
    assert transaction.attributes["db.operation.name"] == "MULTI"
    assert transaction.attributes["db.operation.batch.size"] == 2
    assert transaction.attributes["db.query.text"] == "SET; GET"
    assert "server.address" in transaction.attributes  # one slot: routed to its primary
    assert otel.spans("SET") == [] and otel.spans("GET") == []  # no span per buffered command


async def test_a_pipeline_over_several_nodes_is_one_span_per_node(
    otel: Otel, traced: RedisClusterClient
) -> None:
    keys = [f"telemetry:spread:{i}" for i in range(12)]
    by_node: dict[int, int] = {}
    for key in keys:
        port = traced.get_cluster().get_node_from_key(key).port
        by_node[port] = by_node.get(port, 0) + 1
    assert len(by_node) == 3  # 12 keys over the 3 primaries
    async with traced.pipeline() as pipe:
        for key in keys:
            pipe.set(key, "v")
        assert await pipe.execute() == [True] * len(keys)

    spans = otel.spans("PIPELINE")
    sizes = {
        span.attributes["server.port"]: span.attributes.get("db.operation.batch.size", 1)
        for span in spans
    }
    assert len(spans) == 3 and sizes == by_node
    await traced.delete(*keys)


async def test_error_reply_sets_error_type_and_status_code_only(
    otel: Otel, traced: RedisClusterClient
) -> None:
    await traced.set("telemetry:wrongtype", "x")
    with pytest.raises(redis.ResponseError):
        await traced.lpush("telemetry:wrongtype", SECRET_VALUE)
    span = _one(otel.spans("LPUSH"))
    assert span.status == "STATUS_CODE_ERROR"
    assert span.attributes["error.type"] == "ResponseError"
    assert span.attributes["db.response.status_code"] == "WRONGTYPE"
    assert "server.port" in span.attributes
    metrics = otel.metrics()
    errors = metrics[t.ERRORS]
    assert errors.total(**{"error.type": "ResponseError", "db.operation.name": "LPUSH"}) == 1
    duration = metrics[t.OPERATION_DURATION]
    assert duration.total(**{"error.type": "ResponseError", "db.operation.name": "LPUSH"}) == 1


async def test_moved_redirect_shows_as_an_event_and_the_answering_node(
    otel: Otel, traced: RedisClusterClient, devcluster: DevCluster
) -> None:
    key = "telemetry:moved"
    await traced.set(key, "v")
    owner = devcluster.primary_for_key(key)
    nodes_manager = traced.get_cluster().nodes_manager
    slot = traced.keyslot(key)
    wrong = next(n for n in traced.get_cluster().get_primaries() if n.port != owner.port)
    nodes_manager.slots_cache[slot] = [wrong]  # a stale slot map: the next GET gets MOVED
    assert await traced.get(key) == b"v"
    span = _one(otel.spans("GET"))
    (redirect,) = span.events_named(t.EVENT_REDIRECT)
    assert redirect == {
        t.REDIRECT_KIND: "MOVED",
        t.REDIRECT_FROM_ADDRESS: wrong.host,
        t.REDIRECT_FROM_PORT: wrong.port,
        "server.address": owner.host,
        "server.port": owner.port,
    }
    assert span.attributes["server.port"] == owner.port
    duration = otel.metrics()[t.OPERATION_DURATION]
    assert duration.total(**{"db.operation.name": "GET", "server.port": owner.port}) == 1


async def test_keyless_command_names_the_node_redis_py_chose(
    otel: Otel, traced: RedisClusterClient
) -> None:
    info = await traced.execute_command("CLUSTER INFO")  # redis-py sends it to one node
    assert info["cluster_state"] == "ok"
    await traced.execute_command("SCRIPT EXISTS", "0" * 40)  # every primary: no single node
    ports = {n.port for n in traced.get_cluster().get_nodes()}
    (single,) = otel.spans("CLUSTER INFO")
    assert single.attributes["server.port"] in ports
    assert single.attributes["server.address"] == "127.0.0.1"
    (multi,) = otel.spans("SCRIPT EXISTS")
    assert "server.address" not in multi.attributes and "server.port" not in multi.attributes


async def test_a_memory_hit_is_a_span_without_a_node_and_no_redis_latency(
    otel: Otel, cluster_nodes: str
) -> None:
    key = "telemetry:memory-hit"
    client = otel.client(cluster_nodes, memory={"enabled": True, "coherence": False})
    async with client:
        await client.set(key, "v")
        before = client.get_metrics()
        assert [await client.get(key) for _ in range(3)] == [b"v"] * 3  # 1 miss, 2 hits
        after = client.get_metrics()
    miss, *hits = otel.spans("GET")
    assert len(hits) == 2
    assert "server.port" in miss.attributes and t.MEMORY_HIT_ATTRIBUTE not in miss.attributes
    for hit in hits:
        assert hit.attributes[t.MEMORY_HIT_ATTRIBUTE] is True
        assert "server.address" not in hit.attributes and "server.port" not in hit.attributes
    metrics = otel.metrics()
    # Three commands answered; one Redis round trip in the histogram and the attempts.
    assert after.commands.total - before.commands.total == 3
    assert metrics[t.OPERATION_DURATION].total(**{"db.operation.name": "GET"}) == 1
    assert metrics[t.ATTEMPTS].total() == 2  # the SET and the GET that missed
    assert metrics[t.MEMORY_HITS].total() == 2


async def test_retried_command_has_retry_events_with_the_node(
    otel: Otel, cluster_nodes: str, devcluster: DevCluster
) -> None:
    key = "telemetry:retried"
    owner = devcluster.primary_for_key(key)
    client = otel.client(
        cluster_nodes, socket_timeout=0.2, retry={"max_retries": 20, "delay": 0.05}
    )
    async with client:
        await client.set(key, "v")
        admin = devcluster.admin(owner)
        try:
            admin.execute_command("CLIENT", "PAUSE", "700", "ALL")
            assert await client.get(key) == b"v"
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
            admin.close()
    span = _one(otel.spans("GET"))
    retries = span.events_named(t.EVENT_RETRY)
    assert retries, span.events
    first = retries[0]
    assert first[t.ATTEMPT] == 1
    assert first["error.type"] == "TimeoutError"
    assert (first["server.address"], first["server.port"]) == (owner.host, owner.port)
    assert first[t.RETRY_DELAY] > 0
    assert (
        span.attributes[t.ATTEMPTS_ATTRIBUTE]
        == len(retries) + len(span.events_named(t.EVENT_FAILOVER_WAIT)) + 1
    )
    assert span.status == "STATUS_CODE_UNSET"
    assert span.attributes["server.port"] == owner.port

    metrics = otel.metrics()
    assert metrics[t.RETRIES].total(**{"error.type": "TimeoutError"}) >= 1
    assert metrics[t.RETRIES].unit == "{retry}"
    assert metrics[t.ATTEMPTS].total() >= 2 + len(retries)  # SET, GET and its retries


async def test_a_disconnected_client_leaves_the_observable_gauges(
    otel: Otel, cluster_nodes: str
) -> None:
    client = otel.client(cluster_nodes)
    async with client:
        await client.get("telemetry:gone")
        live = otel.metrics()
        assert live[t.BREAKER_STATE].points, "a connected client reports its breakers"
    otel.receiver.clear()
    after = otel.metrics()  # the next collection, after disconnect()
    assert t.BREAKER_STATE not in after or after[t.BREAKER_STATE].points == []
    assert t.CLUSTER_HEALTH not in after or after[t.CLUSTER_HEALTH].points == []


async def test_breaker_refusal_is_an_event_and_the_breaker_metrics_follow(
    otel: Otel, traced: RedisClusterClient, devcluster: DevCluster
) -> None:
    key = "telemetry:isolated"
    owner = devcluster.primary_for_key(key)
    node = f"{owner.host}:{owner.port}"
    await traced.get(key)  # the breaker of that node exists, closed
    traced.isolate_node(node)
    try:
        with pytest.raises(CircuitBreakerOpenError):
            await traced.get(key)
        metrics = otel.metrics()
    finally:
        traced.manual_reset_circuit_breaker(node)
    span = otel.spans("GET")[-1]
    (refused,) = span.events_named(t.EVENT_BREAKER_REFUSED)
    assert refused == {
        "server.address": owner.host,
        "server.port": owner.port,
        t.BREAKER_STATE_ATTRIBUTE: "isolated",
    }
    (give_up,) = span.events_named(t.EVENT_GIVE_UP)
    assert give_up[t.GIVE_UP_REASON] == "breaker_open"
    assert give_up["error.type"] == "CircuitBreakerOpenError"
    assert span.attributes["error.type"] == "CircuitBreakerOpenError"

    state = metrics[t.BREAKER_STATE]
    assert state.kind == "gauge"
    assert state.total(**{"server.address": owner.host, "server.port": owner.port}) == 3
    transitions = metrics[t.BREAKER_TRANSITIONS]
    assert transitions.monotonic
    where = {"server.port": owner.port, t.BREAKER_FROM: "closed", t.BREAKER_TO: "isolated"}
    assert transitions.total(**where) == 1
    after = otel.metrics()
    assert after[t.BREAKER_STATE].total() == 0  # closed again everywhere
    assert after[t.BREAKER_TRANSITIONS].total(**{t.BREAKER_FROM: "isolated"}) == 1


async def test_duration_histogram_and_cluster_gauges(
    otel: Otel, traced: RedisClusterClient
) -> None:
    for i in range(20):
        await traced.set(f"telemetry:h{i}", i)
        await traced.get(f"telemetry:h{i}")
    stats = await traced.get_stats()  # what the health monitor would keep
    metrics = otel.metrics()

    duration = metrics[t.OPERATION_DURATION]
    assert (duration.kind, duration.unit, duration.scope) == ("histogram", "s", "resilient_cache")
    gets = [p for p in duration.points if p.attributes["db.operation.name"] == "GET"]
    assert sum(p.count or 0 for p in gets) == 20
    for point in gets:
        assert point.bounds == list(t.DURATION_BUCKETS)
        assert point.attributes["db.system.name"] == "redis"
        assert {"server.address", "server.port"} <= set(point.attributes)
        assert 0 < (point.sum or 0) / (point.count or 1) < 1.0  # seconds, not milliseconds
    snapshot = traced.get_metrics()
    assert snapshot.commands.total == 40
    assert metrics[t.ATTEMPTS].total() == 40

    nodes = metrics[t.CLUSTER_NODES]
    assert nodes.total(**{t.NODE_ROLE: "primary", t.NODE_STATUS: "connected"}) == 3
    assert nodes.total(**{t.NODE_ROLE: "replica", t.NODE_STATUS: "connected"}) == 3
    assert nodes.total() == stats.total_nodes
    assert metrics[t.CLUSTER_HEALTH].total() == 2  # healthy
    assert metrics[t.BREAKER_STATE].total() == 0  # every breaker closed


async def test_memory_tier_counters(otel: Otel, cluster_nodes: str) -> None:
    async with otel.client(cluster_nodes, memory={"enabled": True, "ttl": 30}) as client:
        await client.set("telemetry:mem", "v")
        for _ in range(3):
            await client.get("telemetry:mem")
        metrics = otel.metrics()
    assert metrics[t.MEMORY_MISSES].total() == 1
    assert metrics[t.MEMORY_HITS].total() == 2
    assert metrics[t.MEMORY_HITS].monotonic
    # Two memory hits never reached Redis: SET + one GET attempt.
    assert metrics[t.ATTEMPTS].total() == 2


async def test_nothing_is_exported_without_an_sdk(cluster_nodes: str) -> None:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    client = create_redis_cluster(
        cluster_nodes,
        autoload=False,
        health_check_interval=0,
        tracer_provider=NoOpTracerProvider(),
        meter_provider=NoOpMeterProvider(),
    )
    assert "tracing" not in client.active_stages
    assert client._stats.instruments is None
    await client.aclose()


async def test_redis_py_observability_stays_off(otel: Otel, traced: RedisClusterClient) -> None:
    """redis-py 8 records its own db.client.operation.duration when its observability is
    initialised: with both, every command would be counted twice."""
    from redis.observability import recorder
    from redis.observability.providers import get_observability_instance

    await traced.get("telemetry:observability")
    assert get_observability_instance().get_provider_manager() is None
    assert not recorder.is_enabled()
    scopes = {m.scope for m in otel.metrics().values()}
    assert scopes == {t.INSTRUMENTATION_NAME}


@pytest.fixture
def leak_user(devcluster: DevCluster) -> Iterator[None]:
    """A real ACL user with a distinctive password on every node (removed afterwards)."""
    for node in devcluster.nodes:
        admin = devcluster.admin(node)
        admin.execute_command(
            "ACL", "SETUSER", SECRET_USER, "on", f">{SECRET_PASSWORD}", "~*", "&*", "+@all"
        )
        admin.close()
    yield
    for node in devcluster.nodes:
        admin = devcluster.admin(node)
        admin.execute_command("ACL", "DELUSER", SECRET_USER)
        admin.close()


async def test_no_key_value_or_credential_reaches_an_exported_byte(
    otel: Otel, cluster_nodes: str, leak_user: None
) -> None:
    client = otel.client(
        cluster_nodes,
        username=SECRET_USER,
        password=SECRET_PASSWORD,
        retry={"max_retries": 1, "delay": 0.01},
    )
    tracer = otel.tracer_provider.get_tracer("the-app")
    async with client:
        with tracer.start_as_current_span("request"):
            await client.set(SECRET_KEY, SECRET_VALUE)
            assert await client.get(SECRET_KEY) == SECRET_VALUE.encode()
            await client.hset(f"{SECRET_KEY}:h", SECRET_VALUE, SECRET_VALUE)
            async with client.pipeline() as pipe:
                pipe.set(SECRET_KEY, SECRET_VALUE).get(SECRET_KEY)
                await pipe.execute()
            # Error replies that quote their arguments: never exported.
            with pytest.raises(redis.RedisError):
                await client.execute_command("NOSUCHCOMMAND", SECRET_KEY, SECRET_VALUE)
            # redis-py's message quotes the arguments (a RedisClusterException, no RedisError).
            with pytest.raises(redis.exceptions.RedisClusterException):
                await client.execute_command("OBJECT", SECRET_VALUE, SECRET_KEY)
            with pytest.raises(redis.RedisError):
                await client.execute_command("AUTH", SECRET_USER, SECRET_PASSWORD + "x")
            # Keyless: redis-py refuses it with a message quoting the password (never exported).
            with pytest.raises(redis.exceptions.RedisClusterException):
                await client.execute_command("HELLO", "3", "AUTH", SECRET_USER, SECRET_PASSWORD)
            with pytest.raises(redis.ResponseError):
                await client.incr(SECRET_KEY)  # "value is not an integer"
            # The breaker path too.
            node = client.get_cluster().get_node_from_key(SECRET_KEY)
            client.isolate_node(node.name)
            with pytest.raises(CircuitBreakerOpenError):
                await client.get(SECRET_KEY)
            client.manual_reset_circuit_breaker()
            await client.delete(SECRET_KEY, f"{SECRET_KEY}:h")
        spans = otel.spans()
        metrics = otel.metrics()
    assert len(spans) >= 10 and metrics
    bodies = otel.receiver.raw()
    assert bodies
    for body in bodies:
        for secret in (SECRET_KEY, SECRET_VALUE, SECRET_PASSWORD, SECRET_USER):
            assert secret.encode() not in body, secret
    # AUTH / HELLO arguments are masked like any other.
    assert _one([s for s in spans if s.name == "AUTH"]).attributes["db.query.text"] == "AUTH ? ?"


async def test_include_keys_shows_keys_never_values(otel: Otel, cluster_nodes: str) -> None:
    async with otel.client(cluster_nodes, tracing={"include_keys": True}) as client:
        await client.set("telemetry:shown", SECRET_VALUE)
        await client.mget("{t}:a", "{t}:b")
        with pytest.raises(redis.RedisError):
            await client.execute_command("AUTH", SECRET_USER, SECRET_PASSWORD)
    assert _one(otel.spans("SET")).attributes["db.query.text"] == "SET telemetry:shown ?"
    assert _one(otel.spans("MGET")).attributes["db.query.text"] == "MGET {t}:a {t}:b"
    assert _one(otel.spans("AUTH")).attributes["db.query.text"] == "AUTH ? ?"
    for body in otel.receiver.raw():
        assert SECRET_VALUE.encode() not in body and SECRET_PASSWORD.encode() not in body


async def test_two_clients_on_one_meter_are_both_observed(otel: Otel, cluster_nodes: str) -> None:
    a, b = otel.client(cluster_nodes), otel.client(cluster_nodes)
    async with a, b:
        await asyncio.gather(a.get("telemetry:a"), b.get("telemetry:b"), b.get("telemetry:c"))
        assert otel.metrics()[t.ATTEMPTS].total() == 3
        a.isolate_node(a.get_cluster().get_node_from_key("telemetry:a").name)
        gauges = otel.metrics()[t.BREAKER_STATE].points
        # One series per node: the worse of the two clients' breakers for it.
        assert len(gauges) == len({p.attributes["server.port"] for p in gauges})
        assert sorted(p.value or 0 for p in gauges)[-1] == 3
        a.manual_reset_circuit_breaker()
    # A client that goes away never makes a counter drop.
    assert otel.metrics()[t.ATTEMPTS].total() == 3
