"""How the routing stage chooses among a slot's nodes for a read: the strategies, the ``prefer``
patterns of ``zone``, the hedge budget, and the per-call override for read-your-writes paths.

Pure logic on plain node objects (anything with ``name``, ``host`` and ``port``), so every rule
is tested without Redis (``tests/unit/test_routing_policies.py``). The stage
(:mod:`resilient_cache.stages.routing`) gives a policy the slot's primary and the replicas fit
to serve (:meth:`resilient_cache.node_facts.NodeFacts.replica_fits`, open breakers left out);
the policy returns every candidate in the order to try them: the chosen node first, the
primary last (unless it is the chosen one). The rest of the order is where a read goes when
its node's breaker refuses, and where a hedge goes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import random
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Literal, Protocol, get_args

from resilient_cache.node_facts import NodeFacts

#: ``REDIS_ROUTING__STRATEGY``'s values (the routing stage's settings field has this type).
Strategy = Literal[
    "primary",
    "replica_preferred",
    "round_robin",
    "round_robin_replicas",
    "random_replica",
    "latency",
    "zone",
]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

# -- the per-call override ---------------------------------------------------------------------

#: True inside ``with client.primary_reads():`` (for this task and the tasks it starts).
PRIMARY_READS: ContextVar[bool] = ContextVar("resilient_cache_primary_reads", default=False)


@contextlib.contextmanager
def primary_reads() -> Iterator[None]:
    """Send every read to the primary inside the ``with`` block, whatever the strategy: for
    read-your-writes paths (read what this request just wrote). A context variable: it holds
    for the current task and the tasks created inside the block, for every client."""
    token = PRIMARY_READS.set(True)
    try:
        yield
    finally:
        PRIMARY_READS.reset(token)


# -- prefer patterns (zone) --------------------------------------------------------------------


class AddressPattern:
    """One entry of ``prefer``: a CIDR (``10.1.0.0/16``, ``fd00::/8``), a host glob
    (``*.eu-west-1a.internal``, ``10.1.*``) or a ``host:port`` glob (``127.0.0.1:7003``,
    ``redis-a-*:6379``). Globs are case-insensitive; a CIDR matches hosts that are IP addresses
    in it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
        self._glob = text.lower()
        if "/" in text:
            try:
                self._network = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not a valid CIDR (such as 10.1.0.0/16)") from None
        elif not text.strip() or any(c.isspace() for c in text):
            raise ValueError(f"{text!r} is not a host pattern (such as *.zone-a.internal)")

    def matches(self, host: str, port: int) -> bool:
        if self._network is not None:
            try:
                return ipaddress.ip_address(host) in self._network
            except ValueError:
                return False
        host = host.lower()
        return fnmatch.fnmatchcase(host, self._glob) or fnmatch.fnmatchcase(
            f"{host}:{port}", self._glob
        )


def parse_patterns(texts: Sequence[str]) -> list[AddressPattern]:
    """``prefer`` as patterns; ValueError naming the first entry that is none."""
    return [AddressPattern(text) for text in texts]


# -- strategies ----------------------------------------------------------------------------------


class Policy(Protocol):
    def order(self, primary: Any, replicas: list[Any]) -> list[Any]:
        """Every candidate for a read of ``primary``'s slot, the chosen node first. ``replicas``
        are those fit to serve, in slot-map order (a new list the policy may keep or change)."""
        ...


def _rest(chosen: Any, primary: Any, replicas: list[Any]) -> list[Any]:
    """``chosen``, then the other replicas, then the primary (unless chosen)."""
    if chosen is primary:
        return [primary, *replicas]
    return [chosen, *(r for r in replicas if r is not chosen), primary]


class _Turns:
    """A round-robin counter per shard (keyed by its primary's name): reads of interleaved
    shards do not fall into step with one counter for all."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def take(self, primary: Any, count: int) -> int:
        key = primary.name
        turn = self._next.get(key, 0)
        self._next[key] = turn + 1
        return turn % count


class PrimaryOnly:
    def order(self, primary: Any, replicas: list[Any]) -> list[Any]:
        return [primary]


class ReplicaPreferred:
    """The first fit replica in slot-map order (so a client's reads of a shard stay on one
    replica while it fits), the other replicas, then the primary."""

    def order(self, primary: Any, replicas: list[Any]) -> list[Any]:
        replicas.append(primary)
        return replicas


class RoundRobin:
    """Turns over the primary and the fit replicas (``read_from_replicas=true``)."""

    def __init__(self) -> None:
        self._turns = _Turns()

    def order(self, primary: Any, replicas: list[Any]) -> list[Any]:
        if not replicas:
            return [primary]
        turn = self._turns.take(primary, len(replicas) + 1)
        chosen = primary if turn == 0 else replicas[turn - 1]
        return _rest(chosen, primary, replicas)


class RoundRobinReplicas:
    """Turns over the fit replicas; the primary only when none fits."""

    def __init__(self) -> None:
        self._turns = _Turns()

    def order(self, primary: Any, replicas: list[Any]) -> list[Any]:
        if not replicas:
            return [primary]
        chosen = replicas[self._turns.take(primary, len(replicas))]
        return _rest(chosen, primary, replicas)


class RandomReplica:
    """A fit replica at random; the primary only when none fits."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._choice = (rng or random.Random()).choice

    def order(self, primary: Any, replicas: list[Any]) -> list[Any]:
        if not replicas:
            return [primary]
        return _rest(self._choice(replicas), primary, replicas)


#: A node outside the latency band gets one read when its last sample is this old (seconds).
EXPLORE_AFTER = 2.0


class Fastest:
    """The node (primary or fit replica) with the lowest moving-average latency; the nodes
    within ``tolerance`` of it (a ratio: 0.25 means up to 25 % slower) take turns, so
    near-equal nodes share the load. A node with no measurement yet counts as fastest, so every
    node gets measured; a node outside the band whose last sample is :data:`EXPLORE_AFTER`
    seconds old gets one read (its new sample then outweighs its old average), so a node that
    was slow once, or whose first read paid for opening its connection, is tried again. The
    others follow by latency, the primary last."""

    def __init__(
        self, facts: NodeFacts, tolerance: float, clock: Callable[[], float] | None = None
    ) -> None:
        self._latency = facts.latency
        self._sampled_at = facts.sampled_at
        self._ceiling = 1.0 + tolerance
        self._turns = _Turns()
        self._clock = clock
        self._explored: dict[str, float] = {}

    def order(self, primary: Any, replicas: list[Any]) -> list[Any]:
        if not replicas:
            return [primary]
        latency = self._latency
        nodes = [primary, *replicas]
        measured = [(latency(node.name) or 0.0, index) for index, node in enumerate(nodes)]
        best = min(seconds for seconds, _ in measured)
        limit = best * self._ceiling
        band = [nodes[index] for seconds, index in measured if seconds <= limit]
        chosen = self._stale(nodes, measured, limit)
        if chosen is None:
            chosen = band[self._turns.take(primary, len(band))] if len(band) > 1 else band[0]
        others = sorted(
            (item for item in measured if nodes[item[1]] is not chosen and item[1] != 0),
        )
        ordered = [chosen, *(nodes[index] for _, index in others)]
        if chosen is not primary:
            ordered.append(primary)
        return ordered

    def _stale(self, nodes: list[Any], measured: list[tuple[float, int]], limit: float) -> Any:
        """A node outside the band not sampled for :data:`EXPLORE_AFTER` seconds, if any."""
        if self._clock is None:
            return None
        now = self._clock()
        for seconds, index in measured:
            if seconds > limit:
                name = nodes[index].name
                last = max(self._sampled_at(name) or 0.0, self._explored.get(name, 0.0))
                if now - last >= EXPLORE_AFTER:
                    if len(self._explored) >= 65_536:
                        self._explored.clear()
                    self._explored[name] = now  # one read, not every read until it answers
                    return nodes[index]
        return None


class Zone:
    """Nodes whose address matches a ``prefer`` pattern first (taking turns among them, the
    primary included when it matches), then the other fit replicas, then the primary."""

    def __init__(self, patterns: Sequence[AddressPattern]) -> None:
        self._patterns = list(patterns)
        self._preferred: dict[str, bool] = {}  # by node name: addresses do not change
        self._turns = _Turns()
        self._others = _Turns()

    def prefers(self, node: Any) -> bool:
        known = self._preferred.get(node.name)
        if known is None:
            if len(self._preferred) >= 65_536:
                self._preferred.clear()
            known = self._preferred[node.name] = any(
                pattern.matches(str(node.host), int(node.port)) for pattern in self._patterns
            )
        return known

    def order(self, primary: Any, replicas: list[Any]) -> list[Any]:
        prefers = self.prefers
        near = [node for node in (primary, *replicas) if prefers(node)]
        if near:
            chosen = near[self._turns.take(primary, len(near))] if len(near) > 1 else near[0]
        elif replicas:
            chosen = replicas[self._others.take(primary, len(replicas))]
        else:
            return [primary]
        rest = [n for n in near if n is not chosen and n is not primary]
        rest += [n for n in replicas if n is not chosen and not prefers(n)]
        ordered = [chosen, *rest]
        if chosen is not primary:
            ordered.append(primary)
        return ordered


def make_policy(
    strategy: str,
    facts: NodeFacts,
    *,
    tolerance: float = 0.25,
    prefer: Sequence[str] = (),
    rng: random.Random | None = None,
    clock: Callable[[], float] | None = None,
) -> Policy:
    """The policy of ``strategy`` (one of :data:`STRATEGIES`)."""
    makers: dict[str, Callable[[], Policy]] = {
        "primary": PrimaryOnly,
        "replica_preferred": ReplicaPreferred,
        "round_robin": RoundRobin,
        "round_robin_replicas": RoundRobinReplicas,
        "random_replica": lambda: RandomReplica(rng),
        "latency": lambda: Fastest(facts, tolerance, clock),
        "zone": lambda: Zone(parse_patterns(prefer)),
    }
    return makers[strategy]()


# -- the hedge budget ----------------------------------------------------------------------------

#: The sliding window the hedge budget is counted over (seconds), in :data:`HEDGE_BUCKETS` steps.
HEDGE_WINDOW = 10.0
HEDGE_BUCKETS = 10


class HedgeBudget:
    """At most ``share`` of the reads of the last :data:`HEDGE_WINDOW` seconds may be hedged
    (at least one per window, so a quiet client can hedge too). Counted in
    :data:`HEDGE_BUCKETS` buckets on the pipeline clock: constant work per read."""

    def __init__(self, share: float, clock: Callable[[], float]) -> None:
        self.share = share
        self._clock = clock
        self._width = HEDGE_WINDOW / HEDGE_BUCKETS
        self._read_counts = [0] * HEDGE_BUCKETS
        self._hedge_counts = [0] * HEDGE_BUCKETS
        self._bucket = int(clock() // self._width)
        self._reads = 0  # in the window
        self._hedges = 0

    def _advance(self) -> int:
        bucket = int(self._clock() // self._width)
        if bucket != self._bucket:
            for step in range(1, min(bucket - self._bucket, HEDGE_BUCKETS) + 1):
                index = (self._bucket + step) % HEDGE_BUCKETS
                self._reads -= self._read_counts[index]
                self._hedges -= self._hedge_counts[index]
                self._read_counts[index] = self._hedge_counts[index] = 0
            self._bucket = bucket
        return bucket % HEDGE_BUCKETS

    @property
    def reads(self) -> int:
        """Reads that could be hedged in the window now."""
        self._advance()
        return self._reads

    @property
    def hedges(self) -> int:
        """Hedges sent in the window now."""
        self._advance()
        return self._hedges

    def note_read(self) -> None:
        """A read that may be hedged was sent."""
        index = self._advance()
        self._read_counts[index] += 1
        self._reads += 1

    def try_take(self) -> bool:
        """Whether one more hedge fits in the budget now; if so, it is counted."""
        index = self._advance()
        if self._hedges >= max(1.0, self.share * self._reads):
            return False
        self._hedge_counts[index] += 1
        self._hedges += 1
        return True
