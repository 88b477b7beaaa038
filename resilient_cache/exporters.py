"""Set up the OpenTelemetry SDK from the standard ``OTEL_*`` variables, for applications that
have not set up telemetry themselves.

resilient_cache only ever talks to the global OpenTelemetry providers (or the ones passed to the
client). An application that already configures OpenTelemetry needs nothing from this module. One
that does not can call :func:`configure_telemetry` once, at start-up, **before** building the
client (the client decides at build time whether anybody listens)::

    from resilient_cache import configure_telemetry, create_redis_cluster

    telemetry = configure_telemetry()     # OTEL_* variables: OTLP to a collector by default
    cluster = create_redis_cluster()
    ...
    telemetry.shutdown()                  # flush the last spans and metrics

What is read, and who reads it:

- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: a comma list of ``otlp`` (the default),
  ``console`` and ``none``; metrics also take ``prometheus``. Read here.
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (and its per-signal ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` /
  ``..._METRICS_PROTOCOL``): ``http/protobuf`` (the default, extra ``otlp``) or ``grpc`` (extra
  ``otlp-grpc``). Read here, to choose the exporter package.
- ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``OTEL_EXPORTER_PROMETHEUS_PORT`` (``localhost:9464``): where
  the Prometheus scrape endpoint listens (extra ``prometheus``). Read here.
- ``OTEL_SDK_DISABLED=true``: configure nothing. Read here.
- Everything else is read by the OpenTelemetry SDK and exporters themselves, exactly as they
  document it: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the resource),
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``_HEADERS`` / ``_TIMEOUT`` / ``_CERTIFICATE`` (and the
  per-signal forms), ``OTEL_TRACES_SAMPLER`` / ``_ARG``, ``OTEL_BSP_*``,
  ``OTEL_METRIC_EXPORT_INTERVAL``, ...

An invalid value raises :class:`~resilient_cache.errors.ConfigurationError` naming the variable;
an exporter whose package is not installed raises :class:`ExporterNotInstalledError` (also a
``ConfigurationError``) naming the extra to install. Nothing is set globally unless everything
could be built.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_EXPORTER_PROMETHEUS_HOST,
    OTEL_EXPORTER_PROMETHEUS_PORT,
    OTEL_SDK_DISABLED,
)

from resilient_cache.errors import ConfigurationError

logger = logging.getLogger("resilient_cache.exporters")

__all__ = ["ExporterNotInstalledError", "Telemetry", "configure_telemetry"]

TRACE_EXPORTERS = ("otlp", "console", "none")
METRIC_EXPORTERS = ("otlp", "prometheus", "console", "none")
OTLP_PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_PROMETHEUS_HOST = "localhost"
DEFAULT_PROMETHEUS_PORT = 9464

# (signal, exporter, protocol) -> (module, class, distribution, extra of resilient-cache)
_OPTIONAL: dict[tuple[str, str, str], tuple[str, str, str, str]] = {
    ("traces", "otlp", "http/protobuf"): (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "OTLPSpanExporter",
        "opentelemetry-exporter-otlp-proto-http",
        "otlp",
    ),
    ("traces", "otlp", "grpc"): (
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "OTLPSpanExporter",
        "opentelemetry-exporter-otlp-proto-grpc",
        "otlp-grpc",
    ),
    ("metrics", "otlp", "http/protobuf"): (
        "opentelemetry.exporter.otlp.proto.http.metric_exporter",
        "OTLPMetricExporter",
        "opentelemetry-exporter-otlp-proto-http",
        "otlp",
    ),
    ("metrics", "otlp", "grpc"): (
        "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
        "OTLPMetricExporter",
        "opentelemetry-exporter-otlp-proto-grpc",
        "otlp-grpc",
    ),
    ("metrics", "prometheus", ""): (
        "opentelemetry.exporter.prometheus",
        "PrometheusMetricReader",
        "opentelemetry-exporter-prometheus",
        "prometheus",
    ),
}


class ExporterNotInstalledError(ConfigurationError):
    """The configured exporter needs a package that is not installed.

    The message names the variable that asked for it and the command that installs it, such as
    ``pip install 'resilient-cache[otlp]'``. ``extra`` is the name of that extra.
    """

    def __init__(self, message: str, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


@dataclass
class Telemetry:
    """What :func:`configure_telemetry` returns: the providers in force, and a shutdown handle.

    ``tracer_provider`` and ``meter_provider`` are the global providers after the call (the
    application's own when it had set them). ``configured_tracing`` / ``configured_metrics`` say
    whether this call built them; :meth:`shutdown` only ever shuts down what this call built.
    ``prometheus_address`` is the ``(host, port)`` the scrape endpoint listens on, if any.
    """

    tracer_provider: trace.TracerProvider
    meter_provider: metrics.MeterProvider
    configured_tracing: bool = False
    configured_metrics: bool = False
    prometheus_address: tuple[str, int] | None = None
    _server: Any = field(default=None, repr=False)
    _server_thread: threading.Thread | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def configured(self) -> bool:
        """True if this call set up at least one provider."""
        return self.configured_tracing or self.configured_metrics

    @property
    def prometheus_url(self) -> str | None:
        """``http://host:port/metrics`` of the scrape endpoint, if one was started."""
        if self.prometheus_address is None:
            return None
        host, port = self.prometheus_address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def force_flush(self, timeout_millis: int = 30_000) -> None:
        """Export what is buffered now (spans in the batch processor, pending metrics)."""
        if self.configured_tracing:
            self.tracer_provider.force_flush(timeout_millis)  # type: ignore[attr-defined]
        if self.configured_metrics:
            self.meter_provider.force_flush(timeout_millis)  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        """Flush and stop what this call set up: providers, exporters, the scrape endpoint.

        Providers the application had set are left alone. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.configured_tracing:
            self.tracer_provider.shutdown()  # type: ignore[attr-defined]
        if self.configured_metrics:
            self.meter_provider.shutdown()  # type: ignore[attr-defined]
        _stop_server(self._server, self._server_thread)

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def configure_telemetry(
    *,
    traces_exporter: str | None = None,
    metrics_exporter: str | None = None,
    prometheus_host: str | None = None,
    prometheus_port: int | None = None,
    prometheus_server: bool = True,
    default_service_name: str | None = None,
) -> Telemetry:
    """Set up the OpenTelemetry SDK globally from the ``OTEL_*`` variables, unless the
    application already did; return the providers in force and a shutdown handle.

    Call it once, before building any client. For each signal (traces, metrics) whose global
    provider is still the API's default proxy, an SDK provider is built with the exporters
    that ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` name and set globally. A global
    provider the application has already set is returned untouched. An exporter of ``none``
    leaves that signal unconfigured, so the matching stage drops out of the pipeline.

    Keyword arguments override the matching variable:
        traces_exporter: like ``OTEL_TRACES_EXPORTER`` (``"otlp"``, ``"console"``, ``"none"``,
            or a comma list).
        metrics_exporter: like ``OTEL_METRICS_EXPORTER`` (also ``"prometheus"``).
        prometheus_host / prometheus_port: like ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT``;
            port 0 picks a free port (see :attr:`Telemetry.prometheus_address`).
        prometheus_server: False to start no HTTP server for the Prometheus exporter: its
            metrics are still registered with ``prometheus_client.REGISTRY``, for an
            application that serves ``prometheus_client.generate_latest()`` on its own
            HTTP server (see examples/metrics_endpoint.py).
        default_service_name: the ``service.name`` to use when neither ``OTEL_SERVICE_NAME``
            nor ``OTEL_RESOURCE_ATTRIBUTES`` names one (never overrides them).

    Raises:
        ConfigurationError: a variable has an invalid value (the message names it), or the
            Prometheus endpoint cannot listen on its address.
        ExporterNotInstalledError: an exporter's package is missing; the message says which
            ``pip install 'resilient-cache[<extra>]'`` brings it.
    """
    tracer_provider = trace.get_tracer_provider()
    meter_provider = metrics.get_meter_provider()
    if os.environ.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        logger.info("%s=true: telemetry not configured", OTEL_SDK_DISABLED)
        return Telemetry(tracer_provider, meter_provider)
    plan = _plan(
        want_traces=isinstance(tracer_provider, trace.ProxyTracerProvider),
        want_metrics=_is_default_meter_provider(meter_provider),
        traces_exporter=traces_exporter,
        metrics_exporter=metrics_exporter,
        prometheus_host=prometheus_host,
        prometheus_port=prometheus_port,
        prometheus_server=prometheus_server,
    )
    built = _build(plan, _resource(default_service_name))
    result = _install(built)
    logger.info(
        "telemetry: traces %s, metrics %s%s",
        _describe(plan.want_traces, plan.trace_names, plan.trace_protocol),
        _describe(plan.want_metrics, plan.metric_names, plan.metric_protocol),
        f", Prometheus scrape at {result.prometheus_url}" if result.prometheus_address else "",
    )
    return result


# -- the three steps: plan (read and check everything), build (nothing global), install ----


@dataclass
class _Plan:
    """Every setting read and checked, every exporter class imported: nothing built yet."""

    want_traces: bool
    want_metrics: bool
    trace_names: list[str] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    trace_protocol: str = "http/protobuf"
    metric_protocol: str = "http/protobuf"
    span_exporters: list[Any] = field(default_factory=list)
    metric_classes: list[tuple[str, Any]] = field(default_factory=list)
    prometheus_listen: tuple[str, int] | None = None  # where to start the scrape endpoint


def _plan(
    *,
    want_traces: bool,
    want_metrics: bool,
    traces_exporter: str | None,
    metrics_exporter: str | None,
    prometheus_host: str | None,
    prometheus_port: int | None,
    prometheus_server: bool,
) -> _Plan:
    """Step 1: read and check every setting, and import every exporter class needed (a bad
    value or a missing package is reported here, before anything is built)."""
    plan = _Plan(want_traces, want_metrics)
    if want_traces:
        plan.trace_names = _exporter_names(OTEL_TRACES_EXPORTER, traces_exporter, TRACE_EXPORTERS)
        plan.trace_protocol = _protocol(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)
    if want_metrics:
        plan.metric_names = _exporter_names(
            OTEL_METRICS_EXPORTER, metrics_exporter, METRIC_EXPORTERS
        )
        plan.metric_protocol = _protocol(OTEL_EXPORTER_OTLP_METRICS_PROTOCOL)
    prometheus = "prometheus" in plan.metric_names
    if prometheus and prometheus_server:
        host = (
            prometheus_host
            or os.environ.get(OTEL_EXPORTER_PROMETHEUS_HOST)
            or DEFAULT_PROMETHEUS_HOST
        )
        plan.prometheus_listen = (host, _port(prometheus_port))
    plan.span_exporters = [
        _exporter_class("traces", OTEL_TRACES_EXPORTER, name, plan.trace_protocol)
        for name in plan.trace_names
    ]
    plan.metric_classes = [
        (name, _exporter_class("metrics", OTEL_METRICS_EXPORTER, name, plan.metric_protocol))
        for name in plan.metric_names
    ]
    if prometheus:
        _import_optional(
            "prometheus_client",
            "prometheus-client",
            f"{OTEL_METRICS_EXPORTER}=prometheus",
            "prometheus",
        )
    return plan


def _resource(default_service_name: str | None) -> Any:
    """The SDK resource (``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``), with
    ``default_service_name`` only when neither names the service."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if default_service_name and str(resource.attributes.get(SERVICE_NAME, "")).startswith(
        "unknown_service"
    ):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    return resource


@dataclass
class _Built:
    """Step 2's result: providers and the scrape endpoint, none of them global yet."""

    tracer: Any = None
    meter: Any = None
    server: Any = None
    server_thread: threading.Thread | None = None
    address: tuple[str, int] | None = None


def _build(plan: _Plan, resource: Any) -> _Built:
    """Step 2: build the providers and start the scrape endpoint. Nothing is global yet; on
    any failure, what was built is closed again."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    built = _Built()
    try:
        if plan.span_exporters:
            built.tracer = TracerProvider(resource=resource)
            for exporter_class in plan.span_exporters:
                built.tracer.add_span_processor(BatchSpanProcessor(exporter_class()))
        if plan.metric_classes:
            readers: list[MetricReader] = []
            for name, reader_class in plan.metric_classes:
                if name == "prometheus":
                    readers.append(reader_class())  # registers with prometheus_client's REGISTRY
                else:
                    readers.append(PeriodicExportingMetricReader(reader_class()))
            built.meter = MeterProvider(resource=resource, metric_readers=readers)
        if plan.prometheus_listen is not None:
            built.server, built.server_thread, built.address = _start_prometheus_server(
                *plan.prometheus_listen
            )
    except BaseException:
        _shutdown_quietly(built.tracer, built.meter)
        _stop_server(built.server, built.server_thread)
        raise
    return built


def _install(built: _Built) -> Telemetry:
    """Step 3: set the providers globally. If somebody set one meanwhile, theirs stays and
    ours is closed."""
    configured_tracing = configured_metrics = False
    if built.tracer is not None:
        trace.set_tracer_provider(built.tracer)
        configured_tracing = trace.get_tracer_provider() is built.tracer
        if not configured_tracing:
            built.tracer.shutdown()
    if built.meter is not None:
        metrics.set_meter_provider(built.meter)
        configured_metrics = metrics.get_meter_provider() is built.meter
        if not configured_metrics:
            built.meter.shutdown()
            _stop_server(built.server, built.server_thread)
            built.server = built.server_thread = built.address = None
    return Telemetry(
        tracer_provider=trace.get_tracer_provider(),
        meter_provider=metrics.get_meter_provider(),
        configured_tracing=configured_tracing,
        configured_metrics=configured_metrics,
        prometheus_address=built.address,
        _server=built.server,
        _server_thread=built.server_thread,
    )


# -- helpers -------------------------------------------------------------------------------


def _is_default_meter_provider(provider: metrics.MeterProvider) -> bool:
    # The API exports no name for its proxy class; the global is that proxy until an SDK is set.
    return type(provider).__name__ == "_ProxyMeterProvider"


def _exporter_names(variable: str, override: str | None, allowed: tuple[str, ...]) -> list[str]:
    raw = override if override is not None else os.environ.get(variable, "otlp")
    names = [part.strip().lower() for part in raw.split(",") if part.strip()] or ["otlp"]
    for name in names:
        if name not in allowed:
            hint = " (prometheus exports metrics only)" if name == "prometheus" else ""
            raise ConfigurationError(
                f"{variable}: unknown exporter {name!r}{hint}; use one of: {', '.join(allowed)}"
            )
    if "none" in names:
        if len(names) > 1:
            raise ConfigurationError(f"{variable}: 'none' cannot be combined with other exporters")
        return []
    return list(dict.fromkeys(names))  # drop duplicates, keep order


def _protocol(signal_variable: str) -> str:
    variable = signal_variable if os.environ.get(signal_variable) else OTEL_EXPORTER_OTLP_PROTOCOL
    value = os.environ.get(variable, "").strip().lower() or "http/protobuf"
    if value not in OTLP_PROTOCOLS:
        extra = " (the Python OTLP exporters have no JSON encoding)" if value == "http/json" else ""
        raise ConfigurationError(
            f"{variable}: unknown OTLP protocol {value!r}{extra}; use one of: "
            + ", ".join(OTLP_PROTOCOLS)
        )
    return value


def _port(override: int | None) -> int:
    if override is not None:
        where, raw = "prometheus_port", str(override)
    else:
        where, raw = (
            OTEL_EXPORTER_PROMETHEUS_PORT,
            os.environ.get(OTEL_EXPORTER_PROMETHEUS_PORT, ""),
        )
        if not raw.strip():
            return DEFAULT_PROMETHEUS_PORT
    try:
        port = int(raw.strip())
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"{where}: {raw!r} is not a port number (0-65535)")
    return port


def _exporter_class(signal: str, variable: str, name: str, protocol: str) -> Any:
    if name == "console":
        if signal == "traces":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter
    key = (signal, name, protocol if name == "otlp" else "")
    module_name, class_name, distribution, extra = _OPTIONAL[key]
    what = f"{variable}={name}" + (f" over {protocol}" if name == "otlp" else "")
    module = _import_optional(module_name, distribution, what, extra)
    return getattr(module, class_name)


def _import_optional(module_name: str, distribution: str, what: str, extra: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        install = f"pip install 'resilient-cache[{extra}]'"
        raise ExporterNotInstalledError(
            f"{what} needs the package {distribution}, which is not installed "
            f"({type(err).__name__}: {err}); install it with: {install}",
            extra=extra,
        ) from err


def _start_prometheus_server(host: str, port: int) -> tuple[Any, threading.Thread, tuple[str, int]]:
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as err:
        raise ConfigurationError(
            f"{OTEL_EXPORTER_PROMETHEUS_HOST}/{OTEL_EXPORTER_PROMETHEUS_PORT}: the Prometheus "
            f"endpoint cannot listen on {host}:{port}: {err.strerror or err}"
        ) from err
    bound = server.server_address
    return server, thread, (str(bound[0]), int(bound[1]))


def _stop_server(server: Any, thread: threading.Thread | None) -> None:
    if server is None:
        return
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(timeout=5)


def _shutdown_quietly(*providers: Any) -> None:
    for provider in providers:
        if provider is not None:
            with contextlib.suppress(Exception):
                provider.shutdown()


def _describe(wanted: bool, names: list[str], protocol: str) -> str:
    if not wanted:
        return "left to the application's provider"
    if not names:
        return "off"
    return ", ".join(f"{n} ({protocol})" if n == "otlp" else n for n in names)
