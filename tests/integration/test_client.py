"""The client and its pipeline against the real cluster."""

from __future__ import annotations

import logging
import traceback

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError

from resilient_cache import ConfigurationError, create_redis_cluster
from tests.conftest import async_wait_until


async def test_redis_py_command_api_goes_through_the_pipeline(client) -> None:
    before = client.get_metrics().commands.total
    assert await client.set("user:1", "ada")
    assert await client.get("user:1") == b"ada"
    assert await client.hset("profile:1", mapping={"name": "ada", "lang": "en"}) == 2
    assert await client.hgetall("profile:1") == {b"name": b"ada", b"lang": b"en"}
    assert await client.incrby("hits:1", 5) == 5
    assert await client.expire("hits:1", 30)
    assert await client.lpush("queue:1", "a", "b") == 2
    assert await client.lrange("queue:1", 0, -1) == [b"b", b"a"]
    assert client.get_metrics().commands.total == before + 8


async def test_multi_key_commands_across_slots(client) -> None:
    keys = [f"multi:{i}" for i in range(20)]  # spread over many slots
    assert len({client.keyslot(k) for k in keys}) > 3
    await client.mset_nonatomic({k: i for i, k in enumerate(keys)})
    assert await client.mget_nonatomic(keys) == [str(i).encode() for i in range(20)]
    assert await client.exists(*keys) == 20
    assert await client.delete(*keys) == 20
    assert await client.exists(*keys) == 0


async def test_commands_are_routed_to_the_node_that_owns_the_slot(client, devcluster) -> None:
    seen = []

    class Spy:
        async def __call__(self, command, call_next):
            result = await call_next(command)
            seen.append(command.node.port if command.node else None)
            return result

    from resilient_cache import hookimpl

    class SpyPlugin:
        @hookimpl
        def resilient_cache_register_stages(self, registry):
            from pydantic import BaseModel

            class NoSettings(BaseModel):
                pass

            registry.add("spy", NoSettings, lambda settings, context: Spy())

    routed = create_redis_cluster(
        devcluster.startup_nodes,
        stages="routing,spy",
        plugins=[SpyPlugin()],
        autoload=False,
        health_check_interval=0,
    )
    async with routed:
        for key in ("a", "b", "c", "d"):
            await routed.set(key, 1)
    assert seen == [devcluster.primary_for_key(k).port for k in ("a", "b", "c", "d")]


async def test_application_errors_surface_and_do_not_open_breakers(client) -> None:
    await client.set("a-string", "x")
    for _ in range(10):  # twice the default breaker threshold
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.lpush("a-string", "y")
    assert not client.is_circuit_breaker_open()
    assert client.get_metrics().commands.failed >= 10
    assert client.get_metrics().commands.retried == 0  # an application error is not retried


@pytest.mark.parametrize(
    "args",
    [
        ("HELLO", "3", "AUTH", "default", "pw-SECRET-31f7"),  # keyless, no routing rule
        ("EVAL",),  # too few arguments to find the keys
        ("GEORADIUS_RO",),  # a read redis-py finds no key in
    ],
)
async def test_errors_redis_py_raises_never_quote_the_arguments(client, args) -> None:
    with pytest.raises(RedisClusterException) as caught:
        await client.execute_command(*args)
    err = caught.value
    shown = "".join(traceback.format_exception(err)) + repr(err)
    assert "SECRET" not in shown, shown
    assert str(err).startswith(args[0]), str(err)  # names the command instead
    assert "arguments not shown" in str(err)


async def test_lower_case_names_and_bytes_names(client) -> None:
    assert await client.execute_command("set", "case", "1")
    assert await client.execute_command(b"GET", "case") == b"1"


async def test_decode_responses(cluster_nodes) -> None:
    decoded = create_redis_cluster(
        cluster_nodes, decode_responses=True, autoload=False, health_check_interval=0
    )
    async with decoded:
        await decoded.set("text", "héllo")
        assert await decoded.get("text") == "héllo"


async def test_unreachable_cluster_error_names_the_nodes() -> None:
    unreachable = create_redis_cluster(
        "127.0.0.1:1,127.0.0.1:2",
        autoload=False,
        health_check_interval=0,
        socket_connect_timeout=0.5,
    )
    with pytest.raises(RedisConnectionError) as info:
        await unreachable.connect()
    assert "Unable to connect to cluster" in str(info.value)
    assert "127.0.0.1:1" in str(info.value) and "127.0.0.1:2" in str(info.value)
    await unreachable.disconnect()


async def test_first_party_plugin_is_discovered_configured_and_placed(
    cluster_nodes, monkeypatch, caplog
) -> None:
    """plugins/slowlog is installed by `make test` as a real distribution with an entry point;
    autoload finds it, its own model validates its section, REDIS_STAGES places it."""
    monkeypatch.setenv("REDIS_STAGES", "metrics,slowlog,retry,routing,breaker")
    monkeypatch.setenv("REDIS_SLOWLOG__THRESHOLD_MS", "0")  # log every command
    cluster = create_redis_cluster(cluster_nodes, health_check_interval=0)
    assert cluster.stage_specs["slowlog"].plugin == "slowlog"  # the entry point's name
    assert cluster.active_stages == ["metrics", "slowlog", "retry", "routing", "breaker"]
    with caplog.at_level(logging.WARNING, logger="resilient_cache_slowlog"):
        async with cluster:
            await cluster.set("secret-key-name", "secret-value")
    messages = [r.getMessage() for r in caplog.records if r.name == "resilient_cache_slowlog"]
    assert len(messages) == 1
    assert messages[0].startswith("slow command SET on 127.0.0.1:")
    assert "secret" not in messages[0]

    monkeypatch.setenv("REDIS_SLOWLOG__THRESHOLD_MS", "-5")
    with pytest.raises(ConfigurationError, match=r"^REDIS_SLOWLOG__THRESHOLD_MS / slowlog\."):
        create_redis_cluster(cluster_nodes)


async def test_replica_reads_are_served_by_replicas(devcluster) -> None:
    """With read_from_replicas, GETs land on replicas (READONLY sent), not bounced by MOVED."""
    replicas = create_redis_cluster(
        devcluster.startup_nodes,
        routing={"read_from_replicas": True},
        autoload=False,
        health_check_interval=0,
    )
    ports_before = {
        n.port: int(devcluster.info(n, "commandstats").get("cmdstat_get", {}).get("calls", 0))
        for n in devcluster.replicas()
    }
    async with replicas:
        await replicas.set("replicated", "v")
        primary = devcluster.primary_for_key("replicated")
        replica = devcluster.replica_of(primary)
        assert replica is not None
        # A fresh cluster lists replicas in CLUSTER SLOTS only some seconds after it is ready:
        # wait until the client's slot map has one for this slot.
        slot = replicas.keyslot("replicated")

        async def slot_has_replica() -> bool:
            await replicas.backend.refresh_topology()
            return len(replicas.get_cluster().nodes_manager.slots_cache.get(slot, [])) > 1

        await async_wait_until(slot_has_replica, 30, "a replica in the slot map", interval=0.5)
        # Wait until the replica has the write, then read many times.
        devcluster.wait_for(
            lambda: (
                devcluster.admin(replica).execute_command("READONLY")
                and devcluster.admin(replica).get("replicated") == "v"
            ),
            10,
            "the replica to have the write",
        )
        for _ in range(20):
            assert await replicas.get("replicated") == b"v"
    after = int(devcluster.info(replica, "commandstats").get("cmdstat_get", {}).get("calls", 0))
    assert after - ports_before[replica.port] >= 5


async def test_pipeline_is_one_logical_command_per_node(client) -> None:
    keys = ["batch:a", "batch:n", "batch:a", "batch:gone"]
    nodes = {client.get_cluster().get_node_from_key(key).name for key in keys}
    assert len(nodes) > 1  # else this test shows nothing about the split
    before = client.get_metrics().commands.total
    async with client.pipeline() as pipe:
        pipe.set("batch:a", 1).incr("batch:n").get("batch:a").delete("batch:gone")
        assert len(pipe) == 4
        replies = await pipe.execute()
    assert replies == [True, 1, b"1", 0]
    assert client.get_metrics().commands.total == before + len(nodes)  # once per node
    async with client.pipeline() as pipe:  # one slot: one batch
        pipe.set("{batch}:a", 1).incr("{batch}:n").get("{batch}:a")
        assert await pipe.execute() == [True, 1, b"1"]
    assert client.get_metrics().commands.total == before + len(nodes) + 1


async def test_transaction_on_one_slot(client) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.set("{acct}:a", 10).decrby("{acct}:a", 3).incrby("{acct}:b", 3)
    assert await pipe.execute() == [True, 7, 3]


async def test_pipeline_errors_are_returned_or_raised(client) -> None:
    await client.set("batch:str", "x")
    pipe = client.pipeline()
    pipe.lpush("batch:str", "y").get("batch:str")
    replies = await pipe.execute(raise_on_error=False)
    assert isinstance(replies[0], ResponseError) and replies[1] == b"x"
    pipe.lpush("batch:str", "y")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipe.execute()


def test_batch_command_flags() -> None:
    from resilient_cache.pipeline import batch_command

    reads = batch_command([(("GET", "a"), {}), (("HGETALL", "h"), {})], False, True)
    assert (reads.name, reads.read_only, reads.idempotent, reads.keys) == (
        "PIPELINE",
        True,
        True,
        ("a", "h"),
    )
    mixed = batch_command([(("GET", "a"), {}), (("INCR", "n"), {})], True, True)
    assert (mixed.name, mixed.read_only, mixed.idempotent) == ("MULTI", False, False)


async def test_first_command_without_connect(cluster_nodes) -> None:
    lazy = create_redis_cluster(cluster_nodes, autoload=False, health_check_interval=0)
    try:
        assert await lazy.set("lazy", 1)  # no connect(): the first command connects
        assert await lazy.get("lazy") == b"1"
    finally:
        await lazy.disconnect()


def test_first_party_plugin_refuses_a_misspelt_setting(cluster_nodes, monkeypatch) -> None:
    from resilient_cache import ConfigurationError

    monkeypatch.setenv("REDIS_SLOWLOG__THRESHOLD", "5")  # THRESHOLD_MS is the field
    with pytest.raises(ConfigurationError, match="REDIS_SLOWLOG__THRESHOLD"):
        create_redis_cluster(cluster_nodes, health_check_interval=0)


async def test_many_slot_helpers_send_one_batch_per_node(client) -> None:
    """mset/mget_nonatomic, exists, delete over 20,000 keys (about 12,000 slots): one batch
    per node through the stages, not one command per slot (which used to exhaust the pools)."""
    keys = [f"many:{n}" for n in range(20_000)]
    mapping = {key: str(n) for n, key in enumerate(keys)}
    before = client.get_metrics().commands.total
    assert await client.mset_nonatomic(mapping)
    after_mset = client.get_metrics().commands.total
    assert after_mset - before <= 3  # three primaries: three batches
    values = await client.mget_nonatomic(keys)
    assert values == [str(n).encode() for n in range(20_000)]
    assert client.get_metrics().commands.total - after_mset <= 3
    assert await client.exists(*keys) == 20_000
    assert await client.delete(*keys) == 20_000
    assert await client.exists(*keys[:100]) == 0
    assert client.get_metrics().commands.failed == 0
    assert client.get_metrics().commands.retried == 0
