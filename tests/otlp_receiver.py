"""A tiny OTLP/HTTP receiver for tests: what a collector would get, decoded from the wire.

It listens on 127.0.0.1 (a free port) in a thread, accepts ``POST /v1/traces`` and
``POST /v1/metrics`` with protobuf bodies (gzip or not), keeps every raw body (to grep for leaks)
and decodes them with opentelemetry-proto::

    with OtlpReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.traces_url)
        ...
        receiver.spans()      # [DecodedSpan, ...]
        receiver.metrics()    # {name: DecodedMetric}
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

SPAN_KINDS = {value: name for name, value in Span.SpanKind.items()}
STATUS_CODES = {value: name for name, value in Status.StatusCode.items()}


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@dataclass
class DecodedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: str
    status_message: str
    scope: str

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [attrs for event_name, attrs in self.events if event_name == name]


@dataclass
class DecodedPoint:
    attributes: dict[str, Any]
    value: float | None = None  # sum / gauge
    count: int | None = None  # histogram
    sum: float | None = None
    bucket_counts: list[int] = field(default_factory=list)
    bounds: list[float] = field(default_factory=list)


@dataclass
class DecodedMetric:
    name: str
    unit: str
    kind: str  # "sum" | "gauge" | "histogram" | ...
    monotonic: bool
    points: list[DecodedPoint]
    scope: str

    def total(self, **where: Any) -> float:
        """Sum of the points (values, or counts for a histogram) whose attributes match."""
        result = 0.0
        for point in self.points:
            if all(point.attributes.get(k) == v for k, v in where.items()):
                result += point.count if point.count is not None else (point.value or 0.0)
        return result


class OtlpReceiver:
    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []  # (path, decompressed body)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.bodies.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        return f"{self.endpoint}/v1/traces"

    @property
    def metrics_url(self) -> str:
        return f"{self.endpoint}/v1/metrics"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def raw(self, path: str | None = None) -> list[bytes]:
        with self._lock:
            return [body for p, body in self.bodies if path is None or p == path]

    def clear(self) -> None:
        with self._lock:
            self.bodies.clear()

    def spans(self) -> list[DecodedSpan]:
        spans = []
        for body in self.raw("/v1/traces"):
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        spans.append(
                            DecodedSpan(
                                name=span.name,
                                kind=SPAN_KINDS[span.kind],
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                attributes=attributes(span.attributes),
                                events=[(e.name, attributes(e.attributes)) for e in span.events],
                                status=STATUS_CODES[span.status.code],
                                status_message=span.status.message,
                                scope=scope_spans.scope.name,
                            )
                        )
        return spans

    def metrics(self) -> dict[str, DecodedMetric]:
        """The latest export of each metric (cumulative temporality: the latest is the total)."""
        found: dict[str, DecodedMetric] = {}
        for body in self.raw("/v1/metrics"):
            request = ExportMetricsServiceRequest.FromString(body)
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        found[metric.name] = _decode_metric(metric, scope_metrics.scope.name)
        return found


def _decode_metric(metric: Any, scope: str) -> DecodedMetric:
    kind = metric.WhichOneof("data")
    data = getattr(metric, kind)
    points = []
    for point in data.data_points:
        decoded = DecodedPoint(attributes(point.attributes))
        if kind == "histogram":
            decoded.count = point.count
            decoded.sum = point.sum
            decoded.bucket_counts = list(point.bucket_counts)
            decoded.bounds = list(point.explicit_bounds)
        else:
            decoded.value = point.as_double if point.HasField("as_double") else point.as_int
        points.append(decoded)
    return DecodedMetric(
        name=metric.name,
        unit=metric.unit,
        kind=kind,
        monotonic=bool(getattr(data, "is_monotonic", False)),
        points=points,
        scope=scope,
    )
