"""Every public attribute of redis-py's asyncio ``RedisCluster``, on ``RedisClusterClient``.

Each one either works on the real cluster, or raises ``NotImplementedError`` naming what to use
instead (``redis_py_api.NOT_OFFERED``, listed in docs/moving-from-redis-py.md); none is an
``AttributeError``. Commands come from redis-py's own command mixins, which the client inherits
unchanged: each is checked to be redis-py's function (it ends in ``execute_command``, which
sends it through the stages), and a sample of them runs. Everything else redis-py defines on
``RedisCluster`` itself has a check of its own below; a new redis-py attribute fails the test
until it gets one.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.lock import Lock
from redis.exceptions import RedisClusterException

from resilient_cache import ConfigurationError, RedisClusterClient, create_redis_cluster
from resilient_cache.devcluster import DevCluster
from resilient_cache.redis_py_api import NOT_OFFERED

DOC = Path(__file__).parents[2] / "docs" / "moving-from-redis-py.md"
PUBLIC = sorted(name for name in dir(RedisCluster) if not name.startswith("_"))


def _defined_in(name: str) -> str:
    for klass in RedisCluster.__mro__:
        if name in vars(klass):
            return klass.__module__
    raise AssertionError(name)


COMMAND_METHODS = [n for n in PUBLIC if _defined_in(n).startswith("redis.commands")]
OWN_ATTRIBUTES = [n for n in PUBLIC if n not in COMMAND_METHODS]

Check = Callable[[RedisClusterClient, DevCluster], Awaitable[None]]
CHECKS: dict[str, Check] = {}


def check(*names: str) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        for name in names:
            CHECKS[name] = function
        return function

    return register


@check(*[n for n in OWN_ATTRIBUTES if n.isupper() or n == "RedisClusterRequestTTL"])
async def _same_constants(client: RedisClusterClient, cluster: DevCluster) -> None:
    for name in OWN_ATTRIBUTES:
        if name.isupper() or name == "RedisClusterRequestTTL":
            assert getattr(RedisClusterClient, name) is getattr(RedisCluster, name), name


@check("aclose", "close", "initialize")
async def _lifecycle(client: RedisClusterClient, cluster: DevCluster) -> None:
    other = create_redis_cluster(cluster.startup_nodes, autoload=False, health_check_interval=0)
    assert await other.initialize() is other
    assert await other.ping()
    await other.close()
    again = create_redis_cluster(cluster.startup_nodes, autoload=False, health_check_interval=0)
    await again.connect()
    await again.aclose()


@check("execute_command", "pipeline", "transaction")
async def _commands_and_batches(client: RedisClusterClient, cluster: DevCluster) -> None:
    key = f"parity:{{{uuid.uuid4().hex[:6]}}}"
    assert await client.execute_command("SET", key, "1")
    pipe = client.pipeline(transaction=True)
    pipe.incr(key).incr(key)
    assert await pipe.execute() == [2, 3]

    async def double(pipe: Any) -> None:
        value = int(await pipe.get(key))
        pipe.multi()
        pipe.set(key, value * 2)

    assert await client.transaction(double, key) == [True]
    assert await client.get(key) == b"6"
    await client.delete(key)


@check("from_url")
async def _from_url(client: RedisClusterClient, cluster: DevCluster) -> None:
    first = cluster.nodes[0]
    async with RedisClusterClient.from_url(
        f"redis://{first.host}:{first.port}", autoload=False, health_check_interval=0
    ) as other:
        assert await other.ping()
        assert len(other.get_primaries()) == 3
    with pytest.raises(ConfigurationError, match="only database 0"):
        RedisClusterClient.from_url(f"redis://{first.host}:{first.port}/3")
    with pytest.raises(ConfigurationError, match="not a Redis URL") as caught:
        RedisClusterClient.from_url("redis://:pw-canary@host:notaport")
    assert "pw-canary" not in str(caught.value)


@check("encoder", "get_encoder", "connection_kwargs", "get_connection_kwargs", "keyslot")
async def _encoding(client: RedisClusterClient, cluster: DevCluster) -> None:
    assert client.encoder is client.get_encoder()
    assert client.encoder.encode("k") == b"k"
    assert client.connection_kwargs == client.get_connection_kwargs()
    assert client.keyslot("foo") == 12182


@check(
    "get_default_node",
    "get_node",
    "get_node_from_key",
    "get_nodes",
    "get_primaries",
    "get_random_node",
    "get_random_primary_node",
    "get_random_primary_or_all_nodes",
    "get_replicas",
    "get_special_nodes",
    "set_default_node",
    "replace_default_node",
    "get_nodes_from_slot",
    "nodes_manager",
)
async def _nodes(client: RedisClusterClient, cluster: DevCluster) -> None:
    primaries = client.get_primaries()
    assert len(primaries) == 3 and all(isinstance(n, ClusterNode) for n in primaries)
    assert client.get_random_primary_node() in primaries
    assert client.get_random_primary_or_all_nodes("PING")
    assert client.get_random_node() in client.get_nodes()
    assert set(client.get_replicas()) <= set(client.get_nodes())
    default = client.get_default_node()
    assert default in primaries
    other = next(n for n in primaries if n is not default)
    client.set_default_node(other)
    assert client.get_default_node() is other
    client.replace_default_node()
    assert client.get_default_node() is not other
    node = client.get_node_from_key("foo")
    assert client.get_node(node_name=node.name) is node
    assert await client.get_nodes_from_slot("GET", "foo") == [node]
    assert client.nodes_manager.get_node_from_slot(12182) is node
    with pytest.raises(RedisClusterException, match=r"FT\.AGGREGATE"):  # redis-py's own answer
        client.get_special_nodes()  # (the nodes of the last FT.AGGREGATE, for FT.CURSOR)


@check(
    "commands_parser",
    "command_flags",
    "node_flags",
    "response_callbacks",
    "result_callbacks",
    "set_response_callback",
    "maint_notifications_config",
    "read_from_replicas",
)
async def _tables(client: RedisClusterClient, cluster: DevCluster) -> None:
    assert "get" in client.commands_parser.commands
    assert client.command_flags["PING"] in RedisCluster.NODE_FLAGS
    assert client.node_flags == RedisCluster.NODE_FLAGS
    assert client.response_callbacks["EXPIRE"] is bool
    assert "CLUSTER SLOTS" in client.result_callbacks or client.result_callbacks
    client.maint_notifications_config  # noqa: B018 - readable, whatever its value
    assert client.read_from_replicas is False
    key = f"parity:cb:{uuid.uuid4().hex[:6]}"
    before = client.response_callbacks.get("STRLEN")
    client.set_response_callback("STRLEN", lambda response, **options: ("seen", response))
    try:
        assert await client.strlen(key) == ("seen", 0)
    finally:
        client.set_response_callback("STRLEN", before or (lambda response, **options: response))


@check("lock")
async def _lock(client: RedisClusterClient, cluster: DevCluster) -> None:
    lock = client.lock(f"parity:lock:{uuid.uuid4().hex[:6]}", timeout=5)
    assert isinstance(lock, Lock)
    assert await lock.acquire(blocking=False)
    await lock.release()


@check("pubsub", "keyspace_notifications")
async def _subscriptions(client: RedisClusterClient, cluster: DevCluster) -> None:
    async with client.pubsub() as pubsub:
        await pubsub.subscribe("parity:channel")
        assert pubsub.subscribed
    notifications = client.keyspace_notifications()
    assert notifications is not None


@check("himport_registry")
async def _himport_registry(client: RedisClusterClient, cluster: DevCluster) -> None:
    assert client.himport_registry is not None


def test_every_attribute_has_a_check_or_is_not_offered() -> None:
    unchecked = [n for n in OWN_ATTRIBUTES if n not in CHECKS and n not in NOT_OFFERED]
    assert unchecked == [], "give these a check (or a NOT_OFFERED entry with the alternative)"
    assert set(NOT_OFFERED) <= set(PUBLIC), "NOT_OFFERED names something redis-py dropped"


@pytest.mark.parametrize("name", sorted(set(CHECKS.values()), key=lambda f: f.__name__), ids=str)
async def test_it_works(name: Check, client: RedisClusterClient, devcluster: DevCluster) -> None:
    await name(client, devcluster)


@pytest.mark.parametrize("name", sorted(NOT_OFFERED))
def test_what_is_not_offered_says_what_to_use(name: str, client: RedisClusterClient) -> None:
    with pytest.raises(NotImplementedError) as caught:
        value = getattr(client, name)
        value()
    assert str(caught.value) == f"RedisClusterClient.{name}: {NOT_OFFERED[name]}"
    assert f"`{name}`" in DOC.read_text(), f"docs/moving-from-redis-py.md does not list {name}"


def test_the_commands_are_redis_pys_own(client: RedisClusterClient) -> None:
    assert len(COMMAND_METHODS) > 350
    for name in COMMAND_METHODS:
        ours = inspect.getattr_static(RedisClusterClient, name)
        theirs = inspect.getattr_static(RedisCluster, name)
        # redis-py's own, or one of ours that sends it through the stages too (PUBLISH with
        # its channel as key: tests/integration/test_pubsub.py).
        assert ours is theirs or ours.__module__.startswith("resilient_cache"), name


async def test_a_sample_of_commands_runs_through_the_stages(client: RedisClusterClient) -> None:
    key = f"parity:cmd:{uuid.uuid4().hex[:6]}"
    assert await client.hset(key, mapping={"a": "1"}) == 1
    assert await client.hgetall(key) == {b"a": b"1"}
    assert await client.expire(key, 60)
    assert 0 < await client.ttl(key) <= 60
    assert [k async for k in client.scan_iter(match=key)] == [key.encode()]
    assert await client.cluster_info()
    assert await client.cluster_keyslot(key) == client.keyslot(key)
    assert await client.delete(key) == 1
    assert client.get_metrics().commands.total >= 8
