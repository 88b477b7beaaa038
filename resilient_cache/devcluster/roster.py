"""Which nodes a cluster has, and which of them are live (running and not paused)."""

from __future__ import annotations

from .errors import DevClusterError
from .node import DevNode
from .processes import process_alive

__all__ = ["Roster"]


class Roster:
    """The nodes of one cluster in start order (initial primaries first), and the paused ones."""

    def __init__(self) -> None:
        self.nodes: list[DevNode] = []
        self.paused: set[int] = set()  # ports of nodes stopped with SIGSTOP

    def by_port(self, port: int) -> DevNode:
        """The node listening on ``port``."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise DevClusterError(f"no node of this cluster listens on port {port}")

    def own(self, node: DevNode) -> DevNode:
        """Our own object for ``node``, which may come from another handle on the cluster."""
        # Accept a node from another handle on the same cluster (e.g. load_state),
        # but always act on our own object so pid/process stay in sync.
        return node if node in self.nodes else self.by_port(node.port)

    def is_live(self, node: DevNode) -> bool:
        """Running and not paused."""
        return node.port not in self.paused and process_alive(node)

    def live(self) -> list[DevNode]:
        """The live nodes, in start order."""
        return [node for node in self.nodes if self.is_live(node)]
