from __future__ import annotations

import asyncio
import time

import pytest

from resilient_cache import Command, CommandTimeoutError
from resilient_cache.stages.timeout import TimeoutStage


async def test_command_past_its_deadline_ends_with_a_timeout_error() -> None:
    stage = TimeoutStage(0.2, time.monotonic, resolution=0.02)

    async def hang(command: Command) -> None:
        await asyncio.Event().wait()

    started = time.monotonic()
    with pytest.raises(CommandTimeoutError, match=r"GET did not complete within its 0.2s"):
        await stage(Command("GET", ("k",)), hang)
    assert 0.2 <= time.monotonic() - started < 0.2 + 0.1
    assert asyncio.current_task().cancelling() == 0  # nothing leaks to the caller
    await asyncio.sleep(0)  # and no stray cancellation arrives later
    await stage.aclose()


async def test_fast_command_is_untouched_and_watchdog_stops_when_idle() -> None:
    stage = TimeoutStage(5.0, time.monotonic, resolution=0.01)

    async def answer(command: Command) -> str:
        return "ok"

    command = Command("GET", ("k",))
    assert await stage(command, answer) == "ok"
    assert command.deadline is not None
    assert stage.watchdog.watched == {}
    await asyncio.sleep(0.05)  # the watchdog notices nothing is watched and ends
    assert stage.watchdog._runner is None


async def test_callers_own_cancellation_stays_a_cancellation() -> None:
    stage = TimeoutStage(5.0, time.monotonic, resolution=0.01)

    async def hang(command: Command) -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(stage(Command("GET", ("k",)), hang))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stage.aclose()


async def test_many_concurrent_deadlines() -> None:
    stage = TimeoutStage(0.1, time.monotonic, resolution=0.02)

    async def slow_or_fast(command: Command) -> str:
        if command.args[0] == "slow":
            await asyncio.sleep(10)
        return "ok"

    results = await asyncio.gather(
        *(stage(Command("GET", ("slow" if i % 2 else "fast",)), slow_or_fast) for i in range(100)),
        return_exceptions=True,
    )
    assert results[0::2] == ["ok"] * 50
    assert all(isinstance(r, CommandTimeoutError) for r in results[1::2])
    await stage.aclose()
