"""The read strategies, the prefer patterns, the hedge budget and the node facts: pure logic on
fake nodes, latencies and replication offsets (resilient_cache/routing_policies.py,
resilient_cache/node_facts.py)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from resilient_cache.health import NodeStats, collect_stats
from resilient_cache.node_facts import MIN_PERCENTILE_SAMPLES, PERCENTILE_EVERY, NodeFacts
from resilient_cache.routing_policies import (
    PRIMARY_READS,
    STRATEGIES,
    AddressPattern,
    HedgeBudget,
    make_policy,
    primary_reads,
)
from tests.unit.test_health import ScriptedBackend


@dataclass(frozen=True, eq=False)
class Node:
    host: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


P = Node("10.0.1.1", 7000)  # the primary
R1 = Node("10.0.2.1", 7003)
R2 = Node("10.0.3.1", 7004)


def names(nodes: list[Any]) -> list[str]:
    return [node.name for node in nodes]


def first_choices(policy: Any, replicas: list[Any], reads: int = 300) -> Counter[str]:
    return Counter(policy.order(P, list(replicas))[0].name for _ in range(reads))


# -- every strategy: the chosen node first, the primary last ---------------------------------


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "primary"])
def test_every_order_holds_each_candidate_once_and_the_primary_last_unless_chosen(
    strategy: str,
) -> None:
    policy = make_policy(strategy, NodeFacts(), prefer=["10.0.3.*"], rng=random.Random(1))
    for _ in range(20):
        order = policy.order(P, [R1, R2])
        assert sorted(names(order)) == sorted(names([P, R1, R2]))
        assert order[0] is P or order[-1] is P


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_with_no_fit_replica_every_strategy_reads_from_the_primary(strategy: str) -> None:
    policy = make_policy(strategy, NodeFacts(), prefer=["10.0.3.*"])
    assert policy.order(P, []) == [P]


def test_primary_strategy_never_offers_a_replica() -> None:
    assert make_policy("primary", NodeFacts()).order(P, [R1, R2]) == [P]


def test_replica_preferred_sticks_to_the_first_fit_replica() -> None:
    policy = make_policy("replica_preferred", NodeFacts())
    assert first_choices(policy, [R1, R2]) == Counter({R1.name: 300})
    assert names(policy.order(P, [R1, R2])) == names([R1, R2, P])
    assert names(policy.order(P, [R2])) == names([R2, P])  # R1 unfit: the next one


def test_round_robin_takes_turns_over_the_primary_and_the_replicas() -> None:
    policy = make_policy("round_robin", NodeFacts())
    assert first_choices(policy, [R1, R2]) == Counter({P.name: 100, R1.name: 100, R2.name: 100})
    # The primary, when chosen, is first; otherwise last.
    orders = [names(policy.order(P, [R1, R2])) for _ in range(3)]
    assert orders == [names([P, R1, R2]), names([R1, R2, P]), names([R2, R1, P])]


def test_round_robin_replicas_never_chooses_the_primary_while_a_replica_fits() -> None:
    policy = make_policy("round_robin_replicas", NodeFacts())
    assert first_choices(policy, [R1, R2]) == Counter({R1.name: 150, R2.name: 150})


def test_round_robin_counts_turns_per_shard() -> None:
    """Reads of two shards interleaved still spread over each shard's replicas."""
    policy = make_policy("round_robin_replicas", NodeFacts())
    other_primary, o1, o2 = Node("10.9.0.1", 7001), Node("10.9.0.2", 7005), Node("10.9.0.3", 7006)
    seen: Counter[str] = Counter()
    for _ in range(100):
        seen[policy.order(P, [R1, R2])[0].name] += 1
        seen[policy.order(other_primary, [o1, o2])[0].name] += 1
    assert seen == Counter({R1.name: 50, R2.name: 50, o1.name: 50, o2.name: 50})


def test_random_replica_uses_every_fit_replica_and_never_the_primary() -> None:
    policy = make_policy("random_replica", NodeFacts(), rng=random.Random(7))
    seen = first_choices(policy, [R1, R2], reads=1000)
    assert set(seen) == {R1.name, R2.name}
    assert 400 < seen[R1.name] < 600


# -- latency -------------------------------------------------------------------------------------


def test_latency_reads_from_the_fastest_node() -> None:
    facts = NodeFacts()
    for _ in range(10):
        facts.observe(P.name, 0.004)
        facts.observe(R1.name, 0.001)
        facts.observe(R2.name, 0.009)
    policy = make_policy("latency", facts, tolerance=0.25)
    assert first_choices(policy, [R1, R2]) == Counter({R1.name: 300})
    # Then by latency, the primary last.
    assert names(policy.order(P, [R1, R2])) == names([R1, R2, P])


def test_latency_nodes_within_the_tolerance_share_the_reads() -> None:
    facts = NodeFacts()
    facts.observe(P.name, 0.0010)
    facts.observe(R1.name, 0.0011)  # 10 % slower: inside a 25 % band
    facts.observe(R2.name, 0.0013)  # 30 % slower: outside
    policy = make_policy("latency", facts, tolerance=0.25)
    assert first_choices(policy, [R1, R2]) == Counter({P.name: 150, R1.name: 150})
    wide = make_policy("latency", facts, tolerance=0.5)
    assert first_choices(wide, [R1, R2]) == Counter({P.name: 100, R1.name: 100, R2.name: 100})
    exact = make_policy("latency", facts, tolerance=0.0)
    assert first_choices(exact, [R1, R2]) == Counter({P.name: 300})


def test_latency_tries_a_node_never_measured_first() -> None:
    facts = NodeFacts()
    facts.observe(P.name, 0.001)
    facts.observe(R1.name, 0.001)
    policy = make_policy("latency", facts, tolerance=0.25)
    assert policy.order(P, [R1, R2])[0] is R2


def test_a_slow_node_recovers_through_the_health_probes() -> None:
    """A node routing avoids gets no command samples; the probe's PING time replaces its
    average once it served nothing since the previous probe."""
    facts = NodeFacts()
    for _ in range(5):
        facts.observe(P.name, 0.001)
    facts.observe(R1.name, 0.300)  # one read stuck on a slow replica
    policy = make_policy("latency", facts, tolerance=0.25)
    assert policy.order(P, [R1])[0] is P
    fast = [_stats(P, latency=0.001), _stats(R1, role="replica", latency=0.001)]
    facts.note_probe(fast)  # R1 served since the last probe: averaged in, still slow
    assert facts.latency(R1.name) == pytest.approx(0.300 + 0.2 * (0.001 - 0.300))
    assert policy.order(P, [R1])[0] is P
    facts.note_probe(fast)  # served nothing since: the probe's time stands
    assert facts.latency(R1.name) == pytest.approx(0.001)
    assert {policy.order(P, [R1])[0].name for _ in range(4)} == {P.name, R1.name}


def test_a_node_outside_the_band_is_tried_again_after_a_while(clock) -> None:
    """Its first read paid for opening a connection (or it was slow once): two seconds later
    it gets one read, whose sample then outweighs the old average."""
    facts = NodeFacts()
    facts.observe(P.name, 0.0002, clock())
    facts.observe(R1.name, 0.0030, clock())  # connect + handshake on its first read
    policy = make_policy("latency", facts, tolerance=0.25, clock=clock)
    assert first_choices(policy, [R1], reads=20) == Counter({P.name: 20})
    explorations = 0
    while R1.name not in first_choices(policy, [R1], reads=4):
        clock.advance(2.0)
        facts.observe(P.name, 0.0002, clock())
        assert names(policy.order(P, [R1])) == names([R1, P])  # one exploring read ...
        assert policy.order(P, [R1])[0] is P  # ... not one per read until it answers
        facts.observe(R1.name, 0.0002, clock())  # it answers fast now
        explorations += 1
    assert explorations <= 3
    assert facts.latency(R1.name) <= 0.0002 * 1.25


def test_samples_close_together_weigh_the_same() -> None:
    facts = NodeFacts()
    facts.observe(R1.name, 0.001, 10.0)
    facts.observe(R1.name, 0.002, 10.1)
    assert facts.latency(R1.name) == pytest.approx(0.001 + 0.2 * 0.001)
    assert facts.sampled_at(R1.name) == 10.1


def test_a_cancelled_read_only_ever_raises_the_estimate() -> None:
    facts = NodeFacts()
    facts.observe(R1.name, 0.010)
    facts.observe_at_least(R1.name, 0.001)  # the caller gave up early: says nothing
    assert facts.latency(R1.name) == pytest.approx(0.010)
    facts.observe_at_least(R1.name, 0.110)  # cancelled after 110 ms: at least that slow
    assert facts.latency(R1.name) == pytest.approx(0.010 + 0.2 * 0.100)
    facts.observe_at_least(R2.name, 0.005)  # nothing known yet: taken
    assert facts.latency(R2.name) == pytest.approx(0.005)


def test_percentiles_need_enough_samples_and_follow_the_window() -> None:
    facts = NodeFacts()
    for index in range(MIN_PERCENTILE_SAMPLES - 1):
        facts.observe(R1.name, 0.001 * (index + 1))
    assert facts.percentile(R1.name, 0.95) is None
    facts.observe(R1.name, 0.020)  # 20 samples: 1..20 ms
    assert facts.percentile(R1.name, 0.95) == pytest.approx(0.019)
    assert facts.percentile(R1.name, 0.99) == pytest.approx(0.020)
    for _ in range(PERCENTILE_EVERY):
        facts.observe(R1.name, 0.500)
    assert facts.percentile(R1.name, 0.95) == pytest.approx(0.500)
    assert facts.percentile("unknown:1", 0.95) is None


# -- zone ---------------------------------------------------------------------------------------


def test_zone_prefers_matching_nodes_then_other_replicas_then_the_primary() -> None:
    policy = make_policy("zone", NodeFacts(), prefer=["10.0.3.0/24"])
    assert first_choices(policy, [R1, R2]) == Counter({R2.name: 300})
    assert names(policy.order(P, [R1, R2])) == names([R2, R1, P])
    # The preferred replica unfit: the other replicas take turns, the primary last.
    assert first_choices(policy, [R1]) == Counter({R1.name: 300})
    assert names(policy.order(P, [R1])) == names([R1, P])


def test_zone_takes_the_primary_when_it_matches() -> None:
    policy = make_policy("zone", NodeFacts(), prefer=["10.0.1.*"])
    assert first_choices(policy, [R1, R2]) == Counter({P.name: 300})
    assert names(policy.order(P, [R1, R2])) == names([P, R1, R2])


def test_zone_matching_nodes_take_turns() -> None:
    policy = make_policy("zone", NodeFacts(), prefer=["10.0.2.1", "10.0.3.1"])
    assert first_choices(policy, [R1, R2]) == Counter({R1.name: 150, R2.name: 150})


def test_zone_on_one_host_tells_nodes_apart_by_port() -> None:
    local = [Node("127.0.0.1", port) for port in (7000, 7003, 7004)]
    policy = make_policy("zone", NodeFacts(), prefer=["127.0.0.1:7004"])
    assert policy.order(local[0], local[1:])[0] is local[2]


@pytest.mark.parametrize(
    ("pattern", "host", "port", "expected"),
    [
        ("10.1.0.0/16", "10.1.200.3", 6379, True),
        ("10.1.0.0/16", "10.2.0.3", 6379, False),
        ("10.1.0.0/16", "redis-a.internal", 6379, False),  # a name is in no network
        ("fd00::/8", "fd12::5", 6379, True),
        ("10.1.2.3/16", "10.1.9.9", 6379, True),  # host bits allowed
        ("*.zone-a.internal", "Redis-1.ZONE-A.internal", 6379, True),
        ("*.zone-a.internal", "redis-1.zone-b.internal", 6379, False),
        ("127.0.0.1:700?", "127.0.0.1", 7003, True),
        ("127.0.0.1:700?", "127.0.0.1", 7013, False),
        ("127.0.0.1", "127.0.0.1", 7013, True),
    ],
)
def test_prefer_patterns(pattern: str, host: str, port: int, expected: bool) -> None:
    assert AddressPattern(pattern).matches(host, port) is expected


@pytest.mark.parametrize("pattern", ["10.1.0.0/33", "zone-a/x", "", "a b"])
def test_bad_prefer_patterns_are_refused_naming_the_entry(pattern: str) -> None:
    with pytest.raises(ValueError, match=repr(pattern).replace("\\", "\\\\")):
        AddressPattern(pattern)


# -- the hedge budget ----------------------------------------------------------------------------


def test_the_budget_allows_its_share_of_the_reads(clock) -> None:
    budget = HedgeBudget(0.1, clock)
    for _ in range(100):
        budget.note_read()
    taken = sum(budget.try_take() for _ in range(50))
    assert taken == 10
    assert (budget.reads, budget.hedges) == (100, 10)
    for _ in range(10):
        budget.note_read()
    assert budget.try_take() and not budget.try_take()  # 110 reads: 11 hedges


def test_the_budget_allows_one_hedge_per_window_however_quiet(clock) -> None:
    budget = HedgeBudget(0.1, clock)
    budget.note_read()
    assert budget.try_take()
    budget.note_read()
    assert not budget.try_take()


def test_the_budget_window_slides(clock) -> None:
    budget = HedgeBudget(0.5, clock)
    for _ in range(10):
        budget.note_read()
    assert sum(budget.try_take() for _ in range(10)) == 5
    clock.advance(5.0)
    for _ in range(10):
        budget.note_read()
    assert sum(budget.try_take() for _ in range(10)) == 5  # 20 reads, 10 hedges
    clock.advance(5.5)  # the first 10 reads and their 5 hedges left the window
    assert (budget.reads, budget.hedges) == (10, 5)
    assert not budget.try_take()
    clock.advance(60.0)  # everything left
    assert (budget.reads, budget.hedges) == (0, 0)
    assert budget.try_take()


# -- replica health facts ------------------------------------------------------------------------


def _stats(node: Node, role: str = "primary", **fields: Any) -> NodeStats:
    status = fields.pop("status", "connected")
    return NodeStats(node.host, node.port, role, status, **fields)  # type: ignore[arg-type]


def test_replica_fitness_from_a_probe() -> None:
    facts = NodeFacts()
    assert facts.replica_fits(R1.name, P.name, 1024)  # nothing known yet
    facts.note_probe(
        [
            _stats(P, replication_offset=50_000),
            _stats(R1, "replica", link_up=True, replication_offset=49_500),
            _stats(R2, "replica", link_up=True, replication_offset=40_000),
        ]
    )
    assert facts.replica_fits(R1.name, P.name, 1024)
    assert facts.lag(R1.name, P.name) == 500
    assert not facts.replica_fits(R2.name, P.name, 1024)  # 10,000 bytes behind
    assert facts.replica_fits(R2.name, P.name, 10_000)
    assert facts.replica_fits(R2.name, P.name, None)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"status": "disconnected"}, "disconnected"),
        ({"status": "failing"}, "failing"),
        ({"status": "auth_failed"}, "auth_failed"),
        ({"loading": True, "link_up": True}, "loading"),
        ({"link_up": False}, "master_link_status:down"),
    ],
)
def test_replicas_that_cannot_serve_are_unfit(fields: dict[str, Any], why: str) -> None:
    facts = NodeFacts()
    facts.note_probe([_stats(P, replication_offset=10), _stats(R1, "replica", **fields)])
    assert not facts.replica_fits(R1.name, P.name, 2**40)
    assert facts.nodes[R1.name].why_not == why
    # The next probe finds it well again.
    facts.note_probe([_stats(R1, "replica", link_up=True, replication_offset=10)])
    assert facts.replica_fits(R1.name, P.name, 0)


async def test_the_health_probe_fills_the_backends_node_facts() -> None:
    """collect_stats() reads loading, the link and the offsets from INFO and times a PING."""
    primary, replica = ("10.0.0.1", 7000), ("10.0.0.2", 7001)
    nodes_text = (
        "a 10.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-16383\n"
        "b 10.0.0.2:7001@17001 slave a 0 0 1 connected\n"
    )
    backend = ScriptedBackend(
        [primary, replica],
        {
            ("*", "CLUSTER NODES"): nodes_text,
            ("*", "CLUSTER INFO"): {"cluster_state": "ok"},
            (primary, "INFO"): {"role": "master", "loading": 0, "master_repl_offset": 9000},
            (replica, "INFO"): {
                "role": "slave",
                "loading": 0,
                "master_link_status": "up",
                "master_repl_offset": 4000,
                "slave_repl_offset": 4000,
            },
            ("*", "PING"): True,
        },
    )
    backend.node_facts = NodeFacts()  # type: ignore[attr-defined]
    stats = await collect_stats(backend, 1.0)  # type: ignore[arg-type]
    by_port = {node.port: node for node in stats.nodes}
    assert by_port[7000].replication_offset == 9000 and by_port[7000].link_up is None
    assert by_port[7001].replication_offset == 4000 and by_port[7001].link_up is True
    assert by_port[7001].loading is False
    assert all(node.latency is not None and node.latency >= 0 for node in stats.nodes)
    facts = backend.node_facts  # type: ignore[attr-defined]
    assert facts.probes == 1
    assert facts.lag("10.0.0.2:7001", "10.0.0.1:7000") == 5000
    assert not facts.replica_fits("10.0.0.2:7001", "10.0.0.1:7000", 4096)
    assert facts.latency("10.0.0.2:7001") is not None


# -- the per-call override ----------------------------------------------------------------------


async def test_primary_reads_holds_inside_the_block_and_its_tasks_only() -> None:
    import asyncio

    assert not PRIMARY_READS.get()
    with primary_reads():
        assert PRIMARY_READS.get()
        assert await asyncio.create_task(_flag())
        with primary_reads():
            pass
        assert PRIMARY_READS.get()  # nested blocks restore what was there
    assert not PRIMARY_READS.get()
    assert not await asyncio.create_task(_flag())


async def _flag() -> bool:
    return PRIMARY_READS.get()
