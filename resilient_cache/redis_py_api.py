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
from redis.asyncio.lock import Lock
from redis.typing import ChannelT, EncodableT

from resilient_cache.errors import NotConnectedError

if TYPE_CHECKING:
    from resilient_cache.pubsub import PubSubs


class RedisPyClusterApi:
    """Mixed into the client; ``_backend`` is its backend (see the client)."""

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
