"""The timeout stage and its shared deadline watchdog, on a fake clock: no test sleeps for real.

The watchdog's sleep is the clock's: each call advances the fake time by the resolution and
yields once to the loop, so "hanging" commands hang exactly until the fake time passes their
deadline, whatever the machine's load.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from resilient_cache import Command, CommandTimeoutError
from resilient_cache.stages.timeout import TimeoutStage

from .conftest import FakeClock


class TickingClock(FakeClock):
    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let the commands run between two looks of the watchdog


@pytest.fixture
def ticking() -> TickingClock:
    return TickingClock()


async def hang(command: Command) -> None:
    await asyncio.Event().wait()


async def turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_command_past_its_deadline_ends_with_a_timeout_error(ticking: TickingClock) -> None:
    # Binary fractions, so that the fake time adds up exactly.
    stage = TimeoutStage(0.25, ticking, resolution=1 / 32, sleep=ticking.sleep)
    started = ticking.now
    with pytest.raises(CommandTimeoutError, match=r"GET did not complete within its 0.25s"):
        await stage(Command("GET", ("k",)), hang)
    if sys.version_info >= (3, 11):
        # Ended at the first look of the watchdog at or past the deadline: within one
        # resolution.
        assert 0.25 <= ticking.now - started <= 0.25 + 1 / 32
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # nothing leaks to the caller
    # (Python 3.10 has no Task.uncancel(): there the stage bounds the command with
    # asyncio.wait_for() on the loop's own clock, so 0.25 s of real time passed instead.)
    await turns()  # and no stray cancellation arrives later
    await stage.aclose()


async def test_fast_command_is_untouched_and_watchdog_stops_when_idle(
    ticking: TickingClock,
) -> None:
    stage = TimeoutStage(5.0, ticking, resolution=0.01, sleep=ticking.sleep)

    async def answer(command: Command) -> str:
        return "ok"

    command = Command("GET", ("k",))
    assert await stage(command, answer) == "ok"
    assert command.deadline == ticking.now + 5.0  # stamped on the pipeline clock
    assert stage.watchdog.watched == {}
    await turns()  # the watchdog notices nothing is watched and ends
    assert stage.watchdog._runner is None
    assert len(ticking.sleeps) <= 1


async def test_callers_own_cancellation_stays_a_cancellation(ticking: TickingClock) -> None:
    stage = TimeoutStage(5.0, ticking, resolution=0.01, sleep=ticking.sleep)
    task = asyncio.create_task(stage(Command("GET", ("k",)), hang))
    await turns(3)
    assert ticking.now < 1000.0 + 5.0  # long before the deadline
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stage.aclose()


async def test_many_concurrent_deadlines(ticking: TickingClock) -> None:
    stage = TimeoutStage(0.1, ticking, resolution=0.02, sleep=ticking.sleep)

    async def slow_or_fast(command: Command) -> str:
        if command.args[0] == "slow":
            await hang(command)
        return "ok"

    results = await asyncio.gather(
        *(stage(Command("GET", ("slow" if i % 2 else "fast",)), slow_or_fast) for i in range(100)),
        return_exceptions=True,
    )
    assert results[0::2] == ["ok"] * 50
    assert all(isinstance(r, CommandTimeoutError) for r in results[1::2])
    await stage.aclose()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is 3.11+")
async def test_a_task_cancelled_before_keeps_its_count_and_times_out(
    ticking: TickingClock,
) -> None:
    """A task whose earlier cancellation was swallowed (its count is 1) still gets a timeout
    error for its command, and its count stays 1 (the token is then ``(task, 1)``)."""
    stage = TimeoutStage(0.25, ticking, resolution=1 / 32, sleep=ticking.sleep)

    async def swallowed_then_command() -> tuple[int, int, type[BaseException] | None]:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, not uncancelled
            await asyncio.sleep(0)
        before = task.cancelling()
        raised: type[BaseException] | None = None
        try:
            await stage(Command("GET", ("k",)), hang)
        except CommandTimeoutError as err:
            raised = type(err)
        return before, task.cancelling(), raised

    assert await asyncio.create_task(swallowed_then_command()) == (1, 1, CommandTimeoutError)
    await stage.aclose()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is 3.11+")
async def test_a_cancellation_before_the_watchdogs_stays_a_cancellation(
    ticking: TickingClock,
) -> None:
    """The caller cancels, and the watchdog finds the deadline passed before the task runs
    again: the caller's cancellation wins, as with asyncio.timeout()."""
    stage = TimeoutStage(0.25, ticking, resolution=1 / 32, sleep=ticking.sleep)
    task = asyncio.create_task(stage(Command("GET", ("k",)), hang))
    await turns(2)
    ticking.now += 1.0  # past the deadline: the watchdog cancels it at its next look
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stage.aclose()
