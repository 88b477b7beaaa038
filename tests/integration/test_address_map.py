"""REDIS_ADDRESS_MAP against a real cluster whose nodes announce an address the client cannot
reach.

How the cluster announces it: every node has ``cluster-announce-hostname unreachable.invalid``
and ``cluster-preferred-endpoint-type hostname``, so CLUSTER SLOTS, CLUSTER SHARDS and every
MOVED/ASK reply name ``unreachable.invalid:<port>`` (a reserved name that never resolves, RFC
6761), while the nodes listen on 127.0.0.1. Not ``cluster-announce-ip 10.255.255.1``: Redis 7.0
announces that IP on the cluster bus too, so each node tells the others to gossip with it at an
address nobody listens on, and the cluster never forms (every node keeps knowing only itself;
checked with redis-server 7.0). The hostname only changes what clients are told.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache import Redirect, RedisClusterClient, create_redis_cluster, hookimpl
from resilient_cache.devcluster import DevCluster, DevNode

ANNOUNCED = "unreachable.invalid"


@pytest.fixture(scope="module")
def announcing_cluster() -> Iterator[DevCluster]:
    config = [f"cluster-announce-hostname {ANNOUNCED}", "cluster-preferred-endpoint-type hostname"]
    with DevCluster(extra_config=config) as cluster:
        # The premise of every test here: the nodes tell clients an address they cannot reach.
        slots = cluster.admin(cluster.nodes[0]).cluster("SLOTS")
        assert {entry[2][0] for entry in slots} == {ANNOUNCED}, slots
        yield cluster


class RedirectSpy:
    """A stage after routing: the redirects redis-py followed, and the node that answered."""

    def __init__(self) -> None:
        self.redirects: list[Redirect] = []
        self.nodes: list[str | None] = []

    async def __call__(self, command: Any, call_next: Any) -> Any:
        try:
            return await call_next(command)
        finally:
            self.redirects += command.redirects or []
            self.nodes.append(command.node.name if command.node is not None else None)


class SpyPlugin:
    def __init__(self, spy: RedirectSpy) -> None:
        self.spy = spy

    @hookimpl
    def resilient_cache_register_stages(self, registry: Any) -> None:
        class NoSettings(BaseModel):
            pass

        registry.add("spy", NoSettings, lambda settings, context: self.spy)


def mapped_client(cluster: DevCluster, spy: RedirectSpy | None = None) -> RedisClusterClient:
    extra: dict[str, Any] = {}
    if spy is not None:
        extra = {"stages": "timeout,retry,routing,spy,breaker", "plugins": [SpyPlugin(spy)]}
    return create_redis_cluster(
        cluster.startup_nodes,
        address_map=f"{ANNOUNCED}=127.0.0.1",
        health_check_interval=0,
        autoload=False,
        **extra,
    )


def keys_on_every_primary(cluster: DevCluster) -> dict[int, str]:
    """One key per primary, by port."""
    ports = {node.port for node in cluster.primaries()}
    keys: dict[int, str] = {}
    n = 0
    while len(keys) < len(ports):
        key = f"mapped:{n}"
        keys.setdefault(cluster.primary_for_key(key).port, key)
        n += 1
    return keys


def assert_no_announced_node(client: RedisClusterClient) -> None:
    names = {node.name for node in client.backend.raw.get_nodes()}
    assert names and all(name.startswith("127.0.0.1:") for name in names), names


async def test_without_the_map_the_client_cannot_connect_and_says_why(announcing_cluster) -> None:
    client = create_redis_cluster(
        announcing_cluster.startup_nodes,
        health_check_interval=0,
        autoload=False,
        socket_connect_timeout=2,
    )
    with pytest.raises(RedisConnectionError) as caught:
        await client.connect()
    await client.disconnect()
    message = str(caught.value)
    assert f"{ANNOUNCED}:" in message and "REDIS_ADDRESS_MAP" in message, message


@pytest.mark.parametrize("form", ["host", "json host:port"])
async def test_with_the_map_every_shard_serves(announcing_cluster, monkeypatch, form) -> None:
    cluster = announcing_cluster
    keys = keys_on_every_primary(cluster)
    if form == "host":
        monkeypatch.setenv("REDIS_ADDRESS_MAP", f"{ANNOUNCED}=127.0.0.1")
    else:  # one entry per node, as a JSON object, in upper case: host names ignore case
        entries = ", ".join(
            f'"{ANNOUNCED.upper()}:{n.port}": "127.0.0.1:{n.port}"' for n in cluster.nodes
        )
        monkeypatch.setenv("REDIS_ADDRESS_MAP", "{" + entries + "}")
    spy = RedirectSpy()
    client = create_redis_cluster(
        cluster.startup_nodes,
        stages="timeout,retry,routing,spy,breaker",
        plugins=[SpyPlugin(spy)],
        health_check_interval=0,
        autoload=False,
    )
    async with client:
        for port, key in keys.items():
            assert await client.set(key, str(port))
        assert [await client.get(key) for key in keys.values()] == [str(p).encode() for p in keys]
        assert spy.nodes[-len(keys) :] == [f"127.0.0.1:{port}" for port in keys]
        async with client.pipeline(transaction=False) as pipe:
            for key in keys.values():
                pipe.get(key)
            assert await pipe.execute() == [str(p).encode() for p in keys]
        assert_no_announced_node(client)
    assert spy.redirects == []


def node_id(cluster: DevCluster, node: DevNode) -> str:
    return str(cluster.admin(node).cluster("MYID"))


def start_migration(cluster: DevCluster, slot: int, source: DevNode, target: DevNode) -> None:
    cluster.admin(target).cluster("SETSLOT", slot, "IMPORTING", node_id(cluster, source))
    cluster.admin(source).cluster("SETSLOT", slot, "MIGRATING", node_id(cluster, target))


def migrate_keys(cluster: DevCluster, source: DevNode, target: DevNode, keys: list[str]) -> None:
    cluster.admin(source).execute_command(
        "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys
    )


def finish_migration(cluster: DevCluster, slot: int, source: DevNode, target: DevNode) -> None:
    """Move what is left of ``slot`` to ``target`` and tell every primary (idempotent)."""
    while left := cluster.admin(source).cluster("GETKEYSINSLOT", slot, 100):
        migrate_keys(cluster, source, target, list(left))
    target_id = node_id(cluster, target)
    others = [p for p in cluster.primaries() if p.port not in (source.port, target.port)]
    for node in [target, source, *others]:
        cluster.admin(node).cluster("SETSLOT", slot, "NODE", target_id)


def slot_owner(cluster: DevCluster, slot: int, observer: DevNode) -> int | None:
    for entry in cluster.admin(observer).cluster("SLOTS"):
        if int(entry[0]) <= slot <= int(entry[1]):
            return int(entry[2][1])
    return None


def give_back(cluster: DevCluster, slot: int, source: DevNode, target: DevNode) -> None:
    """Whatever state the migration is in, ``source`` serves ``slot`` again, everywhere."""
    finish_migration(cluster, slot, source, target)
    start_migration(cluster, slot, target, source)
    finish_migration(cluster, slot, target, source)
    cluster.wait_ready(timeout=30)  # every live node agrees on the slot map again
    assert slot_owner(cluster, slot, source) == source.port


def key_setup(cluster: DevCluster, tag: str) -> tuple[str, int, DevNode, DevNode]:
    key = f"{{{tag}}}:key"
    source = cluster.primary_for_key(key)
    target = next(p for p in cluster.primaries() if p.port != source.port)
    return key, key_slot(key.encode()), source, target


@pytest.mark.parametrize("redirect", ["MOVED", "ASK", "MOVED in a batch"])
async def test_a_redirect_is_followed_to_the_mapped_address(announcing_cluster, redirect) -> None:
    cluster = announcing_cluster
    key, slot, source, target = key_setup(cluster, redirect.replace(" ", "-"))
    spy = RedirectSpy()
    client = mapped_client(cluster, spy)
    moved = False
    try:
        async with client:
            assert await client.set(key, "value")  # the client's slot map: slot -> source
            moved = True
            await asyncio.to_thread(start_migration, cluster, slot, source, target)
            await asyncio.to_thread(migrate_keys, cluster, source, target, [key])
            if redirect != "ASK":
                await asyncio.to_thread(finish_migration, cluster, slot, source, target)
            spy.redirects.clear()
            # Sent to source, which answers "MOVED/ASK <slot> unreachable.invalid:<target port>".
            if redirect == "MOVED in a batch":  # redis-py sends the redirected ones again
                async with client.pipeline(transaction=False) as pipe:
                    pipe.get(key)
                    pipe.set(key, "other")
                    assert await pipe.execute() == [b"value", True]
            else:
                assert await client.get(key) == b"value"
                assert [(r.kind, r.host, r.port) for r in spy.redirects] == [
                    (redirect, "127.0.0.1", target.port)
                ]
                assert spy.nodes[-1] == f"127.0.0.1:{target.port}"
            owner = client.backend.raw.nodes_manager.get_node_from_slot(slot)
            expected_owner = source if redirect == "ASK" else target  # ASK changes no map
            assert owner.name == f"127.0.0.1:{expected_owner.port}"
            assert_no_announced_node(client)
            assert not client.is_circuit_breaker_open()
    finally:
        if moved:
            await asyncio.to_thread(give_back, cluster, slot, source, target)


async def test_health_and_failover_views_name_the_nodes_as_redis_py_does(
    announcing_cluster,
) -> None:
    cluster = announcing_cluster
    cluster.wait_ready(timeout=30)  # every replica linked: the failover view must see them
    async with mapped_client(cluster) as client:
        expected = {f"127.0.0.1:{node.port}" for node in cluster.nodes}
        stats = await client.get_stats()
        assert {f"{n.host}:{n.port}" for n in stats.nodes} == expected
        assert stats.health == "healthy", stats
        backend = client.backend
        # What the health probe falls back on without CLUSTER NODES: the endpoints of these
        # replies are the announced name, rewritten to the address the client reaches.
        first = cluster.nodes[0]
        shards = await backend.execute_on((first.host, first.port), "CLUSTER SHARDS")
        shown = {f"{node['endpoint']}:{node['port']}" for s in shards for node in s["nodes"]}
        assert shown == expected, shards
        slots = await backend.execute_on((first.host, first.port), "CLUSTER SLOTS")
        shown = {f"{node[0]}:{node[1]}" for entry in slots for node in entry[2:]}
        assert shown and shown <= expected, slots
        for primary in cluster.primaries():
            assert backend.failover_possible(f"127.0.0.1:{primary.port}") is True
            assert backend.slots_of(f"127.0.0.1:{primary.port}")
