"""The routing stage with the replica strategies: its settings (every error names its
REDIS_ROUTING__ variable), candidates and breakers, the per-call override, and hedged reads,
against a fake backend whose replies the test releases by hand."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache import Command, ConfigurationError, create_redis_cluster
from resilient_cache.circuit import BreakerBoard
from resilient_cache.errors import CircuitBreakerOpenError
from resilient_cache.node_facts import NodeFacts
from resilient_cache.registry import BuildContext
from resilient_cache.routing_policies import RoundRobin, primary_reads
from resilient_cache.stages.routing import (
    EVENT_HEDGE,
    HEDGES,
    ReplicaRoutingStage,
    RoutingSettings,
    RoutingStage,
    build,
)
from resilient_cache.telemetry import CommandStats, make_instruments


def error_of(**routing: Any) -> str:
    with pytest.raises(ConfigurationError) as caught:
        create_redis_cluster("a:1", autoload=False, routing=routing)
    return str(caught.value)


def env_error(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    for name, value in variables.items():
        monkeypatch.setenv(f"REDIS_ROUTING__{name.upper()}", value)
    with pytest.raises(ConfigurationError) as caught:
        create_redis_cluster("a:1", autoload=False)
    return str(caught.value)


# -- settings --------------------------------------------------------------------------------


def test_the_default_is_the_primary_only_stage() -> None:
    client = create_redis_cluster("a:1", autoload=False)
    assert type(client.stage("routing")) is RoutingStage
    assert client.get_cluster().load_balancing_strategy is None  # no READONLY connections


@pytest.mark.parametrize(
    ("routing", "policy"),
    [({"read_from_replicas": True}, RoundRobin), ({"strategy": "round_robin"}, RoundRobin)],
)
def test_read_from_replicas_is_round_robin(routing: dict[str, Any], policy: type) -> None:
    client = create_redis_cluster("a:1", autoload=False, routing=routing)
    stage = client.stage("routing")
    assert isinstance(stage, ReplicaRoutingStage)
    assert isinstance(stage._policy, policy)
    assert client.get_cluster().load_balancing_strategy is not None  # READONLY on replicas


@pytest.mark.parametrize(
    "strategy",
    ["replica_preferred", "round_robin_replicas", "random_replica", "latency", "zone"],
)
def test_every_replica_strategy_turns_replica_connections_readonly(strategy: str) -> None:
    prefer = ["10.0.0.0/8"] if strategy == "zone" else []
    client = create_redis_cluster(
        "a:1", autoload=False, routing={"strategy": strategy, "prefer": prefer}
    )
    assert isinstance(client.stage("routing"), ReplicaRoutingStage)
    assert client.get_cluster().load_balancing_strategy is not None


def test_an_unknown_strategy_names_the_variable_and_the_choices(monkeypatch) -> None:
    message = env_error(monkeypatch, strategy="fastest")
    assert message.startswith("REDIS_ROUTING__STRATEGY / routing.strategy: 'fastest' is not a")
    assert "replica_preferred" in message and "zone" in message


def test_strategy_names_are_case_insensitive(monkeypatch) -> None:
    monkeypatch.setenv("REDIS_ROUTING__STRATEGY", " Round_Robin_Replicas ")
    client = create_redis_cluster("a:1", autoload=False)
    assert client.settings.routing.strategy == "round_robin_replicas"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("read_from_replicas", "strategy"),
    [("true", "latency"), ("true", "primary"), ("false", "round_robin")],
)
def test_read_from_replicas_and_strategy_that_disagree_name_both(
    monkeypatch, read_from_replicas: str, strategy: str
) -> None:
    message = env_error(monkeypatch, read_from_replicas=read_from_replicas, strategy=strategy)
    assert message.startswith("REDIS_ROUTING__READ_FROM_REPLICAS, REDIS_ROUTING__STRATEGY: ")
    assert f"REDIS_ROUTING__READ_FROM_REPLICAS={read_from_replicas}" in message
    assert f"REDIS_ROUTING__STRATEGY is {strategy}" in message


@pytest.mark.parametrize(("flag", "strategy"), [(True, "round_robin"), (False, "primary")])
def test_read_from_replicas_and_strategy_that_agree_are_fine(flag: bool, strategy: str) -> None:
    client = create_redis_cluster(
        "a:1", autoload=False, routing={"read_from_replicas": flag, "strategy": strategy}
    )
    assert client.settings.routing.effective_strategy == strategy  # type: ignore[attr-defined]


def test_zone_needs_prefer() -> None:
    message = error_of(strategy="zone")
    assert message.startswith("routing (keyword argument): REDIS_ROUTING__STRATEGY=zone needs")
    assert "REDIS_ROUTING__PREFER" in message


def test_prefer_is_only_for_zone(monkeypatch) -> None:
    message = env_error(monkeypatch, strategy="latency", prefer='["10.0.0.0/8"]')
    assert "REDIS_ROUTING__PREFER is only for REDIS_ROUTING__STRATEGY=zone" in message


def test_a_bad_prefer_entry_is_named(monkeypatch) -> None:
    message = env_error(monkeypatch, strategy="zone", prefer='["10.0.0.0/8", "10.0.0.0/99"]')
    assert message.startswith("REDIS_ROUTING__PREFER / routing.prefer: '10.0.0.0/99' is not")


@pytest.mark.parametrize("value", ["p50", "0", "61", "-1", "nan", "inf", "soon", "true"])
def test_a_bad_hedge_after_names_the_variable(monkeypatch, value: str) -> None:
    message = env_error(monkeypatch, strategy="replica_preferred", hedge_after=value)
    assert message.startswith("REDIS_ROUTING__HEDGE_AFTER / routing.hedge_after: must be seconds")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.05", 0.05), ("P95", "p95"), ("p99", "p99"), ("off", None), ("", None), ("60", 60.0)],
)
def test_hedge_after_values(monkeypatch, value: str, expected: Any) -> None:
    monkeypatch.setenv("REDIS_ROUTING__STRATEGY", "replica_preferred")
    monkeypatch.setenv("REDIS_ROUTING__HEDGE_AFTER", value)
    client = create_redis_cluster("a:1", autoload=False)
    assert client.settings.routing.hedge_after == expected  # type: ignore[attr-defined]


def test_hedging_needs_a_strategy_with_another_node(monkeypatch) -> None:
    message = env_error(monkeypatch, hedge_after="0.05")
    assert message.startswith("REDIS_ROUTING__HEDGE_AFTER: REDIS_ROUTING__HEDGE_AFTER needs a")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hedge_budget", "0"),
        ("hedge_budget", "1.5"),
        ("max_lag", "-1"),
        ("max_lag", str(2**41)),
        ("latency_tolerance", "-0.1"),
        ("latency_tolerance", "11"),
    ],
)
def test_numbers_out_of_range_name_the_variable(monkeypatch, field: str, value: str) -> None:
    message = env_error(monkeypatch, strategy="replica_preferred", **{field: value})
    assert message.startswith(f"REDIS_ROUTING__{field.upper()} / routing.{field}: ")


def test_a_misspelt_routing_variable_is_refused(monkeypatch) -> None:
    message = env_error(monkeypatch, stratgy="latency")
    assert message.startswith("REDIS_ROUTING__STRATGY / routing.stratgy: ")


# -- the stage on a fake backend ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Node:
    host: str
    port: int
    server_type: str = "replica"

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


P = Node("127.0.0.1", 7000, "primary")
R1 = Node("127.0.0.1", 7003)
R2 = Node("127.0.0.1", 7004)


class FakeBackend:
    name = "fake"
    routes_per_node = True
    topology_stale = False

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.node_facts = NodeFacts()
        self.replica_reads = False

    def route(self, command: Command, replica: bool = False) -> Any:
        return self.nodes[0]

    def slot_nodes(self, command: Command) -> Any:
        return self.nodes if command.keys else None

    def request_refresh(self) -> None:
        pass

    def enable_replica_reads(self) -> None:
        self.replica_reads = True


def make_stage(
    clock: Any,
    sleep: Any = None,
    nodes: list[Node] | None = None,
    *,
    traced: bool = False,
    meter_provider: Any = None,
    tracer_provider: Any = None,
    **routing: Any,
) -> tuple[ReplicaRoutingStage, FakeBackend, BreakerBoard]:
    backend = FakeBackend(nodes or [P, R1, R2])
    breakers = BreakerBoard(clock=clock)
    stats = CommandStats()
    if meter_provider is not None:
        stats.instruments = make_instruments(meter_provider)
    context = BuildContext(
        settings=None,  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
        clock=clock,
        sleep=sleep or clock.sleep,
        tracer_provider=tracer_provider or TracerProvider(),
        meter_provider=meter_provider,  # type: ignore[arg-type]
        stats=stats,
        breakers=breakers,
        traced=traced,
    )
    stage = build(RoutingSettings(**routing), context)
    assert isinstance(stage, ReplicaRoutingStage)
    assert backend.replica_reads
    return stage, backend, breakers


def get(key: str = "k") -> Command:
    return Command("GET", (key,))


class Replies:
    """A terminal handler: each node's calls wait until the test answers for that node."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.cancelled: list[str] = []
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._sent_more = asyncio.Event()

    async def __call__(self, command: Command) -> Any:
        node = command.node.name
        self.sent.append(node)
        self._sent_more.set()
        future = self._waiting.setdefault(node, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.shield(future)  # shared by the calls to one node
        except asyncio.CancelledError:
            self.cancelled.append(node)
            raise

    async def wait_sent(self, count: int) -> None:
        while len(self.sent) < count:
            self._sent_more.clear()
            await self._sent_more.wait()

    def answer(self, node: Node, value: Any) -> None:
        future = self._waiting.setdefault(node.name, asyncio.get_running_loop().create_future())
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


async def answered_by(stage: ReplicaRoutingStage, command: Command | None = None) -> str:
    async def terminal(command: Command) -> str:
        return command.node.name

    return await stage(command or get(), terminal)


async def test_writes_and_reads_inside_primary_reads_go_to_the_primary(clock) -> None:
    stage, _, _ = make_stage(clock, strategy="round_robin_replicas")
    assert await answered_by(stage, Command("SET", ("k", "v"))) == P.name
    assert {await answered_by(stage) for _ in range(4)} == {R1.name, R2.name}
    with primary_reads():
        assert {await answered_by(stage) for _ in range(4)} == {P.name}


async def test_a_slot_without_replicas_reads_from_the_primary(clock) -> None:
    stage, _, _ = make_stage(clock, nodes=[P], strategy="round_robin_replicas")
    assert await answered_by(stage) == P.name


async def test_replicas_behind_max_lag_or_unusable_are_skipped(clock) -> None:
    from tests.unit.test_routing_policies import _stats

    stage, backend, _ = make_stage(clock, strategy="round_robin_replicas", max_lag=1000)
    backend.node_facts.note_probe(
        [
            _stats(P, replication_offset=100_000),  # type: ignore[arg-type]
            _stats(R1, "replica", link_up=True, replication_offset=99_500),  # type: ignore[arg-type]
            _stats(R2, "replica", link_up=True, replication_offset=90_000),  # type: ignore[arg-type]
        ]
    )
    assert {await answered_by(stage) for _ in range(4)} == {R1.name}
    backend.node_facts.note_probe([_stats(R1, "replica", link_up=False)])  # type: ignore[arg-type]
    assert {await answered_by(stage) for _ in range(4)} == {P.name}


async def test_an_open_replica_breaker_moves_reads_on_and_never_blocks_the_shard(clock) -> None:
    stage, _, breakers = make_stage(clock, strategy="replica_preferred")
    assert await answered_by(stage) == R1.name
    breakers.get(R1.name).isolate()
    assert await answered_by(stage) == R2.name
    breakers.get(R2.name).threshold = 1
    breakers.get(R2.name).on_failure()  # open
    assert await answered_by(stage) == P.name
    clock.advance(breakers.get(R2.name).reset_timeout)  # its probe is due: it may serve again
    assert await answered_by(stage) == R2.name


async def test_a_refusal_after_routing_moves_on_to_the_next_node(clock) -> None:
    """The breaker stage refuses (half-open, its probe already in flight): the read goes to
    the next candidate, the primary last, whose own refusal reaches the caller."""
    stage, _, _ = make_stage(clock, strategy="replica_preferred")
    tried: list[str] = []

    async def refusing(command: Command) -> str:
        tried.append(command.node.name)
        if command.node is not P:
            raise CircuitBreakerOpenError(command.node.name, 0.0)
        return "from primary"

    assert await stage(get(), refusing) == "from primary"
    assert tried == [R1.name, R2.name, P.name]

    async def all_refuse(command: Command) -> str:
        raise CircuitBreakerOpenError(command.node.name, 1.0)

    with pytest.raises(CircuitBreakerOpenError, match=P.name):
        await stage(get(), all_refuse)


async def test_a_refusing_primary_chosen_first_goes_last(clock) -> None:
    stage, _, breakers = make_stage(clock, strategy="round_robin")
    breakers.get(P.name).isolate()
    assert P.name not in {await answered_by(stage) for _ in range(6)}


async def test_latency_reads_measure_every_reply(clock) -> None:
    stage, backend, _ = make_stage(clock, strategy="latency")

    async def slow_replica(command: Command) -> str:
        clock.advance(0.050 if command.node is R1 else 0.001)
        return command.node.name

    seen = [await stage(get(), slow_replica) for _ in range(12)]
    assert backend.node_facts.latency(R1.name) == pytest.approx(0.050)
    assert seen[3:].count(R1.name) == 0  # measured once, avoided since
    assert set(seen) == {P.name, R1.name, R2.name}


async def test_a_failed_read_counts_as_slow(clock) -> None:
    stage, backend, _ = make_stage(clock, strategy="latency")

    async def failing(command: Command) -> str:
        raise RedisConnectionError("Error 111 connecting")

    with pytest.raises(RedisConnectionError):
        await stage(get(), failing)
    assert max(backend.node_facts.latency(n.name) or 0 for n in (P, R1, R2)) >= 0.1


# -- hedged reads -------------------------------------------------------------------------------


class Timer:
    """The stage's sleep: the hedge delay ends when the test says so."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.fire = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await self.fire.wait()


async def test_a_read_answered_before_the_delay_is_not_hedged(clock) -> None:
    timer = Timer()
    stage, _, _ = make_stage(clock, timer, strategy="replica_preferred", hedge_after=0.05)
    replies = Replies()
    read = asyncio.create_task(stage(get(), replies))
    await replies.wait_sent(1)
    replies.answer(R1, b"v")
    assert await read == b"v"
    assert (timer.delays, replies.sent, stage.hedges) == ([0.05], [R1.name], 0)
    assert stage.budget is not None and stage.budget.reads == 1


async def test_the_hedge_answers_first_and_the_first_read_is_cancelled(clock) -> None:
    timer = Timer()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    stage, _, _ = make_stage(
        clock,
        timer,
        strategy="replica_preferred",
        hedge_after=0.05,
        traced=True,
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    replies = Replies()
    command = get()
    with tracer_provider.get_tracer("t").start_as_current_span("GET"):
        read = asyncio.create_task(stage(command, replies))
        await replies.wait_sent(1)
        timer.fire.set()
        await replies.wait_sent(2)
        assert replies.sent == [R1.name, R2.name]  # the next fit node
        replies.answer(R2, b"from the hedge")
        assert await read == b"from the hedge"
    assert command.node is R2  # the node that answered
    await asyncio.sleep(0)
    assert replies.cancelled == [R1.name]
    assert (stage.hedges, stage.hedges_won) == (1, 1)
    (span,) = exporter.get_finished_spans()
    (event,) = [e for e in span.events if e.name == EVENT_HEDGE]
    assert dict(event.attributes or {}) == {
        "server.address": "127.0.0.1",
        "server.port": 7004,
        "resilient_cache.hedge.won": True,
        "resilient_cache.hedge.delay": 0.05,
    }
    points = {
        point.attributes["resilient_cache.hedge.won"]: point.value
        for metric in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
        if metric.name == HEDGES
        for point in metric.data.data_points
    }
    assert points == {True: 1, False: 0}


async def test_the_first_read_answers_first_and_the_hedge_is_cancelled(clock) -> None:
    timer = Timer()
    stage, _, _ = make_stage(clock, timer, strategy="round_robin_replicas", hedge_after=0.05)
    replies = Replies()
    command = get()
    read = asyncio.create_task(stage(command, replies))
    await replies.wait_sent(1)
    timer.fire.set()
    await replies.wait_sent(2)
    replies.answer(R1, b"first")
    assert await read == b"first"
    assert command.node is R1
    await asyncio.sleep(0)
    assert replies.cancelled == [R2.name]
    assert (stage.hedges, stage.hedges_won) == (1, 0)


async def test_a_node_failure_waits_for_the_other_reply(clock) -> None:
    timer = Timer()
    stage, _, _ = make_stage(clock, timer, strategy="replica_preferred", hedge_after=0.05)
    replies = Replies()
    read = asyncio.create_task(stage(get(), replies))
    await replies.wait_sent(1)
    timer.fire.set()
    await replies.wait_sent(2)
    replies.answer(R1, RedisConnectionError("Connection reset by peer"))
    await asyncio.sleep(0)
    assert not read.done()
    replies.answer(R2, b"from the hedge")
    assert await read == b"from the hedge"


async def test_a_reply_error_is_a_reply(clock) -> None:
    from redis.exceptions import ResponseError

    timer = Timer()
    stage, _, _ = make_stage(clock, timer, strategy="replica_preferred", hedge_after=0.05)
    replies = Replies()
    read = asyncio.create_task(stage(get(), replies))
    await replies.wait_sent(1)
    timer.fire.set()
    await replies.wait_sent(2)
    replies.answer(R1, ResponseError("WRONGTYPE Operation against a key"))
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await read


async def test_both_failing_raises(clock) -> None:
    timer = Timer()
    stage, _, _ = make_stage(clock, timer, strategy="replica_preferred", hedge_after=0.05)
    replies = Replies()
    read = asyncio.create_task(stage(get(), replies))
    await replies.wait_sent(1)
    timer.fire.set()
    await replies.wait_sent(2)
    replies.answer(R1, RedisConnectionError("first"))
    replies.answer(R2, RedisConnectionError("second"))
    with pytest.raises(RedisConnectionError):
        await read


async def test_the_budget_caps_hedges(clock) -> None:
    timer = Timer()
    timer.fire.set()  # every read is late
    stage, _, _ = make_stage(
        clock, timer, strategy="replica_preferred", hedge_after=0.05, hedge_budget=0.25
    )
    replies = Replies()
    reads = [asyncio.create_task(stage(get(f"k{n}"), replies)) for n in range(8)]
    await replies.wait_sent(8 + 2)
    for _ in range(10):
        await asyncio.sleep(0)
    assert (stage.hedges, stage.over_budget) == (2, 6)  # 25 % of 8 reads
    assert replies.sent.count(R2.name) == 2
    replies.answer(R2, b"hedged")
    for _ in range(10):
        await asyncio.sleep(0)
    assert sum(read.done() for read in reads) == 2  # the hedged ones
    replies.answer(R1, b"late")
    assert sorted(await asyncio.gather(*reads)) == [b"hedged"] * 2 + [b"late"] * 6


async def test_a_cancelled_caller_cancels_both_reads(clock) -> None:
    timer = Timer()
    stage, _, _ = make_stage(clock, timer, strategy="replica_preferred", hedge_after=0.05)
    replies = Replies()
    read = asyncio.create_task(stage(get(), replies))
    await replies.wait_sent(1)
    timer.fire.set()
    await replies.wait_sent(2)
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    for _ in range(3):
        await asyncio.sleep(0)
    assert sorted(replies.cancelled) == [R1.name, R2.name]


async def test_percentile_hedging_waits_for_samples(clock) -> None:
    timer = Timer()  # never fires: only the delays armed are seen
    stage, backend, _ = make_stage(clock, timer, strategy="replica_preferred", hedge_after="p95")

    async def quick(command: Command) -> str:
        clock.advance(0.002)
        for _ in range(3):
            await asyncio.sleep(0)  # the timer starts meanwhile
        return command.node.name

    for _ in range(19):
        assert await stage(get(), quick) == R1.name
    assert timer.delays == []  # 19 samples: no percentile yet, no hedge armed
    assert await stage(get(), quick) == R1.name
    assert await stage(get(), quick) == R1.name
    assert timer.delays == [pytest.approx(0.002)]
    assert backend.node_facts.percentile(R1.name, 0.95) == pytest.approx(0.002)
    assert stage.hedges == 0


async def test_percentile_hedging_uses_the_quickest_nodes_percentile(clock) -> None:
    """A replica that is always slow has a slow p95 of its own: a hedge due then comes when its
    reply does. The delay is the p95 of the quickest node that could answer instead."""
    timer = Timer()  # never fires: only the delays armed are seen
    stage, backend, _ = make_stage(clock, timer, strategy="round_robin_replicas", hedge_after="p95")
    for _ in range(20):
        backend.node_facts.observe(R1.name, 0.020, clock())  # always slow
        backend.node_facts.observe(R2.name, 0.002, clock())

    async def answer(command: Command) -> str:
        for _ in range(3):
            await asyncio.sleep(0)  # the timer starts meanwhile
        return command.node.name

    answered = [await stage(get(), answer) for _ in range(4)]
    assert R1.name in answered  # reads did go to the slow replica
    assert timer.delays == [pytest.approx(0.002)] * 4


async def test_a_slot_with_one_fit_node_is_not_hedged(clock) -> None:
    timer = Timer()
    stage, _, breakers = make_stage(clock, timer, strategy="replica_preferred", hedge_after=0.05)
    breakers.get(R1.name).isolate()
    breakers.get(R2.name).isolate()
    assert await answered_by(stage) == P.name
    assert timer.delays == [] and stage.budget is not None and stage.budget.reads == 0


async def test_a_caller_cancelling_as_the_hedge_wins_still_ends_the_command(clock) -> None:
    """The stage takes back only its own cancellation: a deadline or a caller's that came at
    the same time still ends the command (Python 3.11+ counts them)."""
    timer = Timer()
    stage, _, _ = make_stage(clock, timer, strategy="replica_preferred", hedge_after=0.05)
    replies = Replies()
    read = asyncio.create_task(stage(get(), replies))
    await replies.wait_sent(1)
    timer.fire.set()
    await replies.wait_sent(2)
    replies.answer(R2, b"from the hedge")
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read


async def test_the_first_read_runs_in_the_callers_task(clock) -> None:
    """No task per read: the one that answers before hedge_after ran where the caller runs."""
    timer = Timer()
    stage, _, _ = make_stage(clock, timer, strategy="replica_preferred", hedge_after=0.05)
    caller = asyncio.current_task()

    async def where(command: Command) -> bool:
        return asyncio.current_task() is caller

    assert await stage(get(), where) is True


class Swallowing:
    """Reads on R1 swallow the first cancellation, as ``asyncio.wait_for()`` does before Python
    3.12 when it lands as the inner call finishes (redis-py sends every command through it),
    then wait for their reply; reads elsewhere wait until the test answers them."""

    def __init__(self, reply_after_swallow: bool) -> None:
        self.replies = Replies()
        self.swallowed = 0
        self._reply_after_swallow = reply_after_swallow

    async def __call__(self, command: Command) -> Any:
        if command.node is not R1:
            return await self.replies(command)
        self.replies.sent.append(R1.name)
        self.replies._sent_more.set()
        try:
            await asyncio.get_running_loop().create_future()  # the send, never done
        except asyncio.CancelledError:
            self.swallowed += 1  # ... and carry on, as wait_for() does
        if self._reply_after_swallow:
            return b"first, read in full"
        return await asyncio.get_running_loop().create_future()  # the reply, never comes


@pytest.mark.parametrize("reply_after_swallow", [False, True])
async def test_a_swallowed_cancellation_neither_stalls_nor_escapes(
    clock, reply_after_swallow: bool
) -> None:
    timer = Timer()
    stage, _, _ = make_stage(clock, timer, strategy="replica_preferred", hedge_after=0.05)
    handler = Swallowing(reply_after_swallow)

    async def caller() -> tuple[Any, int]:
        reply = await stage(get(), handler)
        task = asyncio.current_task()
        assert task is not None
        return reply, task.cancelling() if hasattr(task, "cancelling") else 0

    read = asyncio.create_task(caller())
    await handler.replies.wait_sent(1)
    timer.fire.set()
    await handler.replies.wait_sent(2)
    handler.replies.answer(R2, b"from the hedge")
    done, _ = await asyncio.wait({read}, timeout=5)  # a guard: stalled, it would never end
    assert done, "the read stalled after the hedge answered"
    reply, left = read.result()
    assert reply == b"from the hedge"
    assert handler.swallowed == 1
    assert left == 0  # every cancellation the stage asked for was taken back
    assert (stage.hedges, stage.hedges_won) == (1, 1)
