"""The breaker stage: fails fast while the node an attempt goes to keeps failing.

One breaker per node (the one routing chose; ``"cluster"`` for commands routing could not place),
so a dead primary never blocks the healthy shards. Only infrastructure failures count (see
:func:`resilient_cache.circuit.is_infrastructure_failure`): a WRONGTYPE reply proves the node is
alive. While open, calls are refused with ``CircuitBreakerOpenError`` without touching the network.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache.circuit import BreakerBoard, is_infrastructure_failure
from resilient_cache.errors import CircuitBreakerOpenError
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, Handler

if TYPE_CHECKING:
    from resilient_cache.backends import Backend
    from resilient_cache.plugins import BuildContext, StageRegistry

CLUSTER_SCOPE = "cluster"


class BreakerSettings(BaseModel):
    """``REDIS_BREAKER__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    threshold: int = Field(default=5, ge=1, description="Consecutive failures that open it.")
    reset_timeout: float = Field(
        default=60.0, gt=0, description="Seconds it stays open before letting a probe through."
    )
    half_open_max_calls: int = Field(
        default=1, ge=1, description="Probes let through at once while half-open."
    )


class BreakerStage:
    def __init__(self, board: BreakerBoard, backend: Backend | None = None) -> None:
        self._board = board
        self._backend = backend

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        node = command.node
        breaker = self._board.get(node.name if node is not None else CLUSTER_SCOPE)
        try:
            breaker.before_call()
        except CircuitBreakerOpenError:
            # The node is failing; its slots may have moved to a new primary by now. Ask for a
            # fresh slot map so the retry stage's next attempt can be routed there.
            if node is not None and self._backend is not None:
                self._backend.request_refresh()
            raise
        try:
            result = await call_next(command)
        except asyncio.CancelledError:
            breaker.on_ignored()
            raise
        except Exception as err:
            if is_infrastructure_failure(err):
                breaker.on_failure()
            else:
                breaker.on_success()  # the node answered; the error is the caller's
            raise
        breaker.on_success()
        return result


def build(settings: BreakerSettings, context: BuildContext) -> BreakerStage:
    context.breakers.configure(
        threshold=settings.threshold,
        reset_timeout=settings.reset_timeout,
        half_open_max_calls=settings.half_open_max_calls,
    )
    return BreakerStage(context.breakers, context.backend)


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("breaker", BreakerSettings, build, description="Per-node circuit breakers.")
