"""Telemetry plumbing: tracer and meter acquisition, instrument names, semantic-convention
constants, and the in-process command statistics behind ``get_metrics()``.

OpenTelemetry is the only export path. Whether a real SDK is behind the providers is decided once,
at build time (:func:`tracing_enabled`, :func:`metrics_enabled`), so the tracing and metrics stages
can drop out of the pipeline entirely when nobody listens.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

from opentelemetry import metrics, trace
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
SERVER_ADDRESS = server_attributes.SERVER_ADDRESS
SERVER_PORT = server_attributes.SERVER_PORT
ERROR_TYPE = error_attributes.ERROR_TYPE
DB_SYSTEM_REDIS = "redis"

# Instrument names.
OPERATION_DURATION = "db.client.operation.duration"
ATTEMPTS = "resilient_cache.command.attempts"
RETRIES = "resilient_cache.command.retries"

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
    return type(provider).__name__ != "_ProxyMeterProvider"


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
        self.total = 0
        self.successful = 0
        self.failed = 0
        self.retried = 0
        self.latencies: deque[float] = deque(maxlen=window)

    def set_window(self, window: int) -> None:
        """Keep the latencies of the last ``window`` commands."""
        self.latencies = deque(self.latencies, maxlen=window)

    def record(self, seconds: float, ok: bool) -> None:
        self.total += 1
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
