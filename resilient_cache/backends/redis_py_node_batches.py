"""``client.pipeline()`` per node, for the redis-py cluster backend.

A pipeline whose commands each have one node is split by node (:func:`node_batches`, which
the client calls); each node's share goes through the stages as a batch Command of its own
(routed to that node, guarded by its breaker, retried, traced and counted as one), and the
backend writes it with :func:`send_node_batch`: one write on one connection, replies matched
in order, by the auto-pipeline writer (:meth:`AutoPipeline.send_together`).

Failure rules, per command, the same as auto-pipelining's:

- an error reply is its command's only, at its position in the whole pipeline;
- MOVED, ASK, TRYAGAIN and CLUSTERDOWN send that command again alone, the usual way;
- a connection that could not be opened, or broke before every reply came, or a refusal a
  later attempt may get past (CLUSTERDOWN, TRYAGAIN, READONLY, LOADING after those resends)
  raises :class:`PipelineInterruptedError`: the replies that came, an error for each command
  that got none, and ``may_have_run`` for the batch. The retry stage repeats an idempotent batch
  whole; for any other it raises ``CommandInDoubtError``, and the client then keeps the
  replies that came, sends the idempotent commands again (and those never written), and
  marks the others in doubt at their positions (resilient_cache/batch.py).

A pipeline with a command that has no single node (no key, ``target_nodes=``, keys in
several slots, a slot map not read yet) or that must not share a write (``NEVER_BATCHED``:
blocking, ``WATCH``/``MULTI``, pub/sub) is not split: it goes whole through redis-py's own
pipeline, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from redis.exceptions import BusyLoadingError, ClusterDownError, ReadOnlyError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resilient_cache.backends.redis_py_autopipeline import NEVER_BATCHED, AutoPipeline
from resilient_cache.backends.redis_py_errors import translate_redis_py_error
from resilient_cache.batch import NODE_BATCH, POSITIONS
from resilient_cache.errors import PipelineInterruptedError
from resilient_cache.pipeline import Command, NodeRef

__all__ = ["NODE_BATCH", "NodeBatch", "node_batches", "send_node_batch"]


class NodeBatch(NamedTuple):
    """One node's share of a pipeline: the commands' indexes in it (from 0), in order, the
    hash slots of their keys (so routing need not hash them again), and the commands as
    Commands (so the client need not parse them again)."""

    indexes: list[int]
    slots: frozenset[int]
    parts: list[Command]


def node_batches(
    commands: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
    route: Callable[[Command], NodeRef | None],
    slot_of: Callable[[Any], int],
) -> list[NodeBatch] | None:
    """``commands`` (``(args, options)`` each) grouped by the primary serving their slot, or
    ``None`` when one of them has no single node or must not share a write."""
    groups: dict[str, tuple[list[int], set[int], list[Command]]] = {}
    for index, (args, options) in enumerate(commands):
        if "target_nodes" in options:
            return None
        part = Command.from_call(args, options)
        if part.name in NEVER_BATCHED or not part.keys:
            return None
        try:
            node = route(part)  # None: keys in several slots, or no slot map yet
            slot = slot_of(part.keys[0])
        except Exception:  # a key redis-py cannot encode: its pipeline reports it, in place
            return None
        if node is None:
            return None
        indexes, slots, parts = groups.setdefault(node.name, ([], set(), []))
        indexes.append(index)
        slots.add(slot)
        parts.append(part)
    return [
        NodeBatch(indexes, frozenset(slots), parts) for indexes, slots, parts in groups.values()
    ]


#: A command's failure in a node batch that is no answer to it: a broken connection (it may
#: have run), or a refusal that proves it did not run and that a later attempt may get past (a
#: failover or a slot migration under way, a demoted primary, a full pool). The retry stage
#: retries these for a command sent alone; in a batch they are left to it too, through
#: PipelineInterruptedError. Any other error (WRONGTYPE, ...) is the command's answer.
_NOT_ANSWERED = (RedisConnectionError, RedisTimeoutError)
_REFUSED_BEFORE_RUNNING = (ClusterDownError, TryAgainError, ReadOnlyError, BusyLoadingError)


def unanswered(outcome: Any) -> bool:
    """Whether ``outcome``, a command's in a node batch, is no answer (see above). A refusal
    is marked ``may_have_run = False`` on the way, for the client to read."""
    if isinstance(outcome, _REFUSED_BEFORE_RUNNING):
        outcome.may_have_run = False  # type: ignore[union-attr]
        return True
    return isinstance(outcome, _NOT_ANSWERED)


async def send_node_batch(
    writer: AutoPipeline, command: Command, username: str | None, refresh: Callable[[], None]
) -> Any:
    """Write the node batch ``command`` to ``command.node`` (see the module's docstring): the
    replies, in order, with error replies in place; the first error reply raised instead when
    the caller asked for that (``raise_on_error``). ``refresh()`` asks for a re-read of the
    slot map."""
    node = command.node
    positions: Sequence[int] = command.options[POSITIONS]
    parts = [Command.from_call(args, options) for args, options in command.args]
    index_of = {id(part): index for index, part in enumerate(parts)}
    for part in parts:
        part.node = node

    def translate(part: Command, err: Exception, node_name: str | None) -> Exception:
        # Told as the failure of command #n of the pipeline, never with its arguments.
        return translate_redis_py_error(
            command, err, node_name, arguments=part.args, name=part.name,
            position=positions[index_of[id(part)]], username=username,
        )  # fmt: skip

    outcomes = await writer.send_together(node, parts, translate)
    missing = [index for index, outcome in enumerate(outcomes) if unanswered(outcome)]
    if missing:
        failed = [outcomes[index] for index in missing]
        if len(missing) == len(outcomes) and not any(
            getattr(outcome, "may_have_run", True) for outcome in failed
        ):
            # Nothing answered and nothing can have run (a full pool, a refused connection):
            # the batch failed as one command would, with the same error, which the retry
            # stage and the breaker read as they do for one command.
            raise failed[0]
        if any(isinstance(outcome, ReadOnlyError) for outcome in failed):
            refresh()  # a demoted primary: the slot map is out of date
        # Any command answered has run; an unanswered one may have, unless it was refused or
        # never sent.
        may_have_run = len(missing) < len(outcomes) or any(
            getattr(outcome, "may_have_run", True) for outcome in failed
        )
        interrupted = PipelineInterruptedError(
            command.name,
            getattr(node, "name", None),
            outcomes,
            missing,
            may_have_run=may_have_run,
            cause=type(failed[0]).__name__,
        )
        interrupted.__cause__ = failed[0]
        raise interrupted
    if command.options.get("raise_on_error"):
        first = next((outcome for outcome in outcomes if isinstance(outcome, Exception)), None)
        if first is not None:
            raise first
    return outcomes
