"""A stage for tests: counts the commands passing through it per node, now and at the peak.

Register it as a plugin and place it with ``stages=[..., "probe", ...]``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from pydantic import BaseModel

from resilient_cache import Command, Handler, StageRegistry, hookimpl


class _NoSettings(BaseModel):
    pass


class ConcurrencyProbe:
    """``now[node]`` commands inside it right now, ``peak[node]`` the most at once. ``hold``
    seconds are spent inside before going on (so callers pile up behind a limit)."""

    def __init__(self, hold: float = 0.0) -> None:
        self.hold = hold
        self.now: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        node = command.node.name if command.node is not None else "cluster"
        self.now[node] += 1
        self.peak[node] = max(self.peak[node], self.now[node])
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            return await call_next(command)
        finally:
            self.now[node] -= 1

    @hookimpl
    def resilient_cache_register_stages(self, registry: StageRegistry) -> None:
        registry.add("probe", _NoSettings, lambda settings, context: self)


class CommandLog:
    """``names``: every command that passed through it, in order (register it as stage
    ``commandlog``)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        self.names.append(command.name)
        return await call_next(command)

    @hookimpl
    def resilient_cache_register_stages(self, registry: StageRegistry) -> None:
        registry.add("commandlog", _NoSettings, lambda settings, context: self)
