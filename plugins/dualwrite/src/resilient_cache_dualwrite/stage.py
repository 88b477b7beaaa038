"""The ``dualwrite`` stage: the cluster and the old single Redis side by side, by mode.

``REDIS_DUALWRITE__MODE`` says which Redis is the truth while a service moves to the cluster:

- ``off`` and ``cluster``: the stage is left out of the pipeline (it costs nothing); ``cluster``
  is the name for "the move is done".
- ``shadow``: the old Redis is the truth. Keyed reads go to it alone; writes go to it first (its
  reply or error is the caller's), then to the cluster, whose failures are counted and logged
  but never reach the caller.
- ``dual``: the cluster is the truth. Every command runs on the cluster; writes are then queued
  for the old Redis and sent in the background, in order (a bounded queue; an old Redis that is
  down or slow never fails or slows a caller). A single-key read that finds nothing on the
  cluster asks the old Redis, answers from it, and copies the key into the cluster (back-fill),
  keeping its TTL.

A multi-key command whose keys hash to different slots is refused in ``shadow`` and ``dual``
before it reaches either Redis, with an error that says why (the cluster would refuse it, and
splitting it would break its atomicity). Place the stage outside the cluster's retry and timeout
(``tracing,metrics,dualwrite,memory,timeout,retry,routing,breaker``): its calls to the old Redis
have their own timeout (``SOURCE_TIMEOUT``) and no retry, and its back-fill and existence checks
go through the rest of the pipeline like any command.

Errors from the old Redis never quote a command's arguments (keys and values), and the old
Redis's URL is a secret (its password is never shown).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry.metrics import Counter, Meter
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resilient_cache import BuildContext, Command, Handler

logger = logging.getLogger("resilient_cache_dualwrite")

Mode = Literal["off", "shadow", "dual", "cluster"]

#: Batch commands (``client.pipeline()``): the sub-commands are in ``command.args`` as
#: ``(args, options)`` pairs, ``args[0]`` the name.
PIPELINE, TRANSACTION = "PIPELINE", "MULTI"
#: Writes without keys that still change the data, so they go to both Redis.
KEYLESS_DATA_WRITES = frozenset({"FLUSHALL", "FLUSHDB"})
#: Scripts and functions write keys the command table cannot list (their keys follow numkeys).
SCRIPT_WRITES = frozenset({"EVAL", "EVALSHA", "FCALL"})
#: Options that mean something to the cluster client only.
CLUSTER_ONLY_OPTIONS = frozenset({"target_nodes", "slots"})

#: Counters (when the client exports metrics); the first two by outcome (``OUTCOME``).
SOURCE_WRITES = "resilient_cache.dualwrite.source_writes"
FALLBACKS = "resilient_cache.dualwrite.fallbacks"
CLUSTER_WRITE_FAILURES = "resilient_cache.dualwrite.cluster_write_failures"
BACKFILLS = "resilient_cache.dualwrite.backfills"
OUTCOME = "resilient_cache.dualwrite.outcome"


class DualWriteSettings(BaseModel):
    """``REDIS_DUALWRITE__*``"""

    # A misspelt variable is an error, not ignored; no input (the URL holds a password) is shown.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    mode: Mode = Field(
        default="off",
        description="off | shadow (the old Redis is the truth) | dual (the cluster is the "
        "truth; writes also go to the old Redis) | cluster (the move is done).",
    )
    source_url: SecretStr | None = Field(
        default=None,
        validate_default=True,
        description="The old single Redis, redis://[:password@]host:port/db (or rediss://, "
        "unix://); required in shadow and dual.",
    )
    source_timeout: float = Field(
        default=1.0, gt=0, le=60, description="Seconds for one call to the old Redis."
    )
    queue_size: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="dual: writes waiting for the old Redis; beyond it the newest are dropped "
        "(counted and logged).",
    )
    retry_interval: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="dual: seconds between tries of writes the old Redis did not take.",
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="dual: tries of a write to the old Redis before it is dropped.",
    )
    backfill: bool = Field(
        default=True,
        description="dual: copy a key found only in the old Redis into the cluster.",
    )
    drain_timeout: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="dual: seconds client.disconnect() waits for queued writes to reach the "
        "old Redis.",
    )

    @field_validator("source_url")
    @classmethod
    def _needed_and_well_formed(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        mode = info.data.get("mode")
        if value is None or not value.get_secret_value():
            if mode in ("shadow", "dual"):
                raise ValueError(f"the old Redis's URL is required in mode {mode}")
            return None
        url = value.get_secret_value()
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in ("redis", "rediss", "unix"):
            # Never the URL itself: it may hold a password.
            raise ValueError("expected redis://host:port/db, rediss://... or unix://path")
        try:
            Redis.from_url(url)
        except ValueError as err:
            raise ValueError(f"not a Redis URL ({type(err).__name__})") from None
        return value


@dataclass
class DualWriteStats:
    """What the stage did so far (also counted as OpenTelemetry metrics when exported)."""

    source_writes_ok: int = 0
    source_writes_failed: int = 0  # the old Redis answered an error, or every try failed
    source_writes_dropped: int = 0  # the queue was full
    cluster_write_failures: int = 0  # shadow: the cluster side of a write failed
    fallbacks_found: int = 0  # dual: a cluster miss the old Redis had
    fallbacks_absent: int = 0  # dual: a miss on both
    fallbacks_failed: int = 0  # dual: the old Redis could not be asked (the cluster's reply)
    backfills: int = 0  # dual: keys copied into the cluster


class CrossSlotCommandError(ResponseError):
    """A multi-key command whose keys hash to different slots, refused by the dualwrite stage
    before it reaches either Redis. A ``ResponseError``, like the cluster's own ``CROSSSLOT``."""


class SourceError(RedisError):
    """The old Redis failed a command in ``shadow`` mode (where it is the truth). The message
    names the command and the error's kind, never its arguments; ``kind`` is the class of the
    original error (``ConnectionError``, ``ResponseError``, ...)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _is_batch(command: Command) -> bool:
    return command.name in (PIPELINE, TRANSACTION)


def _writes_data(command: Command) -> bool:
    """Whether the command changes data, so that both Redis must see it."""
    if command.read_only:
        return False
    name = command.name
    return _keyed(command) or name in SCRIPT_WRITES or name in KEYLESS_DATA_WRITES


def _keyed(command: Command) -> bool:
    """Whether the command touches keys (``None``: keys it cannot name, so any key)."""
    return command.keys is None or len(command.keys) > 0


def _parts(command: Command) -> list[Command]:
    return [Command.from_call(args, options) for args, options in command.args]


def _looks_missing(reply: Any) -> bool:
    """A reply a missing key gives: nil, an empty string or collection, or 0 (LLEN, EXISTS)."""
    if reply is None:
        return True
    if type(reply) is int:
        return reply == 0
    if isinstance(reply, bytes | str | list | tuple | dict | set):
        return len(reply) == 0
    return False


def _quotes(message: str, arguments: Iterable[Any]) -> bool:
    for argument in arguments:
        if isinstance(argument, bytes):
            text = argument.decode("utf-8", "replace")
        elif isinstance(argument, str | int | float):
            text = str(argument)
        else:
            continue
        if len(text) >= 3 and text in message:
            return True
    return False


def _source_error(command: Command, err: BaseException) -> SourceError:
    """``err`` from the old Redis, retold without the command's arguments."""
    kind = type(err).__name__
    detail = str(err).splitlines()[0] if str(err) else ""
    arguments = (
        [argument for args, _ in command.args for argument in args]
        if _is_batch(command)
        else list(command.args)
    )
    if not detail or "caused error" in detail or _quotes(detail, arguments):
        detail = "(message withheld: it quotes the command)"
    return SourceError(f"{command.name} on the old Redis failed: {kind}: {detail}", kind)


class _Telemetry:
    """The stage's counters: plain numbers always, OpenTelemetry counters when exported."""

    def __init__(self, meter: Callable[[], Meter | None]) -> None:
        self.stats = DualWriteStats()
        self._meter: Callable[[], Meter | None] | None = meter
        self._counters: dict[str, Counter] | None = None

    def count(self, field: str, amount: int = 1) -> None:
        setattr(self.stats, field, getattr(self.stats, field) + amount)
        counters = self._counters
        if counters is None and self._meter is not None:
            meter, self._meter = self._meter(), None  # asked once
            if meter is not None:
                counters = self._counters = {
                    name: meter.create_counter(name, unit="{command}", description=text)
                    for name, text in (
                        (SOURCE_WRITES, "Writes sent to the old Redis, by outcome."),
                        (FALLBACKS, "Cluster misses asked of the old Redis, by outcome."),
                        (CLUSTER_WRITE_FAILURES, "shadow: cluster sides of writes that failed."),
                        (BACKFILLS, "dual: keys copied from the old Redis into the cluster."),
                    )
                }
        if counters is None:
            return
        name, outcome = _COUNTER_OF[field]
        counters[name].add(amount, {OUTCOME: outcome} if outcome else {})


_COUNTER_OF = {
    "source_writes_ok": (SOURCE_WRITES, "ok"),
    "source_writes_failed": (SOURCE_WRITES, "failed"),
    "source_writes_dropped": (SOURCE_WRITES, "dropped"),
    "fallbacks_found": (FALLBACKS, "found"),
    "fallbacks_absent": (FALLBACKS, "absent"),
    "fallbacks_failed": (FALLBACKS, "failed"),
    "backfills": (BACKFILLS, ""),
    "cluster_write_failures": (CLUSTER_WRITE_FAILURES, ""),
}


class DualWriteStage:
    """The ``dualwrite`` stage in mode ``shadow`` or ``dual`` (see the module's docstring)."""

    def __init__(
        self,
        settings: DualWriteSettings,
        source: Redis,
        meter: Callable[[], Meter | None] = lambda: None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.mode = settings.mode
        self._settings = settings
        self._source = source
        self._encode = source.get_encoder().encode
        self._telemetry = _Telemetry(meter)
        self._sleep = sleep
        self._queue: collections.deque[Command] = collections.deque()
        self._queued = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        # Keys being back-filled, and whether a write to them passed meanwhile (then the copy
        # from the old Redis may be stale and is not written).
        self._backfilling: dict[Any, bool] = {}

    @property
    def stats(self) -> DualWriteStats:
        return self._telemetry.stats

    @property
    def pending(self) -> int:
        """dual: writes queued for the old Redis and not yet sent."""
        return len(self._queue)

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        keys = command.keys
        if keys is not None and len(keys) > 1 and not _is_batch(command):
            self._refuse_cross_slot(keys, command.name)
        if self.mode == "shadow":
            return await self._shadow(command, call_next)
        return await self._dual(command, call_next)

    # -- shadow: the old Redis is the truth -------------------------------------------------

    async def _shadow(self, command: Command, call_next: Handler) -> Any:
        if _is_batch(command):
            parts = _parts(command)
            writes = any(_writes_data(part) for part in parts)
            if not writes and not any(_keyed(part) for part in parts):
                return await call_next(command)  # nothing keyed: the cluster's business
            reply = await self._on_source(command)
            if writes:
                await self._also_on_cluster(command, call_next)
            return reply
        if _writes_data(command):
            reply = await self._on_source(command)
            await self._also_on_cluster(command, call_next)
            return reply
        if _keyed(command):
            return await self._on_source(command)
        return await call_next(command)  # PING, INFO, CLUSTER ...: the cluster's business

    async def _also_on_cluster(self, command: Command, call_next: Handler) -> None:
        try:
            await call_next(command)
        except Exception as err:  # the old Redis is the truth: count it, never fail the caller
            self._telemetry.count("cluster_write_failures")
            logger.warning(
                "dualwrite (shadow): %s failed on the cluster: %s", command.name, type(err).__name__
            )

    # -- dual: the cluster is the truth ------------------------------------------------------

    async def _dual(self, command: Command, call_next: Handler) -> Any:
        batch = _is_batch(command)
        writes = any(_writes_data(p) for p in _parts(command)) if batch else _writes_data(command)
        if writes:
            if self._backfilling:
                self._mark_written(command)
            reply = await call_next(command)
            self._enqueue(command)
            return reply
        reply = await call_next(command)
        if (
            not batch
            and command.keys is not None
            and len(command.keys) == 1
            and command.read_only
            and _looks_missing(reply)
            and not self._closing
        ):
            return await self._fall_back(command, call_next, reply)
        return reply

    async def _fall_back(self, command: Command, call_next: Handler, missed: Any) -> Any:
        """A read found nothing on the cluster: if the key is absent there, answer from the
        old Redis, and copy the key into the cluster (unless a write to it passed meanwhile)."""
        key = command.keys[0]  # type: ignore[index]  # one known key (see _dual)
        if await call_next(Command("EXISTS", (key,))):
            return missed  # the key is there: the reply was the real one (an empty field, ...)
        self._backfilling.setdefault(key, False)
        try:
            try:
                pipe = self._source.pipeline(transaction=True)
                pipe.dump(key)
                pipe.pttl(key)
                pipe.execute_command(command.name, *command.args, **self._options(command))
                payload, pttl, reply = await pipe.execute()
            except Exception as err:
                self._telemetry.count("fallbacks_failed")
                logger.warning(
                    "dualwrite: the old Redis could not be asked after a cluster miss (%s): %s",
                    command.name,
                    type(err).__name__,
                )
                return missed
            if payload is None:
                self._telemetry.count("fallbacks_absent")
                return missed
            self._telemetry.count("fallbacks_found")
            if self._settings.backfill and not self._backfilling.get(key):
                await self._restore(key, payload, pttl, call_next)
            return reply
        finally:
            self._backfilling.pop(key, None)

    async def _restore(self, key: Any, payload: bytes, pttl: int, call_next: Handler) -> None:
        if pttl == -2 or pttl == 0:
            return  # it expired between the two reads
        ttl = pttl if pttl > 0 else 0  # -1: no TTL, which RESTORE spells 0
        try:
            # No REPLACE: a write that reached the cluster since the miss wins.
            await call_next(Command("RESTORE", (key, ttl, payload)))
        except ResponseError as err:
            if "BUSYKEY" not in str(err):
                logger.warning("dualwrite: back-fill failed: %s", type(err).__name__)
            return
        except Exception as err:  # the caller has its reply from the old Redis
            logger.warning("dualwrite: back-fill failed: %s", type(err).__name__)
            return
        self._telemetry.count("backfills")

    def _mark_written(self, command: Command) -> None:
        parts = _parts(command) if _is_batch(command) else [command]
        for part in parts:
            for key in part.keys or ():
                if key in self._backfilling:
                    self._backfilling[key] = True

    # -- the queue of writes for the old Redis ----------------------------------------------

    def _enqueue(self, command: Command) -> None:
        if len(self._queue) >= self._settings.queue_size:
            self._telemetry.count("source_writes_dropped")
            if self.stats.source_writes_dropped in (1, 10, 100) or (
                self.stats.source_writes_dropped % 1000 == 0
            ):
                logger.warning(
                    "dualwrite: %d write(s) for the old Redis dropped so far: its queue of %d "
                    "is full (is the old Redis down?)",
                    self.stats.source_writes_dropped,
                    self._settings.queue_size,
                )
            return
        self._queue.append(command)
        self._queued.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._send_queued(), name="resilient_cache_dualwrite.source_writes"
            )

    async def _send_queued(self) -> None:
        """Send the queued writes to the old Redis in order, a chunk per round trip."""
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._queued.clear()
                await self._queued.wait()
                continue
            chunk = [self._queue[i] for i in range(min(len(self._queue), 256))]
            for attempt in range(1, self._settings.max_attempts + 1):
                try:
                    await self._send_chunk(chunk)
                    break
                except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                    if attempt == self._settings.max_attempts:
                        self._telemetry.count("source_writes_failed", len(chunk))
                        logger.warning(
                            "dualwrite: %d write(s) to the old Redis dropped after %d tries: %s",
                            len(chunk),
                            attempt,
                            type(err).__name__,
                        )
                        break
                    # At least once: a chunk that failed mid-way is sent again whole.
                    await self._sleep(self._settings.retry_interval)
                except Exception as err:  # redis-py refused to send it (an argument it cannot
                    # encode...): trying again cannot help, and the queue must move on.
                    self._telemetry.count("source_writes_failed", len(chunk))
                    logger.warning(
                        "dualwrite: %d write(s) to the old Redis dropped: %s",
                        len(chunk),
                        type(err).__name__,
                    )
                    break
            for _ in chunk:
                self._queue.popleft()

    async def _send_chunk(self, chunk: Sequence[Command]) -> None:
        """One round trip for the plain writes of ``chunk``, one per transaction (a MULTI
        stays a MULTI on the old Redis), in the order they ran on the cluster."""
        replies: list[Any] = []
        plain: Any = None
        for command in chunk:
            if command.name == TRANSACTION:
                if plain is not None:
                    replies += await plain.execute(raise_on_error=False)
                    plain = None
                transaction = self._source.pipeline(transaction=True)
                for args, options in command.args:
                    transaction.execute_command(*args, **self._strip(options))
                replies += await transaction.execute(raise_on_error=False)
                continue
            if plain is None:
                plain = self._source.pipeline(transaction=False)
            if command.name == PIPELINE:
                for args, options in command.args:
                    if _writes_data(Command.from_call(args, options)):
                        plain.execute_command(*args, **self._strip(options))
            else:
                plain.execute_command(command.name, *command.args, **self._options(command))
        if plain is not None:
            replies += await plain.execute(raise_on_error=False)
        failed = [reply for reply in replies if isinstance(reply, Exception)]
        for reply in failed:
            if isinstance(reply, RedisConnectionError | RedisTimeoutError):
                raise reply
        self._telemetry.count("source_writes_ok", len(chunk) - min(len(failed), len(chunk)))
        if failed:
            self._telemetry.count("source_writes_failed", min(len(failed), len(chunk)))
            logger.warning(
                "dualwrite: the old Redis refused %d write(s): %s",
                len(failed),
                ", ".join(sorted({type(reply).__name__ for reply in failed})),
            )

    # -- the old Redis ----------------------------------------------------------------------

    async def _on_source(self, command: Command) -> Any:
        try:
            if _is_batch(command):
                pipe = self._source.pipeline(transaction=command.name == TRANSACTION)
                for args, options in command.args:
                    pipe.execute_command(*args, **self._strip(options))
                replies = await pipe.execute(raise_on_error=False)
                replies = [
                    _source_error(command, r) if isinstance(r, Exception) else r for r in replies
                ]
                first = next((r for r in replies if isinstance(r, Exception)), None)
                if first is not None and command.options.get("raise_on_error", True):
                    raise first
                return replies
            return await self._source.execute_command(
                command.name, *command.args, **self._options(command)
            )
        except SourceError:
            raise
        except Exception as err:
            error = _source_error(command, err)
        raise error  # outside the except block: never chained to redis-py's error

    def _options(self, command: Command) -> dict[str, Any]:
        return self._strip(command.options)

    @staticmethod
    def _strip(options: dict[str, Any]) -> dict[str, Any]:
        if not options or not CLUSTER_ONLY_OPTIONS.intersection(options):
            return options
        return {k: v for k, v in options.items() if k not in CLUSTER_ONLY_OPTIONS}

    def _refuse_cross_slot(self, keys: Sequence[Any], name: str) -> None:
        slots = {key_slot(self._encode(key)) for key in keys}
        if len(slots) > 1:
            raise CrossSlotCommandError(
                f"{name}: its {len(keys)} keys hash to {len(slots)} different "
                "slots. Redis Cluster refuses a multi-key command across slots, so the "
                "dualwrite stage sent it to neither Redis (splitting it would break its "
                "atomicity). Give the keys a common hash tag ({user42}:a, {user42}:b), or use "
                "the client's *_nonatomic helpers."
            )

    async def aclose(self) -> None:
        """Let queued writes reach the old Redis (up to ``drain_timeout``), then close it."""
        self._closing = True
        self._queued.set()
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            done, _ = await asyncio.wait({worker}, timeout=self._settings.drain_timeout)
            if not done:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
                if self._queue:
                    logger.warning(
                        "dualwrite: %d write(s) never reached the old Redis (disconnect after "
                        "%.1fs)",
                        len(self._queue),
                        self._settings.drain_timeout,
                    )
        await self._source.aclose()


def make_dualwrite_stage(settings: DualWriteSettings, context: BuildContext) -> Any:
    """The stage factory: ``None`` (no stage at all) in modes ``off`` and ``cluster``."""
    if settings.mode in ("off", "cluster") or settings.source_url is None:
        return None
    core = context.settings
    source = Redis.from_url(
        settings.source_url.get_secret_value(),
        socket_timeout=settings.source_timeout,
        socket_connect_timeout=settings.source_timeout,
        decode_responses=core.decode_responses,
    )

    def meter() -> Meter | None:
        # Only when the client exports metrics (the build made its instruments then).
        if context.stats.instruments is None:
            return None
        from resilient_cache_dualwrite import __version__

        return context.meter_provider.get_meter("resilient_cache_dualwrite", __version__)

    return DualWriteStage(settings, source, meter=meter, sleep=context.sleep)
