"""Cluster health: ``get_stats()`` and the background health monitor.

A probe asks one reachable node for ``CLUSTER NODES`` and ``CLUSTER INFO`` (the cluster's own
view: roles, failed flags, slot coverage), then each node for ``INFO`` with
``health_check_timeout`` (memory, clients). Health is:

- ``healthy``: every node answers and the cluster serves all slots;
- ``degraded``: some node is down or failing, but all slots are served;
- ``unhealthy``: slots are not served (``cluster_state:fail``) or no primary answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from resilient_cache._tasks import cancel_and_wait

if TYPE_CHECKING:
    from resilient_cache.backends import Backend
    from resilient_cache.circuit import BreakerBoard

logger = logging.getLogger("resilient_cache.health")

Health = Literal["healthy", "degraded", "unhealthy"]


@dataclass(frozen=True)
class NodeStats:
    host: str
    port: int
    role: Literal["primary", "replica"]
    status: Literal["connected", "disconnected", "failing"]
    used_memory_human: str | None = None
    connected_clients: int | None = None


@dataclass(frozen=True)
class ClusterStats:
    total_nodes: int
    connected_nodes: int
    primary_nodes: int
    replica_nodes: int
    health: Health
    nodes: list[NodeStats] = field(default_factory=list)
    cluster_state: str = "unknown"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_cluster_nodes_reply(reply: Any) -> list[dict[str, Any]]:
    """Turn a ``CLUSTER NODES`` reply into ``{host, port, role, failing}`` dicts.

    redis-py parses the reply into ``{"host:port": {"flags": ..., "connected": ...}}``; the raw
    text form is accepted too.
    """
    if not isinstance(reply, dict):
        reply = _parse_cluster_nodes_text(_as_text(reply))
    nodes = []
    for address, entry in reply.items():
        flags = set(_as_text(entry.get("flags", "")).split(","))
        if "noaddr" in flags or "handshake" in flags:
            continue
        host, _, port = _as_text(address).split("@", 1)[0].rpartition(":")
        if not host or not port.isdigit():
            continue
        nodes.append(
            {
                "host": host,
                "port": int(port),
                "role": "primary" if "master" in flags else "replica",
                "failing": bool(flags & {"fail", "fail?"}) or not entry.get("connected", True),
            }
        )
    return sorted(nodes, key=lambda n: (n["host"], n["port"]))


def _parse_cluster_nodes_text(text: str) -> dict[str, dict[str, Any]]:
    parsed = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 8:
            parsed[parts[1]] = {"flags": parts[2], "connected": parts[7] == "connected"}
    return parsed


def _parse_info(reply: Any) -> dict[str, str]:
    if isinstance(reply, dict):
        return {str(k): _as_text(v) for k, v in reply.items()}
    info = {}
    for line in _as_text(reply).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key] = value.strip()
    return info


async def collect_stats(backend: Backend, timeout: float) -> ClusterStats:
    """Probe the cluster once and summarise it; never raises for a node that does not answer."""

    async def ask(address: tuple[str, int], *args: Any) -> Any:
        if sys.version_info >= (3, 11):
            # Not wait_for: before 3.12 it can swallow a cancellation that arrives just as the
            # inner call finishes, and the monitor would then never stop.
            async with asyncio.timeout(timeout):
                return await backend.execute_on(address, *args)
        return await asyncio.wait_for(backend.execute_on(address, *args), timeout)

    topology: list[dict[str, Any]] | None = None
    cluster_state = "unknown"
    if not backend.routes_per_node:  # a single server: it is the whole topology
        (address,) = backend.known_nodes()
        topology = [{"host": address[0], "port": address[1], "role": "primary", "failing": False}]
        cluster_state = "ok"
    else:
        for address in backend.known_nodes():
            try:
                topology = parse_cluster_nodes_reply(await ask(address, "CLUSTER NODES"))
                cluster_state = _parse_info(await ask(address, "CLUSTER INFO")).get(
                    "cluster_state", "unknown"
                )
                break
            except Exception as err:  # a node that does not answer: try the next one
                logger.debug("health probe: %s:%s did not answer: %r", *address, err)
    if topology is None:
        nodes = [
            NodeStats(host, port, "primary", "disconnected") for host, port in backend.known_nodes()
        ]
        return ClusterStats(len(nodes), 0, 0, 0, "unhealthy", nodes, cluster_state)

    async def probe(entry: dict[str, Any]) -> NodeStats:
        try:
            info = _parse_info(await ask((entry["host"], entry["port"]), "INFO"))
        except Exception:
            return NodeStats(entry["host"], entry["port"], entry["role"], "disconnected")
        clients = info.get("connected_clients")
        return NodeStats(
            entry["host"],
            entry["port"],
            entry["role"],
            "failing" if entry["failing"] else "connected",
            info.get("used_memory_human"),
            int(clients) if clients is not None and clients.isdigit() else None,
        )

    nodes = list(await asyncio.gather(*(probe(entry) for entry in topology)))
    connected = [n for n in nodes if n.status == "connected"]
    primaries_up = [n for n in connected if n.role == "primary"]
    health: Health
    if cluster_state != "ok" or not primaries_up:
        health = "unhealthy"
    elif len(connected) < len(nodes):
        health = "degraded"
    else:
        health = "healthy"
    return ClusterStats(
        total_nodes=len(nodes),
        connected_nodes=len(connected),
        primary_nodes=sum(1 for n in nodes if n.role == "primary"),
        replica_nodes=sum(1 for n in nodes if n.role == "replica"),
        health=health,
        nodes=nodes,
        cluster_state=cluster_state,
    )


class HealthMonitor:
    """Probes the cluster every ``interval`` seconds in a background task.

    Keeps the last :class:`ClusterStats`, logs health changes, asks the backend to re-read the
    slot map when the set of primaries changes (a failover the client has not hit yet), and
    lets the open breaker of a node that answers again probe at once.
    """

    def __init__(
        self,
        backend: Backend,
        interval: float,
        timeout: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        breakers: BreakerBoard | None = None,
    ) -> None:
        self._backend = backend
        self._breakers = breakers
        self.interval = interval
        self.timeout = timeout
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self.last: ClusterStats | None = None
        self.probes = 0
        self._stopping = False

    def start(self) -> None:
        if self._task is None and self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="resilient_cache.health"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._stopping = True
        await cancel_and_wait(task)

    async def probe_once(self) -> ClusterStats:
        stats = await collect_stats(self._backend, self.timeout)
        previous, self.last = self.last, stats
        self.probes += 1
        if previous is not None and previous.health != stats.health:
            log = logger.info if stats.health == "healthy" else logger.warning
            log("cluster health %s -> %s", previous.health, stats.health)
        if previous is not None and _primaries(previous) != _primaries(stats):
            logger.info("cluster primaries changed; refreshing the slot map")
            with contextlib.suppress(Exception):
                await self._backend.refresh_topology()
        if self._breakers is not None:
            # A node that answers the probe again gets its half-open probe now, not only after
            # reset_timeout (60 s by default): recovery follows the node, not the clock.
            for node in stats.nodes:
                breaker = self._breakers.breakers.get(f"{node.host}:{node.port}")
                if breaker is not None and node.status == "connected":
                    breaker.allow_probe()
        return stats

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep monitoring whatever one probe did
                logger.exception("health probe failed")
            await self._sleep(self.interval)


def _primaries(stats: ClusterStats) -> set[tuple[str, int]]:
    return {
        (n.host, n.port) for n in stats.nodes if n.role == "primary" and n.status == "connected"
    }


def format_stats(stats: ClusterStats) -> str:
    """A small human-readable table of :class:`~resilient_cache.health.ClusterStats`."""
    lines = [
        f"health: {stats.health}   cluster_state: {stats.cluster_state}",
        f"nodes: {stats.connected_nodes}/{stats.total_nodes} connected, "
        f"{stats.primary_nodes} primaries, {stats.replica_nodes} replicas",
        f"{'node':<22}{'role':<9}{'status':<14}{'memory':<10}clients",
    ]
    for node in stats.nodes:
        lines.append(
            f"{node.host + ':' + str(node.port):<22}{node.role:<9}{node.status:<14}"
            f"{node.used_memory_human or '-':<10}"
            f"{'-' if node.connected_clients is None else node.connected_clients}"
        )
    return "\n".join(lines)
