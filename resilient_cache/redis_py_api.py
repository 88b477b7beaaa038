"""The parts of redis-py's asyncio ``RedisCluster`` API that are not Redis commands.

redis-py's command mixins give :class:`~resilient_cache.client.RedisClusterClient` every command;
these are the rest a service written against ``RedisCluster`` calls: the encoder, the connection
options, the nodes, ``lock()`` and ``pubsub()``. Commands sent by what they return (a ``Lock``'s
``SET NX`` and scripts, a ``Script``'s ``EVALSHA``) go through the pipeline of stages like any
other; a pub/sub's subscriptions do not (see :mod:`resilient_cache.pubsub`). ``publish()`` and
``spublish()`` are redis-py's, with the channel given as the command's key, so that the routing
stage places them on the channel's slot and that node's breaker guards them.

The node queries answer from the cluster backend's slot map. On a single Redis (``REDIS_URL``)
there are no cluster nodes: they raise ``NotImplementedError`` saying so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.lock import Lock
from redis.typing import ChannelT, EncodableT

from resilient_cache.errors import ConfigurationError, NotConnectedError

if TYPE_CHECKING:
    from resilient_cache.pubsub import PubSubs


#: Parts of redis-py's ``RedisCluster`` this client does not offer, each with what to use
#: instead. Calling (or reading) one raises ``NotImplementedError`` with that text;
#: docs/moving-from-redis-py.md lists them with the reasons, and a test checks every public
#: attribute of ``RedisCluster`` is either here or works.
NOT_OFFERED: dict[str, str] = {
    "retry": "retries are the retry stage's: set REDIS_RETRY__MAX_RETRIES, REDIS_RETRY__DELAY, "
    "... (create_redis_cluster(retry={...}))",
    "set_retry": "retries are the retry stage's: set REDIS_RETRY__MAX_RETRIES, "
    "REDIS_RETRY__DELAY, ... (create_redis_cluster(retry={...}))",
    "reinitialize_steps": "the slot map is re-read in the background after a MOVED, a "
    "connection error or a failover; there is nothing to tune",
    "reinitialize_counter": "the slot map is re-read in the background after a MOVED, a "
    "connection error or a failover; there is nothing to tune",
    "on_connect": "redis-py's per-connection hook is the backend's own; connection options "
    "go in REDIS_REDIS_OPTIONS (create_redis_cluster(redis_options={...}))",
    "himport_prepare": "HIMPORT is experimental in redis-py 8.1: use "
    "client.backend.raw.himport_prepare() (it bypasses the stages)",
    "himport_discard": "HIMPORT is experimental in redis-py 8.1: use "
    "client.backend.raw.himport_discard() (it bypasses the stages)",
    "himport_discard_all": "HIMPORT is experimental in redis-py 8.1: use "
    "client.backend.raw.himport_discard_all() (it bypasses the stages)",
}


def _not_offered(name: str) -> Any:
    def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"RedisClusterClient.{name}: {NOT_OFFERED[name]}")

    refuse.__name__ = name
    refuse.__doc__ = f"Not offered: {NOT_OFFERED[name]}."
    return refuse


def _refused_attribute(name: str) -> property:
    return property(_not_offered(name), doc=f"Not offered: {NOT_OFFERED[name]}.")


class RedisPyClusterApi:
    """Mixed into the client; ``_backend`` is its backend (see the client)."""

    # redis-py's target-node names for ``target_nodes=`` and its class-level tables, the same
    # objects, so that code reading them from the client class keeps working.
    ALL_NODES = RedisCluster.ALL_NODES
    DEFAULT_NODE = RedisCluster.DEFAULT_NODE
    PRIMARIES = RedisCluster.PRIMARIES
    RANDOM = RedisCluster.RANDOM
    REPLICAS = RedisCluster.REPLICAS
    NODE_FLAGS = RedisCluster.NODE_FLAGS
    COMMAND_FLAGS = RedisCluster.COMMAND_FLAGS
    SEARCH_COMMANDS = RedisCluster.SEARCH_COMMANDS
    CLUSTER_COMMANDS_RESPONSE_CALLBACKS = RedisCluster.CLUSTER_COMMANDS_RESPONSE_CALLBACKS
    RESULT_CALLBACKS = RedisCluster.RESULT_CALLBACKS
    RedisClusterRequestTTL = RedisCluster.RedisClusterRequestTTL
    #: redis-py's own list; this client's retries are decided by its retry stage.
    ERRORS_ALLOW_RETRY = RedisCluster.ERRORS_ALLOW_RETRY

    retry = _refused_attribute("retry")
    set_retry = _not_offered("set_retry")
    reinitialize_steps = _refused_attribute("reinitialize_steps")
    reinitialize_counter = _refused_attribute("reinitialize_counter")
    on_connect = _not_offered("on_connect")
    himport_prepare = _not_offered("himport_prepare")
    himport_discard = _not_offered("himport_discard")
    himport_discard_all = _not_offered("himport_discard_all")

    _backend: Any
    _closed: bool
    _pubsubs: PubSubs

    if TYPE_CHECKING:

        async def execute_command(self, *args: Any, **options: Any) -> Any: ...

    def get_encoder(self) -> Any:
        """redis-py's encoder of this client (how keys and values become bytes)."""
        raw = self._backend.raw
        return getattr(raw, "encoder", None) or raw.get_encoder()

    def get_connection_kwargs(self) -> dict[str, Any]:
        """The options every connection is made with (a copy: changing it changes nothing)."""
        raw = self._backend.raw
        if hasattr(raw, "get_connection_kwargs"):
            return dict(raw.get_connection_kwargs())
        return dict(raw.connection_pool.connection_kwargs)

    def _cluster(self, what: str) -> Any:
        raw = self._backend.raw
        if not hasattr(raw, "get_nodes"):
            raise NotImplementedError(
                f"{what}: this client talks to a single Redis (REDIS_URL), which has no cluster "
                "nodes; use client.execute_command() and client.get_stats()"
            )
        return raw

    def get_nodes(self) -> list[Any]:
        """Every node of the cluster (redis-py ``ClusterNode`` objects), from the slot map."""
        return list(self._cluster("get_nodes()").get_nodes())

    def get_primaries(self) -> list[Any]:
        """The primaries of the cluster, from the slot map."""
        return list(self._cluster("get_primaries()").get_primaries())

    def get_replicas(self) -> list[Any]:
        """The replicas of the cluster, from the slot map."""
        return list(self._cluster("get_replicas()").get_replicas())

    def get_random_node(self) -> Any:
        """A node picked at random."""
        return self._cluster("get_random_node()").get_random_node()

    def get_default_node(self) -> Any:
        """The node keyless commands go to when nothing else decides."""
        return self._cluster("get_default_node()").get_default_node()

    def set_default_node(self, node: Any) -> None:
        """Make ``node`` (a ``ClusterNode`` of this cluster) the default node."""
        self._cluster("set_default_node()").set_default_node(node)

    def get_node(
        self, host: str | None = None, port: int | None = None, node_name: str | None = None
    ) -> Any:
        """The node at ``host``:``port`` (or named ``"host:port"``), or ``None``."""
        return self._cluster("get_node()").get_node(host=host, port=port, node_name=node_name)

    def get_node_from_key(self, key: Any, replica: bool = False) -> Any:
        """The node serving ``key``'s slot: its primary, or a replica with ``replica=True``."""
        cluster = self._cluster("get_node_from_key()")
        return cluster.get_node_from_key(key, replica=replica)

    def lock(
        self,
        name: Any,
        timeout: float | None = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: float | None = None,
        lock_class: type[Lock] | None = None,
        thread_local: bool = True,
        raise_on_release_error: bool = True,
    ) -> Lock:
        """A redis-py :class:`~redis.asyncio.lock.Lock` on key ``name``, with redis-py's own
        semantics and arguments (see its documentation). Its ``SET NX PX`` and its scripts run
        through this client's stages: a lock call is retried, timed out, traced and counted like
        any command (its writes are not idempotent, so a connection lost mid-call is reported in
        doubt rather than repeated)."""
        return (lock_class or Lock)(
            self,  # type: ignore[arg-type]
            name,
            timeout=timeout,
            sleep=sleep,
            blocking=blocking,
            blocking_timeout=blocking_timeout,
            thread_local=thread_local,
            raise_on_release_error=raise_on_release_error,
        )

    def pubsub(
        self, node: Any = None, host: str | None = None, port: int | None = None, **kwargs: Any
    ) -> PubSub:
        """redis-py's pub/sub object on this client's connections (redis-py's ``ClusterPubSub``,
        or ``PubSub`` on a single Redis), with redis-py's arguments: ``node`` (or ``host`` and
        ``port``) pins the classic subscriptions to a node; ``kwargs`` go to redis-py
        (``ignore_subscribe_messages=``, ``push_handler_func=``). Its reads survive the loss of
        a node (see :mod:`resilient_cache.pubsub`); its subscriptions bypass the stages."""
        if self._closed:
            raise NotConnectedError("pubsub(): this client is disconnected; create a new one")
        return self._pubsubs.open(node, host, port, **kwargs)

    async def publish(self, channel: ChannelT, message: EncodableT, **kwargs: Any) -> int:
        """``PUBLISH``: through the stages, to the primary of ``channel``'s slot (as redis-py
        sends it; a cluster delivers it from there to the subscribers on every node). The
        number of subscribers that received it, counted on the cluster's nodes."""
        kwargs.setdefault("keys", [channel])
        return cast(int, await self.execute_command("PUBLISH", channel, message, **kwargs))

    async def spublish(self, shard_channel: ChannelT, message: EncodableT) -> int:
        """``SPUBLISH``: through the stages, to the primary of ``shard_channel``'s slot."""
        reply = await self.execute_command("SPUBLISH", shard_channel, message, keys=[shard_channel])
        return cast(int, reply)

    # -- redis-py's own objects, read from the backend (they bypass the stages) --------------

    @property
    def connection_kwargs(self) -> dict[str, Any]:
        """The options every connection is made with (see :meth:`get_connection_kwargs`)."""
        return self.get_connection_kwargs()

    @property
    def nodes_manager(self) -> Any:
        """redis-py's ``NodesManager`` (the slot map) of the cluster backend."""
        return self._cluster("nodes_manager").nodes_manager

    @property
    def commands_parser(self) -> Any:
        """redis-py's command parser (``COMMAND`` as the cluster reported it)."""
        return self._cluster("commands_parser").commands_parser

    @property
    def command_flags(self) -> dict[str, Any]:
        """redis-py's table of where keyless commands go (``target_nodes`` defaults)."""
        return cast(dict[str, Any], self._cluster("command_flags").command_flags)

    @property
    def node_flags(self) -> Any:
        return self._cluster("node_flags").node_flags

    @property
    def response_callbacks(self) -> Any:
        """redis-py's reply parsers of the backend's client (change with care: every command
        of this client goes through them)."""
        return self._backend.raw.response_callbacks

    @property
    def result_callbacks(self) -> Any:
        return self._cluster("result_callbacks").result_callbacks

    def set_response_callback(self, command: str, callback: Any) -> None:
        """Parse the replies of ``command`` with ``callback`` (redis-py's
        ``set_response_callback``, on the backend's client)."""
        self._backend.raw.set_response_callback(command, callback)

    @property
    def maint_notifications_config(self) -> Any:
        return getattr(self._backend.raw, "maint_notifications_config", None)

    @property
    def himport_registry(self) -> Any:
        return self._cluster("himport_registry").himport_registry

    async def get_nodes_from_slot(self, command: str, *args: Any) -> list[Any]:
        """The nodes redis-py would send ``command`` with ``args`` to."""
        return cast(
            list[Any],
            await self._cluster("get_nodes_from_slot").get_nodes_from_slot(command, *args),
        )

    def get_special_nodes(self) -> Any:
        return self._cluster("get_special_nodes()").get_special_nodes()

    def get_random_primary_node(self) -> Any:
        """A primary picked at random."""
        return self._cluster("get_random_primary_node()").get_random_primary_node()

    def get_random_primary_or_all_nodes(self, command_name: str) -> Any:
        return self._cluster("get_random_primary_or_all_nodes()").get_random_primary_or_all_nodes(
            command_name
        )

    def replace_default_node(self, target_node: Any = None) -> None:
        """Make another primary (or ``target_node``) the node keyless commands go to."""
        self._cluster("replace_default_node()").replace_default_node(target_node)

    def keyspace_notifications(
        self, key_prefix: Any = None, ignore_subscribe_messages: bool = True
    ) -> Any:
        """redis-py's keyspace notifications across every primary (subscriptions: they bypass
        the stages, like :meth:`pubsub`'s, and do not follow a failover by themselves)."""
        return self._cluster("keyspace_notifications()").keyspace_notifications(
            key_prefix=key_prefix, ignore_subscribe_messages=ignore_subscribe_messages
        )

    async def transaction(self, func: Any, *watches: Any, **kwargs: Any) -> Any:
        """redis-py's ``transaction(func, *watches)``: ``WATCH`` the keys, call ``func(pipe)``,
        ``EXEC``, again on a ``WatchError``. It runs on redis-py's own pipeline of the backend:
        ``WATCH`` needs one connection held across the caller's awaits, which a command through
        the stages never holds, so these commands bypass the stages (no retry, breaker or
        telemetry). For a transaction without ``WATCH``, ``client.pipeline(transaction=True)``
        goes through them."""
        if self._closed:
            raise NotConnectedError("transaction(): this client is disconnected")
        return await self._backend.raw.transaction(func, *watches, **kwargs)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Any:
        """redis-py's ``RedisCluster.from_url``: a client whose seed node is the URL's
        ``host:port`` (``redis://[[user]:password@]host[:port]``, ``rediss://`` for TLS). The
        URL's user, password and TLS become settings; ``options`` are
        :func:`~resilient_cache.create_redis_cluster`'s keyword arguments and win over them."""
        from redis.asyncio.connection import SSLConnection, parse_url

        try:
            parsed = parse_url(url)
        except ValueError as err:
            # Not redis-py's text: some of its messages quote the URL, password and all.
            raise ConfigurationError(
                f"from_url(): not a Redis URL ({type(err).__name__}); expected "
                "redis://[[user]:password@]host[:port] or rediss://..."
            ) from None
        if parsed.get("db", 0) not in (0, "0"):
            raise ConfigurationError(
                "from_url(): a Redis Cluster has only database 0; remove the /db from the URL"
            )
        settings: dict[str, Any] = {}
        for name in ("username", "password"):
            if parsed.get(name):
                settings[name] = parsed[name]
        if parsed.get("connection_class") is SSLConnection:
            settings["ssl"] = True
        client_class: Any = cls  # the client, whose constructor takes the nodes and options
        return client_class(
            f"{parsed['host']}:{parsed.get('port', 6379)}", **{**settings, **options}
        )

    def close(self) -> Any:
        """Deprecated in redis-py since 5.0: ``await client.aclose()``."""
        return self.aclose()  # type: ignore[attr-defined]

    async def initialize(self) -> Any:
        """redis-py's name for :meth:`connect`."""
        return await self.connect()  # type: ignore[attr-defined]
