"""Pub/sub for ``RedisClusterClient``: redis-py's own pub/sub objects, made to outlive a node.

``client.pubsub()`` returns redis-py 8.1's asyncio ``ClusterPubSub`` (``PubSub`` on a single
Redis) bound to the backend's redis-py client, so the whole redis-py API is there: ``subscribe``,
``psubscribe``, ``ssubscribe``, ``get_message``, ``get_sharded_message``, ``listen``, ``run``,
``aclose``, ``async with``. A subscription is a long-lived connection that receives, not a
command that is answered: it does not pass through the stages (a deadline, a retry or a breaker
has no meaning for it). ``PUBLISH`` and ``SPUBLISH`` are commands and do (``redis_py_api.py``).

What these subclasses add is what happens when a subscription's connection is lost (see
docs/failover.md, "Pub/sub"). redis-py raises the ``ConnectionError`` from the read and, on the
next read, reconnects to the same node only: a classic subscription whose node died never comes
back, and a sharded one follows its slot to the promoted replica only when something re-reads
the slot map (the same client's failing commands; a process that only subscribes never does).
Here a read that meets a lost connection recovers instead, with backoff, within the caller's
timeout: a classic subscription moves to any node that answers (a cluster delivers classic
messages on every node), a sharded one has the slot map re-read and redis-py move it to its
slot's current primary. The error reaches the caller once the subscription has been down for
``give_up_after`` seconds. Pub/sub stays at most once: what is published while no connection
is subscribed is lost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import ChannelT, PubSubHandler, Subscription

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.backends._redis_py_compat import (
    event_dispatcher,
    node_connection_pool,
    pubsub_not_connected,
)
from resilient_cache.errors import NotConnectedError, ResilientCacheError

__all__ = ["PubSubs", "ResilientClusterPubSub", "ResilientPubSub"]

logger = logging.getLogger("resilient_cache.pubsub")

T = TypeVar("T")

#: A read raises these when its connection is gone (redis-py has tried to reconnect once).
_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
#: A recovery attempt may meet these while the cluster fails over: try again later.
_TRANSIENT = (RedisError, RedisClusterException, OSError)


class PubSubs:
    """The pub/sub objects of one client: made by ``client.pubsub()``, closed with the client.
    Also the one slot-map re-read their recoveries share."""

    #: Shortest time between two slot-map re-reads asked for by recovering subscriptions, so
    #: that a hundred of them recovering at once cost one ``CLUSTER SLOTS``, not a hundred.
    REFRESH_INTERVAL = 0.25

    def __init__(
        self,
        backend: Any,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._backend = backend
        self.clock = clock
        self.sleep = sleep
        self.closed = False
        self._open: weakref.WeakSet[PubSub] = weakref.WeakSet()
        self._refresh_task: asyncio.Task[Any] | None = None
        self._refreshed_at = -math.inf

    def open(self, node: Any, host: str | None, port: int | None, **kwargs: Any) -> PubSub:
        raw = self._backend.raw
        pubsub: PubSub
        if isinstance(raw, RedisCluster):
            pubsub = ResilientClusterPubSub(self, raw, node=node, host=host, port=port, **kwargs)
        elif isinstance(raw, Redis):
            if node is not None or host is not None or port is not None:
                raise NotImplementedError(
                    "pubsub(node=, host=, port=): this client talks to a single Redis (REDIS_URL), "
                    "which has no nodes to choose from"
                )
            kwargs.setdefault("event_dispatcher", event_dispatcher(raw))
            pubsub = ResilientPubSub(self, raw.connection_pool, **kwargs)
        else:
            raise NotImplementedError(
                f"pubsub(): this client's backend ({type(raw).__name__}) has no pub/sub"
            )
        self._open.add(pubsub)
        return pubsub

    async def refresh(self, force: bool = False) -> None:
        """Re-read the slot map (the backend's ``refresh_topology()``), shared: a caller that
        comes while one runs waits for that one; within ``REFRESH_INTERVAL`` of the last, none
        is started unless ``force``."""
        task = self._refresh_task
        if task is None or task.done():
            if not force and self.clock() - self._refreshed_at < self.REFRESH_INTERVAL:
                return
            self._refreshed_at = self.clock()
            refresh = self._backend.refresh_topology()
            task = self._refresh_task = asyncio.get_running_loop().create_task(refresh)
            # Retrieved even when every waiter was cancelled: no "never retrieved" warning.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        # A waiter cancelled (its read's task) must not cancel the re-read the others wait for.
        await asyncio.shield(task)

    async def aclose(self) -> None:
        """Close every pub/sub made here; from now on their reads raise NotConnectedError."""
        self.closed = True
        for pubsub in list(self._open):
            try:
                await pubsub.aclose()
            except Exception as err:  # the client is closing anyway
                logger.debug("pub/sub not closed cleanly: %s", type(err).__name__)
        task, self._refresh_task = self._refresh_task, None
        await cancel_and_wait(task)


class _Outage:
    """A subscription connection lost and not back yet: since when, when to try again."""

    __slots__ = ("attempts", "delay", "error", "next_at", "started")

    def __init__(self, error: BaseException, now: float, delay: float) -> None:
        self.started = now
        self.next_at = now  # the first attempt at once
        self.delay = delay
        self.attempts = 0
        self.error = error


class _Recovering:
    """Reads that recover a lost subscription connection: what both classes below share."""

    #: First wait between two recovery attempts (seconds), doubled after each failed one.
    backoff_base: float = 0.05
    #: Longest wait between two recovery attempts (seconds): once the cluster has promoted a
    #: replica, a subscription is back within about this much (plus one slot-map read).
    backoff_cap: float = 0.25
    #: A read raises the last error once its subscription has been down this long (seconds);
    #: later reads keep trying, and raise at once while it stays down. A failover takes about
    #: cluster-node-timeout plus the election (15 s with Redis's default node timeout).
    give_up_after: float = 30.0

    _pubsubs: PubSubs
    _outages: dict[str, _Outage]

    async def get_message(
        self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0
    ) -> Any:
        read = super().get_message  # type: ignore[misc]  # redis-py's, next in the MRO
        return await self._read(
            "classic",
            lambda remaining: read(ignore_subscribe_messages, remaining),
            self._recover_classic,
            timeout,
            _connection_lost,
        )

    def listen(self) -> AsyncIterator[Any]:
        return _listen(self)  # type: ignore[arg-type]  # mixed into a PubSub

    async def _recover_classic(self) -> None:
        """Get the classic subscriptions back on a live connection (each class its own way)."""
        raise NotImplementedError

    def _check_open(self, err: BaseException | None) -> None:
        if self._pubsubs.closed:
            raise NotConnectedError("pub/sub: this client is disconnected") from err

    async def _read(
        self,
        part: str,
        read: Callable[[float | None], Awaitable[T]],
        recover: Callable[[], Awaitable[None]],
        timeout: float | None,
        lost: Callable[[BaseException], bool],
    ) -> T | None:
        """``read(remaining)``; when ``lost(error)``, ``recover()`` with backoff and read again,
        all within ``timeout`` (``None``: without end). ``part`` names the connections read
        (classic, sharded), each with an outage of its own."""
        self._check_open(None)  # its connections are closed: say why, not "not set"
        clock = self._pubsubs.clock
        deadline = None if timeout is None else clock() + timeout
        while True:
            outage = self._outages.get(part)
            if outage is not None:
                wait = outage.next_at - clock()
                if wait > 0:
                    if deadline is not None and clock() + wait > deadline:
                        await self._pubsubs.sleep(max(0.0, deadline - clock()))
                        return None  # as a read that found no message
                    await self._pubsubs.sleep(wait)
                self._check_open(outage.error)
                if not await self._attempt(part, outage, recover):
                    continue
            remaining = None if deadline is None else max(0.0, deadline - clock())
            try:
                return await read(remaining)
            except Exception as err:
                if isinstance(err, ResilientCacheError) or not lost(err):
                    raise
                self._check_open(err)
                self._outages[part] = _Outage(err, clock(), self.backoff_base)
                logger.warning(
                    "pub/sub: %s subscription connection lost (%s: %s); resubscribing",
                    part,
                    type(err).__name__,
                    err,
                )

    async def _attempt(
        self, part: str, outage: _Outage, recover: Callable[[], Awaitable[None]]
    ) -> bool:
        clock = self._pubsubs.clock
        outage.attempts += 1
        try:
            await recover()
        except _TRANSIENT as err:
            if isinstance(err, ResilientCacheError):
                raise
            now = clock()
            outage.error = err
            wait, outage.delay = outage.delay, min(self.backoff_cap, outage.delay * 2)
            outage.next_at = now + wait * (0.5 + random.random() / 2)  # jittered: no herd
            down = now - outage.started
            if isinstance(err, AuthenticationError) or down >= self.give_up_after:
                if hasattr(err, "add_note"):
                    err.add_note(
                        f"resilient_cache: {part} pub/sub down for {down:.1f}s, "
                        f"{outage.attempts} attempts to resubscribe"
                    )
                raise
            logger.debug("pub/sub: %s attempt %d failed: %s", part, outage.attempts, err)
            return False
        del self._outages[part]
        logger.info(
            "pub/sub: %s subscriptions back after %.2fs (%d attempts)",
            part,
            clock() - outage.started,
            outage.attempts,
        )
        return True


def _connection_lost(err: BaseException) -> bool:
    return isinstance(err, _LOST)


def _replay(subscribed: Mapping[Any, PubSubHandler | None]) -> list[ChannelT | Subscription]:
    """Subscriptions to send again, each with its handler (names may be bytes: no kwargs)."""
    return [Subscription(name, handler) for name, handler in subscribed.items()]


async def _listen(pubsub: PubSub) -> AsyncIterator[Any]:
    # redis-py's listen() reads the connection itself; this one reads through get_message(),
    # which recovers. Same messages, same end (when nothing is subscribed any more).
    while pubsub.subscribed:
        message = await pubsub.get_message(timeout=None)
        if message is not None:
            yield message


class ResilientClusterPubSub(_Recovering, ClusterPubSub):
    """redis-py's ``ClusterPubSub`` whose reads recover a lost connection (see the module).

    Classic channels and patterns share one connection, on the node redis-py picked (the first
    channel's slot's) or the one passed as ``node``/``host``+``port``: after a loss it moves to
    any node that answers, or back to the node passed (it was asked for). Shard channels live
    on one connection per node owning their slots.
    """

    def __init__(
        self,
        pubsubs: PubSubs,
        redis_cluster: RedisCluster,
        node: Any = None,
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(redis_cluster, node=node, host=host, port=port, **kwargs)
        self._pubsubs = pubsubs
        self._outages = {}
        self._pinned = self.node is not None

    async def get_sharded_message(
        self, ignore_subscribe_messages: bool = False, timeout: float = 0.0, target_node: Any = None
    ) -> Any:
        read = super().get_sharded_message

        def lost(err: BaseException) -> bool:
            return _connection_lost(err) or pubsub_not_connected(err)

        return await self._read(
            "sharded",
            lambda remaining: read(ignore_subscribe_messages, remaining, target_node),  # type: ignore[arg-type]
            self._recover_sharded,
            timeout,
            lost,
        )

    async def subscribe(self, *args: ChannelT | Subscription, **kwargs: PubSubHandler) -> None:
        await self._have_slot_map()
        await super().subscribe(*args, **kwargs)

    async def psubscribe(self, *args: ChannelT | Subscription, **kwargs: PubSubHandler) -> None:
        await self._have_slot_map()
        await super().psubscribe(*args, **kwargs)

    async def ssubscribe(self, *args: ChannelT | Subscription, **kwargs: PubSubHandler) -> None:
        await self._have_slot_map()
        await super().ssubscribe(*args, **kwargs)

    async def _have_slot_map(self) -> None:
        # redis-py picks the node from the slot map, and fails with a KeyError on a client that
        # has not read one yet (no connect(), no command): read it first.
        if not self.cluster.get_nodes():
            await self._pubsubs.refresh(force=True)

    async def on_connect(self, connection: Any) -> None:
        """Subscribe again, on a connection that (re)connected, to the classic channels and
        patterns. redis-py's also replays the shard channels from here, through the per-node
        connections, which replay them themselves when they reconnect: one node down would
        then fail this connection's recovery too."""
        self.pending_unsubscribe_channels.clear()
        self.pending_unsubscribe_patterns.clear()
        if self.channels:
            await self.subscribe(*_replay(self.channels))
        if self.patterns:
            await self.psubscribe(*_replay(self.patterns))

    async def _recover_classic(self) -> None:
        connection = self.connection
        if connection is not None and connection.is_connected:
            return  # redis-py reconnected (and resubscribed) inside the read that failed
        if not (self.channels or self.patterns) or self.node is None:
            return  # nothing to subscribe again
        current = self.node
        others = [node for node in self.cluster.get_nodes() if node.name != current.name]
        random.shuffle(others)  # many subscribers of a dead node do not all land on one
        failure: Exception | None = None
        for node in [current] if self._pinned else [current, *others]:
            try:
                await self._subscribe_on(node)
            except _LOST as err:
                failure = err
                continue
            if node is not current:
                logger.info(
                    "pub/sub: classic subscriptions moved %s -> %s", current.name, node.name
                )
            return
        await self._pubsubs.refresh()  # every node known failed: the map may be out of date
        raise failure or RedisConnectionError("pub/sub: no node to subscribe on")

    async def _subscribe_on(self, node: Any) -> None:
        """Drop the classic connection, take one to ``node`` and subscribe there again."""
        old = self.connection
        if old is not None:
            self.connection = None
            old.deregister_connect_callback(self.on_connect)
            await old.disconnect(nowait=True)
            await self.connection_pool.release(old)
        self.node = node
        self.connection_pool = node_connection_pool(node)
        await self.connect()  # a new connection calls no callback: subscribe explicitly
        await self.on_connect(self.connection)

    async def _recover_sharded(self) -> None:
        # After a failover the map names the promoted replica; redis-py then moves each shard
        # channel (SSUBSCRIBE there, the dead node's per-node pub/sub dropped).
        await self._pubsubs.refresh()
        await self.reinitialize_shard_subscriptions()
        for pubsub in list(self.node_pubsub_mapping.values()):
            connection = pubsub.connection
            if connection is None:
                await pubsub.connect()  # a new connection calls no callback
                if pubsub.subscribed and pubsub.connection is not None:
                    await pubsub.on_connect(pubsub.connection)
            elif not connection.is_connected:
                await pubsub.connect()  # a reconnect calls back on_connect: SSUBSCRIBE again


class ResilientPubSub(_Recovering, PubSub):
    """redis-py's ``PubSub`` on a single Redis, whose reads reconnect to it with backoff (redis-py
    then subscribes again) instead of raising at once."""

    def __init__(self, pubsubs: PubSubs, connection_pool: Any, **kwargs: Any) -> None:
        super().__init__(connection_pool, **kwargs)
        self._pubsubs = pubsubs
        self._outages = {}

    async def _recover_classic(self) -> None:
        connection = self.connection
        if connection is not None and not connection.is_connected:
            await connection.connect()  # redis-py calls back on_connect: SUBSCRIBE again
