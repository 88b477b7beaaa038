"""Hung nodes (SIGSTOP), a hung cluster, and storms of cancelled commands."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import redis

from resilient_cache import CircuitBreakerOpenError, CommandTimeoutError, create_redis_cluster
from tests.conftest import async_wait_until

DEADLINE = 1.0


def _keys_by_owner(cluster, victim_port: int, count: int) -> tuple[list[str], list[str]]:
    mine, others = [], []
    n = 0
    while len(mine) < count or len(others) < count:
        key = f"hang:{{{n}}}"
        n += 1
        owner = cluster.primary_for_key(key).port
        target = mine if owner == victim_port else others
        if len(target) < count:
            target.append(key)
    return mine, others


def _client(cluster, **options):
    settings = dict(
        timeout={"deadline": DEADLINE},
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        max_retries=3,
        retry_delay=0.1,
        health_check_interval=0,
        autoload=False,
    )
    settings.update(options)
    return create_redis_cluster(cluster.startup_nodes, **settings)


async def _timed(coro):
    started = time.monotonic()
    try:
        await coro
        return time.monotonic() - started, None
    except redis.RedisError as err:
        return time.monotonic() - started, err


async def test_stopped_primary_calls_bounded_and_only_its_breaker_opens(ready_cluster) -> None:
    cluster = ready_cluster
    victim = cluster.primary_for_key("hang:victim")
    mine, others = _keys_by_owner(cluster, victim.port, 10)
    client = _client(cluster, circuit_breaker_threshold=3, circuit_breaker_timeout=30.0)
    async with client:
        for key in mine + others:
            await client.set(key, "v")
        cluster.pause(victim)
        try:
            results = await asyncio.gather(*(_timed(client.get(k)) for k in mine + others))
            again = await asyncio.gather(*(_timed(client.get(k)) for k in mine))
        finally:
            cluster.resume(victim)
        victim_results, other_results = results[: len(mine)], results[len(mine) :]
        # Every call on the hung shard ends by its deadline (+100 ms), with a clear error.
        for elapsed, err in victim_results + again:
            assert elapsed <= DEADLINE + 0.1, elapsed
            assert isinstance(err, CommandTimeoutError | CircuitBreakerOpenError), err
        # The healthy shards never noticed.
        assert [err for _, err in other_results] == [None] * len(others)
        assert client.breakers.open_scopes() == [victim.address]


async def test_whole_cluster_stopped_breakers_refuse_fast_then_recover(ready_cluster) -> None:
    cluster = ready_cluster
    client = _client(cluster, circuit_breaker_threshold=2, circuit_breaker_timeout=1.0)
    keys = [f"whole:{{{n}}}" for n in range(30)]
    async with client:
        for key in keys:
            await client.set(key, "v")
        for node in cluster.nodes:
            cluster.pause(node)
        try:
            # Load until every primary's breaker is open; each call bounded by the deadline.
            primaries = {client.get_cluster().get_node_from_key(k).name for k in keys}
            for _ in range(10):
                results = await asyncio.gather(*(_timed(client.get(k)) for k in keys))
                assert all(elapsed <= DEADLINE + 0.1 for elapsed, _ in results)
                if set(client.breakers.open_scopes()) >= primaries:
                    break
            assert set(client.breakers.open_scopes()) >= primaries
            # Open: refused at once, not after a deadline or backoffs.
            elapsed, err = await _timed(client.get(keys[0]))
            assert isinstance(err, CircuitBreakerOpenError), err
            assert "Circuit breaker is open" in str(err)
            # Below the 0.5 s socket timeout and far below the deadline: no wait on a socket,
            # no backoff (the margin over "at once" is for a busy 2-core machine).
            assert elapsed < 0.4, elapsed
        finally:
            for node in cluster.nodes:
                cluster.resume(node)
        cluster.wait_ready(timeout=60)

        async def recovered() -> bool:
            try:
                return await client.get(keys[0]) == b"v"
            except redis.RedisError:
                return False

        # The same client, not a new one, serves again once a probe gets through.
        await async_wait_until(recovered, 20, "the client to recover", interval=0.2)
        assert [await client.get(k) for k in keys] == [b"v"] * len(keys)


SOCKET_TIMEOUT = 0.3


async def test_no_call_waits_for_a_slot_map_refresh_on_a_hung_cluster(ready_cluster) -> None:
    """With every node SIGSTOPped, a call fails on its own socket timeout: the slot-map
    re-read that redis-py would run inside the next caller's attempt (one startup node after
    the other) runs in the background instead. Then the client recovers after SIGCONT."""
    cluster = ready_cluster
    bound = SOCKET_TIMEOUT + SOCKET_TIMEOUT + 0.1  # socket_connect_timeout + socket_timeout
    client = create_redis_cluster(
        cluster.startup_nodes,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        max_retries=0,
        timeout={"deadline": 30.0},  # far away: only the socket timeouts bound a call
        # Breakers stay closed: every call really goes to a node and waits on its socket.
        breaker={"threshold": 100, "failure_rate_threshold": None},
        health_check_interval=0,
        autoload=False,
    )
    keys = [f"hung:{{{n}}}" for n in range(12)]
    async with client:
        for key in keys:
            await client.set(key, "v")
        for node in cluster.nodes:
            cluster.pause(node)
        try:
            timings = []
            for key in keys:
                elapsed, err = await _timed(client.get(key))
                timings.append(round(elapsed, 3))
                assert isinstance(err, redis.RedisError), err
            assert max(timings) <= bound, (timings, bound)
            assert not client.is_circuit_breaker_open()
        finally:
            for node in cluster.nodes:
                cluster.resume(node)
        cluster.wait_ready(timeout=60)

        async def recovered() -> bool:
            try:
                return [await client.get(k) for k in keys] == [b"v"] * len(keys)
            except redis.RedisError:
                return False

        await async_wait_until(recovered, 20, "the client to recover", interval=0.2)
        print(f"\nhung cluster: {len(timings)} calls, each {min(timings)}-{max(timings)} s")


async def test_cancelled_commands_never_leave_replies_for_the_next_caller(ready_cluster) -> None:
    """redis-py #2665: a command cancelled while waiting for its reply must not leave that
    reply on a pooled connection, where the next command would read it as its own."""
    cluster = ready_cluster
    client = _client(cluster)
    keys = [f"cancel:{n}" for n in range(200)]
    rng = random.Random(2665)
    async with client:
        for key in keys:
            await client.set(key, key)
        cancelled = 0
        for _round in range(5):
            tasks = [asyncio.create_task(client.get(rng.choice(keys))) for _ in range(200)]
            await asyncio.sleep(rng.uniform(0.0005, 0.003))
            for task in tasks:
                if not task.done():
                    task.cancel()
                    cancelled += 1
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            for outcome in outcomes:
                assert isinstance(outcome, bytes | asyncio.CancelledError), outcome
        assert cancelled > 0
        # Every reply afterwards is the caller's own.
        replies = await asyncio.gather(*(client.get(k) for k in keys))
        assert replies == [k.encode() for k in keys]
        assert not client.is_circuit_breaker_open()


@pytest.mark.chaos_slow
async def test_repeated_failovers_keep_connections_at_baseline(ready_cluster) -> None:
    """20 failover rounds (SIGKILL a primary, wait, restart it); afterwards the client holds no
    more connections than after the first round."""
    cluster = ready_cluster

    def connections() -> int:
        total = 0
        for node in cluster.nodes:
            clients = cluster.admin(node).client_list()
            total += sum(1 for c in clients if c.get("name") == "chaos-baseline")
        return total

    baseline = None
    async with create_redis_cluster(
        cluster.startup_nodes,
        client_name="chaos-baseline",
        autoload=False,
        health_check_interval=0,
        max_retries=3,
        retry_delay=1.0,
    ) as client:
        for round_ in range(20):
            victim = cluster.primary_for_key(f"round:{round_}")
            cluster.kill(victim)
            await asyncio.to_thread(cluster.wait_failover, victim, 30)
            assert await client.set(f"round:{round_}", round_)
            cluster.restart(victim)
            cluster.wait_ready(timeout=60)
            for n in range(50):
                await client.get(f"k{n}")
            baseline = baseline if baseline is not None else connections()
        assert connections() <= baseline + 3, (connections(), baseline)
