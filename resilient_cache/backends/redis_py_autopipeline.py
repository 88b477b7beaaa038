"""Auto-pipelining for the redis-py cluster backend (``REDIS_AUTO_PIPELINE=true``).

Commands that concurrent callers send to the same node within one turn of the event loop are
written together on one connection, and their replies are read back in order and handed to
each caller. Each command has already passed through its own stages (span, metrics, deadline,
retry, breaker, memory tier): only the write and the read are shared.

How a command travels::

    caller ─▶ stages ─▶ backend.execute ─▶ its node idle? ─ yes ─▶ sent alone, at once
                                             │ no (a connection to it in use)
                                             ▼
                                   AutoPipeline.enqueue(command): queued, await a future
                                             ▼
              one task per node batch: take the queue, one connection, one write,
              read the replies in order, settle each caller's future

Why a task per batch rather than the first caller's own coroutine: a caller may be cancelled
at any moment (a deadline, a hedge, the application). A caller never touches the connection,
so its cancellation only drops its future; the batch's task still reads that reply and throws
it away. Replies therefore never cross between callers (the failure of redis-py #2665, where a
cancelled caller left an unread reply on a pooled connection). If the task itself stops before
every reply was read (the client closing), the connection is disconnected, never pooled.

What never joins a batch, and goes the usual way (redis-py's own path, one command per
connection): commands the routing stage did not send to one node, commands with
``target_nodes``, commands whose keys are unknown or absent, blocking commands, and commands
that change the connection's state (:data:`NEVER_BATCHED`). A batch never mixes nodes.

Failures, per command:

- An error reply (WRONGTYPE, ...) belongs to its command only.
- MOVED: the slot map is patched and the command is sent again the usual way, which follows
  the redirect (recorded on ``command.redirects``). ASK, TRYAGAIN and CLUSTERDOWN also go back
  the usual way, where redis-py handles them as for any command.
- The connection could not be opened: nothing was sent; every command of the batch gets a
  connection error saying so (``may_have_run=False``), so the retry stage may repeat it.
- The connection broke or timed out after the write: each command whose reply had not come is
  in doubt (``may_have_run=True``): the retry stage repeats the idempotent ones and raises
  :class:`~resilient_cache.errors.CommandInDoubtError` for the rest.
- The pool had no free connection: every command gets ``MaxConnectionsError`` (not executed).

The same writer sends ``client.pipeline()``'s node batches (:meth:`AutoPipeline.send_together`,
called by redis_py_node_batches.py): one caller's commands in a write of their own, whatever
their number, under the same rules, each outcome handed back rather than raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    MovedError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resilient_cache.backends._redis_py_compat import closed_in_use, connections_in_use
from resilient_cache.pipeline import Command, Redirect

logger = logging.getLogger("resilient_cache.backends")

#: Commands that never share a write: blocking ones (they would hold every command behind
#: them), and those that change or depend on the connection's state.
NEVER_BATCHED = frozenset(
    {
        # blocking
        "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
        "XREAD", "XREADGROUP", "WAIT", "WAITAOF",
        # connection state: transactions, pub/sub, redis-py's prepared HIMPORT
        "WATCH", "UNWATCH", "MULTI", "EXEC", "DISCARD",
        "SUBSCRIBE", "SSUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE", "SUNSUBSCRIBE", "PUNSUBSCRIBE",
        "HIMPORT", "HIMPORT SET",
        # client.pipeline()'s batches (pipeline.BATCH_NAMES): written whole, by send_together()
        # (a node batch) or redis-py's own pipeline, never inside another batch
        "PIPELINE",
    }
)  # fmt: skip

#: Replies that send the command back the usual way (redis-py follows or reports them).
#: MovedError is an AskError.
_SEND_AGAIN = (AskError, TryAgainError, ClusterDownError)

_TASK_NAME = "resilient_cache.auto_pipeline"

#: ``translate(command, err, node_name)``: the error a caller sees for ``err``, which redis-py
#: raised (or a broken connection caused) for ``command`` on ``node_name``.
Translate = Callable[[Command, Exception, str | None], Exception]

#: At most this many commands in one write; more callers make more batches (each its own
#: connection). Bounds the memory of one write and the wait of the batch's last caller.
MAX_BATCH = 512


def broken(err: BaseException) -> BaseException:
    """``err`` as a connection error. redis-py 8.1 raises ``AttributeError: 'NoneType' object
    has no attribute 'writelines'`` (or ``'read'``) when another task closed the connection in
    use (see ``closed_in_use``); any other AttributeError is a bug and is raised again."""
    if isinstance(err, AttributeError):
        if closed_in_use(err) is None:
            raise err
        return RedisConnectionError("the connection was closed by another task while in use")
    return err


def is_idle(node: Any) -> bool:
    """Whether nothing is on its way to ``node`` (a redis-py ClusterNode): none of its
    connections is taken from its pool (by a lone command, a batch, or a pipeline). A command
    then has no caller to share a write with, and goes at once, alone: one caller awaiting one
    command at a time never waits for a batch, and batches form as soon as commands overlap.
    Read from the pool itself rather than counted per command: counting would wrap every lone
    command in a frame of its own (measured: +0.7 us per GET at one caller)."""
    return connections_in_use(node) == 0


def can_batch(command: Command) -> bool:
    """Whether ``command`` may share a write: routed to one node, with known keys, no
    ``target_nodes`` of its own, and not blocking or stateful."""
    return (
        command.node is not None
        and bool(command.keys)
        and command.name not in NEVER_BATCHED
        and "target_nodes" not in command.options
    )


class _NodeQueue:
    """The commands waiting for the next write to one node."""

    __slots__ = ("node", "task", "waiting")

    def __init__(self, node: Any) -> None:
        self.node = node
        self.waiting: list[tuple[Command, asyncio.Future[Any]]] = []
        self.task: asyncio.Task[None] | None = None  # the batch that will take ``waiting``


class AutoPipeline:
    """Per node, a queue of commands and the task that writes them together.

    ``send_alone(command)`` sends one command the usual way (the backend's path without
    auto-pipelining); ``translate(command, err, node_name)`` retells a redis-py error as the
    backend does; ``topology_changed()`` asks for a background re-read of the slot map;
    ``record_batch(size, node)`` reports a batch's size (the histogram), if set.
    """

    def __init__(
        self,
        cluster: Any,
        send_alone: Callable[[Command], Awaitable[Any]],
        translate: Callable[[Command, Exception, str | None], Exception],
        topology_changed: Callable[[], None],
        record_batch: Callable[[int, Any], None] | None = None,
    ) -> None:
        self._cluster = cluster
        self._send_alone = send_alone
        self._translate = translate
        self._topology_changed = topology_changed
        self._record_batch = record_batch
        self._queues: dict[str, _NodeQueue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Batches written so far, the commands they held, and the replies read for callers
        #: cancelled after the write (for tests and benchmarks).
        self.batches = 0
        self.batched_commands = 0
        self.replies_dropped = 0

    def queue_for(self, node: Any) -> _NodeQueue:
        """``node``'s queue (the backend asks for it only when a connection to the node is in
        use, see :func:`is_idle`)."""
        queue = self._queues.get(node.name)
        if queue is None or queue.node is not node:  # a node redis-py replaced (same address)
            queue = self._queues[node.name] = _NodeQueue(node)
        return queue

    async def enqueue(self, command: Command, queue: _NodeQueue) -> Any:
        """Put ``command`` in ``queue``'s next batch and wait for its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queue.waiting.append((command, future))
        if queue.task is None:
            # The task first runs on the loop's next turn, after every caller that is ready
            # now has queued its command: that is what makes the batch.
            task = asyncio.get_running_loop().create_task(self._write_batch(queue), name=_TASK_NAME)
            queue.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        outcome = await future
        if type(outcome) is _SendAgain:
            return await self._send_again(command, outcome.error)
        return outcome

    async def send_together(
        self, node: Any, commands: list[Command], translate: Translate
    ) -> list[Any]:
        """Write ``commands`` (one caller's explicit batch, see redis_py_node_batches.py) to
        ``node`` in one write on one connection, whatever their number, and return each one's
        outcome in order: its reply, or the error it failed with (never raised here).

        Same rules as an auto-pipelined batch: an error reply is its command's; MOVED, ASK,
        TRYAGAIN and CLUSTERDOWN send that command again alone; a broken connection fails the
        commands not answered yet with connection errors marked ``may_have_run``. The write
        runs in a task of its own: if the caller is cancelled, the replies are still read and
        dropped, so the connection goes back to the pool clean."""
        loop = asyncio.get_running_loop()
        batch = [(command, loop.create_future()) for command in commands]
        task = loop.create_task(self._send(node, batch, translate, shared=False), name=_TASK_NAME)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        outcomes: list[Any] = []
        try:
            for command, future in batch:
                try:
                    outcome = await future
                    if type(outcome) is _SendAgain:
                        outcome = await self._send_again(command, outcome.error)
                except Exception as err:
                    outcome = err
                outcomes.append(outcome)
        finally:
            for _, future in batch:
                # A cancelled caller: the replies still to come are read and dropped; an error
                # already set is marked seen (asyncio would log it as never retrieved).
                if not future.cancel() and not future.cancelled():
                    future.exception()
        return outcomes

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._queues.clear()

    # -- one batch --------------------------------------------------------------------------

    async def _write_batch(self, queue: _NodeQueue) -> None:
        batch = queue.waiting[:MAX_BATCH]
        del queue.waiting[:MAX_BATCH]
        if queue.waiting:  # the rest goes in the next batch, on another connection
            queue.task = asyncio.get_running_loop().create_task(
                self._write_batch(queue), name=_TASK_NAME
            )
            self._tasks.add(queue.task)
            queue.task.add_done_callback(self._tasks.discard)
        else:
            queue.task = None
        # Callers cancelled while they waited for this turn: not sent at all.
        batch = [entry for entry in batch if not entry[1].done()]
        if batch:
            await self._send(queue.node, batch, self._translate)

    async def _send(
        self,
        node: Any,
        batch: list[tuple[Command, asyncio.Future[Any]]],
        translate: Translate,
        shared: bool = True,
    ) -> None:
        """Write ``batch`` to ``node`` on one connection and settle each future with its reply
        (or its error, told by ``translate``). ``shared``: callers' commands auto-pipelined
        together (counted, and shown as a batch size); else one caller's explicit batch."""
        try:
            connection = node.acquire_connection()
        except MaxConnectionsError as err:
            self._fail_all(node, batch, 0, err, translate, may_have_run=False, shared=shared)
            return
        answered = 0
        stopped_by: BaseException | None = None
        try:
            packed: list[bytes] = []
            batch = self._pack(node, connection, batch, packed, translate)
            if not batch:
                return
            if shared:
                self._count(node, batch)
            await node.disconnect_if_needed(connection)
            if not connection.is_connected:
                try:
                    await connection.connect()
                except (RedisConnectionError, RedisTimeoutError, OSError, AttributeError) as err:
                    # Closed or refused during the handshake: the batch was not written.
                    self._fail_all(
                        node, batch, 0, broken(err), translate, may_have_run=False, shared=shared
                    )
                    answered = len(batch)
                    return
            try:
                await connection.send_packed_command(packed, check_health=False)
            except (RedisConnectionError, RedisTimeoutError, OSError, AttributeError) as err:
                # Part of the write may have reached the server.
                self._fail_all(
                    node, batch, 0, broken(err), translate, may_have_run=True, shared=shared
                )
                answered = len(batch)
                return
            for command, future in batch:
                try:
                    reply = await node.parse_response(connection, command.name, **command.options)
                except (RedisConnectionError, RedisTimeoutError, OSError, AttributeError) as err:
                    self._fail_all(
                        node, batch, answered, broken(err), translate,
                        may_have_run=True, shared=shared,
                    )  # fmt: skip
                    answered = len(batch)
                    return
                except Exception as err:  # an error reply: this command's only
                    answered += 1
                    if future.done():
                        continue
                    if isinstance(err, _SEND_AGAIN):  # MOVED (an AskError) included
                        future.set_result(_SendAgain(err))
                    else:
                        future.set_exception(translate(command, err, node.name))
                    continue
                answered += 1
                if not future.done():
                    future.set_result(reply)
                else:  # its caller was cancelled after the write: the reply is dropped
                    self.replies_dropped += 1
        except asyncio.CancelledError as err:  # the client closing: see finally
            stopped_by = err
            raise
        except Exception as err:  # a bug: its callers get an error (finally), and it is logged
            stopped_by = err
            logger.error(
                "%s batch to %s stopped: %s", "auto-pipelined" if shared else "pipeline",
                node.name, type(err).__name__, exc_info=True,
            )  # fmt: skip
        finally:
            if answered < len(batch):
                # Stopped before every reply was read: replies may still come on this
                # connection, so it is never reused, and no caller is left waiting.
                if connection.is_connected:
                    await connection.disconnect(nowait=True)
                reason = type(stopped_by).__name__ if stopped_by is not None else "stopped"
                for command, future in batch[answered:]:
                    if not future.done():
                        error = RedisConnectionError(
                            f"{command.name}: the {'auto-pipelined' if shared else 'pipeline'}"
                            f" batch stopped before its reply was read ({reason})"
                        )
                        error.may_have_run = True  # type: ignore[attr-defined]
                        future.set_exception(error)
            try:
                await node.disconnect_if_needed(connection)
            finally:
                node.release(connection)

    def _pack(
        self,
        node: Any,
        connection: Any,
        batch: list[tuple[Command, asyncio.Future[Any]]],
        packed: list[bytes],
        translate: Translate,
    ) -> list[tuple[Command, asyncio.Future[Any]]]:
        """Encode each command of ``batch`` into ``packed``; return those that could be. A
        command whose arguments cannot be encoded fails alone, as it would unbatched."""
        sendable = []
        for command, future in batch:
            try:
                packed.extend(connection.pack_command(command.name, *command.args))
            except Exception as err:  # redis-py's DataError: an argument of a wrong type
                if not future.done():
                    future.set_exception(translate(command, err, node.name))
                continue
            sendable.append((command, future))
        return sendable

    def _count(self, node: Any, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        """An auto-pipelined batch about to be written: counted, and its size recorded on
        each command (the span's attribute) and in the histogram."""
        size = len(batch)
        self.batches += 1
        self.batched_commands += size
        for command, _ in batch:
            command.batch_size = size
        if self._record_batch is not None:
            self._record_batch(size, node)

    def _fail_all(
        self,
        node: Any,
        batch: list[tuple[Command, asyncio.Future[Any]]],
        answered: int,
        err: BaseException,
        translate: Translate,
        *,
        may_have_run: bool,
        shared: bool = True,
    ) -> None:
        """Every command of ``batch`` from ``answered`` on failed with ``err`` (a broken
        connection, or a full pool): each gets its own error of the same kind, marked with
        whether it may have run. ``shared``: as for :meth:`_send`."""
        kind: type[RedisConnectionError | RedisTimeoutError]
        if isinstance(err, MaxConnectionsError):
            # The local pool had no connection to give: nothing was sent, and it says nothing
            # about the node (the breaker does not count it; the retry stage waits briefly).
            kind = MaxConnectionsError
        else:
            # As redis-py does after a connection error: connections in use on this node are
            # reopened before reuse, idle ones closed, and the slot map is re-read.
            node.update_active_connections_for_reconnect()
            self._topology_changed()
            kind = RedisTimeoutError if isinstance(err, RedisTimeoutError) else RedisConnectionError
        text = str(err) or type(err).__name__
        where = "auto-pipelined" if shared else "in a pipeline"
        for command, future in batch[answered:]:
            if future.done():
                continue
            error = kind(f"{command.name}: {text} ({where})")
            error.may_have_run = may_have_run  # type: ignore[union-attr]  # read by retry
            error.__cause__ = err
            future.set_exception(translate(command, error, node.name))

    async def _send_again(self, command: Command, err: RedisError) -> Any:
        command.batch_size = None
        if isinstance(err, MovedError):
            source = command.node
            await self._cluster.nodes_manager.move_slot(err)
            if source is not None:
                redirect = Redirect("MOVED", source, err.host, err.port, time.time_ns())
                command.redirects = (command.redirects or []) + [redirect]
            command.node = None  # redis-py routes it by the patched slot map
            self._topology_changed()
        return await self._send_alone(command)


class _SendAgain:
    """A batch's reply that sends its command again the usual way (see ``_SEND_AGAIN``)."""

    __slots__ = ("error",)

    def __init__(self, error: RedisError) -> None:
        self.error = error
