"""The breaker stage: fails fast while the node an attempt goes to keeps failing.

One breaker per node (the one routing chose; ``"cluster"`` for commands routing could not place),
so a dead primary never blocks the healthy shards. Only infrastructure failures count (see
:func:`resilient_cache.circuit.is_infrastructure_failure`): a WRONGTYPE reply proves the node is
alive. While open, calls are refused with ``CircuitBreakerOpenError`` without touching the network,
and the refusal shows as a ``resilient_cache.breaker.refused`` event on the command's span.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache import telemetry
from resilient_cache.circuit import (
    CLUSTER_SCOPE,
    BreakerBoard,
    BreakerState,
    CircuitBreaker,
    RatePolicy,
    is_infrastructure_failure,
)
from resilient_cache.errors import CircuitBreakerOpenError
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, FastPath, Handler, NodeRef

if TYPE_CHECKING:
    from collections.abc import Callable

    from resilient_cache.backends import Backend
    from resilient_cache.registry import BuildContext, StageRegistry


class BreakerSettings(BaseModel):
    """``REDIS_BREAKER__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    threshold: int = Field(
        default=5, ge=1, le=10_000, description="Consecutive failures that open it."
    )
    reset_timeout: float = Field(
        default=60.0,
        ge=0.001,
        le=86_400,
        description="Seconds it stays open before letting a probe through.",
    )
    half_open_max_calls: int = Field(
        default=1, ge=1, le=10_000, description="Probes let through at once while half-open."
    )
    window_size: int = Field(
        default=20,
        ge=1,
        le=100_000,
        description="Calls in the sliding window the rates are taken over.",
    )
    minimum_calls: int = Field(
        default=10,
        ge=1,
        le=100_000,
        description="Calls the window needs before a rate can open it.",
    )
    failure_rate_threshold: float | None = Field(
        default=50.0,
        gt=0,
        le=100,
        description="Open when this percentage of the window failed (empty: off).",
    )
    slow_call_rate_threshold: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Open when this percentage of the window was slow (off by default).",
    )
    slow_call_duration: float = Field(
        default=1.0, ge=0.001, le=3600, description="Seconds from which a call counts as slow."
    )


class BreakerStage:
    def __init__(
        self,
        board: BreakerBoard,
        backend: Backend | None = None,
        clock: Callable[[], float] | None = None,
        span_events: bool | Callable[[], bool] = False,
    ) -> None:
        self._board = board
        self._breakers = board.breakers  # the board's dict, never replaced: one lookup less
        # Asked only on a refusal (see RetryStage: known once the whole pipeline is built).
        self._span_events = span_events if callable(span_events) else lambda: span_events
        self._backend = backend
        # Durations are measured only when the slow-call rate needs them.
        self._clock = clock if board.rates is not None and board.rates.times_calls else None
        # The token of the hooks is the breaker, or (breaker, start time) when timed. Untimed,
        # a success is the breaker's own on_success(), called by the fused pipeline directly.
        self._path = (
            FastPath(self._admit, on_error=self._failed, end=CircuitBreaker.on_success)
            if self._clock is None
            else FastPath(self._admit_timed, self._succeeded_timed, self._failed)
        )

    def fast_path(self) -> FastPath:
        return self._path

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        path = self._path
        admitted = path.before(command)  # type: ignore[misc]  # always set here
        try:
            result = await call_next(command)
        except BaseException as error:
            return await self._failed(command, admitted, error, call_next)
        if path.end is not None:
            path.end(admitted)
        else:
            path.after(command, admitted)  # type: ignore[misc]  # after when there is no end
        return result

    def _admit(self, command: Command) -> CircuitBreaker:
        """The breaker of the node ``command`` goes to, once it has let the call through."""
        node = command.node
        scope = node.name if node is not None else CLUSTER_SCOPE
        breaker = self._breakers.get(scope) or self._board.get(scope)
        if breaker.state is not CLOSED:  # a closed breaker lets every call through
            self._before_call(breaker, node)
        return breaker

    def _admit_timed(self, command: Command) -> tuple[CircuitBreaker, float]:
        breaker = self._admit(command)
        assert self._clock is not None
        return breaker, self._clock()

    def _before_call(self, breaker: CircuitBreaker, node: NodeRef | None) -> None:
        try:
            breaker.before_call()
        except CircuitBreakerOpenError as err:
            if self._span_events():
                _refused(breaker.name, breaker.state.value, err)
            # The node is failing; its slots may have moved to a new primary by now. Ask for a
            # fresh slot map so the retry stage's next attempt can be routed there.
            if node is not None and self._backend is not None:
                self._backend.request_refresh()
            raise

    def _succeeded_timed(self, command: Command, admitted: tuple[CircuitBreaker, float]) -> None:
        breaker, start = admitted
        assert self._clock is not None
        breaker.on_success(self._clock() - start)

    async def _failed(
        self,
        command: Command,
        admitted: CircuitBreaker | tuple[CircuitBreaker, float],
        error: BaseException,
        call_next: Handler,
    ) -> Any:
        elapsed: float | None = None
        if isinstance(admitted, tuple):
            breaker, start = admitted
            assert self._clock is not None
            elapsed = self._clock() - start
        else:
            breaker = admitted
        if isinstance(error, asyncio.CancelledError):
            breaker.on_ignored()
        elif isinstance(error, Exception):
            if is_infrastructure_failure(error):
                breaker.on_failure(elapsed, error)
            else:
                breaker.on_success(elapsed)  # the node answered; the error is the caller's
        raise error


CLOSED = BreakerState.CLOSED


def _refused(scope: str, state: str, err: CircuitBreakerOpenError) -> None:
    span = telemetry.recording_span()
    if span is not None:
        attributes = telemetry.scope_attributes(scope)
        attributes[telemetry.BREAKER_STATE_ATTRIBUTE] = state
        if math.isfinite(err.retry_after):  # isolated: no probe until reset by hand
            attributes[telemetry.BREAKER_RETRY_AFTER] = err.retry_after
        span.add_event(telemetry.EVENT_BREAKER_REFUSED, attributes)


def build(settings: BreakerSettings, context: BuildContext) -> BreakerStage:
    rates = None
    if settings.failure_rate_threshold is not None or settings.slow_call_rate_threshold is not None:
        rates = RatePolicy(
            window=settings.window_size,
            minimum_calls=settings.minimum_calls,
            failure_rate=settings.failure_rate_threshold,
            slow_call_rate=settings.slow_call_rate_threshold,
            slow_call_duration=settings.slow_call_duration,
        )
    context.breakers.configure(
        threshold=settings.threshold,
        reset_timeout=settings.reset_timeout,
        half_open_max_calls=settings.half_open_max_calls,
        rates=rates,
    )
    return BreakerStage(
        context.breakers,
        context.backend,
        context.clock,
        span_events=lambda: context.traced,
    )


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("breaker", BreakerSettings, build, description="Per-node circuit breakers.")
