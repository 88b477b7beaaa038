"""`resilient-cache cluster create` and `cluster check`, run as a user (or a Kubernetes Job) would.

Six plain `redis-server --cluster-enabled yes` processes are started here, each in its own
directory (nodes.conf is per node), on free loopback ports: launched by devcluster's
StandaloneServer (the one launcher of a plain server, which also retries a port race), never
formed by DevCluster. A password is set on them once they run, so every command the CLI sends
goes through AUTH with REDIS_PASSWORD, and the password is looked for in everything it prints.

The init Job of examples/kubernetes/redis-cluster is run here too: its command, read from
init-job.yaml, with the pods' names replaced by six such servers' addresses, on servers
configured as the StatefulSet configures its pods.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from resilient_cache.cli import main
from resilient_cache.cluster_admin import EXIT_USAGE, AdminError
from resilient_cache.cluster_create import plan_cluster, slot_ranges
from resilient_cache.config_values import ClusterNode
from resilient_cache.devcluster import StandaloneServer
from tests.integration.test_examples import KUBERNETES, REDIS_CLUSTER, read_block_yaml

PASSWORD = "t3st-Pa55-never-printed"
NODE_CONFIG = (
    "cluster-enabled yes",
    "cluster-config-file nodes.conf",
    "cluster-node-timeout 2000",
    "repl-diskless-sync yes",
    "repl-diskless-sync-delay 0",
)


def run_cli(
    *args: str, cwd: Path, password: str | None = PASSWORD, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "OTEL_"))}
    if password is not None:
        env["REDIS_PASSWORD"] = password
    result = subprocess.run(
        [sys.executable, "-m", "resilient_cache", *args],
        env=env,
        cwd=cwd,  # no .env or resilient_cache.toml of the checkout in the way
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert PASSWORD not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def connect(address: str, password: str | None = PASSWORD) -> redis.Redis:
    host, port = address.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), password=password, decode_responses=True)


def cluster_nodes(address: str) -> list[list[str]]:
    with connect(address) as client:
        return [line.split() for line in client.execute_command("CLUSTER", "NODES").splitlines()]


def topology(address: str) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """As ``address`` sees it: {primary address: its slot ranges}, {replica: its primary}."""
    lines = cluster_nodes(address)
    where = {fields[0]: fields[1].split("@")[0] for fields in lines}
    primaries = {where[f[0]]: tuple(f[8:]) for f in lines if "master" in f[2].split(",")}
    replicas = {where[f[0]]: where[f[3]] for f in lines if "slave" in f[2].split(",")}
    return primaries, replicas


@contextlib.contextmanager
def six_servers(base: Path, config: Sequence[str] = NODE_CONFIG) -> Iterator[list[str]]:
    """Six fresh servers (``config`` added to each one's redis.conf) with PASSWORD set."""
    servers: list[StandaloneServer] = []
    try:
        for n in range(6):
            server = StandaloneServer(base_dir=base / f"node{n}", extra_config=config)
            servers.append(server)
            server.start()
        for server in servers:
            with connect(server.address, password=None) as client:
                client.config_set("masterauth", PASSWORD)  # replicas log in to their primary
                client.config_set("requirepass", PASSWORD)
        yield [server.address for server in servers]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def six_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with six_servers(tmp_path_factory.mktemp("cluster-admin")) as addresses:
        yield addresses


def test_create_refuses_a_partly_formed_cluster_and_changes_nothing(six_nodes, tmp_path) -> None:
    first = six_nodes[0]
    with connect(first) as client:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 99)
    try:
        result = run_cli("cluster", "create", *six_nodes, "--timeout", "30", cwd=tmp_path)
        assert result.returncode == 4, (result.stdout, result.stderr)
        assert "partly formed" in result.stderr
        assert f"{first}: sees 100 slots assigned" in result.stderr
        assert "Nothing was changed." in result.stderr
        for address in six_nodes:  # no MEET, no slot: every node still alone
            assert len(cluster_nodes(address)) == 1
    finally:
        with connect(first) as client:
            client.execute_command("CLUSTER", "DELSLOTSRANGE", 0, 99)


def test_create_without_the_password_says_which_variable(six_nodes, tmp_path) -> None:
    result = run_cli("cluster", "create", *six_nodes, cwd=tmp_path, password=None)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "requires a password: set REDIS_PASSWORD" in result.stderr
    wrong = run_cli("cluster", "check", six_nodes[0], cwd=tmp_path, password="not-it")
    assert wrong.returncode == 2, (wrong.stdout, wrong.stderr)
    assert "refused the credentials" in wrong.stderr
    assert "not-it" not in wrong.stdout + wrong.stderr


def test_create_then_rerun_then_check_then_an_uncovered_slot(six_nodes, tmp_path) -> None:
    created = run_cli(
        "cluster", "create", *six_nodes, "--replicas", "1", "--timeout", "60", cwd=tmp_path
    )
    assert created.returncode == 0, (created.stdout, created.stderr)
    assert "forming a cluster of 6 nodes: 3 primaries, 3 replicas" in created.stdout
    assert created.stdout.rstrip().endswith("cluster ready"), created.stdout

    for address in six_nodes:
        with connect(address) as client:
            assert client.execute_command("CLUSTER", "INFO").startswith("cluster_state:ok")
    primaries, replicas = topology(six_nodes[0])
    assert len(primaries) == 3 and len(replicas) == 3, (primaries, replicas)
    assert sorted(replicas.values()) == sorted(primaries)  # one replica per primary
    assert sorted(primaries.values()) == [("0-5460",), ("10922-16383",), ("5461-10921",)]
    before = {address: topology(address) for address in six_nodes}
    assert all(view == before[six_nodes[0]] for view in before.values())  # one configuration

    again = run_cli(
        "cluster", "create", *six_nodes, "--replicas", "1", "--timeout", "60", cwd=tmp_path
    )
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert "already form a cluster" in again.stdout
    assert "forming" not in again.stdout
    assert {address: topology(address) for address in six_nodes} == before

    checked = run_cli("cluster", "check", six_nodes[3], "--replicas", "1", cwd=tmp_path)
    assert checked.returncode == 0, (checked.stdout, checked.stderr)
    assert checked.stdout.rstrip().endswith("cluster check: ok")
    assert "all 16384 slots are covered" in checked.stdout

    # Take one slot away from its owner: the check must fail and name it.
    slot = 6000
    owner = next(p for p, ranges in primaries.items() if "5461-10921" in ranges)
    with connect(owner) as client:
        client.execute_command("CLUSTER", "DELSLOTS", slot)
    broken = run_cli("cluster", "check", six_nodes[0], cwd=tmp_path)
    assert broken.returncode == 1, (broken.stdout, broken.stderr)
    uncovered = rf"^PROBLEM 1 slot not covered: {slot} \(according to [^)]*{owner}"
    assert re.search(uncovered, broken.stdout, re.M), broken.stdout
    assert broken.stdout.rstrip().endswith("found")

    # And create, on that cluster, refuses rather than repair it by guessing.
    refused = run_cli("cluster", "create", *six_nodes, "--timeout", "30", cwd=tmp_path)
    assert refused.returncode == 4, (refused.stdout, refused.stderr)
    assert f"{owner}: sees 16383 slots assigned" in refused.stderr
    assert topology(owner)[0][owner] == ("5461-5999", "6001-10921")


# -- the init Job of examples/kubernetes/redis-cluster, run for real ---------------------------


def _manifest(path: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = read_block_yaml(path.read_text())
    return manifest


def pod_config(host: str) -> list[str]:
    """The redis.conf of a StatefulSet pod, for a local server on ``host``.

    The ConfigMap's redis.conf, less what StandaloneServer sets per server (``port``, ``dir``)
    and with ``nodes.conf`` in the server's own directory; plus the options of the pod's
    ``redis-server`` command, with the pod's IP replaced by ``host``. The password options are
    left to six_servers, which sets the same values once the servers run.
    """
    config = _manifest(REDIS_CLUSTER / "configmap.yaml")
    statefulset = _manifest(REDIS_CLUSTER / "statefulset.yaml")
    lines = []
    for line in config["data"]["redis.conf"].splitlines():
        name, value = line.split(" ", 1)
        if name in ("port", "dir"):
            continue
        if name == "cluster-config-file":
            value = Path(value).name
        lines.append(f"{name} {value}")
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    for option, value in zip(command[2::2], command[3::2], strict=True):
        if value == "$(REDIS_PASSWORD)":
            continue
        assert value == "$(POD_IP)", f"{option} {value}: not simulated here"
        lines.append(f"{option.removeprefix('--')} {host}")
    return lines


def job_command(addresses: list[str]) -> tuple[list[str], dict[str, str]]:
    """The init Job's command and environment, for the local ``addresses`` instead of the pods.

    The command is init-job.yaml's, word for word, except for the six pods' DNS names
    (``<statefulset>-<n>.<service>:<port>``), each replaced by the address of the n-th server.
    The environment is the container's: a literal value as it is, the password Secret's key as
    the test's password; anything else is refused rather than guessed.
    """
    job = _manifest(REDIS_CLUSTER / "init-job.yaml")
    statefulset = _manifest(REDIS_CLUSTER / "statefulset.yaml")
    service = _manifest(REDIS_CLUSTER / "service.yaml")
    secret = _manifest(KUBERNETES / "secret.example.yaml")
    [container] = job["spec"]["template"]["spec"]["containers"]
    [client_port] = [p["port"] for p in service["spec"]["ports"] if p["name"] == "client"]
    pods = {
        f"{statefulset['metadata']['name']}-{n}.{service['metadata']['name']}:{client_port}": a
        for n, a in enumerate(addresses)
    }
    assert len(pods) == statefulset["spec"]["replicas"]
    command = list(container["command"])
    assert set(pods) <= set(command), (pods, command)
    argv = [pods.get(word, word) for word in command]
    # The command itself, as the image would run it: the package's console script.
    venv_bin = str(Path(sys.executable).parent)
    program = shutil.which(argv[0], path=os.pathsep.join([venv_bin, os.environ["PATH"]]))
    assert program, f"{argv[0]}: not installed next to {sys.executable}"
    argv[0] = program

    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "OTEL_"))}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] == "password", ref
        env[item["name"]] = PASSWORD
    return argv, env


def test_the_init_jobs_command_forms_the_cluster(tmp_path) -> None:
    """init-job.yaml's command, run as the Job's container would run it, on six fresh servers
    configured like the StatefulSet's pods: it forms the cluster and `cluster check` passes."""
    with six_servers(tmp_path / "pods", pod_config("127.0.0.1")) as addresses:
        for address in addresses:  # each configured as a pod: AOF on, nodes.conf, announce-ip
            with connect(address) as client:
                assert client.config_get("appendonly") == {"appendonly": "yes"}
                assert client.config_get("cluster-announce-ip") == {
                    "cluster-announce-ip": "127.0.0.1"
                }
            assert len(cluster_nodes(address)) == 1  # fresh: knows no other node
        argv, env = job_command(addresses)
        job = subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert PASSWORD not in job.stdout + job.stderr
        assert "Traceback" not in job.stderr, job.stderr
        assert job.returncode == 0, (argv, job.stdout, job.stderr)
        assert "forming a cluster of 6 nodes: 3 primaries, 3 replicas" in job.stdout
        assert job.stdout.rstrip().endswith("cluster ready"), job.stdout

        primaries, replicas = topology(addresses[0])
        assert len(primaries) == 3 and len(replicas) == 3, (primaries, replicas)
        assert sorted(replicas.values()) == sorted(primaries)
        checked = run_cli("cluster", "check", *addresses, "--replicas", "1", cwd=tmp_path)
        assert checked.returncode == 0, (checked.stdout, checked.stderr)
        assert checked.stdout.rstrip().endswith("cluster check: ok")

        # The Job run again (a retried or re-applied Job) changes nothing.
        again = subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert again.returncode == 0, (again.stdout, again.stderr)
        assert "already form a cluster" in again.stdout
        assert topology(addresses[0]) == (primaries, replicas)


# -- the plan and the arguments, without servers ---------------------------------------------


def nodes(*addresses: str) -> list[ClusterNode]:
    return [ClusterNode(a.split(":")[0], int(a.split(":")[1])) for a in addresses]


def test_plan_spreads_primaries_and_keeps_replicas_off_their_primary_host() -> None:
    plan = plan_cluster(nodes("a:1", "a:2", "b:1", "b:2", "c:1", "c:2"), replicas=1)
    assert [str(p) for p in plan.primaries] == ["a:1", "b:1", "c:1"]
    assert plan.slots == slot_ranges(3) == [(0, 5460), (5461, 10921), (10922, 16383)]
    assert len(plan.replicas) == 3
    assert all(replica.host != primary.host for replica, primary in plan.replicas)
    one_host = plan_cluster(nodes(*(f"h:{p}" for p in range(1, 8))), replicas=1)
    assert len(one_host.primaries) == 3 and len(one_host.replicas) == 4  # one extra replica
    sizes = [end - start + 1 for start, end in slot_ranges(7)]
    assert sum(sizes) == 16384 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("addresses", "replicas", "wanted"),
    [
        (("a:1", "a:2", "a:3", "a:4", "a:5"), 1, "a Redis Cluster needs at least 3"),
        (("a:1", "a:1", "a:2"), 0, "an address is given twice: a:1"),
    ],
)
def test_plan_refuses_what_cannot_be_a_cluster(addresses, replicas, wanted) -> None:
    with pytest.raises(AdminError, match=wanted) as caught:
        plan_cluster(nodes(*addresses), replicas)
    assert caught.value.exit_code == EXIT_USAGE


def test_bad_arguments_exit_2(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["cluster", "create", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]) == 2
    assert "at least 3: give at least 6 addresses" in capsys.readouterr().err
    assert main(["cluster", "check", "redis-1:abc"]) == 2
    assert "cluster check: 'redis-1:abc' has no valid port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["cluster", "create", "127.0.0.1:1", "--replicas", "-1"])
    assert usage.value.code == 2
