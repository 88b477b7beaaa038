"""The redis-py backends: asyncio ``RedisCluster`` and standalone ``Redis``.

Both are configured so that redis-py does not retry by itself (``Retry(NoBackoff(), 0)``): the
retry stage decides, counts and shows every retry, and a hidden second layer would multiply them.
redis-py still follows MOVED and ASK redirects inside one attempt, which is what we want: a
redirect is not a failure. The cluster backend learns from redis-py's per-attempt metric hooks
which node answered and which redirects it followed, and writes both on the Command
(``command.node``, ``command.redirects``) for the stages to report.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NoReturn, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode as RedisPyClusterNode
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import LoadBalancingStrategy
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.batch import BATCH_NAMES, TRANSACTION
from resilient_cache.errors import (
    ClusterUnreachableError,
    ConfigurationError,
    ConnectionClosedError,
    SlotNotServedError,
)
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, NodeRef, Redirect

if TYPE_CHECKING:
    from resilient_cache.plugins import BackendRegistry, BuildContext
    from resilient_cache.settings import Settings


logger = logging.getLogger("resilient_cache.backends")

#: Shortest time between two slot-map refreshes asked for by stages (seconds).
REFRESH_INTERVAL = 0.25


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _replica_reads(settings: Settings) -> bool:
    routing = getattr(settings, "routing", None)
    return bool(getattr(routing, "read_from_replicas", False)) and "routing" in settings.stages


def connection_options(settings: Settings) -> dict[str, Any]:
    """redis-py keyword options shared by both backends, from the core settings."""
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_connect_timeout,
        "max_connections": settings.max_connections,
        "decode_responses": settings.decode_responses,
    }
    if settings.client_name:
        options["client_name"] = settings.client_name
    if settings.username:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.ssl:
        options.update(
            ssl=True,
            ssl_ca_certs=settings.ssl_ca_certs,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
            ssl_cert_reqs=settings.ssl_cert_reqs,
            ssl_check_hostname=settings.ssl_check_hostname,
        )
    options.update(settings.redis_options)
    return options


def connection_closed_in_use(command: Command, err: AttributeError) -> Exception:
    """redis-py 8.1 raises ``AttributeError: 'NoneType' object has no attribute 'writelines'``
    (or ``'read'``...) when another task disconnected the connection this command was using.
    That is a broken connection, not a bug in the caller: report it as one. Any other
    AttributeError is left as it is."""
    text = str(err)
    if not text.startswith("'NoneType' object has no attribute"):
        return err
    unsent = "'write" in text  # failed while writing: the command never left
    return ConnectionClosedError(command.name, may_have_run=not unsent)


async def run_batch(client: RedisCluster | Redis, command: Command) -> Any:
    """Send a PIPELINE / MULTI command (see :mod:`resilient_cache.batch`) with redis-py's own
    pipeline, which groups the commands per node."""
    pipe = client.pipeline(transaction=command.name == TRANSACTION)
    for args, options in command.args:
        pipe.execute_command(*args, **options)
    try:
        return await pipe.execute(raise_on_error=command.options["raise_on_error"])
    except REDIS_PY_QUIRKS as err:
        reraise_translated(command, err)


#: What redis-py 8.1 raises that is not what it means (see translate_redis_py_error).
REDIS_PY_QUIRKS = (AttributeError, ClusterError, RedisClusterException, KeyError)


#: Beginnings of redis-py 8.1 messages that go on to quote the command's arguments (keys,
#: values, an AUTH password): such an error is replaced, and not chained to ours.
_QUOTES_ARGUMENTS = (
    "No way to dispatch this command to Redis Cluster",
    "No targets were found to execute",
    "Invalid args in command",
    "Too many targets for command",
)


def _quoted_arguments(err: Exception) -> str | None:
    """The beginning of ``err``'s message that precedes quoted arguments, if it quotes any."""
    if type(err) is not RedisClusterException:
        return None
    text = str(err)
    return next((start for start in _QUOTES_ARGUMENTS if text.startswith(start)), None)


def reraise_translated(command: Command, err: Exception) -> NoReturn:
    """Raise what :func:`translate_redis_py_error` makes of ``err`` (``err`` itself if nothing)."""
    translated = translate_redis_py_error(command, err)
    if translated is err:
        raise err
    if _quoted_arguments(err) is not None:
        raise translated from None  # a traceback would print the original message
    raise translated from err


def translate_redis_py_error(command: Command, err: Exception) -> Exception:
    """Give redis-py's failures a type the stages (and ``except RedisError``) understand;
    anything else is returned as it is.

    - ``AttributeError: 'NoneType' object has no attribute 'writelines'``: another task closed
      the connection in use (see connection_closed_in_use).
    - ``ClusterError("TTL exhausted.")``: redis-py gave up after 16 redirects or TRYAGAIN
      replies inside one attempt (a slot migration in progress). Not executed: TryAgainError.
    - ``SlotNotCoveredError`` / "All slots are not covered" / ``KeyError(slot)``: not a
      RedisError at all in redis-py 8.1, and it names no command. SlotNotServedError (a
      ClusterDownError).
    - "Redis Cluster cannot be connected": no node answered while redis-py re-read the slot
      map inside the command, so it was never sent. ClusterUnreachableError (a
      ConnectionError).
    - A message that quotes the command's arguments (a command redis-py cannot place, such as
      a keyless one it has no rule for): the same RedisClusterException with the command name
      and without the arguments, which may hold keys, values or a password.
    """
    if isinstance(err, AttributeError):
        return connection_closed_in_use(command, err)
    quoted = _quoted_arguments(err)
    if quoted is not None:
        return RedisClusterException(f"{command.name}: {quoted} (arguments not shown)")
    text = str(err)
    if isinstance(err, ClusterError) and text == "TTL exhausted.":
        return TryAgainError(f"{command.name}: still redirected after 16 tries (resharding?)")
    if isinstance(err, SlotNotCoveredError) or (
        type(err) is RedisClusterException and "slots are not covered" in text
    ):
        return SlotNotServedError(command.name, text)
    if type(err) is RedisClusterException and "cannot be connected" in text:
        return ClusterUnreachableError(command.name, text)
    if isinstance(err, KeyError) and err.args and isinstance(err.args[0], int):
        # redis-py looks an uncovered slot up in its slot map without a guard (possible since
        # require_full_coverage=False lets it load a map with holes).
        return SlotNotServedError(command.name, f"slot {err.args[0]} is not served by any node")
    return err


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
    """Swap each redis-py ClusterNode's free queue for :class:`LifoConnections` (once)."""
    for node in nodes:
        free = node._free
        if type(free) is not LifoConnections:
            node._free = LifoConnections(free, maxlen=free.maxlen)


# What redis-py reports about the call in progress, per asyncio task: the node of its last
# attempt, and the redirects it followed. redis-py runs a command for several nodes (FLUSHALL,
# SCRIPT EXISTS, ...) in tasks of their own, so those reports stay there and the command keeps
# no single node, as it should.
_ANSWERED_BY: ContextVar[Any] = ContextVar("resilient_cache_answered_by", default=None)
_REDIRECTS: ContextVar[list[Redirect] | None] = ContextVar(
    "resilient_cache_redirects", default=None
)


class ReportingRedisCluster(RedisCluster):
    """redis-py's ``RedisCluster``, telling the backend which node each attempt went to and
    which MOVED/ASK redirects it followed. redis-py calls these two hooks for its own
    (``redis.observability``) metrics on every attempt; their work is unchanged."""

    def _record_command_metric(  # type: ignore[no-untyped-def]
        self, command_name, duration_seconds, connection, error=None
    ):
        # Not ``async``: it returns redis-py's coroutine, so no frame is added per attempt.
        _ANSWERED_BY.set(connection)
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
            redirects = _REDIRECTS.get()
            if redirects is None:
                _REDIRECTS.set([redirect])
            else:
                redirects.append(redirect)
        return super()._record_error_metric(error, connection, *args, **kwargs)


class RedisPyClusterBackend:
    """Redis Cluster through ``redis.asyncio.RedisCluster``."""

    name = "cluster"

    def __init__(self, settings: Settings) -> None:
        if not settings.cluster_nodes:
            raise ConfigurationError(
                "REDIS_CLUSTER_NODES: no cluster node is configured; set "
                "REDIS_CLUSTER_NODES=host:port,host:port (or REDIS_NODE_1_HOST/PORT, ...), "
                "or REDIS_URL for a single Redis"
            )
        self._seeds = [str(n) for n in settings.cluster_nodes]
        try:
            self._cluster = ReportingRedisCluster(
                startup_nodes=[RedisPyClusterNode(n.host, n.port) for n in settings.cluster_nodes],
                retry=_no_retry(),
                # With a strategy set, redis-py sends READONLY on replica connections (without
                # it replicas answer MOVED); routing still picks the node per attempt.
                # No client-wide reinitialisation every 5th MOVED: under a migration it closes
                # every connection in use on every node. MOVED patches the slot map, and the
                # routing stage refreshes it in the background when redis-py flags it stale.
                reinitialize_steps=0,
                # Let the servers decide whether a partial cluster serves: with True, one
                # missing slot makes redis-py refuse to load the slot map at all.
                require_full_coverage=False,
                load_balancing_strategy=(
                    LoadBalancingStrategy.ROUND_ROBIN if _replica_reads(settings) else None
                ),
                **connection_options(settings),
            )
        except TypeError as err:
            raise ConfigurationError(f"REDIS_REDIS_OPTIONS / redis_options: {err}") from None
        encoder = self._cluster.encoder
        self._encode = encoder.encode
        self._encoding, self._encoding_errors = encoder.encoding, encoder.encoding_errors
        self._nodes_manager = self._cluster.nodes_manager
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0

    async def connect(self) -> None:
        try:
            await self._cluster.initialize()
            use_lifo_pools(self._cluster.get_nodes())
        except (RedisConnectionError, RedisClusterException) as err:
            raise RedisConnectionError(
                f"Unable to connect to cluster: none of {', '.join(self._seeds)} answered "
                f"({type(err).__name__}: {err})"
            ) from err

    async def aclose(self) -> None:
        task, self._refresh_task = self._refresh_task, None
        await cancel_and_wait(task)
        await self._cluster.aclose()

    async def execute(self, command: Command) -> Any:
        if command.name in BATCH_NAMES:
            return await run_batch(self._cluster, command)
        _ANSWERED_BY.set(None)
        try:
            if command.node is not None:
                return await self._cluster.execute_command(
                    command.name, *command.args, target_nodes=command.node, **command.options
                )
            return await self._cluster.execute_command(
                command.name, *command.args, **command.options
            )
        except REDIS_PY_QUIRKS as err:
            reraise_translated(command, err)
        finally:
            answered = _ANSWERED_BY.get()
            if answered is not None and answered is not command.node:
                command.node = answered  # redirected, or a keyless command redis-py routed
            redirects = _REDIRECTS.get()
            if redirects is not None:
                _REDIRECTS.set(None)
                command.redirects = (command.redirects or []) + redirects

    def route(self, command: Command, replica: bool = False) -> NodeRef | None:
        keys = command.keys
        if not keys or "target_nodes" in command.options:
            return None
        slot = self._slot(keys[0])
        for key in keys[1:]:
            if self._slot(key) != slot:
                return None  # let redis-py report the cross-slot error in its own words
        try:
            node = self._nodes_manager.get_node_from_slot(slot, replica and command.read_only)
        except (SlotNotCoveredError, KeyError):
            # KeyError: redis-py has no slot map yet (a command before the first connect);
            # redis-py's own execute_command initialises and routes that one.
            return None
        if type(node._free) is not LifoConnections:  # a node redis-py discovered on its own
            use_lifo_pools((node,))
        return cast(NodeRef, node)

    def _slot(self, key: Any) -> int:
        # A str key, the common case, is encoded here as redis-py's encoder would; anything
        # else goes through that encoder.
        if type(key) is str:
            return key_slot(key.encode(self._encoding, self._encoding_errors))
        return key_slot(self._encode(key))

    @property
    def topology_stale(self) -> bool:
        # redis-py raises this flag after a connection error.
        return bool(self._cluster._initialize)

    def request_refresh(self) -> None:
        # Re-read the slot map in the background: a caller never waits for it (with the whole
        # cluster hung it would wait out its deadline instead of being refused fast by the
        # breaker). One refresh at a time, at most one per REFRESH_INTERVAL however many
        # callers ask, so there is no CLUSTER SLOTS herd.
        task = self._refresh_task
        if task is not None and not task.done():
            return
        now = time.monotonic()
        if now - self._refreshed_at < REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        self._refresh_task = asyncio.get_running_loop().create_task(
            self._refresh_quietly(), name="resilient_cache.refresh"
        )

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_topology()
        except Exception as err:  # the next request tries again; callers see their own errors
            logger.debug("slot map refresh failed: %s: %s", type(err).__name__, err)

    async def refresh_topology(self) -> None:
        if self._cluster._initialize:
            await self._cluster.initialize()  # under redis-py's lock; clears the stale flag
        else:
            await self._nodes_manager.initialize()
        use_lifo_pools(self._cluster.get_nodes())

    def known_nodes(self) -> list[tuple[str, int]]:
        seen = {(n.host, int(n.port)) for n in self._cluster.get_nodes()}
        for seed in self._cluster.startup_nodes:
            seen.add((seed.host, int(seed.port)))
        return sorted(seen)

    async def execute_on(self, address: tuple[str, int], *args: Any) -> Any:
        node = self._cluster.get_node(host=address[0], port=address[1])
        if node is None:
            node = RedisPyClusterNode(address[0], address[1], **self._cluster.connection_kwargs)
            try:
                return await node.execute_command(*args)
            finally:
                await node.disconnect()
        return await node.execute_command(*args)

    @property
    def raw(self) -> RedisCluster:
        return self._cluster


class RedisPyStandaloneBackend:
    """A single Redis (no cluster) through ``redis.asyncio.Redis``: REDIS_URL, or one node."""

    name = "standalone"

    def __init__(self, settings: Settings) -> None:
        options = connection_options(settings)
        if settings.url is not None:
            url = settings.url.get_secret_value()
            try:
                self._redis = Redis.from_url(url, retry=_no_retry(), **options)
            except ValueError:
                # redis-py's message may quote the URL, which can hold a password: drop it.
                raise ConfigurationError(
                    "REDIS_URL: not a valid redis://, rediss:// or unix:// URL"
                ) from None
        elif settings.cluster_nodes:
            node = settings.cluster_nodes[0]
            self._redis = Redis(host=node.host, port=node.port, retry=_no_retry(), **options)
        else:
            raise ConfigurationError("REDIS_URL: no Redis is configured for the standalone backend")
        kwargs = self._redis.connection_pool.connection_kwargs
        self._address = (str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)))

    async def connect(self) -> None:
        try:
            await self._redis.ping()
        except RedisConnectionError as err:
            raise RedisConnectionError(
                f"Unable to connect to Redis at {self._address[0]}:{self._address[1]} "
                f"({type(err).__name__}: {err})"
            ) from err

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def execute(self, command: Command) -> Any:
        if command.name in BATCH_NAMES:
            return await run_batch(self._redis, command)
        try:
            return await self._redis.execute_command(command.name, *command.args, **command.options)
        except REDIS_PY_QUIRKS as err:
            reraise_translated(command, err)

    def route(self, command: Command, replica: bool = False) -> NodeRef | None:
        return None

    @property
    def topology_stale(self) -> bool:
        return False

    def request_refresh(self) -> None:
        return None

    async def refresh_topology(self) -> None:
        return None

    def known_nodes(self) -> list[tuple[str, int]]:
        return [self._address]

    async def execute_on(self, address: tuple[str, int], *args: Any) -> Any:
        return await self._redis.execute_command(*args)

    @property
    def raw(self) -> Redis:
        return self._redis


def _cluster_factory(settings: Settings, context: BuildContext | None) -> RedisPyClusterBackend:
    return RedisPyClusterBackend(settings)


def _standalone_factory(
    settings: Settings, context: BuildContext | None
) -> RedisPyStandaloneBackend:
    return RedisPyStandaloneBackend(settings)


@hookimpl
def resilient_cache_register_backends(registry: BackendRegistry) -> None:
    registry.add("cluster", _cluster_factory)
    registry.add("standalone", _standalone_factory)
