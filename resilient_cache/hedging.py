"""The mechanics of a hedged read, for the routing stage (:mod:`resilient_cache.stages.routing`).

The first read runs in the caller's own task, as any read: no task is made for it, so a read
that answers before ``hedge_after`` (nearly all of them) costs one loop timer. When the timer
fires first, :class:`Hedge` sends the same read to the next node in a task of its own. If that
one answers first, it cancels the caller's task: the first read ends with ``CancelledError``
inside redis-py, which then disconnects the connection whose reply is still due (it never goes
back to the pool with a reply waiting: redis-py #2665), and the stage returns the hedge's
reply. If the first answers first, the hedge's task is cancelled the same way.

Python 3.11+ counts cancellations: the stage takes back its own (``Task.uncancel()``), so a
deadline or a caller's cancellation that came at the same time still ends the command.

A cancellation can be swallowed on its way: ``asyncio.wait_for()`` before Python 3.12 returns
the inner result when the cancellation lands just as that finishes, and redis-py sends every
command through it (with a ``socket_timeout``). So the caller's task is cancelled again, once per
loop iteration (at most :data:`MAX_CANCELS` times), until the cancellation reaches the stage or
the read ends; the stage takes back as many as were asked for. A read that ended anyway (the
cancellation swallowed, the reply read in full) leaves no reply behind either.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from resilient_cache.circuit import is_infrastructure_failure
from resilient_cache.errors import CircuitBreakerOpenError
from resilient_cache.pipeline import Command

_COMMAND_FIELDS = tuple(Command.__slots__)


def twin(command: Command) -> Command:
    """A copy of ``command`` for the hedge: its own node and redirects."""
    copy = Command.__new__(Command)
    for name in _COMMAND_FIELDS:
        setattr(copy, name, getattr(command, name))
    copy.redirects = None
    return copy


def failed_on_node(error: BaseException) -> bool:
    """The read failed where it went (connection, timeout, breaker): the other may answer."""
    return isinstance(error, CircuitBreakerOpenError) or is_infrastructure_failure(error)


def retrieve(task: asyncio.Future[Any]) -> None:
    """Take a finished task's outcome: a loser's error is no one's (no "never retrieved")."""
    if not task.cancelled():
        task.exception()


#: Most times :class:`Hedge` cancels the caller's task for one hedge that answered first.
MAX_CANCELS = 3


def cancelled_by_others(task: asyncio.Task[Any], taken: int = 1) -> bool:
    """Take back the ``taken`` cancellations :class:`Hedge` asked for, and say whether someone
    else (a deadline, the caller) asked too. Before 3.11 nobody can tell: False."""
    if sys.version_info >= (3, 11):
        remaining = task.cancelling()
        for _ in range(taken):
            remaining = task.uncancel()
        return remaining > 0
    return False


class Hedge:
    """One hedged read: the timer, the hedge's task, and who answered first.

    ``start(command, nodes)`` is called when the timer fires; it returns the hedge's awaitable
    and its Command, or None when there is no other node or the budget says no."""

    __slots__ = (
        "_start",
        "_timer",
        "cancels",
        "command",
        "delivered",
        "finished",
        "second",
        "settled",
        "task",
        "won",
    )

    def __init__(
        self,
        start: Callable[[], tuple[Awaitable[Any], Command] | None],
    ) -> None:
        self._start = start
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self._timer: asyncio.TimerHandle | asyncio.Future[Any] | None = None
        #: Set once the outcome is decided: a late timer or hedge reply changes nothing then.
        self.finished = False
        #: The hedge answered first (and the caller's task was cancelled for it).
        self.won = False
        self.second: asyncio.Task[Any] | None = None
        self.command: Command | None = None
        #: Cancellations asked of the caller's task, and whether one reached the stage.
        self.cancels = 0
        self.delivered = False
        #: The stage is done with this read (set by :meth:`disarm`).
        self.settled = False

    def arm(self, delay: float, sleep: Callable[[float], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        if sleep is asyncio.sleep:
            self._timer = loop.call_later(delay, self._fire)
        else:  # an injected sleep (tests): its end fires the hedge
            timer = asyncio.ensure_future(sleep(delay))
            timer.add_done_callback(lambda done: None if done.cancelled() else self._fire())
            self._timer = timer

    def _fire(self) -> None:
        if self.finished:
            return
        started = self._start()
        if started is None:
            return
        awaitable, self.command = started
        self.second = second = asyncio.ensure_future(awaitable)
        second.add_done_callback(self._second_done)

    def _second_done(self, second: asyncio.Future[Any]) -> None:
        if self.finished or second.cancelled():
            return
        error = second.exception()
        if error is not None and failed_on_node(error):
            return  # the first read may still answer
        self.finished = self.won = True
        self._cancel_caller()  # the first read gives way (see the module's docstring)

    def _cancel_caller(self) -> None:
        if self.delivered or self.settled or self.cancels >= MAX_CANCELS:
            return
        self.cancels += 1
        self.task.cancel()
        # Again next time round the loop if this one was swallowed (see the docstring).
        asyncio.get_running_loop().call_soon(self._cancel_caller)

    def disarm(self) -> None:
        """The outcome is decided: stop the timer, cancel a hedge still out."""
        self.finished = self.settled = True
        if self._timer is not None:
            self._timer.cancel()
        second = self.second
        if second is not None:
            if second.done():
                retrieve(second)
            else:
                second.cancel()  # redis-py drops its connection: the reply is still due
                second.add_done_callback(retrieve)
