"""The bulkhead stage: a bound on the commands in flight, per node and in all.

Off the default order; place it with ``REDIS_STAGES``, after ``routing`` (it needs the node)
and before ``breaker`` (its refusals are about this process, not about the node, so the
breaker must never count them)::

    REDIS_STAGES=tracing,metrics,memory,timeout,retry,routing,bulkhead,breaker

A command that finds its node (or the whole client) at the limit waits in a short queue, at
most ``queue_timeout`` seconds and never past its deadline; when the queue is full, or the wait
runs out, it fails at once with :class:`~resilient_cache.errors.BulkheadFullError`: never sent,
so safe to try again later, and not retried by the retry stage (shedding load is the point).
So a shard that stops answering ties up at most ``max_in_flight_per_node`` coroutines and
``max_queue`` waiters, instead of every request the service receives (Polly's and
resilience4j's bulkhead). A slot is freed the moment its command ends, and the longest waiter
whose node has room gets it.

Time is the pipeline's: the queue timeout runs on the build's ``sleep``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache.circuit import CLUSTER_SCOPE
from resilient_cache.errors import BulkheadFullError
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, Handler

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation

    from resilient_cache.registry import BuildContext, StageRegistry

IN_FLIGHT = "resilient_cache.bulkhead.in_flight"
QUEUED = "resilient_cache.bulkhead.queued"
REJECTED = "resilient_cache.bulkhead.rejected"


class BulkheadSettings(BaseModel):
    """``REDIS_BULKHEAD__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    max_in_flight: int = Field(
        default=1000, ge=1, le=1_000_000, description="Commands in flight in all, at most."
    )
    max_in_flight_per_node: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="Commands in flight per node, at most (a good value is the connection "
        "pool's max_connections: beyond it redis-py has no connection to give anyway).",
    )
    max_queue: int = Field(
        default=100, ge=0, le=1_000_000, description="Commands waiting for room, at most."
    )
    queue_timeout: float = Field(
        default=0.1,
        ge=0,
        le=3600,
        description="Seconds a command waits for room before BulkheadFullError (never past "
        "its deadline).",
    )


class BulkheadStage:
    """Counts commands in flight per scope (a node's name, or ``"cluster"`` when routing chose
    no node); ``in_flight``, ``queued`` and ``rejected`` are read by the metrics."""

    def __init__(
        self,
        settings: BulkheadSettings,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.max_in_flight = settings.max_in_flight
        self.max_per_node = settings.max_in_flight_per_node
        self.max_queue = settings.max_queue
        self.queue_timeout = settings.queue_timeout
        self._clock = clock
        self._sleep = sleep
        self.in_flight = 0
        self.per_node: dict[str, int] = {}
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self.queued = 0
        self.rejected = 0

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        node = command.node
        scope = node.name if node is not None else CLUSTER_SCOPE
        if self._has_room(scope) and scope not in self._waiting:
            self._take(scope)  # the common case: no await, no allocation
        else:
            await self._wait_for_room(command, scope)
        try:
            return await call_next(command)
        finally:
            self._give_back(scope)

    # -- slots ------------------------------------------------------------------------------

    def _has_room(self, scope: str) -> bool:
        return (
            self.in_flight < self.max_in_flight and self.per_node.get(scope, 0) < self.max_per_node
        )

    def _take(self, scope: str) -> None:
        self.in_flight += 1
        self.per_node[scope] = self.per_node.get(scope, 0) + 1

    def _give_back(self, scope: str) -> None:
        self.in_flight -= 1
        left = self.per_node[scope] - 1
        if left:
            self.per_node[scope] = left
        else:
            del self.per_node[scope]
        if self._waiting:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give freed room to the longest waiters whose node has room (a waiter's slot is
        taken for it here, so nobody overtakes it between its wake-up and its run)."""
        for scope in list(self._waiting):
            waiters = self._waiting[scope]
            while waiters and self._has_room(scope):
                waiter = waiters.popleft()
                self.queued -= 1
                if not waiter.done():
                    self._take(scope)
                    waiter.set_result(None)
            if not waiters:
                del self._waiting[scope]
            if self.in_flight >= self.max_in_flight:
                return

    # -- the queue --------------------------------------------------------------------------

    async def _wait_for_room(self, command: Command, scope: str) -> None:
        timeout = self.queue_timeout
        if command.deadline is not None:
            timeout = min(timeout, command.deadline - self._clock())
        if self.queued >= self.max_queue or timeout <= 0:
            self.rejected += 1
            raise BulkheadFullError(command.name, scope, self.queued, waited=False)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(scope, deque()).append(waiter)
        self.queued += 1
        timer = asyncio.ensure_future(self._sleep(timeout))
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_back(scope)  # granted just as the caller went away
            else:
                self._forget(scope, waiter)
            raise
        finally:
            timer.cancel()
        if waiter.done():
            return  # _hand_over took the slot for us
        self._forget(scope, waiter)
        self.rejected += 1
        raise BulkheadFullError(command.name, scope, self.queued, waited=True)

    def _forget(self, scope: str, waiter: asyncio.Future[None]) -> None:
        waiter.cancel()
        waiters = self._waiting.get(scope)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            self.queued -= 1
            if not waiters:
                del self._waiting[scope]


class _Observers:
    """The bulkhead's observable instruments on one meter, summing every bulkhead on it (an
    SDK meter keeps the callbacks of the first instrument of a name only)."""

    def __init__(self, meter: Any) -> None:
        self.stages: weakref.WeakSet[BulkheadStage] = weakref.WeakSet()
        for name, field, kind, what in (
            (IN_FLIGHT, "in_flight", "gauge", "Commands in flight."),
            (QUEUED, "queued", "gauge", "Commands waiting for room."),
            (REJECTED, "rejected", "counter", "Commands refused with BulkheadFullError."),
        ):
            create = (
                meter.create_observable_gauge
                if kind == "gauge"
                else meter.create_observable_counter
            )
            create(name, [self._reading(field)], unit="{command}", description=what)

    def _reading(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        from opentelemetry.metrics import Observation

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            stages = list(self.stages)
            if not stages:
                return []
            return [Observation(sum(getattr(stage, field) for stage in stages))]

        return callback


_OBSERVERS: weakref.WeakKeyDictionary[Any, _Observers] = weakref.WeakKeyDictionary()


def _observe(stage: BulkheadStage, context: BuildContext) -> None:
    """Report in-flight, queued and rejected commands through this client's meter."""
    if context.stats.instruments is None:
        return  # no SDK, or metric export switched off
    meter = context.stats.instruments.meter
    observers = _OBSERVERS.get(meter)
    if observers is None:
        observers = _OBSERVERS[meter] = _Observers(meter)
    observers.stages.add(stage)


def build(settings: BulkheadSettings, context: BuildContext) -> BulkheadStage:
    stage = BulkheadStage(settings, context.clock, context.sleep)
    _observe(stage, context)
    return stage


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add(
        "bulkhead", BulkheadSettings, build, description="Bounds commands in flight per node."
    )
