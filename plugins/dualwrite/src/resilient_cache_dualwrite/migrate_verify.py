"""Check a copy: the engine of ``resilient-cache migrate verify`` (see :mod:`.migrate`).

Values are compared logically (a hash as a dict, a zset as members and scores, ...), not as
DUMP payloads: a key written to the cluster by the dualwrite stage, or RESTOREd by a server of
another version, may hold the same value in another encoding or payload version. Only types
without a reader here (module types) compare their DUMP payloads. TTLs are compared as PTTL,
expiring ones within a tolerance, since the two servers are read a few milliseconds apart and
RESTORE set the cluster's TTL a little after the source's was read.

A verify compares the source with the cluster, not the reverse: a key only the cluster holds is
not reported. Nothing here prints, and a :class:`Mismatch` never holds a value.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import redis.asyncio
from redis.exceptions import RedisError

from resilient_cache import RedisClusterClient, ResilientCacheError
from resilient_cache_dualwrite.migrate import (
    MigrationError,
    Source,
    check_distinct,
    source_errors,
    source_facts,
)

__all__ = [
    "KINDS",
    "Kind",
    "Mismatch",
    "VerifyOptions",
    "VerifyProgress",
    "VerifyResult",
    "verify_keys",
]

Kind = Literal["missing", "type", "value", "ttl"]
KINDS: tuple[Kind, ...] = ("missing", "type", "value", "ttl")

#: How a value is read to compare it, by TYPE; any other type compares DUMP payloads.
_READERS: dict[str, tuple[str, ...]] = {
    "string": ("GET",),
    "hash": ("HGETALL",),
    "list": ("LRANGE", "0", "-1"),
    "set": ("SMEMBERS",),
    "zset": ("ZRANGE", "0", "-1", "WITHSCORES"),
    "stream": ("XRANGE", "-", "+"),
}


@dataclass(frozen=True)
class Mismatch:
    """One key that differs. Holds the key (shown only when asked) but never a value."""

    key: bytes = field(repr=False)
    kind: Kind
    source_type: str
    target_type: str  # "none" when missing
    source_ttl: int  # PTTL in ms: -1 no expiry, -2 no key
    target_ttl: int

    @property
    def fingerprint(self) -> str:
        """Names the key without showing it: the first 12 hex digits of its SHA-256."""
        return hashlib.sha256(self.key).hexdigest()[:12]


@dataclass(frozen=True)
class VerifyOptions:
    match: str | None = None
    count: int = 1000  # keys per batch
    concurrency: int = 4  # pipelines in flight on the cluster per batch
    sample: int | None = None  # check this many keys drawn at random, not all
    ttl_tolerance: float = 2.0  # seconds two expiring TTLs may differ by
    seed: int | None = None  # of the sample's draws (None: a fresh one each time)


@dataclass(frozen=True)
class VerifyProgress:
    checked: int
    mismatches: int
    elapsed: float
    total: int | None  # keys to check: DBSIZE, the sample, or None with a match pattern


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    vanished: int  # gone from the source during the check: not counted as checked
    mismatches: dict[Kind, int]
    seconds: float


async def verify_keys(
    client: redis.asyncio.Redis,
    source: Source,
    target: RedisClusterClient,
    options: VerifyOptions,
    *,
    report: Callable[[Mismatch], None] = lambda _: None,
    progress: Callable[[VerifyProgress], None] = lambda _: None,
) -> VerifyResult:
    """Compare the source's keys (or a sample) with the cluster's: existence, type, value and
    TTL. A key that differs is read again once before it is reported, so a key written (or
    expired) between the two reads is not reported; the second answer counts."""
    check_distinct(source, target)
    started = time.monotonic()
    _, size = await source_facts(client, source)
    total = None if options.match else size
    if options.sample is not None:
        total = min(options.sample, total) if total is not None else options.sample
    counts = dict.fromkeys(KINDS, 0)
    checked = vanished = 0
    async for keys in _key_batches(client, source, options):
        found, gone = await _compare(client, source, target, keys, options, typed=False)
        if found:
            again = [mismatch.key for mismatch in found]
            found, gone_again = await _compare(client, source, target, again, options, typed=True)
            gone += gone_again
        for mismatch in found:
            counts[mismatch.kind] += 1
            report(mismatch)
        checked, vanished = checked + len(keys) - gone, vanished + gone
        progress(VerifyProgress(checked, sum(counts.values()), time.monotonic() - started, total))
    return VerifyResult(checked, vanished, counts, time.monotonic() - started)


async def _key_batches(
    client: redis.asyncio.Redis, source: Source, options: VerifyOptions
) -> AsyncIterator[list[bytes]]:
    """The keys to check, in batches: every key SCAN returns, or a uniform sample of them
    (reservoir sampling over one SCAN, so --match applies and no key is drawn twice)."""
    with source_errors(source):
        if options.sample is None:
            cursor = 0
            while True:
                cursor, keys = await client.scan(cursor, match=options.match, count=options.count)
                if keys:
                    yield cast("list[bytes]", keys)  # the client does not decode
                if cursor == 0:
                    return
        draw, seen = random.Random(options.seed), 0
        reservoir: list[bytes] = []
        async for key in client.scan_iter(match=options.match, count=options.count):
            seen += 1
            if len(reservoir) < options.sample:
                reservoir.append(key)
            elif (slot := draw.randrange(seen)) < options.sample:
                reservoir[slot] = key
    for start in range(0, len(reservoir), options.count):
        yield reservoir[start : start + options.count]


async def _compare(
    client: redis.asyncio.Redis,
    source: Source,
    target: RedisClusterClient,
    keys: Sequence[bytes],
    options: VerifyOptions,
    *,
    typed: bool,
) -> tuple[list[Mismatch], int]:
    """The keys of ``keys`` that differ, and how many are gone from the source. The source is
    read in two pipelines (TYPE and PTTL, then each value by its type), the cluster at the
    same time as the second, in ``options.concurrency`` pipelines.

    On the cluster the first pass (``typed=False``) reads only PTTL and the value, the
    source's way: a missing key answers PTTL -2, another type an error. That is a third less
    work; every key it finds different is read again with ``typed=True``, which reads TYPE
    too and is what gets reported."""
    with source_errors(source):
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
            pipe.pttl(key)
        head = await pipe.execute()
        live = [
            (key, _text(kind), int(ttl))
            for key, kind, ttl in zip(keys, head[0::2], head[1::2], strict=True)
            if _text(kind) != "none"
        ]
        pipe = client.pipeline(transaction=False)
        for key, kind, _ in live:
            pipe.execute_command(*_reader(kind, key))
        values, theirs = await asyncio.gather(
            pipe.execute(raise_on_error=False),  # an error: a key changed meanwhile
            _read_target(target, live, options.concurrency, typed),
        )
    tolerance = round(options.ttl_tolerance * 1000)
    found = []
    for (key, kind, ttl), value, (their_kind, their_ttl, their_value) in zip(
        live, values, theirs, strict=True
    ):
        if their_kind == "none":
            if 0 <= ttl <= tolerance:
                continue  # expires within the tolerance anyway
            verdict: Kind = "missing"
        elif their_kind != kind:
            verdict = "type"
        elif _normal(kind, value) != _normal(kind, their_value):
            verdict = "value"
        elif not (
            ttl == their_ttl if min(ttl, their_ttl) < 0 else abs(ttl - their_ttl) <= tolerance
        ):
            verdict = "ttl"
        else:
            continue
        found.append(Mismatch(key, verdict, kind, their_kind, ttl, their_ttl))
    return found, len(keys) - len(live)


async def _read_target(
    target: RedisClusterClient,
    live: Sequence[tuple[bytes, str, int]],
    concurrency: int,
    typed: bool,
) -> list[tuple[str, int, Any]]:
    """(type, PTTL, value read as the source's type) of each key on the cluster; untyped,
    the type is the source's unless PTTL says "none" or the read failed ("?")."""
    size = max(1, -(-len(live) // concurrency))
    width = 3 if typed else 2

    async def read(chunk: Sequence[tuple[bytes, str, int]]) -> list[tuple[str, int, Any]]:
        pipe = target.pipeline(transaction=False)
        for key, kind, _ in chunk:
            if typed:
                pipe.execute_command("TYPE", key)
            pipe.execute_command("PTTL", key).execute_command(*_reader(kind, key))
        replies = await pipe.execute(raise_on_error=False)
        rows = []
        for index, (_, kind, _) in enumerate(chunk):
            row = replies[width * index : width * (index + 1)]
            ttl, value = _checked(row[-2]), row[-1]
            if typed:
                their_kind = _text(_checked(row[0]))
                if their_kind == kind:
                    _checked(value)
            else:
                failed = isinstance(value, BaseException)
                their_kind = "none" if ttl == -2 else "?" if failed else kind
            rows.append((their_kind, int(ttl), value))
        return rows

    try:
        chunks = [live[i : i + size] for i in range(0, len(live), size)]
        return [row for rows in await asyncio.gather(*map(read, chunks)) for row in rows]
    except (RedisError, ResilientCacheError) as err:
        raise MigrationError(f"cluster: {type(err).__name__}: {err}") from err


def _checked(reply: Any) -> Any:
    if isinstance(reply, BaseException):
        raise MigrationError(f"cluster: {type(reply).__name__}: {reply}")
    return reply


def _reader(kind: str, key: bytes) -> tuple[Any, ...]:
    name, *rest = _READERS.get(kind, ("DUMP",))
    return (name, key, *rest)


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _normal(kind: str, value: Any) -> Any:
    """``value`` in one shape whatever the protocol (RESP2 or RESP3) and redis-py's parsing."""
    if isinstance(value, BaseException):
        return value  # equal to nothing: the key is read again
    if kind == "hash":
        return dict(value) if isinstance(value, dict) else dict(_pairs(value))
    if kind == "set":
        return set(value)
    if kind == "zset":
        return [(member, float(score)) for member, score in _pairs(value)]
    if kind == "stream":
        return [(entry, dict(fields) if isinstance(fields, dict) else dict(_pairs(fields)))
                for entry, fields in value]  # fmt: skip
    return list(value) if kind == "list" else value


def _pairs(reply: Sequence[Any]) -> list[tuple[Any, Any]]:
    """``[a, 1, b, 2]`` (RESP2) or ``[[a, 1], [b, 2]]`` (RESP3) as ``[(a, 1), (b, 2)]``."""
    if reply and isinstance(reply[0], list | tuple):
        return [(first, second) for first, second in reply]
    items = iter(reply)
    return list(zip(items, items, strict=True))
