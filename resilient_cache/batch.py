"""``client.pipeline()``: many commands sent together.

The buffered commands travel as batch :class:`~resilient_cache.pipeline.Command` objects named
``PIPELINE`` (or ``MULTI`` for a transaction) whose ``args`` are the ``(args, options)`` of
each command. A batch is traced as one span with its length, counted once, bounded by one
deadline, guarded by one breaker, and retried whole only if every command in it is safe to
repeat.

On a cluster, a pipeline is split into one batch per node when every command has one node
(the backend's ``node_batches()``): the batches go through the stages side by side, so a node
that fails fails its own commands only, and the backend writes each on one connection with the
same per-command failure rules as auto-pipelining (docs/architecture.md, "Batches").
Otherwise (a transaction, a command without a single node, another backend) the pipeline is
one batch, sent with redis-py's own pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal, Protocol

from redis.commands.cluster import AsyncRedisClusterCommands

from resilient_cache.errors import CommandInDoubtError, PipelineInterruptedError
from resilient_cache.pipeline import (
    BATCH_NAMES,
    PIPELINE,
    TRANSACTION,
    Command,
    Handler,
    batch_command,
)

__all__ = [
    "BATCH_NAMES",
    "NODE_BATCH",
    "PIPELINE",
    "POSITIONS",
    "TRANSACTION",
    "ClientPipeline",
    "batch_command",
]

#: Option of a batch Command that is one node's share of a pipeline: the backend writes it to
#: the node routing chose for it.
NODE_BATCH = "node_batch"
#: Option of such a batch: each command's position in the whole pipeline (from 1), for errors.
POSITIONS = "positions"

Buffered = Sequence[tuple[tuple[Any, ...], dict[str, Any]]]


class NodeShare(Protocol):
    """What a backend's ``node_batches()`` returns per node (redis_py_node_batches.NodeBatch):
    the commands' indexes in the pipeline, their slots, and each one as a Command."""

    @property
    def indexes(self) -> list[int]: ...
    @property
    def slots(self) -> frozenset[int]: ...
    @property
    def parts(self) -> list[Command]: ...


#: A backend's ``node_batches(commands)``: the pipeline's commands grouped by node, or ``None``.
SplitByNode = Callable[[Buffered], Sequence[NodeShare] | None]


class ClientPipeline(AsyncRedisClusterCommands):
    """Buffers commands (the whole redis-py command API) until :meth:`execute`.

    ``async with client.pipeline() as pipe: pipe.set("a", 1).incr("b"); await pipe.execute()``.
    A transaction (``transaction=True``) needs all its keys in one slot on a cluster.
    """

    _is_async_client: Literal[True] = True

    def __init__(
        self,
        submit: Handler,
        transaction: bool,
        *,
        encoder: Any,
        event_dispatcher: Any,
        split: SplitByNode | None = None,
    ) -> None:
        """``submit`` runs a batch Command through the client's pipeline; ``encoder`` and
        ``event_dispatcher`` are what redis-py's command mixins read; ``split`` is the
        backend's ``node_batches()``, when it has one."""
        self._submit = submit
        self._split = split
        self.transaction = transaction
        self._commands: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.encoder = encoder
        self._event_dispatcher = event_dispatcher

    def execute_command(self, *args: Any, **options: Any) -> ClientPipeline:
        self._commands.append((args, options))
        return self

    # redis-py's cluster mixins split these across slots with awaits of their own; in a batch
    # they are buffered as the plain command (redis-py's pipeline splits per node).
    def delete(self, *names: Any) -> ClientPipeline:  # type: ignore[override]
        return self.execute_command("DEL", *names)

    def unlink(self, *names: Any) -> ClientPipeline:  # type: ignore[override]
        return self.execute_command("UNLINK", *names)

    def exists(self, *names: Any) -> ClientPipeline:  # type: ignore[override]
        return self.execute_command("EXISTS", *names)

    def touch(self, *names: Any) -> ClientPipeline:  # type: ignore[override]
        return self.execute_command("TOUCH", *names)

    def __len__(self) -> int:
        return len(self._commands)

    def clear(self) -> None:
        """Drop the buffered commands. (Not ``reset()``: that is the RESET command here.)"""
        self._commands = []

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every buffered command; the replies, in order. Empties the buffer."""
        commands, self._commands = self._commands, []
        if not commands:
            return []
        shares = None if self.transaction or self._split is None else self._split(commands)
        if shares is None:
            result: list[Any] = await self._submit(
                batch_command(commands, self.transaction, raise_on_error)
            )
            return result
        return await _NodeBatches(self._submit, commands, raise_on_error).run(shares)

    async def __aenter__(self) -> ClientPipeline:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.clear()


class _NodeBatches:
    """One pipeline sent as one batch per node; the replies put back in the pipeline's order.

    Each node's batch succeeds or fails on its own. A batch that fails as a whole (its
    breaker open, its deadline passed, its node gone after the retries) puts its error at
    each of its commands' positions. A batch whose connection broke part-way
    (:class:`PipelineInterruptedError`, or ``CommandInDoubtError`` caused by one: the retry
    stage does not repeat a batch holding a command that is not idempotent) is settled
    command by command: replies that came are kept; the commands that got none are sent again
    once, in a new batch, when that is safe (idempotent, or never written); the others get a
    ``CommandInDoubtError`` at their position. With ``raise_on_error`` the error of the
    lowest position is raised once every batch has ended.
    """

    def __init__(self, submit: Handler, commands: Buffered, raise_on_error: bool) -> None:
        self._submit = submit
        self._commands = commands
        self._raise_on_error = raise_on_error
        self._outcomes: list[Any] = [None] * len(commands)
        self._parts: list[Command | None] = [None] * len(commands)  # as the backend made them
        self._raised: list[tuple[int, Exception]] = []  # (position, error) raised by a batch

    async def run(self, shares: Sequence[NodeShare]) -> list[Any]:
        for share in shares:
            for index, part in zip(share.indexes, share.parts, strict=True):
                self._parts[index] = part
        if len(shares) == 1:  # one node (hash tags): no task of its own to wrap it in
            await self._send(shares[0].indexes, shares[0].slots)
        else:
            await asyncio.gather(*(self._send(share.indexes, share.slots) for share in shares))
        if self._raise_on_error:
            failures = self._raised + [
                (index + 1, outcome)
                for index, outcome in enumerate(self._outcomes)
                if isinstance(outcome, Exception)
            ]
            if failures:
                raise min(failures, key=lambda failure: failure[0])[1]
        return self._outcomes

    async def _send(
        self, indexes: list[int], slots: frozenset[int] | None, resend: bool = True
    ) -> None:
        batch = self._batch(indexes, slots)
        try:
            replies = await self._submit(batch)
        except Exception as err:
            interrupted = _interruption(err)
            if interrupted is None:
                # The first error reply (raise_on_error), or one error for the whole batch:
                # to raise (at its position, else the batch's first), or each command's.
                if self._raise_on_error:
                    position = getattr(err, "position", None) or indexes[0] + 1
                    self._raised.append((position, err))
                else:
                    for index in indexes:
                        self._outcomes[index] = err
                return
            in_doubt = err is not interrupted  # the retry stage's CommandInDoubtError
            again = self._settle(indexes, interrupted, in_doubt, resend, batch)
            if again:
                await self._send(again, None, resend=False)
            return
        for index, reply in zip(indexes, replies, strict=True):
            self._outcomes[index] = reply

    def _settle(
        self,
        indexes: list[int],
        interrupted: PipelineInterruptedError,
        in_doubt: bool,
        resend: bool,
        batch: Command,
    ) -> list[int]:
        """Keep the replies ``interrupted`` brought; return the indexes to send again.
        ``in_doubt``: the retry stage refused to repeat the batch (a command in it is not
        idempotent), so its safe commands are sent again here (if ``resend``: once) and the
        others are in doubt. Otherwise the retry stage did what it could (or is not there):
        each command without a reply keeps its connection error."""
        again = []
        unanswered = set(interrupted.unanswered)
        for offset, outcome in enumerate(interrupted.outcomes):
            index = indexes[offset]
            if offset not in unanswered:
                self._outcomes[index] = outcome  # a reply, or an error reply
                continue
            ran = getattr(outcome, "may_have_run", True)
            part = self._part(index)
            if in_doubt and resend and (part.idempotent or not ran):
                again.append(index)
            elif in_doubt and ran and not part.idempotent:
                self._outcomes[index] = CommandInDoubtError(
                    part.name, interrupted.node, batch.attempt, position=index + 1
                )
            else:
                self._outcomes[index] = outcome
        return again

    def _part(self, index: int) -> Command:
        part = self._parts[index]
        return part if part is not None else Command.from_call(*self._commands[index])

    def _batch(self, indexes: list[int], slots: frozenset[int] | None) -> Command:
        """The node batch of the commands at ``indexes``, made from the Commands the backend
        already made (a pipeline of many commands would otherwise parse each one again)."""
        batch = batch_command(
            [self._commands[index] for index in indexes],
            False,
            self._raise_on_error,
            slots=slots,
            parts=[self._part(index) for index in indexes],
        )
        batch.options[NODE_BATCH] = True
        batch.options[POSITIONS] = tuple(index + 1 for index in indexes)
        return batch


def _interruption(err: BaseException) -> PipelineInterruptedError | None:
    """The :class:`PipelineInterruptedError` behind ``err`` (itself, or the cause of the retry
    stage's ``CommandInDoubtError``), if any."""
    if isinstance(err, PipelineInterruptedError):
        return err
    if isinstance(err, CommandInDoubtError) and isinstance(err.__cause__, PipelineInterruptedError):
        return err.__cause__
    return None
