"""Every private part of redis-py this package relies on, in one place.

redis-py (8.x) offers no public way to do these things; each is a small, documented reliance on
its internals or on the wording of its messages, and each has a test in
``tests/unit/test_redis_py_internals.py`` that fails first, naming the part, when a redis-py
upgrade changes it (rather than a chaos test failing on the consequences).

Besides what is below, two names are read by redis-py from this package's own classes:

- ``_is_async_client = True`` on ``RedisClusterClient`` and ``ClientPipeline``: redis-py's
  command mixins check it to return awaitables.
- ``RedisClusterClient._execute_pipeline_by_slot``: redis-py's multi-key helpers (``delete``,
  ``exists``, ``mget_nonatomic``, ...) call it to send one command per slot; ours sends each
  through the pipeline of stages.
- ``on_connect`` on ``pubsub.ResilientClusterPubSub``: redis-py registers a pub/sub's
  ``on_connect`` as its connection's reconnect callback; ours resubscribes the classic channels
  and patterns only.
"""

from __future__ import annotations

import ast
import collections
import re
import sys
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from redis._parsers import _AsyncRESP3Parser
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import RedisCluster, _ClusterNodePoolAdapter
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterError,
    MovedError,
    RedisClusterException,
)

from resilient_cache.pipeline import Redirect

#: The pure-Python RESP3 parser: unlike hiredis it hands push messages (client-tracking
#: invalidations) to the handlers set on it (coherence.py).
RESP3_PUSH_PARSER = _AsyncRESP3Parser


def connection_parser(connection: Any) -> Any:
    """The parser of a redis-py connection, to set push handlers on (coherence.py)."""
    return connection._parser


def event_dispatcher(raw: Any) -> Any:
    """The event dispatcher redis-py's command mixins read from the client (or ``None``)."""
    return getattr(raw, "_event_dispatcher", None)


def slot_map_stale(cluster: RedisCluster) -> bool:
    """redis-py's own "re-read the slot map before the next command" flag (set after a
    connection error or a redirect storm). A bool already: read before every command, so no
    ``bool()`` call around it."""
    return cluster._initialize


def take_slot_map_stale(cluster: RedisCluster) -> bool:
    """Clear redis-py's flag and say whether it was raised. While it is raised, redis-py's next
    command (or pipeline) re-reads the slot map itself, inline and under a lock: it asks one
    startup node after the other, so with the cluster hung every caller would wait for six
    socket timeouts. The backend takes the flag and re-reads the map in the background."""
    if cluster._initialize:
        cluster._initialize = False
        return True
    return False


def slot_nodes_of(nodes_manager: Any, slot: int) -> list[Any] | None:
    """The nodes redis-py's slot map lists for ``slot``, primary first, then its replicas
    (``NodesManager.slots_cache``), or None when the slot is not in the map. The list itself,
    not a copy: read it, never change it."""
    nodes = nodes_manager.slots_cache.get(slot)
    return nodes if nodes else None


def slot_primary(nodes_manager: Any, slot: int) -> Any:
    """The primary of ``slot`` in redis-py's slot map (what ``get_node_from_slot(slot)``
    returns, without its checks), its free connections made last in first out if redis-py
    discovered it on its own; None when the slot is not in the map (not covered, or no map
    yet). The cluster backend's ``route()`` calls it for every command: :func:`slot_nodes_of`
    and :func:`uses_lifo_pool` in one frame."""
    nodes = nodes_manager.slots_cache.get(slot)
    if not nodes:
        return None
    node = nodes[0]
    if type(node._free) is not LifoConnections:
        use_lifo_pools((node,))
    return node


def connections_in_use(node: Any) -> int:
    """How many of redis-py ClusterNode ``node``'s connections are taken from its pool now
    (``node._connections`` holds every connection it made, ``node._free`` those free)."""
    return len(node._connections) - len(node._free)


# -- free connections, last in first out -----------------------------------------------------


class LifoConnections(collections.deque[Any]):
    """A node's free-connection queue that hands out the most recently released connection.

    redis-py 8.1 answers an ASK redirect with two calls on the target node, ``ASKING`` and then
    the command, each taking a connection from the node's queue. With its first-in-first-out
    queue, under concurrency the command usually leaves on another connection than ASKING, the
    target replies MOVED, and the command bounces between the two nodes until redis-py gives
    up. Last-in-first-out gives the command the connection ASKING was just released on (there
    is no await in between). It also keeps fewer sockets hot.
    """

    def append(self, connection: Any) -> None:
        self.appendleft(connection)


def use_lifo_pools(nodes: Iterable[Any]) -> None:
    """Swap each redis-py ClusterNode's free queue (``node._free``, a deque) for
    :class:`LifoConnections` (once)."""
    for node in nodes:
        free = node._free
        if type(free) is not LifoConnections:
            node._free = LifoConnections(free, maxlen=free.maxlen)


def uses_lifo_pool(node: Any) -> bool:
    return type(node._free) is LifoConnections


# -- which node answered, which redirects were followed --------------------------------------

# What redis-py reports about the call in progress, per asyncio task: the node of its last
# attempt, and the redirects it followed. redis-py runs a command for several nodes (FLUSHALL,
# SCRIPT EXISTS, ...) in tasks of their own, so those reports stay there and the command keeps
# no single node, as it should.
ANSWERED_BY: ContextVar[Any] = ContextVar("resilient_cache_answered_by", default=None)
REDIRECTS: ContextVar[list[Redirect] | None] = ContextVar("resilient_cache_redirects", default=None)


class AnyPrimaryCommandsParser(AsyncCommandsParser):
    """redis-py's ``RedisCluster.initialize()`` reads the slot map from any startup node that
    answers, then ``COMMAND`` from its default node only (``commands_parser.initialize(
    default_node)``), the primary of slot 0. When that one primary refuses the credentials
    (another password on one node) the whole initialize fails, the slot map read and all.
    This parser then asks the other primaries in turn and makes the first that answers the
    default node (where redis-py sends keyless commands)."""

    def __init__(self, cluster: RedisCluster) -> None:
        super().__init__()
        self._cluster = cluster

    async def initialize(self, node: Any = None) -> None:
        try:
            await super().initialize(node)
        except AuthenticationError:
            for other in self._cluster.get_primaries():
                if other is node:
                    continue
                try:
                    await super().initialize(other)
                except AuthenticationError:
                    continue
                self._cluster.set_default_node(other)
                return
            raise


def called_from_an_attempt(frame: Any) -> bool:
    """Whether ``frame`` (the caller of ``aclose()``) is redis-py's per-attempt
    ``RedisCluster._execute_command``: its error path for CLUSTERDOWN and uncovered slots. Read
    only when ``aclose()`` is called, so the command path pays nothing for it."""
    return frame is not None and frame.f_code is _ATTEMPT_CODE


_ATTEMPT_CODE = RedisCluster._execute_command.__code__


# -- redirects to the address the client reaches ------------------------------------------------


def _remapping_connection_class(
    base: type[Any], remap: Callable[[tuple[str, int]], tuple[str, int]]
) -> type[Any]:
    """``base`` (redis-py's ``Connection`` or ``SSLConnection``), rewriting the address of
    every MOVED and ASK reply it reads with ``remap`` before the error goes up to redis-py."""

    async def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await base.read_response(self, *args, **kwargs)
        except AskError as err:  # MOVED too: MovedError subclasses AskError
            err.host, err.port = remap((err.host, int(err.port)))
            err.node_addr = (err.host, err.port)
            raise

    name = f"AddressMapped{base.__name__}"
    return type(name, (base,), {"read_response": read_response, "__qualname__": name})


def remap_redirects(cluster: RedisCluster) -> None:
    """Apply ``cluster``'s ``address_remap`` to MOVED and ASK redirects too.

    redis-py 8.1 remaps the nodes of ``CLUSTER SLOTS`` (``NodesManager.initialize``), but not a
    redirect: ``NodesManager.move_slot`` makes a node of the MOVED address as the server wrote
    it, and the ASK branch of ``RedisCluster._execute_command`` looks its target up by that
    name (and calls ``ASKING`` on ``None`` when no node has it). Both read ``error.host`` and
    ``error.port``; every reply reaches them through ``Connection.read_response``, which raises
    the redirect. So the connection class is swapped for one that rewrites those two on the
    way: in ``cluster.connection_kwargs`` (the very dict the nodes manager makes each new
    ``ClusterNode`` from) and on the startup nodes, made before this could run. No connection
    exists yet. The error's message keeps the address the server sent."""
    remap = cluster.nodes_manager.address_remap
    if remap is None:
        return
    kwargs = cluster.connection_kwargs
    mapped = _remapping_connection_class(kwargs["connection_class"], remap)
    kwargs["connection_class"] = mapped
    for node in cluster.nodes_manager.startup_nodes.values():
        node.connection_class = mapped


class ReportingRedisCluster(RedisCluster):
    """redis-py's ``RedisCluster``, telling the backend which node each attempt went to
    (:data:`ANSWERED_BY`) and which MOVED/ASK redirects it followed (:data:`REDIRECTS`).
    redis-py calls these two private hooks for its own (``redis.observability``) metrics on
    every attempt; their work is unchanged. Its ``commands_parser`` is an
    :class:`AnyPrimaryCommandsParser`, and its ``address_remap``, if any, applies to redirects
    too (:func:`remap_redirects`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = AnyPrimaryCommandsParser(self)
        remap_redirects(self)

    async def aclose(self) -> None:
        """Close every connection of every node, unless redis-py itself asks from inside a
        command's attempt.

        redis-py 8.1 answers a CLUSTERDOWN or "slot not covered" reply from *one* node with
        ``self.aclose()``: every connection of every node is disconnected, those in use by
        other callers included, and their commands fail with connection errors on healthy
        nodes (during a failover with full coverage required, the promoted replica's breaker
        opened that way). From there it only marks the slot map stale, which the backend
        re-reads in the background; the failing node's own reply is already the caller's
        error. Our own close (the backend's ``aclose()``) closes everything as before.
        """
        if called_from_an_attempt(sys._getframe(1)):
            self._initialize = True
            return
        await super().aclose()

    def _record_command_metric(  # type: ignore[no-untyped-def]
        self, command_name, duration_seconds, connection, error=None
    ):
        # Not ``async``: it returns redis-py's coroutine, so no frame is added per attempt.
        ANSWERED_BY.set(connection)
        return super()._record_command_metric(command_name, duration_seconds, connection, error)

    def _record_error_metric(self, error, connection, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(error, AskError):  # MOVED too: MovedError subclasses AskError
            redirect = Redirect(
                "MOVED" if isinstance(error, MovedError) else "ASK",
                connection,
                error.host,
                int(error.port),
                time.time_ns(),
            )
            redirects = REDIRECTS.get()
            if redirects is None:
                REDIRECTS.set([redirect])
            else:
                redirects.append(redirect)
        return super()._record_error_metric(error, connection, *args, **kwargs)


# -- batches: redis-py's annotation of a failed command --------------------------------------


def annotate_batch_errors_with(pipe: Any, annotate: Any) -> None:
    """Have a redis-py pipeline call ``annotate(exception, number, command)`` instead of
    writing the failed command into the error's message: its own ``annotate_exception`` (the
    standalone pipeline) and its cluster execution strategy's ``_annotate_exception``."""
    pipe.annotate_exception = annotate
    strategy = getattr(pipe, "_execution_strategy", None)
    if strategy is not None:
        strategy._annotate_exception = annotate


# -- the wording of redis-py's messages ------------------------------------------------------


def closed_in_use(err: AttributeError) -> bool | None:
    """redis-py 8.1 raises ``AttributeError: 'NoneType' object has no attribute 'writelines'``
    (or ``'read'``...) when another task disconnected the connection a command was using.
    ``None`` if ``err`` is not that; else whether the command may have been sent (not while
    writing)."""
    text = str(err)
    if not text.startswith("'NoneType' object has no attribute"):
        return None
    return "'write" not in text


def redirects_exhausted(err: BaseException) -> bool:
    """redis-py gave up after 16 MOVED/ASK/TRYAGAIN inside one attempt."""
    return isinstance(err, ClusterError) and str(err) == "TTL exhausted."


def slots_not_covered(err: BaseException) -> bool:
    """redis-py's "All slots are not covered" (a plain RedisClusterException)."""
    return type(err) is RedisClusterException and "slots are not covered" in str(err)


def cluster_cannot_be_connected(err: BaseException) -> bool:
    """redis-py's "Redis Cluster cannot be connected" (no node answered a slot-map re-read)."""
    return type(err) is RedisClusterException and "cannot be connected" in str(err)


def failed_while_connecting(err: BaseException) -> bool:
    """A redis-py connection error or timeout raised while connecting (so the command was
    never sent): ``Error 111 connecting to host:port``, ``Timeout connecting to server``."""
    text = str(err)
    return "connecting to" in text or "Timeout connecting" in text


# -- what redis-py 8.1 quotes ---------------------------------------------------------------

#: Beginnings of redis-py 8.1 ``RedisClusterException`` messages that go on to quote the whole
#: command (``HELLO 3 AUTH user password``, say).
QUOTES_COMMAND = (
    "No way to dispatch this command to Redis Cluster",
    "No targets were found to execute",
    "Invalid args in command",
    "Too many targets for command",
)
#: How redis-py 8.1 rewrites the error of a command in a pipeline or transaction: the whole
#: command, arguments and all, before the original message (sometimes as the repr of a tuple).
ANNOTATED = re.compile(r"Command # (\d+) \((.*)\) of pipeline caused error: (.*)\Z", re.DOTALL)
#: Where :func:`note_batch_position` keeps the position of the failed command on the error.
_POSITION = "resilient_cache_position"


def quoted_command_prefix(err: BaseException) -> str | None:
    """The beginning of ``err``'s message that precedes the command it quotes, if it is one of
    the redis-py messages that quote it."""
    if type(err) is not RedisClusterException:
        return None
    text = str(err)
    return next((start for start in QUOTES_COMMAND if text.startswith(start)), None)


def note_batch_position(exception: BaseException, number: int, command: object) -> None:
    """Stands in for redis-py's ``annotate_exception`` on a pipeline: keeps the position of the
    failed command, not the command. (0 is the MULTI itself.)"""
    if number:
        vars(exception)[_POSITION] = number


def unannotated(err: BaseException) -> tuple[int | None, str | None]:
    """The position (from 1) of the failed command of a batch error, and its original message
    when redis-py annotated it anyway (a future redis-py may annotate some other way)."""
    position = vars(err).get(_POSITION)
    text = str(err.args[0]) if err.args else ""
    match = ANNOTATED.match(text)
    if match is None:
        return position, None
    original = match.group(3)
    if original.startswith("(") and original.endswith(",)"):  # the repr of the args tuple
        try:
            original = str(ast.literal_eval(original)[0])
        except (ValueError, SyntaxError, IndexError):
            original = ""
    return position or int(match.group(1)), original


# -- pub/sub (resilient_cache/pubsub.py) -----------------------------------------------------


def node_connection_pool(node: Any) -> Any:
    """The pool a redis-py ``ClusterPubSub`` takes its connection from, for ``node``: its
    private ``_ClusterNodePoolAdapter`` over the node's own connections. redis-py makes one only
    for the node it picks on the first subscribe; a classic subscription moved to another node
    after its node died needs one for that node."""
    return _ClusterNodePoolAdapter(node)


def pubsub_not_connected(err: BaseException) -> bool:
    """redis-py's ``RuntimeError`` for a read on a ``PubSub`` whose connection was closed: in
    ``ClusterPubSub.get_sharded_message`` it comes from a per-node pub/sub that redis-py's own
    resubscription closed (after a failover) while its round robin still held it."""
    return type(err) is RuntimeError and str(err).startswith("pubsub connection not set")
