"""The examples, run as a user would run them, against the real local Redis Cluster.

examples/kubernetes has no Kubernetes cluster to be applied to here. Its manifests are parsed
and their structure checked (test_kubernetes_manifests). No YAML library is installed in the
project's environment and PyYAML must not become a dependency, so they are parsed by
read_block_yaml below: a small reader of the block-style subset they are written in, which
refuses everything else rather than guess (its own test shows both).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from resilient_cache import parse_cluster_nodes
from tests.conftest import wait_until

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"


def example_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "OTEL_"))}
    env.update(extra)
    return env


def plain_cluster(cluster_nodes: str) -> redis.RedisCluster:
    node = parse_cluster_nodes(cluster_nodes)[0]
    return redis.RedisCluster(host=node.host, port=node.port, socket_timeout=5)


# -- examples/multilayer_cache.py ----------------------------------------------------------


def test_multilayer_cache_example_runs(cluster_nodes, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "multilayer_cache.py")],
        env=example_env(REDIS_CLUSTER_NODES=cluster_nodes),
        cwd=tmp_path,  # no .env or resilient_cache.toml of the checkout in the way
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        "single flight: 100 concurrent get_or_set of user:456, loader called 1 time(s), "
        "all got the same value: True" in out
    ), out
    assert "after delete: get user:123 -> None, still in Redis: False" in out
    assert re.search(r"^  memory_hits +1$", out, re.M), out
    assert re.search(r"^  loads +2$", out, re.M), out
    assert re.search(r"^  errors +0$", out, re.M), out
    assert "cleaned up: 0 example key(s) left" in out
    rc = plain_cluster(cluster_nodes)
    try:
        assert rc.exists("example:cache:user:123", "example:cache:user:456") == 0
    finally:
        rc.close()


def test_multilayer_cache_example_without_nodes_says_so(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "multilayer_cache.py")],
        env=example_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout.startswith("set REDIS_CLUSTER_NODES=")


# -- examples/graceful_shutdown.py ---------------------------------------------------------


class LineReader:
    """Lines of a pipe, read by a thread, so that the test can wait for one with a deadline."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)  # end of stream

    def wait_for(self, wanted: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line {wanted!r} within {timeout}s: {self.lines}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended without {wanted!r}: {self.lines}")
            self.lines.append(line)
            if line == wanted:
                return

    def rest(self, timeout: float) -> list[str]:
        """Every remaining line, once the stream has ended."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stdout still open"
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        return self.lines


@pytest.mark.parametrize(
    ("signum", "work"),
    # With 10 ms of work between a job's INCR and its SET, the signal nearly always comes
    # in the middle of a job, which must then be finished, not cut short.
    [(signal.SIGTERM, "0.01"), (signal.SIGINT, "0")],
    ids=["SIGTERM-mid-job", "SIGINT-no-work"],
)
def test_graceful_shutdown_loses_no_acknowledged_write(
    cluster_nodes, tmp_path, signum, work
) -> None:
    workers = 4
    count_keys = [f"example:shutdown:{{w{n}}}:count" for n in range(workers)]
    last_keys = [f"example:shutdown:{{w{n}}}:last" for n in range(workers)]
    stderr_path = tmp_path / "stderr.txt"  # a file: a full stderr pipe would block the worker
    rc = plain_cluster(cluster_nodes)
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLES / "graceful_shutdown.py"),
                *("--workers", str(workers), "--work", work),
            ],
            env=example_env(REDIS_CLUSTER_NODES=cluster_nodes, REDIS_DRAIN_TIMEOUT="5"),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        stdout = LineReader(process.stdout)
        stdout.wait_for("ready", timeout=30)

        def counted(key: str) -> bool:
            value = rc.get(key)
            return value is not None and int(value) >= 20

        # Shut down in the middle of real work: every worker is past 20 jobs.
        for key in count_keys:
            wait_until(lambda key=key: counted(key), 30, f"{key} >= 20")
        process.send_signal(signum)
        assert process.wait(timeout=30) == 0, stderr_path.read_text()
        lines = stdout.rest(timeout=10)
        assert stderr_path.read_text() == ""

        summary = [line for line in lines if line.startswith("shutdown: ")]
        match = re.fullmatch(
            rf"shutdown: {workers} workers stopped, (\d+) commands acknowledged, 0 errors",
            summary[0] if len(summary) == 1 else "",
        )
        assert match, lines
        acknowledged = {
            int(m.group(1)): int(m.group(2))
            for line in lines
            if (m := re.fullmatch(r"worker (\d+): (\d+) increments acknowledged \(.*\)", line))
        }
        assert sorted(acknowledged) == list(range(workers)), lines
        # No acknowledged INCR lost, none run twice: each key holds what its worker reports,
        assert [int(rc.get(key)) for key in count_keys] == [acknowledged[n] for n in range(workers)]
        # and each :last key the final count (the SET of the last job, which completed).
        assert [int(rc.get(key)) for key in last_keys] == [acknowledged[n] for n in range(workers)]
        # Per job INCR, SET and GET, plus one EXPIRE per worker.
        assert int(match.group(1)) == 3 * sum(acknowledged.values()) + workers
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        rc.delete(*count_keys, *last_keys)
        rc.close()


def test_readiness_probe_command_fails_when_no_node_answers(tmp_path) -> None:
    """The probe of deployment.yaml must exit non-zero when Redis cannot be reached."""
    result = subprocess.run(
        [sys.executable, "-m", "resilient_cache", "health", "--ready"],
        env=example_env(REDIS_CLUSTER_NODES="127.0.0.1:1", REDIS_SOCKET_CONNECT_TIMEOUT="0.5"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, (result.stdout, result.stderr)


# -- examples/kubernetes --------------------------------------------------------------------

KUBERNETES = EXAMPLES / "kubernetes"
_KEY = re.compile(r"([A-Za-z0-9_.\-/]+):(?: +(.*))?")


def read_block_yaml(text: str) -> Any:
    """Read the block-style YAML subset the manifests are written in, and refuse the rest.

    PyYAML is not a dependency of the project (and no YAML parser is installed in its
    environment), so this is a small reader for exactly what the manifests use: one document,
    block mappings and sequences (``- `` items, also mappings), ``#`` comments, plain, single-
    and double-quoted scalars (plain ones typed as true/false, null, integers, else strings).
    Anything else (flow collections, anchors, tags, block scalars, tabs, several documents,
    duplicate keys) raises ValueError, so a manifest cannot drift into syntax that this test
    would misread. By hand the same files were also loaded with PyYAML, outside the project,
    with the same result.
    """
    lines: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw:
            raise ValueError(f"line {number}: tab")
        content = _strip_comment(raw).rstrip()
        if not content.strip() or (not lines and content == "---"):
            continue
        lines.append((len(content) - len(content.lstrip(" ")), content.strip()))

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                rest = lines[i][1][2:].lstrip(" ")
                if _KEY.fullmatch(rest):  # "- key: value" opens a mapping
                    lines[i] = (indent + len(lines[i][1]) - len(rest), rest)
                    item, i = block(i, lines[i][0])
                else:
                    item, i = scalar(rest), i + 1
                items.append(item)
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            match = _KEY.fullmatch(lines[i][1])
            if not match or match.group(1) in mapping:
                raise ValueError(f"not a new 'key: value': {lines[i]}")
            key, value = match.groups()
            i += 1
            if value is not None:
                mapping[key] = scalar(value)
            elif i < len(lines) and (
                lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("- "))
            ):
                mapping[key], i = block(i, lines[i][0])
            else:
                mapping[key] = None
        return mapping, i

    document, end = block(0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"unexpected indentation: {lines[end]}")
    return document


def _strip_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i]
    return line


def scalar(text: str) -> Any:
    if text[0] == '"':
        return json.loads(text)  # no YAML-only escapes in these files
    if text[0] == "'" and text.endswith("'"):
        return text[1:-1].replace("''", "'")
    if text[0] in "[]{}&*!|>%@`'" or text == "---":
        raise ValueError(f"outside the YAML subset this test reads: {text!r}")
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", text):
        return int(text)
    if text in ("true", "false", "null", "~"):
        return {"true": True, "false": False}.get(text)
    # Words and numbers that YAML (1.1 or 1.2) may read as a bool, a float, a hex or octal
    # number or a time: refused, quote them.
    if re.fullmatch(r"(?i:y|n|yes|no|on|off|true|false|null)", text) or re.fullmatch(
        r"[-+]?(\.?[0-9]|0[xXoObB])[0-9a-fA-F_.:eE+-]*", text
    ):
        raise ValueError(f"a plain scalar YAML may read otherwise; quote it: {text!r}")
    return text


def test_the_yaml_reader_reads_yaml_and_refuses_the_rest() -> None:
    text = """
# a comment
a: 1
b: "x # not a comment"  # a comment
c:
  - name: first
    value: 'it''s'
  - plain
d:
- true
e:
  f: null
"""
    assert read_block_yaml(text) == {
        "a": 1,
        "b": "x # not a comment",
        "c": [{"name": "first", "value": "it's"}, "plain"],
        "d": [True],
        "e": {"f": None},
    }
    assert read_block_yaml("cpu: 100m\nmemory: 128Mi\nport: 6379\nv: 1.0.0x") == {
        "cpu": "100m",
        "memory": "128Mi",
        "port": 6379,
        "v": "1.0.0x",
    }
    for bad in (
        *("a: [1, 2]", "a: &x 1", "a: |\n  text", "a: 1\na: 2", "a:\n\tb: 1", "a: 1\n  b: 2"),
        *("a: yes", "a: Off", "a: 0.5", "a: 007", "a: 0x1F", "a: 1e3", "a: 10:30"),
    ):
        with pytest.raises(ValueError):
            read_block_yaml(bad)


def documented_names() -> set[str]:
    """Every REDIS_* and OTEL_* variable the configuration and observability docs name."""
    text = (ROOT / "docs" / "configuration.md").read_text() + (
        ROOT / "docs" / "observability.md"
    ).read_text()
    return set(re.findall(r"`((?:REDIS|OTEL)_[A-Z0-9_]*[A-Z0-9])`", text))


def test_kubernetes_manifests() -> None:
    """Structure only (parsed with read_block_yaml): nothing applies them to a cluster."""
    manifests = {path.name: read_block_yaml(path.read_text()) for path in KUBERNETES.glob("*.yaml")}
    assert sorted(manifests) == ["configmap.yaml", "deployment.yaml", "secret.example.yaml"]
    for name, manifest in manifests.items():
        assert {"apiVersion", "kind", "metadata"} <= set(manifest), name
        assert manifest["metadata"]["name"], name
    config, deployment, secret = (
        manifests["configmap.yaml"],
        manifests["deployment.yaml"],
        manifests["secret.example.yaml"],
    )
    assert (config["kind"], deployment["kind"], secret["kind"]) == (
        "ConfigMap",
        "Deployment",
        "Secret",
    )
    documented = documented_names()
    assert {"REDIS_CLUSTER_NODES", "REDIS_DRAIN_TIMEOUT", "OTEL_SERVICE_NAME"} <= documented

    # The ConfigMap: documented names only, and nodes that the client accepts.
    assert set(config["data"]) <= documented
    assert parse_cluster_nodes(config["data"]["REDIS_CLUSTER_NODES"])

    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:2] == ["python", "/app/graceful_shutdown.py"]  # exec form
    env = {item["name"]: item for item in container["env"]}
    assert len(env) == len(container["env"]), "a variable is set twice"
    assert set(env) <= documented, set(env) - documented
    assert {
        "REDIS_CLUSTER_NODES",
        "REDIS_PASSWORD",
        "REDIS_DRAIN_TIMEOUT",
        "OTEL_SERVICE_NAME",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    } <= set(env)

    # Every ConfigMap reference names this ConfigMap and one of its keys.
    for item in env.values():
        ref = item.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            assert ref["name"] == config["metadata"]["name"]
            assert ref["key"] in config["data"]

    # The password comes from the Secret by reference, never as a value in the Deployment.
    password = env["REDIS_PASSWORD"]
    assert "value" not in password
    ref = password["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    deployment_text = (KUBERNETES / "deployment.yaml").read_text()
    for placeholder in secret["stringData"].values():
        assert placeholder not in deployment_text
    assert "PLACEHOLDER" in secret["stringData"]["password"]  # visibly not a real password

    # The worker needs up to twice the drain timeout (workers, then disconnect()) before the
    # SIGKILL that follows terminationGracePeriodSeconds.
    drain = float(env["REDIS_DRAIN_TIMEOUT"]["value"])
    assert pod["terminationGracePeriodSeconds"] > 2 * drain

    probe = container["readinessProbe"]
    assert probe["exec"]["command"] == ["python", "-m", "resilient_cache", "health", "--ready"]
    assert probe["timeoutSeconds"] >= 5
    assert "livenessProbe" not in container
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])


# -- examples/kubernetes/redis-cluster ------------------------------------------------------

REDIS_CLUSTER = KUBERNETES / "redis-cluster"


def _within(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = {item["name"]: item for item in container["env"]}
    assert len(env) == len(container["env"]), "a variable is set twice"
    return env


def test_redis_cluster_manifests() -> None:
    """Structure and cross-references (parsed with read_block_yaml), as for the worker above.

    Nothing applies them to a cluster here; by hand they also passed
    `kubernetes-validate --strict` for Kubernetes 1.30 and 1.37 (see their README.md).
    """
    from resilient_cache.cli import _parser
    from resilient_cache.cluster_admin import EXIT_REFUSED, EXIT_USAGE
    from resilient_cache.devcluster import BUS_PORT_OFFSET

    manifests = {p.name: read_block_yaml(p.read_text()) for p in REDIS_CLUSTER.glob("*.yaml")}
    assert {name: (m["apiVersion"], m["kind"]) for name, m in manifests.items()} == {
        "configmap.yaml": ("v1", "ConfigMap"),
        "service.yaml": ("v1", "Service"),
        "statefulset.yaml": ("apps/v1", "StatefulSet"),
        "poddisruptionbudget.yaml": ("policy/v1", "PodDisruptionBudget"),
        "networkpolicy.yaml": ("networking.k8s.io/v1", "NetworkPolicy"),
        "init-job.yaml": ("batch/v1", "Job"),
    }
    assert all(m["metadata"]["name"] for m in manifests.values())
    config, service, statefulset, budget, policy, job = (
        manifests[name]
        for name in (
            "configmap.yaml",
            "service.yaml",
            "statefulset.yaml",
            "poddisruptionbudget.yaml",
            "networkpolicy.yaml",
            "init-job.yaml",
        )
    )
    worker, worker_config, secret = (
        read_block_yaml((KUBERNETES / name).read_text())
        for name in ("deployment.yaml", "configmap.yaml", "secret.example.yaml")
    )
    # One namespace for all, the one they are applied in: the pods' DNS names in the Job's
    # command and the worker's seed nodes are short names, which resolve only there.
    for manifest in (*manifests.values(), worker, worker_config, secret):
        assert "namespace" not in manifest["metadata"], manifest["metadata"]

    # The StatefulSet: six pods behind the headless Service, which resolves them before they
    # are ready (the init Job needs their names first).
    spec = statefulset["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert _within(spec["selector"]["matchLabels"], pod_labels)
    assert spec["replicas"] == 6
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert _within(service["spec"]["selector"], pod_labels)
    assert {p["port"] for p in service["spec"]["ports"]} == {6379, 16379}

    pod = spec["template"]["spec"]
    [redis_container] = pod["containers"]
    assert {p["containerPort"] for p in redis_container["ports"]} == {6379, 16379}
    # Each port of the Service leads to the container's port of the same name (by number or
    # by name), and the probes knock on the client port.
    container_ports = {p["name"]: p["containerPort"] for p in redis_container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in (port["name"], container_ports[port["name"]]), port
    client_port = container_ports["client"]
    liveness = redis_container["livenessProbe"]["tcpSocket"]["port"]
    assert liveness in ("client", client_port)
    assert "redis-cli -h 127.0.0.1 ping" in " ".join(
        redis_container["readinessProbe"]["exec"]["command"]
    )  # redis-cli's default port, 6379, is the client port (redis.conf below)
    assert {"cpu", "memory"} <= set(redis_container["resources"]["requests"])
    assert "memory" in redis_container["resources"]["limits"]
    [term] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert _within(term["podAffinityTerm"]["labelSelector"]["matchLabels"], pod_labels)

    # redis.conf from the ConfigMap, nodes.conf and the data on the claimed volume.
    mounts = {m["name"]: m["mountPath"] for m in redis_container["volumeMounts"]}
    [claim] = spec["volumeClaimTemplates"]
    assert set(mounts) == {v["name"] for v in pod["volumes"]} | {claim["metadata"]["name"]}
    assert claim["spec"]["resources"]["requests"]["storage"]
    data = mounts[claim["metadata"]["name"]]
    [config_volume] = [v for v in pod["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == config["metadata"]["name"]
    command = redis_container["command"]
    assert command[:2] == ["redis-server", f"{mounts[config_volume['name']]}/redis.conf"]
    conf = dict(line.split(" ", 1) for line in config["data"]["redis.conf"].splitlines())
    assert conf["cluster-enabled"] == "yes"
    assert int(conf["cluster-node-timeout"]) > 0
    assert conf["dir"] == data
    assert conf["cluster-config-file"].startswith(data + "/")
    assert conf["port"] == "6379" == str(client_port)
    # The cluster bus listens on the client port + 10000 (no cluster-port in redis.conf).
    assert "cluster-port" not in conf
    assert container_ports["cluster-bus"] == client_port + BUS_PORT_OFFSET

    # The announced IP is the pod's, through the downward API; every $(VAR) is a variable of the
    # container (Kubernetes would pass an unknown one on literally); the password only by
    # reference to the Secret the worker reads.
    env = _env(redis_container)
    options = dict(zip(command[2::2], command[3::2], strict=True))
    assert options["--cluster-announce-ip"] == "$(POD_IP)"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert set(re.findall(r"\$\(([A-Z_]+)\)", " ".join(command))) <= set(env)
    assert options["--requirepass"] == options["--masterauth"] == "$(REDIS_PASSWORD)"
    worker_env = _env(worker["spec"]["template"]["spec"]["containers"][0])
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"] == worker_env["REDIS_PASSWORD"]["valueFrom"]
    assert (
        worker_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
        == (secret["metadata"]["name"])
    )
    assert worker_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]

    # At most one Redis pod down for a drain or an upgrade.
    assert _within(budget["spec"]["selector"]["matchLabels"], pod_labels)
    assert budget["spec"]["maxUnavailable"] == 1

    # The NetworkPolicy admits the Redis pods to each other (client port and cluster bus), the
    # worker and the init Job to the client port, and nobody else.
    assert _within(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]

    def admitted(labels: dict[str, str]) -> set[int]:
        ports: set[int] = set()
        for rule in policy["spec"]["ingress"]:
            assert rule["from"], "a rule without 'from' admits every pod"
            if any(_within(peer["podSelector"]["matchLabels"], labels) for peer in rule["from"]):
                ports |= {port["port"] for port in rule["ports"]}
        return ports

    job_pod = job["spec"]["template"]
    assert admitted(pod_labels) == {6379, 16379} == set(container_ports.values())
    assert admitted(worker["spec"]["template"]["metadata"]["labels"]) == {client_port}
    assert admitted(job_pod["metadata"]["labels"]) == {client_port}
    assert admitted({"app.kubernetes.io/name": "something-else"}) == set()

    # The init Job runs `resilient-cache cluster create` (as the CLI parses it) on every pod's
    # DNS name, from the app image, and fails at once on the exit codes retrying cannot mend.
    [init] = job_pod["spec"]["containers"]
    assert init["image"] == worker["spec"]["template"]["spec"]["containers"][0]["image"]
    assert init["command"][0] == "resilient-cache"
    args = _parser().parse_args(init["command"][1:])
    assert (args.command, args.action, args.replicas) == ("cluster", "create", 1)
    nodes = parse_cluster_nodes(args.addresses)
    name, service_name = statefulset["metadata"]["name"], service["metadata"]["name"]
    assert [str(node) for node in nodes] == [
        f"{name}-{n}.{service_name}:{client_port}" for n in range(spec["replicas"])
    ]
    assert job["spec"]["activeDeadlineSeconds"] > args.timeout
    assert job_pod["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    [rule] = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["containerName"] == init["name"]
    assert set(rule["onExitCodes"]["values"]) == {EXIT_USAGE, EXIT_REFUSED}
    assert _env(init)["REDIS_PASSWORD"]["valueFrom"] == worker_env["REDIS_PASSWORD"]["valueFrom"]

    # The worker's seed nodes are pods of this StatefulSet.
    seeds = parse_cluster_nodes(worker_config["data"]["REDIS_CLUSTER_NODES"])
    assert {str(seed) for seed in seeds} <= {str(node) for node in nodes}


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_every_kubernetes_manifest_matches_the_api_schemas(version: str) -> None:
    """Offline, with the schemas kubernetes-validate bundles: strict (no unknown field)."""
    import kubernetes_validate
    import yaml

    manifests = sorted(KUBERNETES.rglob("*.yaml"))
    assert len(manifests) >= 9, manifests  # the worker's and the Redis Cluster's
    checked = 0
    for path in manifests:
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                raise AssertionError(f"{path.relative_to(KUBERNETES)}: {err}") from None
            checked += 1
    assert checked >= len(manifests)
