"""The ``resilient-cache`` command (also ``python -m resilient_cache``).

    resilient-cache cluster up|down|status   a throwaway local Redis Cluster
    resilient-cache ping | stats | health    ask the configured cluster
    resilient-cache config                   effective configuration, and where each value is from
    resilient-cache demo                     the failover demo (see `make demo`)
    resilient-cache metrics serve            a Prometheus /metrics endpoint (OpenTelemetry)

Configuration comes from ``REDIS_*`` variables, ``.env`` and ``resilient_cache.toml`` as for the
library. A configuration error exits with status 2 and one line naming the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, SecretStr

from resilient_cache.errors import ConfigurationError, PluginError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resilient-cache",
        description="Resilient asyncio Redis Cluster client: tools and demo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    cluster = sub.add_parser("cluster", help="a throwaway local 6-node Redis Cluster")
    cluster_sub = cluster.add_subparsers(dest="action", required=True)
    up = cluster_sub.add_parser("up", help="start it in the background and print its nodes")
    up.add_argument("--node-timeout", type=int, default=2000, help="cluster-node-timeout (ms)")
    cluster_sub.add_parser("down", help="stop it and remove its files")
    cluster_sub.add_parser("status", help="show its nodes")

    sub.add_parser("ping", help="PING every node of the configured cluster")
    stats = sub.add_parser("stats", help="node counts, roles, memory and clients")
    stats.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("health", help="print healthy/degraded/unhealthy; exit 0 only if healthy")
    sub.add_parser("config", help="effective configuration, secrets masked, with sources")
    demo = sub.add_parser("demo", help="run the failover demo workload")
    demo.add_argument("--duration", type=float, default=20.0, help="seconds (default 20)")
    demo.add_argument("--concurrency", type=int, default=20, help="workers (default 20)")
    demo.add_argument(
        "--no-kill", action="store_true", help="do not kill a primary halfway through"
    )
    metrics = sub.add_parser("metrics", help="the client's OpenTelemetry metrics")
    metrics_sub = metrics.add_subparsers(dest="action", required=True)
    serve = metrics_sub.add_parser(
        "serve",
        help="serve /metrics for Prometheus through the OpenTelemetry exporter, until Ctrl-C",
        description="Connect to the configured cluster, PING it and probe its health every "
        "--interval seconds, and serve the client's OpenTelemetry metrics at "
        "http://HOST:PORT/metrics through the OpenTelemetry Prometheus exporter. "
        "Traces are off unless OTEL_TRACES_EXPORTER is set.",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=None,
        help="port (default: OTEL_EXPORTER_PROMETHEUS_PORT, else 9464; 0 picks a free one)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument(
        "--interval",
        type=_positive_float,
        default=5.0,
        help="seconds between PINGs and health probes (default 5)",
    )
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "cluster":
            return _cluster(args)
        if args.command == "config":
            return _config()
        if args.command == "metrics":
            return _metrics_serve(args)
        if args.command == "demo":
            from resilient_cache.demo import run_demo

            return asyncio.run(
                run_demo(
                    duration=args.duration, concurrency=args.concurrency, kill=not args.no_kill
                )
            )
        return asyncio.run(_ask_cluster(args))
    except (ConfigurationError, PluginError) as err:
        # One line whatever the message holds, and no traceback: exit status 2.
        message = " ".join(str(err).split())
        print(f"resilient-cache: configuration error: {message}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("resilient-cache: interrupted", file=sys.stderr)
        return 130


def _cluster(args: argparse.Namespace) -> int:
    from resilient_cache.devcluster import DevCluster, DevClusterError, default_state_path

    path = default_state_path()
    try:
        if args.action == "up":
            started = time.monotonic()
            cluster = DevCluster(tie_to_parent=False, node_timeout_ms=args.node_timeout)
            cluster.start()
            cluster.save_state(path)
            print(f"cluster up in {time.monotonic() - started:.1f}s; state in {path}")
            print(f"export REDIS_CLUSTER_NODES={cluster.startup_nodes}")
            return 0
        if not path.exists():
            print(f"no local cluster is running (no state file at {path})", file=sys.stderr)
            return 1
        cluster = DevCluster.load_state(path)
        if args.action == "down":
            cluster.stop()
            print("cluster stopped")
            return 0
        for node in cluster.status():
            print("  ".join(f"{key}={value}" for key, value in node.items()))
        return 0
    except DevClusterError as err:
        print(f"resilient-cache: {err}", file=sys.stderr)
        return 1


def _metrics_serve(args: argparse.Namespace) -> int:
    import os

    from opentelemetry.environment_variables import OTEL_TRACES_EXPORTER

    from resilient_cache.exporters import configure_telemetry

    telemetry = configure_telemetry(
        metrics_exporter="prometheus",
        traces_exporter=None if os.environ.get(OTEL_TRACES_EXPORTER) else "none",
        prometheus_host=args.host,
        prometheus_port=args.port,
        default_service_name="resilient-cache",
    )
    try:
        if telemetry.prometheus_url is None:  # only if OTEL_SDK_DISABLED=true
            print("resilient-cache: OTEL_SDK_DISABLED is true; no metrics", file=sys.stderr)
            return EXIT_CONFIG
        return asyncio.run(_serve_metrics(args.interval, telemetry.prometheus_url))
    except KeyboardInterrupt:  # Ctrl-C is how this command is meant to stop
        return 0
    finally:
        telemetry.shutdown()


async def _serve_metrics(interval: float, url: str) -> int:
    import signal

    from redis.exceptions import RedisError

    from resilient_cache.client import RedisClusterClient

    log = logging.getLogger("resilient_cache.cli")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C and SIGTERM end the loop and disconnect cleanly. SIGINT is handled explicitly (as
    # examples/graceful_shutdown.py does): a process started in the background by a script
    # inherits SIGINT *ignored*, and Python's own KeyboardInterrupt would then never come.
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    client = RedisClusterClient(health_check_interval=interval)
    try:
        try:
            await client.connect()
        except (ConnectionError, RedisError) as err:
            print(f"resilient-cache: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        print(f"resilient-cache: serving {url} (Ctrl-C to stop)", flush=True)
        while not stop.is_set():
            try:  # through the pipeline, so the instruments see it
                await client.execute_command("PING")
            except Exception as err:
                log.warning("PING failed: %s: %s", type(err).__name__, err)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        return 0
    finally:
        await client.disconnect()


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********" if value.get_secret_value() else ""
    if isinstance(value, BaseModel):
        return {k: _mask(getattr(value, k)) for k in type(value).model_fields}
    if isinstance(value, dict):
        return {
            k: "**********" if "password" in str(k).lower() else _mask(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return str(value) if not isinstance(value, int | float | bool | str | type(None)) else value


def _config() -> int:
    from resilient_cache.client import RedisClusterClient
    from resilient_cache.settings import describe_sources

    client = RedisClusterClient()  # built, never connected: nothing runs in the background
    settings = client.settings
    origins = dict(describe_sources(type(settings), {}))
    print("# effective configuration (secrets masked); source in brackets")
    for name in type(settings).model_fields:
        value = _mask(getattr(settings, name))
        if isinstance(value, dict) and name in client.stage_specs:
            for field, field_value in value.items():
                key = f"{name}.{field}"
                print(f"{key} = {json.dumps(field_value)}  [{origins.get(key, 'default')}]")
        else:
            print(f"{name} = {json.dumps(value)}  [{origins.get(name, 'default')}]")
    print(f"# active stages (outermost first): {', '.join(client.active_stages)}")
    for name, spec in sorted(client.stage_specs.items()):
        print(f"# stage {name!r} from plugin {spec.plugin!r}")
    return 0


async def _ask_cluster(args: argparse.Namespace) -> int:
    from resilient_cache.client import RedisClusterClient

    client = RedisClusterClient(health_check_interval=0)
    try:
        await client.connect()
        if args.command == "ping":
            failed = 0
            for host, port in client.backend.known_nodes():
                started = time.perf_counter()
                try:
                    await asyncio.wait_for(client.backend.execute_on((host, port), "PING"), 5)
                    print(f"{host}:{port}  PONG  {(time.perf_counter() - started) * 1000:.2f} ms")
                except Exception as err:
                    failed += 1
                    print(f"{host}:{port}  FAILED  {type(err).__name__}: {err}")
            return 1 if failed else 0
        stats = await client.get_stats()
        if args.command == "health":
            print(stats.health)
            return 0 if stats.health == "healthy" else 1
        if args.json:
            print(json.dumps(stats.to_dict(), indent=2))
        else:
            from resilient_cache.health import format_stats

            print(format_stats(stats))
        return 0
    except ConnectionError as err:
        print(f"resilient-cache: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        from redis.exceptions import RedisError

        if isinstance(err, RedisError):
            print(f"resilient-cache: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        raise
    finally:
        await client.disconnect()
