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
import logging
import time
from collections.abc import Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio.cluster import ClusterNode as RedisPyClusterNode
from redis.asyncio.cluster import RedisCluster
from redis.cluster import LoadBalancingStrategy
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    ReadOnlyError,
    RedisClusterException,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.backends._redis_py_compat import (
    ANSWERED_BY,
    REDIRECTS,
    ReportingRedisCluster,
    slot_map_stale,
    slot_primary,
    take_slot_map_stale,
    use_lifo_pools,
    uses_lifo_pool,
)
from resilient_cache.backends.failover import FailoverView, format_ranges
from resilient_cache.backends.redis_py_autopipeline import AutoPipeline, can_batch, is_idle
from resilient_cache.backends.redis_py_common import (
    connection_options,
    no_retry,
    reachable_topology,
    run_batch,
)
from resilient_cache.backends.redis_py_errors import (
    credentials_refused,
    translate_redis_py_error,
)
from resilient_cache.backends.redis_py_node_batches import (
    NODE_BATCH,
    NodeBatch,
    node_batches,
    send_node_batch,
)
from resilient_cache.backends.redis_py_routing import pin_batch, slot_nodes_for
from resilient_cache.backends.redis_py_standalone import RedisPyStandaloneBackend
from resilient_cache.config_values import AddressMap
from resilient_cache.errors import (
    ConfigurationError,
    CredentialsRefusedError,
    quotes_arguments,
    refused_authentication,
)
from resilient_cache.hookspecs import hookimpl
from resilient_cache.node_facts import NodeFacts
from resilient_cache.pipeline import BATCH_NAMES, PIPELINE, TRANSACTION, Command, NodeRef
from resilient_cache.telemetry import node_attributes

if TYPE_CHECKING:
    from resilient_cache.registry import BackendRegistry, BuildContext
    from resilient_cache.settings import Settings
    from resilient_cache.telemetry import CommandStats


logger = logging.getLogger("resilient_cache.backends")

#: Shortest time between two slot-map refreshes asked for by stages (seconds).
REFRESH_INTERVAL = 0.25
#: Shortest time between two reads of CLUSTER NODES for the failover view (seconds).
NODES_READ_INTERVAL = 1.0
#: str keys whose hash slot is kept (a dict lookup is cheaper than encoding and hashing).
SLOT_CACHE_SIZE = 10_000


class RedisPyClusterBackend:
    """Redis Cluster through ``redis.asyncio.RedisCluster``."""

    name = "cluster"
    routes_per_node = True

    def __init__(self, settings: Settings, stats: CommandStats | None = None) -> None:
        if not settings.cluster_nodes:
            raise ConfigurationError(
                "REDIS_CLUSTER_NODES: no cluster node is configured; set "
                "REDIS_CLUSTER_NODES=host:port,host:port (or REDIS_NODE_1_HOST/PORT, ...), "
                "or REDIS_URL for a single Redis"
            )
        self._settings = settings
        self._stats = stats
        self._seeds = [str(n) for n in settings.cluster_nodes]
        self._str_slots: dict[str, int] = {}
        self._make_cluster(replica_reads=False)
        if settings.auto_pipeline:
            # Chosen once: without auto-pipelining a command pays nothing for it.
            self.execute = self._execute_auto  # type: ignore[method-assign]
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        # True from a connection error (redis-py's flag, taken by execute()) until a re-read
        # of the slot map in the background succeeded.
        self._stale = False
        self._connected = False  # before connect(), redis-py reads the slot map itself
        #: Background re-reads of the slot map started so far (one at a time, rate-limited).
        self.refreshes = 0
        self._failover_asked = False  # see failover_possible()
        self._cluster_nodes_read_at = 0.0
        #: Latency and replica health per node: the health probe fills it, routing reads it.
        self.node_facts = NodeFacts()
        self._replica_reads = False  # READONLY on replica connections (enable_replica_reads)

    def _make_cluster(self, replica_reads: bool) -> None:
        settings = self._settings
        # For nodes that announce addresses the client cannot reach (containers, NAT). redis-py
        # remaps the slot map with it, ReportingRedisCluster the redirects, and _reachable()
        # the topology replies the failover view and the health probe read.
        remap = {"address_remap": AddressMap(settings.address_map)} if settings.address_map else {}
        try:
            self._cluster = ReportingRedisCluster(
                startup_nodes=[RedisPyClusterNode(n.host, n.port) for n in settings.cluster_nodes],
                retry=no_retry(),
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
                    LoadBalancingStrategy.ROUND_ROBIN if replica_reads else None
                ),
                **remap,
                **connection_options(settings),
            )
        except TypeError as err:
            raise ConfigurationError(f"REDIS_REDIS_OPTIONS / redis_options: {err}") from None
        encoder = self._cluster.encoder
        self._encode = encoder.encode
        self._encoding, self._encoding_errors = encoder.encoding, encoder.encoding_errors
        self._nodes_manager = self._cluster.nodes_manager
        self._failover = FailoverView()
        # The writer of client.pipeline()'s node batches, and of auto-pipelined commands.
        self._auto = AutoPipeline(
            self._cluster,
            send_alone=self._execute_alone,
            translate=self._translate,
            topology_changed=self.request_refresh,
            record_batch=self._record_batch,
        )

    def enable_replica_reads(self) -> None:
        # redis-py fixes READONLY-on-connect when the client is made; nothing has connected
        # yet (stage factories run before connect()), so it is made again with a strategy.
        if self._cluster.load_balancing_strategy is None:
            self._make_cluster(replica_reads=True)
        self._replica_reads = True

    async def connect(self) -> None:
        failure: Exception
        try:
            await self._cluster.initialize()
            use_lifo_pools(self._cluster.get_nodes())
            self._connected = True
            await self._read_node_timeout()
            return
        except (RedisConnectionError, RedisClusterException) as err:
            if refused_authentication(err) is None:
                raise RedisConnectionError(self._unreachable(err)) from err
            failure = err
        raise await self._credentials_refused(failure)

    def _unreachable(self, err: BaseException) -> str:
        cause = f"({type(err).__name__}: {err})"
        # redis-py keeps the nodes of a slot map it read even when connecting to them failed.
        announced = sorted(
            name for name in self._nodes_manager.nodes_cache if name not in self._seeds
        )
        if not announced:
            return (
                f"Unable to connect to cluster: none of {', '.join(self._seeds)} answered {cause}"
            )
        shown = ", ".join(announced[:3]) + (", ..." if len(announced) > 3 else "")
        return (
            f"Unable to connect to cluster: a seed answered, but the nodes it announces "
            f"({shown}) did not {cause}; if the nodes announce addresses this client cannot "
            "reach (containers, NAT), map them to reachable ones with REDIS_ADDRESS_MAP"
        )

    @property
    def _username(self) -> str | None:
        username = self._cluster.connection_kwargs.get("username")
        return username if isinstance(username, str) else None

    async def _credentials_refused(
        self, err: BaseException, command: str | None = None
    ) -> CredentialsRefusedError:
        """The error for credentials refused while redis-py read the slot map. redis-py keeps
        the last node's error only, without its address: each seed is asked once more (with
        the same options, concurrently) to name those that refuse them."""

        async def refuses(host: str, port: int) -> bool:
            node = RedisPyClusterNode(host, port, **self._cluster.connection_kwargs)
            try:
                await node.execute_command("PING")
            except AuthenticationError:
                return True
            except Exception:  # unreachable, or anything else: not this node's refusal
                return False
            finally:
                await node.disconnect()
            return False

        seeds = self._settings.cluster_nodes
        refused = await asyncio.gather(*(refuses(n.host, n.port) for n in seeds))
        nodes = [name for name, no in zip(self._seeds, refused, strict=True) if no]
        error = credentials_refused(err, nodes or self._seeds, self._username, command)
        original = err.__cause__ if isinstance(err, CredentialsRefusedError) else err
        auth = refused_authentication(original) if original is not None else None
        if auth is not None and not quotes_arguments(auth, self._secrets()):
            error.__cause__ = auth
        return error

    def _secrets(self) -> list[str]:
        kwargs = self._cluster.connection_kwargs
        return [str(kwargs[name]) for name in ("username", "password") if kwargs.get(name)]

    async def aclose(self) -> None:
        task, self._refresh_task = self._refresh_task, None
        await cancel_and_wait(task)
        await self._auto.aclose()
        await self._cluster.aclose()

    def _execute_auto(self, command: Command) -> Coroutine[Any, Any, Any]:
        """``execute`` with auto-pipelining on: a command that can share a write joins its
        node's next batch (backends/redis_py_autopipeline.py); any other goes alone, and so
        does one that finds nothing on its way to its node (there is no one to share with).
        Not a coroutine function: it returns the coroutine that sends the command, so a
        command that goes alone has no frame of this method around it."""
        if not can_batch(command) or is_idle(command.node):
            command.batch_size = None  # a retry of a command an earlier attempt sent batched
            return self._execute_alone(command)
        return self._execute_batched(command)

    async def _execute_batched(self, command: Command) -> Any:
        if self._connected and take_slot_map_stale(self._cluster):
            self._stale = True
            self.request_refresh()
        return await self._auto.enqueue(command, self._auto.queue_for(command.node))

    def _translate(self, command: Command, err: Exception, node: str | None) -> Exception:
        return translate_redis_py_error(command, err, node, username=self._username)

    def _record_batch(self, size: int, node: Any) -> None:
        instruments = self._stats.instruments if self._stats is not None else None
        if instruments is not None:
            instruments.batch_sizes.record(size, node_attributes(node))

    async def _execute_alone(self, command: Command) -> Any:
        if self._connected and take_slot_map_stale(self._cluster):
            # Never inside this caller's attempt: see take_slot_map_stale().
            self._stale = True
            self.request_refresh()
        if command.name in BATCH_NAMES:
            if command.node is not None and command.options.get(NODE_BATCH):
                # One node's share of a client.pipeline(): see redis_py_node_batches.py.
                return await send_node_batch(
                    self._auto, command, self._username, self.request_refresh
                )
            if self._replica_reads and command.name == PIPELINE:
                command = pin_batch(command, self.node_for_slot, self._slot)
            return await run_batch(self._cluster, command, self._node_of, self._username)
        ANSWERED_BY.set(None)
        failure: Exception
        try:
            if command.node is not None:
                return await self._cluster.execute_command(
                    command.name, *command.args, target_nodes=command.node, **command.options
                )
            return await self._cluster.execute_command(
                command.name, *command.args, **command.options
            )
        except Exception as err:
            if isinstance(err, ReadOnlyError):
                # A connection to a primary that was demoted: the slot map is out of date.
                self.request_refresh()
            # redis-py puts the node on a reply error; else the one the attempt went to.
            node = getattr(err, "connection", None) or ANSWERED_BY.get() or command.node
            failure = translate_redis_py_error(
                command, err, getattr(node, "name", None), username=self._username
            )
            if failure is err:
                raise
        finally:
            answered = ANSWERED_BY.get()
            if answered is not None and answered is not command.node:
                command.node = answered  # redirected, or a keyless command redis-py routed
            redirects = REDIRECTS.get()
            if redirects is not None:
                REDIRECTS.set(None)
                command.redirects = (command.redirects or []) + redirects
                if any(redirect.kind == "MOVED" for redirect in redirects):
                    # redis-py patched the one slot of this reply; after a failover every
                    # slot of that node moved: re-read the whole map (in the background).
                    self.request_refresh()
        if (
            isinstance(failure, CredentialsRefusedError)
            and not failure.nodes
            and not self._connected
        ):
            # Refused while redis-py read the slot map (a command before connect()).
            failure = await self._credentials_refused(failure, command.name)
        raise failure  # outside the except block: Python would chain redis-py's error to it

    execute = _execute_alone  # see __init__: _execute_auto with auto-pipelining on

    def node_batches(
        self, commands: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]
    ) -> list[NodeBatch] | None:
        """``client.pipeline()``'s commands grouped by node, or ``None`` to send them whole
        (see redis_py_node_batches.py)."""
        return node_batches(commands, self.route, self._slot)

    def _node_of(self, command: Command, position: int | None) -> str | None:
        """``"host:port"`` of the node the command at ``position`` of a batch went to (the
        slot's primary, or its ``target_nodes``), or of a transaction's slot; ``None`` when
        redis-py chose (a keyless command)."""
        try:
            if position is not None:
                args, options = command.args[position - 1]
                target = options.get("target_nodes")
                if isinstance(target, list | tuple) and len(target) == 1:
                    target = target[0]
                if target is not None:
                    name = getattr(target, "name", None)
                    return name if isinstance(name, str) else None
                keys = Command.from_call(args, options).keys
            elif command.name == TRANSACTION:
                keys = command.keys
            else:
                return None
            if not keys:
                return None
            node = self._nodes_manager.get_node_from_slot(self._slot(keys[0]))
            name = node.name
            return name if isinstance(name, str) else None
        except Exception:  # only for a message: never mask the error being reported
            return None

    def route(self, command: Command, replica: bool = False) -> NodeRef | None:
        keys = command.keys
        if not keys or "target_nodes" in command.options:
            return None
        if command.name in BATCH_NAMES:  # the slots may be given (see batch_command)
            # set(map()), not a set comprehension: that would make ``self`` a closure cell,
            # allocated on every call of this method, batch or not.
            slots = command.options.get("slots") or set(map(self._slot, keys))
            return self._batch_node(slots)
        key = keys[0]
        slot = self._str_slots.get(key) if type(key) is str else None  # _slot(), inlined
        if slot is None:
            slot = self._slot(key)
        if len(keys) > 1:
            for key in keys[1:]:
                if self._slot(key) != slot:
                    return None  # let redis-py report the cross-slot error in its own words
        node: Any
        if replica and command.read_only:
            try:
                node = self._nodes_manager.get_node_from_slot(slot, True)
            except (SlotNotCoveredError, KeyError):
                return None
            if not uses_lifo_pool(node):  # a node redis-py discovered on its own
                use_lifo_pools((node,))
            return node  # type: ignore[no-any-return]  # a redis-py ClusterNode: a NodeRef
        # What get_node_from_slot(slot) returns, without its call (every command comes here).
        # None: the slot is not covered, or redis-py has no slot map yet (a command before the
        # first connect: redis-py's own execute_command initialises and routes that one).
        return slot_primary(self._nodes_manager, slot)  # type: ignore[no-any-return]

    def slot_nodes(self, command: Command) -> Sequence[NodeRef] | None:
        return slot_nodes_for(self._nodes_manager, self._slot, command)

    def node_for_slot(self, slot: int) -> NodeRef | None:
        """The primary serving ``slot`` in the current slot map, if known."""
        try:
            return cast(NodeRef, self._nodes_manager.get_node_from_slot(slot))
        except (SlotNotCoveredError, KeyError):
            return None

    def _batch_node(self, slots: Iterable[int]) -> NodeRef | None:
        """The one primary serving every slot of a batch, if there is one (so its breaker,
        not the cluster-wide one, guards the batch)."""
        node: Any = None
        try:
            for slot in slots:
                owner = self._nodes_manager.get_node_from_slot(slot)
                if node is not None and owner is not node:
                    return None
                node = owner
        except (SlotNotCoveredError, KeyError):
            return None
        return cast(NodeRef, node)

    def _slot(self, key: Any) -> int:
        # A str key, the common case, is encoded here as redis-py's encoder would, and its slot
        # kept (a key's slot never changes); anything else goes through that encoder.
        if type(key) is str:
            slots = self._str_slots
            slot = slots.get(key)
            if slot is None:
                if len(slots) >= SLOT_CACHE_SIZE:
                    slots.clear()  # a working set larger than the cache: start again
                slot = slots[key] = key_slot(key.encode(self._encoding, self._encoding_errors))
            return slot
        return key_slot(self._encode(key))

    @property
    def topology_stale(self) -> bool:
        # redis-py raises its flag after a connection error; execute() takes it over.
        return self._stale or slot_map_stale(self._cluster)

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
        self.refreshes += 1
        self._refresh_task = asyncio.get_running_loop().create_task(
            self._refresh_quietly(), name="resilient_cache.refresh"
        )

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_topology()
        except Exception as err:  # the next request tries again; callers see their own errors
            logger.debug("slot map refresh failed: %s: %s", type(err).__name__, err)

    async def refresh_topology(self) -> None:
        if not self._connected:
            await self._cluster.initialize()  # the first read of the map, under redis-py's lock
            self._connected = True
        else:
            # Not redis-py's initialize(): on failure it closes every connection of every node.
            await self._nodes_manager.initialize()
            self._stale = False
            cluster = self._cluster
            if cluster.get_default_node() not in cluster.get_primaries():
                cluster.replace_default_node()  # for keyless commands redis-py routes itself
            now = time.monotonic()
            if self._failover_asked and now - self._cluster_nodes_read_at >= NODES_READ_INTERVAL:
                self._failover_asked = False
                self._cluster_nodes_read_at = now
                await self._read_cluster_nodes()
        use_lifo_pools(self._cluster.get_nodes())

    # -- failovers (see backends/failover.py) ------------------------------------------------

    async def _read_node_timeout(self) -> None:
        # Once, at connect: how long this cluster takes to fail over. A user without CONFIG
        # permission leaves it unknown (the retry stage then keeps its failover_wait).
        try:
            reply = await self._cluster.execute_command(
                "CONFIG",
                "GET",
                "cluster-node-timeout",
                target_nodes=self._cluster.get_default_node(),
            )
        except Exception as err:
            logger.debug("cluster-node-timeout not read: %s", type(err).__name__)
        else:
            self._failover.note_node_timeout(reply)
        await self._read_cluster_nodes()

    async def _read_cluster_nodes(self) -> None:
        # Which primaries have a replica that can take over (backends/failover.py). Unknown
        # (so the retry stage keeps its failover_wait) when no primary answers or ACLs refuse.
        for node in self._cluster.get_nodes():  # the first that answers: some may be down
            try:
                reply = await self._cluster.execute_command("CLUSTER NODES", target_nodes=node)
            except Exception as err:
                logger.debug("CLUSTER NODES not read from %s: %s", node.name, type(err).__name__)
                continue
            self._failover.note_cluster_nodes(self._reachable(("CLUSTER NODES",), reply))
            return

    def failover_possible(self, node: str) -> bool | None:
        # Asked by the retry stage when a breaker refused: the next background re-read of the
        # slot map also re-reads CLUSTER NODES (at most once a second, so a refusal storm is
        # no CLUSTER NODES herd).
        self._failover_asked = True
        return self._failover.can_take_over(node)

    @property
    def failover_estimate(self) -> float | None:
        return self._failover.estimate

    def slots_of(self, node: str) -> str:
        return format_ranges(self._failover.slot_ranges(node))

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
                return self._reachable(args, await node.execute_command(*args))
            finally:
                await node.disconnect()
        return self._reachable(args, await node.execute_command(*args))

    def _reachable(self, args: tuple[Any, ...], reply: Any) -> Any:
        """A topology reply (CLUSTER NODES/SHARDS/SLOTS) with the nodes at the addresses the
        client reaches them at, when an address map (or redis-py's ``address_remap``) is set:
        the health probe and the failover view must name nodes as redis-py does."""
        remap = self._nodes_manager.address_remap
        if remap is None or not args or not isinstance(args[0], str):
            return reply
        return reachable_topology(args[0].upper(), reply, remap, self._known_as)

    def _known_as(self, host: str, port: int) -> tuple[str, int] | None:
        node = self._cluster.get_node(host=host, port=port)
        return None if node is None else (node.host, int(node.port))

    @property
    def raw(self) -> RedisCluster:
        return self._cluster


def _cluster_factory(settings: Settings, context: BuildContext | None) -> RedisPyClusterBackend:
    return RedisPyClusterBackend(settings, context.stats if context is not None else None)


def _standalone_factory(
    settings: Settings, context: BuildContext | None
) -> RedisPyStandaloneBackend:
    return RedisPyStandaloneBackend(settings)


@hookimpl
def resilient_cache_register_backends(registry: BackendRegistry) -> None:
    registry.add("cluster", _cluster_factory)
    registry.add("standalone", _standalone_factory)
