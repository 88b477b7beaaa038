"""The ``redis.conf`` text of a dev server: a cluster node or a standalone server."""

from __future__ import annotations

from collections.abc import Sequence

from .node import DevNode

__all__ = ["cluster_node_config", "standalone_config"]


def _quote_config_value(value: str) -> str:
    # redis.conf values are split on spaces unless quoted; paths may contain spaces.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _listen_lines(node: DevNode) -> list[str]:
    return [
        f"port {node.port}",
        f"bind {node.host}",
        # Safe only because we bind loopback; there is no password.
        "protected-mode no",
    ]


def _throwaway_lines(node: DevNode) -> list[str]:
    return [
        # Persistence is pointless for a throwaway server and slows everything.
        "appendonly no",
        'save ""',
        "daemonize no",
        f"dir {_quote_config_value(node.dir)}",
        f"logfile {_quote_config_value(node.log_path)}",
    ]


def _finish(lines: list[str], extra_config: Sequence[str]) -> str:
    if extra_config:
        lines.append("# extra_config")
        lines.extend(extra_config)
    return "\n".join(lines) + "\n"


def cluster_node_config(node: DevNode, node_timeout_ms: int, extra_config: Sequence[str]) -> str:
    """The config of one node of a :class:`DevCluster`, ``extra_config`` lines last."""
    lines = [
        "# Written by resilient_cache.devcluster for a throwaway test node.",
        *_listen_lines(node),
        "cluster-enabled yes",
        "cluster-config-file nodes.conf",
        f"cluster-node-timeout {node_timeout_ms}",
        *_throwaway_lines(node),
        # A replica may always fail over, however long it was disconnected:
        # tests pause and kill nodes on purpose.
        "cluster-replica-validity-factor 0",
        # Keep the topology we built: replicas must not wander to other primaries.
        "cluster-allow-replica-migration no",
        # Full syncs straight over the socket, without waiting for more replicas.
        "repl-diskless-sync yes",
        "repl-diskless-sync-delay 0",
    ]
    return _finish(lines, extra_config)


def standalone_config(node: DevNode, extra_config: Sequence[str]) -> str:
    """The config of a :class:`StandaloneServer` (no cluster), ``extra_config`` lines last."""
    lines = [
        "# Written by resilient_cache.devcluster for a throwaway standalone server.",
        *_listen_lines(node),
        *_throwaway_lines(node),
    ]
    return _finish(lines, extra_config)
