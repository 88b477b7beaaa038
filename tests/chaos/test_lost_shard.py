"""A shard lost for good (its primary and its replica SIGKILLed) on a cluster that serves
partially (``cluster-require-full-coverage no``): calls to the lost slots fail fast with a
clear error once no failover can come, the other shards never notice, nothing storms, and
the client recovers when the nodes come back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from resilient_cache import SlotNotServedError, create_redis_cluster
from resilient_cache.devcluster import DevCluster
from tests.conftest import async_wait_until, wait_until

SOCKET_TIMEOUT = 0.3


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
