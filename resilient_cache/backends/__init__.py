"""Backends: the last step of the pipeline, the one that talks to Redis.

The client never knows which backend it has; it only calls :meth:`Backend.execute` at the end of
the composed pipeline, and the health monitor uses the few introspection methods below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from resilient_cache.pipeline import Command, NodeRef

if TYPE_CHECKING:
    from resilient_cache.node_facts import NodeFacts


@runtime_checkable
class Backend(Protocol):
    """What a backend provides. The built-in ones wrap redis-py (:mod:`.redis_py`)."""

    #: ``"cluster"``, ``"standalone"``, or a plugin's name: for messages and telemetry only.
    name: str

    # Capabilities: what stages may count on. Decide with these, never by comparing names.

    #: Commands can be sent to a node of choice (``command.node``), and :meth:`route` maps
    #: keys to nodes: a cluster. False for a single server (routing then has nothing to do).
    routes_per_node: bool

    async def connect(self) -> None:
        """Open connections and learn the topology; raise redis-py's ``ConnectionError`` (with
        the nodes tried named in the message) when no node answers."""

    async def aclose(self) -> None:
        """Close every connection. Idempotent."""

    async def execute(self, command: Command) -> Any:
        """Send one command (to ``command.node`` when routing chose one) and return the reply.
        Must not retry on its own: retries belong to the retry stage."""

    def route(self, command: Command, replica: bool = False) -> NodeRef | None:
        """The node that serves ``command``'s keys in the current slot map, or ``None`` when the
        backend should decide (no keys, keys in several slots, a single-node backend)."""

    @property
    def topology_stale(self) -> bool:
        """True after a connection error or redirect storm: refresh before routing again."""

    def request_refresh(self) -> None:
        """Have the slot map re-read in the background, without waiting for it (one at a time,
        rate-limited by the backend); a no-op for single-node backends."""

    async def refresh_topology(self) -> None:
        """Re-read the slot map from the cluster."""

    def known_nodes(self) -> list[tuple[str, int]]:
        """Addresses of every node the backend knows of (for health checks)."""

    async def execute_on(self, address: tuple[str, int], *args: Any) -> Any:
        """Run one administrative command on one node, outside the pipeline (health checks)."""

    # Optional (getattr with a default): a backend that cannot tell answers None / "".

    def failover_possible(self, node: str) -> bool | None:
        """Whether a replica can take over from the failed primary ``node`` ("host:port"):
        False when the slot map lists none, None when unknown."""

    @property
    def failover_estimate(self) -> float | None:
        """The longest a failover of this cluster should take (seconds), or None if unknown."""

    def slots_of(self, node: str) -> str:
        """The slot ranges ``node`` serves, as ``"0-5460,10923-16383"`` (for error messages)."""

    def enable_replica_reads(self) -> None:
        """Prepare connections to replicas for reads (``READONLY``), before :meth:`connect`.
        Called by a routing stage that will route reads to replicas; a no-op without them.
        From then on a batch's commands go to the node routing chose for the batch (or each
        to its primary), never where the backend's own client would balance them."""

    def slot_nodes(self, command: Command) -> Sequence[NodeRef] | None:
        """Every node serving the one slot of ``command``'s keys in the current slot map: the
        primary first, then its replicas (the list may be the backend's own: read it, never
        change it). ``None`` where :meth:`route` would not place the command on one slot (no
        keys, keys in several slots, an explicit ``target_nodes=``, a transaction, no slot map
        yet). The routing strategies other than ``primary`` need it (docs/routing.md)."""

    #: What is known of each node (latency, replica lag and link), shared by the health probe,
    #: which fills it, and the routing stage, which reads it
    #: (:class:`resilient_cache.node_facts.NodeFacts`); absent when the backend keeps none.
    node_facts: NodeFacts

    @property
    def raw(self) -> Any:
        """The underlying client object (``get_cluster()`` returns it)."""
