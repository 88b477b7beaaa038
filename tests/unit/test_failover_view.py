"""FailoverView: what ``CLUSTER NODES`` (as redis-py parses it) says about failovers."""

from __future__ import annotations

from typing import Any

from resilient_cache.backends.failover import FailoverView, format_ranges


def node(node_id: str, flags: str, master: str = "-", slots: Any = (), up: bool = True) -> Any:
    return {
        "node_id": node_id,
        "flags": flags,
        "master_id": master,
        "connected": up,
        "slots": [list(s) for s in slots],
    }


def cluster_nodes(**replica_state: Any) -> dict[str, Any]:
    return {
        "10.0.0.1:7000": node("a", "myself,master", slots=[("0", "5460")]),
        "10.0.0.2:7000": node("b", "master", slots=[("5461", "10921")]),
        "10.0.0.3:7000": node("c", "master", slots=[("10922", "16000"), ("16001", "16383")]),
        "10.0.0.4:7000": node("d", "slave", "a"),
        "10.0.0.5:7000": node("e", replica_state.get("b_flags", "slave"), "b",
                              up=replica_state.get("b_up", True)),
        # c has no replica at all
    }  # fmt: skip


def test_a_primary_with_a_healthy_replica_can_be_taken_over() -> None:
    view = FailoverView()
    assert view.can_take_over("10.0.0.1:7000") is None  # nothing read yet: unknown
    view.note_cluster_nodes(cluster_nodes())
    assert view.can_take_over("10.0.0.1:7000") is True
    assert view.can_take_over("10.0.0.2:7000") is True
    assert view.can_take_over("10.0.0.3:7000") is False
    assert view.can_take_over("10.0.0.4:7000") is None  # a replica, not a primary
    assert format_ranges(view.slot_ranges("10.0.0.3:7000")) == "10922-16000,16001-16383"


def test_a_failed_or_unlinked_replica_cannot() -> None:
    for state in ({"b_flags": "slave,fail"}, {"b_flags": "slave,fail?"}, {"b_up": False}):
        view = FailoverView()
        view.note_cluster_nodes(cluster_nodes(**state))
        assert view.can_take_over("10.0.0.2:7000") is False, state


def test_a_failed_primary_whose_slots_moved_is_no_lost_shard() -> None:
    """After a failover, CLUSTER NODES shows the old primary as ``master,fail`` with no slot and
    no replica (its replica is now the primary). A client whose slot map is not re-read yet still
    sends commands there; that must not read as "no replica left to take over" (the commands
    would fail with SlotNotServedError instead of following the slots)."""
    nodes = cluster_nodes()
    nodes["10.0.0.2:7000"] = node("b", "master,fail", up=False)  # slots gone
    nodes["10.0.0.5:7000"] = node("e", "master", slots=[("5461", "10921")])  # promoted
    view = FailoverView()
    view.note_cluster_nodes(nodes)
    assert view.can_take_over("10.0.0.2:7000") is None
    assert view.can_take_over("10.0.0.5:7000") is False  # the new primary has no replica yet
    assert view.slot_ranges("10.0.0.2:7000") == []


def test_a_reply_that_is_not_cluster_nodes_changes_nothing() -> None:
    view = FailoverView()
    view.note_cluster_nodes(cluster_nodes())
    view.note_cluster_nodes("ERR")
    assert view.can_take_over("10.0.0.1:7000") is True


def test_the_estimate_comes_from_the_node_timeout() -> None:
    view = FailoverView()
    assert view.estimate is None
    view.note_node_timeout({"cluster-node-timeout": "2000"})
    assert view.node_timeout == 2.0
    assert view.estimate == 2 * 2.0 + 2.0
    view.note_node_timeout({b"cluster-node-timeout": b"15000"})  # decode_responses=False
    assert view.estimate == 32.0
    view.note_node_timeout({"something": "else"})
    assert view.estimate is None
    view.note_node_timeout("not a dict")
    assert view.estimate is None


def test_single_slots_are_ranges_of_one() -> None:
    view = FailoverView()
    nodes = cluster_nodes()
    nodes["10.0.0.3:7000"]["slots"] = [["10922"], ["10923", "16383"]]
    view.note_cluster_nodes(nodes)
    assert view.slot_ranges("10.0.0.3:7000") == [(10922, 10922), (10923, 16383)]
    assert format_ranges(view.slot_ranges("10.0.0.3:7000")) == "10922,10923-16383"
