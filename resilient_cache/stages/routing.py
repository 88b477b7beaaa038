"""The routing stage: picks the node for this attempt from the current slot map.

It sits inside retry, so each attempt is routed afresh: after a connection error the backend
marks its topology stale, routing has the slot map re-read in the background (a caller never
waits on it), and a retry after its backoff goes to the new primary.
Knowing the node before the call is also what lets the breaker stage keep one breaker per node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, Handler

if TYPE_CHECKING:
    from resilient_cache.backends import Backend
    from resilient_cache.registry import BuildContext, StageRegistry


class RoutingSettings(BaseModel):
    """``REDIS_ROUTING__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    read_from_replicas: bool = Field(
        default=False,
        description="Send read-only commands to replicas too (round robin with the primary). "
        "Replicas can lag: a read may miss a write made just before.",
    )


class RoutingStage:
    def __init__(self, backend: Backend, read_from_replicas: bool) -> None:
        self._backend = backend
        self._replicas = read_from_replicas

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        backend = self._backend
        if backend.topology_stale:
            backend.request_refresh()  # in the background: never wait on a hung cluster
        command.node = backend.route(command, self._replicas)
        return await call_next(command)


def build(settings: RoutingSettings, context: BuildContext) -> RoutingStage | None:
    if not context.backend.routes_per_node:
        return None  # one node: nothing to route
    if settings.read_from_replicas:
        context.backend.enable_replica_reads()
    return RoutingStage(context.backend, settings.read_from_replicas)


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("routing", RoutingSettings, build, description="Picks the node per attempt.")
