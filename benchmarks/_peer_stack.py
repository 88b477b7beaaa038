"""bench_telemetry's other contenders: an OpenTelemetry SDK that discards what it records, and
the hand-assembled peer stack (redis-py traced by opentelemetry-instrumentation-redis, each call
in a tenacity ``@retry`` around a pybreaker ``CircuitBreaker``). Needs the ``bench`` extra.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pybreaker
import redis
import tenacity
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from redis.asyncio.cluster import RedisCluster

from resilient_cache import telemetry

# --------------------------------------------------------------------------- OTel SDK


class CountingSpanExporter(SpanExporter):
    """Counts exported spans by instrumentation scope, then discards them."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        counts = self.counts
        for span in spans:
            scope = span.instrumentation_scope
            counts[scope.name if scope is not None else "?"] += 1
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class NullMetricExporter(MetricExporter):
    """Accepts every collection and discards it; counts the exports."""

    def __init__(self) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        self.exports = 0

    def export(
        self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports += 1
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


class DropCounter(logging.Handler):
    """Counts the BatchSpanProcessor's 'Queue full, dropping' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "dropping" in record.getMessage():
            self.dropped += 1


class Sdk:
    """One TracerProvider and one MeterProvider, shared by ``on`` and the peer stack (as one
    application would have)."""

    def __init__(self, metric_interval: float) -> None:
        self.spans = CountingSpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(BatchSpanProcessor(self.spans))
        self.metric_exporter = NullMetricExporter()
        self.reader = PeriodicExportingMetricReader(
            self.metric_exporter, export_interval_millis=metric_interval * 1000
        )
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.drops = DropCounter()
        logging.getLogger("opentelemetry.sdk._shared_internal").addHandler(self.drops)

    def flush_counts(self) -> dict[str, int]:
        self.tracer_provider.force_flush()
        return dict(self.spans.counts)

    def reset_counts(self) -> None:
        self.tracer_provider.force_flush()
        self.spans.counts.clear()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


# --------------------------------------------------------------------------- the peer stack


def make_guarded(breaker: pybreaker.CircuitBreaker) -> Callable[..., Awaitable[Any]]:
    """tenacity around pybreaker around one redis-py call, the way an application writes it.

    pybreaker 1.4 has no asyncio support of its own: ``call_async`` needs tornado, and
    ``call()`` would only see the coroutine object, not its outcome. ``breaker.calling()`` (a
    generator context manager) works around an ``await``: it refuses with
    ``CircuitBreakerError`` while open, and counts the awaited call's exception or success.
    """

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=2.0),
        retry=tenacity.retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
        reraise=True,
    )
    async def guarded(method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        with breaker.calling():
            return await method(*args, **kwargs)

    return guarded


class PeerClient:
    """``get``/``set`` through tenacity + pybreaker (+ an optional duration histogram) on a
    redis-py ``RedisCluster`` traced by opentelemetry-instrumentation-redis.

    ``get`` and ``set`` are ``functools.partial`` objects, not methods: no extra coroutine frame,
    which favours the peer stack slightly.
    """

    def __init__(self, raw: RedisCluster, histogram: Any = None) -> None:
        self.raw = raw
        self.breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60.0)
        guarded = make_guarded(self.breaker)
        if histogram is None:
            self.get = functools.partial(guarded, raw.get)
            self.set = functools.partial(guarded, raw.set)
            return
        clock = time.monotonic  # the metrics stage's clock
        record = histogram.record

        async def timed(
            method: Callable[..., Awaitable[Any]], attributes: dict[str, str], *args: Any, **kw: Any
        ) -> Any:
            start = clock()
            try:
                result = await guarded(method, *args, **kw)
            except Exception as err:
                record(
                    clock() - start,
                    {**attributes, telemetry.ERROR_TYPE: type(err).__qualname__},
                )
                raise
            record(clock() - start, attributes)
            return result

        def attrs(name: str) -> dict[str, str]:
            return {
                telemetry.DB_SYSTEM_NAME: telemetry.DB_SYSTEM_REDIS,
                telemetry.DB_OPERATION_NAME: name,
            }

        self.get = functools.partial(timed, raw.get, attrs("GET"))
        self.set = functools.partial(timed, raw.set, attrs("SET"))

    async def aclose(self) -> None:
        await self.raw.aclose()


def make_histogram(meter_provider: Any, scope: str) -> Any:
    return meter_provider.get_meter(scope).create_histogram(
        telemetry.OPERATION_DURATION,
        unit="s",
        description="Duration of Redis commands (peer stack, recorded by hand).",
        explicit_bucket_boundaries_advisory=list(telemetry.DURATION_BUCKETS),
    )
