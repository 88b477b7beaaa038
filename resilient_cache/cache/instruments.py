"""The cache's OpenTelemetry instruments: their names, and the observers that report caches.

Each cache is reported through observable instruments with the attribute
``resilient_cache.cache.name`` (caches of one name are summed), read from ``cache.stats`` at
collection time, so counting costs nothing per call. Nothing is created without an SDK meter
provider (passed, or set globally).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from resilient_cache import telemetry
from resilient_cache.cache.options import CacheStats

# Instrument names (observable; one series per cache name).
CACHE_HITS = "resilient_cache.cache.hits"
CACHE_MISSES = "resilient_cache.cache.misses"
CACHE_LOADS = "resilient_cache.cache.loads"
CACHE_LOAD_TIME = "resilient_cache.cache.load_time"
CACHE_STALE_SERVED = "resilient_cache.cache.stale_served"
CACHE_ERRORS = "resilient_cache.cache.errors"
CACHE_WRITEBACK_DROPPED = "resilient_cache.cache.writeback.dropped"
CACHE_ENTRIES = "resilient_cache.cache.entries"
CACHE_NAME = "resilient_cache.cache.name"
CACHE_TIER = "resilient_cache.cache.tier"
CACHE_ERROR_SOURCE = "resilient_cache.cache.error.source"


class ObservedCache(Protocol):
    """What the instruments read of a cache (a ``MultiLayerCache``)."""

    name: str
    stats: CacheStats

    def memory_size(self) -> int: ...


Read = Callable[[ObservedCache], list[tuple[float, dict[str, Any]]]]


class CacheObservers:
    """The observable ``resilient_cache.cache.*`` instruments of one meter (an SDK meter keeps
    only the first callbacks of an instrument name), reading every cache registered on it."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._caches: weakref.WeakSet[ObservedCache] = weakref.WeakSet()
        counters: list[tuple[str, str, str, Read]] = [
            (
                CACHE_HITS,
                "{hit}",
                "Reads answered by a tier.",
                lambda c: [
                    (c.stats.memory_hits, {CACHE_TIER: "memory"}),
                    (c.stats.redis_hits, {CACHE_TIER: "redis"}),
                ],
            ),
            (CACHE_MISSES, "{miss}", "Reads neither tier had.", lambda c: [(c.stats.misses, {})]),
            (CACHE_LOADS, "{load}", "Loader calls.", lambda c: [(c.stats.loads, {})]),
            (CACHE_LOAD_TIME, "s", "Seconds in loaders.", lambda c: [(c.stats.load_time, {})]),
            (
                CACHE_STALE_SERVED,
                "{value}",
                "Values served past their expiry because Redis or the loader failed.",
                lambda c: [(c.stats.stale_served, {})],
            ),
            (
                CACHE_ERRORS,
                "{error}",
                "Redis and loader failures.",
                lambda c: [
                    (c.stats.redis_errors, {CACHE_ERROR_SOURCE: "redis"}),
                    (c.stats.loader_errors, {CACHE_ERROR_SOURCE: "loader"}),
                ],
            ),
            (
                CACHE_WRITEBACK_DROPPED,
                "{write}",
                "Write-backs dropped because the queue was full.",
                lambda c: [(c.stats.writeback_dropped, {})],
            ),
        ]
        for name, unit, description, read in counters:
            meter.create_observable_counter(
                name, [self._callback(read)], unit=unit, description=description
            )
        meter.create_observable_gauge(
            CACHE_ENTRIES,
            [self._callback(lambda c: [(c.memory_size(), {})])],
            unit="{entry}",
            description="Entries held by the memory tier.",
        )

    def add(self, cache: ObservedCache) -> None:
        self._caches.add(cache)

    def _callback(self, read: Read) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            totals: dict[tuple[Any, ...], tuple[float, dict[str, Any]]] = {}
            for cache in list(self._caches):
                for value, attributes in read(cache):
                    attrs = {CACHE_NAME: cache.name, **attributes}
                    series = tuple(sorted(attrs.items()))
                    totals[series] = (totals.get(series, (0, attrs))[0] + value, attrs)
            return [Observation(value, attrs) for value, attrs in totals.values()]

        return callback


#: The observers of each meter: one set of instruments per meter, whatever the number of caches.
CACHE_OBSERVERS: weakref.WeakKeyDictionary[Any, CacheObservers] = weakref.WeakKeyDictionary()


def register_instruments(cache: ObservedCache, provider: metrics.MeterProvider | None) -> None:
    """Report ``cache`` through the ``resilient_cache.cache.*`` instruments, once, and only when
    an SDK meter provider is passed or set globally."""
    provider = provider or metrics.get_meter_provider()
    if not telemetry.metrics_enabled(provider):
        return
    if type(provider).__name__ == "_ProxyMeterProvider":
        # The global proxy, with an SDK set behind it by now: register on the SDK's meter.
        provider = metrics.get_meter_provider()
    meter = telemetry.get_meter(provider)
    observers = CACHE_OBSERVERS.get(meter)
    if observers is None:
        observers = CACHE_OBSERVERS[meter] = CacheObservers(meter)
    observers.add(cache)
