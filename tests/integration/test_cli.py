"""The `resilient-cache` command, run as a user would run it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "resilient_cache", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_configuration_error_is_one_line_and_exit_2() -> None:
    result = run("stats", env={"REDIS_CLUSTER_NODES": "redis-1:abc"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "resilient-cache: configuration error: REDIS_CLUSTER_NODES: 'redis-1:abc' has no valid port"
    ]
    assert "Traceback" not in result.stderr


def test_config_masks_secrets_and_names_sources(tmp_path) -> None:
    result = run(
        "config",
        env={
            "REDIS_CLUSTER_NODES": "a:7000",
            "REDIS_PASSWORD": "hunter2-secret",
            "REDIS_RETRY__MAX_RETRIES": "7",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2-secret" not in result.stdout
    assert 'password = "**********"  [environment]' in result.stdout
    assert "retry.max_retries = 7  [environment]" in result.stdout
    assert "breaker.threshold = 5  [default]" in result.stdout


def test_stats_ping_and_health_against_the_cluster(cluster_nodes) -> None:
    env = {"REDIS_CLUSTER_NODES": cluster_nodes}
    stats = run("stats", env=env)
    assert stats.returncode == 0, stats.stderr
    assert "health: healthy" in stats.stdout
    assert "6/6 connected, 3 primaries, 3 replicas" in stats.stdout
    ping = run("ping", env=env)
    assert ping.returncode == 0
    assert ping.stdout.count("PONG") == 6
    health = run("health", env=env)
    assert (health.returncode, health.stdout.strip()) == (0, "healthy")


def test_health_ready_stays_ready_while_degraded(cluster_nodes, devcluster) -> None:
    """Readiness for a pod: a dead replica makes the cluster degraded (`health` exits 1) but
    every slot is still served (`health --ready` exits 0); no cluster at all is not ready."""
    env = {"REDIS_CLUSTER_NODES": cluster_nodes, "REDIS_HEALTH_CHECK_TIMEOUT": "0.5"}
    ready = run("health", "--ready", env=env)
    assert (ready.returncode, ready.stdout.strip()) == (0, "healthy"), ready.stderr
    replica = devcluster.replicas()[0]
    devcluster.pause(replica)  # answers nothing: its INFO times out
    try:
        health = run("health", env=env)
        assert (health.returncode, health.stdout.strip()) == (1, "degraded"), health.stderr
        ready = run("health", "--ready", env=env)
        assert (ready.returncode, ready.stdout.strip()) == (0, "degraded"), ready.stderr
    finally:
        devcluster.resume(replica)
    devcluster.wait_ready(timeout=30)
    gone = run(
        "health",
        "--ready",
        env={"REDIS_CLUSTER_NODES": "127.0.0.1:1", "REDIS_SOCKET_CONNECT_TIMEOUT": "0.5"},
    )
    assert gone.returncode == 1


def test_unreachable_cluster_is_a_clear_error() -> None:
    result = run(
        "stats", env={"REDIS_CLUSTER_NODES": "127.0.0.1:1", "REDIS_SOCKET_CONNECT_TIMEOUT": "0.5"}
    )
    assert result.returncode == 1
    assert "Unable to connect to cluster" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("state_dir", ["state"])
@pytest.mark.parametrize("secured", [False, True], ids=["plain", "tls-acl"])
def test_cluster_up_status_down(tmp_path, state_dir, secured) -> None:
    # The state file goes under XDG_RUNTIME_DIR only when that directory exists; without it,
    # it would be the user's /tmp one, shared with a dev cluster they may be running.
    (tmp_path / state_dir).mkdir()
    env = {"XDG_RUNTIME_DIR": str(tmp_path / state_dir)}
    password = "it's a secret"  # quoted for the shell in what `cluster up` prints
    # Plain: a cluster that serves partially; secured: Redis's default (full coverage).
    options = ["--tls", "--acl", f"ci:{password}"] if secured else ["--no-full-coverage"]
    up = run("cluster", "up", *options, env=env, timeout=90)
    assert up.returncode == 0, up.stderr
    assert "export REDIS_CLUSTER_NODES=127.0.0.1:" in up.stdout
    exports = dict(
        shlex.split(line)[1].split("=", 1)
        for line in up.stdout.splitlines()
        if line.startswith("export ")
    )
    try:
        if secured:
            assert exports["REDIS_SSL"] == "true"
            assert exports["REDIS_USERNAME"] == "ci" and exports["REDIS_PASSWORD"] == password
            for name in ("REDIS_SSL_CA_CERTS", "REDIS_SSL_CERTFILE", "REDIS_SSL_KEYFILE"):
                assert os.path.isfile(exports[name]), name
            ping = run("ping", env=exports)  # what `cluster up` printed is all a client needs
            assert ping.returncode == 0, ping.stdout + ping.stderr
            assert ping.stdout.count("PONG") == 6
        else:
            assert list(exports) == ["REDIS_CLUSTER_NODES"]
        status = run("cluster", "status", env=env)
        assert status.returncode == 0
        assert status.stdout.count("alive=True") == 6
        assert status.stdout.count("cluster_state=ok") == 6  # it could log in
        state = tmp_path / state_dir / "resilient-cache" / "devcluster.json"
        assert state.is_file()
        assert password not in state.read_text()
        from resilient_cache.devcluster import DevCluster

        handle = DevCluster.load_state(state)
        admin = handle.admin(handle.nodes[0])
        try:
            coverage = admin.config_get("cluster-require-full-coverage")
        finally:
            admin.close()
        assert coverage == {"cluster-require-full-coverage": "yes" if secured else "no"}
    finally:
        down = run("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr
    again = run("cluster", "status", env=env)
    assert again.returncode == 1
    assert "no local cluster is running" in again.stderr


def test_quickstart_example_runs(cluster_nodes) -> None:
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "quickstart.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    env["REDIS_CLUSTER_NODES"] = cluster_nodes
    result = subprocess.run(
        [sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "GET mykey -> b'myvalue'" in result.stdout
    assert "Connected nodes: 6/6" in result.stdout
    assert "Health: healthy" in result.stdout
    assert "Success rate: 100.0%" in result.stdout
