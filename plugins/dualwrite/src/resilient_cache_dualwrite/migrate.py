"""Copy an old single Redis's keys into the cluster: the engine of ``resilient-cache migrate
copy`` (its command line is :mod:`.migrate_cli`; ``verify`` is :mod:`.migrate_verify`).

Keys are copied with DUMP/RESTORE: the payload carries the value in Redis's own serialisation,
every type included (stream consumer groups and module types too), so nothing is re-encoded
here. The source is walked with SCAN, which never blocks it the way KEYS would and guarantees
that every key present for the whole walk is returned at least once; a key written during the
walk may be missed, which is what the dualwrite stage's dual writes cover. The SCAN cursor of
the last batch fully restored is saved after every batch, so an interrupted copy resumes there.

Nothing here prints: progress goes to an injected callback, results come back as dataclasses,
and errors worth one line to a user are :class:`MigrationError` (or ``ConfigurationError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import redis.asyncio
from redis.exceptions import RedisError

from resilient_cache import (
    ConfigurationError,
    RedisClusterClient,
    ResilientCacheError,
    create_redis_cluster,
    parse_cluster_nodes,
)

__all__ = [
    "CopyOptions",
    "CopyProgress",
    "CopyResult",
    "CopyState",
    "MigrationError",
    "Source",
    "check_distinct",
    "copy_keys",
    "describe_url",
    "load_state",
    "open_source",
    "open_target",
    "parse_source",
    "source_errors",
    "source_facts",
]

URL_FORM = "redis://[:password@]host:port/db (or rediss://)"
#: Stages left out of the target's pipeline: the memory tier would answer verify's reads from
#: this process, and the dualwrite stage would send RESTOREs and reads to the old Redis too.
BYPASSED_STAGES = frozenset({"memory", "dualwrite"})


class MigrationError(Exception):
    """A failure to report in one line (exit 1): the source or the cluster unreachable, a
    state file that cannot be written. Messages never hold a password, a key or a value."""


# -- the source ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The old single Redis: where it is, and how to show it (``shown``, password masked)."""

    url: str = field(repr=False)  # with the password: never shown, never saved
    shown: str
    host: str
    port: int
    db: int


def describe_url(url: str) -> str:
    """``url`` safe to show: ``redis://***@host:port/db``, without user, password or query."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or 6379
        host = parts.hostname or ""
    except ValueError:
        return "(an unreadable URL)"
    if not parts.scheme or not host:
        return "(not a URL)"
    host = f"[{host}]" if ":" in host else host
    credentials = "***@" if parts.username or parts.password or "@" in parts.netloc else ""
    return f"{parts.scheme}://{credentials}{host}:{port}/{_db_text(parts.path, parts.query)}"


def _db_text(path: str, query: str) -> str:
    return path.strip("/") or parse_qs(query).get("db", ["0"])[0]


def parse_source(url: str) -> Source:
    """The ``--source`` URL, checked; ``ConfigurationError`` naming ``--source`` if it is bad
    (never quoting the URL itself, which may hold a password)."""
    shown = describe_url(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port or 6379
    except ValueError:
        raise ConfigurationError(f"--source: not a URL of the form {URL_FORM}") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigurationError(f"--source: not a URL of the form {URL_FORM}")
    db = _db_text(parts.path, parts.query)
    if not db.isdigit():
        raise ConfigurationError(f"--source {shown}: the database must be a number, as in /0")
    return Source(url.strip(), shown, parts.hostname, port, int(db))


def open_source(source: Source) -> redis.asyncio.Redis:
    """A client of the old Redis (not connected yet); bytes in, bytes out."""
    try:
        return redis.asyncio.Redis.from_url(
            source.url, decode_responses=False, socket_connect_timeout=5, socket_timeout=60
        )
    except ValueError as err:  # redis-py's messages name the option, not its value
        raise ConfigurationError(f"--source {source.shown}: {err}") from None


@contextlib.contextmanager
def source_errors(source: Source) -> Iterator[None]:
    """The source's errors as MigrationError, naming it (masked)."""
    try:
        yield
    except RedisError as err:
        raise MigrationError(f"source {source.shown}: {type(err).__name__}: {err}") from err


async def source_facts(client: redis.asyncio.Redis, source: Source) -> tuple[str | None, int]:
    """The source's run id (None if INFO is refused) and its key count, or MigrationError."""
    with source_errors(source):
        size = int(await client.dbsize())
        with contextlib.suppress(RedisError):
            return str((await client.info("server")).get("run_id")), size
    return None, size


# -- the target ------------------------------------------------------------------------------


def open_target(nodes: str | None) -> RedisClusterClient:
    """The configured cluster (``REDIS_*``), or ``nodes`` (``--nodes``) instead of its nodes,
    built to move bytes: no decoding, no health monitor, without :data:`BYPASSED_STAGES`."""
    seeds = parse_cluster_nodes(nodes, where="--nodes") if nodes is not None else None
    options: dict[str, Any] = {"decode_responses": False, "health_check_interval": 0}
    client = create_redis_cluster(seeds, **options)  # built only: nothing connects yet
    stages = client.settings.stages
    if BYPASSED_STAGES.intersection(stages):
        kept = [name for name in stages if name not in BYPASSED_STAGES]
        client = create_redis_cluster(seeds, stages=kept, **options)
    return client


def check_distinct(source: Source, target: RedisClusterClient) -> None:
    """Refuse a target that is the source itself: a verify would then prove nothing. Before
    connecting it knows the seed nodes; after, every node of the cluster."""
    if (source.host, source.port) in {(h, int(p)) for h, p in target.backend.known_nodes()}:
        raise ConfigurationError(f"--source {source.shown} is one of the cluster's own nodes")


# -- copy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyState:
    """What the state file holds: whose copy it is (never a password) and where it stands."""

    source: str  # the masked URL, for people reading the file
    host: str
    port: int
    db: int
    run_id: str | None  # the source's: a restart makes the cursor meaningless
    match: str | None
    cursor: int  # the SCAN cursor after the last batch fully restored
    keys: int
    bytes: int


def load_state(path: Path, source: Source, match: str | None) -> CopyState | None:
    """The saved state of this copy (same source and ``--match``), None if there is none;
    ``ConfigurationError`` for a state file of another copy or one that cannot be read."""
    if not path.exists():
        return None
    advice = "pass --restart to start over, or another --state"
    try:
        data = json.loads(path.read_text())
        data.pop("version", None)
        state = CopyState(**data)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ConfigurationError(
            f"--state {path}: not a copy state file ({err}); {advice}"
        ) from None
    if (state.host, state.port, state.db) != (source.host, source.port, source.db) or (
        state.match != match
    ):
        what = f"source {state.source}" + (f", match {state.match!r}" if state.match else "")
        raise ConfigurationError(f"--state {path} is for another copy ({what}); {advice}")
    return state


def _save_state(path: Path, state: CopyState) -> None:
    """Write ``path`` atomically (a temporary file, then os.replace): a crash leaves the old
    state or the new one, never half of one. Blocking, but a few milliseconds per batch."""
    text = json.dumps({"version": 1, **dataclasses.asdict(state)}, indent=2)
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(text + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as err:
        raise MigrationError(f"--state {path}: cannot write it: {err.strerror or err}") from err


@dataclass(frozen=True)
class CopyOptions:
    state_path: Path
    match: str | None = None
    count: int = 1000  # SCAN COUNT: keys per batch, roughly
    concurrency: int = 4  # RESTORE pipelines in flight per batch
    max_failures: int = 1000  # stop after this many failed RESTOREs (0: never)


@dataclass(frozen=True)
class CopyProgress:
    keys: int  # copied, by this run and the runs it resumes
    bytes: int  # DUMP payload bytes copied, the same way
    failed: int
    vanished: int  # gone from the source between SCAN and DUMP
    run_keys: int  # copied by this run
    elapsed: float  # seconds of this run
    total: int | None  # the source's DBSIZE at the start; None with a match pattern

    @property
    def rate(self) -> float:
        return self.run_keys / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.total is None or not self.rate:
            return None
        return max(self.total - self.keys, 0) / self.rate


@dataclass(frozen=True)
class CopyResult:
    progress: CopyProgress
    complete: bool  # the SCAN went round (every key present all along copied, or failed)
    interrupted: bool
    first_error: str | None  # one failed RESTORE's error (its type and message, no key)
    resumed_from: CopyState | None


Item = tuple[bytes, int, bytes]  # key, ttl (ms, 0: none), DUMP payload


async def copy_keys(
    client: redis.asyncio.Redis,
    source: Source,
    target: RedisClusterClient,
    options: CopyOptions,
    *,
    resume: CopyState | None = None,
    progress: Callable[[CopyProgress], None] = lambda _: None,
    stop: asyncio.Event | None = None,
) -> CopyResult:
    """Copy the source's keys (those matching ``options.match``) into the connected ``target``,
    one SCAN batch at a time, from ``resume``'s cursor; ``stop`` ends it after the batch in
    flight. The state advances only past batches restored in full: a rerun retries the rest."""
    check_distinct(source, target)
    run_id, size = await source_facts(client, source)
    if resume is not None and None not in (run_id, resume.run_id) and run_id != resume.run_id:
        raise ConfigurationError(
            f"the source {source.shown} restarted since --state {options.state_path} was "
            "written, so its SCAN cursor means nothing now; pass --restart to start over"
        )
    if resume is None:
        options.state_path.unlink(missing_ok=True)  # starting over: an older state is void
    started = time.monotonic()
    saved = resume or CopyState(
        source.shown, source.host, source.port, source.db, run_id, options.match, 0, 0, 0
    )
    cursor, keys, nbytes = saved.cursor, saved.keys, saved.bytes
    failed = vanished = run_keys = 0
    first_error: str | None = None
    saving = True  # every batch so far restored in full: the saved cursor may advance
    complete = False
    total = None if options.match else size
    now = CopyProgress(keys, nbytes, 0, 0, 0, 0.0, total)
    while not (stop is not None and stop.is_set()):
        cursor, items, gone = await _read_batch(client, source, cursor, options)
        errors = await _restore(target, items, options.concurrency)
        vanished += gone
        for (_, _, payload), error in zip(items, errors, strict=True):
            if error is None:
                run_keys, keys, nbytes = run_keys + 1, keys + 1, nbytes + len(payload)
            else:
                failed += 1
                first_error = first_error or f"{type(error).__name__}: {error}"
                saving = False
        complete = cursor == 0
        if saving and not complete:
            saved = dataclasses.replace(saved, cursor=cursor, keys=keys, bytes=nbytes)
            _save_state(options.state_path, saved)
        elapsed = time.monotonic() - started
        now = CopyProgress(keys, nbytes, failed, vanished, run_keys, elapsed, total)
        progress(now)
        if complete or (options.max_failures and failed >= options.max_failures):
            break
    if complete and not failed:
        options.state_path.unlink(missing_ok=True)
    interrupted = not complete and stop is not None and stop.is_set()
    return CopyResult(now, complete, interrupted, first_error, resume)


async def _read_batch(
    client: redis.asyncio.Redis, source: Source, cursor: int, options: CopyOptions
) -> tuple[int, list[Item], int]:
    """One SCAN batch with each key's DUMP payload and PTTL (one pipeline), and how many keys
    vanished between SCAN and DUMP."""
    with source_errors(source):
        cursor, found = await client.scan(cursor, match=options.match, count=options.count)
        keys = cast("list[bytes]", found)  # the client does not decode
        if not keys:
            return int(cursor), [], 0
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        replies = await pipe.execute()
    items = [
        (key, max(int(ttl), 0), payload)  # PTTL -1 (no expiry): RESTORE's ttl 0
        for key, payload, ttl in zip(keys, replies[0::2], replies[1::2], strict=True)
        if payload is not None and ttl != -2
    ]
    return int(cursor), items, len(keys) - len(items)


async def _restore(
    target: RedisClusterClient, items: Sequence[Item], concurrency: int
) -> list[BaseException | None]:
    """RESTORE ... REPLACE every item, as ``concurrency`` pipelines at once (each split per
    node by the client); the error of each item, None when it was restored. Pipelines: one
    pass through the client's stages per few hundred keys instead of one per key, measured
    about three times faster than as many single RESTOREs in flight."""
    size = max(1, -(-len(items) // concurrency))

    async def send(chunk: Sequence[Item]) -> list[BaseException | None]:
        pipe = target.pipeline(transaction=False)
        for key, ttl, payload in chunk:
            pipe.execute_command("RESTORE", key, ttl, payload, "REPLACE")
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (RedisError, ResilientCacheError) as err:
            return [err] * len(chunk)
        return [reply if isinstance(reply, BaseException) else None for reply in replies]

    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    return [error for errors in await asyncio.gather(*map(send, chunks)) for error in errors]
