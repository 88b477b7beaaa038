"""Polling against a deadline, the only way this package waits.

Every wait polls a condition and, on timeout, says what it waited for and what
was still wrong. Nothing sleeps and hopes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from .errors import DevClusterError

__all__ = ["POLL_INTERVAL", "poll_until", "wait_for"]

# One logger for the whole package, named as before it was split into modules.
logger = logging.getLogger("resilient_cache.devcluster")

T = TypeVar("T")

POLL_INTERVAL = 0.05


def poll_until(
    problems_fn: Callable[[], list[str]],
    timeout: float,
    what: str,
    interval: float = POLL_INTERVAL,
) -> None:
    """Call ``problems_fn`` until it returns no problems or ``timeout`` passes.

    Raises:
        DevClusterError: naming ``what`` and the problems still left at the deadline.
    """
    began = time.monotonic()
    deadline = began + timeout
    previous: list[str] = []
    while True:
        problems = problems_fn()
        if not problems:
            logger.debug("%s: done after %.2fs", what, time.monotonic() - began)
            return
        if problems != previous:  # log changes only, not every poll
            logger.debug("waiting for %s: %s", what, "; ".join(problems))
            previous = problems
        if time.monotonic() >= deadline:
            raise DevClusterError(
                f"timed out after {timeout:.1f}s waiting for {what}: " + "; ".join(problems)
            )
        time.sleep(interval)


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    what: str = "condition",
    interval: float = POLL_INTERVAL,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Redis connection errors and timeouts inside the predicate count as "not
    yet" (nodes come and go in chaos tests); the last one is quoted in the
    error. Other exceptions propagate.

    Raises:
        DevClusterError: naming ``what`` when ``timeout`` seconds pass.
    """
    began = time.monotonic()
    deadline = began + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            last_error = exc
        else:
            if value:
                logger.debug("%s: done after %.2fs", what, time.monotonic() - began)
                return value
        if time.monotonic() >= deadline:
            detail = (
                f" (last error: {type(last_error).__name__}: {last_error})"
                if last_error is not None
                else ""
            )
            raise DevClusterError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)
