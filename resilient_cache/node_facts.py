"""What is known about each node, for routing: latency, and a replica's fitness to serve reads.

One :class:`NodeFacts` table per client, kept by the backend (``backend.node_facts``), so the two
parts that fill it and the one that reads it share it without knowing each other:

- the routing stage records the round trip of every read it routes (:meth:`NodeFacts.observe`);
- the health probe (:func:`resilient_cache.health.collect_stats`, every
  ``health_check_interval``) records what each node's ``INFO`` said and how long a ``PING``
  took (:meth:`NodeFacts.note_probe`);
- the routing stage asks which replicas may serve a read (:meth:`NodeFacts.replica_fits`),
  which node is fastest (:meth:`NodeFacts.latency`) and a node's recent latency percentile
  (:meth:`NodeFacts.percentile`, for hedged reads).

Nodes are named ``"host:port"`` as the client reaches them (redis-py's ``ClusterNode.name``).
Pure bookkeeping: no I/O, no clock of its own, nothing awaited, so updates are atomic under
asyncio.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

#: Weight of a new sample in a node's moving average (EWMA): about the last 10 samples count.
EWMA_ALPHA = 0.2
#: Seconds over which an old average fades: a sample after a pause of ``t`` seconds weighs at
#: least ``1 - exp(-t / EWMA_DECAY)`` (0.86 after 2 s), so a node not read from for a while is
#: judged on its new samples, not on what it was (Finagle's peak EWMA decays the same way).
EWMA_DECAY = 1.0
#: Recent round trips kept per node for its percentiles.
LATENCY_WINDOW = 200
#: Fewest samples a percentile is given from; with fewer, :meth:`NodeFacts.percentile` is None.
MIN_PERCENTILE_SAMPLES = 20
#: A node's percentiles are recomputed after this many new samples (not on every read).
PERCENTILE_EVERY = 20


class NodeRecord:
    """The facts about one node. ``usable`` is False when the last probe found the node not
    answering, flagged failing, loading its data set, or (a replica) with its link to the
    primary down. ``offset`` is its replication offset as of that probe (a primary's
    ``master_repl_offset``, a replica's ``slave_repl_offset``)."""

    __slots__ = (
        "_percentiles",
        "_since_computed",
        "at",
        "ewma",
        "offset",
        "samples",
        "served_since_probe",
        "usable",
        "why_not",
    )

    def __init__(self) -> None:
        self.ewma: float | None = None
        #: When the last command sample came (the pipeline clock), None before any.
        self.at: float | None = None
        self.samples: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.served_since_probe = False
        self.usable = True
        self.why_not: str | None = None
        self.offset: int | None = None
        self._percentiles: dict[float, float] = {}
        self._since_computed = 0


class NodeFacts:
    """Per-node latency and replica health, shared by the health probe and the routing stage."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        #: Probes recorded so far.
        self.probes = 0

    def _record(self, name: str) -> NodeRecord:
        record = self.nodes.get(name)
        if record is None:
            record = self.nodes[name] = NodeRecord()
        return record

    # -- latency ---------------------------------------------------------------------------

    def observe(self, name: str, seconds: float, now: float | None = None) -> None:
        """A command's round trip to ``name`` (seconds), ended at ``now`` (the pipeline clock;
        without it, the sample weighs :data:`EWMA_ALPHA` whatever the time since the last)."""
        record = self.nodes.get(name) or self._record(name)
        ewma = record.ewma
        if ewma is None:
            record.ewma = seconds
        else:
            weight = EWMA_ALPHA
            if now is not None and record.at is not None and now - record.at > 0.2:
                weight = max(weight, 1.0 - math.exp((record.at - now) / EWMA_DECAY))
            record.ewma = ewma + weight * (seconds - ewma)
        if now is not None:
            record.at = now
        record.samples.append(seconds)
        record.served_since_probe = True
        record._since_computed += 1

    def observe_at_least(self, name: str, seconds: float, now: float | None = None) -> None:
        """A command to ``name`` given up after ``seconds`` (cancelled, for example because a
        hedge answered first): its round trip was at least that long. Only ever raises the
        estimate, so a caller that gives up early never makes a node look fast."""
        record = self.nodes.get(name)
        if record is not None and record.ewma is not None and seconds <= record.ewma:
            return
        self.observe(name, seconds, now)

    def sampled_at(self, name: str) -> float | None:
        """When the node's last command sample came (the pipeline clock), or None."""
        record = self.nodes.get(name)
        return None if record is None else record.at

    def latency(self, name: str) -> float | None:
        """The node's moving-average round trip (seconds), or None before any sample."""
        record = self.nodes.get(name)
        return None if record is None else record.ewma

    def percentile(self, name: str, q: float) -> float | None:
        """The ``q`` quantile (0.95 for p95) of the node's last :data:`LATENCY_WINDOW` round
        trips, or None with fewer than :data:`MIN_PERCENTILE_SAMPLES`. Recomputed every
        :data:`PERCENTILE_EVERY` samples."""
        record = self.nodes.get(name)
        if record is None or len(record.samples) < MIN_PERCENTILE_SAMPLES:
            return None
        value = record._percentiles.get(q)
        if value is None or record._since_computed >= PERCENTILE_EVERY:
            if record._since_computed >= PERCENTILE_EVERY:
                record._percentiles.clear()
                record._since_computed = 0
            ordered = sorted(record.samples)
            value = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
            record._percentiles[q] = value
        return value

    # -- replica health --------------------------------------------------------------------

    def replica_fits(self, replica: str, primary: str, max_lag: int | None) -> bool:
        """Whether ``replica`` may serve reads for ``primary``'s slots, as of the last probe:
        usable, and (when ``max_lag`` is given and both offsets are known) no more than
        ``max_lag`` bytes of replication stream behind. A node no probe has seen yet fits."""
        record = self.nodes.get(replica)
        if record is None:
            return True
        if not record.usable:
            return False
        if max_lag is None or record.offset is None:
            return True
        head = self.nodes.get(primary)
        if head is None or head.offset is None:
            return True
        return head.offset - record.offset <= max_lag

    def lag(self, replica: str, primary: str) -> int | None:
        """Bytes of replication stream ``replica`` was behind ``primary`` at the last probe."""
        record, head = self.nodes.get(replica), self.nodes.get(primary)
        if record is None or head is None or record.offset is None or head.offset is None:
            return None
        return max(0, head.offset - record.offset)

    def note_probe(self, nodes: Iterable[Any]) -> None:
        """Record one health probe: ``nodes`` are :class:`~resilient_cache.health.NodeStats`
        (``host``, ``port``, ``status``, ``role``, ``loading``, ``link_up``,
        ``replication_offset``, ``latency``).

        A node that served no routed command since the previous probe takes the probe's
        ``PING`` round trip as its latency (it is then tried again if it became fast); one that
        did gets it averaged in like any sample."""
        self.probes += 1
        for node in nodes:
            record = self._record(f"{node.host}:{node.port}")
            why_not = None
            if node.status != "connected":
                why_not = node.status
            elif node.loading:
                why_not = "loading"
            elif node.role == "replica" and node.link_up is False:
                why_not = "master_link_status:down"
            record.usable = why_not is None
            record.why_not = why_not
            record.offset = node.replication_offset if why_not is None else None
            latency = node.latency
            if latency is not None:
                if record.served_since_probe and record.ewma is not None:
                    record.ewma += EWMA_ALPHA * (latency - record.ewma)
                else:
                    record.ewma = latency
            record.served_since_probe = False
