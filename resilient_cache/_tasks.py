"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has really ended.

    Cancels again while it is still running: library code deep inside a task (redis-py, or
    ``asyncio.wait_for`` before Python 3.12) may swallow one cancellation, and a shutdown must
    not hang on that. The task's own outcome is not raised here.
    """
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task is not None and not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" warning
