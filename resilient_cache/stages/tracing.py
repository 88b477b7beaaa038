"""The tracing stage: one CLIENT span per logical command, following the OpenTelemetry database
semantic conventions for Redis.

When no SDK tracer provider is configured the factory returns ``None`` and the stage is not in
the pipeline at all. The span is a child of the caller's current span and goes through the
provider's sampler. The ``db.*`` and ``server.*`` attributes known at the start are given at
creation, where the sampler sees them; everything after (the answering node, events) is added
only when the span records. A read the memory tier answered carries
``resilient_cache.memory.hit`` and no ``server.*``.

- ``db.system.name`` = ``redis``, ``db.operation.name`` = the command name (``PIPELINE`` or
  ``MULTI`` for a batch, with ``db.operation.batch.size``), ``server.address`` /
  ``server.port`` of the node that answered, ``error.type`` (and ``db.response.status_code``
  for an error reply such as ``WRONGTYPE``) on failure.
- ``db.query.text`` is the command name with every argument replaced by ``?``; for a batch, the
  command names joined by ``"; "``. With ``include_keys`` (off by default) the arguments that
  are the command's keys are shown, never values, and never anything of AUTH / HELLO.
- Exceptions are recorded by type, never by message (a message can quote a value).
- The retry and breaker stages below add events to this span for failed attempts, retries with
  their delay, failover waits and breaker refusals, each with the node it went to. Each MOVED
  or ASK redirect redis-py followed inside an attempt (the backend reports them on the Command)
  is a ``resilient_cache.redirect`` event with its kind, the node that redirected and the one
  it sent the command to; ``server.address`` is the node that answered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.context import attach, detach
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import ResponseError

from resilient_cache import telemetry
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import BATCH_NAMES, Command, Handler, NodeRef

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.trace import Span, Tracer

    from resilient_cache.registry import BuildContext, StageRegistry

#: Commands none of whose arguments ever reach a span, whatever the settings say.
NEVER_SHOWN = frozenset({"AUTH", "HELLO", "MIGRATE", "CONFIG SET", "ACL SETUSER"})


class TracingSettings(BaseModel):
    """``REDIS_TRACING__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    enabled: bool = Field(default=True, description="Trace when an SDK tracer is configured.")
    query_text: bool = Field(
        default=True, description="Set db.query.text (arguments always replaced by '?')."
    )
    include_keys: bool = Field(
        default=False,
        description="Show the command's keys in db.query.text (values stay '?'). Keys can be "
        "personal data: off by default.",
    )


#: Most keys ``db.query.text`` shows with ``include_keys`` (a 20,000-key MGET shows this many).
MAX_QUERY_TEXT_KEYS = 100
#: Most characters of ``db.query.text``, the cut marker included.
MAX_QUERY_TEXT_LENGTH = 2048
#: What ends a cut ``db.query.text``, with the number of arguments (or batch commands) left out.
TRUNCATED_MARKER = " ... ({} more)"
# Room kept for the marker while the text grows (the count has at most 19 digits).
_MARKER_ROOM = len(TRUNCATED_MARKER) + 17


def query_text(command: Command, include_keys: bool = False) -> str:
    """``db.query.text`` of ``command``: no value, and no key unless ``include_keys``.

    Linear in the number of arguments, and at most :data:`MAX_QUERY_TEXT_LENGTH` characters
    with at most :data:`MAX_QUERY_TEXT_KEYS` keys: a longer text is cut between two parts and
    ends with :data:`TRUNCATED_MARKER` (``MGET k1 k2 ... (19900 more)``)."""
    name = command.name
    args = command.args
    if name in BATCH_NAMES:
        return _capped("", [_name_of(call) for call, _ in args], "; ")
    keys = command.keys
    if not (include_keys and keys and name not in NEVER_SHOWN):
        if len(name) + 2 * len(args) <= MAX_QUERY_TEXT_LENGTH:
            return name + " ?" * len(args)
        shown = max(0, (MAX_QUERY_TEXT_LENGTH - _MARKER_ROOM - len(name)) // 2)
        return name + " ?" * shown + TRUNCATED_MARKER.format(len(args) - shown)
    # A set, not a scan of the keys for every argument: an MGET of n keys was O(n^2). Only str
    # and bytes arguments are looked up, so other keys in the set change nothing.
    try:
        key_set = set(keys)
    except TypeError:  # an unhashable key (bytearray, memoryview): never shown anyway
        key_set = {key for key in keys if isinstance(key, str | bytes)}
    parts: list[str] = []
    shown_keys = 0
    for arg in args:
        if isinstance(arg, str | bytes) and arg in key_set:
            if shown_keys == MAX_QUERY_TEXT_KEYS:
                break
            shown_keys += 1
            parts.append(_as_text(arg))
        else:
            parts.append("?")
    return _capped(name, parts, " ", len(args) - len(parts))


def _capped(head: str, parts: list[str], separator: str, left_out: int = 0) -> str:
    """``head`` and ``parts`` joined by ``separator``, cut (whole parts only) so that the text
    with its marker stays within :data:`MAX_QUERY_TEXT_LENGTH`; ``left_out`` parts were not
    even given."""
    length = len(head)
    fits = 0  # how many parts fit with room left for a marker
    for index, part in enumerate(parts):
        length += len(part) + (len(separator) if index or head else 0)
        if length > MAX_QUERY_TEXT_LENGTH:
            break
        if length <= MAX_QUERY_TEXT_LENGTH - _MARKER_ROOM:
            fits = index + 1
    else:
        if not left_out:
            return head + (separator if head and parts else "") + separator.join(parts)
        fits = len(parts) if length <= MAX_QUERY_TEXT_LENGTH - _MARKER_ROOM else fits
    text = separator.join(parts[:fits])
    if head:
        text = f"{head}{separator}{text}" if fits else head
    return text + TRUNCATED_MARKER.format(len(parts) - fits + left_out)


def _name_of(args: Any) -> str:
    name = args[0] if args else "?"
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return str(name).upper()


def _as_text(arg: Any) -> str:
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


class TracingStage:
    def __init__(
        self,
        tracer: Tracer,
        query_text: bool,
        include_keys: bool = False,
        predict_node: Callable[[Command], NodeRef | None] | None = None,
    ) -> None:
        self._tracer = tracer
        self._query_text = query_text
        self._include_keys = include_keys
        # The node the command's keys map to in the current slot map (cluster backend): its
        # address goes in at span creation; the end corrects it if another node answered.
        self._predict_node = predict_node

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        # start_span + attach rather than start_as_current_span: the same span and context, less
        # per-call machinery (no generator-based context manager). The start attributes go in at
        # creation, where samplers see them, as the semantic conventions ask; a span the
        # sampler drops ignores them and gets nothing else.
        predicted = self._predict_node(command) if self._predict_node is not None else None
        span = self._tracer.start_span(
            command.name,
            kind=SpanKind.CLIENT,
            attributes=self._start_attributes(command, predicted),
            record_exception=False,
            set_status_on_exception=False,
        )
        token = attach(set_span_in_context(span))
        try:
            result = await call_next(command)
        except Exception as err:
            if span.is_recording():
                self._failed(span, command, err)
            raise
        else:
            if span.is_recording():
                self._answered(span, command, predicted)
            return result
        finally:
            detach(token)
            span.end()

    def _start_attributes(self, command: Command, node: NodeRef | None) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            telemetry.DB_SYSTEM_NAME: telemetry.DB_SYSTEM_REDIS,
            telemetry.DB_OPERATION_NAME: command.name,
        }
        attributes.update(telemetry.node_attributes(node))
        if command.name in BATCH_NAMES and len(command.args) > 1:
            # Semantic conventions: a batch has two operations or more, never a size of 1.
            attributes[telemetry.DB_OPERATION_BATCH_SIZE] = len(command.args)
        if self._query_text:
            attributes[telemetry.DB_QUERY_TEXT] = query_text(command, self._include_keys)
        return attributes

    def _failed(self, span: Span, command: Command, err: Exception) -> None:
        error_type = type(err).__qualname__
        attributes = telemetry.node_attributes(command.node)
        attributes[telemetry.ERROR_TYPE] = error_type
        if isinstance(err, ResponseError) and err.args:
            # An error reply's prefix (WRONGTYPE, ERR, ...): never the rest of the message.
            prefix = str(err.args[0]).split(" ", 1)[0]
            if prefix.isalpha() and prefix.isupper():
                attributes[telemetry.DB_RESPONSE_STATUS_CODE] = prefix
        if command.attempt > 1:
            attributes[telemetry.ATTEMPTS_ATTRIBUTE] = command.attempt
        if command.batch_size is not None:
            attributes[telemetry.BATCH_SIZE_ATTRIBUTE] = command.batch_size
        span.set_attributes(attributes)
        span.set_status(Status(StatusCode.ERROR, error_type))
        if command.redirects:
            add_redirect_events(span, command)

    def _answered(self, span: Span, command: Command, predicted: NodeRef | None) -> None:
        if command.served_from_memory:
            span.set_attribute(telemetry.MEMORY_HIT_ATTRIBUTE, True)  # no node: nothing was sent
            return
        node = command.node  # the node that answered, if the command had one
        attributes = {} if node is None or node is predicted else telemetry.node_attributes(node)
        if command.attempt > 1:
            attributes[telemetry.ATTEMPTS_ATTRIBUTE] = command.attempt
        if command.batch_size is not None:
            attributes[telemetry.BATCH_SIZE_ATTRIBUTE] = command.batch_size
        if attributes:
            span.set_attributes(attributes)
        if command.redirects:
            add_redirect_events(span, command)


def add_redirect_events(span: Span, command: Command) -> None:
    """One ``resilient_cache.redirect`` event per MOVED/ASK redirect, at the time it came."""
    for redirect in command.redirects or ():
        span.add_event(
            telemetry.EVENT_REDIRECT,
            {
                telemetry.REDIRECT_KIND: redirect.kind,
                telemetry.REDIRECT_FROM_ADDRESS: redirect.source.host,
                telemetry.REDIRECT_FROM_PORT: int(redirect.source.port),
                telemetry.SERVER_ADDRESS: redirect.host,
                telemetry.SERVER_PORT: redirect.port,
            },
            timestamp=redirect.time_ns,
        )


def build(settings: TracingSettings, context: BuildContext) -> TracingStage | None:
    if not settings.enabled or not telemetry.tracing_enabled(context.tracer_provider):
        return None
    backend = context.backend
    predict_node = None
    if backend.routes_per_node:
        # A read another stage may answer itself (the memory tier) is sent to no node: its
        # server.* waits for the end. The set is complete once the build is, and only read here.
        unsent = context.served_locally

        def predict_node(command: Command) -> NodeRef | None:
            if command.name in unsent:
                return None
            return backend.route(command, False)

    context.traced = True
    return TracingStage(
        telemetry.get_tracer(context.tracer_provider),
        settings.query_text,
        settings.include_keys,
        predict_node,
    )


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("tracing", TracingSettings, build, description="One span per command.")
