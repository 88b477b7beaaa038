"""Forming a cluster from fresh servers, and checking that its topology is consistent.

The cluster is formed with redis-py (``CLUSTER MEET``/``ADDSLOTSRANGE``/
``REPLICATE``) rather than ``redis-cli --cluster create``, because ``redis-cli``
is not always installed next to ``redis-server``. The ``*_problems`` functions
return what is still wrong, for :func:`~.waits.poll_until`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis

from resilient_cache.slots import split_slots

from .admin import Admin
from .node import TOTAL_SLOTS, DevNode
from .waits import poll_until

__all__ = ["form_cluster", "format_ranges", "readiness_problems", "split_slots"]

logger = logging.getLogger("resilient_cache.devcluster")

#: For each slot, the port of the node serving it (None: unassigned).
SlotMap = list[int | None]


def format_ranges(slots: Sequence[int]) -> str:
    """Render sorted slot numbers compactly, e.g. ``0-5460,5462``."""
    parts: list[str] = []
    start = prev = -2
    for slot in [*slots, -10]:
        if slot == prev + 1:
            prev = slot
            continue
        if start >= 0:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = slot
    return ",".join(parts)


def _group_slots(owners: Sequence[int | None]) -> dict[int | None, list[int]]:
    grouped: dict[int | None, list[int]] = {}
    for slot, port in enumerate(owners):
        grouped.setdefault(port, []).append(slot)
    return grouped


def form_cluster(admin: Admin, nodes: Sequence[DevNode], primaries: int, deadline: float) -> None:
    """Join fresh ``nodes`` into one cluster: the first ``primaries`` share the slots.

    Each remaining node replicates a primary, round robin. Returns once the
    replicas were told whom to replicate; :func:`readiness_problems` says when
    the result is usable.
    """
    masters = nodes[:primaries]
    replicas = nodes[primaries:]
    ids = {node.port: str(admin.client(node).cluster("MYID")) for node in nodes}
    for epoch, (node, (first, last)) in enumerate(
        zip(masters, split_slots(len(masters)), strict=True), start=1
    ):
        client = admin.client(node)
        # Distinct config epochs up front, as redis-cli does, so the nodes need not
        # resolve epoch collisions one bump at a time after meeting.
        client.cluster("SET-CONFIG-EPOCH", epoch)
        client.cluster("ADDSLOTSRANGE", first, last)
        logger.debug("%s serves slots %d-%d", node.address, first, last)
    # One node introducing itself to all others is enough: gossip does the rest.
    hub = admin.client(nodes[0])
    for node in nodes[1:]:
        hub.cluster("MEET", node.host, node.port)
    poll_until(
        lambda: _gossip_problems(admin, nodes),
        max(1.0, deadline - time.monotonic()),
        "every node to know every other node",
    )
    for index, replica in enumerate(replicas):
        primary = masters[index % len(masters)]
        admin.client(replica).cluster("REPLICATE", ids[primary.port])
        logger.debug("%s replicates %s", replica.address, primary.address)


def _gossip_problems(admin: Admin, nodes: Sequence[DevNode]) -> list[str]:
    problems: list[str] = []
    for node in nodes:
        table = admin.client(node).cluster("NODES")
        # redis-py parses CLUSTER NODES into {address: {"flags": ..., ...}}.
        known = [
            entry
            for entry in table.values()
            if "handshake" not in str(entry.get("flags", ""))
            and "noaddr" not in str(entry.get("flags", ""))
        ]
        if len(known) < len(nodes):
            problems.append(f"{node.address} knows {len(known)}/{len(nodes)} nodes")
    return problems


def readiness_problems(
    admin: Admin, live: Sequence[DevNode], host: str
) -> tuple[list[str], SlotMap | None]:
    """What keeps the cluster of ``live`` nodes from being ready (see ``wait_ready``).

    Returns:
        The problems, and the slot map all live nodes agree on when there are none.
    """
    if not live:
        return ["no node is running"], None
    problems: list[str] = []
    roles: dict[int, tuple[str, int | None]] = {}
    views: dict[int, SlotMap] = {}
    flags: dict[int, dict[int, str]] = {}
    for node in live:
        try:
            info = admin.cluster_info(node)
            role = roles[node.port] = admin.role(node)
            state = info.get("cluster_state")
            if state != "ok":
                problems.append(f"{node.address}: cluster_state:{state}")
            assigned = info.get("cluster_slots_assigned")
            if assigned != str(TOTAL_SLOTS):
                problems.append(f"{node.address}: {assigned}/{TOTAL_SLOTS} slots assigned")
            if role[0] == "replica":
                link = admin.info(node, "replication").get("master_link_status")
                if link != "up":
                    problems.append(
                        f"{node.address}: replica of port {role[1]} has master_link_status:{link}"
                    )
            views[node.port] = admin.slot_owners(node)
            flags[node.port] = admin.gossip_roles(node)
        except redis.RedisError as exc:
            problems.append(f"{node.address}: does not answer admin commands ({exc})")
    if not views:
        return problems, None
    reference_port, reference = next(iter(views.items()))
    for port, view in views.items():
        if view != reference:
            slot = next(s for s in range(TOTAL_SLOTS) if view[s] != reference[s])
            problems.append(
                f"{host}:{port} routes slot {slot} to port {view[slot]} but "
                f"{host}:{reference_port} routes it to port {reference[slot]}"
            )
    for owner, slots in _group_slots(reference).items():
        if owner is None:
            continue  # already reported as unassigned slots
        owner_role = roles.get(owner)
        where = f"slots {format_ranges(slots)} are served by {host}:{owner}"
        if owner_role is None:
            problems.append(f"{where}, which is not running or not answering")
        elif owner_role[0] != "master":
            problems.append(f"{where}, whose role is {owner_role[0]}")
    # Every node's gossip view must show each live node in the role it really has, or a
    # client asking that node (CLUSTER NODES) would see e.g. 4 primaries and 2 replicas.
    for observer, seen in flags.items():
        for port, (actual, _) in roles.items():
            if seen.get(port) not in (None, actual):
                problems.append(
                    f"{host}:{observer} still sees {host}:{port} as "
                    f"{seen.get(port)}, but it is a {actual}"
                )
    return problems, (None if problems else reference)
