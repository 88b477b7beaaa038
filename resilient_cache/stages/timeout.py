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
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.errors import CommandTimeoutError
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, Handler

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

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

    async def aclose(self) -> None:
        await self.watchdog.aclose()

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        deadline = command.deadline = self._clock() + self.seconds
        task = asyncio.current_task()
        if task is None or sys.version_info < (3, 11):  # pragma: no cover - no uncancel()
            try:
                return await asyncio.wait_for(call_next(command), self.seconds)
            except asyncio.TimeoutError as err:
                raise CommandTimeoutError(command.name, self.seconds, command.attempt) from err
        watchdog = self.watchdog
        cancelling = task.cancelling()
        watchdog.watch(task, deadline)
        try:
            return await call_next(command)
        except asyncio.CancelledError:
            # Ours (the watchdog's) becomes a timeout; the caller's stays a cancellation, as
            # with asyncio.timeout().
            if watchdog.unwatch(task) and task.uncancel() <= cancelling:
                raise CommandTimeoutError(command.name, self.seconds, command.attempt) from None
            raise
        finally:
            if task in watchdog.watched:
                watchdog.unwatch(task)


def build(settings: TimeoutSettings, context: BuildContext) -> TimeoutStage | None:
    if settings.deadline is None:
        return None
    return TimeoutStage(settings.deadline, context.clock, settings.resolution, context.sleep)


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("timeout", TimeoutSettings, build, description=TimeoutStage.__doc__ or "")
