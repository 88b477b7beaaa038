"""The memory stage: an in-process tier in front of Redis for safe read commands.

Off unless ``REDIS_MEMORY__ENABLED=true``. It caches the replies of the read commands in
:data:`~resilient_cache.commands.CACHEABLE` per key (optionally only keys under
``key_prefixes``), bounded by ``max_size`` entries and ``max_bytes`` estimated bytes (least
recently used out first). An entry is served for ``ttl`` seconds, never past the key's own
expiry when this client set it (``SET ... EX``, ``EXPIRE``, ...). Writes through this client
drop the entries of the keys they touch at once, and again when they return; a read that raced
a write never stores its older reply (per-key generations). With ``coherence`` on (the default
once the tier is enabled) writes made by *any* other client are seen through RESP3 client
tracking (:mod:`resilient_cache.coherence`), and the tier is flushed and bypassed whenever that
cannot be guaranteed. docs/stages.md (memory) and docs/coherence.md describe the guarantees and
limits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from resilient_cache.commands import (
    ALL_KEYS,
    CACHEABLE,
    OWN_WRITES_REPORTED,
    READ_ONLY_COMMANDS,
    changed_keys,
    upper_option,
    written_keys,
)
from resilient_cache.hookspecs import hookimpl
from resilient_cache.key_specs import keys_of
from resilient_cache.own_writes import Note, OwnWrites
from resilient_cache.pipeline import BATCH_NAMES, Command, Handler
from resilient_cache.ttl_lru import TTLLRU

if TYPE_CHECKING:
    from collections.abc import Callable

    from resilient_cache.backends import Backend
    from resilient_cache.coherence import TrackingCoherence
    from resilient_cache.registry import BuildContext, StageRegistry

#: Writes that set or clear a key's TTL (see MemoryStage._note_expiry).
_TTL_WRITES = frozenset(
    {"SET", "SETEX", "PSETEX", "GETEX", "GETSET", "MSET", "MSETNX", "PERSIST"}
    | {"EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT"}
)


EntryId = tuple[str, tuple[Any, ...]]  # (command name, arguments): what was sent
Entry = tuple[Any, bytes]  # (reply, canonical key); its expiry and size are the LRU's


# Expiry options and commands: (seconds per unit, absolute Unix time?).
_EXPIRY_UNITS: dict[str, tuple[float, bool]] = {
    "EX": (1.0, False),
    "PX": (0.001, False),
    "EXAT": (1.0, True),
    "PXAT": (0.001, True),
    "EXPIRE": (1.0, False),
    "PEXPIRE": (0.001, False),
    "EXPIREAT": (1.0, True),
    "PEXPIREAT": (0.001, True),
}


def _expires_at(option: str, value: float, now: float, wall: float) -> float:
    """The expiry on the stage clock (``now``) of ``option value``; ``wall`` is Unix time now."""
    scale, absolute = _EXPIRY_UNITS[option]
    seconds = value * scale
    return now + (seconds - wall if absolute else seconds)


class MemorySettings(BaseModel):
    """``REDIS_MEMORY__*``"""

    model_config = ConfigDict(extra="forbid")  # a misspelt variable is an error

    enabled: bool = Field(default=False, description="Turn the memory tier on.")
    max_size: int = Field(
        default=1000, ge=1, le=100_000_000, description="Most entries kept (LRU beyond)."
    )
    max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        le=2**40,
        description="Most estimated bytes of replies and keys kept (LRU beyond).",
    )
    ttl: float = Field(
        default=5.0, gt=0, le=86_400, description="Seconds an entry is served at most."
    )
    cleanup_interval: float = Field(
        default=60.0, ge=0.01, le=86_400, description="Seconds between sweeps of expired entries."
    )
    key_prefixes: list[str] = Field(
        default_factory=list,
        description="Only cache keys starting with one of these (all if empty).",
    )
    coherence: bool = Field(
        default=True,
        description="Follow writes by other clients with RESP3 client tracking (BCAST); "
        "flush and bypass the tier while that link is down.",
    )
    coherence_check_interval: float = Field(
        default=1.0,
        ge=0.01,
        le=3600,
        description="Seconds between pings of, and topology checks for, links.",
    )
    coherence_timeout: float = Field(
        default=1.0,
        ge=0.001,
        le=3600,
        description="Seconds to connect, to answer a ping, and for the first command to wait "
        "for the links.",
    )


def estimate_size(value: Any) -> int:
    """A cheap estimate of the bytes a reply holds: lengths of bytes/str, sums for containers."""
    kind = type(value)
    if kind is bytes or kind is str:
        return len(value) + 33
    if kind is list or kind is tuple or kind is set:
        return 56 + sum(estimate_size(item) for item in value)
    if kind is dict:
        return 232 + sum(estimate_size(k) + estimate_size(v) for k, v in value.items())
    return 24


def _canonical(key: Any) -> bytes:
    """The key as Redis sees it (what redis-py's default encoder sends)."""
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    return repr(key).encode()  # int, float


class MemoryStage:
    """The in-process tier. ``hits``, ``misses``, ``evictions`` are read by the metrics."""

    def __init__(
        self,
        settings: MemorySettings,
        clock: Callable[[], float],
        backend: Backend | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_size = settings.max_size
        self.max_bytes = settings.max_bytes
        self.ttl = settings.ttl
        self.cleanup_interval = settings.cleanup_interval
        self._prefixes = tuple(p.encode() for p in settings.key_prefixes)
        self._clock = clock
        self._wall = wall_clock
        # (command name, args) -> (reply, canonical key), until its own expiry; the LRU tells
        # of every entry it drops by itself, so the per-key index follows.
        self._entries: TTLLRU[EntryId, Entry] = TTLLRU(
            settings.max_size,
            max_bytes=settings.max_bytes,
            cleanup_interval=settings.cleanup_interval,
            clock=clock,
            on_drop=self._dropped,
        )
        self._by_key: dict[bytes, set[EntryId]] = {}
        #: Per-key generation, bumped on each invalidation; a read stores its reply only if its
        #: key's generation (and the epoch) did not move while it ran.
        self._generations: dict[bytes, int] = {}
        self._max_generations = max(4 * settings.max_size, 1024)
        self._epoch = 0
        #: This client's writes per key whose report on the tracking link is still to come.
        self._own_writes = OwnWrites(max_keys=self._max_generations)
        #: Known expiry (on ``clock``) of keys this client gave a TTL.
        self._expiry: dict[bytes, float] = {}
        self._max_expiry = max(4 * settings.max_size, 1024)
        self._next_sweep = clock() + settings.cleanup_interval
        self.hits = 0
        self.misses = 0
        #: Reads not stored or served because coherence was not established.
        self.bypassed = 0
        #: Reads a replica answered (``read_from_replicas``): passed on, not stored.
        self.replica_replies = 0
        self.coherence: TrackingCoherence | None = None
        self._coherence_timeout = settings.coherence_timeout
        self._serving = True
        if settings.coherence and backend is not None:
            from resilient_cache.coherence import TrackingCoherence

            self.coherence = TrackingCoherence(
                backend,
                settings.key_prefixes,
                on_invalidate=self._on_push,
                on_ready=self._on_ready,
                check_interval=settings.coherence_check_interval,
                timeout=settings.coherence_timeout,
            )
            self._serving = False  # until every link is up

    # -- the stage --------------------------------------------------------------------------

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        name = command.name
        if name in CACHEABLE:
            # An entry is found by what was sent, (name, args), which holds its one key: a hit
            # needs no key extraction or encoding. Keys are worked out on a miss.
            entry_id = (name, command.args)
            try:
                entry = self._entries.hit(entry_id)
            except TypeError:  # an unhashable argument: not cacheable
                return await call_next(command)
            if entry is not None:
                self.hits += 1
                command.served_from_memory = True
                return entry[0]
            return await self._miss(entry_id, command, call_next)
        if command.read_only:
            return await call_next(command)
        return await self._write(command, call_next)

    async def _miss(self, entry_id: EntryId, command: Command, call_next: Handler) -> Any:
        keys = command.keys
        if keys is None or len(keys) != 1:
            return await call_next(command)  # several keys (or unknown ones): not cached
        key = keys[0]
        if type(key) is not bytes:
            key = _canonical(key)
        if self._prefixes and not key.startswith(self._prefixes):
            return await call_next(command)
        if self.coherence is not None and not self.coherence.started:
            await self._start_coherence()
        self.misses += 1
        generation = self._generations.get(key, 0)
        epoch = self._epoch
        reply = await call_next(command)
        if not self._serving:
            self.bypassed += 1
        elif getattr(command.node, "server_type", "primary") != "primary":
            # A replica may not have applied a write whose invalidation already came and went:
            # its reply is passed on, never kept past its own moment.
            self.replica_replies += 1
        elif epoch == self._epoch and self._generations.get(key, 0) == generation:
            self._store(key, entry_id, reply)
        return reply

    async def _write(self, command: Command, call_next: Handler) -> Any:
        if self.coherence is not None and not self.coherence.started:
            await self._start_coherence()
        parts = list(self._parts(command))
        written = [written_keys(name, args, keys) for name, args, keys in parts]
        self._drop(written)
        own = self._expect_reports(command, written) if self._serving else None
        start = self._clock()
        wall = self._wall()
        try:
            reply = await call_next(command)
        except BaseException:
            self._drop(written)
            if own:
                self._settle_reports(own, None, ())
            raise
        # Again once it has run: a read sent after the first drop may have been answered
        # before the write was applied, and must not be stored.
        self._drop(written)
        for name, args, keys in parts:
            self._note_expiry(name, args, keys, start, wall)
        if own:
            self._settle_reports(own, command, reply)
        return reply

    @staticmethod
    def _parts(command: Command) -> Iterator[tuple[str, tuple[Any, ...], Any]]:
        if command.name not in BATCH_NAMES:
            yield command.name, command.args, command.keys
            return
        for args, options in command.args:  # a batch: (args, options) of each command
            if not args:
                continue
            name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            name = name.upper()
            if name in READ_ONLY_COMMANDS:
                continue  # a read in the batch changes nothing
            rest = tuple(args[1:])
            yield name, rest, options.get("keys") or keys_of(name, rest)

    # -- invalidation -----------------------------------------------------------------------

    def _drop(self, written: list[tuple[Any, ...] | None]) -> None:
        for keys in written:
            if keys is ALL_KEYS:
                self.clear()
                return
            for key in keys:
                self.invalidate(key)

    def invalidate(self, key: Any) -> None:
        """Drop every entry of ``key`` and make reads of it in flight not store their reply."""
        if type(key) is not bytes:
            key = _canonical(key)
        if self._prefixes and not key.startswith(self._prefixes):
            return  # never cached
        generations = self._generations
        generations[key] = generations.get(key, 0) + 1
        if len(generations) > self._max_generations:
            generations.clear()
            self._epoch += 1  # reads in flight cannot compare generations any more
        ids = self._by_key.pop(key, None)
        if ids:
            entries = self._entries
            for entry_id in ids:
                entries.delete(entry_id)

    def clear(self) -> None:
        """Drop everything; reads in flight do not store their reply."""
        self._entries.clear()
        self._by_key.clear()
        self._generations.clear()
        self._epoch += 1

    def _on_push(self, keys: list[bytes] | None, node: str = "") -> None:
        if keys is None:
            self.clear()
            self._expiry.clear()
            self._own_writes.clear()
            return
        own_writes = self._own_writes
        for key in keys:
            if own_writes and key in own_writes and own_writes.reported(key, node):
                continue
            self.invalidate(key)

    def _on_ready(self, ready: bool) -> None:
        self.clear()  # entries stored before the links were up may have missed a push
        self._own_writes.clear()  # a report still to come may have been lost with a link
        self._serving = ready

    # -- this client's own writes (see resilient_cache/own_writes.py) -------------------------

    def _expect_reports(
        self, command: Command, written: list[tuple[Any, ...] | None]
    ) -> list[tuple[bytes, Note]] | None:
        if self.coherence is None or command.name not in OWN_WRITES_REPORTED or len(written) != 1:
            return None
        keys = written[0]
        if not keys:
            return None
        canonical = (k if type(k) is bytes else _canonical(k) for k in keys)
        return self._own_writes.note(k for k in canonical if self._cacheable(k))

    def _settle_reports(
        self, noted: list[tuple[bytes, Note]], command: Command | None, reply: Any
    ) -> None:
        node = self._node_of(command) if command is not None else None
        changed: set[bytes] = set()
        if node is not None and command is not None:
            changed = {
                _canonical(k) for k in changed_keys(command.name, command.args, command.keys, reply)
            }
        self._own_writes.settle(noted, node, changed)

    def _node_of(self, command: Command) -> str | None:
        """The primary the write ran on (the link its report comes on)."""
        if command.node is not None:
            return command.node.name
        links = self.coherence.link_states() if self.coherence is not None else {}
        return next(iter(links)) if len(links) == 1 else None  # a single Redis

    # -- storing ----------------------------------------------------------------------------

    def _store(self, key: bytes, entry_id: EntryId, reply: Any) -> None:
        now = self._clock()
        expires = now + self.ttl
        key_expiry = self._expiry.get(key)
        if key_expiry is not None and key_expiry < expires:
            expires = key_expiry
        if expires <= now:
            return
        size = estimate_size(reply) + len(key) + 64
        if size > self.max_bytes:
            return
        # Indexed first: if the LRU evicts this very entry for room, on_drop finds it.
        self._by_key.setdefault(key, set()).add(entry_id)
        self._entries.set(entry_id, (reply, key), expires, size)
        if now >= self._next_sweep:
            self.sweep(now)

    def _dropped(self, entry_id: EntryId, entry: Entry) -> None:
        """The LRU dropped an entry by itself (dead, or evicted for room): unindex it."""
        key = entry[1]
        ids = self._by_key.get(key)
        if ids is not None:
            ids.discard(entry_id)
            if not ids:
                del self._by_key[key]

    @property
    def evictions(self) -> int:
        """Live entries dropped to stay within ``max_size`` / ``max_bytes``."""
        return int(self._entries.evictions)

    def expires_at(self, key: Any) -> float | None:
        """The latest time (on the stage clock) an entry of ``key`` is served until, if any."""
        ids = self._by_key.get(_canonical(key), ())
        times = [t for t in (self._entries.dies_at(i) for i in ids) if t is not None]
        return max(times) if times else None

    def sweep(self, now: float | None = None) -> int:
        """Drop expired entries and expired key TTLs; return how many entries went."""
        if now is None:
            now = self._clock()
        self._next_sweep = now + self.cleanup_interval
        for key in [k for k, at in self._expiry.items() if at <= now]:
            del self._expiry[key]
        return int(self._entries.sweep(now))

    # -- key expiry -------------------------------------------------------------------------

    def _note_expiry(
        self, name: str, args: tuple[Any, ...], keys: Any, now: float, wall: float
    ) -> None:
        """Remember when a key written through this client expires (or that it does not)."""
        if name in _TTL_WRITES:
            pass
        elif name in ("DEL", "UNLINK", "GETDEL"):
            for key in keys:
                self._expiry.pop(_canonical(key), None)
            return
        elif name in ("RENAME", "RENAMENX", "COPY") and len(args) >= 2:
            source, target = _canonical(args[0]), _canonical(args[1])
            if self._cacheable(target):
                source_at = self._expiry.get(source)
                if source_at is None:
                    self._expiry.pop(target, None)  # keeps the source's TTL, unknown
                else:
                    self._remember(target, source_at)
            if name != "COPY":
                self._expiry.pop(source, None)
            return
        else:
            return  # other writes keep the key's TTL
        if name in ("MSET", "MSETNX"):
            for key in keys:
                self._expiry.pop(_canonical(key), None)  # no TTL any more
            return
        if not args:
            return
        key = _canonical(args[0])
        if not self._cacheable(key):
            return
        options = [upper_option(a) for a in args[1:]]
        at: float | None
        conditional = False
        try:
            if name == "SETEX":
                at = now + float(args[1])
            elif name == "PSETEX":
                at = now + float(args[1]) / 1000
            elif name == "PERSIST" or name == "GETSET":
                at = None
            elif name in ("EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT"):
                at = _expires_at(name, float(args[1]), now, wall)
                conditional = any(o in ("NX", "XX", "GT", "LT") for o in options[1:])
            else:  # SET, GETEX: options after the value (SET) or after the key (GETEX)
                rest = options[1:] if name == "SET" else options
                raw = list(args[2:] if name == "SET" else args[1:])
                if "KEEPTTL" in rest or (name == "GETEX" and not rest):
                    return
                at = None
                for i, option in enumerate(rest[:-1]):
                    if option in ("EX", "PX", "EXAT", "PXAT"):
                        at = _expires_at(option, float(raw[i + 1]), now, wall)
                conditional = "NX" in rest or "XX" in rest
        except (IndexError, TypeError, ValueError):
            self._expiry.pop(key, None)
            return
        if conditional:  # it may not have applied: the earlier of the two is safe
            known = self._expiry.get(key)
            if at is None or (known is not None and known < at):
                at = known
        if at is None:
            self._expiry.pop(key, None)
        else:
            self._remember(key, at)

    def _cacheable(self, key: bytes) -> bool:
        return not self._prefixes or key.startswith(self._prefixes)

    def _remember(self, key: bytes, at: float) -> None:
        expiry = self._expiry
        expiry.pop(key, None)
        expiry[key] = at
        if len(expiry) > self._max_expiry:
            self.sweep()
            while len(expiry) > self._max_expiry:
                # Forgotten: that key's entries fall back to ``ttl``; drop its entries now so
                # nothing is served past the TTL that was known.
                oldest = next(iter(expiry))
                del expiry[oldest]
                self.invalidate(oldest)

    # -- coherence --------------------------------------------------------------------------

    async def _start_coherence(self) -> None:
        coherence = self.coherence
        assert coherence is not None
        coherence.start()
        await coherence.wait_ready(self._coherence_timeout)

    async def start(self) -> None:
        """Start coherence now (otherwise the first command does); wait for its links."""
        if self.coherence is not None and not self.coherence.started:
            await self._start_coherence()

    def holds(self, key: Any) -> bool:
        """Whether the tier holds any entry of ``key`` (expired ones included until swept)."""
        return _canonical(key) in self._by_key

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def serving(self) -> bool:
        """Whether the tier serves and stores (False while coherence is not established)."""
        return self._serving

    async def aclose(self) -> None:
        """Stop coherence (called by the client on disconnect); the tier is emptied."""
        if self.coherence is not None:
            await self.coherence.stop()
        self.clear()
        self._expiry.clear()
        self._own_writes.clear()

    # Last in the class: from here on ``bytes`` in this class body names the property.
    @property
    def bytes(self) -> int:
        """Estimated bytes held."""
        return int(self._entries.bytes)


def build(settings: MemorySettings, context: BuildContext) -> MemoryStage | None:
    if not settings.enabled:
        return None
    stage = MemoryStage(settings, context.clock, context.backend)
    context.served_locally.update(CACHEABLE)  # tracing then names no node for them up front
    context.tier = stage  # its hits, misses and evictions are reported as metrics
    return stage


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add("memory", MemorySettings, build, description="In-process read tier.")
