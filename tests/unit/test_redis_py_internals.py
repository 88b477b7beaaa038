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
