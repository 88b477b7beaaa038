"""The common auth and topology mistakes, against real servers: each fails clearly.

- a wrong password: ``connect()`` (or a first command) raises an ``AuthenticationError`` naming
  the nodes and the user, never the password (cluster and ``REDIS_URL``);
- an ACL user without ``INFO`` / ``CLUSTER NODES``: stats count every node and say what was
  refused where (``get_stats()``, ``resilient-cache stats`` and ``health``, the monitor's log);
- one node with another password: its breaker, its stats and the memory tier's coherence
  link each name it;
- a fresh one-node cluster, whose ``CLUSTER NODES`` line has no address.

The ACL users are made on every node of the session cluster and deleted afterwards.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.exceptions import AuthenticationError

from resilient_cache import (
    CircuitBreakerOpenError,
    CredentialsRefusedError,
    RedisClusterClient,
    create_redis_cluster,
)
from resilient_cache.devcluster import DevCluster, StandaloneServer
from tests.conftest import async_wait_until

USER = "refusals-app"
PASSWORD = "refusals-PASS-5b1d"
WRONG_PASSWORD = "refusals-WRONG-0c4e"
OTHER_PASSWORD = "refusals-OTHER-77aa"
LIMITED = "refusals-limited"  # may not run INFO nor CLUSTER NODES
SECRETS = (PASSWORD, WRONG_PASSWORD, OTHER_PASSWORD)


def assert_no_password(err: BaseException) -> None:
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__, chain=True))
    text += repr(err) + repr(vars(err))
    for secret in SECRETS:
        assert secret not in text, text


def _admins(cluster: DevCluster) -> list[redis.Redis]:
    return [cluster.admin(node) for node in cluster.nodes]


@pytest.fixture
def acl_users(devcluster: DevCluster, standalone_redis: str) -> Iterator[None]:
    """USER (everything) and LIMITED (everything but INFO and CLUSTER NODES), both with
    PASSWORD, on every node and on the standalone server."""
    admins = [*_admins(devcluster), redis.Redis.from_url(standalone_redis)]
    rule = ("on", f">{PASSWORD}", "~*", "&*", "+@all")
    try:
        for admin in admins:
            admin.execute_command("ACL", "SETUSER", USER, *rule)
            admin.execute_command("ACL", "SETUSER", LIMITED, *rule, "-info", "-cluster|nodes")
        yield
    finally:
        for admin in admins:
            admin.execute_command("ACL", "DELUSER", USER, LIMITED)
            admin.close()


def _client(nodes: str, **options: Any) -> RedisClusterClient:
    settings: dict[str, Any] = {"autoload": False, "health_check_interval": 0}
    return create_redis_cluster(nodes, **{**settings, **options})


# -- 1. a wrong password -------------------------------------------------------------------


async def test_a_wrong_password_fails_connect_naming_the_nodes_and_the_user(
    cluster_nodes: str, acl_users: None
) -> None:
    client = _client(cluster_nodes, username=USER, password=WRONG_PASSWORD)
    try:
        with pytest.raises(AuthenticationError) as caught:
            await client.connect()
    finally:
        await client.disconnect()
    err = caught.value
    assert isinstance(err, CredentialsRefusedError)
    seeds = cluster_nodes.split(",")
    assert sorted(err.nodes) == sorted(seeds)  # every seed asked refuses them
    assert (err.username, err.redis_code, err.command) == (USER, "WRONGPASS", None)
    message = str(err)
    assert f"refused the credentials of user '{USER}'" in message
    assert all(seed in message for seed in seeds)
    assert "WRONGPASS" in message and "answered" not in message
    assert_no_password(err)


async def test_a_wrong_password_fails_the_first_command_the_same_way(
    cluster_nodes: str, acl_users: None
) -> None:
    client = _client(cluster_nodes, username=USER, password=WRONG_PASSWORD)
    try:
        started = time.monotonic()
        with pytest.raises(AuthenticationError) as caught:
            await client.get("refusals:first")
        elapsed = time.monotonic() - started
    finally:
        await client.disconnect()
    err = caught.value
    assert isinstance(err, CredentialsRefusedError) and err.command == "GET"
    assert sorted(err.nodes) == sorted(cluster_nodes.split(","))
    assert f"user '{USER}'" in str(err)
    assert not hasattr(err, "attempts") or err.attempts == 1  # not retried
    print(f"first command refused in {elapsed:.3f}s")
    assert_no_password(err)


async def test_a_wrong_password_in_redis_url_names_the_server_and_the_user(
    standalone_redis: str, acl_users: None
) -> None:
    address = standalone_redis.removeprefix("redis://").split("/")[0]
    url = f"redis://{USER}:{WRONG_PASSWORD}@{address}/0"
    for first_call in ("connect", "command"):
        client = create_redis_cluster(url=url, autoload=False, health_check_interval=0)
        assert client.backend.name == "standalone"
        try:
            with pytest.raises(AuthenticationError) as caught:
                if first_call == "connect":
                    await client.connect()
                else:
                    await client.get("refusals:first")
        finally:
            await client.disconnect()
        err = caught.value
        assert isinstance(err, CredentialsRefusedError), f"{type(err)}: {err}"
        assert (err.nodes, err.username, err.redis_code) == ([address], USER, "WRONGPASS")
        assert err.command == (None if first_call == "connect" else "GET")
        assert f"{address} refused the credentials of user '{USER}'" in str(err)
        assert_no_password(err)


# -- 2. a user without INFO and CLUSTER NODES ----------------------------------------------


async def test_stats_of_a_user_without_info_and_cluster_nodes(
    cluster_nodes: str, acl_users: None
) -> None:
    async with _client(cluster_nodes, username=LIMITED, password=PASSWORD) as client:
        stats = await client.get_stats()
    assert (stats.total_nodes, stats.connected_nodes) == (6, 6)
    assert (stats.primary_nodes, stats.replica_nodes) == (3, 3)
    assert (stats.health, stats.cluster_state) == ("healthy", "ok")
    refused_info = "INFO refused: NOPERM this user has no permissions to run the 'info' command"
    assert all(node.error == refused_info for node in stats.nodes)
    assert all(node.used_memory_human is None for node in stats.nodes)
    (nodes_line,) = [p for p in stats.problems if p.startswith("CLUSTER NODES refused by ")]
    assert "NOPERM" in nodes_line and "'cluster|nodes'" in nodes_line
    (info_line,) = [p for p in stats.problems if p.startswith("INFO refused by ")]
    assert all(f"{n.host}:{n.port}" in info_line for n in stats.nodes)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "resilient_cache", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_stats_and_health_say_what_was_refused(cluster_nodes: str, acl_users: None) -> None:
    env = {"REDIS_CLUSTER_NODES": cluster_nodes, "REDIS_USERNAME": LIMITED}
    env["REDIS_PASSWORD"] = PASSWORD
    stats = run_cli("stats", env=env)
    assert stats.returncode == 0, stats.stderr
    assert "6/6 connected, 3 primaries, 3 replicas" in stats.stdout
    assert "problems:\n  CLUSTER NODES refused by " in stats.stdout
    assert "INFO refused by " in stats.stdout and "NOPERM" in stats.stdout
    health = run_cli("health", env=env)
    assert (health.returncode, health.stdout.strip()) == (0, "healthy"), health.stderr
    assert "resilient-cache: INFO refused by " in health.stderr
    assert "NOPERM" in health.stderr
    wrong = run_cli("health", env={**env, "REDIS_PASSWORD": WRONG_PASSWORD})
    assert wrong.returncode == 1
    assert f"refused the credentials of user '{LIMITED}'" in wrong.stderr
    for secret in SECRETS:
        assert secret not in stats.stdout + health.stdout + health.stderr + wrong.stderr


async def test_the_monitor_warns_once_about_what_it_may_not_run(
    cluster_nodes: str, acl_users: None, caplog: pytest.LogCaptureFixture
) -> None:
    client = _client(cluster_nodes, username=LIMITED, password=PASSWORD, health_check_interval=0.1)
    with caplog.at_level(logging.WARNING, logger="resilient_cache.health"):
        async with client:
            monitor = client._monitor

            async def probed_thrice() -> bool:
                return monitor.probes >= 3

            await async_wait_until(probed_thrice, 30, "three health probes")
    warnings = [r.getMessage() for r in caplog.records if "probe incomplete" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "INFO refused by" in warnings[0] and "NOPERM" in warnings[0]


# -- 3. one node with another password -----------------------------------------------------


@pytest.fixture
def one_node_refuses(devcluster: DevCluster, acl_users: None) -> Iterator[str]:
    """USER's password is OTHER_PASSWORD on one primary only; its ``host:port``."""
    node = devcluster.primaries()[0]
    admin = devcluster.admin(node)
    try:
        admin.execute_command("ACL", "SETUSER", USER, "resetpass", f">{OTHER_PASSWORD}")
        yield node.address
    finally:
        admin.execute_command("ACL", "SETUSER", USER, "resetpass", f">{PASSWORD}")
        admin.close()


def _key_on(client: RedisClusterClient, node: str, on: bool = True) -> str:
    """A key whose slot ``node`` serves (``on``), or one it does not."""
    raw = client.get_cluster()
    return next(
        key for key in (f"refusals:{i}" for i in range(10_000))
        if (raw.get_node_from_key(key).name == node) is on
    )  # fmt: skip


async def test_a_node_with_another_password_is_named_by_breaker_and_stats(
    cluster_nodes: str, one_node_refuses: str
) -> None:
    node = one_node_refuses
    client = _client(cluster_nodes, username=USER, password=PASSWORD, circuit_breaker_threshold=2)
    async with client:
        key = _key_on(client, node)
        for _ in range(2):
            with pytest.raises(AuthenticationError) as caught:
                await client.get(key)
            err = caught.value
            assert isinstance(err, CredentialsRefusedError)
            assert (err.nodes, err.username, err.command) == ([node], USER, "GET")
            assert_no_password(err)
        assert client.is_circuit_breaker_open(node)
        breaker = client.breakers.breakers[node]
        assert breaker.last_failure == "CredentialsRefusedError WRONGPASS"
        # Open: refused at once, saying why; no failover is waited for (the node is up).
        started = time.monotonic()
        with pytest.raises(CircuitBreakerOpenError) as refused:
            await client.get(key)
        assert time.monotonic() - started < 5.0  # failover_wait is 15 s
        assert "last failure: CredentialsRefusedError WRONGPASS" in str(refused.value)
        # The other shards are untouched.
        elsewhere = _key_on(client, node, on=False)
        await client.set(elsewhere, 1)
        assert await client.get(elsewhere) == b"1"
        await client.delete(elsewhere)
        stats = await client.get_stats()
    by_name = {f"{n.host}:{n.port}": n for n in stats.nodes}
    assert by_name[node].status == "auth_failed"
    assert by_name[node].error is not None and "WRONGPASS" in by_name[node].error
    assert stats.connected_nodes == 5 and stats.health == "degraded"
    assert any(p.startswith(f"credentials refused by {node}: WRONGPASS") for p in stats.problems)
    assert all(secret not in repr(stats) for secret in SECRETS)


async def test_the_coherence_link_to_that_node_warns_once_naming_it(
    cluster_nodes: str, one_node_refuses: str, caplog: pytest.LogCaptureFixture
) -> None:
    node = one_node_refuses
    client = _client(
        cluster_nodes,
        username=USER,
        password=PASSWORD,
        memory={
            "enabled": True,
            "key_prefixes": ["refusals:"],
            "coherence_check_interval": 0.1,
            "coherence_timeout": 0.5,
        },
    )

    def refusals(level: int) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "resilient_cache.coherence"
            and r.levelno == level
            and "refused the tracking link" in r.getMessage()
        ]

    with caplog.at_level(logging.DEBUG, logger="resilient_cache.coherence"):
        async with client:
            tier: Any = client.stage("memory")
            await tier.start()

            async def retried_twice() -> bool:
                return len(refusals(logging.DEBUG)) >= 2

            await async_wait_until(retried_twice, 30, "the refused link to be retried twice")
            links = tier.coherence.link_states()
            assert links[node] is False
            assert sum(links.values()) == len(links) - 1  # the other primaries' links are up
    (warning,) = refusals(logging.WARNING)
    text = warning.getMessage()
    assert node in text and "WRONGPASS" in text, text
    assert all(secret not in caplog.text for secret in SECRETS)


# -- 4. a fresh one-node cluster -------------------------------------------------------------


@pytest.fixture
def one_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node cluster (``cluster-enabled yes``, every slot added): ``host:port``."""
    with StandaloneServer(
        base_dir=tmp_path_factory.mktemp("one-node"), extra_config=["cluster-enabled yes"]
    ) as server:
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        try:
            admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            deadline = time.monotonic() + 30
            while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
                assert time.monotonic() < deadline, "the one-node cluster never became ok"
                time.sleep(0.05)
            # What this test is about: the node does not know its own address.
            line = admin.execute_command("CLUSTER", "NODES")  # bytes: no reply callback
            assert b" :" in line and b"myself,master" in line, line
        finally:
            admin.close()
        yield server.address


async def test_stats_of_a_one_node_cluster_use_the_address_connected_to(
    one_node_cluster: str,
) -> None:
    async with _client(one_node_cluster) as client:
        await client.set("refusals:one-node", 1)
        assert await client.get("refusals:one-node") == b"1"
        stats = await client.get_stats()
    host, port = one_node_cluster.rsplit(":", 1)
    assert (stats.total_nodes, stats.connected_nodes, stats.primary_nodes) == (1, 1, 1)
    assert (stats.health, stats.cluster_state, stats.problems) == ("healthy", "ok", [])
    (node,) = stats.nodes
    assert (node.host, node.port) == (host, int(port))
    assert (node.role, node.status) == ("primary", "connected")
    assert node.used_memory_human
