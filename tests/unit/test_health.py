"""The health probe's parsing and its account of refusals, against a scripted backend."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache.health import HealthMonitor, collect_stats, format_stats
from resilient_cache.topology_replies import (
    parse_cluster_nodes_reply,
    parse_cluster_shards_reply,
    parse_cluster_slots_reply,
)

#: What a fresh one-node cluster says of itself: it has never been told its own address.
ONE_NODE_LINE = (
    "9840e4354be755314afcbe7ab689f1511754e1c6 :17461@27461 myself,master - 0 0 1 connected 0-16383"
)
WRONGPASS = "invalid username-password pair or user is disabled."


def _noperm(command: str) -> NoPermissionError:
    err = NoPermissionError(f"this user has no permissions to run the '{command}' command")
    err.status_code = "NOPERM"
    return err


def _wrongpass() -> AuthenticationError:
    err = AuthenticationError(WRONGPASS)
    err.status_code = "WRONGPASS"
    return err


def test_an_empty_address_on_the_myself_line_is_the_address_asked() -> None:
    asked = ("127.0.0.1", 17461)
    expected = [{"host": "127.0.0.1", "port": 17461, "role": "primary", "failing": False}]
    assert parse_cluster_nodes_reply(ONE_NODE_LINE, asked) == expected
    assert parse_cluster_nodes_reply(ONE_NODE_LINE + "\n", asked) == expected
    # The same reply as redis-py parses it.
    parsed = {":17461": {"flags": "myself,master", "connected": True, "slots": [["0", "16383"]]}}
    assert parse_cluster_nodes_reply(parsed, asked) == expected
    # Without the address asked there is nothing to stand in for it.
    assert parse_cluster_nodes_reply(ONE_NODE_LINE) == []


def test_an_empty_address_of_another_node_is_skipped() -> None:
    text = (
        "a 10.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-8000\n"
        "b :7001@17001 master - 0 0 2 connected 8001-16383\n"
    )
    nodes = parse_cluster_nodes_reply(text, ("10.0.0.9", 7000))
    assert [(n["host"], n["port"]) for n in nodes] == [("10.0.0.1", 7000)]


def test_cluster_slots_gives_roles_and_fills_an_empty_host() -> None:
    reply = [
        [0, 8000, [b"10.0.0.1", 7000, b"id1", {}], [b"10.0.0.2", 7001, b"id2", {}]],
        [8001, 16383, [b"", 7002, b"id3", {}]],
    ]
    nodes = parse_cluster_slots_reply(reply, ("10.0.0.3", 7002))
    assert [(n["host"], n["port"], n["role"]) for n in nodes] == [
        ("10.0.0.1", 7000, "primary"),
        ("10.0.0.2", 7001, "replica"),
        ("10.0.0.3", 7002, "primary"),
    ]


def _shard_node(port: int, role: str, health: str = "online", ip: bytes = b"127.0.0.1") -> Any:
    return {
        b"id": b"x",
        b"port": port,
        b"ip": ip,
        b"endpoint": ip,
        b"role": role,
        b"health": health,
    }


def test_cluster_shards_gives_roles_failures_and_fills_an_empty_ip() -> None:
    reply = [
        {
            "slots": [0, 8000],
            "nodes": [_shard_node(7000, b"master"), _shard_node(7001, b"replica")],
        },
        {"slots": [8001, 16383], "nodes": [_shard_node(7002, b"master", ip=b"")]},
        {"slots": [], "nodes": [_shard_node(7003, b"replica", b"failed")]},
    ]
    nodes = parse_cluster_shards_reply(reply, ("10.0.0.3", 7002))
    assert [(n["host"], n["port"], n["role"], n["failing"]) for n in nodes] == [
        ("10.0.0.3", 7002, "primary", False),
        ("127.0.0.1", 7000, "primary", False),
        ("127.0.0.1", 7001, "replica", False),
        ("127.0.0.1", 7003, "replica", True),
    ]
    # Plain and TLS ports: the kind asked.
    tls = [{"nodes": [{"ip": "h", "port": 6379, "tls-port": 6380, "role": "master"}]}]
    assert parse_cluster_shards_reply(tls, ("h", 6380))[0]["port"] == 6380
    assert parse_cluster_shards_reply(tls, ("h", 6379))[0]["port"] == 6379


class ScriptedBackend:
    """A cluster backend whose nodes answer (or raise) from a table."""

    routes_per_node = True

    def __init__(self, nodes: list[tuple[str, int]], replies: dict[tuple[Any, str], Any]):
        self._nodes = nodes
        self._replies = replies
        self.refreshed = 0

    def known_nodes(self) -> list[tuple[str, int]]:
        return self._nodes

    async def execute_on(self, address: tuple[str, int], *args: Any) -> Any:
        command = " ".join(args)
        reply = self._replies.get((address, command), self._replies.get(("*", command)))
        if isinstance(reply, BaseException):
            raise reply
        if reply is None:
            raise RedisConnectionError(f"Error 111 connecting to {address[0]}:{address[1]}.")
        return reply

    async def refresh_topology(self) -> None:
        self.refreshed += 1


A, B, C = ("127.0.0.1", 7000), ("127.0.0.1", 7001), ("127.0.0.1", 7002)
NODES_TEXT = (
    "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n"
    "b 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n"
    "c 127.0.0.1:7002@17002 master - 0 0 3 connected 10923-16383\n"
)
SHARDS = [
    {"slots": [0, 5460], "nodes": [_shard_node(7000, b"master")]},
    {"slots": [5461, 10922], "nodes": [_shard_node(7001, b"master")]},
    {"slots": [10923, 16383], "nodes": [_shard_node(7002, b"master")]},
]
SLOTS = [
    [0, 5460, ["127.0.0.1", 7000, "a"]],
    [5461, 10922, ["127.0.0.1", 7001, "b"]],
    [10923, 16383, ["127.0.0.1", 7002, "c"]],
]
INFO = "used_memory_human:1.00M\r\nconnected_clients:3\r\n"
CLUSTER_INFO = "cluster_state:ok\r\n"


async def test_a_user_without_info_and_cluster_nodes_still_counts_every_node() -> None:
    backend = ScriptedBackend(
        [A, B, C],
        {
            ("*", "CLUSTER NODES"): _noperm("cluster|nodes"),
            ("*", "CLUSTER SHARDS"): SHARDS,
            ("*", "CLUSTER INFO"): CLUSTER_INFO,
            ("*", "INFO"): _noperm("info"),
        },
    )
    stats = await collect_stats(backend, timeout=1.0)  # type: ignore[arg-type]
    assert (stats.total_nodes, stats.connected_nodes, stats.primary_nodes) == (3, 3, 3)
    assert stats.health == "healthy" and stats.cluster_state == "ok"
    assert all(n.status == "connected" and n.used_memory_human is None for n in stats.nodes)
    assert stats.nodes[0].error == (
        "INFO refused: NOPERM this user has no permissions to run the 'info' command"
    )
    assert stats.problems == [
        "CLUSTER NODES refused by 127.0.0.1:7000: NOPERM this user has no permissions to run "
        "the 'cluster|nodes' command",
        "INFO refused by 127.0.0.1:7000, 127.0.0.1:7001, 127.0.0.1:7002: NOPERM this user has "
        "no permissions to run the 'info' command",
    ]
    text = format_stats(stats)
    assert "3/3 connected" in text
    assert "problems:\n  CLUSTER NODES refused by 127.0.0.1:7000: NOPERM" in text
    assert "NOPERM this user has no permissions to run the 'info' command" in text
    assert stats.to_dict()["problems"] == stats.problems


@pytest.mark.parametrize(
    "shards",
    [_noperm("cluster|shards"), ResponseError("unknown subcommand 'SHARDS'. Try CLUSTER HELP.")],
)
async def test_cluster_slots_is_the_last_way_to_the_topology(shards: Exception) -> None:
    backend = ScriptedBackend(
        [A, B, C],
        {
            ("*", "CLUSTER NODES"): _noperm("cluster|nodes"),
            ("*", "CLUSTER SHARDS"): shards,
            ("*", "CLUSTER SLOTS"): SLOTS,
            ("*", "CLUSTER INFO"): _noperm("cluster|info"),
            ("*", "INFO"): INFO,
        },
    )
    stats = await collect_stats(backend, timeout=1.0)  # type: ignore[arg-type]
    assert (stats.total_nodes, stats.connected_nodes, stats.primary_nodes) == (3, 3, 3)
    # Without CLUSTER INFO the slots' coverage is unknown: not called healthy, and said why.
    assert (stats.cluster_state, stats.health) == ("unknown", "unhealthy")
    assert any(
        p.startswith("CLUSTER INFO refused by 127.0.0.1:7000: NOPERM") for p in stats.problems
    )
    refused_shards = any(p.startswith("CLUSTER SHARDS refused") for p in stats.problems)
    assert refused_shards is isinstance(shards, NoPermissionError)


async def test_a_node_with_other_credentials_is_auth_failed() -> None:
    backend = ScriptedBackend(
        [A, B, C],
        {
            (A, "CLUSTER NODES"): _wrongpass(),
            (A, "INFO"): _wrongpass(),
            ("*", "CLUSTER NODES"): NODES_TEXT,
            ("*", "CLUSTER INFO"): CLUSTER_INFO,
            ("*", "INFO"): INFO,
        },
    )
    stats = await collect_stats(backend, timeout=1.0)  # type: ignore[arg-type]
    by_port = {n.port: n for n in stats.nodes}
    assert by_port[7000].status == "auth_failed"
    assert by_port[7000].error == f"credentials refused: WRONGPASS {WRONGPASS}"
    assert by_port[7001].status == "connected" and by_port[7001].error is None
    assert by_port[7001].used_memory_human == "1.00M" and by_port[7001].connected_clients == 3
    assert (stats.connected_nodes, stats.health) == (2, "degraded")
    assert stats.problems == [f"credentials refused by 127.0.0.1:7000: WRONGPASS {WRONGPASS}"]
    assert "auth_failed" in format_stats(stats)


async def test_every_node_refusing_the_credentials_is_not_just_disconnected() -> None:
    backend = ScriptedBackend([A, B], {("*", "CLUSTER NODES"): _wrongpass()})
    stats = await collect_stats(backend, timeout=1.0)  # type: ignore[arg-type]
    assert [n.status for n in stats.nodes] == ["auth_failed", "auth_failed"]
    assert stats.health == "unhealthy"
    assert stats.problems[0] == (
        f"credentials refused by 127.0.0.1:7000, 127.0.0.1:7001: WRONGPASS {WRONGPASS}"
    )
    assert "topology" in stats.problems[1]


async def test_a_node_that_does_not_answer_keeps_its_old_status_and_says_why() -> None:
    backend = ScriptedBackend(
        [A, B, C],
        {
            ("*", "CLUSTER NODES"): NODES_TEXT,
            ("*", "CLUSTER INFO"): CLUSTER_INFO,
            (A, "INFO"): INFO,
            (B, "INFO"): INFO,
        },
    )
    stats = await collect_stats(backend, timeout=1.0)  # type: ignore[arg-type]
    assert [n.status for n in stats.nodes] == ["connected", "connected", "disconnected"]
    assert stats.nodes[2].error == "ConnectionError"
    assert stats.problems == []  # nothing refused: the status says it all


async def test_the_monitor_warns_once_per_change_of_problems(
    caplog: pytest.LogCaptureFixture,
) -> None:
    replies: dict[tuple[Any, str], Any] = {
        ("*", "CLUSTER NODES"): NODES_TEXT,
        ("*", "CLUSTER INFO"): CLUSTER_INFO,
        ("*", "INFO"): _noperm("info"),
    }
    monitor = HealthMonitor(ScriptedBackend([A, B, C], replies), 1.0, 1.0)  # type: ignore[arg-type]

    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "probe incomplete" in r.getMessage()
        ]

    with caplog.at_level(logging.INFO, logger="resilient_cache.health"):
        for _ in range(3):
            await monitor.probe_once()
        assert len(warnings()) == 1
        assert (
            "INFO refused by 127.0.0.1:7000, 127.0.0.1:7001, 127.0.0.1:7002: NOPERM"
            in (warnings()[0])
        )
        replies[(A, "INFO")] = _wrongpass()  # another problem: logged again
        await monitor.probe_once()
        await monitor.probe_once()
        assert len(warnings()) == 2 and "WRONGPASS" in warnings()[1]
        replies[("*", "INFO")] = INFO
        del replies[(A, "INFO")]
        await monitor.probe_once()  # all clear: said once, at INFO
        await monitor.probe_once()
    assert len(warnings()) == 2
    cleared = [r for r in caplog.records if "complete again" in r.getMessage()]
    assert len(cleared) == 1 and cleared[0].levelno == logging.INFO


# -- slots with no serving node ---------------------------------------------------------------

#: Six nodes: c (7002) and its replica f (7005) have failed; a (7000) has failed too, but its
#: replica d (7003) is healthy (a failover is coming); slots 5000-5460 are assigned to nobody.
LOST_SHARD_TEXT = (
    "a 127.0.0.1:7000@17000 master,fail - 0 0 1 connected 0-4999\n"
    "b 127.0.0.1:7001@17001 myself,master - 0 0 2 connected 5461-10922\n"
    "c 127.0.0.1:7002@17002 master,fail - 0 0 3 disconnected 10923-16000 16001-16383\n"
    "d 127.0.0.1:7003@17003 slave a 0 0 1 connected\n"
    "e 127.0.0.1:7004@17004 slave b 0 0 2 connected\n"
    "f 127.0.0.1:7005@17005 slave,fail c 0 0 3 disconnected\n"
)
LOST_SHARD_RANGES = [(5000, 5460), (10923, 16383)]


def _as_redis_py_parses_it(text: str) -> dict[str, Any]:
    from redis._parsers.helpers import parse_cluster_nodes

    return parse_cluster_nodes(text)


@pytest.mark.parametrize("form", ["text", "redis-py"])
def test_cluster_nodes_names_unassigned_slots_and_a_shard_with_no_replica_left(form: str) -> None:
    from resilient_cache.topology_replies import cluster_nodes_coverage

    reply = LOST_SHARD_TEXT if form == "text" else _as_redis_py_parses_it(LOST_SHARD_TEXT)
    assert cluster_nodes_coverage(reply, B) == (LOST_SHARD_RANGES, ["127.0.0.1:7002"])
    # The replica only suspected (fail?), unlinked, or never to fail over: no better.
    replicas = (
        "slave,fail? c 0 0 3 connected",
        "slave c 0 0 3 disconnected",
        "slave,nofailover c 0 0 3 connected",
    )
    for replica in replicas:
        text = LOST_SHARD_TEXT.replace("slave,fail c 0 0 3 disconnected", replica)
        assert cluster_nodes_coverage(text, B)[1] == ["127.0.0.1:7002"], replica
    # A healthy replica of c: a failover is coming, only the unassigned slots are lost.
    healthy = LOST_SHARD_TEXT.replace("slave,fail c 0 0 3 disconnected", "slave c 0 0 3 connected")
    assert cluster_nodes_coverage(healthy, B) == ([(5000, 5460)], [])
    # A primary only suspected (fail?), even with no replica left: the cluster still routes
    # to it, so its slots still count as served.
    suspected = LOST_SHARD_TEXT.replace("master,fail - 0 0 3", "master,fail? - 0 0 3")
    assert cluster_nodes_coverage(suspected, B) == ([(5000, 5460)], [])
    # Every slot assigned, single slots and migrations included: nothing uncovered.
    whole = (
        "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-99 100 [100->-b] 101-16383\n"
        "b 127.0.0.1:7001@17001 master - 0 0 2 connected [100-<-a]\n"
    )
    assert cluster_nodes_coverage(whole, A) == ([], [])
    assert cluster_nodes_coverage(_as_redis_py_parses_it(whole), A) == ([], [])


async def test_stats_report_the_slots_no_node_serves_and_call_it_unhealthy() -> None:
    backend = ScriptedBackend(
        [A, B, C],
        {
            # cluster-require-full-coverage no: the cluster still says ok.
            ("*", "CLUSTER NODES"): LOST_SHARD_TEXT,
            ("*", "CLUSTER INFO"): CLUSTER_INFO,
            (B, "INFO"): INFO,
            (("127.0.0.1", 7003), "INFO"): INFO,
            (("127.0.0.1", 7004), "INFO"): INFO,
        },
    )
    stats = await collect_stats(backend, timeout=1.0)  # type: ignore[arg-type]
    assert stats.cluster_state == "ok" and stats.health == "unhealthy"
    assert stats.uncovered_slots == 461 + 5461
    assert stats.uncovered_ranges == LOST_SHARD_RANGES
    assert stats.unserved_shards == ["127.0.0.1:7002"]
    assert stats.to_dict()["unserved_shards"] == ["127.0.0.1:7002"]
    text = format_stats(stats)
    assert "uncovered slots: 5922 (5000-5460,10923-16383); unserved shards: 127.0.0.1:7002" in text
    # Every slot served again: nothing reported, and no line for it.
    backend._replies[("*", "CLUSTER NODES")] = NODES_TEXT
    for address in (A, C):
        backend._replies[(address, "INFO")] = INFO
    stats = await collect_stats(backend, timeout=1.0)  # type: ignore[arg-type]
    assert (stats.uncovered_slots, stats.uncovered_ranges, stats.unserved_shards) == (0, [], [])
    assert stats.health == "healthy" and "uncovered" not in format_stats(stats)


async def test_the_monitor_names_the_lost_slots_when_health_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    replies: dict[tuple[Any, str], Any] = {
        ("*", "CLUSTER NODES"): NODES_TEXT,
        ("*", "CLUSTER INFO"): CLUSTER_INFO,
        ("*", "INFO"): INFO,
    }
    monitor = HealthMonitor(ScriptedBackend([A, B, C], replies), 1.0, 1.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="resilient_cache.health"):
        await monitor.probe_once()
        replies[("*", "CLUSTER NODES")] = LOST_SHARD_TEXT
        await monitor.probe_once()
    changes = [r for r in caplog.records if r.getMessage().startswith("cluster health")]
    assert [r.levelno for r in changes] == [logging.WARNING]
    assert changes[0].getMessage() == (
        "cluster health healthy -> unhealthy; 5922 slots (5000-5460,10923-16383) have no "
        "serving node (lost: 127.0.0.1:7002)"
    )


def test_cluster_shards_and_slots_report_what_they_show() -> None:
    from resilient_cache.topology_replies import cluster_shards_coverage, cluster_slots_coverage

    def shards(health: bytes) -> list[Any]:
        return [
            {"slots": [0, 5460], "nodes": [_shard_node(7000, b"master")]},
            # as redis-py parses a RESP2 reply: (start, end) pairs
            {"slots": [(b"5461", b"10922")], "nodes": [_shard_node(7001, b"master")]},
            {
                "slots": [10923, 16000, 16001, 16383],
                "nodes": [
                    _shard_node(7002, b"master", b"failed"),
                    _shard_node(7005, b"replica", health),
                ],
            },
        ]

    assert cluster_shards_coverage(shards(b"failed"), C) == ([(10923, 16383)], ["127.0.0.1:7002"])
    assert cluster_shards_coverage(shards(b"online"), C) == ([], [])  # a failover is coming
    # CLUSTER SLOTS shows no failure flags: only the slots no node is assigned.
    holed = [entry for entry in SLOTS if entry[0] != 5461]
    assert cluster_slots_coverage(holed, C) == ([(5461, 10922)], [])
    assert cluster_slots_coverage(SLOTS, C) == ([], [])


async def test_the_fallbacks_report_uncovered_slots_too() -> None:
    failed = {"slots": [10923, 16383], "nodes": [_shard_node(7002, b"master", b"failed")]}
    lost = [*SHARDS[:2], failed]
    backend = ScriptedBackend(
        [A, B, C],
        {
            ("*", "CLUSTER NODES"): _noperm("cluster|nodes"),
            ("*", "CLUSTER SHARDS"): lost,
            ("*", "CLUSTER INFO"): CLUSTER_INFO,
            ("*", "INFO"): INFO,
        },
    )
    stats = await collect_stats(backend, timeout=1.0)  # type: ignore[arg-type]
    assert (stats.uncovered_slots, stats.unserved_shards) == (5461, ["127.0.0.1:7002"])
    assert stats.health == "unhealthy"
