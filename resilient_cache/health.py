"""Cluster health: ``get_stats()`` and the background health monitor.

A probe asks one reachable node for ``CLUSTER NODES`` and ``CLUSTER INFO`` (the cluster's own
view: roles, failed flags, slot coverage), then each node for ``INFO`` with
``health_check_timeout`` (memory, clients). Health is:

- ``healthy``: every node answers and the cluster serves all slots;
- ``degraded``: some node is down or failing, but all slots are served;
- ``unhealthy``: slots are not served (``cluster_state:fail``, or slots with no serving node on
  a cluster that serves partially, ``cluster-require-full-coverage no``) or no primary answers.

Slots with no serving node are those assigned to no node, and those of a primary the cluster
flags ``fail`` none of whose replicas can take over (each flagged ``fail``/``fail?`` or
``nofailover``, or unlinked): ``ClusterStats.uncovered_slots``, ``uncovered_ranges`` and
``unserved_shards`` (those primaries). A primary that failed while a replica can still take
over is not counted: a failover is coming. ``CLUSTER SHARDS`` gives the same (a node's
``health: failed``); ``CLUSTER SLOTS`` shows no failure, so only unassigned slots.

A node that refuses the client's credentials (``WRONGPASS``) is ``auth_failed``. A command the
client's ACL user may not run (``NOPERM``) leaves a hole in the snapshot, never a wrong count:
``CLUSTER NODES`` refused, the roles come from ``CLUSTER SLOTS``; ``INFO`` refused, the node
still counts as connected (it answered), without memory and clients. Each refusal is in the
node's ``error`` and, grouped, in ``ClusterStats.problems``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.errors import failure_summary, redis_error_code
from resilient_cache.slots import SlotRange, format_ranges
from resilient_cache.topology_replies import TOPOLOGY_COMMANDS, parse_info

if TYPE_CHECKING:
    from resilient_cache.backends import Backend
    from resilient_cache.circuit import BreakerBoard

logger = logging.getLogger("resilient_cache.health")

Health = Literal["healthy", "degraded", "unhealthy"]
NodeStatus = Literal["connected", "disconnected", "failing", "auth_failed"]
#: Every value of ``NodeStats.status``.
NODE_STATUSES: tuple[NodeStatus, ...] = ("connected", "disconnected", "failing", "auth_failed")


@dataclass(frozen=True)
class NodeStats:
    """One node as of a probe.

    ``status``: ``connected`` (it answered), ``disconnected`` (it did not), ``failing`` (the
    cluster flags it ``fail``/``fail?``) or ``auth_failed`` (it refused the client's
    credentials). ``error``: why this node's entry is incomplete, else ``None``, for example
    ``INFO refused: NOPERM this user has no permissions to run the 'info' command``,
    ``credentials refused: WRONGPASS invalid username-password pair or user is disabled.`` or
    ``TimeoutError``; never a credential.

    For routing (docs/routing.md), from ``INFO``: ``loading`` (``loading:1``), ``link_up`` (a
    replica's ``master_link_status:up``), ``replication_offset`` (``master_repl_offset``, a
    replica's ``slave_repl_offset``); and ``latency``, a ``PING``'s seconds. None: unknown.
    """

    host: str
    port: int
    role: Literal["primary", "replica"]
    status: NodeStatus
    used_memory_human: str | None = None
    connected_clients: int | None = None
    error: str | None = None
    loading: bool | None = None
    link_up: bool | None = None
    replication_offset: int | None = None
    latency: float | None = None


@dataclass(frozen=True)
class ClusterStats:
    """The cluster as of a probe (see the module's docstring for ``health``).

    ``problems``: what kept the probe from seeing everything, one line per cause with every
    node it concerns, for example ``INFO refused by 127.0.0.1:7000, 127.0.0.1:7001: NOPERM
    this user has no permissions to run the 'info' command``; empty when nothing was refused.

    ``uncovered_slots``: how many slots have no serving node (see the module's docstring), in
    ``uncovered_ranges`` (``[(10923, 16383)]``, inclusive, in order); ``unserved_shards``: the
    failed primaries (``"host:port"``) whose slots those are, sorted. Zero and empty when
    every slot is served, or when the topology could not be read (``problems`` says so).
    """

    total_nodes: int
    connected_nodes: int
    primary_nodes: int
    replica_nodes: int
    health: Health
    nodes: list[NodeStats] = field(default_factory=list)
    cluster_state: str = "unknown"
    problems: list[str] = field(default_factory=list)
    uncovered_slots: int = 0
    uncovered_ranges: list[SlotRange] = field(default_factory=list)
    unserved_shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Problems:
    """The refusals one probe met, grouped by cause, each with the nodes it came from; sorted,
    so that the same refusals make the same lines however the replies raced."""

    def __init__(self) -> None:
        self._nodes: dict[tuple[str, str], set[tuple[str, int]]] = {}

    def refused(self, address: tuple[str, int], command: str, err: BaseException) -> str | None:
        """Record ``err`` if it is a refusal (credentials or permission) and return the node's
        ``error`` text for it; ``None`` for any other failure."""
        if isinstance(err, AuthenticationError):
            what = "credentials"
        elif isinstance(err, NoPermissionError):
            what = command
        else:
            return None
        code = redis_error_code(err) or type(err).__name__
        detail = str(err.args[0]) if err.args else ""
        if detail.startswith(code + " "):
            detail = detail[len(code) + 1 :]
        cause = f"{what} refused", f"{code} {detail}".strip()
        self._nodes.setdefault(cause, set()).add(address)
        return ": ".join(cause)

    def note(self, line: str) -> None:
        self._nodes.setdefault((line, ""), set())

    def lines(self) -> list[str]:
        lines = []
        for (what, cause), addresses in self._nodes.items():
            nodes = ", ".join(f"{host}:{port}" for host, port in sorted(addresses))
            lines.append(f"{what} by {nodes}: {cause}" if nodes else what)
        return sorted(lines)


async def collect_stats(backend: Backend, timeout: float) -> ClusterStats:
    """Probe the cluster once and summarise it; never raises for a node that does not answer."""

    async def ask(address: tuple[str, int], *args: Any) -> Any:
        if sys.version_info >= (3, 11):
            # Not wait_for: before 3.12 it can swallow a cancellation that arrives just as the
            # inner call finishes, and the monitor would then never stop.
            async with asyncio.timeout(timeout):
                return await backend.execute_on(address, *args)
        return await asyncio.wait_for(backend.execute_on(address, *args), timeout)

    problems = _Problems()
    refusals: dict[tuple[str, int], str] = {}  # nodes that refused the credentials
    topology: list[dict[str, Any]] | None = None
    uncovered: list[SlotRange] = []
    unserved: list[str] = []
    cluster_state = "unknown"
    if not backend.routes_per_node:  # a single server: it is the whole topology
        (address,) = backend.known_nodes()
        topology = [{"host": address[0], "port": address[1], "role": "primary", "failing": False}]
        cluster_state = "ok"
    else:
        for address in backend.known_nodes():
            command = "CLUSTER NODES"
            try:
                for command, parse, coverage in TOPOLOGY_COMMANDS:
                    try:
                        reply = await ask(address, command)
                        topology = parse(reply, address)
                        uncovered, unserved = coverage(reply, address)
                        break
                    except NoPermissionError as err:
                        problems.refused(address, command, err)
                    except ResponseError:
                        if command == "CLUSTER NODES":
                            raise  # not a cluster node, or not answering as one
                if topology is None:
                    continue
                command = "CLUSTER INFO"
                try:
                    info = parse_info(await ask(address, command))
                    cluster_state = info.get("cluster_state", "unknown")
                except NoPermissionError as err:
                    problems.refused(address, command, err)
                break
            except Exception as err:  # a node that does not answer: try the next one
                refused = problems.refused(address, command, err)
                if refused is not None and isinstance(err, AuthenticationError):
                    refusals[address] = refused
                logger.debug("health probe: %s:%s did not answer: %r", *address, err)
    if topology is None:
        problems.note("no node told the topology (CLUSTER NODES/SHARDS/SLOTS): it is unknown")
        nodes = [
            NodeStats(host, port, "primary", "auth_failed", error=refusals[(host, port)])
            if (host, port) in refusals
            else NodeStats(host, port, "primary", "disconnected")
            for host, port in backend.known_nodes()
        ]
        return ClusterStats(
            len(nodes), 0, 0, 0, "unhealthy", nodes, cluster_state, problems.lines()
        )

    async def probe(entry: dict[str, Any]) -> NodeStats:
        host, port, role = entry["host"], entry["port"], entry["role"]
        try:
            info = parse_info(await ask((host, port), "INFO"))
        except Exception as err:
            refused = problems.refused((host, port), "INFO", err)
            if isinstance(err, AuthenticationError):
                return NodeStats(host, port, role, "auth_failed", error=refused)
            if refused is None:  # no answer
                return NodeStats(host, port, role, "disconnected", error=failure_summary(err))
            info = {}  # it answered, but may not run INFO
        else:
            refused = None
        clients = info.get("connected_clients")
        return NodeStats(
            host,
            port,
            role,
            "failing" if entry["failing"] else "connected",
            info.get("used_memory_human"),
            int(clients) if clients is not None and clients.isdigit() else None,
            refused,
            *_replication(info),
        )

    nodes = list(await asyncio.gather(*(probe(entry) for entry in topology)))
    # Apart from the INFO replies, whose parsing would count in each other's round trips.
    times = await asyncio.gather(*(_ping_time(ask, n) for n in nodes if n.status == "connected"))
    late = iter(times)
    nodes = [replace(n, latency=next(late)) if n.status == "connected" else n for n in nodes]
    facts = getattr(backend, "node_facts", None)  # what routing reads (node_facts.py)
    if facts is not None:
        facts.note_probe(nodes)
    connected = [n for n in nodes if n.status == "connected"]
    primaries_up = [n for n in connected if n.role == "primary"]
    health: Health
    if cluster_state != "ok" or not primaries_up or uncovered:
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
        problems=problems.lines(),
        uncovered_slots=sum(end - start + 1 for start, end in uncovered),
        uncovered_ranges=uncovered,
        unserved_shards=unserved,
    )


def _replication(info: dict[str, str]) -> tuple[bool | None, bool | None, int | None]:
    """``loading``, ``link_up`` and ``replication_offset`` from a node's ``INFO``."""
    loading = info.get("loading")
    link = info.get("master_link_status")
    offset = info.get("slave_repl_offset", info.get("master_repl_offset"))
    return (
        None if loading is None else loading == "1",
        None if link is None else link == "up",
        int(offset) if offset is not None and offset.isdigit() else None,
    )


async def _ping_time(ask: Callable[..., Awaitable[Any]], node: NodeStats) -> float | None:
    """Seconds a ``PING`` takes (None if it fails): comparable with a small command's."""
    start = time.perf_counter()
    try:
        await ask((node.host, node.port), "PING")
    except Exception:
        return None
    return time.perf_counter() - start


class HealthMonitor:
    """Probes the cluster every ``interval`` seconds in a background task.

    Keeps the last :class:`ClusterStats`, logs health changes, logs the probe's problems (a
    refused credential or command) at WARNING when they change (not at every probe), asks the
    backend to re-read the slot map when the set of primaries changes (a failover the client
    has not hit yet), and lets the open breaker of a node that answers again probe at once.
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
        self._problems: list[str] = []  # as last logged

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
            log("cluster health %s -> %s%s", previous.health, stats.health, _uncovered(stats))
        if stats.problems != self._problems:
            if stats.problems:
                logger.warning("health probe incomplete: %s", "; ".join(stats.problems))
            else:
                logger.info("health probe complete again: no node refuses anything")
            self._problems = stats.problems
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


def can_serve(stats: ClusterStats) -> bool:
    """Readiness (``resilient-cache health --ready``): the cluster accepts queries
    (``cluster_state:ok``, which a degraded cluster, or one that lost a shard while
    ``cluster-require-full-coverage`` is ``no``, still is) and some primary answers."""
    return stats.cluster_state == "ok" and any(
        node.role == "primary" and node.status == "connected" for node in stats.nodes
    )


def _uncovered(stats: ClusterStats) -> str:
    """``; 5461 slots (10923-16383) have no serving node (lost: 127.0.0.1:7002)``, or ``""``."""
    if not stats.uncovered_slots:
        return ""
    lost = f" (lost: {', '.join(stats.unserved_shards)})" if stats.unserved_shards else ""
    return (
        f"; {stats.uncovered_slots} slots ({format_ranges(stats.uncovered_ranges)}) have no "
        f"serving node{lost}"
    )


def format_stats(stats: ClusterStats) -> str:
    """A small human-readable table of :class:`~resilient_cache.health.ClusterStats`, each
    node's ``error`` at the end of its row, the uncovered slots and the ``problems`` below."""
    lines = [
        f"health: {stats.health}   cluster_state: {stats.cluster_state}",
        f"nodes: {stats.connected_nodes}/{stats.total_nodes} connected, "
        f"{stats.primary_nodes} primaries, {stats.replica_nodes} replicas",
    ]
    if stats.uncovered_slots:
        lines.append(
            f"uncovered slots: {stats.uncovered_slots} "
            f"({format_ranges(stats.uncovered_ranges)}); unserved shards: "
            f"{', '.join(stats.unserved_shards) or 'none (the slots are not assigned)'}"
        )
    lines.append(f"{'node':<22}{'role':<9}{'status':<14}{'memory':<10}clients")
    for node in stats.nodes:
        clients = "-" if node.connected_clients is None else str(node.connected_clients)
        row = (
            f"{node.host + ':' + str(node.port):<22}{node.role:<9}{node.status:<14}"
            f"{node.used_memory_human or '-':<10}{clients}"
        )
        lines.append(f"{row:<62}  {node.error}" if node.error else row)
    if stats.problems:
        lines.append("problems:")
        lines.extend(f"  {problem}" for problem in stats.problems)
    return "\n".join(lines)
