"""A first-party plugin stage: log Redis commands slower than a threshold.

Enable it by naming it in the pipeline, wherever it should sit::

    REDIS_STAGES=tracing,metrics,slowlog,memory,timeout,retry,routing,breaker
    REDIS_SLOWLOG__THRESHOLD_MS=25

Placed outside ``retry`` it measures the whole logical command (retries included) and reports
how many attempts it took; placed inside ``routing`` it would time each attempt on its node. The
log line names the command, the node and the time, never a key or a value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache import BuildContext, Command, Handler, StageRegistry, hookimpl

logger = logging.getLogger("resilient_cache_slowlog")

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING}
_LEVELS["ERROR"] = logging.ERROR


class SlowlogSettings(BaseModel):
    """``REDIS_SLOWLOG__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error, not ignored

    threshold_ms: float = Field(
        default=50.0, ge=0, le=3_600_000, description="Log commands slower than this."
    )
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING", description="Log level of the line."
    )


class SlowlogStage:
    def __init__(self, threshold_s: float, level: int, clock: Callable[[], float]) -> None:
        self.threshold_s = threshold_s
        self.level = level
        self._clock = clock

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        start = self._clock()
        try:
            return await call_next(command)
        finally:
            elapsed = self._clock() - start
            if elapsed >= self.threshold_s:
                node = command.node.name if command.node is not None else "-"
                logger.log(
                    self.level,
                    "slow command %s on %s: %.1f ms, %d attempt(s)",
                    command.name,
                    node,
                    elapsed * 1000.0,
                    command.attempt,
                )


def build(settings: SlowlogSettings, context: BuildContext) -> SlowlogStage:
    # context.clock: the pipeline's injected clock, so tests can drive it.
    return SlowlogStage(settings.threshold_ms / 1000.0, _LEVELS[settings.level], context.clock)


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("slowlog", SlowlogSettings, build, description="Logs slow commands.")
