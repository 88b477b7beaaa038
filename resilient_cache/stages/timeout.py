"""The timeout stage: one deadline per logical command, retries and topology refreshes included."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache.errors import CommandTimeoutError
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, Handler

if TYPE_CHECKING:
    from collections.abc import Callable

    from resilient_cache.plugins import BuildContext, StageRegistry


class TimeoutSettings(BaseModel):
    """``REDIS_TIMEOUT__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    deadline: float | None = Field(
        default=10.0,
        gt=0,
        description="Seconds a command may take in all, retries included; empty disables it.",
    )


class TimeoutStage:
    """Bounds the rest of the pipeline by ``deadline`` seconds and stamps ``command.deadline``
    so the retry stage never starts an attempt it cannot finish."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self._clock = clock

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        command.deadline = self._clock() + self.seconds
        if sys.version_info < (3, 11):  # pragma: no cover - no asyncio.timeout before 3.11
            try:
                return await asyncio.wait_for(call_next(command), self.seconds)
            except asyncio.TimeoutError as err:
                raise CommandTimeoutError(command.name, self.seconds, command.attempt) from err
        scope = asyncio.timeout(self.seconds)
        try:
            async with scope:
                return await call_next(command)
        except TimeoutError as err:
            if scope.expired():
                raise CommandTimeoutError(command.name, self.seconds, command.attempt) from err
            raise


def build(settings: TimeoutSettings, context: BuildContext) -> TimeoutStage | None:
    if settings.deadline is None:
        return None
    return TimeoutStage(settings.deadline, context.clock)


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("timeout", TimeoutSettings, build, description=TimeoutStage.__doc__ or "")
