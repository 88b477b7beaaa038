"""Traces of commands that ride through real topology changes (a failover, a slot migration),
as a collector receives them."""

from __future__ import annotations

import asyncio
import signal

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from resilient_cache import create_redis_cluster
from resilient_cache import telemetry as t
from tests.chaos.test_topology_faults import (
    _migrate_keys,
    _migration_setup,
    _restore_slot,
    _start_migration,
)
from tests.otlp_receiver import OtlpReceiver


async def test_trace_of_a_command_retried_across_a_failover(ready_cluster) -> None:
    cluster = ready_cluster
    key = "telemetry:failover"
    victim = cluster.primary_for_key(key)
    admin = cluster.admin(victim)
    admin.set(key, "before")
    assert admin.execute_command("WAIT", 1, 5000) >= 1  # the replica has it
    admin.close()

    with OtlpReceiver() as receiver:
        provider = TracerProvider()
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.traces_url))
        )
        client = create_redis_cluster(
            cluster.startup_nodes,
            autoload=False,
            health_check_interval=0,
            socket_timeout=1.0,
            socket_connect_timeout=0.5,
            command_timeout=30.0,
            retry={"max_retries": 5, "delay": 0.2},
            # Open after two failures: well inside the cluster's 2 s node timeout, so the trace
            # always shows refusals and failover waits. (With the default of five, the jittered
            # backoffs of a busy machine sometimes outlast the failover, and no refusal comes.)
            circuit_breaker_threshold=2,
            tracer_provider=provider,
        )
        tracer = provider.get_tracer("the-app")
        async with client:
            assert await client.get(key) == b"before"  # connected, slot map loaded
            # Talk to every shard first: the retry stage waits for a failover only while
            # other nodes are known to answer.
            for n in range(200):
                await client.get(f"telemetry:warm:{{{n}}}")
            assert len(client.breakers.breakers) >= 3
            cluster.kill(victim, signal.SIGKILL)
            with tracer.start_as_current_span("request") as parent:
                value = await client.get(key)
            assert value == b"before"
            new_primary = await asyncio.to_thread(cluster.primary_for_key, key)
        provider.force_flush()
        spans = [s for s in receiver.spans() if s.name == "GET"]
        provider.shutdown()

    assert new_primary.port != victim.port
    span = next(s for s in spans if s.parent_span_id)
    assert span.parent_span_id == format(parent.get_span_context().span_id, "016x")
    assert span.status == "STATUS_CODE_UNSET"
    # The node that finally answered is the new primary.
    assert (span.attributes["server.address"], span.attributes["server.port"]) == (
        new_primary.host,
        new_primary.port,
    )
    # The failed attempts went to the dead primary, each with its error type.
    retries = span.events_named(t.EVENT_RETRY)
    assert retries, span.events
    for event in retries:
        assert event["server.port"] == victim.port
        assert "Error" in event["error.type"]
        assert event[t.RETRY_DELAY] > 0
    assert [e[t.ATTEMPT] for e in retries] == list(range(1, len(retries) + 1))
    # Once its breaker opened, attempts were refused without the network while the replica
    # was promoted: breaker refusals and failover waits, all for the dead node.
    refused = span.events_named(t.EVENT_BREAKER_REFUSED)
    waits = span.events_named(t.EVENT_FAILOVER_WAIT)
    assert refused and waits, [name for name, _ in span.events]
    assert {e["server.port"] for e in refused} == {victim.port}
    assert all(e["error.type"] == "CircuitBreakerOpenError" for e in waits)
    assert span.events_named(t.EVENT_GIVE_UP) == []
    attempts = span.attributes[t.ATTEMPTS_ATTRIBUTE]
    assert attempts == len(retries) + len(waits) + 1
    print(
        f"\nfailover trace: {attempts} attempts, {len(retries)} retries, {len(waits)} failover "
        f"waits, answered by {new_primary.port} (was {victim.port})"
    )


async def test_trace_of_a_command_redirected_by_ask_during_a_slot_migration(
    ready_cluster,
) -> None:
    cluster = ready_cluster
    keys, source, target, slot = _migration_setup(cluster, "traceask")
    migrating = False
    with OtlpReceiver() as receiver:
        provider = TracerProvider()
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.traces_url))
        )
        client = create_redis_cluster(
            cluster.startup_nodes, autoload=False, health_check_interval=0, tracer_provider=provider
        )
        try:
            async with client:
                await client.set(keys[0], "moved-away")
                await client.set(keys[1], "stays")
                migrating = True
                await asyncio.to_thread(_start_migration, cluster, slot, source, target)
                await asyncio.to_thread(_migrate_keys, cluster, source, target, keys[:1])
                # The source answers ASK for the migrated key; redis-py follows it to the target.
                assert await client.get(keys[0]) == b"moved-away"
                assert await client.get(keys[1]) == b"stays"  # still on the source
        finally:
            if migrating:
                await asyncio.to_thread(_restore_slot, cluster, slot, source, target)
        provider.force_flush()
        asked, direct = [s for s in receiver.spans() if s.name == "GET"]
        provider.shutdown()

    (redirect,) = asked.events_named(t.EVENT_REDIRECT)
    assert redirect == {
        t.REDIRECT_KIND: "ASK",
        t.REDIRECT_FROM_ADDRESS: source.host,
        t.REDIRECT_FROM_PORT: source.port,
        "server.address": target.host,
        "server.port": target.port,
    }
    assert asked.attributes["server.port"] == target.port  # the node that answered
    assert asked.events_named(t.EVENT_RETRY) == []  # a redirect is not a failure
    assert direct.events == [] and direct.attributes["server.port"] == source.port
