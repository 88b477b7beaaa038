"""A rolling restart of the whole cluster under load, one node at a time as a StatefulSet
rolling update would, with the manual failover of each primary first; and, once, a primary
restarted without it. Both measured (docs/operations.md quotes the printed figures).

The cluster is this module's own, its nodes configured for persistence as the ConfigMap of
examples/kubernetes/redis-cluster configures them (AOF, fsync every second). A node is stopped
as the kubelet stops a pod, with SIGTERM (Redis then lets its replicas catch up and writes its
AOF out), stays down for a while as a pod being recreated would, and starts again on the same
directory: the same nodes.conf, so the same identity, and its AOF.

The load: CONCURRENCY callers doing SET (of unique keys), INCR (of counters on every shard)
and GET (of their own acknowledged keys) through ``create_redis_cluster``, with the original
guide's options. Every acknowledged write is looked for on the servers afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis
from redis.crc import key_slot

from resilient_cache import (
    CircuitBreakerOpenError,
    CommandInDoubtError,
    CommandTimeoutError,
    create_redis_cluster,
)
from resilient_cache.devcluster import DevCluster, DevNode

pytestmark = pytest.mark.chaos_slow

CONCURRENCY = 20
COUNTERS_PER_SHARD = 4
# Seconds a stopped node stays down before it starts again: a pod being deleted and created
# anew. Longer than the node timeout (2 s), so the other nodes mark it as failing meanwhile.
POD_GAP = 3.0
# As the ConfigMap of examples/kubernetes/redis-cluster (the dev cluster's default is no
# persistence at all).
PERSISTENCE = ("appendonly yes", "appendfsync everysec")
CLIENT_OPTIONS = dict(
    max_retries=3,  # the original guide's options, as in test_primary_kill.py
    retry_delay=1.0,
    health_check_interval=0,
    socket_timeout=1.0,
    socket_connect_timeout=0.5,
    autoload=False,
)
# The errors a caller may be shown (docs/failover.md): a command in doubt, a deadline run out,
# a breaker open, or a connection error (CommandInDoubtError is one too).
DOCUMENTED = (
    CommandInDoubtError,
    CommandTimeoutError,
    CircuitBreakerOpenError,
    redis.exceptions.ConnectionError,
)


@pytest.fixture(scope="module")
def restart_cluster() -> Iterator[DevCluster]:
    with DevCluster(node_timeout_ms=2000, extra_config=PERSISTENCE) as cluster:
        yield cluster


@pytest.fixture
def ready(restart_cluster: DevCluster) -> DevCluster:
    cluster = restart_cluster
    for node in cluster.nodes:
        if node.process is None or node.process.poll() is not None:
            cluster.restart(node)
    cluster.wait_ready(timeout=60)
    return cluster


# --------------------------------------------------------------------------- the load


@dataclass
class Load:
    """What the callers saw, and what the servers hold afterwards."""

    prefix: str
    counters: list[str]
    shard_of_slot: dict[int, str]
    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    undocumented: list[str] = field(default_factory=list)
    acked_sets: set[str] = field(default_factory=set)
    failed_sets: set[str] = field(default_factory=set)  # raised: may or may not have run
    acked_incrs: Counter[str] = field(default_factory=Counter)
    failed_incrs: Counter[str] = field(default_factory=Counter)
    stale_reads: list[str] = field(default_factory=list)
    write_times: list[tuple[str, float]] = field(default_factory=list)  # (shard, acked at)
    slowest: tuple[float, str] = (0.0, "")
    retried: int = 0
    duration: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)

    @property
    def in_doubt(self) -> int:
        return self.errors["CommandInDoubtError"]

    def longest_write_gap(self) -> tuple[float, str]:
        """The longest time, within the window, any shard went without an acknowledged write."""
        start, end = self.window
        longest = (0.0, "")
        for shard in set(self.shard_of_slot.values()):
            times = [start, *sorted(t for s, t in self.write_times if s == shard and t > start)]
            times = [t for t in times if t <= end] + [end]
            gap = max(b - a for a, b in itertools.pairwise(times))
            longest = max(longest, (gap, shard))
        return longest


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err} (attempts={getattr(err, 'attempts', None)})"


def _prepare(cluster: DevCluster, prefix: str) -> Load:
    """Counters on every shard (hash tags pick the slot), and each slot's shard, named by its
    primary at the start."""
    observer = cluster.primaries()[0]
    shard_of_slot: dict[int, str] = {}
    for entry in cluster.admin(observer).cluster("SLOTS"):
        name = f"{entry[2][0]}:{entry[2][1]}"
        for slot in range(int(entry[0]), int(entry[1]) + 1):
            shard_of_slot[slot] = name
    shards = set(shard_of_slot.values())
    assert len(shards) == 3, shards
    counters: list[str] = []
    per_shard: Counter[str] = Counter()
    n = 0
    while len(counters) < COUNTERS_PER_SHARD * len(shards):
        key = f"{prefix}:counter:{{{n}}}"
        n += 1
        shard = shard_of_slot[key_slot(key.encode())]
        if per_shard[shard] < COUNTERS_PER_SHARD:
            per_shard[shard] += 1
            counters.append(key)
    return Load(prefix=prefix, counters=counters, shard_of_slot=shard_of_slot)


async def run_under_load(cluster: DevCluster, prefix: str, action: Callable[[], object]) -> Load:
    """Start the callers, let them run 1 s, run ``action`` (blocking, in a thread), let them run
    1 s more, stop them; then read back what the servers hold."""
    load = _prepare(cluster, prefix)
    client = create_redis_cluster(cluster.startup_nodes, **CLIENT_OPTIONS)
    stop = asyncio.Event()

    def shard(key: str) -> str:
        return load.shard_of_slot[key_slot(key.encode())]

    async def caller(i: int) -> None:
        rng = random.Random(i)
        mine: list[str] = []
        j = 0
        while not stop.is_set():
            j += 1
            op = ("SET", "INCR", "GET")[j % 3]
            if op == "SET":
                key = f"{prefix}:set:{i}:{j}"
            elif op == "GET" and mine:
                key = rng.choice(mine)  # one of this caller's acknowledged SETs
            else:
                key = load.counters[(i + j) % len(load.counters)]
            started = time.monotonic()
            try:
                if op == "SET":
                    await client.set(key, key)
                    load.acked_sets.add(key)
                    mine.append(key)
                elif op == "INCR":
                    await client.incr(key)
                    load.acked_incrs[key] += 1
                else:
                    value = await client.get(key)
                    if key.startswith(f"{prefix}:set:") and value != key.encode():
                        load.stale_reads.append(f"{key} read {value!r}")
                now = time.monotonic()
                load.ok[op] += 1
                if op != "GET":
                    load.write_times.append((shard(key), now))
            except Exception as err:
                now = time.monotonic()
                load.errors[type(err).__name__] += 1
                if not isinstance(err, DOCUMENTED):
                    load.undocumented.append(f"{op} {_describe(err)}")
                if op == "SET":
                    load.failed_sets.add(key)
                elif op == "INCR":
                    load.failed_incrs[key] += 1
            load.slowest = max(load.slowest, (now - started, op))
            await asyncio.sleep(0.001)

    async with client:
        await client.delete(*load.counters)
        tasks = [asyncio.create_task(caller(i)) for i in range(CONCURRENCY)]
        try:
            await asyncio.sleep(1.0)
            started = time.monotonic()
            await asyncio.to_thread(action)
            ended = time.monotonic()
            load.duration = ended - started
            load.window = (started, ended)
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        load.retried = client.get_metrics().commands.retried
    return load


def lost_writes(cluster: DevCluster, load: Load) -> tuple[list[str], list[str]]:
    """(acknowledged writes missing on the servers, writes counted more than they could have
    run), read from every primary directly, not through the client under test."""
    stored: dict[str, str] = {}
    counters: dict[str, int] = {}
    for node in cluster.primaries():
        admin = cluster.admin(node)
        keys = list(admin.scan_iter(match=f"{load.prefix}:set:*", count=1000))
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            pipe = admin.pipeline(transaction=False)
            for key in chunk:
                pipe.get(key)
            stored.update(zip(chunk, pipe.execute(), strict=True))
        for key in load.counters:
            value = admin.get(key) if cluster.primary_for_key(key).port == node.port else None
            if value is not None:
                counters[key] = int(value)
    lost = [f"SET {k}" for k in load.acked_sets if stored.get(k) != k]
    extra = [f"SET {k}" for k in set(stored) - load.acked_sets - load.failed_sets]
    extra += [
        f"SET {k} = {stored[k]!r}" for k in load.failed_sets if stored.get(k) not in (None, k)
    ]
    for key in load.counters:
        final, acked, failed = counters.get(key, 0), load.acked_incrs[key], load.failed_incrs[key]
        if final < acked:
            lost.append(f"INCR {key}: {acked} acknowledged, {final} stored")
        if final > acked + failed:
            extra.append(f"INCR {key}: {final} stored > {acked} acknowledged + {failed} failed")
    return lost, extra


def cluster_check(cluster: DevCluster) -> subprocess.CompletedProcess[str]:
    """`resilient-cache cluster check --replicas 1`, as docs/operations.md runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "resilient_cache", "cluster", "check"]
        + [node.address for node in cluster.nodes]
        + ["--replicas", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def figures(title: str, load: Load, lost: list[str], detail: str = "") -> str:
    errors = ", ".join(f"{n} {name}" for name, n in load.errors.most_common()) or "none"
    writes = len(load.acked_sets) + sum(load.acked_incrs.values())
    gap, shard = load.longest_write_gap()
    return (
        f"\n{title}: {load.duration:.1f} s{detail}; calls ok {sum(load.ok.values())} "
        f"(SET {load.ok['SET']}, INCR {load.ok['INCR']}, GET {load.ok['GET']}); "
        f"errors surfaced to callers: {errors}; in doubt {load.in_doubt}; acknowledged writes "
        f"lost {len(lost)} of {writes}; slowest call {load.slowest[0] * 1000:.0f} ms "
        f"({load.slowest[1]}); longest time a shard took no write {gap:.2f} s ({shard} at the "
        f"start); retried {load.retried}; stale reads {len(load.stale_reads)}"
    )


def _primary_ports(cluster: DevCluster) -> set[int]:
    return {node.port for node in cluster.primaries()}


def _restart_like_a_pod(cluster: DevCluster, node: DevNode) -> None:
    cluster.kill(node, signal.SIGTERM, timeout=30)  # the kubelet's stop (AOF written out)
    time.sleep(POD_GAP)
    cluster.restart(node)
    cluster.wait_ready(timeout=60)


def _assert_outcome(cluster: DevCluster, load: Load, lost: list[str], extra: list[str]) -> None:
    assert sum(load.ok.values()) > 0 and load.acked_sets and load.acked_incrs
    assert lost == [], f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
    assert extra == [], extra[:5]
    assert load.undocumented == [], load.undocumented[:10]
    assert load.stale_reads == [], load.stale_reads[:5]
    checked = cluster_check(cluster)
    assert checked.returncode == 0, (checked.stdout, checked.stderr)


# --------------------------------------------------------------------------- the tests


async def test_rolling_restart_with_manual_failover_first(ready: DevCluster) -> None:
    """The six nodes restarted one at a time; a primary hands its shard to its replica with
    CLUSTER FAILOVER first, and is restarted once it is a replica. No caller may see an error
    outside the documented classes, and no acknowledged write may be lost."""
    cluster = ready
    steps: list[str] = []

    def rolling_restart() -> None:
        # A StatefulSet updates its pods from the highest ordinal down, one at a time.
        for node in reversed(cluster.nodes):
            began = time.monotonic()
            role = "primary" if node.port in _primary_ports(cluster) else "replica"
            if role == "primary":
                replica = cluster.replica_of(node)
                assert replica is not None, f"{node.address} has no replica to take over"
                cluster.admin(replica).cluster("FAILOVER")
                cluster.wait_for(
                    lambda r=replica, n=node: (
                        r.port in _primary_ports(cluster) and n.port not in _primary_ports(cluster)
                    ),
                    15,
                    f"{replica.address} to take over from {node.address}",
                )
                cluster.wait_ready(timeout=60)
            _restart_like_a_pod(cluster, node)
            steps.append(f"{role} {time.monotonic() - began:.1f} s")

    roles_before = _primary_ports(cluster)
    load = await run_under_load(cluster, "roll", rolling_restart)
    lost, extra = lost_writes(cluster, load)
    print(
        figures(
            "rolling restart, manual failover first",
            load,
            lost,
            f" for 6 nodes ({', '.join(steps)}, each with {POD_GAP:.0f} s down)",
        )
    )
    assert len(steps) == 6
    # Every shard changed hands once: the old replicas are the primaries now.
    assert _primary_ports(cluster).isdisjoint(roles_before)
    _assert_outcome(cluster, load, lost, extra)


async def test_restarting_a_primary_without_the_failover(ready: DevCluster) -> None:
    """What skipping the manual failover costs: the primary stopped as it is. The pod comes
    back only after the cluster has failed it over (as when a pod takes longer than the node
    timeout to be recreated); the shard's writes wait for that failover."""
    cluster = ready
    timings: dict[str, float] = {}

    def naive_restart() -> None:
        victim = cluster.primaries()[0]
        began = time.monotonic()
        cluster.kill(victim, signal.SIGTERM, timeout=30)
        timings["stopped"] = time.monotonic() - began
        cluster.wait_failover(victim, timeout=30)
        timings["failover"] = time.monotonic() - began
        cluster.restart(victim)
        cluster.wait_ready(timeout=60)
        assert victim.port not in _primary_ports(cluster)  # back as a replica

    load = await run_under_load(cluster, "naive", naive_restart)
    lost, _ = lost_writes(cluster, load)
    print(
        figures(
            "primary restarted without the manual failover",
            load,
            lost,
            f" (stopped in {timings['stopped']:.2f} s, automatic failover done "
            f"{timings['failover']:.2f} s after the SIGTERM)",
        )
    )
    print(f"cluster check afterwards: exit {cluster_check(cluster).returncode}")
    assert lost == [], f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
