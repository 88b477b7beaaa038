"""What the redis-py cluster backend does for reads routed to replicas: list a command's slot
nodes for the routing stage, and pin a batch's commands to their nodes.

Apart from :mod:`.redis_py` to keep that module about sending commands; the slot map is
read through :func:`._redis_py_compat.slot_nodes_of`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from resilient_cache.backends._redis_py_compat import slot_nodes_of, use_lifo_pools
from resilient_cache.pipeline import BATCH_NAMES, TRANSACTION, Command, NodeRef


def slot_nodes_for(
    nodes_manager: Any, slot_of: Callable[[Any], int], command: Command
) -> Sequence[NodeRef] | None:
    """``Backend.slot_nodes()``: the nodes of the one slot of ``command``'s keys, primary first
    (redis-py's own list, not a copy), or None when the command has no single slot, names its
    nodes (``target_nodes=``, in a batch too) or is a transaction (redis-py sends those to
    the primary)."""
    keys = command.keys
    if not keys or "target_nodes" in command.options:
        return None
    name = command.name
    if name in BATCH_NAMES:
        if name == TRANSACTION or any("target_nodes" in part[1] for part in command.args):
            return None
        slots = command.options.get("slots") or {slot_of(key) for key in keys}
        if len(slots) != 1:
            return None
        (slot,) = slots
    else:
        slot = slot_of(keys[0])
        for key in keys[1:]:
            if slot_of(key) != slot:
                return None
    nodes = slot_nodes_of(nodes_manager, slot)
    if nodes is None:
        return None
    use_lifo_pools(nodes)  # for a node redis-py discovered on its own (a no-op for others)
    return cast(Sequence[NodeRef], nodes)


def pin_batch(
    command: Command,
    node_for_slot: Callable[[int], NodeRef | None],
    slot_of: Callable[[Any], int],
) -> Command:
    """A copy of the batch ``command`` whose commands each name their node (``target_nodes``).

    With replica reads on, redis-py's pipeline spreads the reads of a batch over the replicas
    itself (its load-balancing strategy), past routing's choice, the replica health rules and
    ``primary_reads()``. Pinned, they go to the node routing chose for the batch, or (a batch
    over several slots) each to its slot's primary. Commands that name a node keep it."""
    parts = []
    for args, options in command.args:
        if "target_nodes" not in options:
            node: Any = command.node
            if node is None:
                keys = Command.from_call(args, options).keys
                node = node_for_slot(slot_of(keys[0])) if keys else None
            if node is not None:
                options = {**options, "target_nodes": node}
        parts.append((args, options))
    pinned = Command(command.name, tuple(parts), command.options, keys=command.keys)
    pinned.read_only, pinned.idempotent = command.read_only, command.idempotent
    pinned.node = command.node
    return pinned
