"""The original guide's ``/metrics/redis-cluster`` endpoint, without hand-written exposition text.

The original guide built Prometheus text by hand from ``getStats()`` and ``getMetrics()``
(``redis_cluster_nodes``, ``redis_cluster_health``, ``redis_cluster_commands_total``, latency
"quantiles" as gauges). Here the client's OpenTelemetry instruments go through the OpenTelemetry
Prometheus exporter into ``prometheus_client``'s registry, and the application's own HTTP server
serves that registry: real histograms (so Prometheus computes any percentile, over any window,
across every pod), and the node, health and breaker gauges with their labels. The mapping from
the old series to the new ones is in docs/observability.md.

    eval "$(python -m resilient_cache cluster up | grep ^export)"   # or your own cluster
    pip install 'resilient-cache[prometheus]'
    python examples/metrics_endpoint.py --port 8080
    curl -s http://127.0.0.1:8080/metrics/redis-cluster

The HTTP server is a few lines of asyncio so that the example needs no web framework; in an
aiohttp, FastAPI or Django application the handler is the same two lines: ``generate_latest()``
as the body, ``CONTENT_TYPE_LATEST`` as the content type. (An application without an HTTP
server of its own does not need this file: ``configure_telemetry()`` with
``OTEL_METRICS_EXPORTER=prometheus`` serves /metrics itself, as ``resilient-cache metrics serve``
does.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from resilient_cache import (
    ConfigurationError,
    RedisClusterClient,
    configure_telemetry,
    create_redis_cluster,
)

METRICS_PATHS = ("/metrics", "/metrics/redis-cluster")


def metrics_response() -> tuple[bytes, str]:
    """What the framework handler returns: the registry as Prometheus text."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cluster: RedisClusterClient
) -> None:
    try:
        request_line = (await reader.readline()).decode("latin-1").split()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # skip the headers
        path = request_line[1].split("?", 1)[0] if len(request_line) >= 2 else ""
        if path in METRICS_PATHS:
            status, (body, content_type) = "200 OK", metrics_response()
        elif path == "/healthz":  # the client's last health probe, for a readiness check
            health = (await cluster.get_stats()).health
            status = "200 OK" if health != "unhealthy" else "503 Service Unavailable"
            body, content_type = health.encode() + b"\n", "text/plain; charset=utf-8"
        else:
            status, body, content_type = "404 Not Found", b"not found\n", "text/plain"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def workload(cluster: RedisClusterClient, stop: asyncio.Event) -> None:
    """Something for the instruments to measure: a read and a write every 100 ms."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            await cluster.set(f"example:metrics:{n % 100}", n, ex=60)
            await cluster.get(f"example:metrics:{(n * 7) % 100}")
        except Exception as err:  # keep serving metrics while the cluster misbehaves
            print(f"command failed: {type(err).__name__}: {err}", file=sys.stderr)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def main(host: str, port: int) -> int:
    # 1. OpenTelemetry first, so that the client built below sees a real meter provider. The
    #    Prometheus exporter registers with prometheus_client's REGISTRY; the application's own
    #    server (below) serves it, so configure_telemetry starts no server of its own.
    telemetry = configure_telemetry(
        metrics_exporter="prometheus",
        prometheus_server=False,
        # Traces only if asked for (OTEL_TRACES_EXPORTER=otlp needs resilient-cache[otlp]).
        traces_exporter=None if os.environ.get("OTEL_TRACES_EXPORTER") else "none",
        default_service_name="metrics-endpoint-example",
    )
    # 2. The client, from REDIS_* as usual; its health monitor feeds the node/health gauges.
    cluster = create_redis_cluster(health_check_interval=5.0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with cluster:
            server = await asyncio.start_server(
                lambda r, w: handle(r, w, cluster), host=host, port=port
            )
            bound = server.sockets[0].getsockname()
            print(f"serving http://{bound[0]}:{bound[1]}/metrics/redis-cluster", flush=True)
            async with server:
                await workload(cluster, stop)
    finally:
        telemetry.shutdown()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(main(args.host, args.port)))
    except ConfigurationError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        sys.exit(2)
