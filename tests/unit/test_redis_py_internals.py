"""The private parts of redis-py this package relies on, checked against the installed release.

Every one of them is reached through ``resilient_cache/backends/_redis_py_compat.py``; each test
below exercises one of its functions on real redis-py objects, or finds the exact wording the
compat module matches in redis-py's own source. When a redis-py upgrade renames or rewords one,
the test names it, instead of a chaos test failing on its consequences.
"""

from __future__ import annotations

import inspect
from collections import deque
from types import ModuleType

import pytest
import redis
import redis.asyncio.client
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.commands.cluster
import redis.utils
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import AuthenticationError, ClusterError, RedisClusterException

from resilient_cache.backends import _redis_py_compat as compat
from resilient_cache.batch import ClientPipeline
from resilient_cache.client import RedisClusterClient


def _signature(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def _source(module: ModuleType) -> str:
    return inspect.getsource(module)


def test_free_connections_become_last_in_first_out() -> None:
    node = ClusterNode("127.0.0.1", 6379)
    assert isinstance(node._free, deque) and node._free.maxlen is not None, redis.__version__
    assert not compat.uses_lifo_pool(node)
    compat.use_lifo_pools([node])
    assert compat.uses_lifo_pool(node)
    node._free.append("a")
    node._free.append("b")
    assert node._free.popleft() == "b"  # redis-py takes from the left: the newest first


def test_slot_map_stale_reads_the_reinitialise_flag() -> None:
    cluster = RedisCluster(host="127.0.0.1", port=6379)
    assert isinstance(cluster._initialize, bool), redis.__version__
    cluster._initialize = True
    assert compat.slot_map_stale(cluster)
    cluster._initialize = False
    assert not compat.slot_map_stale(cluster)


@pytest.mark.parametrize(
    ("hook", "first_parameters"),
    [
        ("_record_command_metric", ["self", "command_name", "duration_seconds", "connection"]),
        ("_record_error_metric", ["self", "error", "connection"]),
    ],
)
def test_cluster_has_the_per_attempt_metric_hooks(hook: str, first_parameters: list[str]) -> None:
    # ReportingRedisCluster overrides them to learn the node that answered and the redirects.
    function = getattr(RedisCluster, hook, None)
    assert function is not None, f"redis-py {redis.__version__} has no RedisCluster.{hook}"
    assert inspect.iscoroutinefunction(function)
    assert _signature(function)[: len(first_parameters)] == first_parameters
    assert hook in vars(compat.ReportingRedisCluster)
    assert f"self.{hook}(" in _source(redis.asyncio.cluster), f"redis-py no longer calls {hook}"


async def test_commands_are_read_from_any_primary_that_accepts_the_credentials() -> None:
    # redis-py reads COMMAND from its default node through commands_parser.initialize().
    assert "await self.commands_parser.initialize(" in inspect.getsource(RedisCluster.initialize)
    cluster = compat.ReportingRedisCluster(host="127.0.0.1", port=6379)
    assert isinstance(cluster.commands_parser, compat.AnyPrimaryCommandsParser)
    assert isinstance(cluster.commands_parser, redis.asyncio.cluster.AsyncCommandsParser)

    class Node:
        def __init__(self, name: str, refuses: bool) -> None:
            self.name, self.refuses = name, refuses

        async def execute_command(self, *args: object) -> dict[str, object]:
            assert args == ("COMMAND",)
            if self.refuses:
                raise AuthenticationError("invalid username-password pair or user is disabled.")
            return {"GET": {"name": "get"}}

    class Cluster:
        def __init__(self, nodes: list[Node]) -> None:
            self.nodes = nodes
            self.default: Node | None = None

        def get_primaries(self) -> list[Node]:
            return self.nodes

        def set_default_node(self, node: Node) -> None:
            self.default = node

    refusing, accepting = Node("a", True), Node("b", False)
    fake = Cluster([refusing, Node("c", True), accepting])
    parser = compat.AnyPrimaryCommandsParser(fake)  # type: ignore[arg-type]
    await parser.initialize(refusing)
    assert parser.commands == {"get": {"name": "get"}} and fake.default is accepting
    everyone_refuses = Cluster([refusing, Node("c", True)])
    parser = compat.AnyPrimaryCommandsParser(everyone_refuses)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError):
        await parser.initialize(refusing)
    assert everyone_refuses.default is None


def test_connection_parser_takes_push_handlers() -> None:
    connection = Connection(protocol=3, parser_class=compat.RESP3_PUSH_PARSER)
    parser = compat.connection_parser(connection)
    assert isinstance(parser, compat.RESP3_PUSH_PARSER), redis.__version__
    assert callable(parser.set_invalidation_push_handler)
    assert callable(parser.set_pubsub_push_handler)


def test_the_client_gets_redis_pys_event_dispatcher() -> None:
    cluster = RedisCluster(host="127.0.0.1", port=6379)
    assert compat.event_dispatcher(cluster) is not None, redis.__version__


@pytest.mark.parametrize("transaction", [False, True])
def test_batch_errors_can_be_annotated_by_us(transaction: bool) -> None:
    def annotate(exception: BaseException, number: int, command: object) -> None:
        pass

    cluster = RedisCluster(host="127.0.0.1", port=6379)
    pipe = cluster.pipeline(transaction=transaction)
    compat.annotate_batch_errors_with(pipe, annotate)
    strategy = pipe._execution_strategy
    assert strategy._annotate_exception is annotate, redis.__version__
    assert "self._annotate_exception(" in _source(redis.asyncio.cluster)
    assert "self.annotate_exception(" in _source(redis.asyncio.client)  # standalone pipeline


def test_redis_py_reads_the_names_our_classes_define() -> None:
    cluster_commands = _source(redis.commands.cluster)
    assert "self._execute_pipeline_by_slot(" in cluster_commands, redis.__version__
    assert "def _execute_pipeline_by_slot(" in _source(RedisClusterClient)
    assert RedisCluster._is_async_client is True
    assert RedisClusterClient._is_async_client is True
    assert ClientPipeline._is_async_client is True


def test_closed_in_use_matches_redis_pys_attribute_errors() -> None:
    writing = AttributeError("'NoneType' object has no attribute 'writelines'")
    reading = AttributeError("'NoneType' object has no attribute 'read'")
    assert compat.closed_in_use(writing) is False  # never sent
    assert compat.closed_in_use(reading) is True
    assert compat.closed_in_use(AttributeError("something else")) is None


_CLUSTER = redis.asyncio.cluster


@pytest.mark.parametrize(
    ("predicate", "wording", "module"),
    [
        (compat.redirects_exhausted, '"TTL exhausted."', _CLUSTER),
        (compat.slots_not_covered, "All slots are not covered", _CLUSTER),
        (compat.cluster_cannot_be_connected, "Redis Cluster cannot be connected", _CLUSTER),
        (compat.failed_while_connecting, "connecting to {host_error}", redis.utils),
        (
            compat.failed_while_connecting,
            '"Timeout connecting to server"',
            redis.asyncio.connection,
        ),
    ],
)
def test_the_wording_matched_is_redis_pys(predicate: object, wording: str, module: object) -> None:
    assert wording in _source(module), f"redis-py {redis.__version__} no longer says {wording}"


def test_the_predicates_recognise_the_messages() -> None:
    assert compat.redirects_exhausted(ClusterError("TTL exhausted."))
    assert compat.slots_not_covered(RedisClusterException("All slots are not covered after ..."))
    assert compat.cluster_cannot_be_connected(
        RedisClusterException("Redis Cluster cannot be connected. Please provide ...")
    )
    assert compat.failed_while_connecting(
        redis.ConnectionError("Error 111 connecting to 127.0.0.1:7000. Connection refused.")
    )
    assert not compat.failed_while_connecting(redis.ConnectionError("Connection reset by peer"))


def test_messages_that_quote_a_command_are_redis_pys() -> None:
    source = _source(redis.asyncio.cluster)
    for start in compat.QUOTES_COMMAND:
        assert start in source, f"redis-py {redis.__version__} no longer says {start!r}"
    assert "of pipeline caused error: " in source
    position, original = compat.unannotated(
        redis.ResponseError("Command # 2 (SET k v EX x) of pipeline caused error: ERR syntax")
    )
    assert (position, original) == (2, "ERR syntax")


def test_redis_py_closes_everything_from_the_attempt_we_recognise() -> None:
    """``ReportingRedisCluster.aclose()`` recognises redis-py's per-attempt error path by the
    code object of ``RedisCluster._execute_command`` (the caller's frame). That function must
    be redis-py's own, unwrapped, and still answer CLUSTERDOWN with ``self.aclose()``
    (else the override is moot: the chaos test would still pass, silently testing nothing)."""
    attempt = RedisCluster._execute_command
    assert inspect.iscoroutinefunction(attempt), redis.__version__
    assert attempt.__code__.co_name == "_execute_command", redis.__version__
    assert compat._ATTEMPT_CODE is attempt.__code__
    source = inspect.getsource(attempt)
    branch = source.split("except (ClusterDownError, SlotNotCoveredError)", 1)
    assert len(branch) == 2, redis.__version__
    assert "await self.aclose()" in branch[1].split("except ", 1)[0], redis.__version__


# -- REDIS_ADDRESS_MAP: redirects remapped like the slot map ---------------------------------


def _remap(address: tuple[str, int]) -> tuple[str, int]:
    return ("127.0.0.1", 7000) if address == ("10.0.0.5", 6379) else address


def test_redis_py_remaps_the_slot_map_but_not_redirects() -> None:
    """If a redis-py release remaps redirects itself, ``remap_redirects`` must go (a second
    remap of an address already remapped is wrong for a map that chains)."""
    nodes_manager = redis.asyncio.cluster.NodesManager
    assert "self.remap_host_port(host, port)" in inspect.getsource(nodes_manager.initialize)
    move_slot = inspect.getsource(nodes_manager.move_slot)
    assert "e.host, e.port" in move_slot, redis.__version__
    assert "remap" not in move_slot, f"redis-py {redis.__version__} remaps MOVED itself"
    attempt = inspect.getsource(RedisCluster._execute_command)
    ask = attempt.split("except AskError as e:", 1)
    assert len(ask) == 2, redis.__version__
    assert "get_node_name(host=e.host, port=e.port)" in ask[1].split("except ", 1)[0]
    assert "remap" not in attempt, f"redis-py {redis.__version__} remaps ASK itself"


def test_every_reply_is_read_by_the_connection_class_we_swap() -> None:
    # ClusterNode reads every reply (commands, pipelines) through connection.read_response,
    # which raises a MOVED/ASK reply; a transaction reads EXEC's through the same method.
    assert "await connection.read_response(" in inspect.getsource(ClusterNode.parse_response)
    assert inspect.iscoroutinefunction(Connection.read_response), redis.__version__
    assert "raise response from None" in inspect.getsource(Connection.read_response)
    error = redis.exceptions.AskError("3999 10.0.0.5:6379")
    assert (error.host, error.port, error.node_addr) == ("10.0.0.5", 6379, ("10.0.0.5", 6379))


async def test_redirects_are_remapped_on_every_node_redis_py_makes() -> None:
    from redis.exceptions import AskError, MovedError

    cluster = compat.ReportingRedisCluster(host="10.0.0.5", port=6379, address_remap=_remap)
    kwargs = cluster.connection_kwargs
    # The dict the nodes manager makes each new ClusterNode from is the one we changed.
    assert cluster.nodes_manager.connection_kwargs is kwargs, redis.__version__
    mapped = kwargs["connection_class"]
    assert issubclass(mapped, Connection) and mapped is not Connection
    [seed] = cluster.nodes_manager.startup_nodes.values()
    assert seed.connection_class is mapped
    cluster.nodes_manager.slots_cache[5] = [seed]
    await cluster.nodes_manager.move_slot(MovedError("5 10.0.0.9:7009"))  # an unknown node
    made = cluster.nodes_manager.get_node(node_name="10.0.0.9:7009")
    assert made is not None and made.connection_class is mapped
    connection = made.acquire_connection()  # made, not connected
    assert isinstance(connection, mapped)
    made.release(connection)

    class Redirecting(Connection):
        async def read_response(self, *args: object, **kwargs: object) -> object:
            raise (AskError if kwargs.get("ask") else MovedError)("3999 10.0.0.5:6379")

    remapping = compat._remapping_connection_class(Redirecting, _remap)
    for ask in (False, True):
        with pytest.raises(AskError) as caught:
            await remapping().read_response(ask=ask)
        redirect = caught.value
        assert (redirect.host, redirect.port, redirect.node_addr) == (
            "127.0.0.1",
            7000,
            ("127.0.0.1", 7000),
        )
        assert str(redirect) == "3999 10.0.0.5:6379"  # the message: what the server said
    plain = compat.ReportingRedisCluster(host="10.0.0.5", port=6379)
    assert plain.connection_kwargs["connection_class"] is Connection  # no remap, no swap


def test_a_cluster_pubsub_uses_the_node_pool_we_give_it() -> None:
    """``ResilientClusterPubSub`` moves a classic subscription to another node by giving it
    that node's pool (redis-py's private adapter) and connecting: redis-py must take the
    connection from ``self.connection_pool``, pick a node itself only while it has none, and
    call back ``self.on_connect`` (which we override) when the connection reconnects."""
    node = ClusterNode("127.0.0.1", 6379)
    pool = compat.node_connection_pool(node)
    assert pool.connection_kwargs is node.connection_kwargs, redis.__version__
    assert pool.get_encoder() is not None
    assert inspect.iscoroutinefunction(pool.get_connection)
    assert inspect.iscoroutinefunction(pool.release)
    pick = inspect.getsource(redis.asyncio.cluster.ClusterPubSub.execute_command)
    assert "if self.connection_pool is None:" in pick, redis.__version__
    connect = inspect.getsource(redis.asyncio.client.PubSub.connect)
    assert "await self.connection_pool.get_connection()" in connect, redis.__version__
    assert "register_connect_callback(self.on_connect)" in connect, redis.__version__


def test_the_sharded_pubsub_parts_the_recovery_uses() -> None:
    cluster = RedisCluster(host="127.0.0.1", port=6379)
    pubsub = redis.asyncio.cluster.ClusterPubSub(cluster)
    assert pubsub.node_pubsub_mapping == {}, redis.__version__
    assert inspect.iscoroutinefunction(pubsub.reinitialize_shard_subscriptions)
    params = _signature(redis.asyncio.cluster.ClusterPubSub.get_sharded_message)
    assert params[:4] == ["self", "ignore_subscribe_messages", "timeout", "target_node"]


async def test_a_read_on_a_closed_pubsub_is_recognised() -> None:
    pubsub = redis.asyncio.client.PubSub(redis.asyncio.ConnectionPool())
    with pytest.raises(RuntimeError) as raised:
        await pubsub.get_message(timeout=0)  # no connection: what a closed per-node one says
    assert compat.pubsub_not_connected(raised.value), (redis.__version__, str(raised.value))
    assert not compat.pubsub_not_connected(RuntimeError("Event loop is closed"))


def test_a_slots_nodes_are_read_from_the_slot_map_primary_first() -> None:
    """``slot_nodes_of()`` (replica reads, docs/routing.md, and the cluster backend's
    ``route()``, which takes ``[0]`` as the primary) reads ``NodesManager.slots_cache``:
    ``{slot: [primary, replica, ...]}``, the very list redis-py's own replica balancing and its
    MOVED handling index (``[0]`` is the primary)."""
    from redis.cluster import LoadBalancingStrategy

    cluster = RedisCluster(host="127.0.0.1", port=6379)
    manager = cluster.nodes_manager
    assert isinstance(manager.slots_cache, dict), redis.__version__
    primary = ClusterNode("127.0.0.1", 7000, server_type="primary")
    replica = ClusterNode("127.0.0.1", 7003, server_type="replica")
    manager.slots_cache[42] = [primary, replica]
    assert compat.slot_nodes_of(manager, 42) == [primary, replica]
    assert compat.slot_nodes_of(manager, 42) is manager.slots_cache[42]  # no copy
    assert compat.slot_nodes_of(manager, 43) is None
    assert manager.get_node_from_slot(42) is primary
    replica_first = LoadBalancingStrategy.ROUND_ROBIN_REPLICAS
    assert manager.get_node_from_slot(42, load_balancing_strategy=replica_first) is replica


def test_the_node_and_connection_parts_auto_pipelining_uses() -> None:
    # backends/redis_py_autopipeline.py drives a node's pool and connection itself, as redis-py's
    # own ClusterNode.execute_pipeline does: these must keep their names and meaning.
    from redis.asyncio.connection import Connection

    node = ClusterNode("127.0.0.1", 6379)
    connection = node.acquire_connection()
    assert isinstance(connection, Connection) and connection in node._connections
    node.release(connection)
    assert node.acquire_connection() is connection  # released connections are reused
    for name in (
        "disconnect_if_needed",
        "parse_response",
        "update_active_connections_for_reconnect",
    ):
        assert callable(getattr(node, name))
    assert list(inspect.signature(ClusterNode.parse_response).parameters)[:3] == [
        "self",
        "connection",
        "command",
    ]
    assert connection.is_connected is False
    assert b"".join(connection.pack_command("GET", "k")) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    send = inspect.signature(Connection.send_packed_command).parameters
    assert "check_health" in send
    assert "nowait" in inspect.signature(Connection.disconnect).parameters
    # pipelines are written and read this way by redis-py itself
    source = inspect.getsource(ClusterNode.execute_pipeline)
    assert "send_packed_command" in source and "parse_response" in source
    from redis.asyncio.cluster import NodesManager

    assert inspect.iscoroutinefunction(NodesManager.move_slot)
