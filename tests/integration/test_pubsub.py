"""Pub/sub on the client, on the real cluster (and a single Redis): redis-py's API round trips,
PUBLISH and SPUBLISH through the stages (routed to their channel's slot), subscriptions outside
them, a subscription connection killed by the server and resubscribed, and the closed client."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
from pydantic import BaseModel

from resilient_cache import (
    Command,
    Handler,
    NotConnectedError,
    RedisClusterClient,
    StageRegistry,
    create_redis_cluster,
    hookimpl,
)
from resilient_cache.devcluster import DevCluster
from tests.conftest import async_wait_until
from tests.probes import CommandLog

Read = Callable[..., Awaitable[Any]]


@pytest.fixture
def name() -> str:
    return f"pubsub:{uuid.uuid4().hex[:8]}"


async def _next(read: Read, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next message of type ``kind`` that ``read`` (``get_message``, ...) returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await read(timeout=0.1)
        if message is not None and message["type"] == kind:
            return dict(message)
    raise AssertionError(f"no {kind!r} message within {timeout}s")


async def _publish_until_received(publish: Callable[[str], Awaitable[Any]], read: Read) -> None:
    """Publish numbered messages until one published by this call arrives (what is published
    while no subscription is in place is lost, so one publish is not enough after a loss; and
    a message published before may still be waiting in the socket)."""
    first = time.monotonic_ns()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await publish(str(time.monotonic_ns()))
        message = await read(timeout=0.2)
        if message is not None and int(message["data"]) >= first:
            return
    raise AssertionError("no message arrived within 10s")


def _address(node: Any) -> str:
    return f"{node.host}:{node.port}"


async def test_subscribe_and_publish_round_trip_in_async_with(client: RedisClusterClient, name):
    async with client.pubsub() as pubsub:
        await pubsub.subscribe(name)
        confirmed = await _next(pubsub.get_message, "subscribe")
        assert confirmed["channel"] == name.encode()
        # The subscriber is on the channel's slot's primary, where PUBLISH goes: counted there.
        assert await client.publish(name, "hello") == 1
        message = await _next(pubsub.get_message, "message")
        assert (message["channel"], message["data"]) == (name.encode(), b"hello")
    assert pubsub.connection is None and not pubsub.subscribed  # closed by async with


async def test_psubscribe_receives_from_channels_on_any_node(client: RedisClusterClient, name):
    async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.psubscribe(f"{name}:*")
        # Channels in other slots, published on other primaries: the cluster forwards them.
        channels = [f"{name}:{i}" for i in range(6)]
        assert len({client.get_node_from_key(c).name for c in channels}) > 1
        for channel in channels:
            await client.publish(channel, channel)
        received = [await _next(pubsub.get_message, "pmessage") for _ in channels]
    assert {m["pattern"] for m in received} == {f"{name}:*".encode()}
    assert sorted(m["channel"] for m in received) == sorted(c.encode() for c in channels)


async def test_ssubscribe_and_spublish_round_trip_on_the_slots_primary(
    client: RedisClusterClient, devcluster: DevCluster, name
):
    async with client.pubsub() as pubsub:
        await pubsub.ssubscribe(name)
        await _next(pubsub.get_sharded_message, "ssubscribe")
        assert list(pubsub.node_pubsub_mapping) == [_address(devcluster.primary_for_key(name))]
        assert await client.spublish(name, "sharded") == 1
        message = await _next(pubsub.get_sharded_message, "smessage")
        assert (message["channel"], message["data"]) == (name.encode(), b"sharded")


async def test_unsubscribe_and_sunsubscribe_end_the_subscriptions(client: RedisClusterClient, name):
    pubsub = client.pubsub()
    await pubsub.subscribe(name)
    await pubsub.ssubscribe(name)
    await _next(pubsub.get_message, "subscribe")
    await _next(pubsub.get_sharded_message, "ssubscribe")
    assert (await client.publish(name, "1"), await client.spublish(name, "1")) == (1, 1)
    await pubsub.unsubscribe(name)
    await _next(pubsub.get_message, "unsubscribe")
    await pubsub.sunsubscribe(name)
    await _next(pubsub.get_sharded_message, "sunsubscribe")
    # The servers processed both before confirming: nobody is subscribed any more.
    assert (await client.publish(name, "2"), await client.spublish(name, "2")) == (0, 0)
    assert not pubsub.subscribed
    await pubsub.aclose()


async def test_listen_yields_messages_until_unsubscribed(client: RedisClusterClient, name):
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(name)
    received: list[bytes] = []

    async def listen() -> None:
        async for message in pubsub.listen():
            received.append(message["data"])

    task = asyncio.create_task(listen())
    for data in ("a", "b", "c"):
        await client.publish(name, data)

    async def all_received() -> bool:
        return len(received) == 3

    await async_wait_until(all_received, 5, "three messages through listen()")
    await pubsub.unsubscribe()
    await asyncio.wait_for(task, 5)  # listen() ends once nothing is subscribed
    assert received == [b"a", b"b", b"c"]
    await pubsub.aclose()


async def test_run_calls_the_handlers(client: RedisClusterClient, name):
    pubsub = client.pubsub()
    handled: list[bytes] = []
    await pubsub.subscribe(**{name: lambda message: handled.append(message["data"])})
    task = asyncio.create_task(pubsub.run(poll_timeout=0.1))
    try:

        async def handled_one() -> bool:
            await client.publish(name, "to the handler")
            return bool(handled)

        await async_wait_until(handled_one, 5, "the handler to be called", interval=0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()
    assert set(handled) == {b"to the handler"}


class _NoSettings(BaseModel):
    pass


class NodeLog:
    """A stage recording each command's name and the node routing chose for it (register as
    ``nodelog``, after routing; ``None``: routing left the choice to redis-py)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        self.calls.append((command.name, command.node.name if command.node else None))
        return await call_next(command)

    @hookimpl
    def resilient_cache_register_stages(self, registry: StageRegistry) -> None:
        registry.add("nodelog", _NoSettings, lambda settings, context: self)


async def test_publish_and_spublish_go_through_the_stages_and_subscriptions_do_not(
    cluster_nodes: str, devcluster: DevCluster, name
):
    log, nodes = CommandLog(), NodeLog()
    client = create_redis_cluster(
        cluster_nodes,
        health_check_interval=0,
        autoload=False,
        plugins=[log, nodes],
        stages="commandlog,tracing,metrics,memory,timeout,retry,routing,nodelog,breaker",
    )
    async with client:
        pubsub = client.pubsub()
        await pubsub.subscribe(name)
        await pubsub.ssubscribe(name)
        await pubsub.psubscribe(f"{name}*")
        await _next(pubsub.get_sharded_message, "ssubscribe")
        before = client.get_metrics().commands.total
        assert await client.publish(name, "p") == 2  # the channel and the pattern
        assert await client.spublish(name, "s") == 1
        assert client.get_metrics().commands.total == before + 2
        await pubsub.aclose()
    assert log.names == ["PUBLISH", "SPUBLISH"]  # no SUBSCRIBE, SSUBSCRIBE, PSUBSCRIBE
    # Routed by the channel's slot by the routing stage (so that node's breaker guards them).
    owner = _address(devcluster.primary_for_key(name))
    assert nodes.calls == [("PUBLISH", owner), ("SPUBLISH", owner)]


async def test_a_subscription_before_connect_reads_the_slot_map_itself(cluster_nodes: str, name):
    client = create_redis_cluster(cluster_nodes, health_check_interval=0, autoload=False)
    pubsub = client.pubsub()  # no connect(), no command yet: redis-py has no slot map
    await pubsub.ssubscribe(name)
    await pubsub.subscribe(name)
    await _next(pubsub.get_sharded_message, "ssubscribe")
    await _next(pubsub.get_message, "subscribe")
    await client.spublish(name, "s")
    assert (await _next(pubsub.get_sharded_message, "smessage"))["data"] == b"s"
    await client.aclose()


async def test_a_pinned_node_holds_the_classic_subscriptions(client: RedisClusterClient, name):
    node = client.get_primaries()[-1]
    for pubsub in (client.pubsub(node=node), client.pubsub(host=node.host, port=node.port)):
        await pubsub.subscribe(name)
        await _next(pubsub.get_message, "subscribe")
        assert pubsub.get_pubsub_node() is node
        await pubsub.aclose()


def _kill_subscription_connections(devcluster: DevCluster, address: str, client_name: str) -> int:
    """CLIENT KILL, on the node at ``address``, every connection named ``client_name``."""
    node = next(n for n in devcluster.nodes if _address(n) == address)
    admin = devcluster.admin(node)
    ids = [c["id"] for c in admin.client_list(_type="pubsub") if c.get("name") == client_name]
    for client_id in ids:
        admin.client_kill_filter(_id=client_id)
    return len(ids)


@pytest.mark.parametrize("sharded", [False, True], ids=["classic", "sharded"])
async def test_a_subscription_connection_killed_by_the_server_is_resubscribed(
    cluster_nodes: str, devcluster: DevCluster, name, sharded: bool
):
    client_name = f"sub-{uuid.uuid4().hex[:8]}"
    client = create_redis_cluster(
        cluster_nodes, health_check_interval=0, autoload=False, client_name=client_name
    )
    async with client:
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # data messages only
        if sharded:
            await pubsub.ssubscribe(name)
            read, publish = pubsub.get_sharded_message, partial(client.spublish, name)
            node = next(iter(pubsub.node_pubsub_mapping))
        else:
            await pubsub.subscribe(name)
            await pubsub.psubscribe(f"{name}:*")  # on the same connection, replayed with it
            read, publish = pubsub.get_message, partial(client.publish, name)
            node = pubsub.get_pubsub_node().name
        await _publish_until_received(publish, read)
        assert _kill_subscription_connections(devcluster, node, client_name) == 1
        await _publish_until_received(publish, read)  # a read met the loss and resubscribed
        # Subscribed once again, on the same (live) node: one subscriber, one connection.
        assert await publish("0") == 1
        if not sharded:
            await client.publish(f"{name}:x", "1")  # to the pattern, replayed too
            assert (await _next(read, "pmessage"))["data"] == b"1"
        assert _kill_subscription_connections(devcluster, node, client_name) == 1
        await pubsub.aclose()


async def test_pubsub_on_a_single_redis(standalone_redis: str, name):
    client = create_redis_cluster(url=standalone_redis, health_check_interval=0, autoload=False)
    async with client:
        with pytest.raises(NotImplementedError, match="single Redis"):
            client.pubsub(host="127.0.0.1", port=6379)
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(name)
            await pubsub.ssubscribe(f"{name}:s")
            await _next(pubsub.get_message, "subscribe")
            assert await client.publish(name, "plain") == 1
            assert (await _next(pubsub.get_message, "message"))["data"] == b"plain"
            assert await client.spublish(f"{name}:s", "shard") == 1
            assert (await _next(pubsub.get_message, "smessage"))["data"] == b"shard"
            # The server drops the subscription's connection: the next reads reconnect.
            assert await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
            await _publish_until_received(partial(client.publish, name), pubsub.get_message)
            assert await client.publish(name, "again") == 1


async def test_a_closed_client_refuses_pubsub_and_closes_its_subscriptions(
    cluster_nodes: str, name
):
    client = create_redis_cluster(cluster_nodes, health_check_interval=0, autoload=False)
    await client.connect()
    pubsub = client.pubsub()
    await pubsub.subscribe(name)
    await _next(pubsub.get_message, "subscribe")
    await client.aclose()
    assert pubsub.connection is None and not pubsub.subscribed  # closed with the client
    with pytest.raises(NotConnectedError, match="disconnected"):
        await pubsub.get_message(timeout=0.1)
    with pytest.raises(NotConnectedError, match=r"pubsub\(\): this client is disconnected"):
        client.pubsub()
