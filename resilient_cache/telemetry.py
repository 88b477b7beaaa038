"""Telemetry plumbing: tracer and meter acquisition, instrument and span-event names,
semantic-convention constants, the client's instruments, and the in-process command statistics
behind ``get_metrics()``.

OpenTelemetry is the only export path. Whether a real SDK is behind the providers is decided once,
at build time (:func:`tracing_enabled`, :func:`metrics_enabled`), so the tracing and metrics stages
can drop out of the pipeline entirely when nobody listens, and the retry and breaker stages add
span events only when the tracing stage is there (``BuildContext.traced``).

Instruments (created once per client, only with an SDK meter provider):

- ``db.client.operation.duration`` (s, histogram): per logical command, retries included;
  ``db.system.name``, ``db.operation.name``, ``server.address``/``server.port``, ``error.type``.
- ``resilient_cache.command.attempts`` ({attempt}, observable counter): attempts sent to Redis
  by finished commands (memory-tier hits excluded).
- ``resilient_cache.command.retries`` ({retry}, counter): failed attempts that were retried;
  ``error.type``, ``server.address``/``server.port`` of the failed attempt.
- ``resilient_cache.command.errors`` ({error}, counter): failed commands; the histogram's
  attributes.
- ``resilient_cache.breaker.state`` (1, observable gauge): 0 closed, 1 open, 2 half-open,
  3 isolated; ``server.address``/``server.port`` (``resilient_cache.breaker.scope`` for the
  cluster-wide breaker).
- ``resilient_cache.breaker.transitions`` ({transition}, counter): ``server.*``,
  ``resilient_cache.breaker.from`` / ``.to``.
- ``resilient_cache.cluster.nodes`` ({node}, observable gauge): ``resilient_cache.node.role``,
  ``resilient_cache.node.status`` (``connected``, ``disconnected``, ``failing``,
  ``auth_failed``), from the health monitor's last probe.
- ``resilient_cache.cluster.health`` (1, observable gauge): 2 healthy, 1 degraded, 0 unhealthy.
- ``resilient_cache.memory.hits`` / ``.misses`` / ``.evictions`` ({entry}, observable counters):
  the memory tier's, when it is enabled (evictions only if the tier counts them).
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.semconv.attributes import (
    db_attributes,
    error_attributes,
    server_attributes,
)

INSTRUMENTATION_NAME = "resilient_cache"

# Semantic-convention attribute names (OpenTelemetry database conventions, Redis flavour).
DB_SYSTEM_NAME = db_attributes.DB_SYSTEM_NAME
DB_OPERATION_NAME = db_attributes.DB_OPERATION_NAME
DB_QUERY_TEXT = db_attributes.DB_QUERY_TEXT
DB_OPERATION_BATCH_SIZE = db_attributes.DB_OPERATION_BATCH_SIZE
DB_RESPONSE_STATUS_CODE = db_attributes.DB_RESPONSE_STATUS_CODE
SERVER_ADDRESS = server_attributes.SERVER_ADDRESS
SERVER_PORT = server_attributes.SERVER_PORT
ERROR_TYPE = error_attributes.ERROR_TYPE
DB_SYSTEM_REDIS = "redis"

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from resilient_cache.pipeline import NodeRef

# Instrument names (docs/observability.md lists them with units and attributes).
OPERATION_DURATION = "db.client.operation.duration"
ATTEMPTS = "resilient_cache.command.attempts"
RETRIES = "resilient_cache.command.retries"
ERRORS = "resilient_cache.command.errors"
BREAKER_STATE = "resilient_cache.breaker.state"
BREAKER_TRANSITIONS = "resilient_cache.breaker.transitions"
CLUSTER_NODES = "resilient_cache.cluster.nodes"
CLUSTER_HEALTH = "resilient_cache.cluster.health"
MEMORY_HITS = "resilient_cache.memory.hits"
MEMORY_MISSES = "resilient_cache.memory.misses"
MEMORY_EVICTIONS = "resilient_cache.memory.evictions"
AUTO_PIPELINE_BATCH = "resilient_cache.auto_pipeline.batch_size"  # commands per shared write

# The framework's own attribute names.
ATTEMPT = "resilient_cache.attempt"
ATTEMPTS_ATTRIBUTE = "resilient_cache.attempts"
RETRY_DELAY = "resilient_cache.retry.delay"
GIVE_UP_REASON = "resilient_cache.give_up.reason"
BREAKER_SCOPE = "resilient_cache.breaker.scope"
BREAKER_STATE_ATTRIBUTE = "resilient_cache.breaker.state"
BREAKER_FROM = "resilient_cache.breaker.from"
BREAKER_TO = "resilient_cache.breaker.to"
BREAKER_RETRY_AFTER = "resilient_cache.breaker.retry_after"
NODE_ROLE = "resilient_cache.node.role"
NODE_STATUS = "resilient_cache.node.status"
REDIRECT_FROM_ADDRESS = "resilient_cache.redirect.from.address"
REDIRECT_FROM_PORT = "resilient_cache.redirect.from.port"
REDIRECT_KIND = "resilient_cache.redirect.kind"  # MOVED or ASK
MEMORY_HIT_ATTRIBUTE = "resilient_cache.memory.hit"  # on a span: answered by the memory tier
# On a span: auto-pipelining wrote the command together with others; how many (itself included).
# Not db.operation.batch.size: that names a span standing for a whole batch (client.pipeline()).
BATCH_SIZE_ATTRIBUTE = "resilient_cache.auto_pipeline.batch_size"

# Span events, on the command's span (only on the non-happy path).
EVENT_RETRY = "resilient_cache.retry"  # an attempt failed and the command will be retried
EVENT_FAILOVER_WAIT = "resilient_cache.failover_wait"  # refused by a breaker; waiting for failover
EVENT_GIVE_UP = "resilient_cache.give_up"  # an attempt failed and no other follows
EVENT_BREAKER_REFUSED = "resilient_cache.breaker.refused"  # an attempt refused without sending
EVENT_REDIRECT = "resilient_cache.redirect"  # MOVED or ASK: redis-py followed it to another node

#: Gauge values of ``resilient_cache.breaker.state``.
BREAKER_STATE_VALUES = {"closed": 0, "open": 1, "half_open": 2, "isolated": 3}
#: Gauge values of ``resilient_cache.cluster.health``.
HEALTH_VALUES = {"healthy": 2, "degraded": 1, "unhealthy": 0}

# Histogram buckets for Redis: 100 us to 10 s.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resilient-cache")
    except PackageNotFoundError:  # running from a source tree
        return "0"


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    provider = provider or trace.get_tracer_provider()
    return provider.get_tracer(INSTRUMENTATION_NAME, _package_version())


def get_meter(provider: metrics.MeterProvider | None = None) -> metrics.Meter:
    provider = provider or metrics.get_meter_provider()
    return provider.get_meter(INSTRUMENTATION_NAME, _package_version())


def tracing_enabled(provider: trace.TracerProvider) -> bool:
    """False for the API's no-op and proxy-without-SDK providers: nobody would see a span."""
    if isinstance(provider, trace.NoOpTracerProvider):
        return False
    if isinstance(provider, trace.ProxyTracerProvider):
        # The proxy forwards to a real provider only once the app sets one globally.
        return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return True


def metrics_enabled(provider: metrics.MeterProvider) -> bool:
    """False for the API's no-op provider and for the global proxy before an SDK is set."""
    from opentelemetry.metrics import NoOpMeterProvider

    if isinstance(provider, NoOpMeterProvider):
        return False
    if type(provider).__name__ == "_ProxyMeterProvider":
        # Like the tracer proxy: it forwards once the app sets an SDK provider globally.
        return type(metrics.get_meter_provider()).__name__ != "_ProxyMeterProvider"
    return True


def node_attributes(node: NodeRef | None) -> dict[str, Any]:
    """``server.address`` / ``server.port`` of ``node`` (empty when routing left it to redis-py)."""
    if node is None:
        return {}
    return {SERVER_ADDRESS: node.host, SERVER_PORT: int(node.port)}


def scope_attributes(scope: str) -> dict[str, Any]:
    """Attributes naming a breaker scope: ``"host:port"`` or ``"cluster"``."""
    host, sep, port = scope.rpartition(":")
    if sep and port.isdigit():
        return {SERVER_ADDRESS: host, SERVER_PORT: int(port)}
    return {BREAKER_SCOPE: scope}


def recording_span() -> Span | None:
    """The current span if it records, else None. For the non-happy paths only: the retry and
    breaker stages call it when an attempt failed or was refused."""
    span = trace.get_current_span()
    return span if span.is_recording() else None


class Instruments:
    """The synchronous instruments of one client, created once at build time (only when a real
    meter provider is configured). Stages reach them through ``context.stats.instruments``."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.meter = meter
        self.duration = meter.create_histogram(
            OPERATION_DURATION,
            unit="s",
            description="Duration of Redis commands, retries included.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self.retries = meter.create_counter(
            RETRIES,
            unit="{retry}",
            description="Attempts that failed and were retried, by error type and node.",
        )
        self.errors = meter.create_counter(
            ERRORS, unit="{error}", description="Commands that failed, by error type."
        )
        self.transitions = meter.create_counter(
            BREAKER_TRANSITIONS,
            unit="{transition}",
            description="Circuit breaker state changes, by node and from/to state.",
        )
        self.batch_sizes = meter.create_histogram(
            AUTO_PIPELINE_BATCH,
            unit="{command}",
            description="Commands written together by auto-pipelining, per write, by node.",
            explicit_bucket_boundaries_advisory=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
        )

    def breaker_changed(self, scope: str, old: Any, new: Any) -> None:
        """A BreakerBoard listener: count the transition."""
        attributes = scope_attributes(scope)
        attributes[BREAKER_FROM] = getattr(old, "value", str(old))
        attributes[BREAKER_TO] = getattr(new, "value", str(new))
        self.transitions.add(1, attributes)

    def observe(self, source: ObservedClient) -> None:
        """Report ``source``'s breakers, health, node counts, attempts and memory tier through
        this meter's observable instruments (one set per meter, shared by every client on it)."""
        _observers_for(self.meter).add(source)


def make_instruments(provider: metrics.MeterProvider) -> Instruments | None:
    """The client's instruments, or None when no SDK would ever see them."""
    if not metrics_enabled(provider):
        return None
    if type(provider).__name__ == "_ProxyMeterProvider":
        provider = metrics.get_meter_provider()  # the SDK provider set since: one meter
    return Instruments(get_meter(provider))


class ObservedClient:
    """What the observable instruments read from one client: its counters, breakers, health
    monitor and memory stage (none of which refers back to the client). The client itself is
    held weakly: once it is disconnected or garbage-collected it is no longer reported."""

    def __init__(
        self, client: Any, stats: CommandStats, breakers: Any, monitor: Any, memory: Any
    ) -> None:
        self._client = weakref.ref(client)
        self.stats = stats
        self.breakers = breakers
        self.monitor = monitor
        self.memory = memory

    @property
    def alive(self) -> bool:
        client = self._client()
        return client is not None and not getattr(client, "_closed", False)


class _Observers:
    """The observable instruments of one meter, reading every client registered on it."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._sources: weakref.WeakSet[ObservedClient] = weakref.WeakSet()
        self._running = {name: _Running() for name in ("attempts", "hits", "misses", "evictions")}
        meter.create_observable_counter(
            ATTEMPTS,
            [self._attempts],
            unit="{attempt}",
            description="Attempts sent to Redis by finished commands (first tries and retries).",
        )
        meter.create_observable_gauge(
            BREAKER_STATE,
            [self._breaker_state],
            unit="1",
            description="Circuit breaker state per node: 0 closed, 1 open, 2 half-open, "
            "3 isolated.",
        )
        meter.create_observable_gauge(
            CLUSTER_NODES,
            [self._nodes],
            unit="{node}",
            description="Cluster nodes by role and status, as of the last health probe.",
        )
        meter.create_observable_gauge(
            CLUSTER_HEALTH,
            [self._health],
            unit="1",
            description="Cluster health as of the last probe: 2 healthy, 1 degraded, 0 unhealthy.",
        )
        for name, field, what in (
            (MEMORY_HITS, "hits", "Reads served by the memory tier."),
            (MEMORY_MISSES, "misses", "Cacheable reads the memory tier did not have."),
            (MEMORY_EVICTIONS, "evictions", "Entries the memory tier dropped to stay in size."),
        ):
            meter.create_observable_counter(
                name, [self._memory_callback(field)], unit="{entry}", description=what
            )

    def add(self, source: ObservedClient) -> None:
        self._sources.add(source)

    def _all(self) -> list[ObservedClient]:
        return list(self._sources)

    def _live(self) -> list[ObservedClient]:
        return [source for source in self._all() if source.alive]

    def _attempts(self, options: CallbackOptions) -> Iterable[Observation]:
        def attempts(source: ObservedClient) -> int:
            return source.stats.attempts  # the metrics stage adds none for a memory hit

        return [Observation(self._running["attempts"].observe(self._all(), attempts))]

    def _breaker_state(self, options: CallbackOptions) -> Iterable[Observation]:
        # Two clients of one cluster have a breaker each for the same node: report the worse.
        worst: dict[str, int] = {}
        for source in self._live():
            for scope, breaker in list(source.breakers.breakers.items()):
                state = getattr(breaker.state, "value", str(breaker.state))
                value = BREAKER_STATE_VALUES.get(state, 1)
                worst[scope] = max(value, worst.get(scope, 0))
        return [Observation(value, scope_attributes(scope)) for scope, value in worst.items()]

    def _last_stats(self) -> Iterator[Any]:
        for source in self._live():
            stats = getattr(source.monitor, "last", None)
            if stats is not None:
                yield stats

    def _nodes(self, options: CallbackOptions) -> Iterable[Observation]:
        counts: dict[tuple[str, str], int] = {}
        for stats in self._last_stats():
            for role in ("primary", "replica"):
                for status in ("connected", "disconnected", "failing", "auth_failed"):
                    counts.setdefault((role, status), 0)
            for node in stats.nodes:
                counts[(node.role, node.status)] = counts.get((node.role, node.status), 0) + 1
        return [
            Observation(n, {NODE_ROLE: role, NODE_STATUS: status})
            for (role, status), n in counts.items()
        ]

    def _health(self, options: CallbackOptions) -> Iterable[Observation]:
        values = [HEALTH_VALUES.get(stats.health, 0) for stats in self._last_stats()]
        return [Observation(min(values))] if values else []

    def _memory_callback(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def read(source: ObservedClient) -> int:
            value = getattr(source.memory, field, None)
            return value if isinstance(value, int) else 0

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            sources = [s for s in self._all() if hasattr(s.memory, field)]
            if not sources:
                return []  # no memory tier (or one that does not count this): no series
            return [Observation(self._running[field].observe(sources, read))]

        return callback


class _Running:
    """A process-wide monotonic total over many clients' counters: each client adds what it
    gained since the last collection, so a client that goes away never makes the total drop."""

    def __init__(self) -> None:
        self.total = 0
        self._last: weakref.WeakKeyDictionary[ObservedClient, int] = weakref.WeakKeyDictionary()

    def observe(
        self, sources: Iterable[ObservedClient], read: Callable[[ObservedClient], int]
    ) -> int:
        for source in sources:
            value = read(source)
            gained = value - self._last.get(source, 0)
            if gained > 0:
                self.total += gained
                self._last[source] = value
        return self.total


_OBSERVERS: weakref.WeakKeyDictionary[Any, _Observers] = weakref.WeakKeyDictionary()


def _observers_for(meter: metrics.Meter) -> _Observers:
    # An SDK meter hands back the first observable instrument of a name and drops the callbacks
    # of any later one: so one set per meter, reading every client registered on it.
    observers = _OBSERVERS.get(meter)
    if observers is None:
        observers = _OBSERVERS[meter] = _Observers(meter)
    return observers


@dataclass(frozen=True)
class CommandCounts:
    total: int
    successful: int
    failed: int
    retried: int


@dataclass(frozen=True)
class LatencySnapshot:
    """Latency over the recent window, in milliseconds (the original package's unit)."""

    p50: float
    p95: float
    p99: float
    avg: float


@dataclass(frozen=True)
class MetricsSnapshot:
    """What ``get_metrics()`` returns: ``metrics.commands.total``, ``metrics.latency.p95``, ..."""

    commands: CommandCounts
    latency: LatencySnapshot

    def to_dict(self) -> dict[str, dict[str, float]]:
        return asdict(self)


class CommandStats:
    """Counters and a window of recent latencies, updated by the metrics and retry stages.

    Updates are plain attribute increments with no ``await`` in between, so they are safe under
    asyncio without a lock.
    """

    def __init__(self, window: int = 10_000) -> None:
        self.successful = 0
        self.failed = 0
        self.retried = 0
        #: Attempts of finished commands (first tries and retries), for ``ATTEMPTS``.
        self.attempts = 0
        self.latencies: deque[float] = deque(maxlen=window)
        #: The client's OpenTelemetry instruments; None when no meter provider is configured.
        self.instruments: Instruments | None = None

    @property
    def total(self) -> int:
        """Finished commands: every one is counted as successful or failed (the metrics
        stage's success path then moves one counter, not two)."""
        return self.successful + self.failed

    def set_window(self, window: int) -> None:
        """Keep the latencies of the last ``window`` commands."""
        self.latencies = deque(self.latencies, maxlen=window)

    def record(self, seconds: float, ok: bool, attempts: int = 1) -> None:
        self.attempts += attempts
        if ok:
            self.successful += 1
        else:
            self.failed += 1
        self.latencies.append(seconds)

    def snapshot(self) -> MetricsSnapshot:
        samples = sorted(self.latencies)
        return MetricsSnapshot(
            commands=CommandCounts(self.total, self.successful, self.failed, self.retried),
            latency=LatencySnapshot(
                p50=_percentile_ms(samples, 0.50),
                p95=_percentile_ms(samples, 0.95),
                p99=_percentile_ms(samples, 0.99),
                avg=(sum(samples) / len(samples) * 1000.0) if samples else 0.0,
            ),
        )


def _percentile_ms(sorted_samples: list[float], q: float) -> float:
    """Nearest-rank percentile of ``sorted_samples`` (seconds), in milliseconds."""
    if not sorted_samples:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_samples)))
    return sorted_samples[rank - 1] * 1000.0
