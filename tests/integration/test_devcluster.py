"""Integration tests for resilient_cache.devcluster against real redis-server processes.

These start real clusters (about 2 s each on a small machine), so the read-mostly
checks share one module-scoped cluster. Tests that hurt that cluster (kill, pause)
leave it ready again with 3 primaries and 3 replicas, so test order does not matter.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from resilient_cache import devcluster
from resilient_cache.devcluster import (
    DevCluster,
    DevClusterError,
    DevNode,
    default_state_path,
    find_redis_server,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def redis_running(pid: int, port: int) -> bool:
    """True if ``pid`` is a live (non-zombie) redis-server for ``port``, per /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and "redis-server" in cmdline and f":{port}" in cmdline


def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``condition`` with a deadline; fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def cluster_client(cluster: DevCluster) -> RedisCluster:
    # Every node as a startup node: the first one may be the one a test killed.
    nodes = [ClusterNode(n.host, n.port) for n in cluster.nodes]  # type: ignore[no-untyped-call]
    return RedisCluster(startup_nodes=nodes, decode_responses=True, socket_timeout=5)


def role_of(cluster: DevCluster, node: DevNode) -> str:
    return str(cluster.admin(node).role()[0])


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    with DevCluster() as dev:
        yield dev


# --------------------------------------------------------------------------- topology


def test_cluster_has_three_primaries_and_three_replicas(cluster: DevCluster) -> None:
    nodes = cluster.nodes
    assert len(nodes) == 6
    assert len({node.port for node in nodes}) == 6
    assert cluster.startup_nodes == ",".join(f"127.0.0.1:{node.port}" for node in nodes)

    primaries, replicas = cluster.primaries(), cluster.replicas()
    assert len(primaries) == 3
    assert len(replicas) == 3
    # Every primary has its own replica, and ROLE on each replica agrees.
    paired = {cluster.replica_of(primary) for primary in primaries}
    assert paired == set(replicas)
    for primary in primaries:
        replica = cluster.replica_of(primary)
        assert replica is not None
        assert int(cluster.admin(replica).role()[2]) == primary.port


def test_every_node_is_ok_and_every_replica_linked(cluster: DevCluster) -> None:
    for node in cluster.nodes:
        info = cluster.cluster_info(node)
        assert info["cluster_state"] == "ok", node.address
        assert info["cluster_slots_assigned"] == "16384", node.address
        assert info["cluster_known_nodes"] == "6", node.address
        # Loopback only, never a wildcard address.
        assert cluster.admin(node).config_get("bind")["bind"] == "127.0.0.1"
        assert node.process is not None
        assert redis_running(node.pid, node.port)
    for replica in cluster.replicas():
        assert cluster.info(replica, "replication")["master_link_status"] == "up"
    cluster.wait_ready(timeout=5)


def test_key_round_trip_and_primary_for_key(cluster: DevCluster) -> None:
    client = cluster_client(cluster)
    try:
        assert client.set("devcluster:greeting", "hello")
        assert client.get("devcluster:greeting") == "hello"
    finally:
        client.close()
    owner = cluster.primary_for_key("devcluster:greeting")
    assert owner in cluster.primaries()
    # A plain GET on the owner answers directly (no MOVED), proving the routing is right.
    assert cluster.admin(owner).get("devcluster:greeting") == "hello"
    # The write reaches the owner's replica.
    assert cluster.admin(owner).wait(1, 5000) == 1


# --------------------------------------------------------------------------- faults


def test_kill_primary_fails_over_and_restart_rejoins_as_replica(cluster: DevCluster) -> None:
    client = cluster_client(cluster)
    try:
        client.set("devcluster:survivor", "still-here")
        victim = cluster.primary_for_key("devcluster:survivor")
        heir = cluster.replica_of(victim)
        assert heir is not None
        assert cluster.admin(victim).wait(1, 5000) == 1  # the replica has the key

        cluster.kill(victim)
        assert not redis_running(victim.pid, victim.port)
        # Straight after the crash the cluster is not ready, and the error says why.
        with pytest.raises(DevClusterError, match=victim.address):
            cluster.wait_ready(timeout=0.2)

        began = time.monotonic()
        new_primary = cluster.wait_failover(victim, timeout=30)
        took = time.monotonic() - began
        assert new_primary is heir
        assert role_of(cluster, heir) == "master"
        assert cluster.primary_for_key("devcluster:survivor") is heir
        assert took < 30
    finally:
        client.close()

    client = cluster_client(cluster)
    try:
        assert client.get("devcluster:survivor") == "still-here"
    finally:
        client.close()

    cluster.restart(victim)
    assert redis_running(victim.pid, victim.port)
    cluster.wait_ready(timeout=30)
    assert role_of(cluster, victim) == "slave"
    assert cluster.replica_of(heir) is victim
    assert len(cluster.primaries()) == 3
    assert len(cluster.replicas()) == 3


def test_paused_primary_fails_over_and_resumes_as_replica(cluster: DevCluster) -> None:
    victim = cluster.primaries()[0]
    heir = cluster.replica_of(victim)
    assert heir is not None
    cluster.pause(victim)
    try:
        assert cluster.wait_failover(victim, timeout=30) is heir
        assert victim not in cluster.primaries()  # paused nodes are not asked
        assert [row["paused"] for row in cluster.status() if row["port"] == victim.port] == [True]
    finally:
        cluster.resume(victim)
    cluster.wait_ready(timeout=30)
    assert role_of(cluster, victim) == "slave"
    assert cluster.replica_of(heir) is victim


def test_node_restarted_from_a_short_lived_thread_survives_it(cluster: DevCluster) -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits; asyncio.to_thread
    # workers are such threads. The server must outlive the thread that restarted it.
    replica = cluster.replicas()[0]
    primary_port = int(cluster.admin(replica).role()[2])
    cluster.kill(replica)
    failures: list[BaseException] = []

    def restart() -> None:
        try:
            cluster.restart(replica)
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=restart)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert failures == []
    cluster.wait_ready(timeout=30)
    assert redis_running(replica.pid, replica.port)
    assert cluster.replica_of(cluster.node_by_port(primary_port)) is replica


def test_restart_refuses_a_running_node(cluster: DevCluster) -> None:
    with pytest.raises(DevClusterError, match="still running"):
        cluster.restart(cluster.nodes[0])


# --------------------------------------------------------------------------- lifecycle


def test_stop_leaves_no_process_and_removes_dir() -> None:
    dev = DevCluster().start()
    nodes = [(node.pid, node.port) for node in dev.nodes]
    base_dir = dev.base_dir
    assert base_dir is not None and os.path.isdir(base_dir)
    # A paused server must still be stopped (stop() sends SIGCONT first).
    dev.pause(dev.replicas()[0])
    dev.stop()
    assert not any(redis_running(pid, port) for pid, port in nodes)
    # Our own children are reaped too: no /proc entry at all, not even a zombie.
    assert [pid for pid, _ in nodes if os.path.exists(f"/proc/{pid}")] == []
    assert not os.path.exists(base_dir)
    dev.stop()  # idempotent


def test_given_base_dir_is_kept_and_extra_config_applied(tmp_path: Path) -> None:
    base_dir = tmp_path / "single"
    with DevCluster(
        base_dir=str(base_dir),
        primaries=1,
        replicas_per_primary=0,
        extra_config=["maxmemory 10mb"],
    ) as dev:
        (node,) = dev.nodes
        assert dev.cluster_info(node)["cluster_state"] == "ok"
        assert dev.admin(node).config_get("maxmemory")["maxmemory"] == str(10 * 1024 * 1024)
        assert Path(node.dir).parent == base_dir
        assert Path(node.dir, "nodes.conf").exists()
        pid, port = node.pid, node.port
    assert not redis_running(pid, port)
    assert base_dir.is_dir()


def test_start_retries_with_new_ports_after_a_port_race(monkeypatch: pytest.MonkeyPatch) -> None:
    real_pick = devcluster._pick_free_ports
    with socket.socket() as squatter:
        # Simulate losing the race: the first pick hands out a port someone else
        # has bound since it was probed.
        taken = real_pick("127.0.0.1", 1)[0]
        squatter.bind(("127.0.0.1", taken))
        picks: list[list[int]] = []

        def pick(host: str, count: int) -> list[int]:
            ports = [taken] if not picks else real_pick(host, count)
            picks.append(ports)
            return ports

        monkeypatch.setattr(devcluster, "_pick_free_ports", pick)
        with DevCluster(primaries=1, replicas_per_primary=0) as dev:
            assert len(picks) == 2
            assert dev.nodes[0].port != taken
            assert dev.cluster_info(dev.nodes[0])["cluster_state"] == "ok"


def test_detached_cluster_can_be_loaded_from_state_and_stopped(tmp_path: Path) -> None:
    state = tmp_path / "state" / "devcluster.json"
    original = DevCluster(tie_to_parent=False, state_path=str(state)).start()
    try:
        assert state.exists()
        base_dir = original.base_dir
        assert base_dir is not None
        # Detached servers lead their own session so a terminal's signals miss them.
        assert all(os.getsid(node.pid) == node.pid for node in original.nodes)

        # A second cluster must not overwrite the record of a running one.
        with pytest.raises(DevClusterError, match="still running"):
            DevCluster(tie_to_parent=False, state_path=str(state)).start()

        loaded = DevCluster.load_state(state)
        assert loaded.startup_nodes == original.startup_nodes
        assert all(node.process is None for node in loaded.nodes)
        rows = loaded.status()
        assert [row["alive"] for row in rows] == [True] * 6
        assert {row["cluster_state"] for row in rows} == {"ok"}
        assert sorted(str(row["role"]) for row in rows) == ["master"] * 3 + ["replica"] * 3

        loaded.stop()
        assert not any(redis_running(node.pid, node.port) for node in original.nodes)
        assert not os.path.exists(base_dir)
        assert not state.exists()
        assert [row["alive"] for row in loaded.status()] == [False] * 6
    finally:
        original.stop()  # reaps the children; harmless if already stopped


def test_servers_die_with_their_python_process(tmp_path: Path) -> None:
    script = (
        "import json, signal\n"
        "from resilient_cache.devcluster import DevCluster\n"
        "dev = DevCluster().start()\n"
        "print(json.dumps({'nodes': [[n.pid, n.port] for n in dev.nodes],"
        " 'dir': dev.base_dir}), flush=True)\n"
        "signal.pause()\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with (tmp_path / "child.err").open("wb") as errors:
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=errors, env=env
        )
    nodes: list[list[int]] = []
    base_dir = None
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)
        line = child.stdout.readline() if ready else b""
        assert line, "child did not report its cluster: " + (tmp_path / "child.err").read_text()
        report = json.loads(line)
        nodes, base_dir = report["nodes"], report["dir"]
        assert len(nodes) == 6
        assert all(redis_running(pid, port) for pid, port in nodes)

        child.kill()  # SIGKILL: no atexit, no finally, only PR_SET_PDEATHSIG can help
        child.wait(timeout=10)
        poll(
            lambda: not any(redis_running(pid, port) for pid, port in nodes),
            timeout=10,
            what="the orphaned redis-servers to die",
        )
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid, port in nodes:  # never leak servers, even when the test fails
            if redis_running(pid, port):
                os.kill(pid, signal.SIGKILL)
        if base_dir:
            shutil.rmtree(base_dir, ignore_errors=True)


# --------------------------------------------------------------------------- small pieces


def test_find_redis_server_honours_env_and_explains_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = find_redis_server()
    monkeypatch.setenv("REDIS_SERVER_BIN", real)
    assert find_redis_server() == real

    monkeypatch.setenv("REDIS_SERVER_BIN", str(tmp_path / "no-such-redis"))
    with pytest.raises(DevClusterError, match="REDIS_SERVER_BIN"):
        find_redis_server()

    monkeypatch.delenv("REDIS_SERVER_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DevClusterError, match="apt-get install redis-server"):
        find_redis_server()


def test_wait_for_returns_value_or_names_what_timed_out() -> None:
    dev = DevCluster()
    assert dev.wait_for(lambda: 42, timeout=1, what="the answer") == 42

    def unreachable() -> bool:
        raise redis.ConnectionError("nobody home")

    with pytest.raises(DevClusterError, match=r"the impossible.*nobody home"):
        dev.wait_for(unreachable, timeout=0.2, what="the impossible")


def test_only_loopback_hosts_are_accepted() -> None:
    with pytest.raises(ValueError, match="loopback"):
        DevCluster(host="0.0.0.0")


def test_default_state_path_is_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_state_path() == tmp_path / "resilient-cache" / "devcluster.json"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert str(os.getuid()) in str(default_state_path())
