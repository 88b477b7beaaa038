"""redis-py's RedisCluster API beyond commands, on the real cluster: scripts (EVALSHA with the
NOSCRIPT fallback), redis-py's Lock between two clients and between two processes, and the node
queries. Their commands go through the stages, which the client's counters show."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import uuid

import pytest

from resilient_cache import RedisClusterClient, create_redis_cluster
from resilient_cache.devcluster import DevCluster
from tests.probes import CommandLog


def _client(nodes: str, log: CommandLog | None = None) -> RedisClusterClient:
    if log is None:
        return create_redis_cluster(nodes, health_check_interval=0, autoload=False)
    return create_redis_cluster(
        nodes,
        health_check_interval=0,
        autoload=False,
        plugins=[log],
        stages="commandlog,tracing,metrics,memory,timeout,retry,routing,breaker",
    )


@pytest.fixture
def name() -> str:
    return f"api:{uuid.uuid4().hex[:8]}"


async def test_a_registered_script_runs_through_the_stages_and_survives_script_flush(
    cluster_nodes: str, name: str
) -> None:
    log = CommandLog()
    async with _client(cluster_nodes, log) as client:
        script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        assert await script(keys=[name], args=[2]) == 2
        await client.script_flush()  # every primary forgets it: the next call gets NOSCRIPT
        assert await script(keys=[name], args=[3]) == 5
        await client.delete(name)
    # redis-py's Script: EVALSHA, NOSCRIPT so SCRIPT LOAD and EVALSHA again, each a command.
    assert log.names == [
        *("EVALSHA", "SCRIPT LOAD", "EVALSHA"),
        "SCRIPT FLUSH",
        *("EVALSHA", "SCRIPT LOAD", "EVALSHA"),
        "DEL",
    ]


async def test_a_lock_between_two_clients(cluster_nodes: str, name: str) -> None:
    log = CommandLog()
    first, second = _client(cluster_nodes, log), _client(cluster_nodes)
    async with first, second:
        held = first.lock(name, timeout=10)
        assert await held.acquire(blocking=False)
        assert not await second.lock(name).acquire(blocking=False)
        assert not await second.lock(name, blocking_timeout=0.2).acquire()
        await held.release()
        async with second.lock(name, timeout=10, blocking_timeout=5) as lock:
            assert await lock.owned()
            assert not await first.lock(name).acquire(blocking=False)
        # A holder that never releases: the lock's timeout frees it for the next one.
        assert await first.lock(name, timeout=0.3).acquire(blocking=False)
        assert await second.lock(name, blocking_timeout=10).acquire()
    assert log.names.count("SET") == 3 and "EVALSHA" in log.names  # SET NX PX; the release


async def test_a_lock_between_two_processes(cluster_nodes: str, name: str) -> None:
    holder = textwrap.dedent(
        f"""
        import asyncio, sys
        from resilient_cache import create_redis_cluster

        async def main():
            async with create_redis_cluster({cluster_nodes!r}, health_check_interval=0) as c:
                lock = c.lock({name!r}, timeout=30)
                assert await lock.acquire(blocking_timeout=10)
                print("acquired", flush=True)
                await asyncio.to_thread(sys.stdin.read)  # hold it until stdin closes
                await lock.release()
                print("released", flush=True)

        asyncio.run(main())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        holder,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        assert await asyncio.wait_for(process.stdout.readline(), 30) == b"acquired\n"
        async with _client(cluster_nodes) as client:
            assert not await client.lock(name).acquire(blocking=False)
            process.stdin.close()  # the other process releases
            mine = client.lock(name, timeout=10, blocking_timeout=20)
            assert await mine.acquire()
            await mine.release()
        assert await asyncio.wait_for(process.stdout.readline(), 30) == b"released\n"
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_node_queries_answer_from_the_slot_map(
    client: RedisClusterClient, devcluster: DevCluster
) -> None:
    addresses = {(n.host, n.port) for n in devcluster.nodes}
    primaries = {(n.host, n.port) for n in devcluster.primaries()}
    assert {(n.host, n.port) for n in client.get_primaries()} == primaries
    # Replicas as the slot map read at connect listed them (one may still have been syncing).
    assert {(n.host, n.port) for n in client.get_nodes()} <= addresses
    assert {(n.host, n.port) for n in client.get_replicas()} <= addresses - primaries
    owner = devcluster.primary_for_key("api:owner")
    node = client.get_node_from_key("api:owner")
    assert (node.host, node.port) == (owner.host, owner.port)
    assert client.get_node(host=owner.host, port=owner.port) is node
    assert client.get_node(node_name=f"{owner.host}:{owner.port}") is node
    assert client.get_random_node() in client.get_nodes()
    assert client.get_default_node() in client.get_primaries()
    assert client.get_encoder().encode("k") == b"k"
    options = client.get_connection_kwargs()
    options["socket_timeout"] = 123
    assert client.get_connection_kwargs().get("socket_timeout") != 123


async def test_on_a_single_redis_the_node_queries_say_why_not(standalone_redis: str) -> None:
    client = create_redis_cluster(url=standalone_redis, health_check_interval=0, autoload=False)
    async with client:
        with pytest.raises(NotImplementedError, match=r"get_nodes\(\).*single Redis"):
            client.get_nodes()
        lock = client.lock("api:single")  # locks and scripts work there too
        assert await lock.acquire(blocking=False)
        await lock.release()
