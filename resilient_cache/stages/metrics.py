"""The metrics stage: duration and outcome once per logical command.

A command the memory tier answered is counted (``commands.total``/``successful``) but its
duration is not recorded: the latency window and the histogram describe Redis round trips, and
the tier's own counters (``resilient_cache.memory.hits``) count what it served.

Feeds the in-process snapshot behind ``get_metrics()`` always, and, from the same measurement,
the OpenTelemetry histogram ``db.client.operation.duration`` (plus
``resilient_cache.command.errors`` for failures) when a real meter provider is configured: the
client creates those instruments once at build time; without them it records only the snapshot.
redis-py 8's own ``redis.observability`` metrics stay off unless the application turns them on,
so a command is never counted twice by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache import telemetry
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, FastPath, Handler

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.metrics import Counter, Histogram

    from resilient_cache.registry import BuildContext, StageRegistry
    from resilient_cache.telemetry import CommandStats


class MetricsSettings(BaseModel):
    """``REDIS_METRICS__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    latency_window: int = Field(
        default=10_000,
        ge=100,
        le=1_000_000,
        description="Recent commands the latency percentiles cover.",
    )
    export: bool = Field(
        default=True, description="Record OpenTelemetry instruments when an SDK is configured."
    )


class MetricsStage:
    def __init__(
        self,
        stats: CommandStats,
        clock: Callable[[], float],
        histogram: Histogram | None,
        errors: Counter | None = None,
    ) -> None:
        self._stats = stats
        self._clock = clock
        self._histogram = histogram
        self._errors = errors
        # The attributes of a successful command, per (command name, node name): made once and
        # never changed, as the SDK only reads them. Bounded, as names come from callers.
        self._attributes: dict[tuple[str, str | None], dict[str, Any]] = {}
        # Whether the histogram is recorded is known now: not asked on every success.
        self._on_success = self._succeeded if histogram is None else self._succeeded_exported

    def fast_path(self) -> FastPath:
        # The token is the start time: the clock itself is the hook, no Python call.
        return FastPath(after=self._on_success, on_error=self._failed, start=self._clock)

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        start = self._clock()
        try:
            result = await call_next(command)
        except BaseException as error:
            return await self._failed(command, start, error, call_next)
        self._on_success(command, start)
        return result

    def _succeeded(self, command: Command, start: float) -> None:
        elapsed = self._clock() - start
        # CommandStats.record() inlined for the success path: this runs on every command
        # (``total`` is ``successful + failed``: nothing to count for it).
        stats = self._stats
        stats.successful += 1
        if command.served_from_memory:
            # Answered in microseconds without Redis: counted as a command, but kept out of
            # the attempts and of the latencies, which describe Redis round trips (p95 alerts).
            return
        stats.attempts += command.attempt
        stats.latencies.append(elapsed)

    def _succeeded_exported(self, command: Command, start: float) -> None:
        """:meth:`_succeeded`, and the histogram (an OpenTelemetry SDK is configured)."""
        self._succeeded(command, start)
        if not command.served_from_memory:
            assert self._histogram is not None
            # The latency _succeeded() has just appended (nothing ran in between).
            latency = self._stats.latencies[-1]
            self._histogram.record(latency, self._success_attributes(command))

    async def _failed(
        self, command: Command, start: float, error: BaseException, call_next: Handler
    ) -> Any:
        # A cancellation (the caller gave up) says nothing about Redis: not counted.
        if isinstance(error, Exception):
            elapsed = self._clock() - start
            self._stats.record(elapsed, False, command.attempt)
            if self._histogram is not None:
                self._export_failure(command, elapsed, type(error).__qualname__)
        raise error

    def _success_attributes(self, command: Command) -> dict[str, Any]:
        node = command.node
        key = (command.name, node.name if node is not None else None)
        attributes = self._attributes.get(key)
        if attributes is None:
            if len(self._attributes) >= MAX_ATTRIBUTE_SETS:
                self._attributes.clear()
            attributes = self._attributes[key] = _attributes_of(command)
        return attributes

    def _export_failure(self, command: Command, elapsed: float, error_type: str) -> None:
        attributes = _attributes_of(command)
        attributes[telemetry.ERROR_TYPE] = error_type
        if self._errors is not None:
            self._errors.add(1, attributes)
        assert self._histogram is not None
        self._histogram.record(elapsed, attributes)


#: Most attribute sets kept by one metrics stage (command names x nodes stays far below).
MAX_ATTRIBUTE_SETS = 4096


def _attributes_of(command: Command) -> dict[str, Any]:
    return {
        telemetry.DB_SYSTEM_NAME: telemetry.DB_SYSTEM_REDIS,
        telemetry.DB_OPERATION_NAME: command.name,
        **telemetry.node_attributes(command.node),
    }


def build(settings: MetricsSettings, context: BuildContext) -> MetricsStage:
    context.stats.set_window(settings.latency_window)
    if not settings.export:
        # The build made the client's instruments once; ``export=false`` turns them all off
        # (the other stages read them when they record, so the factories' order is irrelevant).
        context.stats.instruments = None
    instruments = context.stats.instruments
    if instruments is None:
        return MetricsStage(context.stats, context.clock, None)
    return MetricsStage(context.stats, context.clock, instruments.duration, instruments.errors)


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("metrics", MetricsSettings, build, description="Duration and outcome counters.")
