"""The private parts of redis-py this package relies on, checked against the installed release.

Each one is a workaround or a hook documented where it is used. When a redis-py upgrade renames
or reshapes one, this test names it, instead of a chaos test failing on its consequences.
"""

from __future__ import annotations

import inspect
from collections import deque

import pytest
import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection


def _signature(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_cluster_node_keeps_its_free_connections_in_a_deque() -> None:
    # backends/redis_py.py: use_lifo_pools() swaps it for a LIFO queue (ASK + ASKING).
    node = ClusterNode("127.0.0.1", 6379)
    assert isinstance(node._free, deque), redis.__version__
    assert node._free.maxlen is not None


def test_cluster_has_the_reinitialise_flag() -> None:
    # backends/redis_py.py: topology_stale reads it; refresh_topology() re-reads the map.
    cluster = RedisCluster(host="127.0.0.1", port=6379)
    assert isinstance(cluster._initialize, bool), redis.__version__


@pytest.mark.parametrize(
    ("hook", "first_parameters"),
    [
        ("_record_command_metric", ["self", "command_name", "duration_seconds", "connection"]),
        ("_record_error_metric", ["self", "error", "connection"]),
    ],
)
def test_cluster_has_the_per_attempt_metric_hooks(hook: str, first_parameters: list[str]) -> None:
    # backends/redis_py.py: ReportingRedisCluster overrides them to learn the node that
    # answered and the MOVED/ASK redirects followed.
    function = getattr(RedisCluster, hook, None)
    assert function is not None, f"redis-py {redis.__version__} has no RedisCluster.{hook}"
    assert inspect.iscoroutinefunction(function)
    parameters = _signature(function)
    assert parameters[: len(first_parameters)] == first_parameters, parameters


def test_connection_parser_takes_push_handlers() -> None:
    # coherence.py: the tracking links set an invalidation push handler on the parser.
    connection = Connection(protocol=3)
    parser = connection._parser
    assert callable(parser.set_invalidation_push_handler), redis.__version__
    assert callable(parser.set_pubsub_push_handler)
