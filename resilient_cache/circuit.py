"""Circuit breakers: the state machine, the per-node board, and ``RedisCircuitBreaker``.

Pure logic on an injected clock, so the state machine is tested without sleeping. The breaker
stage (:mod:`resilient_cache.stages.breaker`) keeps one breaker per node on a
:class:`BreakerBoard`; a failing primary opens only its own breaker, never the healthy shards'.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MaxConnectionsError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resilient_cache.errors import (
    BulkheadFullError,
    CircuitBreakerOpenError,
    CommandInDoubtError,
    failure_summary,
)

logger = logging.getLogger("resilient_cache.circuit")

T = TypeVar("T")

#: Errors that say the node or the cluster is failing. A reply such as WRONGTYPE is the
#: application's mistake, not the node's, and never opens a breaker.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    MasterDownError,
    BusyLoadingError,
    SlotNotCoveredError,
)


def is_infrastructure_failure(err: BaseException) -> bool:
    """Whether ``err`` counts against a breaker. An exhausted local pool or a full bulkhead
    says nothing about the node; an in-doubt error was already counted as the connection error
    it wraps."""
    return isinstance(err, INFRASTRUCTURE_ERRORS) and not isinstance(
        err, CommandInDoubtError | MaxConnectionsError | BulkheadFullError
    )


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    ISOLATED = "isolated"  # forced open by hand until reset


StateListener = Callable[[str, BreakerState, BreakerState], None]

_CLOSED = BreakerState.CLOSED

#: The scope of the breaker that guards commands no particular node was chosen for.
CLUSTER_SCOPE = "cluster"


@dataclass(frozen=True)
class RatePolicy:
    """Open a breaker on the failure rate or the slow-call rate of its last ``window`` calls
    (resilience4j's count-based sliding window), once at least ``minimum_calls`` were seen.
    A rate of ``None`` turns that check off. Rates are percentages."""

    window: int = 20
    minimum_calls: int = 10
    failure_rate: float | None = 50.0
    slow_call_rate: float | None = None
    slow_call_duration: float = 1.0

    @property
    def times_calls(self) -> bool:
        """Whether callers must measure call durations (only for the slow-call rate)."""
        return self.slow_call_rate is not None


class OutcomeWindow:
    """The outcomes of the last ``size`` calls, with running counts: O(1) per call."""

    def __init__(self, size: int) -> None:
        self.outcomes: deque[int] = deque(maxlen=size)
        self.failures = 0
        self.slow = 0

    def add(self, failed: bool, slow: bool) -> None:
        outcomes = self.outcomes
        if len(outcomes) == outcomes.maxlen:
            oldest = outcomes[0]
            self.failures -= oldest & 1
            self.slow -= oldest >> 1
        outcomes.append(int(failed) | int(slow) << 1)
        self.failures += failed
        self.slow += slow

    def clear(self) -> None:
        self.outcomes.clear()
        self.failures = self.slow = 0

    def __len__(self) -> int:
        return len(self.outcomes)


class CircuitBreaker:
    """A circuit breaker for one node (or scope).

    - closed: calls pass; ``threshold`` consecutive infrastructure failures open it, and so does
      a failure rate or slow-call rate over the last calls when ``rates`` says so.
    - open: calls are refused with :class:`CircuitBreakerOpenError` until ``reset_timeout``
      seconds have passed, then the breaker goes half-open.
    - half-open: at most ``half_open_max_calls`` probes run at once; when that many succeed it
      closes, and any failure opens it again for another ``reset_timeout``.
    - isolated: refused until :meth:`reset`, whatever the clock says.

    All transitions happen without an ``await`` between reading and writing state, so concurrent
    callers on one event loop cannot slip extra probes through.
    """

    def __init__(
        self,
        name: str,
        *,
        threshold: int = 5,
        reset_timeout: float = 60.0,
        half_open_max_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_change: StateListener | None = None,
        rates: RatePolicy | None = None,
    ) -> None:
        self.name = name
        self.rates = rates
        self.window = OutcomeWindow(rates.window) if rates is not None else None
        # Whether a success may skip the rate checks while the window holds only fast
        # successes: no rate of 0 % (which any window would reach) is configured.
        self._quiet_success = rates is None or (
            (rates.failure_rate is None or rates.failure_rate > 0)
            and (rates.slow_call_rate is None or rates.slow_call_rate > 0)
        )
        self._slow_after = rates.slow_call_duration if rates is not None else float("inf")
        self.threshold = threshold
        self.reset_timeout = reset_timeout
        self.half_open_max_calls = half_open_max_calls
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        #: When the breaker last left the closed state (failed probes do not move it).
        self.down_since: float | None = None
        #: The class and Redis code of the last failure counted (``"AuthenticationError
        #: WRONGPASS"``), ``None`` before any or once closed again.
        self.last_failure: str | None = None
        #: Whether that failure was the node refusing the credentials: the node is up, so no
        #: failover is coming (see :meth:`BreakerBoard.awaiting_failover`).
        self.refused_credentials = False
        self._probes_in_flight = 0
        self._probe_successes = 0

    def _set_state(self, new: BreakerState) -> None:
        old, self.state = self.state, new
        if new is BreakerState.CLOSED:
            self.down_since = None
            self.last_failure = None
            self.refused_credentials = False
        elif self.down_since is None:
            self.down_since = self._clock()
        if old is not new:
            because = f" (last failure: {self.last_failure})" if self.last_failure else ""
            logger.warning(
                "circuit breaker %s: %s -> %s%s", self.name, old.value, new.value, because
            )
            if self._on_change is not None:
                self._on_change(self.name, old, new)

    def retry_after(self) -> float:
        """Seconds until the next probe is let through (0 when not open)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self.opened_at + self.reset_timeout - self._clock())
        return 0.0

    def before_call(self) -> None:
        """Raise :class:`CircuitBreakerOpenError` if a call may not go through now."""
        state = self.state
        if state is BreakerState.CLOSED:
            return
        if state is BreakerState.OPEN:
            if self._clock() < self.opened_at + self.reset_timeout:
                raise CircuitBreakerOpenError(self.name, self.retry_after(), self.last_failure)
            self._set_state(BreakerState.HALF_OPEN)
            self._probes_in_flight = 0
            self._probe_successes = 0
        if self.state is BreakerState.HALF_OPEN:
            if self._probes_in_flight >= self.half_open_max_calls:
                raise CircuitBreakerOpenError(self.name, 0.0, self.last_failure)
            self._probes_in_flight += 1
            return
        raise CircuitBreakerOpenError(self.name, float("inf"))  # isolated

    def on_success(self, elapsed: float | None = None) -> None:
        """The node answered; ``elapsed`` (seconds) is needed only for the slow-call rate."""
        if self.state is _CLOSED:
            # The common case, kept short: it runs after every command.
            self.failures = 0
            window = self.window
            if window is None:
                return
            if (
                not (window.failures or window.slow)
                and self._quiet_success
                and (elapsed is None or elapsed < self._slow_after)
            ):
                # Every outcome in the window is a fast success, and so is this one: no count
                # moves (the one pushed out was a success too), no rate can trip.
                window.outcomes.append(0)
                return
            self._record(False, elapsed)
            return
        if self.state is BreakerState.HALF_OPEN:
            self._probes_in_flight -= 1
            self._probe_successes += 1
            if self._probe_successes >= self.half_open_max_calls:
                self.failures = 0
                if self.window is not None:
                    self.window.clear()
                self._set_state(BreakerState.CLOSED)

    def on_failure(self, elapsed: float | None = None, error: BaseException | None = None) -> None:
        """The node failed; ``error``, when given, is kept as :attr:`last_failure`."""
        if error is not None:
            self.last_failure = failure_summary(error)
            self.refused_credentials = isinstance(error, AuthenticationError)
        if self.state is BreakerState.HALF_OPEN:
            self._probes_in_flight -= 1
            self._open()
        elif self.state is BreakerState.CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open()
            elif self.window is not None:
                self._record(True, elapsed)

    def _record(self, failed: bool, elapsed: float | None) -> None:
        rates, window = self.rates, self.window
        assert rates is not None and window is not None
        slow = elapsed is not None and elapsed >= rates.slow_call_duration
        window.add(failed, slow)
        calls = len(window)
        if calls < rates.minimum_calls:
            return
        too_many_failures = (
            rates.failure_rate is not None and window.failures * 100 >= rates.failure_rate * calls
        )
        too_many_slow = (
            rates.slow_call_rate is not None and window.slow * 100 >= rates.slow_call_rate * calls
        )
        if too_many_failures or too_many_slow:
            self._open()

    def on_ignored(self) -> None:
        """The call ended in a way that says nothing about the node (cancelled, app error)."""
        if self.state is BreakerState.HALF_OPEN:
            self._probes_in_flight = max(0, self._probes_in_flight - 1)

    def _open(self) -> None:
        self.opened_at = self._clock()
        if self.window is not None:
            self.window.clear()  # after the open period, judge the node on fresh calls
        self._set_state(BreakerState.OPEN)

    def reset(self) -> None:
        """Close the breaker now and forget past failures."""
        self.failures = 0
        if self.window is not None:
            self.window.clear()
        self._probes_in_flight = 0
        self._set_state(BreakerState.CLOSED)

    def allow_probe(self) -> None:
        """Let the next call through as a probe now instead of after ``reset_timeout``: the
        health monitor saw the node answer again. Does nothing unless the breaker is open."""
        if self.state is BreakerState.OPEN:
            self.opened_at = self._clock() - self.reset_timeout

    def isolate(self) -> None:
        """Refuse every call until :meth:`reset` (for taking a node out by hand)."""
        self._set_state(BreakerState.ISOLATED)

    @property
    def is_open(self) -> bool:
        return self.state in (BreakerState.OPEN, BreakerState.ISOLATED)


class BreakerBoard:
    """One :class:`CircuitBreaker` per scope (a node name, or ``"cluster"``), made on first use."""

    def __init__(
        self,
        *,
        threshold: int = 5,
        reset_timeout: float = 60.0,
        half_open_max_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
        rates: RatePolicy | None = None,
    ) -> None:
        self.threshold = threshold
        self.reset_timeout = reset_timeout
        self.half_open_max_calls = half_open_max_calls
        self.clock = clock
        self.rates = rates
        self.breakers: dict[str, CircuitBreaker] = {}
        self.listeners: list[StateListener] = []

    def configure(
        self,
        *,
        threshold: int,
        reset_timeout: float,
        half_open_max_calls: int,
        rates: RatePolicy | None = None,
    ) -> None:
        self.threshold = threshold
        self.reset_timeout = reset_timeout
        self.half_open_max_calls = half_open_max_calls
        self.rates = rates

    def get(self, scope: str) -> CircuitBreaker:
        breaker = self.breakers.get(scope)
        if breaker is None:
            breaker = self.breakers[scope] = CircuitBreaker(
                scope,
                threshold=self.threshold,
                reset_timeout=self.reset_timeout,
                half_open_max_calls=self.half_open_max_calls,
                clock=self.clock,
                on_change=self._notify,
                rates=self.rates,
            )
        return breaker

    def _notify(self, scope: str, old: BreakerState, new: BreakerState) -> None:
        for listener in self.listeners:
            listener(scope, old, new)

    def awaiting_failover(self, scope: str, now: float, failover_wait: float) -> bool:
        """Whether a refusal by ``scope``'s breaker may be a failover in progress: that node's
        breaker is open or half-open (not isolated by hand), it went down less than
        ``failover_wait`` seconds before ``now``, and other *nodes* still answer. The node has
        then just gone down and its replica is (probably) being promoted."""
        refused = self.breakers.get(scope)
        if refused is None or refused.state not in (BreakerState.OPEN, BreakerState.HALF_OPEN):
            return False  # isolated by hand: no failover to wait for
        if refused.refused_credentials:
            return False  # the node is up and refuses the credentials: no failover is coming
        # Half-open: a probe to the (probably still dead) node is in flight; the node's slots
        # may have moved already, so keep polling the slot map like while open.
        down_since = refused.down_since if refused.down_since is not None else refused.opened_at
        if now - down_since >= failover_wait:
            return False
        return any(
            not breaker.is_open
            for other, breaker in self.breakers.items()
            if other not in (scope, CLUSTER_SCOPE)
        )

    def any_open(self) -> bool:
        return any(b.is_open for b in self.breakers.values())

    def open_scopes(self) -> list[str]:
        return [name for name, b in self.breakers.items() if b.is_open]

    def reset(self, scope: str | None = None) -> None:
        targets = self.breakers.values() if scope is None else [self.get(scope)]
        for breaker in targets:
            breaker.reset()


class RedisCircuitBreaker:
    """A circuit breaker around any asyncio Redis client, for the original package's usage::

        breaker = RedisCircuitBreaker(redis=cluster.get_cluster(), failure_threshold=5,
                                      reset_timeout=60.0)
        cache = MultiLayerCache("my-cache", breaker, ...)

    ``get``/``set``/``delete``/``execute_command`` go to the wrapped client through one
    :class:`CircuitBreaker`. A :class:`~resilient_cache.RedisClusterClient` already has per-node
    breakers in its pipeline; this wrapper is for a raw redis-py client.
    """

    def __init__(
        self,
        redis: Any,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 60.0,
        half_open_max_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
        name: str = "redis",
    ) -> None:
        self.redis = redis
        self.breaker = CircuitBreaker(
            name,
            threshold=failure_threshold,
            reset_timeout=reset_timeout,
            half_open_max_calls=half_open_max_calls,
            clock=clock,
        )

    async def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``func(*args, **kwargs)`` through the breaker."""
        self.breaker.before_call()
        try:
            result = await func(*args, **kwargs)
        except BaseException as err:
            if isinstance(err, Exception) and is_infrastructure_failure(err):
                self.breaker.on_failure(error=err)
            else:
                self.breaker.on_ignored()
            raise
        self.breaker.on_success()
        return result

    async def get(self, key: Any) -> Any:
        return await self.call(self.redis.get, key)

    async def set(self, key: Any, value: Any, **kwargs: Any) -> Any:
        return await self.call(self.redis.set, key, value, **kwargs)

    async def delete(self, *keys: Any) -> Any:
        return await self.call(self.redis.delete, *keys)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.call(self.redis.execute_command, *args, **kwargs)

    def is_open(self) -> bool:
        return self.breaker.is_open

    def reset(self) -> None:
        self.breaker.reset()
