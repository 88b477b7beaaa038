"""What the cluster says about failovers: whether a failed primary has a replica that can
take over, which slots it serves, and how long the cluster takes to fail over.

The retry stage waits for a failover only while one can come. ``CLUSTER NODES``, read from a
live node with every background re-read of the slot map (and at connect), answers that: a
primary none of whose replicas is linked and free of the ``fail``/``fail?`` flags has nobody
to take over its slots. (Not ``CLUSTER SLOTS``: Redis 7.0 leaves out of it every replica whose
replication offset it has not heard of yet, healthy or not.) And a failover takes about the
cluster's ``cluster-node-timeout`` (until the primary is flagged as failed) plus an election
(0.5-1.5 s after that, more for lower-ranked replicas): so a wait longer than
``2 x cluster-node-timeout + 2 s`` is not a failover any more.
"""

from __future__ import annotations

from typing import Any

from resilient_cache.slots import format_ranges

__all__ = ["FailoverView", "format_ranges", "replica_can_take_over", "slot_ranges"]

#: Seconds added to twice the node timeout for the election and the promotion.
ELECTION_ALLOWANCE = 2.0


class FailoverView:
    """The last ``CLUSTER NODES`` seen (redis-py's parsed form: ``{"host:port": {"node_id",
    "flags", "master_id", "connected", "slots"}}``) and ``cluster-node-timeout``."""

    def __init__(self) -> None:
        self._replicated: dict[str, bool] = {}
        self._ranges: dict[str, list[tuple[int, int]]] = {}
        #: ``cluster-node-timeout`` in seconds, once read (see :meth:`note_node_timeout`).
        self.node_timeout: float | None = None

    def note_node_timeout(self, reply: Any) -> None:
        """Keep ``CONFIG GET cluster-node-timeout``'s answer (milliseconds), if it parses."""
        try:
            value = None
            if isinstance(reply, dict):  # str or bytes keys, as decode_responses has it
                value = reply.get("cluster-node-timeout", reply.get(b"cluster-node-timeout"))
            if isinstance(value, bytes):
                value = value.decode()
            self.node_timeout = int(value) / 1000 if value is not None else None
        except (TypeError, ValueError):
            self.node_timeout = None

    def note_cluster_nodes(self, reply: Any) -> None:
        """Keep which primaries have a replica able to take over, and their slots."""
        if not isinstance(reply, dict):
            return
        names = {info.get("node_id"): name for name, info in reply.items()}
        replicated: dict[str, bool] = {}
        ranges: dict[str, list[tuple[int, int]]] = {}
        for name, info in reply.items():
            flags = str(info.get("flags", ""))
            if "master" in flags:
                ranges[name] = slot_ranges(info)
                if ranges[name]:
                    replicated.setdefault(name, False)
                # else: a primary serving no slot (a failed one whose replica took over, its
                # slots moved): no shard to lose. A client whose slot map still sends commands
                # there will learn the new owner; can_take_over() says None, not False.
            elif "slave" in flags or "replica" in flags:
                master = names.get(info.get("master_id"))
                if master is not None and replica_can_take_over(info):
                    replicated[master] = True
        self._replicated, self._ranges = replicated, ranges

    @property
    def estimate(self) -> float | None:
        """The longest a failover should take, or None while the node timeout is unknown."""
        if self.node_timeout is None:
            return None
        return 2 * self.node_timeout + ELECTION_ALLOWANCE

    def can_take_over(self, primary: str) -> bool | None:
        """Whether ``primary`` (``host:port``) has a replica able to take over; None when the
        last ``CLUSTER NODES`` did not have it as a primary serving slots (or none was read)."""
        return self._replicated.get(primary)

    def slot_ranges(self, primary: str) -> list[tuple[int, int]]:
        """The slot ranges ``primary`` serves, in order."""
        return sorted(self._ranges.get(primary, []))


def replica_can_take_over(info: Any) -> bool:
    """Whether a replica's ``CLUSTER NODES`` entry (redis-py's parsed form) shows it able to
    take over: linked, and flagged neither ``fail``/``fail?`` nor ``nofailover``."""
    return "fail" not in str(info.get("flags", "")) and bool(info.get("connected"))


def slot_ranges(info: Any) -> list[tuple[int, int]]:
    """The slot ranges of a ``CLUSTER NODES`` entry (redis-py's parsed form: ``[["0",
    "5460"], ["5462"]]``, a single slot as a one-item list), in order."""
    ranges = []
    for item in info.get("slots") or ():
        if isinstance(item, str | bytes | int):
            item = [item]
        if item:
            ranges.append((int(item[0]), int(item[-1])))
    return sorted(ranges)
