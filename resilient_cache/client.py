"""``RedisClusterClient``: redis-py's asyncio command API, every command through the pipeline.

The client is built once, by :func:`resilient_cache.build.build_pipeline` (settings resolved,
plugins loaded, stage factories called, the pipeline composed into one handler); the client
keeps what it made. After that, a call
such as ``await client.get("k")`` is: redis-py's command mixin -> :meth:`execute_command` ->
a :class:`~resilient_cache.pipeline.Command` -> the composed handler -> the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from opentelemetry import metrics, trace
from redis.commands.cluster import AsyncRedisClusterCommands
from redis.crc import key_slot
from redis.event import EventDispatcher

from resilient_cache import telemetry
from resilient_cache.backends import Backend
from resilient_cache.backends._redis_py_compat import event_dispatcher
from resilient_cache.batch import NODE_BATCH, POSITIONS, ClientPipeline
from resilient_cache.build import OPTION_SHORTCUTS, build_pipeline, resolve_options
from resilient_cache.circuit import BreakerBoard
from resilient_cache.errors import NotConnectedError
from resilient_cache.health import ClusterStats, HealthMonitor, collect_stats
from resilient_cache.pipeline import Command, Handler, Stage, batch_command
from resilient_cache.pubsub import PubSubs
from resilient_cache.redis_py_api import RedisPyClusterApi
from resilient_cache.registry import StageSpec
from resilient_cache.routing_policies import primary_reads
from resilient_cache.settings import ClusterNode, Settings
from resilient_cache.telemetry import MetricsSnapshot

__all__ = [
    "OPTION_SHORTCUTS",
    "RedisClusterClient",
    "create_redis_cluster",
    "resolve_options",
]

logger = logging.getLogger("resilient_cache.client")


# redis-py's own mixins disagree on command_info(); mypy sees it once a second base is added.
class RedisClusterClient(RedisPyClusterApi, AsyncRedisClusterCommands):  # type: ignore[misc]
    """An asyncio Redis Cluster client whose every command runs through the configured pipeline.

    Usually made with :func:`create_redis_cluster`. Keyword arguments override ``REDIS_*``
    variables, which override ``.env`` and the TOML file; see docs/configuration.md.

    Build-time only arguments (everything else is a setting):
        plugins: extra plugin objects (modules or instances with ``@hookimpl`` functions).
        autoload: load entry-point plugins (default: ``REDIS_PLUGINS_AUTOLOAD``, true).
        tracer_provider / meter_provider: OpenTelemetry providers (default: the global ones).
        clock / sleep: time source and async sleep for the stages (tests pass fakes).
        config_file: a TOML file to read (default: ``REDIS_CONFIG_FILE`` or
            ``./resilient_cache.toml``).
    """

    # Tells redis-py's typed command mixins that their methods return awaitables here (a name
    # redis-py reads: see backends/_redis_py_compat.py).
    _is_async_client: Literal[True] = True

    def __init__(
        self,
        nodes: str | Sequence[Any] | None = None,
        *,
        plugins: Sequence[object] = (),
        autoload: bool | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        config_file: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        built = build_pipeline(
            nodes,
            plugins=plugins,
            autoload=autoload,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            clock=clock,
            sleep=sleep,
            config_file=config_file,
            **options,
        )
        self._built = built
        self.settings: Settings = built.settings
        self.stage_specs: dict[str, StageSpec] = built.stage_specs
        self._backend: Backend = built.backend
        self._stats = built.stats
        self._breakers = built.breakers
        self._handler: Handler = built.handler
        self._monitor = HealthMonitor(
            self._backend,
            self.settings.health_check_interval,
            self.settings.health_check_timeout,
            sleep=sleep,
            breakers=self._breakers,
        )
        self._closed = False
        self._pubsubs = PubSubs(self._backend, built.context.clock, built.context.sleep)
        self._observed: telemetry.ObservedClient | None = None
        instruments = self._stats.instruments
        if instruments is not None:
            self._breakers.listeners.append(instruments.breaker_changed)
            self._observed = telemetry.ObservedClient(
                self, self._stats, self._breakers, self._monitor, built.context.tier
            )
            instruments.observe(self._observed)
        self._in_flight = 0
        self._drained: asyncio.Event | None = None
        # redis-py's command mixins read these attributes (after the build: a stage factory
        # may have had the backend remake its redis-py client).
        raw = self._backend.raw
        # The standalone client has no ``encoder`` attribute, only ``get_encoder()``.
        self.encoder: Any = getattr(raw, "encoder", None) or raw.get_encoder()
        self.read_from_replicas = False
        self._event_dispatcher = event_dispatcher(raw) or EventDispatcher()

    @property
    def active_stages(self) -> list[str]:
        """The names of the stages commands pass through, outermost first."""
        return [name for name, _ in self._built.stages]

    @property
    def _stages(self) -> list[Stage]:
        return [stage for _, stage in self._built.stages]

    def stage(self, name: str) -> Stage:
        """The built stage ``name`` (``client.stage("memory")``); KeyError if it is not active."""
        for active, stage in self._built.stages:
            if active == name:
                return stage
        raise KeyError(f"stage {name!r} is not active; active: {', '.join(self.active_stages)}")

    # -- the one entry point of every command ---------------------------------------------

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command through the pipeline: ``execute_command("SET", "k", "v", "EX", 60)``.

        The command name may be in any case. Keyword options go to redis-py (``keys=``,
        ``target_nodes=``, ...).
        """
        self._in_flight += 1
        try:
            return await self._handler(_from_call(args, options))
        finally:
            self._in_flight -= 1
            if self._drained is not None and not self._in_flight:
                self._drained.set()

    async def _execute(self, command: Command) -> Any:
        """Run an already built Command (a batch) through the pipeline, counted in flight.

        The same lines as execute_command(), which does not call this: one coroutine frame
        less on every single command."""
        self._in_flight += 1
        try:
            return await self._handler(command)
        finally:
            self._in_flight -= 1
            if self._drained is not None and not self._in_flight:
                self._drained.set()

    async def _execute_pipeline_by_slot(  # type: ignore[override]  # async, as in redis-py
        self, command: str, slots_to_args: Mapping[int, Iterable[Any]]
    ) -> list[Any]:
        # redis-py's multi-key helpers (DEL/EXISTS/UNLINK/TOUCH of many keys, mget_nonatomic,
        # mset_nonatomic) call this with one command per slot. They go as one batch per node,
        # not one command per slot: 20,000 keys over 12,000 slots are then three pipelines,
        # each on one connection and through the stages once (routed, retried and counted as
        # one), instead of 12,000 commands fighting over the connection pools.
        slots = list(slots_to_args)
        parts = [(command, *args) for args in slots_to_args.values()]
        if len(parts) == 1:
            return [await self.execute_command(*parts[0])]
        node_for_slot = getattr(self._backend, "node_for_slot", lambda slot: None)
        groups: dict[str | None, tuple[Any, list[int]]] = {}
        for index, slot in enumerate(slots):
            node = node_for_slot(slot)
            groups.setdefault(node.name if node is not None else None, (node, []))[1].append(index)
        results: list[Any] = [None] * len(parts)

        async def send(node: Any, indexes: list[int]) -> None:
            batch = batch_command(
                [(parts[i], {}) for i in indexes],
                False,
                True,
                slots=frozenset(slots[i] for i in indexes),
            )
            if node is not None:
                # A node batch (batch.py): routed by its slots, written on one connection,
                # MOVED followed per command. Without a node (no slot map yet) redis-py's
                # pipeline finds each command's node.
                batch.options[NODE_BATCH] = True
                batch.options[POSITIONS] = tuple(i + 1 for i in indexes)
            for index, reply in zip(indexes, await self._execute(batch), strict=True):
                results[index] = reply

        await asyncio.gather(*(send(node, indexes) for node, indexes in groups.values()))
        return results

    def primary_reads(self) -> contextlib.AbstractContextManager[None]:
        """``with client.primary_reads(): ...``: inside the block, read-only commands go to
        their slot's primary whatever ``REDIS_ROUTING__STRATEGY`` says, so a request reads
        what it just wrote (replicas lag). It holds for the current task and the tasks started
        inside the block, for every client; see docs/routing.md."""
        return primary_reads()

    def keyslot(self, key: Any) -> int:
        """The hash slot of ``key``."""
        return key_slot(self.encoder.encode(key) if self.encoder else key)

    def pipeline(self, transaction: bool | None = None, shard_hint: Any = None) -> ClientPipeline:
        """Commands buffered, then sent together by ``await pipe.execute()``: on a cluster,
        one batch per node, each through the stages as one logical command (see batch.py).

        ``transaction=True`` wraps them in MULTI/EXEC (on a cluster, all keys in one slot).
        """
        if shard_hint is not None:
            raise ValueError("shard_hint is not supported; use hash tags to pin keys to a slot")
        return ClientPipeline(
            self._execute,
            bool(transaction),
            encoder=self.encoder,
            event_dispatcher=self._event_dispatcher,
            split=getattr(self._backend, "node_batches", None),
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def connect(self) -> RedisClusterClient:
        """Connect, learn the topology, and start the health monitor."""
        if self._closed:
            raise NotConnectedError("this client was disconnected; create a new one")
        await self._backend.connect()
        self._monitor.start()
        return self

    async def disconnect(self) -> None:
        """Refuse new commands, let those in flight finish (up to ``drain_timeout`` seconds),
        stop the health monitor and background work, and close every connection.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._handler = _closed_handler
        if self._in_flight:
            self._drained = asyncio.Event()
            waiter = asyncio.ensure_future(self._drained.wait())
            done, _ = await asyncio.wait({waiter}, timeout=self.settings.drain_timeout)
            if not done:
                waiter.cancel()
                logger.warning(
                    "disconnect: %d command(s) still running after %.1fs; closing anyway",
                    self._in_flight,
                    self.settings.drain_timeout,
                )
        await self._monitor.stop()
        for _, stage in self._built.stages:  # a stage with background work stops it here
            aclose = getattr(stage, "aclose", None)
            if aclose is not None:
                await aclose()
        await self._pubsubs.aclose()  # before the connections they use are closed under them
        await self._backend.aclose()

    aclose = disconnect

    async def __aenter__(self) -> RedisClusterClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    # -- the original package's API ---------------------------------------------------------

    def get_cluster(self) -> Any:
        """The underlying redis-py client (``redis.asyncio.RedisCluster`` for a cluster)."""
        return self._backend.raw

    async def get_stats(self) -> ClusterStats:
        """Probe every node now: counts by role and status, health, per-node memory/clients."""
        stats = await collect_stats(self._backend, self.settings.health_check_timeout)
        self._monitor.last = stats
        return stats

    def get_metrics(self) -> MetricsSnapshot:
        """Command counts and latency percentiles (milliseconds) over the recent window."""
        return self._stats.snapshot()

    def is_circuit_breaker_open(self, node: str | None = None) -> bool:
        """True if the breaker of ``node`` ("host:port") is open; without ``node``, if any is."""
        if node is None:
            return self._breakers.any_open()
        breaker = self._breakers.breakers.get(node)
        return breaker is not None and breaker.is_open

    def manual_reset_circuit_breaker(self, node: str | None = None) -> None:
        """Close the breaker of ``node``, or every breaker when ``node`` is omitted."""
        self._breakers.reset(node)

    def isolate_node(self, node: str) -> None:
        """Open the breaker of ``node`` ("host:port") until it is reset by hand."""
        self._breakers.get(node).isolate()

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def breakers(self) -> BreakerBoard:
        return self._breakers

    def __repr__(self) -> str:
        nodes = ",".join(str(n) for n in self.settings.cluster_nodes) or "url"
        state = "closed" if self._closed else "open"
        return (
            f"<RedisClusterClient {state} backend={self._backend.name} nodes={nodes} "
            f"stages={self.active_stages}>"
        )


_from_call = Command.from_call  # bound once: execute_command() runs for every command


async def _closed_handler(command: Command) -> Any:
    raise NotConnectedError(f"{command.name}: this client is disconnected")


def create_redis_cluster(
    nodes: str | Sequence[str | ClusterNode | tuple[str, int]] | None = None, **options: Any
) -> RedisClusterClient:
    """Create a client; nothing connects until ``connect()``, ``async with`` or the first command.

    ``nodes`` is what :func:`parse_cluster_nodes` returns (or its input); without it the nodes
    come from ``REDIS_CLUSTER_NODES`` / ``REDIS_NODE_<n>_*`` / ``REDIS_URL``. ``options`` take the
    original package's names (``max_retries``, ``retry_delay``, ``health_check_interval``,
    ``health_check_timeout``, ``circuit_breaker_threshold``, ``circuit_breaker_timeout``,
    ``redis_options``), any core setting, or a stage section as a dict (``retry={...}``).
    """
    return RedisClusterClient(nodes, **options)
