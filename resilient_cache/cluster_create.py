"""Forming a Redis Cluster from empty nodes: ``resilient-cache cluster create``.

What :func:`create_cluster` does, in order, each wait against one deadline (``--timeout``):

1. waits until every address answers PING, saying which ones do not yet, and why;
2. asks each node for its view (``CLUSTER NODES``, ``CLUSTER INFO``, ``DBSIZE``) and decides:

   * **fresh**: every node is an empty primary with no slot, knowing no node outside the list
     (nodes a previous, interrupted run already introduced count as fresh): the cluster is formed;
   * **formed**: every node sees all 16384 slots assigned and knows every other listed node:
     nothing is changed; the command waits until the cluster checks out (as ``cluster check``)
     and exits 0, or 1 with what is still wrong;
   * anything else is **partly formed** (some slots assigned, a node alone next to a formed
     cluster, a node holding keys): refused with exit 4 and each node's state, never guessed at;

3. forms it: distinct config epochs (``CLUSTER SET-CONFIG-EPOCH``), ``CLUSTER MEET`` of every
   node with the first one, slots spread evenly over the primaries (``CLUSTER ADDSLOTSRANGE``),
   each replica attached to its primary (``CLUSTER REPLICATE``), a replica on another host than
   its primary whenever the addresses name more than one host;
4. waits until every node reports ``cluster_state:ok`` and all of them agree on the
   configuration, with each primary's replicas in place and in sync (able to take over).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence

import redis

from resilient_cache.cluster_admin import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    TOTAL_SLOTS,
    AdminError,
    AdminNode,
    ConnectionOptions,
    NodeView,
    Say,
    plural,
)
from resilient_cache.cluster_check import check_cluster
from resilient_cache.config_values import ClusterNode
from resilient_cache.slots import split_slots

__all__ = ["Plan", "create_cluster", "plan_cluster", "slot_ranges"]

PROGRESS_EVERY = 5.0  # seconds between two progress lines that say the same thing
PROGRESS_MIN = 1.0  # and between two that say something new
POLL_INTERVAL = 0.1


class Plan:
    """Which node is a primary with which slots, and which replicates which primary."""

    def __init__(
        self,
        primaries: list[ClusterNode],
        slots: list[tuple[int, int]],
        replicas: list[tuple[ClusterNode, ClusterNode]],
    ) -> None:
        self.primaries = primaries
        self.slots = slots
        self.replicas = replicas  # (replica, its primary)

    def describe(self) -> list[str]:
        lines = []
        for primary, (start, end) in zip(self.primaries, self.slots, strict=True):
            lines.append(f"  primary {primary}: slots {start}-{end} ({end - start + 1})")
        one_host = len({node.host.lower() for node in self.primaries}) == 1 and all(
            _same_host(replica, primary) for replica, primary in self.replicas
        )
        for replica, primary in self.replicas:
            same = _same_host(replica, primary) and not one_host
            lines.append(f"  replica {replica} of {primary}{' (same host)' * same}")
        if one_host:
            lines.append("  (every address names the same host: no replica can be elsewhere)")
        return lines


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """The 16384 slots in ``primaries`` contiguous ranges whose sizes differ by at most one."""
    return split_slots(primaries)


def plan_cluster(nodes: Sequence[ClusterNode], replicas: int) -> Plan:
    """Choose the primaries (spread over the hosts) and a primary for every other node.

    Nodes beyond ``primaries * (replicas + 1)`` become extra replicas. A replica goes on another
    host than its primary when one is left, taken from the host with the most nodes left.

    Raises:
        AdminError: fewer than three primaries would result, or an address is given twice.
    """
    if len(set(nodes)) != len(nodes):
        twice = sorted({str(n) for n in nodes if list(nodes).count(n) > 1})
        raise AdminError(f"an address is given twice: {', '.join(twice)}", EXIT_USAGE)
    count = len(nodes) // (replicas + 1)
    if count < 3:
        raise AdminError(
            f"{plural(len(nodes), 'address', 'addresses')} with --replicas {replicas} make "
            f"{plural(count, 'primary', 'primaries')}; a "
            f"Redis Cluster needs at least 3: give at least {3 * (replicas + 1)} addresses",
            EXIT_USAGE,
        )
    by_host: dict[str, list[ClusterNode]] = {}
    for node in nodes:
        by_host.setdefault(node.host.lower(), []).append(node)
    interleaved: list[ClusterNode] = []  # one node of each host in turn
    while any(by_host.values()):
        for group in by_host.values():
            if group:
                interleaved.append(group.pop(0))
    primaries, left = interleaved[:count], interleaved[count:]
    pairs: list[tuple[ClusterNode, ClusterNode]] = []
    turn = 0
    while left:
        primary = primaries[turn % count]
        turn += 1
        others = [n for n in left if n.host.lower() != primary.host.lower()]
        if others:
            hosts_left = {n.host.lower() for n in left}
            crowd = {h: sum(1 for n in left if n.host.lower() == h) for h in hosts_left}
            choice = max(others, key=lambda n: crowd[n.host.lower()])
        else:
            choice = left[0]
        left.remove(choice)
        pairs.append((choice, primary))
    # Greedy choices can leave the last primary with only its own host: swap replicas between
    # two pairs while that separates a replica from its primary's host and breaks no other pair.
    swapped = True
    while swapped:
        swapped = False
        for i, (replica, primary) in enumerate(pairs):
            if not _same_host(replica, primary):
                continue
            for j, (other_replica, other_primary) in enumerate(pairs):
                if not _same_host(replica, other_primary) and not _same_host(
                    other_replica, primary
                ):
                    pairs[i], pairs[j] = (other_replica, primary), (replica, other_primary)
                    swapped = True
                    break
    return Plan(primaries, slot_ranges(count), pairs)


def _same_host(a: ClusterNode, b: ClusterNode) -> bool:
    return a.host.lower() == b.host.lower()


class _Clock:
    """One deadline for the whole command, and the timestamped progress lines."""

    def __init__(self, timeout: float, say: Say) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timeout = timeout
        self.say = say

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def line(self, text: str) -> None:
        self.say(f"[{self.elapsed():5.1f}s] {text}")

    def wait(
        self, what: str, problems_fn: Callable[[], list[str]], interval: float = POLL_INTERVAL
    ) -> list[str]:
        """Poll ``problems_fn`` until it returns no problem or the deadline passes.

        Prints what is still missing when it changes, and at most every few seconds when it
        does not; a node that stops answering meanwhile is one more problem, not an end.
        Returns the problems left at the deadline ([] when done).
        """
        shown: list[str] | None = None
        shown_at = 0.0
        while True:
            try:
                problems = problems_fn()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
                problems = [f"{type(err).__name__}: {' '.join(str(err).split())}"]
            if not problems:
                return []
            if self.expired():
                return problems
            now = time.monotonic()
            changed = problems != shown and now - shown_at >= PROGRESS_MIN
            if shown is None or changed or now - shown_at >= PROGRESS_EVERY:
                head = "; ".join(problems[:3]) + (
                    f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                )
                self.line(f"waiting for {what} ({self.timeout - self.elapsed():.0f}s left): {head}")
                shown, shown_at = problems, now
            time.sleep(interval)


def _meet_ip(node: AdminNode, view: NodeView) -> str:
    """The IP the other nodes can reach ``node`` at: the one it announces, else the resolved one."""
    if view.myself.host:
        return view.myself.host
    try:
        info = socket.getaddrinfo(node.host, node.port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise AdminError(
            f"{node.address}: cannot resolve {node.host!r}: {err}", EXIT_PROBLEMS
        ) from None
    return str(info[0][4][0])


def _node_state(view: NodeView, ids: set[str]) -> str | None:
    """None for a fresh node, else what makes it not fresh."""
    me = view.myself
    reasons = []
    if view.slots_assigned:
        reasons.append(f"sees {plural(view.slots_assigned, 'slot')} assigned")
    if not me.is_primary:
        reasons.append(f"is a replica of {(me.master_id or '?')[:8]}")
    strangers = view.known_ids - ids
    if strangers:
        reasons.append(f"knows {plural(len(strangers), 'node')} not in the list")
    if view.keys:
        reasons.append(f"holds {plural(view.keys, 'key')}")
    return ", ".join(reasons) or None


def create_cluster(
    addresses: Sequence[ClusterNode],
    options: ConnectionOptions,
    *,
    replicas: int = 1,
    timeout: float = 300.0,
    say: Say = print,
) -> int:
    """Form (or find formed) a cluster of ``addresses``; the CLI's exit code.

    Raises:
        AdminError: bad arguments or credentials (EXIT_USAGE), nodes unreachable within
            ``timeout`` (EXIT_UNREACHABLE), a partly formed cluster (EXIT_REFUSED).
    """
    plan = plan_cluster(addresses, replicas)
    clock = _Clock(timeout, say)
    nodes = {address: AdminNode(address, options) for address in addresses}
    try:
        clock.line(
            f"waiting for {plural(len(nodes), 'node')} to answer PING ({options.describe()})"
        )

        def not_answering() -> list[str]:
            return [f"{n.address}: {why}" for n in nodes.values() if (why := n.ping()) is not None]

        left = clock.wait("every node to answer PING", not_answering)
        if left:
            raise AdminError(
                f"{plural(len(left), 'node')} did not answer within {timeout:g}s: "
                + "; ".join(left),
                EXIT_UNREACHABLE,
            )
        clock.line(f"all {len(nodes)} nodes answer")
        views = {address: nodes[address].view(with_keys=True) for address in addresses}
        by_id: dict[str, ClusterNode] = {}
        for address, view in views.items():
            other = by_id.setdefault(view.myself.id, address)
            if other != address:
                raise AdminError(f"{other} and {address} are the same node", EXIT_USAGE)
        ids = set(by_id)
        states = {address: _node_state(view, ids) for address, view in views.items()}
        if all(state is None for state in states.values()):
            _form(plan, nodes, views, clock)
        elif all(v.slots_assigned == TOTAL_SLOTS and ids <= v.known_ids for v in views.values()):
            clock.line(
                "these nodes already form a cluster (every slot assigned, every node known to "
                "every other): nothing is changed, checking it"
            )
        else:
            detail = "".join(
                f"\n  {address}: {state or 'fresh (an empty primary, no slot assigned)'}"
                for address, state in states.items()
            )
            raise AdminError(
                "refusing to create: the nodes are neither all fresh nor one formed cluster "
                f"(a partly formed cluster, or data on a node):{detail}\nNothing was changed. "
                "Inspect with 'resilient-cache cluster check', then repair by hand (CLUSTER "
                "MEET / ADDSLOTSRANGE / REPLICATE), or start again from empty nodes.",
                EXIT_REFUSED,
            )
        return _wait_checked(addresses, options, replicas, clock)
    finally:
        for node in nodes.values():
            node.close()


def _form(
    plan: Plan,
    nodes: dict[ClusterNode, AdminNode],
    views: dict[ClusterNode, NodeView],
    clock: _Clock,
) -> None:
    clock.line(
        f"forming a cluster of {len(nodes)} nodes: {len(plan.primaries)} primaries, "
        f"{plural(len(plan.replicas), 'replica')}"
    )
    for line in plan.describe():
        clock.say(line)
    ids = {address: view.myself.id for address, view in views.items()}
    # Distinct config epochs up front (as redis-cli does), so that no epoch collision has to be
    # resolved by gossip afterwards. Only a node alone with epoch 0 accepts it.
    for epoch, (address, view) in enumerate(views.items(), 1):
        if len(view.entries) == 1 and view.myself.config_epoch == 0:
            nodes[address].call("CLUSTER", "SET-CONFIG-EPOCH", epoch)
    first, *others = list(nodes)
    ip, bus = _meet_ip(nodes[first], views[first]), views[first].myself.bus_port
    for address in others:
        if ids[first] not in views[address].known_ids:
            nodes[address].call("CLUSTER", "MEET", ip, first.port, bus)
    at = "" if ip == first.host else f" at {ip}:{first.port}"
    clock.line(f"CLUSTER MEET sent: every node meets {first}{at}")

    def strangers() -> list[str]:
        problems = []
        for address, node in nodes.items():
            view = node.view()
            handshaking = [e for e in view.entries if {"handshake", "noaddr"} & e.flags]
            if set(ids.values()) - view.known_ids or handshaking:
                problems.append(f"{address} knows {len(view.entries)} of {len(ids)}")
        return problems

    left = clock.wait("the nodes to know each other", strangers)
    if left:
        raise AdminError("the nodes did not all meet in time: " + "; ".join(left), EXIT_PROBLEMS)
    clock.line("every node knows every other")
    for primary, (start, end) in zip(plan.primaries, plan.slots, strict=True):
        nodes[primary].call("CLUSTER", "ADDSLOTSRANGE", start, end)
    clock.line(f"slots assigned to {len(plan.primaries)} primaries")
    for replica, primary in plan.replicas:
        nodes[replica].call("CLUSTER", "REPLICATE", ids[primary])
    clock.line(f"{plural(len(plan.replicas), 'replica')} attached")


def _wait_checked(
    addresses: Sequence[ClusterNode], options: ConnectionOptions, replicas: int, clock: _Clock
) -> int:
    """Wait until ``cluster check`` finds nothing; print its report either way."""
    report = None

    def problems() -> list[str]:
        nonlocal report
        try:
            report = check_cluster(addresses, options, min_replicas=replicas)
        except AdminError as err:
            if err.exit_code != EXIT_UNREACHABLE:
                raise
            return [str(err)]  # a moment when no node answers: wait on
        return report.problems

    # Each poll opens a connection per node: every half second is often enough.
    what = "cluster_state:ok on every node, one configuration, replicas in sync"
    left = clock.wait(what, problems, 0.5)
    if report is None:
        raise AdminError(f"no node answered within {clock.timeout:g}s", EXIT_UNREACHABLE)
    clock.say(report.text())
    if left:
        clock.line(f"the cluster did not check out within {clock.timeout:g}s")
        return EXIT_PROBLEMS
    clock.line("cluster ready")
    return EXIT_OK
