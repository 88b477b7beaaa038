"""The tracing stage: one CLIENT span per logical command, following the OpenTelemetry database
semantic conventions for Redis.

When no SDK tracer provider is configured the factory returns ``None`` and the stage is not in
the pipeline at all. Arguments never reach a span: ``db.query.text`` keeps only the command name
with every argument replaced by ``?``; exceptions are recorded by type, not by message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import BaseModel, ConfigDict, Field

from resilient_cache import telemetry
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, Handler

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from resilient_cache.plugins import BuildContext, StageRegistry


class TracingSettings(BaseModel):
    """``REDIS_TRACING__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    enabled: bool = Field(default=True, description="Trace when an SDK tracer is configured.")
    query_text: bool = Field(
        default=True, description="Set db.query.text (arguments always replaced by '?')."
    )


class TracingStage:
    def __init__(self, tracer: Tracer, query_text: bool) -> None:
        self._tracer = tracer
        self._query_text = query_text

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        with self._tracer.start_as_current_span(
            command.name,
            kind=SpanKind.CLIENT,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            recording = span.is_recording()
            if recording:
                span.set_attribute(telemetry.DB_SYSTEM_NAME, telemetry.DB_SYSTEM_REDIS)
                span.set_attribute(telemetry.DB_OPERATION_NAME, command.name)
                if self._query_text:
                    span.set_attribute(
                        telemetry.DB_QUERY_TEXT, command.name + " ?" * len(command.args)
                    )
            try:
                result = await call_next(command)
            except Exception as err:
                if recording:
                    error_type = type(err).__qualname__
                    span.set_attribute(telemetry.ERROR_TYPE, error_type)
                    span.set_status(Status(StatusCode.ERROR, error_type))
                    self._set_node(span, command)
                raise
            if recording:
                self._set_node(span, command)
            return result

    @staticmethod
    def _set_node(span: Any, command: Command) -> None:
        node = command.node
        if node is not None:
            span.set_attribute(telemetry.SERVER_ADDRESS, node.host)
            span.set_attribute(telemetry.SERVER_PORT, int(node.port))
        if command.attempt > 1:
            span.set_attribute("resilient_cache.attempts", command.attempt)


def build(settings: TracingSettings, context: BuildContext) -> TracingStage | None:
    if not settings.enabled or not telemetry.tracing_enabled(context.tracer_provider):
        return None
    return TracingStage(telemetry.get_tracer(context.tracer_provider), settings.query_text)


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("tracing", TracingSettings, build, description="One span per command.")
