"""``resilient-cache cluster check``: every node of a Redis Cluster asked for its own view.

:func:`check_cluster` starts from a seed (the first given address that answers), asks every node
the seed knows for its ``CLUSTER NODES``, ``CLUSTER INFO`` and ``INFO replication``, and reports:

* slots that no live primary serves, in the view of each node (grouped when views agree);
* open slots (``migrating`` / ``importing``), which an unfinished resharding leaves behind;
* nodes that disagree with the seed on the slot map, on the set of nodes, on who replicates
  whom, or on a primary's config epoch;
* nodes that do not answer, that are flagged as failing, or whose ``cluster_state`` is not ok;
* replicas whose replication link to their primary is not up (``master_link_status``);
* each primary's replicas (fewer than ``min_replicas`` is a problem).

It never changes anything. ``cluster create`` polls the same check until it passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import redis

from resilient_cache.cluster_admin import (
    EXIT_UNREACHABLE,
    TOTAL_SLOTS,
    AdminError,
    AdminNode,
    ConnectionOptions,
    NodeEntry,
    NodeView,
    describe_error,
    format_slots,
    plural,
)
from resilient_cache.config_values import ClusterNode

__all__ = ["CheckReport", "check_cluster", "collect_views"]


def _slot_text(entry: NodeEntry) -> str:
    ranges = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in entry.slots) or "none"
    return f"slots {ranges} ({entry.slot_count})"


@dataclasses.dataclass
class CheckReport:
    """What :func:`check_cluster` found: a readable description, problems and notes."""

    seed: str
    lines: list[str]
    problems: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = list(self.lines)
        out += [f"PROBLEM {problem}" for problem in self.problems]
        out += [f"note    {note}" for note in self.notes]
        verdict = "ok" if self.ok else f"{plural(len(self.problems), 'problem')} found"
        out.append(f"cluster check: {verdict}")
        return "\n".join(out)


def _first_answering(
    seeds: Sequence[ClusterNode], options: ConnectionOptions
) -> tuple[AdminNode, NodeView]:
    errors = []
    for seed in seeds:
        node = AdminNode(seed, options)
        try:
            return node, node.view()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
            node.close()
            errors.append(f"{node.address}: {describe_error(err)}")
        except BaseException:
            node.close()
            raise
    raise AdminError("no node answered: " + "; ".join(errors), EXIT_UNREACHABLE)


def collect_views(
    seeds: Sequence[ClusterNode], options: ConnectionOptions
) -> tuple[NodeView, dict[str, NodeView], list[str]]:
    """The seed's view, every reachable node's own view (by id), and the problems met."""
    seed_node, seed_view = _first_answering(seeds, options)
    seed_node.close()
    views = {seed_view.myself.id: seed_view}
    problems = []
    for entry in seed_view.entries:
        if entry.id in views:
            continue
        if not entry.host or {"noaddr", "handshake"} & entry.flags:
            problems.append(f"node {entry.id[:8]} has no usable address ({','.join(entry.flags)})")
            continue
        node = AdminNode(ClusterNode(entry.host, entry.port), options)
        try:
            view = node.view()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
            problems.append(
                f"{entry.address} ({entry.id[:8]}) does not answer: {describe_error(err)}"
            )
            continue
        finally:
            node.close()
        if view.myself.id != entry.id:
            problems.append(
                f"{entry.address} is node {view.myself.id[:8]}, but {seed_view.address} "
                f"knows it as {entry.id[:8]}"
            )
            continue
        views[entry.id] = view
    return seed_view, views, problems


def _name(view: NodeView, node_id: str | None) -> str:
    entry = view.entry(node_id) if node_id else None
    return entry.address if entry is not None else (node_id or "nobody")[:8]


def _topology_lines(seed: NodeView, min_replicas: int) -> tuple[list[str], list[str], list[str]]:
    lines, problems, notes = [], [], []
    primaries = sorted(
        (e for e in seed.entries if e.is_primary), key=lambda e: e.slots or ((TOTAL_SLOTS, 0),)
    )
    replicas = [e for e in seed.entries if not e.is_primary]
    lines.append(
        f"cluster seen from {seed.address}: {plural(len(seed.entries), 'node')}, "
        f"{plural(len(primaries), 'primary', 'primaries')}, {plural(len(replicas), 'replica')}"
    )
    for primary in primaries:
        mine = [r for r in replicas if r.master_id == primary.id]
        live = [r for r in mine if not r.failing]
        state = " FAILING" if primary.failing else ""
        names = ", ".join(r.address + (" (failing)" if r.failing else "") for r in mine)
        lines.append(
            f"  primary {primary.address} {primary.id[:8]}{state}: {_slot_text(primary)}, "
            f"config epoch {primary.config_epoch}, {plural(len(live), 'replica')}"
            + (f": {names}" if names else "")
        )
        if not primary.slots:
            notes.append(f"primary {primary.address} holds no slots")
        elif len(live) < min_replicas:
            problems.append(
                f"primary {primary.address} has {plural(len(live), 'live replica')}, fewer "
                f"than {min_replicas}"
            )
        elif not live:
            notes.append(f"primary {primary.address} has no replica: losing it loses its slots")
    for replica in replicas:
        if replica.master_id not in {p.id for p in primaries}:
            problems.append(
                f"replica {replica.address} replicates {(replica.master_id or '?')[:8]}, "
                "which is not a known primary"
            )
    return lines, problems, notes


def _disagreements(seed: NodeView, view: NodeView) -> list[str]:
    if view is seed:
        return []
    found = []
    mine, theirs = seed.owners(), view.owners()
    differ = [slot for slot in range(TOTAL_SLOTS) if mine[slot] != theirs[slot]]
    if differ:
        slot = differ[0]
        found.append(
            f"{view.address} disagrees with {seed.address} on {plural(len(differ), 'slot')} "
            f"({format_slots(differ, 3)}); slot {slot}: {seed.address} says "
            f"{_name(seed, mine[slot])}, {view.address} says {_name(view, theirs[slot])}"
        )
    missing, extra = seed.known_ids - view.known_ids, view.known_ids - seed.known_ids
    if missing or extra:
        found.append(
            f"{view.address} knows {plural(len(view.entries), 'node')}, {seed.address} "
            f"{len(seed.entries)}" + (f"; it does not know {len(missing)}" if missing else "")
        )
    for entry in view.entries:
        other = seed.entry(entry.id)
        if other is None:
            continue
        if entry.master_id != other.master_id or entry.is_primary != other.is_primary:
            found.append(
                f"{view.address} and {seed.address} disagree on the role of {other.address}"
            )
        elif entry.is_primary and entry.config_epoch != other.config_epoch:
            found.append(
                f"{view.address} and {seed.address} disagree on the config epoch of "
                f"{other.address} ({entry.config_epoch} vs {other.config_epoch})"
            )
    return found


def check_cluster(
    seeds: Sequence[ClusterNode], options: ConnectionOptions, *, min_replicas: int = 0
) -> CheckReport:
    """Ask every node of the cluster ``seeds`` belong to; report what is wrong.

    Raises:
        AdminError: no seed answered (EXIT_UNREACHABLE), credentials refused or a node not in
            cluster mode (EXIT_USAGE).
    """
    seed, views, problems = collect_views(seeds, options)
    lines, replica_problems, notes = _topology_lines(seed, min_replicas)
    for entry in seed.entries:
        if entry.failing:
            problems.append(f"{seed.address} flags {entry.address} as failing (fail)")
        elif entry.suspected:
            problems.append(f"{seed.address} suspects {entry.address} is failing (fail?)")
    by_state: dict[str, list[str]] = {}
    for view in views.values():
        by_state.setdefault(view.info.get("cluster_state", "?"), []).append(view.address)
    for state, where in by_state.items():
        if state != "ok":
            problems.append(f"cluster_state:{state} on {', '.join(where)}")
    for view in views.values():
        link = view.replication.get("master_link_status", "up")
        if not view.myself.is_primary and link != "up":
            primary = _name(view, view.myself.master_id)
            problems.append(
                f"replica {view.address} is not in sync with {primary} (master_link_status:"
                f"{link}): it could not take over yet"
            )
    by_slots: dict[tuple[int, ...], list[str]] = {}
    for view in views.values():
        missing = tuple(view.uncovered())
        if missing:
            by_slots.setdefault(missing, []).append(view.address)
    for missing, where in by_slots.items():
        problems.append(
            f"{plural(len(missing), 'slot')} not covered: {format_slots(missing)} "
            f"(according to {', '.join(where)})"
        )
    if not by_slots:
        lines.append(f"all {TOTAL_SLOTS} slots are covered")
    open_slots = []
    for view in views.values():
        me = view.myself
        open_slots += [
            f"slot {slot} is migrating from {me.address} to {_name(view, to)}"
            for slot, to in me.migrating
        ]
        open_slots += [
            f"slot {slot} is importing into {me.address} from {_name(view, source)}"
            for slot, source in me.importing
        ]
    problems += [f"{text} (an open slot: finish or cancel the resharding)" for text in open_slots]
    if not open_slots:
        lines.append("no slot is open (migrating or importing)")
    disagreements = [text for view in views.values() for text in _disagreements(seed, view)]
    problems += disagreements
    if not disagreements:
        lines.append(
            f"the {plural(len(views), 'node')} that answered agree on the slot map, the nodes, the "
            "replicas and the config epochs"
        )
    problems += replica_problems
    return CheckReport(seed.address, lines, problems, notes)
