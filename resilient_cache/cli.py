"""The ``resilient-cache`` command (also ``python -m resilient_cache``).

    resilient-cache cluster up|down|status   a throwaway local Redis Cluster
    resilient-cache cluster create|check     form a real Redis Cluster / check one, node by node
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
import shlex
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

    cluster = sub.add_parser(
        "cluster",
        help="a throwaway local 6-node Redis Cluster (up/down/status); form or check a real "
        "one (create/check)",
    )
    cluster_sub = cluster.add_subparsers(dest="action", required=True)
    up = cluster_sub.add_parser(
        "up", help="start it in the background and print the REDIS_* variables of a client"
    )
    up.add_argument("--node-timeout", type=int, default=2000, help="cluster-node-timeout (ms)")
    up.add_argument(
        "--full-coverage",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cluster-require-full-coverage (default: Redis's, yes): with --no-full-coverage "
        "the cluster keeps serving the slots it still covers when a shard is lost",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="TLS only (no plain port), cluster bus and replication included; a CA, a server "
        "and a client certificate are made in the cluster's directory",
    )
    up.add_argument(
        "--acl",
        metavar="USER:PASSWORD",
        type=_acl_user,
        default=None,
        help="turn the default user off: only USER may connect, with PASSWORD",
    )
    cluster_sub.add_parser("down", help="stop it and remove its files")
    cluster_sub.add_parser("status", help="show its nodes")
    _add_cluster_admin_parsers(cluster_sub)

    sub.add_parser("ping", help="PING every node of the configured cluster")
    stats = sub.add_parser("stats", help="node counts, roles, memory and clients")
    stats.add_argument("--json", action="store_true", help="print JSON")
    health = sub.add_parser(
        "health",
        help="print healthy/degraded/unhealthy; exit 0 only if healthy (with --ready: while "
        "the cluster can serve)",
    )
    health.add_argument(
        "--ready",
        action="store_true",
        help="readiness: exit 0 while the cluster serves queries (degraded, or a shard lost "
        "while the others serve, included); non-zero only when it serves none",
    )
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
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: Any) -> None:
    """The subcommands plugins register (``resilient_cache_register_commands``), found through
    the same entry points as their stages. A plugin that fails to load costs its commands only:
    the built-in ones still work, and the failure is one line on stderr."""
    from resilient_cache.plugins import collect_commands, make_plugin_manager

    builtin = list(sub.choices)
    try:
        specs = collect_commands(make_plugin_manager(), builtin)
    except PluginError as err:
        message = " ".join(str(err).split())
        print(f"resilient-cache: plugin commands left out: {message}", file=sys.stderr)
        return
    for spec in specs.values():
        parser = sub.add_parser(
            spec.name, help=spec.help or f"(from plugin {spec.plugin})", description=spec.help
        )
        try:
            spec.configure(parser)
        except Exception as err:
            failure = f"plugin {spec.plugin!r} could not set up command {spec.name!r}: " + (
                f"{type(err).__name__}: {' '.join(str(err).split())}"
            )
            parser.set_defaults(plugin_run=_refuse(failure))
            continue
        parser.set_defaults(plugin_run=spec.run)


def _refuse(failure: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        print(f"resilient-cache: {failure}", file=sys.stderr)
        return EXIT_CONFIG

    return run


def _acl_user(text: str) -> Any:
    from resilient_cache.devcluster.security import AclUser

    try:
        return AclUser.parse(text)
    except ValueError as err:  # never the value itself: it holds the password
        raise argparse.ArgumentTypeError(str(err)) from None


_CLUSTER_ADMIN_EXIT_CODES = """\
exit status:
  0  the cluster is formed and checks out (create) / nothing wrong found (check)
  1  problems found (check), or the cluster did not check out within --timeout (create)
  2  bad arguments or configuration: an address, REDIS_* settings, credentials refused,
     a node not in cluster mode, fewer than 3 primaries
  3  unreachable: nodes did not answer PING within --timeout (create), no address answered
     (check)
  4  refused (create): the nodes hold a partly formed cluster, or data; nothing was changed

Credentials come from REDIS_USERNAME / REDIS_PASSWORD (and TLS from REDIS_SSL*), as for the
client; the password is never printed.
"""


def _add_cluster_admin_parsers(cluster_sub: Any) -> None:
    import textwrap

    formatter = argparse.RawDescriptionHelpFormatter  # keeps the exit status table as it is
    create = cluster_sub.add_parser(
        "create",
        help="form a Redis Cluster from empty nodes (idempotent)",
        description=textwrap.fill(
            "Wait until every address answers PING, then form the cluster: CLUSTER "
            "MEET, the slots spread evenly over the primaries (CLUSTER ADDSLOTSRANGE), replicas "
            "attached with CLUSTER REPLICATE (on another host than their primary when the "
            "addresses name several hosts), and wait until every node reports cluster_state:ok "
            "and the replicas are in sync. "
            "Nodes that already form one cluster are checked, not changed (exit 0 when it checks "
            "out); a partly formed cluster is refused (exit 4).",
            88,
        ),
        epilog=_CLUSTER_ADMIN_EXIT_CODES,
        formatter_class=formatter,
    )
    create.add_argument("addresses", nargs="+", metavar="HOST:PORT", help="every node")
    create.add_argument(
        "--replicas", metavar="N", type=_count, default=1, help="replicas per primary (default 1)"
    )
    create.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=300.0,
        help="seconds for the whole command, waiting for the nodes included (default 300)",
    )
    check = cluster_sub.add_parser(
        "check",
        help="check a Redis Cluster node by node: slots, open slots, agreement, replicas",
        description=textwrap.fill(
            "Ask every node of the cluster HOST:PORT belongs to (the first address "
            "that answers) for its own view. Reports slots no live primary serves, open "
            "(migrating/importing) slots, nodes that disagree on the slot map, the nodes, the "
            "replicas or the config epochs, nodes that fail or do not answer, and each primary's "
            "replicas. Changes nothing.",
            88,
        ),
        epilog=_CLUSTER_ADMIN_EXIT_CODES,
        formatter_class=formatter,
    )
    check.add_argument("addresses", nargs="+", metavar="HOST:PORT", help="one node or more")
    check.add_argument(
        "--replicas",
        metavar="N",
        type=_count,
        default=0,
        help="fewer live replicas than this on a primary is a problem (default 0: counts are "
        "shown, not judged)",
    )


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _cluster_admin(args: argparse.Namespace) -> int:
    """``cluster create`` / ``cluster check``; a configuration error reaches main() (exit 2)."""
    from redis.exceptions import RedisError

    from resilient_cache.cluster_admin import AdminError, ConnectionOptions
    from resilient_cache.config_values import parse_cluster_nodes
    from resilient_cache.settings import find_config_file, load_settings, settings_model

    addresses = parse_cluster_nodes(args.addresses, where=f"cluster {args.action}")
    settings = load_settings(settings_model({}, find_config_file()), {})
    options = ConnectionOptions.from_settings(settings)
    try:
        if args.action == "create":
            from resilient_cache.cluster_create import create_cluster

            return create_cluster(
                addresses,
                options,
                replicas=args.replicas,
                timeout=args.timeout,
                say=lambda line: print(line, flush=True),
            )
        from resilient_cache.cluster_check import check_cluster

        report = check_cluster(addresses, options, min_replicas=args.replicas)
        print(report.text())
        return 0 if report.ok else 1
    except AdminError as err:
        print(f"resilient-cache: cluster {args.action}: {err}", file=sys.stderr)
        return err.exit_code
    except RedisError as err:  # a refused admin command: its reply names no secret
        print(
            f"resilient-cache: cluster {args.action}: {type(err).__name__}: {err}", file=sys.stderr
        )
        return 1


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
        plugin_run = getattr(args, "plugin_run", None)
        if plugin_run is not None:
            return int(plugin_run(args))
        if args.command == "cluster" and args.action in ("create", "check"):
            return _cluster_admin(args)
        if args.command == "cluster":
            return _cluster(args)
        if args.command == "config":
            return _config()
        if args.command == "metrics":
            return _metrics_serve(args)
        if args.command == "demo":
            from resilient_cache import demo

            # On uvloop when it is installed (the [fast] extra): demo.main() says which ran.
            return demo.main(
                duration=args.duration, concurrency=args.concurrency, kill=not args.no_kill
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
            coverage = {None: [], True: ["yes"], False: ["no"]}[args.full_coverage]
            cluster = DevCluster(
                tie_to_parent=False,
                node_timeout_ms=args.node_timeout,
                tls=args.tls,
                acl=args.acl,
                extra_config=[f"cluster-require-full-coverage {value}" for value in coverage],
            )
            cluster.start()
            cluster.save_state(path)
            print(f"cluster up in {time.monotonic() - started:.1f}s; state in {path}")
            for name, value in cluster.client_environment.items():
                print(f"export {name}={shlex.quote(value)}")
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
    from resilient_cache.health import can_serve

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
            # Why the answer may be incomplete (a refused command or credential), on stderr:
            # stdout stays the one word scripts read.
            for problem in stats.problems:
                print(f"resilient-cache: {problem}", file=sys.stderr)
            if getattr(args, "ready", False):
                if can_serve(stats):
                    return 0
                print("resilient-cache: not ready: no primary serves queries", file=sys.stderr)
                return 1
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
