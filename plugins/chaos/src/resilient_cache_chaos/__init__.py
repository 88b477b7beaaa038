"""A first-party plugin stage: inject faults into Redis commands, for an application's own tests.

Off unless ``REDIS_CHAOS__ENABLED=true`` (the factory then returns None: the stage is not in the
pipeline at all). Name it in the pipeline where the faults should appear::

    REDIS_STAGES=tracing,metrics,memory,timeout,retry,routing,chaos,breaker
    REDIS_CHAOS__ENABLED=true
    REDIS_CHAOS__FAULT=connection_error
    REDIS_CHAOS__RATE=0.2
    REDIS_CHAOS__SEED=42

A matching command (by name, key prefix and node) gets the fault with probability ``rate``, drawn
from ``random.Random(seed)``: one draw per matching command, so a seeded run injects the same
faults into the same sequence of commands. The fault replaces the call to the rest of the
pipeline (``latency`` delays it instead), so nothing injected ever reaches Redis, and the errors
say so the way redis-py does: a connection error is a failure *to connect*, which the retry
stage repeats even for a non-idempotent command instead of reporting it in doubt. The errors are
redis-py's own classes, so the retry stage, the breakers and the application handle them as
they would a real fault. Messages name a node, never a key or a value.

Every injected fault adds a ``resilient_cache.chaos.fault`` event to the current span (when it
records) and counts in ``resilient_cache.chaos.faults`` (when the client exports metrics).
plugins/chaos/README.md says what each fault does to the retry stage and the caller.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.metrics import Counter, Meter
from opentelemetry.semconv.attributes import db_attributes, server_attributes
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MovedError, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resilient_cache import Backend, BuildContext, Command, Handler, StageRegistry, hookimpl

logger = logging.getLogger("resilient_cache_chaos")

try:
    __version__ = version("resilient-cache-chaos")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

Fault = Literal[
    "latency", "connection_error", "timeout", "clusterdown", "tryagain", "moved", "node_down"
]

#: The span event added for every injected fault, and its attribute naming the fault.
EVENT_FAULT = "resilient_cache.chaos.fault"
FAULT_KIND = "resilient_cache.chaos.kind"
#: On a ``latency`` event: the delay added, in seconds.
FAULT_LATENCY = "resilient_cache.chaos.latency"
#: The counter of injected faults, by ``resilient_cache.chaos.kind``.
FAULTS = "resilient_cache.chaos.faults"


class ChaosSettings(BaseModel):
    """``REDIS_CHAOS__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error, not ignored

    enabled: bool = Field(
        default=False,
        description="Inject faults. Off: the stage is left out of the pipeline and costs nothing.",
    )
    rate: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Share of the matching commands that get the fault (0 to 1); for node_down, "
        "the chance that a matching command takes its node down.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description="Seed of the random draws: the same seed and the same commands give the "
        "same faults (empty: a fresh seed per client).",
    )
    commands: list[str] = Field(
        default_factory=list,
        description='Only commands with these names, such as ["GET", "INCR"] (all if '
        "empty). A client.pipeline() batch is named PIPELINE, a transaction MULTI.",
    )
    key_prefixes: list[str] = Field(
        default_factory=list,
        description="Only commands touching a key that starts with one of these (all if empty).",
    )
    nodes: list[str] = Field(
        default_factory=list,
        description="Only commands routed to these 'host:port' nodes (all if empty); the node "
        "is known only when the stage sits after routing.",
    )
    fault: Fault = Field(default="connection_error", description="The fault to inject.")
    latency: float = Field(
        default=0.1, ge=0, le=60, description="Seconds added before the command (fault latency)."
    )
    down_for: float = Field(
        default=5.0,
        ge=0.001,
        le=3600,
        description="Seconds a node stays down (fault node_down); it then stays up at least as "
        "long before it can go down again.",
    )

    @field_validator("commands")
    @classmethod
    def _command_names(cls, value: list[str]) -> list[str]:
        names = [" ".join(name.split()).upper() for name in value]
        if not all(names):
            raise ValueError("a command name cannot be empty")
        return names

    @field_validator("key_prefixes")
    @classmethod
    def _no_empty_prefix(cls, value: list[str]) -> list[str]:
        if not all(value):
            raise ValueError("an empty prefix would match every key; leave the list empty instead")
        return value

    @field_validator("nodes")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [_address(node) for node in value]


def _address(text: str) -> str:
    """``"host:port"`` as redis-py names a node (an IPv6 host without brackets)."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (a port from 1 to 65535)")
    return f"{host}:{int(port)}"


class ChaosStage:
    """Injects ``settings.fault`` into matching commands; see the module's documentation.

    ``backend`` (optional) names the node in a message when the stage sits before routing and
    picks the node a MOVED points to; ``meter`` (optional) is called at the first fault and
    returns the meter to count faults on, or None when nobody would see the counter.
    """

    def __init__(
        self,
        settings: ChaosSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backend: Backend | None = None,
        meter: Callable[[], Meter | None] | None = None,
    ) -> None:
        self.fault: Fault = settings.fault
        self.rate = settings.rate
        self.latency = settings.latency
        self.down_for = settings.down_for
        self._commands = frozenset(settings.commands)
        self._prefixes = tuple(settings.key_prefixes)
        self._byte_prefixes = tuple(prefix.encode() for prefix in settings.key_prefixes)
        self._nodes = frozenset(settings.nodes)
        self._random = random.Random(settings.seed)
        self._clock = clock
        self._sleep = sleep
        self._backend = backend
        self._meter = meter
        self._counter: Counter | None = None
        # node_down, shared by every command: whether a node is down, which one (its name, or
        # None for commands no node was chosen for), until when, and when the next may go down.
        self._outage = False
        self._down_node: str | None = None
        self._down_until = 0.0
        self._quiet_until = -math.inf

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        if self._matches(command):
            if self.fault == "node_down":
                if self._node_is_down(command):
                    self._record(command)
                    raise self._error(command)
            elif self._random.random() < self.rate:
                self._record(command)
                if self.fault != "latency":
                    raise self._error(command)
                await self._sleep(self.latency)
        return await call_next(command)

    # -- which commands ----------------------------------------------------------------------

    def _matches(self, command: Command) -> bool:
        if self._commands and command.name not in self._commands:
            return False
        if self._nodes:
            node = command.node
            if node is None or node.name not in self._nodes:
                return False  # before routing the node is unknown: it cannot match
        if self._prefixes:
            keys = command.keys
            # None: the keys cannot be known, so any key may be touched (design section 4).
            if keys is not None and not any(self._key_matches(key) for key in keys):
                return False
        return True

    def _key_matches(self, key: Any) -> bool:
        if isinstance(key, bytes | bytearray | memoryview):
            return bytes(key).startswith(self._byte_prefixes)
        return str(key).startswith(self._prefixes)

    def _node_is_down(self, command: Command) -> bool:
        """Whether ``command``'s node is down now, starting an outage when none is under way
        (nor has just ended) and the draw says so. No ``await``: the state is shared."""
        node = command.node
        name = node.name if node is not None else None
        now = self._clock()
        if self._outage:
            if now < self._down_until:
                return name == self._down_node
            self._outage = False  # healed
        if now < self._quiet_until or self._random.random() >= self.rate:
            return False
        self._outage = True
        self._down_node = name
        self._down_until = now + self.down_for
        self._quiet_until = self._down_until + self.down_for
        logger.warning("chaos: node %s is down for %g s", name or "(unrouted)", self.down_for)
        return True

    # -- the fault ---------------------------------------------------------------------------

    def _error(self, command: Command) -> RedisError:
        """The error a real fault of this kind gives, as redis-py words it. None of them was
        sent: connection errors and timeouts are failures to connect (the retry stage then
        knows the command did not run), the others are replies refusing to run it."""
        fault = self.fault
        error: RedisError
        if fault == "connection_error" or fault == "node_down":
            error = RedisConnectionError(
                f"Error 111 connecting to {self._where(command)}. Connection refused."
            )
        elif fault == "timeout":
            error = RedisTimeoutError(f"Timeout connecting to {self._where(command)}")
        elif fault == "clusterdown":
            error = ClusterDownError("The cluster is down")
            error.status_code = "CLUSTERDOWN"
        elif fault == "tryagain":
            error = TryAgainError("Multiple keys request during rehashing of slot")
            error.status_code = "TRYAGAIN"
        else:  # moved
            error = MovedError(f"{_slot(command)} {self._moved_to(command)}")
            error.status_code = "MOVED"
        if sys.version_info >= (3, 11):
            error.add_note(f"resilient_cache_chaos: injected fault {fault} (REDIS_CHAOS__*)")
        return error

    def _where(self, command: Command) -> str:
        """The node the command would have gone to, ``"host:port"``."""
        node = command.node
        if node is None and self._backend is not None:
            node = self._backend.route(command)  # before routing: where it would go
            if node is None:
                known = self._backend.known_nodes()  # a single server, or a keyless command
                if known:
                    return f"{known[0][0]}:{known[0][1]}"
        return node.name if node is not None else "the cluster"

    def _moved_to(self, command: Command) -> str:
        """Another node than the one asked (the next address after it), as a MOVED names the
        slot's new owner."""
        asked = self._where(command)
        known = self._backend.known_nodes() if self._backend is not None else []
        others = sorted(f"{host}:{port}" for host, port in known if f"{host}:{port}" != asked)
        if others:
            return next((node for node in others if node > asked), others[0])
        return asked if ":" in asked else "127.0.0.1:6379"  # no backend: a stage made by hand

    def _record(self, command: Command) -> None:
        """The span event and the counter of one injected fault: never a key or a value."""
        span = trace.get_current_span()
        if span.is_recording():
            attributes: dict[str, Any] = {
                FAULT_KIND: self.fault,
                db_attributes.DB_OPERATION_NAME: command.name,
            }
            node = command.node
            if node is not None:
                attributes[server_attributes.SERVER_ADDRESS] = node.host
                attributes[server_attributes.SERVER_PORT] = int(node.port)
            if self.fault == "latency":
                attributes[FAULT_LATENCY] = self.latency
            span.add_event(EVENT_FAULT, attributes)
        counter = self._counter
        if counter is None and self._meter is not None:
            meter, self._meter = self._meter(), None  # asked once, at the first fault
            if meter is not None:
                counter = self._counter = meter.create_counter(
                    FAULTS, unit="{fault}", description="Faults injected by the chaos stage."
                )
        if counter is not None:
            counter.add(1, {FAULT_KIND: self.fault})


def _slot(command: Command) -> int:
    """The hash slot of the command's first key (0 without one), as a MOVED reply names it."""
    keys = command.keys
    if not keys:
        return 0
    key = keys[0]
    if isinstance(key, bytes | bytearray | memoryview):
        return key_slot(bytes(key))
    return key_slot(str(key).encode())


def _meter_of(context: BuildContext) -> Callable[[], Meter | None]:
    def meter() -> Meter | None:
        # The build made the client's instruments only when an SDK would see them, and the
        # metrics stage drops them with REDIS_METRICS__EXPORT=false: follow that decision.
        if context.stats.instruments is None:
            return None
        return context.meter_provider.get_meter("resilient_cache_chaos", __version__)

    return meter


def build(settings: ChaosSettings, context: BuildContext) -> ChaosStage | None:
    if not settings.enabled or settings.rate == 0:
        return None  # not in the pipeline: no cost at all
    logger.warning(
        "chaos: injecting %s into %g%% of the matching commands (REDIS_CHAOS__ENABLED)",
        settings.fault,
        settings.rate * 100,
    )
    return ChaosStage(
        settings,
        clock=context.clock,
        sleep=context.sleep,
        backend=context.backend,
        meter=_meter_of(context),
    )


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("chaos", ChaosSettings, build, description="Injects faults, for tests.")
