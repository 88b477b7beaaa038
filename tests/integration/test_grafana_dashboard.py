"""examples/grafana/resilient-cache.json: a Grafana dashboard whose queries must name series that
the OpenTelemetry Prometheus exporter really writes.

The names are not guessed: ``resilient-cache metrics serve`` (with the memory and bulkhead stages
on) and a small application (a MultiLayerCache, a failing command, a breaker isolated and reset
by hand) run as child processes against the dev cluster and are scraped, and every metric and
label in every panel's PromQL is looked up in those scrapes. The one series that cannot appear
without a fault (retries) is checked against its instrument definition instead.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opentelemetry.metrics import Counter, Histogram
from opentelemetry.sdk.metrics import MeterProvider

from resilient_cache import telemetry
from resilient_cache.errors import CommandInDoubtError
from tests.integration.test_exporters import Child, clean_env, scrape

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "resilient-cache.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "stat", "state-timeline"}
# Labels Prometheus itself adds when it scrapes (the dashboard's variables filter on them).
SCRAPE_LABELS = {"job", "instance"}
STAGES = "tracing,metrics,memory,timeout,retry,routing,bulkhead,breaker"

# Series only an application produces, not `metrics serve` (which sends nothing but PING and
# builds no MultiLayerCache): the cache's instruments, a failed command, a breaker transition.
# The application child below produces each of them without any fault.
APPLICATION_ONLY = {
    "resilient_cache_cache_hits_total",
    "resilient_cache_cache_misses_total",
    "resilient_cache_cache_loads_total",
    "resilient_cache_cache_load_time_seconds_total",
    "resilient_cache_cache_stale_served_total",
    "resilient_cache_cache_errors_total",
    "resilient_cache_cache_writeback_dropped_total",
    "resilient_cache_cache_entries",
    "resilient_cache_command_errors_total",
    "resilient_cache_breaker_transitions_total",
}

# What the issue asks the dashboard to show, by the series that carry it.
REQUIRED = {
    "db_client_operation_duration_seconds_count",  # throughput, error rate
    "db_client_operation_duration_seconds_bucket",  # p50/p95/p99 per command and node
    "resilient_cache_command_errors_total",  # errors by type, in-doubt commands
    "resilient_cache_command_retries_total",
    "resilient_cache_breaker_state",
    "resilient_cache_cluster_health",
    "resilient_cache_cluster_nodes",
    "resilient_cache_memory_hits_total",
    "resilient_cache_memory_misses_total",
    "resilient_cache_cache_hits_total",
    "resilient_cache_cache_misses_total",
    "resilient_cache_bulkhead_in_flight",
    "resilient_cache_bulkhead_queued",
    "resilient_cache_bulkhead_rejected_total",
}

IDENTIFIER = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless"}


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as file:
        dashboard: dict[str, Any] = json.load(file)
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside it


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query of every panel."""
    return [(p["title"], t) for p in query_panels(dashboard) for t in p["targets"]]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    return [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers followed by ``{``, ``[``, ``)`` or the
    end, once string literals, label matchers, ranges and ``by (...)`` label lists are blanked
    (so label names never count; a function name is followed by ``(``, so it never does)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = set(re.findall(rf"({IDENTIFIER})\s*(?=[{{\[)]|$)", text))
    return found - KEYWORDS


def variable_metric(query: str) -> str:
    match = re.fullmatch(rf"label_values\(\s*({IDENTIFIER})(\{{[^}}]*\}})?\s*,\s*(\w+)\s*\)", query)
    assert match, f"not a label_values(metric, label) query: {query}"
    return match.group(1)


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, operator, value), ...]) of every selector with matchers."""
    found = []
    for match in re.finditer(rf"({IDENTIFIER})\{{([^}}]*)\}}", expr):
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', match.group(2))
        # Every matcher was understood: nothing but matchers, commas and spaces is left.
        rest = re.sub(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', "", match.group(2))
        assert rest.replace(",", "").strip() == "", f"unparsed matchers in {expr!r}"
        found.append((match.group(1), matchers))
    return found


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    return labels


def all_metric_names(dashboard: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for _, target in expressions(dashboard):
        names |= metric_names(target["expr"])
    return names | {variable_metric(query) for query in variable_queries(dashboard)}


# -- the JSON's structure ---------------------------------------------------------------------


def test_the_dashboard_is_an_importable_grafana_dashboard_over_a_datasource_variable() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 41  # as Grafana 11.6 and later write it
    assert dashboard["uid"] and dashboard["title"] and dashboard["id"] is None
    (ds_input,) = dashboard["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS"
    assert (ds_input["type"], ds_input["pluginId"]) == ("datasource", "prometheus")

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "job", "instance"}
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    assert datasource["current"]["value"] == "${DS_PROMETHEUS}"  # the import input's choice
    for name in ("job", "instance"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
        assert variable["definition"] == variable["query"]["query"]
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"
        assert variable["query"]["query"].endswith(f", {name})")
    assert '{job=~"$job"}' in variables["instance"]["query"]["query"]

    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    rows = [panel for panel in all_panels(dashboard) if panel["type"] == "row"]
    assert rows and all(row["title"] and "targets" not in row for row in rows)

    panels = query_panels(dashboard)
    assert len(panels) >= 15
    for panel in panels:
        title = panel.get("title")
        assert title, f"panel {panel['id']} has no title"
        assert panel["type"] in PANEL_TYPES, (title, panel["type"])
        assert panel.get("description"), f"{title}: no description"
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], f"{title}: no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: refIds repeat"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (title, target["refId"])
            expr = target["expr"]
            assert expr.strip(), (title, target["refId"])
            # Every selector is narrowed by the dashboard's job and instance variables.
            found = selectors(expr)
            assert found, f"{title}: no selector in {expr!r}"
            for metric, matchers in found:
                assert ("job", "=~", "$job") in matchers, (title, metric)
                assert ("instance", "=~", "$instance") in matchers, (title, metric)
            assert metric_names(expr), f"{title}: no metric found in {expr!r}"
            # A legend can only name labels the aggregation keeps.
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend_labels <= grouping_labels(expr), (title, legend_labels, expr)
            # Quantiles come from the buckets, grouped by le.
            for quantile in re.findall(r"histogram_quantile\(([^,]+),", expr):
                assert 0 < float(quantile) < 1, (title, quantile)
                assert "le" in grouping_labels(expr), (title, expr)
                assert all(name.endswith("_bucket") for name in metric_names(expr)), expr

    # No two panels (rows included) on the same cells of the 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]

    used = all_metric_names(dashboard)
    assert used >= REQUIRED, f"not shown: {sorted(REQUIRED - used)}"
    assert used >= APPLICATION_ONLY, sorted(APPLICATION_ONLY - used)

    # In-doubt commands have no metric of their own: the errors counter, filtered on the
    # error.type the metrics stage writes (the exception's __qualname__).
    in_doubt = [
        (metric, matchers)
        for _, target in expressions(dashboard)
        for metric, matchers in selectors(target["expr"])
        if ("error_type", "=", CommandInDoubtError.__qualname__) in matchers
    ]
    assert in_doubt and {metric for metric, _ in in_doubt} == {
        "resilient_cache_command_errors_total"
    }
    # No auto-pipeline batch-size metric exists yet, so no panel may pretend to show one.
    assert not any("batch" in name for name in used)
    assert not any("batch" in panel["title"].lower() for panel in panels)


def test_the_metric_name_extraction() -> None:
    # The extractor the next test trusts, on the forms the dashboard uses.
    expr = (
        'histogram_quantile(0.95, sum by (db_operation_name, le) (rate(a_bucket{job=~"$job", '
        'error_type!="x{y}"}[$__rate_interval]))) / sum(b_total{c="d"}) + count(e) - f'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "e", "f"}
    assert grouping_labels(expr) == {"db_operation_name", "le"}
    assert variable_metric('label_values(g_total{job=~"$job"}, instance)') == "g_total"


# -- every query against real scrapes ---------------------------------------------------------

APP = """
    import asyncio, json, os, sys
    from redis.exceptions import ResponseError
    from resilient_cache import MultiLayerCache, configure_telemetry, create_redis_cluster

    PREFIX = "grafana-dashboard-test:"
    telemetry = configure_telemetry()

    async def main():
        node = os.environ["REDIS_CLUSTER_NODES"].split(",")[0]
        async with create_redis_cluster(health_check_interval=0.2, autoload=False) as cluster:
            cache = MultiLayerCache("dashboard", cluster, redis={"key_prefix": PREFIX})

            async def load():
                return {"v": 1}

            await cache.get_or_set("user", load)  # a miss and a load
            await cache.get_or_set("user", load)  # a memory hit
            await cluster.set(PREFIX + "string", "x", ex=60)
            try:
                await cluster.incr(PREFIX + "string")  # INCRBY on a string: a failed command
            except ResponseError:
                pass
            for scope in (node, "cluster"):  # breaker transitions without a fault: a node's
                cluster.isolate_node(scope)  # and the cluster-wide breaker's, by hand
                cluster.manual_reset_circuit_breaker(scope)
            await cluster.get_stats()
            print(json.dumps({"url": telemetry.prometheus_url}), flush=True)
            sys.stdin.readline()  # scraped now, while the client and the cache are alive
            await cache.delete("user")
            await cluster.delete(PREFIX + "string")
            await cache.aclose()
        telemetry.shutdown()

    asyncio.run(main())
"""


def sample_labels(families: dict[str, Any]) -> dict[str, set[str]]:
    """{sample name (x_total, x_bucket, ...): the labels its samples carry}."""
    labels: dict[str, set[str]] = {}
    for family in families.values():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def scrape_for(url: str, wanted: set[str], timeout: float = 60) -> dict[str, set[str]]:
    """Scrape ``url`` until every name in ``wanted`` is among its samples, or the deadline
    passes; the last scrape either way (the caller's assertion names what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        _, families = scrape(url)
        labels = sample_labels(families)
        if wanted <= set(labels) or time.monotonic() > deadline:
            return labels
        time.sleep(0.2)


def scrape_metrics_serve(cluster_nodes: str, wanted: set[str]) -> dict[str, set[str]]:
    env = clean_env(
        REDIS_CLUSTER_NODES=cluster_nodes,
        REDIS_MEMORY__ENABLED="true",  # the memory tier's counters
        REDIS_STAGES=STAGES,  # the bulkhead's gauges and counter
    )
    child = Child(
        [sys.executable, "-m", "resilient_cache", "metrics", "serve", "--port", "0",
         "--interval", "0.2"],
        env,
    )  # fmt: skip
    try:
        line = child.next_line(timeout=60)
        assert line.startswith("resilient-cache: serving http://127.0.0.1:"), line
        labels = scrape_for(line.split()[2], wanted)
    finally:
        code, err = child.stop(signal.SIGTERM)
    assert code == 0, err
    return labels


def scrape_application(cluster_nodes: str, wanted: set[str]) -> dict[str, set[str]]:
    env = clean_env(
        REDIS_CLUSTER_NODES=cluster_nodes,
        OTEL_SERVICE_NAME="grafana-dashboard-test",
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT="0",
    )
    child = Child([sys.executable, "-c", textwrap.dedent(APP)], env)
    try:
        url = json.loads(child.next_line(timeout=60))["url"]
        labels = scrape_for(url, wanted)
        assert child.process.stdin is not None
        child.process.stdin.write("done\n")
        child.process.stdin.flush()
        child.process.wait(timeout=30)
    finally:
        code, err = child.stop(signal.SIGTERM)
    assert code == 0, err
    return labels


def prometheus_name(instrument: Any) -> str:
    """The series name the OTel Prometheus exporter writes for an instrument: dots become
    underscores, the unit adds its suffix (``s`` -> ``_seconds``; ``1`` and ``{annotations}``
    add nothing), a counter gets ``_total`` (a histogram's series add ``_bucket`` etc.)."""
    unit = re.sub(r"\{[^}]*\}", "", instrument.unit or "")
    name = instrument.name.replace(".", "_") + {"": "", "1": "", "s": "_seconds"}[unit]
    return name + "_total" if isinstance(instrument, Counter) else name


def client_instruments() -> dict[str, Any]:
    """The client's synchronous instruments, as telemetry.Instruments defines them, on a local
    SDK meter provider (the process-wide providers stay at the API's defaults)."""
    provider = MeterProvider()
    try:
        instruments = telemetry.Instruments(provider.get_meter(telemetry.INSTRUMENTATION_NAME))
        return {
            i.name: i
            for i in (
                instruments.duration,
                instruments.retries,
                instruments.errors,
                instruments.transitions,
            )
        }
    finally:
        provider.shutdown()


def test_every_dashboard_query_names_series_the_exporter_writes(cluster_nodes: str) -> None:
    dashboard = load_dashboard()
    used = all_metric_names(dashboard)

    instruments = client_instruments()
    assert isinstance(instruments[telemetry.OPERATION_DURATION], Histogram)
    assert isinstance(instruments[telemetry.RETRIES], Counter)
    # Needs a fault: an attempt that failed with a connection error, a timeout, CLUSTERDOWN or
    # TRYAGAIN and was retried. A healthy dev cluster never retries, so this series is checked
    # against its instrument definition (telemetry.RETRIES) converted to the Prometheus name,
    # not against the scrape; the conversion itself is checked on its sibling instruments below.
    fault_only = {prometheus_name(instruments[telemetry.RETRIES])}
    assert fault_only == {"resilient_cache_command_retries_total"}
    assert fault_only <= used

    serve_expected = used - APPLICATION_ONLY - fault_only
    serve = scrape_metrics_serve(cluster_nodes, serve_expected)
    application = scrape_application(cluster_nodes, APPLICATION_ONLY)
    assert serve_expected <= set(serve), sorted(serve_expected - set(serve))
    assert set(application) >= APPLICATION_ONLY, sorted(APPLICATION_ONLY - set(application))

    scraped: dict[str, set[str]] = {}
    for labels in (serve, application):
        for name, names in labels.items():
            scraped.setdefault(name, set()).update(names)
    missing = used - set(scraped)
    assert missing <= fault_only, f"queried but never exported: {sorted(missing - fault_only)}"

    # The name conversion used for the fault-only series agrees with the exporter on the
    # client's other synchronous instruments (a histogram, {annotation} counters).
    duration = prometheus_name(instruments[telemetry.OPERATION_DURATION])
    assert duration == "db_client_operation_duration_seconds"
    for suffix in ("_bucket", "_count", "_sum"):
        assert duration + suffix in scraped
    for name in (telemetry.ERRORS, telemetry.BREAKER_TRANSITIONS):
        assert prometheus_name(instruments[name]) in scraped, name

    # Every label a query filters or groups on is one the exporter writes on those series (or
    # one Prometheus adds when it scrapes). Skipped for the fault-only series, never scraped.
    for title, target in expressions(dashboard):
        expr = target["expr"]
        for metric, matchers in selectors(expr):
            if metric in fault_only:
                continue
            for label, _, _ in matchers:
                assert label in SCRAPE_LABELS | scraped[metric], (title, metric, label)
        known = set().union(*(scraped.get(m, set()) for m in metric_names(expr)))
        for label in grouping_labels(expr) - SCRAPE_LABELS:
            if metric_names(expr) <= fault_only:
                continue
            assert label in known, (title, label, expr)
