"""The ``redis.conf`` text of a dev server: a cluster node or a standalone server.

A TLS node listens on ``tls-port`` only (``port 0``), and talks TLS on the cluster bus and
for replication too; an ACL cluster's nodes include the cluster's ACL file (see
:mod:`.security`), which alone holds the password.
"""

from __future__ import annotations

from collections.abc import Sequence

from .node import DevNode
from .tls import TlsFiles

__all__ = ["cluster_node_config", "standalone_config"]


def _quote_config_value(value: str) -> str:
    # redis.conf values are split on spaces unless quoted; paths may contain spaces.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _listen_lines(node: DevNode, tls: TlsFiles | None = None) -> list[str]:
    return [
        *([f"port {node.port}"] if tls is None else _tls_lines(node, tls)),
        f"bind {node.host}",
        # Safe only because we bind loopback (a dev cluster may have no password).
        "protected-mode no",
    ]


def _tls_lines(node: DevNode, tls: TlsFiles) -> list[str]:
    return [
        "port 0",  # no plain-text port at all
        f"tls-port {node.port}",
        f"tls-cert-file {_quote_config_value(tls.server_cert)}",
        f"tls-key-file {_quote_config_value(tls.server_key)}",
        f"tls-ca-cert-file {_quote_config_value(tls.ca_cert)}",
        # Clients must present a certificate signed by the cluster's CA.
        "tls-auth-clients yes",
        "tls-replication yes",
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


def cluster_node_config(
    node: DevNode,
    node_timeout_ms: int,
    extra_config: Sequence[str],
    *,
    tls: TlsFiles | None = None,
    acl_file: str | None = None,
) -> str:
    """The config of one node of a :class:`DevCluster`, ``extra_config`` lines last.

    With ``tls`` the node serves TLS only, cluster bus included; with ``acl_file`` it
    includes that ACL file.
    """
    lines = [
        "# Written by resilient_cache.devcluster for a throwaway test node.",
        *_listen_lines(node, tls),
        *([f"include {_quote_config_value(acl_file)}"] if acl_file is not None else []),
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
    if tls is not None:
        lines.append("tls-cluster yes")  # the cluster bus, on tls-port + 10000
    return _finish(lines, extra_config)


def standalone_config(node: DevNode, extra_config: Sequence[str]) -> str:
    """The config of a :class:`StandaloneServer` (no cluster), ``extra_config`` lines last."""
    lines = [
        "# Written by resilient_cache.devcluster for a throwaway standalone server.",
        *_listen_lines(node),
        *_throwaway_lines(node),
    ]
    return _finish(lines, extra_config)
