"""The retry stage: repeats attempts that are safe to repeat, with jittered exponential backoff,
inside the command's deadline.

- Redirects (MOVED/ASK) never reach this stage: redis-py follows them within one attempt.
- CLUSTERDOWN, TRYAGAIN, connection errors and timeouts are retried after a backoff; the backend
  marks the topology stale on connection errors, so routing re-reads the slot map first and the
  next attempt goes to the new primary after a failover.
- A command that is not idempotent (INCR, LPUSH, SET NX, ...) whose connection broke after it was
  sent may have run: it is not repeated blindly but raised as :class:`CommandInDoubtError`,
  unless ``retry_in_doubt`` is set.
- When attempts run out, the last real error is raised with ``attempts`` set on it.

Telemetry, on the failure path only: each failed attempt adds an event to the command's span
(``resilient_cache.retry`` / ``resilient_cache.failover_wait`` with the node, the error type and
the delay, or ``resilient_cache.give_up`` with the reason) and counts in
``resilient_cache.command.retries``. A command that succeeds first time costs nothing extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.backoff import AbstractBackoff, EqualJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    MaxConnectionsError,
    ReadOnlyError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resilient_cache import telemetry
from resilient_cache.backends._redis_py_compat import failed_while_connecting
from resilient_cache.circuit import CLUSTER_SCOPE
from resilient_cache.errors import (
    BulkheadFullError,
    CircuitBreakerOpenError,
    CommandInDoubtError,
    CommandTimeoutError,
    SlotNotServedError,
)
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, FastPath, Handler

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from resilient_cache.backends import Backend
    from resilient_cache.circuit import BreakerBoard
    from resilient_cache.registry import BuildContext, StageRegistry
    from resilient_cache.telemetry import CommandStats

#: Errors after which another attempt may succeed. A node's open breaker is one while other
#: nodes answer (a failover is likely under way): the command never ran, and the next attempt
#: is routed afresh, to the new primary once the slot map has moved on.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    CircuitBreakerOpenError,
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    # "READONLY You can't write against a read only replica": the connection still points at a
    # primary that was demoted. The backend re-reads the slot map; the next attempt goes to
    # the new primary.
    ReadOnlyError,
)
#: ... except these: retrying cannot fix them, or they are decisions made above us.
NOT_RETRYABLE: tuple[type[BaseException], ...] = (
    BulkheadFullError,  # shedding load: the caller hears at once
    AuthenticationError,
    AuthorizationError,
    CommandInDoubtError,
    CommandTimeoutError,
)
#: Replies that prove the server did not run the command.
_NOT_EXECUTED: tuple[type[BaseException], ...] = (
    BulkheadFullError,
    CircuitBreakerOpenError,
    MaxConnectionsError,  # the pool had no connection to give: nothing was sent
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    BusyLoadingError,
    ReadOnlyError,  # the replica refused the write before running it
)
# TRYAGAIN clears as soon as a slot migration step finishes: wait briefly, not exponentially.
_TRYAGAIN_DELAY = 0.05
#: Conditions that pass in milliseconds: a slot migration step (TRYAGAIN) and a full local
#: connection pool.
_BRIEF: tuple[type[Exception], ...] = (TryAgainError, MaxConnectionsError)
# While waiting for a failover, look at the slot map this often (refreshes are rate-limited by
# the backend, so many waiting commands still cost at most one CLUSTER SLOTS per interval).
_FAILOVER_POLL = 0.25


class RetrySettings(BaseModel):
    """``REDIS_RETRY__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    max_retries: int = Field(
        default=3, ge=0, le=1000, description="Retries after the first attempt."
    )
    delay: float = Field(default=0.1, ge=0, le=3600, description="Base backoff delay in seconds.")
    max_delay: float | None = Field(
        default=None,
        ge=0,
        le=3600,
        description="Upper bound of one backoff delay; default max(2.0, delay).",
    )
    failover_wait: float = Field(
        default=15.0,
        ge=0,
        le=3600,
        description="For this long after a node's breaker opens (while other nodes answer), "
        "commands for that node wait for a failover, within their deadline, without using up "
        "retries; after it, they are refused fast.",
    )
    retry_in_doubt: bool = Field(
        default=False,
        description="Also retry non-idempotent commands whose outcome is unknown.",
    )

    @model_validator(mode="after")
    def _max_at_least_base(self) -> RetrySettings:
        if self.max_delay is not None and self.max_delay < self.delay:
            raise ValueError(
                f"max_delay ({self.max_delay:g}) must be at least delay / retry_delay "
                f"({self.delay:g})"
            )
        return self

    @property
    def delay_cap(self) -> float:
        return self.max_delay if self.max_delay is not None else max(2.0, self.delay)


def may_have_run(err: BaseException) -> bool:
    """Whether the server may have executed the command before ``err`` happened.

    A failure to connect, or a reply saying the cluster refused, proves it did not; a connection
    that broke or timed out after the command was written leaves it unknown.
    """
    if isinstance(err, _NOT_EXECUTED):
        return False
    known = getattr(err, "may_have_run", None)  # ConnectionClosedError knows
    if known is not None:
        return bool(known)
    if isinstance(err, RedisConnectionError | RedisTimeoutError):
        return not failed_while_connecting(err)
    return True


class RetryStage:
    def __init__(
        self,
        settings: RetrySettings,
        stats: CommandStats,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        backoff: AbstractBackoff | None = None,
        board: BreakerBoard | None = None,
        span_events: bool | Callable[[], bool] = False,
        backend: Backend | None = None,
    ) -> None:
        self.max_retries = settings.max_retries
        self.failover_wait = settings.failover_wait
        self._board = board
        # What the slot map says about a failover (whether one can come, how long it takes).
        self._backend = backend
        self.retry_in_doubt = settings.retry_in_doubt
        self.backoff = backoff or EqualJitterBackoff(cap=settings.delay_cap, base=settings.delay)
        self._stats = stats
        self._clock = clock
        self._sleep = sleep
        # Asked only when there is an event to add: whether a stage opens a span per command
        # is known once the whole pipeline is built, whatever the order of the factories.
        self._span_events = span_events if callable(span_events) else lambda: span_events

    def fast_path(self) -> FastPath:
        # The happy path is nothing at all: only a failure calls in.
        return FastPath(on_error=self._failed)

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        try:
            return await call_next(command)
        except BaseException as error:
            return await self._failed(command, None, error, call_next)

    async def _failed(
        self, command: Command, token: None, error: BaseException, call_next: Handler
    ) -> Any:
        if (
            isinstance(error, RETRYABLE_ERRORS)
            and not isinstance(error, NOT_RETRYABLE)
            and not _cluster_wide_refusal(error)
        ):
            return await self._retry(command, call_next, error)
        raise error

    async def _retry(self, command: Command, call_next: Handler, first: Exception) -> Any:
        error: Exception = first
        counted = command.attempt  # attempts that use up max_retries
        while True:
            if may_have_run(error) and not command.idempotent and not self.retry_in_doubt:
                self._give_up(command, error, "in_doubt")
                node = command.node.name if command.node is not None else None
                raise CommandInDoubtError(command.name, node, command.attempt) from error
            # A migration step (TRYAGAIN) or a full local pool clears in milliseconds: wait
            # briefly, without using up max_retries; the deadline bounds it.
            brief = isinstance(error, _BRIEF) and command.deadline is not None
            waiting = brief or self._awaiting_failover(error)
            if isinstance(error, CircuitBreakerOpenError) and not waiting:
                # Every node refuses (or the failover is overdue, or none can come): the
                # breaker's point is to answer fast, so do not sit out backoffs in front of it.
                self._give_up(command, error, "breaker_open")
                lost = self._shard_lost(command, error)
                _attach_attempts(lost or error, command.attempt)
                if lost is not None:
                    raise lost from None
                raise error
            if counted > self.max_retries and not waiting:
                self._give_up(command, error, "max_retries")
                _attach_attempts(error, command.attempt)
                raise error
            if brief or isinstance(error, TryAgainError):
                delay = _TRYAGAIN_DELAY
            elif waiting:
                delay = _FAILOVER_POLL
            else:
                delay = self.backoff.compute(counted - 1)
            if command.deadline is not None and self._clock() + delay >= command.deadline:
                self._give_up(command, error, "deadline")
                _attach_attempts(error, command.attempt)
                raise error
            self._retrying(command, error, delay, waiting and not brief)
            await self._sleep(delay)
            command.attempt += 1
            if not waiting:
                counted += 1
            command.node = None  # routing picks again from the (maybe refreshed) slot map
            self._stats.retried += 1
            try:
                return await call_next(command)
            except RETRYABLE_ERRORS as err:
                if isinstance(err, NOT_RETRYABLE) or _cluster_wide_refusal(err):
                    self._give_up(command, err, "not_retryable")
                    raise
                error = err

    def _retrying(self, command: Command, error: Exception, delay: float, failover: bool) -> None:
        """Telemetry of an attempt that failed and will be retried after ``delay`` seconds."""
        instruments = self._stats.instruments
        if instruments is not None:
            attributes = telemetry.node_attributes(command.node)
            attributes[telemetry.ERROR_TYPE] = type(error).__qualname__
            instruments.retries.add(1, attributes)
        if self._span_events():
            span = telemetry.recording_span()
            if span is not None:
                event = telemetry.EVENT_FAILOVER_WAIT if failover else telemetry.EVENT_RETRY
                span.add_event(event, _attempt_attributes(command, error, delay))

    def _give_up(self, command: Command, error: Exception, reason: str) -> None:
        """Telemetry of an attempt that failed when no other will follow."""
        if self._span_events():
            span = telemetry.recording_span()
            if span is not None:
                attributes = _attempt_attributes(command, error, None)
                attributes[telemetry.GIVE_UP_REASON] = reason
                span.add_event(telemetry.EVENT_GIVE_UP, attributes)

    def _awaiting_failover(self, error: Exception) -> bool:
        """A node's breaker refused the attempt, it opened less than ``failover_wait`` ago, and
        other nodes still answer: the node has just gone down and its replica is (probably)
        being promoted. Waiting for the slot map to move on is not a failed attempt, so it does
        not use up ``max_retries``. Once the breaker has been open longer than that (no
        failover came), or when no node answers, the breaker refuses fast."""
        if not isinstance(error, CircuitBreakerOpenError) or self._board is None:
            return False
        wait = self.failover_wait
        backend = self._backend
        if backend is not None:
            if getattr(backend, "failover_possible", _unknown)(error.scope) is False:
                return False  # no replica left to take over: nothing to wait for
            estimate = getattr(backend, "failover_estimate", None)
            if estimate is not None:
                wait = min(wait, estimate)
        return self._board.awaiting_failover(error.scope, self._clock(), wait)

    def _shard_lost(self, command: Command, error: Exception) -> SlotNotServedError | None:
        """The error to raise instead of a node's breaker refusal when that node is a primary
        with no replica left: its slots have no serving node until it comes back."""
        backend = self._backend
        if backend is None or not isinstance(error, CircuitBreakerOpenError):
            return None
        if getattr(backend, "failover_possible", _unknown)(error.scope) is not False:
            return None
        breaker = self._board.breakers.get(error.scope) if self._board is not None else None
        if breaker is not None and breaker.refused_credentials:
            return None  # the node is up and refuses the credentials: the breaker says so
        slots = getattr(backend, "slots_of", lambda node: "")(error.scope)
        return SlotNotServedError(
            command.name,
            f"slots {slots or '?'} have no serving node: their primary {error.scope} is down "
            "and no replica is left to take over",
        )


def _unknown(node: str) -> None:
    return None


def _attempt_attributes(command: Command, error: Exception, delay: float | None) -> dict[str, Any]:
    """Span-event attributes of the attempt that just failed: never a key, value or message."""
    attributes = telemetry.node_attributes(command.node)
    attributes[telemetry.ATTEMPT] = command.attempt
    attributes[telemetry.ERROR_TYPE] = type(error).__qualname__
    if delay is not None:
        attributes[telemetry.RETRY_DELAY] = delay
    return attributes


def _cluster_wide_refusal(err: BaseException) -> bool:
    """A breaker that guards no particular node refuses fast: retrying cannot route around it."""
    return isinstance(err, CircuitBreakerOpenError) and err.scope == CLUSTER_SCOPE


def _attach_attempts(error: Exception, attempts: int) -> None:
    """Keep the real error, and say how many attempts it took to give up."""
    error.attempts = attempts  # type: ignore[attr-defined]
    if hasattr(error, "add_note"):
        error.add_note(f"resilient_cache: gave up after {attempts} attempts")


def build(settings: RetrySettings, context: BuildContext) -> RetryStage:
    # Kept even with max_retries=0: it still turns a broken write into CommandInDoubtError.
    return RetryStage(
        settings,
        context.stats,
        context.clock,
        context.sleep,
        board=context.breakers,
        span_events=lambda: context.traced,
        backend=context.backend,
    )


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("retry", RetrySettings, build, description="Retries with jittered backoff.")
