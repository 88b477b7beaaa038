"""Faults injected on purpose (kill, pause, resume), and waiting for the failover after one.

Before a node is hurt, :class:`Faults` records the slots it serves, because
:meth:`Faults.wait_failover` needs them even if the failover finishes before
anyone asks.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time

import redis

from .admin import Admin
from .errors import DevClusterError
from .node import DevNode
from .processes import process_alive, signal_node, signal_quietly
from .roster import Roster
from .topology import SlotMap, format_ranges
from .waits import poll_until, wait_for

__all__ = ["Faults"]

logger = logging.getLogger("resilient_cache.devcluster")

_TERMINATING_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


class Faults:
    """Signals to the servers of one cluster, and the slots each served before its fault."""

    def __init__(self, roster: Roster, admin: Admin) -> None:
        self._roster = roster
        self._admin = admin
        # Slot ranges a node served just before kill()/pause(), for wait_failover().
        self._slots_before_fault: dict[int, list[int]] = {}

    def kill(self, node: DevNode, sig: int, timeout: float) -> None:
        """See :meth:`DevCluster.kill`."""
        node = self._roster.own(node)
        self._remember_slots(node)
        logger.info("sending %s to %s (pid %d)", signal.Signals(sig).name, node.address, node.pid)
        signal_node(node, sig)
        if sig not in _TERMINATING_SIGNALS:
            return
        if node.port in self._roster.paused:
            # A stopped process only acts on SIGKILL; let it handle the others.
            signal_quietly(node, signal.SIGCONT)
            self._roster.paused.discard(node.port)
        self._admin.drop(node)
        wait_for(lambda: not process_alive(node), timeout, f"{node.address} to exit")

    def pause(self, node: DevNode) -> None:
        """See :meth:`DevCluster.pause`."""
        node = self._roster.own(node)
        self._remember_slots(node)
        logger.info("pausing %s (pid %d)", node.address, node.pid)
        signal_node(node, signal.SIGSTOP)
        self._roster.paused.add(node.port)

    def resume(self, node: DevNode) -> None:
        """See :meth:`DevCluster.resume`."""
        node = self._roster.own(node)
        logger.info("resuming %s (pid %d)", node.address, node.pid)
        signal_node(node, signal.SIGCONT)
        self._roster.paused.discard(node.port)

    def forget(self, node: DevNode) -> None:
        """Clear what is known of ``node``'s fault, before it is started again."""
        self._roster.paused.discard(node.port)
        self._slots_before_fault.pop(node.port, None)
        self._admin.drop(node)

    def _remember_slots(self, node: DevNode) -> None:
        for observer in self._roster.live():
            if observer is node:
                continue
            with contextlib.suppress(redis.RedisError):
                owners = self._admin.slot_owners(observer)
                self._slots_before_fault[node.port] = [
                    slot for slot, port in enumerate(owners) if port == node.port
                ]
                return

    def _slots_served_by(self, node: DevNode, last_slot_map: SlotMap | None) -> list[int]:
        # Prefer what we recorded just before the fault, since by now the slots may
        # already have moved; then what a live node says now; then the last ready map.
        if node.port in self._slots_before_fault:
            return self._slots_before_fault[node.port]
        for observer in self._roster.live():
            if observer is node:
                continue
            with contextlib.suppress(redis.RedisError):
                owners = self._admin.slot_owners(observer)
                return [slot for slot, port in enumerate(owners) if port == node.port]
        if last_slot_map is not None:
            return [slot for slot, port in enumerate(last_slot_map) if port == node.port]
        return []

    def wait_failover(
        self, old_primary: DevNode, timeout: float, last_slot_map: SlotMap | None
    ) -> DevNode:
        """See :meth:`DevCluster.wait_failover`; ``last_slot_map`` is from the last ready check."""
        old = self._roster.own(old_primary)
        slots = self._slots_served_by(old, last_slot_map)
        if not slots:
            raise DevClusterError(
                f"{old.address} served no slots, so there is nothing to fail over "
                "(is it a replica, or did the failover already happen?)"
            )
        new_owner: list[int] = []

        def problems() -> list[str]:
            found, owner = self._failover_problems(old, slots)
            new_owner[:] = owner
            return found

        began = time.monotonic()
        poll_until(problems, timeout, f"failover away from {old.address}")
        winner = self._roster.by_port(new_owner[0])
        logger.info(
            "failover: %s took over from %s (%.2fs of waiting)",
            winner.address,
            old.address,
            time.monotonic() - began,
        )
        self._slots_before_fault.pop(old.port, None)
        return winner

    def _failover_problems(self, old: DevNode, slots: list[int]) -> tuple[list[str], list[int]]:
        """What still keeps ``slots`` from a live new primary, and the port serving slots[0]."""
        observers = [node for node in self._roster.live() if node is not old]
        if not observers:
            return ["no other node is running"], []
        found: list[str] = []
        new_owner: list[int] = []
        for observer in observers:
            try:
                state = self._admin.cluster_info(observer).get("cluster_state")
                owners = self._admin.slot_owners(observer)
            except redis.RedisError as exc:
                found.append(f"{observer.address}: does not answer ({exc})")
                continue
            if state != "ok":
                found.append(f"{observer.address}: cluster_state:{state}")
            stale = [s for s in slots if owners[s] == old.port or owners[s] is None]
            if stale:
                found.append(
                    f"{observer.address} still routes slots {format_ranges(stale)} "
                    f"to {old.address} or nowhere"
                )
                continue
            for port in {owners[s] for s in slots}:
                assert port is not None
                candidate = self._roster.by_port(port)
                if not self._roster.is_live(candidate):
                    found.append(f"{observer.address} routes to {candidate.address}, not live")
                    continue
                try:
                    role = self._admin.role(candidate)[0]
                except redis.RedisError as exc:
                    found.append(f"{candidate.address}: does not answer ({exc})")
                    continue
                if role != "master":
                    found.append(f"{candidate.address} serves the slots but is a {role}")
            new_owner = [p for p in (owners[slots[0]],) if p is not None]
        return found, new_owner
