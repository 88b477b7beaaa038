"""The memory stage: an in-process tier in front of Redis for safe read commands (first version).

Off unless ``REDIS_MEMORY__ENABLED=true``. It caches the replies of the read commands in
:data:`CACHEABLE` per key, for ``ttl`` seconds, at most ``max_size`` entries (least recently used
out first), optionally only for keys under ``key_prefixes``. A write through this client to a key
drops that key's entries at once. Writes made by *other* processes are not seen until the entry
expires, which is why it is off by default and the TTL is short.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, Handler

if TYPE_CHECKING:
    from collections.abc import Callable

    from resilient_cache.plugins import BuildContext, StageRegistry

#: Read commands whose reply depends only on their one key and arguments.
CACHEABLE = frozenset(
    {"GET", "HGET", "HGETALL", "HMGET", "SMEMBERS", "LRANGE", "ZRANGE", "STRLEN", "HLEN", "SCARD"}
)


class MemorySettings(BaseModel):
    """``REDIS_MEMORY__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    enabled: bool = Field(default=False, description="Turn the memory tier on.")
    max_size: int = Field(default=1000, ge=1, description="Most entries kept (LRU beyond).")
    ttl: float = Field(default=5.0, gt=0, description="Seconds an entry is served.")
    key_prefixes: list[str] = Field(
        default_factory=list,
        description="Only cache keys starting with one of these (all if empty).",
    )


class MemoryStage:
    def __init__(self, settings: MemorySettings, clock: Callable[[], float]) -> None:
        self.max_size = settings.max_size
        self.ttl = settings.ttl
        self._prefixes = tuple(settings.key_prefixes)
        self._clock = clock
        # (key, command name, args) -> (expires_at, reply)
        self._entries: OrderedDict[tuple[Any, ...], tuple[float, Any]] = OrderedDict()
        self._by_key: dict[Any, set[tuple[Any, ...]]] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def _cacheable_key(self, command: Command) -> Any:
        if len(command.keys) != 1:
            return None
        key = command.keys[0]
        if self._prefixes:
            text = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
            if not text.startswith(self._prefixes):
                return None
        return key

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        if command.name not in CACHEABLE:
            if not command.read_only:
                for key in command.keys:
                    self._invalidate(key)
            return await call_next(command)
        key = self._cacheable_key(command)
        if key is None:
            return await call_next(command)
        entry_id = (key, command.name, command.args)
        entry = self._entries.get(entry_id)
        now = self._clock()
        if entry is not None and entry[0] > now:
            self._entries.move_to_end(entry_id)
            self.hits += 1
            return entry[1]
        self.misses += 1
        reply = await call_next(command)
        self._store(key, entry_id, now + self.ttl, reply)
        return reply

    def _store(self, key: Any, entry_id: tuple[Any, ...], expires: float, reply: Any) -> None:
        self._entries[entry_id] = (expires, reply)
        self._entries.move_to_end(entry_id)
        self._by_key.setdefault(key, set()).add(entry_id)
        while len(self._entries) > self.max_size:
            old_id, _ = self._entries.popitem(last=False)
            self.evictions += 1
            ids = self._by_key.get(old_id[0])
            if ids is not None:
                ids.discard(old_id)
                if not ids:
                    del self._by_key[old_id[0]]

    def _invalidate(self, key: Any) -> None:
        for entry_id in self._by_key.pop(key, ()):
            self._entries.pop(entry_id, None)

    def clear(self) -> None:
        self._entries.clear()
        self._by_key.clear()


def build(settings: MemorySettings, context: BuildContext) -> MemoryStage | None:
    if not settings.enabled:
        return None
    return MemoryStage(settings, context.clock)


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("memory", MemorySettings, build, description="In-process read tier.")
