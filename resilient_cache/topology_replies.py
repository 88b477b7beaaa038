"""The cluster's topology replies, read: ``CLUSTER NODES``, ``CLUSTER SHARDS`` and ``CLUSTER
SLOTS`` as node lists (``{host, port, role, failing}``) and as slot coverage (which slots no
node serves, and which primaries lost them), and ``INFO`` as a dict.

:mod:`resilient_cache.health` asks the nodes; this module only reads what they answered, in
RESP2 or RESP3, as ``bytes`` or ``str``. ``TOPOLOGY_COMMANDS`` lists the three commands in the
order a probe tries them (an ACL user may be refused the first ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resilient_cache.backends.failover import replica_can_take_over, slot_ranges
from resilient_cache.slots import TOTAL_SLOTS, SlotRange, merge_ranges


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_cluster_nodes_reply(
    reply: Any, asked: tuple[str, int] | None = None
) -> list[dict[str, Any]]:
    """Turn a ``CLUSTER NODES`` reply into ``{host, port, role, failing}`` dicts.

    redis-py parses the reply into ``{"host:port": {"flags": ..., "connected": ...}}``; the raw
    text form is accepted too. A node that has never been told its address (a fresh one-node
    cluster: ``<id> :17461@27461 myself,master - 0 0 1 connected 0-16383``) shows an empty
    host on its own ``myself`` line: that node is ``asked``, the address the client reached it
    at, which stands in for it.
    """
    if not isinstance(reply, dict):
        reply = _parse_cluster_nodes_text(as_text(reply))
    nodes = []
    for address, entry in reply.items():
        flags = set(as_text(entry.get("flags", "")).split(","))
        if "noaddr" in flags or "handshake" in flags:
            continue
        host, _, port = as_text(address).split("@", 1)[0].rpartition(":")
        if not host and "myself" in flags and asked is not None:
            host, port = asked[0], str(asked[1])
        if not host or not port.isdigit():
            continue
        nodes.append(
            {
                "host": host,
                "port": int(port),
                "role": "primary" if "master" in flags else "replica",
                "failing": bool(flags & {"fail", "fail?"}) or not entry.get("connected", True),
            }
        )
    return sorted(nodes, key=lambda n: (n["host"], n["port"]))


def _parse_cluster_nodes_text(text: str) -> dict[str, dict[str, Any]]:
    """The raw ``CLUSTER NODES`` text in redis-py's parsed form (what this module reads of it)."""
    parsed = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 8:
            parsed[parts[1].split("@", 1)[0]] = {
                "node_id": parts[0],
                "flags": parts[2],
                "master_id": parts[3],
                "connected": parts[7] == "connected",
                # "[slot->-id]" / "[slot-<-id]" are migrations, not assignments.
                "slots": [r.split("-") for r in parts[8:] if not r.startswith("[")],
            }
    return parsed


def _coverage(
    assigned: list[SlotRange], unserved: dict[str, list[SlotRange]]
) -> tuple[list[SlotRange], list[str]]:
    """The uncovered ranges (unassigned, or assigned to ``unserved`` primaries) and those
    primaries' names."""
    gaps, next_slot = [], 0
    for start, end in merge_ranges(assigned):
        if start > next_slot:
            gaps.append((next_slot, start - 1))
        next_slot = max(next_slot, end + 1)
    if next_slot < TOTAL_SLOTS:
        gaps.append((next_slot, TOTAL_SLOTS - 1))
    lost = [r for ranges in unserved.values() for r in ranges]
    return merge_ranges(gaps + lost), sorted(name for name, ranges in unserved.items() if ranges)


def cluster_nodes_coverage(
    reply: Any, asked: tuple[str, int] | None = None
) -> tuple[list[SlotRange], list[str]]:
    """The slots a ``CLUSTER NODES`` reply shows with no serving node, merged into ranges, and
    the failed primaries (``"host:port"``) they belong to; see the module's docstring."""
    if not isinstance(reply, dict):
        reply = _parse_cluster_nodes_text(as_text(reply))
    # The ids of the primaries a replica can take over from (a node never flags itself
    # ``fail``, so the address of a failed one is never the empty one of a "myself" line).
    rescued = {
        entry.get("master_id")
        for entry in reply.values()
        if "master" not in entry.get("flags", "") and replica_can_take_over(entry)
    }
    assigned: list[SlotRange] = []
    unserved: dict[str, list[SlotRange]] = {}
    for address, entry in reply.items():
        flags = entry.get("flags", "").split(",")
        if "master" in flags:
            assigned.extend(slot_ranges(entry))
            if "fail" in flags and entry.get("node_id") not in rescued:
                unserved[as_text(address)] = slot_ranges(entry)
    return _coverage(assigned, unserved)


def cluster_shards_coverage(
    reply: Any, asked: tuple[str, int]
) -> tuple[list[SlotRange], list[str]]:
    """What :func:`cluster_nodes_coverage` gives, from a ``CLUSTER SHARDS`` reply: a shard whose
    primary and every replica are ``health: failed`` has no serving node."""
    assigned: list[SlotRange] = []
    unserved: dict[str, list[SlotRange]] = {}
    for shard in reply or ():
        shard = {as_text(k): v for k, v in shard.items()}
        flat = [int(as_text(b)) for item in shard.get("slots") or () for b in _bounds(item)]
        ranges = list(zip(flat[0::2], flat[1::2], strict=False))
        assigned.extend(ranges)
        nodes = [{as_text(k): v for k, v in node.items()} for node in shard.get("nodes") or ()]
        primaries = [n for n in nodes if as_text(n.get("role")) == "master"]
        if ranges and primaries and all(as_text(n.get("health")) == "failed" for n in nodes):
            node = primaries[0]
            host = as_text(node.get("ip") or node.get("endpoint") or "") or asked[0]
            unserved[f"{host}:{node.get('port') or node.get('tls-port')}"] = ranges
    return _coverage(assigned, unserved)


def _bounds(item: Any) -> Any:
    return item if isinstance(item, list | tuple) else (item,)


def cluster_slots_coverage(reply: Any, asked: tuple[str, int]) -> tuple[list[SlotRange], list[str]]:
    """The slots a ``CLUSTER SLOTS`` reply assigns to no node (it shows no failure flags)."""
    return _coverage([(int(entry[0]), int(entry[1])) for entry in reply or ()], {})


def parse_cluster_shards_reply(reply: Any, asked: tuple[str, int]) -> list[dict[str, Any]]:
    """The nodes of a ``CLUSTER SHARDS`` reply (Redis 7) as :func:`parse_cluster_nodes_reply`
    gives them: the fallback when the user may not run ``CLUSTER NODES``. ``failing`` is its
    ``health: failed``; an empty address is ``asked``'s. When the nodes listen on a plain and a
    TLS port, the kind of port ``asked`` is decides."""
    entries = []
    for shard in reply or ():
        shard = {as_text(k): v for k, v in shard.items()}
        for node in shard.get("nodes") or ():
            entries.append({as_text(k): v for k, v in node.items()})
    kind = "port"
    if any(str(e.get("tls-port")) == str(asked[1]) for e in entries) or not any(
        e.get("port") for e in entries
    ):
        kind = "tls-port"
    nodes = []
    for entry in entries:
        port = entry.get(kind)
        if not port:
            continue
        nodes.append(
            {
                "host": as_text(entry.get("ip") or entry.get("endpoint") or "") or asked[0],
                "port": int(port),
                "role": "primary" if as_text(entry.get("role")) == "master" else "replica",
                "failing": as_text(entry.get("health")) == "failed",
            }
        )
    return sorted(nodes, key=lambda n: (n["host"], n["port"]))


def parse_cluster_slots_reply(reply: Any, asked: tuple[str, int]) -> list[dict[str, Any]]:
    """The nodes of a ``CLUSTER SLOTS`` reply (``[[start, end, [host, port, id, ...],
    [replica...], ...], ...]``) as :func:`parse_cluster_nodes_reply` gives them: the last
    fallback (before Redis 7, or when ``CLUSTER SHARDS`` is refused too). It shows no failure
    flags, and no replica that has not synced yet; an empty host is ``asked``'s."""
    found: dict[tuple[str, int], str] = {}
    for entry in reply or ():
        for index, node in enumerate(entry[2:]):
            host, port = as_text(node[0]) or asked[0], int(node[1])
            role = "primary" if index == 0 else "replica"
            if found.get((host, port)) != "primary":
                found[(host, port)] = role
    return [
        {"host": host, "port": port, "role": role, "failing": False}
        for (host, port), role in sorted(found.items())
    ]


TopologyParser = Callable[[Any, tuple[str, int]], list[dict[str, Any]]]
CoverageParser = Callable[[Any, tuple[str, int]], tuple[list[SlotRange], list[str]]]
#: Where the probe learns the topology (and the slots' coverage), in order: the next is asked
#: when a command is refused (NOPERM) or unknown (CLUSTER SHARDS before Redis 7).
TOPOLOGY_COMMANDS: tuple[tuple[str, TopologyParser, CoverageParser], ...] = (
    ("CLUSTER NODES", parse_cluster_nodes_reply, cluster_nodes_coverage),
    ("CLUSTER SHARDS", parse_cluster_shards_reply, cluster_shards_coverage),
    ("CLUSTER SLOTS", parse_cluster_slots_reply, cluster_slots_coverage),
)


def parse_info(reply: Any) -> dict[str, str]:
    if isinstance(reply, dict):
        return {str(k): as_text(v) for k, v in reply.items()}
    info = {}
    for line in as_text(reply).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key] = value.strip()
    return info
