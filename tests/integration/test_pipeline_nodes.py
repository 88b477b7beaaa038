"""``client.pipeline()`` on a cluster: one batch per node, each through the stages, with the
failure rules of auto-pipelining (resilient_cache/batch.py, backends/redis_py_node_batches.py).

A connection that breaks part-way through a batch is made for real: a TCP proxy in front of
one primary (the client reaches that primary through it, by ``REDIS_ADDRESS_MAP``) passes on
a set number of reply bytes and then closes the client's side, while every command the client
wrote still reaches Redis. So the replies before the cut come back, the commands after it ran
on the server, and their replies never arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from resilient_cache import (
    CircuitBreakerOpenError,
    CommandInDoubtError,
    RedisClusterClient,
    create_redis_cluster,
)
from resilient_cache.devcluster import DevCluster

TAG = "{pn}"


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``127.0.0.1:target``. Requests pass at once.
    Replies pass too, until :meth:`cut_after` arms it: then at most that many more reply bytes
    are passed on, after which the client's side of that connection is closed (the upstream
    side keeps reading, so Redis still runs every command it was sent)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.cuts = 0
        self._budget: int | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def cut_after(self, size: int) -> None:
        self._budget = size

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
            await asyncio.gather(
                self._requests(reader, upstream), self._replies(upstream_reader, writer)
            )
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                upstream.write(data)
                await upstream.drain()
        upstream.close()

    async def _replies(self, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cut = False
        while data := await upstream.read(65536):
            if cut:
                continue  # read and dropped: Redis is never held up by this connection
            if self._budget is not None:
                data, self._budget = data[: self._budget], self._budget - len(data)
                if self._budget <= 0:
                    self._budget, cut = None, True
                    self.cuts += 1
            if data:
                writer.write(data)
                await writer.drain()
            if cut:
                writer.close()  # the client sees the connection end with replies missing


@pytest.fixture
async def proxied(devcluster: DevCluster) -> AsyncIterator[tuple[RedisClusterClient, Any]]:
    """A client that reaches the primary of ``{pn}`` through a :class:`CuttingProxy`."""
    owner = devcluster.primary_for_key(f"{TAG}:a")
    async with CuttingProxy(owner.port) as proxy:
        client = create_redis_cluster(
            devcluster.startup_nodes,
            address_map=f"127.0.0.1:{owner.port}=127.0.0.1:{proxy.port}",
            health_check_interval=0,
            autoload=False,
        )
        async with client:
            node = client.get_cluster().get_node_from_key(f"{TAG}:a")
            assert node.port == proxy.port  # the premise: this shard goes through the proxy
            await client.delete(*(f"{TAG}:{name}" for name in "abnm"))
            yield client, proxy
            await client.delete(*(f"{TAG}:{name}" for name in "abnm"))


async def test_a_broken_batch_keeps_its_replies_and_settles_the_rest(proxied: Any) -> None:
    client, proxy = proxied
    pipe = client.pipeline()
    pipe.set(f"{TAG}:a", 1).incr(f"{TAG}:n").incr(f"{TAG}:m").get(f"{TAG}:a")
    proxy.cut_after(len(b"+OK\r\n:1\r\n"))  # the replies to SET and the first INCR
    replies = await pipe.execute(raise_on_error=False)
    assert proxy.cuts == 1
    assert replies[:2] == [True, 1]  # came before the cut: kept
    in_doubt = replies[2]  # an INCR that got no reply: not repeated, in doubt
    assert isinstance(in_doubt, CommandInDoubtError), in_doubt
    assert (in_doubt.command, in_doubt.position) == ("INCRBY", 3)
    assert "command #3 of the pipeline" in str(in_doubt)
    assert replies[3] == b"1"  # a GET that got no reply: sent again, answered
    # It did run, once: Redis got it before the cut, and it was never sent again.
    assert await client.get(f"{TAG}:m") == b"1"
    assert await client.get(f"{TAG}:n") == b"1"


async def test_raise_on_error_raises_the_in_doubt_command(proxied: Any) -> None:
    client, proxy = proxied
    pipe = client.pipeline()
    pipe.get(f"{TAG}:a").incr(f"{TAG}:n").get(f"{TAG}:b")
    proxy.cut_after(len(b"$-1\r\n"))
    with pytest.raises(CommandInDoubtError) as caught:
        await pipe.execute()
    assert caught.value.position == 2
    assert await client.get(f"{TAG}:n") == b"1"


async def test_an_idempotent_batch_is_retried_whole(proxied: Any) -> None:
    client, proxy = proxied
    before = client.get_metrics().commands.retried
    pipe = client.pipeline()
    pipe.set(f"{TAG}:a", "x").get(f"{TAG}:a").get(f"{TAG}:b")
    proxy.cut_after(len(b"+OK\r\n"))
    assert await pipe.execute() == [True, b"x", None]
    assert proxy.cuts == 1
    assert client.get_metrics().commands.retried == before + 1


async def test_a_failed_node_fails_only_its_own_commands(client: RedisClusterClient) -> None:
    keys = [f"pn:spread:{i}" for i in range(12)]
    cluster = client.get_cluster()
    nodes = [cluster.get_node_from_key(key).name for key in keys]
    assert len(set(nodes)) == 3
    isolated = nodes[5]
    client.isolate_node(isolated)  # its breaker open: its batch is refused at once
    try:
        pipe = client.pipeline()
        for key in keys:
            pipe.set(key, "v")
        replies = await pipe.execute(raise_on_error=False)
        for key, node, reply in zip(keys, nodes, replies, strict=True):
            if node == isolated:
                assert isinstance(reply, CircuitBreakerOpenError), (key, reply)
            else:
                assert reply is True, (key, reply)
        for key in keys:
            pipe.get(key)
        with pytest.raises(CircuitBreakerOpenError):  # the first failure raised
            await pipe.execute()
    finally:
        client.manual_reset_circuit_breaker()
    written = [key for key, node in zip(keys, nodes, strict=True) if node != isolated]
    assert await client.mget_nonatomic(written) == [b"v"] * len(written)
    await client.delete(*keys)


async def test_errors_keep_their_position_in_the_whole_pipeline(
    client: RedisClusterClient,
) -> None:
    keys = [f"pn:pos:{i}" for i in range(6)]
    await client.set(keys[4], "not a list")
    pipe = client.pipeline()
    for key in keys:
        pipe.lpush(key, "x")
    replies = await pipe.execute(raise_on_error=False)
    assert [type(r) for r in replies] == [int] * 4 + [type(replies[4])] + [int]
    assert isinstance(replies[4], ResponseError) and replies[4].position == 5
    assert "command #5 of the pipeline" in str(replies[4])
    await client.delete(*keys)


async def test_a_moved_reply_in_a_node_batch_is_followed(
    client: RedisClusterClient, devcluster: DevCluster
) -> None:
    key, other = "pn:moved:{m}", "pn:moved:other"
    await client.set(key, "v")
    cluster = client.get_cluster()
    owner = devcluster.primary_for_key(key)
    wrong = cluster.get_node_from_key(other)
    assert wrong.port != owner.port
    cluster.nodes_manager.slots_cache[client.keyslot(key)] = [wrong]  # a stale slot map
    pipe = client.pipeline()
    pipe.set(other, "w").get(key).get(other)  # one batch, to the wrong node
    assert await pipe.execute() == [True, b"v", b"w"]
    assert cluster.nodes_manager.get_node_from_slot(client.keyslot(key)).port == owner.port
    await client.delete(key, other)


async def test_what_is_not_split(client: RedisClusterClient) -> None:
    backend: Any = client._backend
    split = backend.node_batches
    assert split([(("GET", "a"), {}), (("GET", "b"), {})]) is not None
    assert split([(("GET", "a"), {}), (("PING",), {})]) is None  # no key
    assert split([(("BLPOP", "a", 0), {})]) is None  # blocking
    assert split([(("MGET", "a", "b"), {})]) is None  # keys in two slots
    node = client.get_cluster().get_node_from_key("a")
    assert split([(("GET", "a"), {"target_nodes": node})]) is None  # the caller's node
    # A pipeline that is not split is still sent, whole, by redis-py's own pipeline.
    pipe = client.pipeline()
    pipe.set("pn:whole", "1").execute_command("PING")
    assert await pipe.execute() == [True, True]
    await client.delete("pn:whole")


async def test_a_cancelled_pipeline_leaves_no_reply_on_a_connection(
    client: RedisClusterClient,
) -> None:
    # Cancelled after the write: its replies are read and dropped by the writer's task, so
    # the next commands on the same pooled connections get their own replies.
    for round_ in range(20):
        pipe = client.pipeline()
        for i in range(50):
            pipe.set(f"pn:cancel:{{c}}:{i}", round_)
        task = asyncio.ensure_future(pipe.execute())
        for _ in range(round_ % 4):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RedisConnectionError):
            await task
        assert await client.get("pn:cancel:{c}:none") is None
        assert await client.incr("pn:cancel:{c}:n") == round_ + 1
    await client.delete("pn:cancel:{c}:n", *(f"pn:cancel:{{c}}:{i}" for i in range(50)))
