"""Admin connections to single nodes, and the parsed replies of the admin commands asked.

Everything the package learns from a server (``INFO``, ``CLUSTER INFO``,
``ROLE``, ``CLUSTER SLOTS``, ``CLUSTER NODES``) is asked through :class:`Admin`, whose
clients carry the cluster's TLS and ACL options (see :mod:`.security`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .node import TOTAL_SLOTS, DevNode

__all__ = ["Admin"]


class Admin:
    """One cached synchronous client per node port, and queries through them."""

    def __init__(self) -> None:
        self._clients: dict[int, redis.Redis] = {}
        self._options: dict[str, Any] = {}

    def configure(self, options: Mapping[str, Any]) -> None:
        """Connect with these redis-py options from now on (TLS files, user name, password)."""
        self.close_all()
        self._options = dict(options)

    def client(self, node: DevNode) -> redis.Redis:
        """A client for ``node`` (see :meth:`DevCluster.admin`), cached per port."""
        client = self._clients.get(node.port)
        if client is None:
            client = redis.Redis(
                host=node.host,
                port=node.port,
                # Short timeouts and no retries, so a dead or paused node fails fast
                # instead of stalling a poll loop.
                socket_connect_timeout=1.0,
                socket_timeout=2.0,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
                **self._options,
            )
            self._clients[node.port] = client
        return client

    def drop(self, node: DevNode) -> None:
        """Close and forget ``node``'s client (its server died or is restarting)."""
        client = self._clients.pop(node.port, None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def close_all(self) -> None:
        """Close every client."""
        for port in list(self._clients):
            client = self._clients.pop(port)
            with contextlib.suppress(Exception):
                client.close()

    def info(self, node: DevNode, section: str | None = None) -> dict[str, Any]:
        """``INFO`` (or one section of it) of ``node``, parsed into a dict."""
        result = self.client(node).info(section) if section else self.client(node).info()
        return dict(result)

    def cluster_info(self, node: DevNode) -> dict[str, str]:
        """``CLUSTER INFO`` of ``node`` as ``{"cluster_state": "ok", ...}``."""
        raw = self.client(node).cluster("INFO")
        if isinstance(raw, dict):
            return {str(key): str(value) for key, value in raw.items()}
        # Older redis-py versions return the raw text.
        fields = (line.split(":", 1) for line in str(raw).splitlines() if ":" in line)
        return {key.strip(): value.strip() for key, value in fields}

    def role(self, node: DevNode) -> tuple[str, int | None]:
        """("master", None) or ("replica", port of its primary), from ``ROLE``."""
        reply = self.client(node).role()
        kind = str(reply[0])
        if kind == "slave":
            return "replica", int(reply[2])
        return kind, None

    def role_or_none(self, node: DevNode) -> str | None:
        """The role of ``node``, or None when it does not answer."""
        try:
            return self.role(node)[0]
        except redis.RedisError:
            return None

    def slot_owners(self, observer: DevNode) -> list[int | None]:
        """For each slot, the port of its primary as ``observer`` sees it."""
        owners: list[int | None] = [None] * TOTAL_SLOTS
        # CLUSTER SLOTS: [[first, last, [ip, port, id, ...], replicas...], ...]
        for entry in self.client(observer).cluster("SLOTS"):
            first, last, primary = int(entry[0]), int(entry[1]), entry[2]
            owners[first : last + 1] = [int(primary[1])] * (last - first + 1)
        return owners

    def gossip_roles(self, observer: DevNode) -> dict[int, str]:
        """Each node's role ("master"/"replica") as ``observer``'s CLUSTER NODES shows it."""
        text = str(self.client(observer).execute_command("CLUSTER", "NODES"))
        seen: dict[int, str] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3 or "@" not in parts[1]:
                continue
            port = int(parts[1].split("@", 1)[0].rpartition(":")[2])
            node_flags = parts[2].split(",")
            if "master" in node_flags:
                seen[port] = "master"
            elif "slave" in node_flags:
                seen[port] = "replica"
        return seen
