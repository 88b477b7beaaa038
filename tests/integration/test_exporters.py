"""``configure_telemetry`` and ``resilient-cache metrics serve``: the OpenTelemetry SDK set up from
``OTEL_*`` variables, scraped as Prometheus text over HTTP from a real cluster.

Each case runs in a subprocess: configure_telemetry sets the process-wide providers, which this
test process must keep at the API's defaults.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

DURATION = "db_client_operation_duration_seconds"  # db.client.operation.duration, unit s
SECRET_KEY = "exporter-test-secret-key-7f3a"
SECRET_VALUE = "exporter-test-secret-value-c91d"
SECRET_PASSWORD = "exporter-test-password-2b8e"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "OTEL_"))}
    if "REDIS_SERVER_BIN" in os.environ:
        env["REDIS_SERVER_BIN"] = os.environ["REDIS_SERVER_BIN"]
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_python(script: str, env: dict[str, str], timeout: float = 60) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


class Child:
    """A long-running subprocess whose stdout lines are read in the background."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        # faulthandler: a child that does not stop in time is sent SIGABRT and prints where
        # every thread was, so a hang says where it is.
        self.process = subprocess.Popen(
            args,
            env={**env, "PYTHONFAULTHANDLER": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def next_line(self, timeout: float = 30) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.process.kill()
            _, err = self.process.communicate(timeout=10)
            raise AssertionError(
                f"no output from the child within {timeout}s; stderr:\n{err}"
            ) from None

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)
            try:
                _, err = self.process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                _, err = self.process.communicate()
            err = f"still running 20 s after signal {sig}; where it was:\n{err}"
        return self.process.returncode, err


def scrape(url: str) -> tuple[str, dict]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return text, {family.name: family for family in text_string_to_metric_families(text)}


def scrape_until(url: str, ready, timeout: float = 20) -> tuple[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        text, families = scrape(url)
        if ready(families):
            return text, families
        if time.monotonic() > deadline:
            raise AssertionError(f"the scrape never got ready; last one:\n{text}")
        time.sleep(0.2)


def histogram_points(family) -> dict[tuple, dict[str, float]]:
    """{labels without le: {"count": .., "sum": .., "buckets": [(le, n), ...]}} of a histogram."""
    points: dict[tuple, dict] = {}
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        point = points.setdefault(tuple(sorted(labels.items())), {"buckets": []})
        if sample.name.endswith("_bucket"):
            point["buckets"].append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_count"):
            point["count"] = sample.value
        elif sample.name.endswith("_sum"):
            point["sum"] = sample.value
    return points


def assert_sane_histogram(family) -> dict[tuple, dict[str, float]]:
    assert family.type == "histogram"
    assert family.unit in ("", "seconds")
    points = histogram_points(family)
    assert points
    for labels, point in points.items():
        buckets = sorted(point["buckets"])
        counts = [n for _, n in buckets]
        assert counts == sorted(counts), f"buckets not cumulative for {labels}"
        assert buckets[-1][0] == float("inf") and buckets[-1][1] == point["count"]
        assert point["count"] >= 1
        # Loopback Redis: every command well under 10 s, and the sum is sane for the count.
        assert 0 <= point["sum"] < 10 * point["count"]
        bounds = [le for le, _ in buckets]
        assert 0.0001 in bounds and 10.0 in bounds  # the Redis buckets, 100 us .. 10 s
    return points


def labels_of(points) -> list[dict[str, str]]:
    return [dict(key) for key in points]


# -- resilient-cache metrics serve ---------------------------------------------------------


def test_metrics_serve_exports_the_client_through_the_otel_prometheus_exporter(
    cluster_nodes,
) -> None:
    env = clean_env(
        REDIS_CLUSTER_NODES=cluster_nodes,
        # The cluster's default user has no password, so any password is accepted: this only
        # proves the password never reaches the scrape.
        REDIS_USERNAME="default",
        REDIS_PASSWORD=SECRET_PASSWORD,
    )
    # Started with SIGINT ignored, as a script's background job inherits it: Ctrl-C (SIGINT)
    # must still stop it cleanly. (Before the CLI handled SIGINT itself, this hung for good.)
    ignore_sigint_then_run_cli = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "runpy.run_module('resilient_cache', run_name='__main__', alter_sys=True)"
    )
    child = Child(
        [sys.executable, "-c", ignore_sigint_then_run_cli, "metrics", "serve", "--port", "0",
         "--interval", "0.2"],
        env,
    )  # fmt: skip
    try:
        line = child.next_line()
        assert line.startswith("resilient-cache: serving http://127.0.0.1:"), line
        url = line.split()[2]
        assert url.endswith("/metrics")

        def enough_pings(families) -> bool:
            family = families.get(DURATION)
            return (
                family is not None
                and any(s.name == DURATION + "_count" and s.value >= 3 for s in family.samples)
                and "resilient_cache_cluster_health" in families
            )

        text, families = scrape_until(url, enough_pings)
    finally:
        code, err = child.stop(signal.SIGINT)  # Ctrl-C is the normal way out
    assert code == 0, err
    assert "Traceback" not in err

    points = assert_sane_histogram(families[DURATION])
    ping = [labels for labels in labels_of(points) if labels["db_operation_name"] == "PING"]
    assert ping and all(labels["db_system_name"] == "redis" for labels in ping)
    assert all(labels["otel_scope_name"] == "resilient_cache" for labels in labels_of(points))
    target = families["target_info"]  # target_info: the OTel resource
    assert target.samples[0].labels["service_name"] == "resilient-cache"
    assert SECRET_PASSWORD not in text

    # The client's own instruments, under the names examples/prometheus/alerts.yml relies on.
    def values(name: str) -> list:
        assert name in families, f"{name} missing; families: {sorted(families)}"
        return families[name].samples

    (health,) = values("resilient_cache_cluster_health")
    assert families["resilient_cache_cluster_health"].type == "gauge"
    assert health.value == 2  # healthy
    nodes = {
        (s.labels["resilient_cache_node_role"], s.labels["resilient_cache_node_status"]): s.value
        for s in values("resilient_cache_cluster_nodes")
    }
    assert nodes[("primary", "connected")] == 3 and nodes[("replica", "connected")] == 3
    assert sum(nodes.values()) == 6
    breakers = values("resilient_cache_breaker_state")
    assert families["resilient_cache_breaker_state"].type == "gauge"
    assert breakers and all(s.value == 0 for s in breakers)  # all closed
    assert families["resilient_cache_command_attempts"].type == "counter"
    (attempts,) = [
        s for s in values("resilient_cache_command_attempts") if s.name.endswith("_total")
    ]
    assert attempts.value >= 3  # the PINGs (read at another moment than the histogram)


def test_metrics_serve_with_sigterm_and_a_configuration_error(cluster_nodes) -> None:
    child = Child(
        [sys.executable, "-m", "resilient_cache", "metrics", "serve", "--port", "0"],
        clean_env(REDIS_CLUSTER_NODES=cluster_nodes),
    )
    try:
        assert "serving http://127.0.0.1:" in child.next_line()
    finally:
        code, err = child.stop(signal.SIGTERM)
    assert code == 0, err

    bad = subprocess.run(
        [sys.executable, "-m", "resilient_cache", "metrics", "serve", "--port", "0"],
        env=clean_env(REDIS_CLUSTER_NODES=cluster_nodes, OTEL_TRACES_EXPORTER="zipkin"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "resilient-cache: configuration error: OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'; "
        "use one of: otlp, console, none"
    ]


# -- configure_telemetry from OTEL_* variables ---------------------------------------------

APP = """
    import asyncio, json, sys
    from opentelemetry import metrics, trace
    from resilient_cache import configure_telemetry, create_redis_cluster

    telemetry = configure_telemetry()
    assert telemetry.configured_metrics and not telemetry.configured_tracing
    assert metrics.get_meter_provider() is telemetry.meter_provider
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # traces: none

    async def main():
        async with create_redis_cluster(health_check_interval=0.2, autoload=False) as cluster:
            await cluster.set("{key}", "{value}", ex=60)
            assert await cluster.get("{key}") == b"{value}"
            try:
                await cluster.incr("{key}")  # INCRBY on a string: a ResponseError
            except Exception as err:
                failed = type(err).__name__
            await cluster.delete("{key}")
            await cluster.get_stats()
            print(json.dumps({{"url": telemetry.prometheus_url, "failed": failed}}), flush=True)
            sys.stdin.readline()  # scraped now, while the client is alive
        telemetry.shutdown()

    asyncio.run(main())
"""


def test_configure_telemetry_serves_prometheus_from_otel_variables(cluster_nodes) -> None:
    port = free_port()
    env = clean_env(
        REDIS_CLUSTER_NODES=cluster_nodes,
        REDIS_USERNAME="default",
        REDIS_PASSWORD=SECRET_PASSWORD,
        OTEL_SERVICE_NAME="exporter-test",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
    )
    script = textwrap.dedent(APP.format(key=SECRET_KEY, value=SECRET_VALUE))
    child = Child([sys.executable, "-c", script], env)
    try:
        ready = json.loads(child.next_line())
        assert ready["url"] == f"http://127.0.0.1:{port}/metrics"
        text, families = scrape(ready["url"])
        assert child.process.stdin is not None
        child.process.stdin.write("done\n")
        child.process.stdin.flush()
        child.process.wait(timeout=30)  # it disconnects and shuts telemetry down on its own
    finally:
        code, err = child.stop(signal.SIGTERM)
    assert code == 0, err

    points = assert_sane_histogram(families[DURATION])
    by_operation = {labels["db_operation_name"]: labels for labels in labels_of(points)}
    assert {"SET", "GET", "INCRBY", "DEL"} <= set(by_operation)
    for labels in by_operation.values():
        assert labels["db_system_name"] == "redis"
    assert by_operation["INCRBY"]["error_type"] == ready["failed"]
    assert "error_type" not in by_operation["GET"] or by_operation["GET"]["error_type"] == ""
    # Keyed commands know the node that answered.
    assert by_operation["GET"]["server_address"] == "127.0.0.1"
    assert int(by_operation["GET"]["server_port"]) in {
        int(node.rsplit(":", 1)[1]) for node in cluster_nodes.split(",")
    }

    target = families["target_info"].samples[0].labels
    assert target["service_name"] == "exporter-test"
    assert target["deployment_environment"] == "test"

    own = sorted(name for name in families if name.startswith("resilient_cache_"))
    for name in own:  # whatever the client exports of its own, each is a sane number
        for sample in families[name].samples:
            assert sample.value == sample.value and sample.value >= 0, (name, sample)

    for secret in (SECRET_KEY, SECRET_VALUE, SECRET_PASSWORD):
        assert secret not in text


# -- providers the application already set --------------------------------------------------

EXISTING = """
    import json, socket
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from resilient_cache import configure_telemetry

    tracer_provider = TracerProvider() if "{which}" in ("both", "traces") else None
    meter_provider = (
        MeterProvider(metric_readers=[InMemoryMetricReader()])
        if "{which}" in ("both", "metrics") else None
    )
    if tracer_provider: trace.set_tracer_provider(tracer_provider)
    if meter_provider: metrics.set_meter_provider(meter_provider)

    telemetry = configure_telemetry()
    listening = socket.socket().connect_ex(("127.0.0.1", {port})) == 0
    result = {{
        "tracer_kept": tracer_provider is None or telemetry.tracer_provider is tracer_provider,
        "meter_kept": meter_provider is None or telemetry.meter_provider is meter_provider,
        "global_tracer_is_returned": trace.get_tracer_provider() is telemetry.tracer_provider,
        "global_meter_is_returned": metrics.get_meter_provider() is telemetry.meter_provider,
        "configured_tracing": telemetry.configured_tracing,
        "configured_metrics": telemetry.configured_metrics,
        "prometheus": telemetry.prometheus_address,
        "listening": listening,
    }}
    telemetry.shutdown()
    # The application's providers still work after our shutdown.
    if tracer_provider:
        with tracer_provider.get_tracer("t").start_as_current_span("s") as span:
            result["app_tracer_alive"] = span.is_recording()
    print(json.dumps(result))
"""


@pytest.mark.parametrize("which", ["both", "traces", "metrics"])
def test_configure_telemetry_leaves_providers_the_application_set(which: str) -> None:
    port = free_port()
    env = clean_env(
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
    )
    result = run_python(EXISTING.format(which=which, port=port), env)
    assert result["tracer_kept"] and result["meter_kept"]
    assert result["global_tracer_is_returned"] and result["global_meter_is_returned"]
    # Only the signal the application left alone is configured.
    assert result["configured_tracing"] is (which == "metrics")
    assert result["configured_metrics"] is (which == "traces")
    assert result["listening"] is (which == "traces")
    assert bool(result["prometheus"]) is (which == "traces")
    if which != "metrics":
        assert result["app_tracer_alive"] is True


# -- errors -----------------------------------------------------------------------------------

MISSING = """
    import json, sys
    sys.modules["{module}"] = None  # as if the package were not installed
    from opentelemetry import metrics, trace
    from resilient_cache import ConfigurationError, configure_telemetry
    from resilient_cache.exporters import ExporterNotInstalledError
    try:
        configure_telemetry()
    except ExporterNotInstalledError as err:
        assert isinstance(err, ConfigurationError)
        untouched = isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) and (
            type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider"
        )
        print(json.dumps({{"error": str(err), "extra": err.extra, "untouched": untouched}}))
    else:
        print(json.dumps({{"error": None}}))
"""


@pytest.mark.parametrize(
    ("module", "env", "extra", "variable"),
    [
        (
            "opentelemetry.exporter.prometheus",
            {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_TRACES_EXPORTER": "none"},
            "prometheus",
            "OTEL_METRICS_EXPORTER=prometheus",
        ),
        (
            "opentelemetry.exporter.otlp.proto.http.trace_exporter",
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "none"},
            "otlp",
            "OTEL_TRACES_EXPORTER=otlp over http/protobuf",
        ),
        (
            "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_EXPORTER": "console"},
            "otlp-grpc",
            "OTEL_METRICS_EXPORTER=otlp over grpc",
        ),
    ],
)
def test_a_missing_exporter_package_names_the_extra(
    module: str, env: dict[str, str], extra: str, variable: str
) -> None:
    result = run_python(MISSING.format(module=module), clean_env(**env))
    assert result["error"] is not None, "no error raised"
    assert result["error"].startswith(variable + " needs the package opentelemetry-exporter-")
    assert f"pip install 'resilient-cache[{extra}]'" in result["error"]
    assert result["extra"] == extra
    assert result["untouched"], "a provider was set although configuration failed"


def test_metrics_serve_without_the_prometheus_exporter_is_a_configuration_error() -> None:
    script = (
        "import sys; sys.modules['opentelemetry.exporter.prometheus'] = None\n"
        "from resilient_cache.cli import main\n"
        "raise SystemExit(main(['metrics', 'serve', '--port', '0']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=clean_env(REDIS_CLUSTER_NODES="127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("resilient-cache: configuration error: OTEL_METRICS_EXPORTER=prometheus")
    assert line.endswith("install it with: pip install 'resilient-cache[prometheus]'")


BAD_VALUES = """
    import json, os, socket
    from opentelemetry import metrics, trace
    from resilient_cache import ConfigurationError, configure_telemetry

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = {cases}
    cases.append({{"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_TRACES_EXPORTER": "none",
                  "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
                  "OTEL_EXPORTER_PROMETHEUS_PORT": str(busy.getsockname()[1])}})
    messages = []
    for case in cases:
        for name in [n for n in os.environ if n.startswith("OTEL_")]:
            del os.environ[name]
        os.environ.update(case)
        try:
            configure_telemetry()
            messages.append(None)
        except ConfigurationError as err:
            messages.append(str(err))
    untouched = isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) and (
        type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider"
    )
    print(json.dumps({{"messages": messages, "untouched": untouched}}))
"""

BAD_CASES = [
    ({"OTEL_METRICS_EXPORTER": "prometheus2"}, "OTEL_METRICS_EXPORTER: unknown exporter"),
    (
        {"OTEL_TRACES_EXPORTER": "prometheus"},
        "OTEL_TRACES_EXPORTER: unknown exporter 'prometheus' (prometheus exports metrics only)",
    ),
    ({"OTEL_TRACES_EXPORTER": "none,console"}, "OTEL_TRACES_EXPORTER: 'none' cannot be combined"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL: unknown OTLP"),
    (
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "udp"},
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: unknown OTLP protocol 'udp'",
    ),
    (
        {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "http"},
        "OTEL_EXPORTER_PROMETHEUS_PORT: 'http' is not a port number",
    ),
    (
        {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "70000"},
        "OTEL_EXPORTER_PROMETHEUS_PORT: '70000' is not a port number",
    ),
]


def test_bad_otel_values_name_the_variable_and_set_nothing() -> None:
    cases = [env for env, _ in BAD_CASES]
    result = run_python(BAD_VALUES.format(cases=repr(cases)), clean_env())
    *messages, busy = result["messages"]
    for (env, expected), message in zip(BAD_CASES, messages, strict=True):
        assert message is not None, f"{env} was accepted"
        assert message.startswith(expected), (env, message)
    assert busy is not None and busy.startswith(
        "OTEL_EXPORTER_PROMETHEUS_HOST/OTEL_EXPORTER_PROMETHEUS_PORT: the Prometheus endpoint "
        "cannot listen on 127.0.0.1:"
    )
    assert result["untouched"]


# -- examples/metrics_endpoint.py ------------------------------------------------------------


def test_the_metrics_endpoint_example_serves_the_otel_registry(cluster_nodes) -> None:
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "metrics_endpoint.py")
    child = Child(
        [sys.executable, example, "--port", "0"], clean_env(REDIS_CLUSTER_NODES=cluster_nodes)
    )
    try:
        line = child.next_line()
        assert line.startswith("serving http://127.0.0.1:"), line
        url = line.split()[1]
        assert url.endswith("/metrics/redis-cluster")

        def has_reads_and_writes(families) -> bool:
            family = families.get(DURATION)
            operations = (
                {s.labels.get("db_operation_name") for s in family.samples} if family else ()
            )
            return {"SET", "GET"} <= set(operations)

        _, families = scrape_until(url, has_reads_and_writes)
        assert_sane_histogram(families[DURATION])
        assert families["target_info"].samples[0].labels["service_name"] == (
            "metrics-endpoint-example"
        )
        with urllib.request.urlopen(url.replace("/metrics/redis-cluster", "/healthz")) as reply:
            assert reply.read().decode().strip() == "healthy"
    finally:
        code, err = child.stop(signal.SIGTERM)
    assert code == 0, err
