"""The routing stage: picks the node for this attempt from the current slot map.

It sits inside retry, so each attempt is routed afresh: after a connection error the backend
marks its topology stale, routing has the slot map re-read in the background (a caller never
waits on it), and a retry after its backoff goes to the new primary.
Knowing the node before the call is also what lets the breaker stage keep one breaker per node.

With the default strategy, ``primary``, every command goes to its slot's primary
(:class:`RoutingStage`, the cheapest path). The other strategies send read-only commands to
replicas as well (:class:`ReplicaRoutingStage`): the backend lists the slot's nodes
(``backend.slot_nodes()``), replicas unfit to serve are left out (lagging, down, loading, link
to the primary down: ``backend.node_facts``, filled by the health probe; breaker open), a policy
of :mod:`resilient_cache.routing_policies` orders the rest, and the read goes to the first. A
read refused by that node's breaker moves on to the next, the primary last. With
``hedge_after``, a read with no reply by then is sent to the next node too; the first reply
wins and the other is cancelled. docs/routing.md has the whole story.
"""

from __future__ import annotations

import asyncio
import math
import operator
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from resilient_cache import telemetry
from resilient_cache.circuit import BreakerBoard, BreakerState, is_infrastructure_failure
from resilient_cache.errors import CircuitBreakerOpenError, ConfigurationError
from resilient_cache.hedging import Hedge, cancelled_by_others, failed_on_node, twin
from resilient_cache.hookspecs import hookimpl
from resilient_cache.node_facts import NodeFacts
from resilient_cache.pipeline import Command, FastPath, Handler, NodeRef
from resilient_cache.routing_policies import (
    PRIMARY_READS,
    STRATEGIES,
    HedgeBudget,
    Policy,
    Strategy,
    make_policy,
    parse_patterns,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation

    from resilient_cache.backends import Backend
    from resilient_cache.registry import BuildContext, StageRegistry

#: ``hedge_after`` as a percentile of recent latency (the quickest eligible node's).
HEDGE_PERCENTILES = {"p95": 0.95, "p99": 0.99}
HEDGE_AFTER_RANGE = (0.0001, 60.0)

#: The counter of hedged reads (``resilient_cache.hedge.won``: whether the hedge answered first).
HEDGES = "resilient_cache.routing.hedges"
#: The span event of a hedged read, with the winning node's ``server.address``/``server.port``.
EVENT_HEDGE = "resilient_cache.hedge"
HEDGE_WON = "resilient_cache.hedge.won"
HEDGE_DELAY = "resilient_cache.hedge.delay"
CLOSED = BreakerState.CLOSED
#: What a failed read adds to its node's latency average, at least (seconds).
FAILURE_PENALTY = 0.1


class RoutingSettings(BaseModel):
    """``REDIS_ROUTING__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    strategy: Strategy = Field(
        default="primary",
        description="Where read-only commands go: primary, replica_preferred, round_robin, "
        "round_robin_replicas, random_replica, latency or zone (docs/routing.md). Writes "
        "always go to the primary.",
    )
    read_from_replicas: bool = Field(
        default=False,
        description="The original switch: true is strategy round_robin (the primary and its "
        "replicas take turns). Replicas can lag: a read may miss a write made just before.",
    )
    prefer: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="For strategy zone: host globs, host:port globs or CIDRs of the nodes to "
        "read from first.",
    )
    max_lag: int = Field(
        default=1_048_576,
        ge=0,
        le=2**40,
        description="Bytes of replication stream a replica may be behind its primary (as of "
        "the last health probe) and still serve reads.",
    )
    latency_tolerance: float = Field(
        default=0.25,
        ge=0,
        le=10,
        description="For strategy latency: nodes up to this ratio slower than the fastest "
        "(0.25: 25 %) share the reads with it.",
    )
    hedge_after: float | Literal["p95", "p99"] | None = Field(
        default=None,
        description="Send a read that has no reply after this many seconds (or the p95 / p99 "
        "latency of the quickest node that can serve it) to another node too; off by default.",
    )
    hedge_budget: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Largest share of reads that may be hedged (over the last 10 seconds).",
    )

    @field_validator("strategy", mode="before")
    @classmethod
    def _known_strategy(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() not in STRATEGIES:
            choices = ", ".join(STRATEGIES)
            raise ValueError(f"{value.strip()!r} is not a strategy; choose one of {choices}")
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("prefer")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        parse_patterns(value)  # ValueError naming the first bad entry
        return value

    @field_validator("hedge_after", mode="before")
    @classmethod
    def _hedge_after(cls, value: Any) -> Any:
        if value is None:
            return None
        problem = (
            "must be seconds (0.0001 to 60), p95 or p99 (recent latency of the quickest node "
            "that can serve the read), or off"
        )
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("", "off", "none", "null"):
                return None
            if text in HEDGE_PERCENTILES:
                return text
            try:
                value = float(text)
            except ValueError:
                raise ValueError(problem) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(problem)
        low, high = HEDGE_AFTER_RANGE
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(problem)
        return float(value)

    @model_validator(mode="after")
    def _consistent(self) -> RoutingSettings:
        given = self.model_fields_set
        if "read_from_replicas" in given and "strategy" in given:
            implied = "round_robin" if self.read_from_replicas else "primary"
            if self.strategy != implied:
                raise ValueError(
                    f"REDIS_ROUTING__READ_FROM_REPLICAS={str(self.read_from_replicas).lower()} "
                    f"means strategy {implied}, but REDIS_ROUTING__STRATEGY is "
                    f"{self.strategy}; set only REDIS_ROUTING__STRATEGY"
                )
        strategy = self.effective_strategy
        if strategy == "zone" and not self.prefer:
            raise ValueError(
                "REDIS_ROUTING__STRATEGY=zone needs REDIS_ROUTING__PREFER, the patterns of the "
                'nodes to read from first (such as ["10.1.0.0/16"] or ["*.zone-a.internal"])'
            )
        if self.prefer and strategy != "zone":
            raise ValueError(
                f"REDIS_ROUTING__PREFER is only for REDIS_ROUTING__STRATEGY=zone (the strategy "
                f"is {strategy})"
            )
        if self.hedge_after is not None and strategy == "primary":
            raise ValueError(
                "REDIS_ROUTING__HEDGE_AFTER needs a REDIS_ROUTING__STRATEGY that reads from "
                "replicas: with strategy primary there is no other node to send a hedge to"
            )
        return self

    @property
    def effective_strategy(self) -> str:
        """``strategy``, or ``round_robin`` when only ``read_from_replicas`` is on."""
        if self.read_from_replicas and "strategy" not in self.model_fields_set:
            return "round_robin"
        return self.strategy


class RoutingStage:
    """Strategy ``primary``: every command to its slot's primary."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._topology_stale = _reader(backend, "topology_stale")

    def fast_path(self) -> FastPath:
        return FastPath(self._place)

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        self._place(command)
        return await call_next(command)

    def _place(self, command: Command) -> None:
        backend, stale = self._backend, self._topology_stale
        if stale(backend):  # backend.topology_stale
            backend.request_refresh()  # in the background: never wait on a hung cluster
        command.node = backend.route(command)


def _reader(backend: Any, name: str) -> Callable[[Any], Any]:
    """A function reading ``backend.<name>``, found once: for a property, its getter. Reading
    a property is a call from C into Python on Python 3.11 (not specialised until 3.12); its
    getter called from Python is an ordinary call, about 1 % of the default pipeline's cost
    less per command (docs/performance.md). Anything else, a plain attribute, is read by
    ``operator.attrgetter``."""
    # Looked up on the class: reading the instance's __dict__, as inspect.getattr_static does,
    # makes CPython keep it as a real dict, and every attribute read on it slower from then on.
    found = getattr(type(backend), name, None)
    if isinstance(found, property) and found.fget is not None:
        return found.fget
    return operator.attrgetter(name)


class ReplicaRoutingStage:
    """Every strategy but ``primary``: reads to the node the policy picks among the slot's
    primary and fit replicas, moving on when a node's breaker refuses; hedged when
    ``hedge_after`` is set. Writes, and reads inside ``primary_reads()``, go to the primary.

    ``hedges`` / ``hedges_won`` / ``over_budget`` count hedges sent, hedges that answered
    first, and hedges the budget refused; ``budget`` is the :class:`HedgeBudget` (None when
    hedging is off)."""

    def __init__(
        self,
        backend: Backend,
        policy: Policy,
        facts: NodeFacts,
        breakers: BreakerBoard,
        *,
        max_lag: int | None = None,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        measure: bool = False,
        hedge_after: float | None = None,
        hedge_quantile: float | None = None,
        budget: HedgeBudget | None = None,
        span_events: Callable[[], bool] = lambda: False,
    ) -> None:
        self._backend = backend
        self._topology_stale = _reader(backend, "topology_stale")
        self._slot_nodes: Callable[[Command], Sequence[NodeRef] | None] = backend.slot_nodes
        self._policy = policy
        self._facts = facts
        self._breakers = breakers.breakers
        self._max_lag = max_lag
        self._clock = clock
        self._sleep = sleep
        self._measure = measure
        self._hedge_after = hedge_after
        self._hedge_quantile = hedge_quantile
        self.budget = budget
        self._span_events = span_events
        self.hedges = 0
        self.hedges_won = 0
        self.over_budget = 0

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        backend = self._backend
        if self._topology_stale(backend):  # backend.topology_stale
            backend.request_refresh()  # in the background: never wait on a hung cluster
        if command.read_only and not PRIMARY_READS.get():
            nodes = self._slot_nodes(command)
            if nodes is not None and len(nodes) > 1:
                candidates = self.candidates(nodes)
                if self.budget is not None and len(candidates) > 1:
                    return await self._hedged(command, call_next, candidates)
                if self._measure:
                    return await self._send(command, call_next, candidates)
                # _send() without measuring, inline: the common path of the replica strategies.
                index, last = 0, len(candidates) - 1
                while True:
                    command.node = candidates[index]
                    try:
                        return await call_next(command)
                    except CircuitBreakerOpenError:
                        if index == last:
                            raise
                        index += 1  # refused without being sent: the next node
        command.node = backend.route(command)
        return await call_next(command)

    def candidates(self, nodes: Sequence[Any]) -> list[Any]:
        """The nodes to try for a read of this slot, in order (``nodes``: primary first)."""
        primary = nodes[0]
        name = primary.name
        breakers, known, fits = self._breakers, self._facts.nodes, self._facts.replica_fits
        replicas = []
        for node in nodes[1:]:
            replica = node.name
            breaker = breakers.get(replica)
            if breaker is not None and breaker.state is not CLOSED and self._refusing(replica):
                continue
            if replica in known and not fits(replica, name, self._max_lag):
                continue
            replicas.append(node)
        order = self._policy.order(primary, replicas)
        if len(order) > 1 and order[0] is primary and self._refusing(name):
            order.append(order.pop(0))  # a primary that is refusing: the last resort only
        return order

    def _refusing(self, name: str) -> bool:
        breaker = self._breakers.get(name)
        if breaker is None:
            return False
        state = breaker.state
        if state is CLOSED or state is BreakerState.HALF_OPEN:
            return False
        return state is BreakerState.ISOLATED or breaker.retry_after() > 0

    async def _send(self, command: Command, call_next: Handler, candidates: list[Any]) -> Any:
        last = len(candidates) - 1
        for index, node in enumerate(candidates):
            command.node = node
            try:
                if self._measure:
                    return await self._timed(command, call_next, node)
                return await call_next(command)
            except CircuitBreakerOpenError:
                if index == last:
                    raise
        raise AssertionError("unreachable: the last candidate returns or raises")

    async def _timed(self, command: Command, call_next: Handler, node: Any) -> Any:
        clock, facts = self._clock, self._facts
        start = clock()
        try:
            result = await call_next(command)
        except CircuitBreakerOpenError:
            raise  # never sent
        except asyncio.CancelledError:
            now = clock()
            facts.observe_at_least(node.name, now - start, now)
            raise
        except Exception as err:
            now = clock()
            elapsed = now - start
            if is_infrastructure_failure(err):
                elapsed = max(elapsed, FAILURE_PENALTY)
            facts.observe(node.name, elapsed, now)
            raise
        now = clock()
        facts.observe(node.name, now - start, now)
        return result

    def _delay(self, candidates: list[Any]) -> float | None:
        quantile = self._hedge_quantile
        if quantile is None:
            return self._hedge_after
        # The percentile of the quickest node that could answer this read, not the chosen
        # node's own: a node that is always slow has a slow p95 of its own, and a hedge due
        # then would come as late as its reply.
        known = [
            delay
            for node in candidates
            if (delay := self._facts.percentile(node.name, quantile)) is not None
        ]
        return min(known) if known else None

    async def _hedged(self, command: Command, call_next: Handler, candidates: list[Any]) -> Any:
        budget = self.budget
        assert budget is not None
        budget.note_read()
        delay = self._delay(candidates)
        if delay is None:
            return await self._send(command, call_next, candidates)

        def start() -> tuple[Awaitable[Any], Command] | None:
            rest = [node for node in candidates if node is not command.node]
            if not rest:
                return None
            if not budget.try_take():
                self.over_budget += 1
                return None
            self.hedges += 1
            second = twin(command)
            return self._send(second, call_next, rest), second

        hedge = Hedge(start)
        hedge.arm(delay, self._sleep)
        failure: Exception | None = None
        try:
            try:
                result = await self._send(command, call_next, candidates)
            except asyncio.CancelledError:
                hedge.delivered = True
                if not hedge.won or cancelled_by_others(hedge.task, hedge.cancels):
                    raise
            except Exception as err:
                if not hedge.won:
                    if hedge.second is None or not failed_on_node(err):
                        raise
                    failure = err  # the hedge is still out: its answer decides
            else:
                if not hedge.won:
                    hedge.finished = True
                    if hedge.second is not None and self._span_events():
                        _hedge_event(command.node, False, delay)
                    return result
            # The hedge answered first, but the cancellation meant to stop this read may have
            # been swallowed below (see resilient_cache/hedging.py): take it back.
            if hedge.won and not hedge.delivered and cancelled_by_others(hedge.task, hedge.cancels):
                raise asyncio.CancelledError
            hedge.finished = True
            second = hedge.second
            assert second is not None
            if failure is not None:
                await asyncio.wait((second,))
                if second.cancelled() or second.exception() is not None:
                    raise failure  # both failed: the first read's error
            return self._hedge_answered(command, hedge, delay)
        finally:
            hedge.disarm()

    def _hedge_answered(self, command: Command, hedge: Hedge, delay: float) -> Any:
        second, copy = hedge.second, hedge.command
        assert second is not None and copy is not None
        result = second.result()
        self.hedges_won += 1
        command.node = copy.node
        if copy.redirects:
            command.redirects = (command.redirects or []) + copy.redirects
        if self._span_events():
            _hedge_event(command.node, True, delay)
        return result


def _hedge_event(node: NodeRef | None, won: bool, delay: float) -> None:
    span = telemetry.recording_span()
    if span is not None:
        attributes = telemetry.node_attributes(node)
        attributes[HEDGE_WON] = won
        attributes[HEDGE_DELAY] = delay
        span.add_event(EVENT_HEDGE, attributes)


class _Observers:
    """The hedge counter on one meter, summing every routing stage on it (an SDK meter keeps
    the callbacks of the first observable instrument of a name only)."""

    def __init__(self, meter: Any) -> None:
        self.stages: weakref.WeakKeyDictionary[ReplicaRoutingStage, Any] = (
            weakref.WeakKeyDictionary()
        )
        meter.create_observable_counter(
            HEDGES,
            [self._hedges],
            unit="{hedge}",
            description="Reads sent to a second node because the first had not answered; "
            "resilient_cache.hedge.won: whether the second answered first.",
        )

    def _hedges(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        stages = [stage for stage, stats in list(self.stages.items()) if stats.instruments]
        if not stages:
            return []
        won = sum(stage.hedges_won for stage in stages)
        lost = sum(stage.hedges for stage in stages) - won
        return [Observation(won, {HEDGE_WON: True}), Observation(lost, {HEDGE_WON: False})]


_OBSERVERS: weakref.WeakKeyDictionary[Any, _Observers] = weakref.WeakKeyDictionary()


def _observe(stage: ReplicaRoutingStage, context: BuildContext) -> None:
    instruments = context.stats.instruments
    if instruments is None:
        return  # no SDK, or metric export switched off
    observers = _OBSERVERS.get(instruments.meter)
    if observers is None:
        observers = _OBSERVERS[instruments.meter] = _Observers(instruments.meter)
    observers.stages[stage] = context.stats  # reported while its instruments are on


def build(
    settings: RoutingSettings, context: BuildContext
) -> RoutingStage | ReplicaRoutingStage | None:
    backend = context.backend
    if not backend.routes_per_node:
        return None  # one node: nothing to route
    strategy = settings.effective_strategy
    if strategy == "primary":
        return RoutingStage(backend)
    if getattr(backend, "slot_nodes", None) is None:
        raise ConfigurationError(
            f"REDIS_ROUTING__STRATEGY: {strategy} needs a backend that lists each slot's "
            f"replicas (slot_nodes()); the {backend.name!r} backend does not"
        )
    facts = getattr(backend, "node_facts", None)
    if not isinstance(facts, NodeFacts):
        facts = NodeFacts()  # only this stage's own measurements, then
    backend.enable_replica_reads()  # READONLY on replica connections
    quantile = (
        HEDGE_PERCENTILES[settings.hedge_after] if isinstance(settings.hedge_after, str) else None
    )
    hedging = settings.hedge_after is not None
    stage = ReplicaRoutingStage(
        backend,
        make_policy(strategy, facts, tolerance=settings.latency_tolerance, prefer=settings.prefer),
        facts,
        context.breakers,
        max_lag=settings.max_lag,
        clock=context.clock,
        sleep=context.sleep,
        measure=strategy == "latency" or quantile is not None,
        hedge_after=settings.hedge_after if isinstance(settings.hedge_after, float) else None,
        hedge_quantile=quantile,
        budget=HedgeBudget(settings.hedge_budget, context.clock) if hedging else None,
        span_events=lambda: context.traced,
    )
    if hedging:
        _observe(stage, context)
    return stage


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("routing", RoutingSettings, build, description="Picks the node per attempt.")
