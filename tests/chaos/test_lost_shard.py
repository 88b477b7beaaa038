"""A shard lost for good (its primary and its replica SIGKILLed) on a cluster that serves
partially (``cluster-require-full-coverage no``): calls to the lost slots fail fast with a
clear error once no failover can come, the other shards never notice, nothing storms, and
the client recovers when the nodes come back. ``get_stats()`` names what is lost; a bulkhead
bounds what waits on the lost node. And the same loss on a cluster that requires full
coverage (Redis's default), where every shard answers ``CLUSTERDOWN``."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from resilient_cache import (
    BulkheadFullError,
    CircuitBreakerOpenError,
    SlotNotServedError,
    create_redis_cluster,
)
from resilient_cache.devcluster import DevCluster, DevNode
from tests.conftest import async_wait_until, wait_until
from tests.probes import ConcurrencyProbe

# Long enough that a live node never misses it on a loaded 2-core machine (0.3 s did, once,
# opening two healthy breakers); the lost slots fail in milliseconds anyway.
SOCKET_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def partial_cluster() -> Iterator[DevCluster]:
    with DevCluster(node_timeout_ms=2000, extra_config=["cluster-require-full-coverage no"]) as c:
        yield c


def _keys_by_shard(
    cluster: DevCluster, victim_port: int, count: int
) -> tuple[list[str], list[str]]:
    lost, alive = [], []
    n = 0
    while len(lost) < count or len(alive) < count:
        key = f"shard:{{{n}}}"
        n += 1
        target = lost if cluster.primary_for_key(key).port == victim_port else alive
        if len(target) < count:
            target.append(key)
    return lost, alive


async def _timed(coro):
    started = time.monotonic()
    try:
        await coro
        return time.monotonic() - started, None
    except redis.RedisError as err:
        return time.monotonic() - started, err


async def test_a_lost_shard_fails_fast_and_alone(partial_cluster: DevCluster) -> None:
    cluster = partial_cluster
    cluster.wait_ready(timeout=60)
    primary = cluster.primary_for_key("shard:{0}")
    replica = cluster.replica_of(primary)
    assert replica is not None
    lost, alive = _keys_by_shard(cluster, primary.port, 100)
    client = create_redis_cluster(
        cluster.startup_nodes,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        timeout={"deadline": 10.0},
        circuit_breaker_timeout=1.0,  # a probe every second once the nodes are back
        health_check_interval=0,
        autoload=False,
    )
    bound = 2 * SOCKET_TIMEOUT + 0.1
    async with client:
        backend = client.backend
        assert backend.failover_estimate == 2 * 2.0 + 2.0  # read from cluster-node-timeout
        for key in lost + alive:
            await client.set(key, "v")
        cluster.kill(replica)
        cluster.kill(primary)
        try:
            # Until the cluster flags the replica as failed, a failover may still come and
            # calls wait for it (within the estimate); then they fail fast, naming the slots.
            started = time.monotonic()

            async def refused_fast() -> bool:
                _, err = await _timed(client.get(lost[0]))
                return isinstance(err, SlotNotServedError)

            await async_wait_until(refused_fast, 30, "the lost shard's calls to fail fast")
            settled = time.monotonic() - started

            retried, refreshes = client.get_metrics().commands.retried, backend.refreshes
            results = await asyncio.gather(*(_timed(client.get(k)) for k in lost + alive))
            lost_results, alive_results = results[: len(lost)], results[len(lost) :]
            assert [err for _, err in alive_results] == [None] * len(alive)
            for elapsed, err in lost_results:
                assert isinstance(err, SlotNotServedError), err
                assert elapsed <= bound, (elapsed, bound)
                assert f"{primary.host}:{primary.port}" in str(err) and "slots" in str(err)
            retries = client.get_metrics().commands.retried - retried
            refresh_count = backend.refreshes - refreshes
            assert retries == 0  # one attempt per failed call
            assert refresh_count <= 3  # shared and rate-limited, not one per caller
            print(
                f"\nlost shard: fail-fast after {settled:.1f}s; 100 lost-slot calls "
                f"{min(e for e, _ in lost_results) * 1000:.1f}-"
                f"{max(e for e, _ in lost_results) * 1000:.1f} ms each, {retries} retries, "
                f"{refresh_count} slot-map re-reads; 100 calls to live shards, 0 errors"
            )
        finally:
            cluster.restart(primary)
            cluster.restart(replica)
        wait_until(
            lambda: cluster.cluster_info(cluster.nodes[0]).get("cluster_state") == "ok",
            60,
            "the cluster to be whole again",
        )

        async def recovered() -> bool:
            # The two nodes had no persistence: their keys are gone, the slots are served.
            try:
                await client.set(lost[0], "back")
                return await client.get(lost[0]) == b"back"
            except redis.RedisError:
                return False

        await async_wait_until(recovered, 30, "the client to serve the lost slots again", 0.2)


# -- helpers of the tests below ---------------------------------------------------------------


def _ready(cluster: DevCluster) -> DevCluster:
    """Every node up and every replica linked (a test before may have failed halfway)."""
    for node in cluster.nodes:
        if node.process is None or node.process.poll() is not None:
            cluster.restart(node)
    cluster.wait_ready(timeout=60)
    return cluster


def _victims(cluster: DevCluster) -> tuple[DevNode, DevNode]:
    primary = cluster.primary_for_key("shard:{0}")
    replica = cluster.replica_of(primary)
    assert replica is not None
    return primary, replica


def _slot_ranges(cluster: DevCluster, primary: DevNode) -> list[tuple[int, int]]:
    """``primary``'s slots as the servers say (CLUSTER SLOTS), merged into ranges."""
    reply = cluster.admin(primary).execute_command("CLUSTER SLOTS")
    merged: list[tuple[int, int]] = []
    for start, end in sorted((int(e[0]), int(e[1])) for e in reply if int(e[2][1]) == primary.port):
        if merged and start == merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _client(cluster: DevCluster, deadline: float = 10.0, **options: Any):
    return create_redis_cluster(
        cluster.startup_nodes,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        timeout={"deadline": deadline},
        circuit_breaker_timeout=1.0,  # a probe every second once the nodes are back
        health_check_interval=0,
        autoload=False,
        **options,
    )


def _restart(cluster: DevCluster, *nodes: DevNode) -> None:
    for node in nodes:
        cluster.restart(node)
    cluster.wait_for(
        lambda: all(cluster.cluster_info(n).get("cluster_state") == "ok" for n in cluster.nodes),
        60,
        "every node to report cluster_state:ok",
    )


def _cli(cluster: DevCluster, *args: str) -> Any:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    env["REDIS_CLUSTER_NODES"] = cluster.startup_nodes
    env["REDIS_SOCKET_CONNECT_TIMEOUT"] = env["REDIS_SOCKET_TIMEOUT"] = str(SOCKET_TIMEOUT)
    command = [sys.executable, "-m", "resilient_cache", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


# -- what get_stats() says of a lost shard ----------------------------------------------------


async def test_stats_name_the_lost_shard_until_it_is_back(partial_cluster: DevCluster) -> None:
    cluster = _ready(partial_cluster)
    primary, replica = _victims(cluster)
    name = f"{primary.host}:{primary.port}"
    ranges = _slot_ranges(cluster, primary)
    slots = sum(end - start + 1 for start, end in ranges)
    async with _client(cluster) as client:
        before = await client.get_stats()
        assert (before.health, before.uncovered_slots, before.unserved_shards) == ("healthy", 0, [])
        cluster.kill(replica)
        cluster.kill(primary)
        try:
            started = time.monotonic()

            async def lost_named() -> Any:
                stats = await client.get_stats()
                return stats if stats.unserved_shards else None

            stats = await async_wait_until(
                lost_named, 30, "get_stats() to name the lost shard", 0.2
            )
            named_after = time.monotonic() - started
            assert stats.unserved_shards == [name]
            assert (stats.uncovered_slots, stats.uncovered_ranges) == (slots, ranges)
            # The cluster serves the rest and says ok: the lost slots alone make it unhealthy.
            assert (stats.cluster_state, stats.health) == ("ok", "unhealthy")
            health, text = _cli(cluster, "health"), _cli(cluster, "stats")
            assert (health.returncode, health.stdout.strip()) == (1, "unhealthy")
            assert _cli(cluster, "health", "--ready").returncode == 0  # the rest serves
            assert text.returncode == 0, text.stderr
            line = next(x for x in text.stdout.splitlines() if x.startswith("uncovered slots:"))
            assert line.startswith(f"uncovered slots: {slots} (") and line.endswith(name), line
            print(f"\nlost shard: get_stats() named it {named_after:.1f}s after the kill; {line}")
        finally:
            _restart(cluster, primary, replica)

        async def all_served() -> Any:
            stats = await client.get_stats()
            return stats if not stats.uncovered_slots and stats.health != "unhealthy" else None

        stats = await async_wait_until(all_served, 30, "get_stats() to see every slot served", 0.2)
        assert (stats.uncovered_ranges, stats.unserved_shards) == ([], [])


# -- a bulkhead during the loss ---------------------------------------------------------------


BULKHEAD = {"max_in_flight_per_node": 10, "max_queue": 20, "queue_timeout": 0.5}
CALLERS = 200
LOAD_SECONDS = 3.0


async def _load_during_a_loss(
    cluster: DevCluster, client: Any, probe: ConcurrencyProbe, keys: list[str], lost: set[str]
) -> dict[str, Any]:
    """``CALLERS`` callers, each calling GET in a loop (20 ms apart) over ``keys``; the shard
    of ``lost`` is killed 0.5 s in, and the load goes on for ``LOAD_SECONDS`` after that.
    What was seen from the kill on: callers inside a call (peak and mean, sampled every 2 ms),
    the bulkhead's queue and per-node counts when it has one, the outcomes per kind of key."""
    primary, replica = _victims(cluster)
    bulkhead = client.stage("bulkhead") if "bulkhead" in client.active_stages else None
    stop = asyncio.Event()
    waiting = 0
    outcomes: dict[str, Counter[str]] = {"lost": Counter(), "live": Counter()}
    seen: dict[str, Any] = {"waiting": [], "queued": 0, "per_node": 0}

    async def caller(n: int) -> None:
        nonlocal waiting
        while not stop.is_set():
            key = keys[n % len(keys)]
            n += 7
            waiting += 1
            try:
                await client.get(key)
                outcome = "served"
            except redis.RedisError as err:
                outcome = type(err).__name__
            finally:
                waiting -= 1
            outcomes["lost" if key in lost else "live"][outcome] += 1
            await asyncio.sleep(0.02)

    async def sample() -> None:
        while not stop.is_set():
            seen["waiting"].append(waiting)
            if bulkhead is not None:
                seen["queued"] = max(seen["queued"], bulkhead.queued)
                seen["per_node"] = max([seen["per_node"], *bulkhead.per_node.values()])
            await asyncio.sleep(0.002)

    callers = [asyncio.create_task(caller(n)) for n in range(CALLERS)]
    sampler = None
    try:
        await asyncio.sleep(0.5)
        for counts in outcomes.values():  # from the loss on
            counts.clear()
        probe.peak.clear()
        sampler = asyncio.create_task(sample())
        cluster.kill(replica)
        cluster.kill(primary)
        await asyncio.sleep(LOAD_SECONDS)
    finally:
        stop.set()
        await asyncio.gather(*callers, *([sampler] if sampler else []))
        _restart(cluster, primary, replica)
    at_lost = probe.peak[f"{primary.host}:{primary.port}"]
    seen.update(
        outcomes=outcomes,
        peak_waiting=max(seen["waiting"]),
        mean_waiting=sum(seen["waiting"]) / len(seen["waiting"]),
        at_lost=at_lost,
        at_node=max(probe.peak.values()),
    )
    return seen


async def test_a_bulkhead_bounds_what_waits_on_a_lost_shard(partial_cluster: DevCluster) -> None:
    """The same loss twice under the same load, without and with the bulkhead: its limits
    hold throughout; what waited is printed, not judged."""
    cluster = _ready(partial_cluster)
    primary, _ = _victims(cluster)
    lost, alive = _keys_by_shard(cluster, primary.port, 100)
    keys = [k for trio in zip(lost[:50], alive[:50], alive[50:], strict=True) for k in trio]
    stages = ["metrics", "timeout", "retry", "routing", "probe", "breaker"]
    seen = {}
    for which, bulkhead in (("without", None), ("with", BULKHEAD)):
        probe = ConcurrencyProbe()
        options: dict[str, Any] = {"stages": stages, "plugins": [probe]}
        if bulkhead is not None:
            options.update(stages=[*stages[:4], "bulkhead", *stages[4:]], bulkhead=bulkhead)
        _ready(cluster)
        async with _client(cluster, 3.0, **options) as client:
            for key in keys:
                await client.set(key, "v")
            seen[which] = await _load_during_a_loss(cluster, client, probe, keys, set(lost))
            if bulkhead is not None:
                stage = client.stage("bulkhead")
                assert (stage.in_flight, stage.queued) == (0, 0)
    limit, queue = BULKHEAD["max_in_flight_per_node"], BULKHEAD["max_queue"]
    assert seen["with"]["queued"] <= queue
    assert seen["with"]["per_node"] <= limit and seen["with"]["at_node"] <= limit
    for which in ("without", "with"):
        outcomes = seen[which]["outcomes"]
        assert outcomes["live"]["served"] > 0  # the live shards kept serving
        assert outcomes["lost"]["SlotNotServedError"] > 0  # (a few answered before the kill)
    assert BulkheadFullError.__name__ not in seen["without"]["outcomes"]["live"]
    without, with_ = seen["without"], seen["with"]
    print(
        f"\nbulkhead during a lost shard, {CALLERS} callers for {LOAD_SECONDS:.0f} s from the "
        f"kill: callers inside a call: peak {without['peak_waiting']} without / "
        f"{with_['peak_waiting']} with the bulkhead, mean {without['mean_waiting']:.0f} / "
        f"{with_['mean_waiting']:.0f}; commands on their way to one node at once: peak "
        f"{without['at_node']} / {with_['at_node']} (limit {limit}), to the lost node "
        f"{without['at_lost']} / {with_['at_lost']}; peak queued {with_['queued']} (limit "
        f"{queue})"
    )
    for which in ("without", "with"):
        outcomes = seen[which]["outcomes"]
        print(f"  {which}: lost shard {dict(outcomes['lost'])}, live {dict(outcomes['live'])}")


# -- the same loss when the cluster requires full coverage ------------------------------------

DEADLINE = 3.0


@pytest.fixture(scope="module")
def full_cluster() -> Iterator[DevCluster]:
    with DevCluster(node_timeout_ms=2000) as c:  # cluster-require-full-coverage: Redis's yes
        yield c


async def test_with_full_coverage_every_shard_refuses_within_the_deadline_then_recovers(
    full_cluster: DevCluster,
) -> None:
    """Callers keep calling from the kill on (20 keys of the lost shard, 20 of the others, all
    at once, every 0.2 s): what each sees, before and after the cluster goes down."""
    cluster = _ready(full_cluster)
    config = cluster.admin(cluster.nodes[0]).config_get("cluster-require-full-coverage")
    assert config == {"cluster-require-full-coverage": "yes"}
    primary, replica = _victims(cluster)
    name = f"{primary.host}:{primary.port}"
    slots = sum(end - start + 1 for start, end in _slot_ranges(cluster, primary))
    lost, alive = _keys_by_shard(cluster, primary.port, 20)
    live = [n for n in cluster.nodes if n not in (primary, replica)]

    def cluster_down() -> bool:
        try:
            return all(cluster.cluster_info(n)["cluster_state"] == "fail" for n in live)
        except redis.RedisError:
            return False

    # (phase, kind) -> error class name (or "served") -> count. A round's phase is "down" when
    # every live node reported cluster_state:fail before it began, else "up" (the last "up"
    # round may meet the switch).
    seen: dict[tuple[str, str], Counter[str]] = {}
    slowest: dict[tuple[str, str], float] = {}
    examples: dict[str, str] = {}  # one message per error class, while the cluster is down
    async with _client(cluster, DEADLINE) as client:
        for key in lost + alive:
            await client.set(key, "v")
        cluster.kill(replica)
        cluster.kill(primary)
        killed = time.monotonic()
        down_at: float | None = None
        settled_rounds = 0
        try:

            async def settled() -> bool:
                # One round. Done 3 rounds in a row after CLUSTERDOWN in which every lost-slot
                # call was SlotNotServedError and every other call was refused in under 1 s.
                nonlocal down_at, settled_rounds
                if down_at is None and await asyncio.to_thread(cluster_down):
                    down_at = time.monotonic() - killed
                phase = "up" if down_at is None else "down"
                results = await asyncio.gather(*(_timed(client.get(k)) for k in lost + alive))
                for kind, part in (("lost", results[: len(lost)]), ("other", results[len(lost) :])):
                    counts = seen.setdefault((phase, kind), Counter())
                    for elapsed, err in part:
                        assert elapsed <= DEADLINE + 0.5, (phase, kind, elapsed, err)
                        counts["served" if err is None else type(err).__name__] += 1
                        if err is not None and phase == "down":
                            examples.setdefault(type(err).__name__, str(err))
                        slowest[phase, kind] = max(slowest.get((phase, kind), 0.0), elapsed)
                if phase == "up":
                    return False
                done = all(isinstance(e, SlotNotServedError) for _, e in results[: len(lost)])
                done = done and all(e is not None and t < 1.0 for t, e in results[len(lost) :])
                settled_rounds = settled_rounds + 1 if done else 0
                return settled_rounds >= 3

            await async_wait_until(settled, 40, "CLUSTERDOWN, then fast refusals", 0.2)
            settled_after = time.monotonic() - killed
            for node in live:  # every shard refuses every command
                with pytest.raises(redis.exceptions.ClusterDownError):
                    cluster.admin(node).get(alive[0])
            stats = await client.get_stats()
            assert (stats.cluster_state, stats.health) == ("fail", "unhealthy")
            assert (stats.unserved_shards, stats.uncovered_slots) == ([name], slots)
        finally:
            restarted = time.monotonic()
            _restart(cluster, primary, replica)

        async def serves_again() -> bool:
            # The two nodes had no persistence: a fresh write, on the lost shard and another.
            try:
                for key in (lost[0], alive[0]):
                    await client.set(key, "back")
                    if await client.get(key) != b"back":
                        return False
                return True
            except redis.RedisError:
                return False

        await async_wait_until(serves_again, 30, "the same client to serve again", 0.2)
        served_after = time.monotonic() - restarted
    report = "; ".join(
        f"{phase}/{kind}: {dict(counts)} slowest {slowest[phase, kind]:.2f}s"
        for (phase, kind), counts in sorted(seen.items(), reverse=True)
    )
    print(
        f"\nfull coverage: CLUSTERDOWN on every node {down_at:.1f}s after the kill, settled "
        f"{settled_after:.1f}s after it; served again {served_after:.1f}s after the restart "
        f"began\n  {report}\n  " + "\n  ".join(f"{k}: {v}" for k, v in sorted(examples.items()))
    )
    lost_shard = SlotNotServedError.__name__
    refused = {redis.exceptions.ClusterDownError.__name__, CircuitBreakerOpenError.__name__}
    # The lost slots: refused at once, naming them, as with partial coverage. (A first call
    # that uses up its retries on refused connects before the breaker opens would see the
    # ConnectionError: see docs/failover.md, "A primary dies".)
    assert set(seen["up", "lost"]) <= {lost_shard, "ConnectionError"}, seen
    assert set(seen["down", "lost"]) == {lost_shard}, seen
    # The other shards: served until their nodes say CLUSTERDOWN; then refused, never served.
    assert set(seen["up", "other"]) <= {"served", *refused}, seen
    assert set(seen["down", "other"]) <= refused, seen
