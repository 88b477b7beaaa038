"""The timeout stage: one deadline per logical command, retries and topology refreshes included.

Deadlines are enforced by one shared watchdog per client instead of a timer per command: the
stage records ``(task, deadline)`` in a dict, and a background task that runs only while
commands are in flight wakes every ``resolution`` seconds and cancels the tasks past their
deadline. A per-command ``asyncio.timeout()`` costs about 8 us here (its timer also sits in the
loop's heap that every redis-py read timer is sorted against); the dict costs a fraction of
that. The price is precision: a command ends at most ``resolution`` (50 ms) after its deadline.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.errors import CommandTimeoutError
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, FastPath, Handler

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from resilient_cache.registry import BuildContext, StageRegistry


class TimeoutSettings(BaseModel):
    """``REDIS_TIMEOUT__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    deadline: float | None = Field(
        default=10.0,
        ge=0.001,
        le=86_400,
        description="Seconds a command may take in all, retries included (keyword argument "
        "None disables it).",
    )
    resolution: float = Field(
        default=0.05,
        ge=0.001,
        le=1.0,
        description="How often the deadline watchdog looks; a command ends at most this long "
        "after its deadline.",
    )


class DeadlineWatchdog:
    """Cancels the tasks whose command is past its deadline. Runs only while some are watched."""

    def __init__(
        self,
        resolution: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.resolution = resolution
        self._clock = clock
        self._sleep = sleep
        self.watched: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None

    def watch(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.watched[task] = deadline
        if self._runner is None:
            self.start()

    def start(self) -> None:
        """Start the background task that looks at the deadlines (while any is watched)."""
        self._runner = asyncio.get_running_loop().create_task(
            self._run(), name="resilient_cache.deadlines"
        )

    def unwatch(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching ``task``; True if the watchdog cancelled it."""
        del self.watched[task]
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    async def _run(self) -> None:
        try:
            while self.watched:
                await self._sleep(self.resolution)
                now = self._clock()
                for task, deadline in list(self.watched.items()):
                    if deadline <= now and task not in self.expired:
                        self.expired.add(task)
                        task.cancel()
        finally:
            self._runner = None

    async def aclose(self) -> None:
        await cancel_and_wait(self._runner)


class TimeoutStage:
    """Bounds the rest of the pipeline by ``deadline`` seconds and stamps ``command.deadline``
    (on the pipeline clock) so the retry stage never starts an attempt it cannot finish."""

    def __init__(
        self,
        seconds: float,
        clock: Callable[[], float],
        resolution: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.seconds = seconds
        self._clock = clock
        self.watchdog = DeadlineWatchdog(resolution, clock, sleep)
        # The watchdog's table and set, read on every command (they are never replaced).
        self._watched = self.watchdog.watched
        self._expired = self.watchdog.expired
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = -1

    async def aclose(self) -> None:
        await self.watchdog.aclose()

    def _current_task(self) -> asyncio.Task[Any] | None:
        """The running task, and the loop and thread it runs on kept for the next command.

        ``asyncio.current_task()`` asks for the running loop, which costs a ``getpid()``
        system call (to notice a fork). A command run on the same thread as the last one,
        whose loop then still has a task running, runs on that loop: one thread runs one
        loop at a time, and a loop that is not running has no current task. So ``_start``
        looks up the task of the loop kept here, and comes here only when there is none.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - driven by hand, outside any loop
            return None
        self._loop, self._thread = loop, _thread_id()
        return _task_of(loop)

    def fast_path(self) -> FastPath | None:
        if not _HAS_UNCANCEL:  # pragma: no cover - Python 3.10: __call__ uses wait_for()
            return None
        return FastPath(self._start, self._finished, self._failed)

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        if not _HAS_UNCANCEL or self._current_task() is None:  # pragma: no cover
            command.deadline = self._clock() + self.seconds
            try:
                return await asyncio.wait_for(call_next(command), self.seconds)
            except asyncio.TimeoutError as err:
                raise CommandTimeoutError(command.name, self.seconds, command.attempt) from err
        watch = self._start(command)
        try:
            result = await call_next(command)
        except BaseException as error:
            return await self._failed(command, watch, error, call_next)
        self._finished(command, watch)
        return result

    def _start(self, command: Command) -> tuple[asyncio.Task[Any], int] | None:
        """Stamp the deadline and have the watchdog watch the current task: ``(task, its
        cancellation count)``, or ``None`` outside a task (a coroutine driven by hand, which
        no watchdog can cancel: the deadline is stamped for the retry stage, no more)."""
        deadline = command.deadline = self._clock() + self.seconds
        task = _task_of(self._loop) if _thread_id() == self._thread else None
        if task is None:
            task = self._current_task()
            if task is None:  # pragma: no cover - every command runs in a task under asyncio
                return None
        self._watched[task] = deadline  # watchdog.watch(), inlined
        if self.watchdog._runner is None:
            self.watchdog.start()
        return task, task.cancelling()  # type: ignore[attr-defined]  # 3.11+ (fast_path)

    def _finished(self, command: Command, watch: tuple[asyncio.Task[Any], int] | None) -> None:
        # watchdog.unwatch(), inlined; the task may be gone already if a command nested in the
        # same task unwatched it.
        if watch is not None and self._watched.pop(watch[0], None) is not None and self._expired:
            self._expired.discard(watch[0])

    async def _failed(
        self,
        command: Command,
        watch: tuple[asyncio.Task[Any], int] | None,
        error: BaseException,
        call_next: Handler,
    ) -> Any:
        if watch is not None:
            task, cancelling = watch
            watchdog = self.watchdog
            try:
                # Ours (the watchdog's) becomes a timeout; the caller's stays a cancellation,
                # as with asyncio.timeout().
                if (
                    isinstance(error, asyncio.CancelledError)
                    and watchdog.unwatch(task)
                    and task.uncancel() <= cancelling  # type: ignore[attr-defined]  # 3.11+
                ):
                    raise CommandTimeoutError(command.name, self.seconds, command.attempt) from None
            finally:
                if task in watchdog.watched:
                    watchdog.unwatch(task)
        raise error


#: Whether asyncio tasks count their cancellations (``Task.uncancel()``, Python 3.11).
_HAS_UNCANCEL = sys.version_info >= (3, 11)
_thread_id = threading.get_ident
#: The running task of a given loop, without asking which loop runs (see
#: ``TimeoutStage._current_task``). On Python 3.11 ``asyncio.current_task(loop)`` is a Python
#: function reading this table; the table is read directly. From 3.12 the function is C.
_TASKS = getattr(asyncio.tasks, "_current_tasks", None) if sys.version_info < (3, 12) else None
_task_of: Callable[[asyncio.AbstractEventLoop | None], asyncio.Task[Any] | None] = (
    _TASKS.get if isinstance(_TASKS, dict) else asyncio.current_task
)


def build(settings: TimeoutSettings, context: BuildContext) -> TimeoutStage | None:
    if settings.deadline is None:
        return None
    return TimeoutStage(settings.deadline, context.clock, settings.resolution, context.sleep)


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("timeout", TimeoutSettings, build, description=TimeoutStage.__doc__ or "")
