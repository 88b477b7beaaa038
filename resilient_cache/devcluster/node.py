"""The record of one ``redis-server`` (:class:`DevNode`), its status row and cluster constants.

A leaf module: every other module of the package passes these around.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from typing import TypedDict

from resilient_cache.slots import TOTAL_SLOTS

__all__ = ["BUS_PORT_OFFSET", "TOTAL_SLOTS", "DevNode", "NodeStatus"]

#: Redis Cluster listens for its node-to-node bus on the client port + 10000.
BUS_PORT_OFFSET = 10000


class NodeStatus(TypedDict):
    """One row of :meth:`DevCluster.status`, shaped for a CLI table or JSON."""

    address: str
    port: int
    pid: int
    dir: str
    alive: bool
    paused: bool
    role: str | None  # "master", "replica" or None when the node does not answer
    cluster_state: str | None  # "ok", "fail" or None when the node does not answer


@dataclasses.dataclass(eq=False)
class DevNode:
    """One ``redis-server`` of a :class:`DevCluster` (or a :class:`StandaloneServer`).

    Nodes compare by identity: a cluster hands out the same objects for its whole
    life and updates ``pid``/``process`` in place when a node is restarted.
    """

    host: str
    port: int
    pid: int
    dir: str
    #: The live child process, or None when the cluster was loaded from a state
    #: file (then only ``pid`` is known) or the node has not been spawned yet.
    process: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``host:port``, the form used in ``REDIS_CLUSTER_NODES``."""
        return f"{self.host}:{self.port}"

    @property
    def bus_port(self) -> int:
        """The cluster bus port this node listens on."""
        return self.port + BUS_PORT_OFFSET

    @property
    def config_path(self) -> str:
        """The ``redis.conf`` this node was started with."""
        return os.path.join(self.dir, "redis.conf")

    @property
    def log_path(self) -> str:
        """The Redis log file (``logfile`` in the config)."""
        return os.path.join(self.dir, "redis.log")

    @property
    def stdout_path(self) -> str:
        """Where the server's stdout/stderr go (config errors appear here)."""
        return os.path.join(self.dir, "stdout.log")
