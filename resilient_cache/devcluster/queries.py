"""Questions about the running cluster: who is primary, who replicates whom, who serves a key.

Roles and slots move with failovers, so every answer is asked of the live
servers at the time of the call.
"""

from __future__ import annotations

import contextlib

import redis

from .admin import Admin
from .errors import DevClusterError
from .node import DevNode, NodeStatus
from .processes import process_alive
from .roster import Roster

__all__ = ["nodes_in_role", "primary_for_key", "replica_of", "status_rows"]


def nodes_in_role(roster: Roster, admin: Admin, role: str) -> list[DevNode]:
    """Live nodes whose current role (per ``ROLE``) is ``role`` ("master"/"replica")."""
    return [node for node in roster.live() if admin.role_or_none(node) == role]


def replica_of(roster: Roster, admin: Admin, primary: DevNode) -> DevNode | None:
    """A live replica currently replicating from ``primary``, or None."""
    primary = roster.own(primary)
    for node in roster.live():
        if node is primary:
            continue
        with contextlib.suppress(redis.RedisError):
            role, of_port = admin.role(node)
            if role == "replica" and of_port == primary.port:
                return node
    return None


def primary_for_key(roster: Roster, admin: Admin, key: str) -> DevNode:
    """The node that currently serves ``key``'s slot, as a live node sees it."""
    errors: list[str] = []
    for observer in roster.live():
        try:
            slot = int(admin.client(observer).cluster("KEYSLOT", key))
            owner = admin.slot_owners(observer)[slot]
        except redis.RedisError as exc:
            errors.append(f"{observer.address}: {exc}")
            continue
        if owner is None:
            raise DevClusterError(f"slot {slot} of key {key!r} is not assigned to any node")
        return roster.by_port(owner)
    raise DevClusterError(
        "no live node could say which node serves the key: " + ("; ".join(errors) or "none")
    )


def status_rows(roster: Roster, admin: Admin) -> list[NodeStatus]:
    """One row per node: address, pid, alive, paused, role and cluster_state."""
    rows: list[NodeStatus] = []
    for node in roster.nodes:
        alive = process_alive(node)
        paused = node.port in roster.paused
        role: str | None = None
        state: str | None = None
        if alive and not paused:
            with contextlib.suppress(redis.RedisError):
                role = admin.role(node)[0]
                state = admin.cluster_info(node).get("cluster_state")
        rows.append(
            NodeStatus(
                address=node.address,
                port=node.port,
                pid=node.pid,
                dir=node.dir,
                alive=alive,
                paused=paused,
                role=role,
                cluster_state=state,
            )
        )
    return rows
