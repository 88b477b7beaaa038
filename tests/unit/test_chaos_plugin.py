"""The chaos plugin (plugins/chaos): settings, matching, the faults and what they claim, the
node_down window, reproducibility and telemetry, on a fake clock and a fake terminal handler."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
import resilient_cache_chaos
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from resilient_cache_chaos import ChaosSettings, ChaosStage

from resilient_cache import Command, ConfigurationError, Settings, create_redis_cluster
from resilient_cache.build import make_context
from resilient_cache.pipeline import compose
from resilient_cache.stages.retry import RETRYABLE_ERRORS, may_have_run

STAGES = "metrics,timeout,retry,routing,chaos,breaker"
SECRET = "user:SECRET-42"
SLOT = key_slot(SECRET.encode())  # a MOVED names the slot, not the key


@dataclass(frozen=True)
class Node:
    host: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


A = Node("10.0.0.7", 6379)
B = Node("10.0.0.8", 6379)


class FakeBackend:
    """The two Backend methods the stage uses: where a command would go, and the nodes."""

    def route(self, command: Command, replica: bool = False) -> Node | None:
        return A if command.keys else None

    def known_nodes(self) -> list[tuple[str, int]]:
        return [("10.0.0.9", 6379), ("10.0.0.7", 6379), ("10.0.0.8", 6379)]


def build(**options: Any) -> Any:
    # autoload=False: only the built-ins and the plugin passed here, whatever is installed.
    return create_redis_cluster(
        "127.0.0.1:7000",
        autoload=False,
        plugins=[resilient_cache_chaos],
        health_check_interval=0,
        **options,
    )


def stage(clock: Any = None, backend: Any = None, **settings: Any) -> ChaosStage:
    settings.setdefault("enabled", True)
    settings.setdefault("rate", 1.0)
    timing = {} if clock is None else {"clock": clock, "sleep": clock.sleep}
    return ChaosStage(ChaosSettings(**settings), backend=backend, **timing)


class Terminal:
    """Stands in for the rest of the pipeline; counts the commands that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, command: Command) -> bytes:
        self.calls += 1
        return b"OK"


async def outcome(chaos: ChaosStage, command: Command) -> str:
    """``"ok"`` if the command went through, else the name of the error class raised."""
    try:
        await compose([chaos], Terminal())(command)
    except Exception as err:
        return type(err).__name__
    return "ok"


def routed(name: str, *args: Any, node: Node | None = A) -> Command:
    command = Command(name, args)
    command.node = node
    return command


# -- settings --------------------------------------------------------------------------------


def test_off_by_default_and_out_of_the_pipeline() -> None:
    client = build(stages=STAGES)
    assert client.settings.chaos == ChaosSettings()
    assert client.settings.chaos.enabled is False
    assert client.stage_specs["chaos"].plugin == "resilient_cache_chaos"
    assert client.active_stages == ["metrics", "timeout", "retry", "routing", "breaker"]
    # rate 0 leaves nothing to do either
    assert "chaos" not in build(stages=STAGES, chaos={"enabled": True, "rate": 0}).active_stages
    on = build(stages=STAGES, chaos={"enabled": True})
    assert on.active_stages == ["metrics", "timeout", "retry", "routing", "chaos", "breaker"]


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_CHAOS__ENABLED", "true")
    monkeypatch.setenv("REDIS_CHAOS__RATE", "0.25")
    monkeypatch.setenv("REDIS_CHAOS__SEED", "7")
    monkeypatch.setenv("REDIS_CHAOS__FAULT", "node_down")
    monkeypatch.setenv("REDIS_CHAOS__DOWN_FOR", "2.5")
    monkeypatch.setenv("REDIS_CHAOS__COMMANDS", '["get", " cluster  info "]')
    monkeypatch.setenv("REDIS_CHAOS__KEY_PREFIXES", '["user:"]')
    monkeypatch.setenv("REDIS_CHAOS__NODES", '["127.0.0.1:7000", "[::1]:7001"]')
    chaos = build(stages=STAGES).settings.chaos
    assert (chaos.enabled, chaos.rate, chaos.seed, chaos.fault) == (True, 0.25, 7, "node_down")
    assert chaos.down_for == 2.5
    assert chaos.commands == ["GET", "CLUSTER INFO"]
    assert chaos.key_prefixes == ["user:"]
    assert chaos.nodes == ["127.0.0.1:7000", "::1:7001"]  # as redis-py names nodes


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RATE", "1.5"),
        ("RATE", "-0.1"),
        ("SEED", "-1"),
        ("LATENCY", "61"),
        ("LATENCY", "-1"),
        ("DOWN_FOR", "0"),
        ("DOWN_FOR", "3601"),
        ("FAULT", "explode"),
        ("NODES", '["redis-1"]'),
        ("NODES", '["redis-1:0"]'),
        ("NODES", '["redis-1:70000"]'),
        ("COMMANDS", '[" "]'),
        ("KEY_PREFIXES", '[""]'),
        ("ENABLED", "maybe"),
        ("RATEE", "0.5"),  # misspelt: extra="forbid"
    ],
)
def test_a_bad_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(f"REDIS_CHAOS__{variable}", value)
    pattern = rf"^REDIS_CHAOS__{variable} / chaos\.{variable.lower()}:"
    with pytest.raises(ConfigurationError, match=pattern):
        build(stages="retry,routing")  # validated even when the stage is not listed


# -- which commands --------------------------------------------------------------------------


async def test_matches_by_command_name() -> None:
    chaos = stage(commands=["GET", "HGETALL"])
    assert await outcome(chaos, routed("GET", SECRET)) == "ConnectionError"
    assert await outcome(chaos, routed("HGETALL", SECRET)) == "ConnectionError"
    assert await outcome(chaos, routed("SET", SECRET, "v")) == "ok"


async def test_matches_by_key_prefix() -> None:
    chaos = stage(key_prefixes=["user:", "12"])
    assert await outcome(chaos, routed("GET", "user:1")) == "ConnectionError"
    assert await outcome(chaos, routed("GET", b"user:1")) == "ConnectionError"
    assert await outcome(chaos, routed("GET", 123)) == "ConnectionError"
    assert await outcome(chaos, routed("DEL", "session:1", "user:2")) == "ConnectionError"
    assert await outcome(chaos, routed("GET", "session:1")) == "ok"
    assert await outcome(chaos, routed("PING")) == "ok"  # keyless
    unknown = routed("GET", "session:1")
    unknown.keys = None  # cannot be known: any key may be touched
    assert await outcome(chaos, unknown) == "ConnectionError"


async def test_matches_by_node_only_once_routed() -> None:
    chaos = stage(nodes=[A.name])
    assert await outcome(chaos, routed("GET", SECRET, node=A)) == "ConnectionError"
    assert await outcome(chaos, routed("GET", SECRET, node=B)) == "ok"
    assert await outcome(chaos, routed("GET", SECRET, node=None)) == "ok"  # before routing
    assert await outcome(stage(), routed("GET", SECRET, node=None)) == "ConnectionError"


# -- the faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error_class", "text"),
    [
        ("connection_error", RedisConnectionError, "Error 111 connecting to 10.0.0.7:6379. "
         "Connection refused."),
        ("node_down", RedisConnectionError, "Error 111 connecting to 10.0.0.7:6379. "
         "Connection refused."),
        ("timeout", RedisTimeoutError, "Timeout connecting to 10.0.0.7:6379"),
        ("clusterdown", ClusterDownError, "The cluster is down"),
        ("tryagain", TryAgainError, "Multiple keys request during rehashing of slot"),
        ("moved", MovedError, f"{SLOT} 10.0.0.8:6379"),  # the next node after the one asked
    ],
)  # fmt: skip
async def test_each_fault_is_the_real_redis_py_error_and_never_sent(
    fault: str, error_class: type[Exception], text: str
) -> None:
    terminal = Terminal()
    handler = compose([stage(fault=fault, backend=FakeBackend())], terminal)
    with pytest.raises(error_class) as info:
        await handler(routed("INCR", SECRET))
    err = info.value
    assert str(err) == text
    assert terminal.calls == 0
    if fault == "moved":  # redis-py follows real redirects: the retry stage passes one on
        assert not isinstance(err, RETRYABLE_ERRORS)
    else:  # what the retry stage reads from it: the command did not run, so INCR is retried
        assert isinstance(err, RETRYABLE_ERRORS)
        assert may_have_run(err) is False
    shown = [str(err), repr(err), *getattr(err, "__notes__", [])]
    assert not any(SECRET in part or "SECRET" in part for part in shown)
    assert err.__cause__ is None and err.__context__ is None
    if fault in ("clusterdown", "tryagain", "moved"):
        assert err.status_code == fault.upper()  # type: ignore[attr-defined]
    if fault == "moved":
        assert (err.slot_id, err.host, err.port) == (SLOT, "10.0.0.8", 6379)  # type: ignore[attr-defined]


async def test_before_routing_the_message_names_the_node_the_command_would_go_to() -> None:
    chaos = stage(backend=FakeBackend())
    with pytest.raises(RedisConnectionError, match=r"^Error 111 connecting to 10\.0\.0\.7:6379\."):
        await compose([chaos], Terminal())(routed("GET", SECRET, node=None))
    with pytest.raises(RedisConnectionError, match=r"^Error 111 connecting to 10\.0\.0\.9:6379\."):
        await compose([chaos], Terminal())(routed("PING", node=None))  # keyless: a known node


async def test_latency_waits_on_the_injected_sleep_then_sends(clock: Any) -> None:
    terminal = Terminal()
    handler = compose([stage(clock, fault="latency", latency=0.25)], terminal)
    assert await handler(routed("GET", SECRET)) == b"OK"
    assert clock.sleeps == [0.25]
    assert terminal.calls == 1


async def test_node_down_fails_one_node_for_the_window_then_heals(clock: Any) -> None:
    chaos = stage(clock, fault="node_down", down_for=2.0)
    assert await outcome(chaos, routed("GET", SECRET, node=A)) == "ConnectionError"  # A down
    assert await outcome(chaos, routed("GET", SECRET, node=B)) == "ok"  # one node at a time
    clock.advance(1.99)
    assert await outcome(chaos, routed("SET", SECRET, node=A)) == "ConnectionError"
    clock.advance(0.01)
    assert await outcome(chaos, routed("GET", SECRET, node=A)) == "ok"  # healed
    clock.advance(1.99)
    assert await outcome(chaos, routed("GET", SECRET, node=B)) == "ok"  # up as long again
    clock.advance(0.01)
    assert await outcome(chaos, routed("GET", SECRET, node=B)) == "ConnectionError"  # B now
    assert await outcome(chaos, routed("GET", SECRET, node=A)) == "ok"


async def test_node_down_respects_the_filters(clock: Any) -> None:
    chaos = stage(clock, fault="node_down", commands=["GET"])
    assert await outcome(chaos, routed("GET", SECRET, node=A)) == "ConnectionError"
    assert await outcome(chaos, routed("SET", SECRET, node=A)) == "ok"  # not a matching command


# -- reproducibility -------------------------------------------------------------------------


async def pattern(seed: int | None, commands: list[Command]) -> list[str]:
    chaos = stage(rate=0.3, seed=seed, commands=["GET"])
    return [await outcome(chaos, command) for command in commands]


async def test_a_seed_gives_the_same_faults_one_draw_per_matching_command() -> None:
    gets = [routed("GET", f"k{i}") for i in range(200)]
    first = await pattern(1234, gets)
    assert first == await pattern(1234, gets)
    draws = random.Random(1234)
    assert first == ["ConnectionError" if draws.random() < 0.3 else "ok" for _ in gets]
    assert 30 < first.count("ConnectionError") < 90
    assert first != await pattern(4321, gets)
    # Commands that do not match draw nothing: the GETs get the same faults among SETs.
    mixed = [c for get in gets for c in (get, routed("SET", "k", "v"))]
    outcomes = await pattern(1234, mixed)
    assert outcomes[1::2] == ["ok"] * len(gets)
    assert outcomes[0::2] == first


# -- telemetry -------------------------------------------------------------------------------


async def test_each_fault_is_a_span_event_without_keys() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    chaos = stage(fault="clusterdown")
    with provider.get_tracer("test").start_as_current_span("GET"):
        assert await outcome(chaos, routed("GET", SECRET)) == "ClusterDownError"
    assert await outcome(chaos, routed("GET", SECRET)) == "ClusterDownError"  # no span: fine
    (span,) = exporter.get_finished_spans()
    (event,) = span.events
    assert event.name == "resilient_cache.chaos.fault"
    assert dict(event.attributes or {}) == {
        "resilient_cache.chaos.kind": "clusterdown",
        "db.operation.name": "GET",
        "server.address": A.host,
        "server.port": A.port,
    }


def faults_counted(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    counted: dict[str, int] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "resilient_cache.chaos.faults":
                    assert scope.scope.name == "resilient_cache_chaos"
                    for point in metric.data.data_points:
                        kind = str(point.attributes["resilient_cache.chaos.kind"])
                        counted[kind] = counted.get(kind, 0) + int(point.value)
    return counted


@pytest.mark.parametrize("exported", [True, False])
async def test_faults_are_counted_on_the_builds_meter_when_metrics_are_exported(
    exported: bool,
) -> None:
    reader = InMemoryMetricReader()
    context = make_context(Settings(), FakeBackend(), meter_provider=MeterProvider([reader]))  # type: ignore[arg-type]
    if not exported:
        context.stats.instruments = None  # what REDIS_METRICS__EXPORT=false does
    chaos = resilient_cache_chaos.build(
        ChaosSettings(enabled=True, rate=1, fault="tryagain"), context
    )
    assert chaos is not None
    assert faults_counted(reader) == {}  # nothing is made before the first fault
    for _ in range(3):
        assert await outcome(chaos, routed("GET", SECRET)) == "TryAgainError"
    assert faults_counted(reader) == ({"tryagain": 3} if exported else {})
