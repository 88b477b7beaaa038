"""The client against a TLS + ACL cluster: what `make test` keeps working for secured servers.

One dev cluster for the whole module (``DevCluster(tls=True, acl=...)``): TLS only, the
servers require the client certificate, the default user is off and one ACL user may connect.
It records itself in a state file under a private XDG_RUNTIME_DIR, so the CLI's
``cluster status`` finds it as it would a ``cluster up`` one.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from resilient_cache import RedisClusterClient, create_redis_cluster
from resilient_cache.devcluster import DevCluster, default_state_path
from tests.conftest import async_wait_until

USER = "cache-app"
# Random, so that finding it in an error or a file cannot be a coincidence.
PASSWORD = f"pw-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="module")
def secured(runtime_dir: Path) -> Iterator[DevCluster]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
        state_path = default_state_path()
    assert state_path.is_relative_to(runtime_dir)
    with DevCluster(tls=True, acl=(USER, PASSWORD), state_path=state_path) as cluster:
        yield cluster


@pytest.fixture
def cluster(secured: DevCluster) -> DevCluster:
    secured.wait_ready(timeout=30)
    return secured


@pytest.fixture
async def client(cluster: DevCluster) -> AsyncIterator[RedisClusterClient]:
    async with connect(cluster) as connected:
        yield connected


def connect(cluster: DevCluster, **options: object) -> RedisClusterClient:
    return create_redis_cluster(
        cluster.startup_nodes,
        autoload=False,
        **{"health_check_interval": 0, **cluster.connection_options, **options},
    )


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "resilient_cache", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --------------------------------------------------------------------------- the servers


def test_servers_take_tls_with_a_client_certificate_and_the_acl_user_only(
    cluster: DevCluster,
) -> None:
    node = cluster.nodes[0]
    options = cluster.connection_options
    assert options["ssl"] is True and options["username"] == USER
    attempts: dict[str, tuple[type[Exception], dict[str, object]]] = {
        "plain text": (RedisConnectionError, {}),
        "TLS without a client certificate": (
            RedisConnectionError,
            {
                "ssl": True,
                "ssl_ca_certs": options["ssl_ca_certs"],
                "username": USER,
                "password": PASSWORD,
            },
        ),
        "the default user": (
            AuthenticationError,
            {k: v for k, v in options.items() if k not in ("username", "password")},
        ),
    }
    for what, (expected, kwargs) in attempts.items():
        probe = redis.Redis(
            host=node.host,
            port=node.port,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),  # refused once is refused
            **kwargs,
        )
        try:
            probe.ping()
        except expected:
            pass
        else:
            pytest.fail(f"the server let in a client with {what}")
        finally:
            probe.close()
    assert cluster.admin(node).acl_whoami() == USER


def test_no_password_in_the_state_file_and_the_secrets_are_private(cluster: DevCluster) -> None:
    assert cluster.state_path is not None and cluster.base_dir is not None
    state = cluster.state_path.read_text()
    assert PASSWORD not in state
    assert json.loads(state)["acl_user"] == USER and json.loads(state)["tls"] is True
    base = Path(cluster.base_dir)
    assert stat.S_IMODE((base / "acl.conf").stat().st_mode) == 0o600
    assert all(PASSWORD not in Path(node.config_path).read_text() for node in cluster.nodes)
    tls = base / "tls"
    assert sorted(p.name for p in tls.iterdir()) == [
        "ca.crt",
        "client.crt",
        "client.key",
        "server.crt",
        "server.key",
    ]  # the CA's key is gone: nothing else can be signed by it
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    for key in ("client.key", "server.key"):
        assert stat.S_IMODE((tls / key).stat().st_mode) == 0o600


# --------------------------------------------------------------------------- the client


async def test_core_commands_and_a_pipeline(client: RedisClusterClient) -> None:
    assert await client.set("{tls}:k", "v")
    assert await client.get("{tls}:k") == b"v"
    assert await client.incr("{tls}:n") == 1
    assert await client.incr("{tls}:n") == 2
    assert await client.delete("{tls}:k", "{tls}:n") == 2
    assert await client.get("{tls}:k") is None
    async with client.pipeline() as pipe:
        pipe.set("tls:p", 1).incr("tls:p").get("tls:p").delete("tls:p")
        assert await pipe.execute() == [True, 2, b"2", 1]


async def test_stats_see_six_healthy_nodes(client: RedisClusterClient) -> None:
    stats = await client.get_stats()
    assert (stats.total_nodes, stats.connected_nodes) == (6, 6)
    assert (stats.primary_nodes, stats.replica_nodes) == (3, 3)
    assert stats.health == "healthy"
    assert {node.status for node in stats.nodes} == {"connected"}


async def test_health_monitor_probes(cluster: DevCluster) -> None:
    async with connect(cluster, health_check_interval=0.2, health_check_timeout=5.0) as client:
        before = client._monitor.probes

        async def probed() -> bool:
            return client._monitor.probes > before

        await async_wait_until(probed, 15, "a health probe of the TLS + ACL cluster")
        assert (await client.get_stats()).health == "healthy"


async def test_memory_tier_coherence_links_come_up(cluster: DevCluster) -> None:
    async with connect(cluster, memory={"enabled": True}) as client:
        tier = client.stage("memory")
        await tier.start()  # type: ignore[attr-defined]
        assert tier.serving  # type: ignore[attr-defined]
        links = tier.coherence.link_states()  # type: ignore[attr-defined]
        assert len(links) == 3 and all(links.values())
        await client.set("tls:mem", "v")

        async def held() -> bool:
            return await client.get("tls:mem") == b"v" and tier.hits > 0  # type: ignore[attr-defined]

        await async_wait_until(held, 10, "a memory-tier hit")


async def test_wrong_password_is_a_clear_error_without_the_password(
    cluster: DevCluster,
) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    client = connect(cluster, password=wrong, socket_connect_timeout=5)
    try:
        with pytest.raises((AuthenticationError, RedisConnectionError)) as caught:
            await client.connect()
    finally:
        await client.disconnect()
    assert str(caught.value).strip()  # says something, whatever its wording today
    err: BaseException | None = caught.value
    for _ in range(10):  # nothing chained to it may carry a password either
        if err is None:
            break
        assert wrong not in str(err) and PASSWORD not in str(err)
        assert wrong not in repr(err) and PASSWORD not in repr(err)
        err = err.__cause__ or err.__context__


# --------------------------------------------------------------------------- the command line


def test_cli_ping_and_stats_with_the_variables_cluster_up_prints(cluster: DevCluster) -> None:
    env = cluster.client_environment
    assert env["REDIS_SSL"] == "true" and env["REDIS_PASSWORD"] == PASSWORD
    assert {"REDIS_SSL_CA_CERTS", "REDIS_SSL_CERTFILE", "REDIS_SSL_KEYFILE"} <= set(env)
    ping = run_cli("ping", env=env)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert ping.stdout.count("PONG") == 6
    stats = run_cli("stats", env=env)
    assert stats.returncode == 0, stats.stderr
    assert "health: healthy" in stats.stdout
    assert "6/6 connected, 3 primaries, 3 replicas" in stats.stdout


def test_cli_status_authenticates_from_another_process(
    cluster: DevCluster, runtime_dir: Path
) -> None:
    status = run_cli("cluster", "status", env={"XDG_RUNTIME_DIR": str(runtime_dir)})
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("alive=True") == 6
    assert status.stdout.count("cluster_state=ok") == 6
    assert sorted(status.stdout.count(f"role={role}") for role in ("master", "replica")) == [3, 3]
    assert PASSWORD not in status.stdout + status.stderr


# --------------------------------------------------------------------------- faults


def test_failover_and_rejoin_over_tls_with_the_acl_user(cluster: DevCluster) -> None:
    victim = cluster.primary_for_key("tls:failover")
    cluster.kill(victim)
    winner = cluster.wait_failover(victim)
    assert winner is not victim
    cluster.restart(victim)  # it logs in to its new primary with masteruser/masterauth
    cluster.wait_ready(timeout=30)
    assert cluster.admin(victim).role()[0] == "slave"
