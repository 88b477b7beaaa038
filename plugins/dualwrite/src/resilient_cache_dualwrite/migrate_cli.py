"""``resilient-cache migrate copy|verify``: the command line of :mod:`.migrate` and
:mod:`.migrate_verify`, which do the work; this module parses, shows progress and prints.

Standard output gets what a script reads (the mismatches, one summary line); standard error
gets the progress and the notes. Neither ever shows a password or a value, and keys only with
``verify --show-keys``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TextIO

import redis.asyncio
from redis.exceptions import RedisError

from resilient_cache import ConfigurationError, RedisClusterClient, ResilientCacheError
from resilient_cache_dualwrite.migrate import (
    CopyOptions,
    CopyProgress,
    MigrationError,
    Source,
    check_distinct,
    copy_keys,
    load_state,
    open_source,
    open_target,
    parse_source,
)
from resilient_cache_dualwrite.migrate_verify import (
    KINDS,
    Mismatch,
    VerifyOptions,
    VerifyProgress,
    verify_keys,
)

DEFAULT_STATE = "./.resilient-cache-migrate.json"
EXIT_INTERRUPTED = 130

_COPY_NOTES = """\
what is copied:
  Every key present in the source for the whole copy is copied at least once (SCAN's
  guarantee). A key written or deleted in the source while the copy runs may or may not be:
  turn on the dualwrite stage (REDIS_DUALWRITE__*) before copying, so that such writes reach
  the cluster on their own. Keys already in the cluster are replaced (RESTORE ... REPLACE);
  TTLs are kept. Memory use is about --count keys' values at a time. The cluster's client is
  the configured one (REDIS_* settings: TLS, credentials, retries, breakers) without its
  memory and dualwrite stages.

resuming:
  After every batch restored in full, the SCAN cursor is saved in --state (with the source's
  address, never its password). Ctrl-C stops after the batch in flight (a second Ctrl-C at
  once); running the same command again resumes from the cursor, --restart starts over.
  A source restarted since makes the cursor meaningless: that is refused when the source's
  run_id shows it, and needs --restart in any case. The file is removed when the copy ends.

exit status:
  0    every key copied
  1    RESTOREs failed (run it again to retry them), or the source or the cluster unreachable
  2    bad arguments or configuration (REDIS_* settings, --source, a state file of another copy)
  130  interrupted: run the same command again to resume
"""

_VERIFY_NOTES = """\
what is compared:
  For each key of the source (or of --sample): whether the cluster has it, its TYPE, its value
  (strings, hashes, lists, sets, sorted sets with scores, stream entries; other types by DUMP
  payload) and its TTL (both without one, or both within --ttl-tolerance). A key that differs
  is read again before it is reported, so one written during the check is not. Keys only the
  cluster has are not looked for. --sample draws keys uniformly by reservoir sampling over one
  SCAN of the whole source (so --match applies; only the N keys drawn are held in memory).

output:
  One line per mismatch (up to --max-report): its kind (missing, type, value, ttl), the types
  and TTLs, and the key as a fingerprint (the first 12 hex digits of its SHA-256), the key
  itself only with --show-keys. Never a value. Then one summary line.

exit status:
  0  no mismatch    1  mismatches, or the source or the cluster unreachable
  2  bad arguments or configuration
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``resilient-cache migrate`` (called by the core CLI)."""
    formatter = argparse.RawDescriptionHelpFormatter  # keeps the notes' layout
    actions = parser.add_subparsers(dest="action", required=True)
    copy = actions.add_parser(
        "copy",
        help="copy the keys of an old single Redis into the cluster (DUMP/RESTORE, resumable)",
        description="Copy the keys of the single Redis --source into the configured cluster "
        "(REDIS_CLUSTER_NODES etc., or --nodes), with their TTLs, batch by batch; progress "
        "on stderr, a summary on stdout.",
        epilog=_COPY_NOTES,
        formatter_class=formatter,
    )
    _add_common(copy)
    copy.add_argument(
        "--state",
        metavar="PATH",
        default=DEFAULT_STATE,
        help=f"the resume file (default {DEFAULT_STATE})",
    )
    copy.add_argument("--restart", action="store_true", help="ignore --state: start over")
    copy.add_argument(
        "--max-failures",
        metavar="N",
        type=_whole,
        default=1000,
        help="stop after N failed RESTOREs (default 1000; 0: never stop)",
    )
    copy.add_argument(
        "--progress-interval",
        metavar="SECONDS",
        type=_seconds,
        default=2.0,
        help="seconds between progress lines when stderr is not a terminal (default 2)",
    )
    verify = actions.add_parser(
        "verify",
        help="compare the old Redis's keys with the cluster's: existence, type, value, TTL",
        description="Compare every key of the single Redis --source (or --sample N of them) "
        "with the configured cluster's (or --nodes).",
        epilog=_VERIFY_NOTES,
        formatter_class=formatter,
    )
    _add_common(verify)
    verify.add_argument(
        "--sample", metavar="N", type=_positive, help="check N keys drawn at random, not all"
    )
    verify.add_argument(
        "--ttl-tolerance",
        metavar="SECONDS",
        type=_seconds,
        default=2.0,
        help="how far two expiring TTLs may differ (default 2)",
    )
    verify.add_argument(
        "--max-report",
        metavar="N",
        type=_whole,
        default=20,
        help="print at most N mismatch lines; all are counted (default 20)",
    )
    verify.add_argument(
        "--show-keys", action="store_true", help="print the keys, not only their fingerprints"
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        required=True,
        metavar="URL",
        help="the old Redis: redis://[:password@]host:port/db or rediss://... (the password "
        "is never printed nor saved)",
    )
    parser.add_argument(
        "--nodes",
        metavar="HOST:PORT,...",
        help="the cluster's nodes, instead of REDIS_CLUSTER_NODES (the other REDIS_* "
        "settings still apply)",
    )
    parser.add_argument(
        "--match", metavar="PATTERN", help="only keys matching this SCAN MATCH pattern"
    )
    parser.add_argument(
        "--count", metavar="N", type=_positive, default=1000, help="keys per batch (default 1000)"
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive,
        default=4,
        help="pipelines in flight on the cluster; each batch is split into N (default 4)",
    )


def _positive(text: str) -> int:
    value = _whole(text)
    if not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number > 0")
    return value


def _whole(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``migrate copy`` or ``migrate verify``; the exit status. A ConfigurationError is
    left to the core CLI (one line, exit 2)."""
    source = parse_source(args.source)
    if args.action == "copy":
        return asyncio.run(_copy(args, source))
    return asyncio.run(_verify(args, source))


# -- copy ------------------------------------------------------------------------------------


async def _copy(args: argparse.Namespace, source: Source) -> int:
    state_path = Path(args.state)
    if not state_path.parent.is_dir():
        raise ConfigurationError(f"--state {state_path}: {state_path.parent} is not a directory")
    resume = None if args.restart else load_state(state_path, source, args.match)
    target = open_target(args.nodes)
    check_distinct(source, target)  # against its seeds now, before anything is copied
    options = CopyOptions(state_path, args.match, args.count, args.concurrency, args.max_failures)
    display = ProgressLine(sys.stderr, args.progress_interval)
    seen: list[CopyProgress] = []

    def progress(now: CopyProgress) -> None:
        seen[:] = [now]
        display.show(_copy_line(now))

    if resume is not None:
        _say(f"resuming from cursor {resume.cursor} ({resume.keys:,} keys copied before)")
    stop = asyncio.Event()
    try:
        with _interruptible(stop, display):
            async with _connected(source) as client, _cluster(target):
                result = await copy_keys(
                    client, source, target, options, resume=resume, progress=progress, stop=stop
                )
    except asyncio.CancelledError:  # a second Ctrl-C
        display.end()
        copied = seen[0].keys if seen else resume.keys if resume else 0
        _say(f"aborted after {copied:,} keys; run the same command again to resume")
        return EXIT_INTERRUPTED
    except MigrationError as err:
        display.end()
        _say(str(err))
        return 1
    display.end()
    done = result.progress
    if result.interrupted:
        _say(f"interrupted after {done.keys:,} keys; run the same command again to resume")
        return EXIT_INTERRUPTED
    print(_copy_summary(done))
    if done.failed:
        stopped = "" if result.complete else f"; stopped at --max-failures {args.max_failures}"
        _say(
            f"{done.failed:,} RESTOREs failed (the first: {result.first_error}){stopped}; "
            "run the same command again to retry from the last batch copied in full"
        )
        return 1
    return 0


def _copy_line(now: CopyProgress) -> str:
    eta = f", ETA {_duration(now.eta)}" if now.eta is not None else ""
    failed = f", {now.failed:,} failed" if now.failed else ""
    return f"copied {now.keys:,} keys ({_size(now.bytes)}), {now.rate:,.0f} keys/s{eta}{failed}"


def _copy_summary(done: CopyProgress) -> str:
    vanished = f"; {done.vanished:,} vanished from the source first" if done.vanished else ""
    before = done.keys - done.run_keys
    resumed = f" ({done.keys:,} with the runs before)" if before else ""
    return (
        f"copied {done.run_keys:,} keys{resumed}, {_size(done.bytes)} in {done.elapsed:.1f} s "
        f"({done.rate:,.0f} keys/s){vanished}"
    )


# -- verify ----------------------------------------------------------------------------------


async def _verify(args: argparse.Namespace, source: Source) -> int:
    target = open_target(args.nodes)
    check_distinct(source, target)
    options = VerifyOptions(
        args.match, args.count, args.concurrency, args.sample, args.ttl_tolerance
    )
    display = ProgressLine(sys.stderr, 2.0)
    printed = 0

    def report(mismatch: Mismatch) -> None:
        nonlocal printed
        if printed < args.max_report:
            display.clear()
            print(_mismatch_line(mismatch, args.show_keys), flush=True)
            printed += 1

    def progress(now: VerifyProgress) -> None:
        rate = now.checked / now.elapsed if now.elapsed > 0 else 0.0
        left = max(now.total - now.checked, 0) / rate if now.total is not None and rate else None
        eta = f", ETA {_duration(left)}" if left is not None else ""
        display.show(f"checked {now.checked:,} keys, {now.mismatches:,} mismatches{eta}")

    try:
        async with _connected(source) as client, _cluster(target):
            result = await verify_keys(
                client, source, target, options, report=report, progress=progress
            )
    except MigrationError as err:
        display.end()
        _say(str(err))
        return 1
    display.end()
    total = sum(result.mismatches.values())
    if total > printed:
        print(f"({total - printed:,} more mismatches not shown: see --max-report)")
    kinds = ", ".join(f"{kind} {result.mismatches[kind]:,}" for kind in KINDS)
    vanished = f"; {result.vanished:,} vanished from the source" if result.vanished else ""
    print(
        f"checked {result.checked:,} keys: {total:,} mismatches ({kinds}) "
        f"in {result.seconds:.1f} s{vanished}"
    )
    return 1 if total else 0


def _mismatch_line(mismatch: Mismatch, show_key: bool) -> str:
    key = mismatch.fingerprint
    if show_key:
        key += f" {mismatch.key.decode('utf-8', 'backslashreplace')!r}"
    cluster = (
        "no such key"
        if mismatch.kind == "missing"
        else f"{mismatch.target_type}, {_ttl(mismatch.target_ttl)}"
    )
    return (
        f"{mismatch.kind:<7} key {key}: source {mismatch.source_type}, "
        f"{_ttl(mismatch.source_ttl)}; cluster {cluster}"
    )


def _ttl(pttl: int) -> str:
    return "no ttl" if pttl == -1 else "gone" if pttl < 0 else f"ttl {pttl / 1000:.1f}s"


# -- shared ----------------------------------------------------------------------------------


class ProgressLine:
    """Progress on a stream (stderr): on a terminal one line rewritten in place, at most ten
    times a second; otherwise (a log, a pipe) one line every ``interval`` seconds, so a log
    gets a few lines and not one per batch."""

    def __init__(
        self, stream: TextIO, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = min(interval, 0.1) if self._tty else interval
        self._clock = clock
        self._last = -math.inf
        self._width = 0  # of the line on screen (terminal only)
        self._latest = ""

    def show(self, text: str) -> None:
        self._latest = text
        now = self._clock()
        if now - self._last < self._interval:
            return
        self._last = now
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def clear(self) -> None:
        """Blank the line on screen, before something else is printed."""
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0

    def end(self) -> None:
        """Leave the latest line on screen (a terminal's may have been skipped) and move on."""
        if self._width:
            self._stream.write("\r" + self._latest.ljust(self._width) + "\n")
            self._stream.flush()
            self._width = 0


def _say(message: str) -> None:
    print(f"resilient-cache: migrate: {message}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def _connected(source: Source) -> AsyncIterator[redis.asyncio.Redis]:
    """The source's client, after a PING: an unreachable source is one line, naming it."""
    client = open_source(source)
    try:
        try:
            await client.ping()
        except RedisError as err:
            raise MigrationError(
                f"cannot reach the source {source.shown}: {type(err).__name__}: {err}"
            ) from err
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _cluster(target: RedisClusterClient) -> AsyncIterator[None]:
    """``async with target``, its failures (connecting included) as one line."""
    try:
        async with target:
            yield
    except ConfigurationError:
        raise
    except (RedisError, ResilientCacheError) as err:
        raise MigrationError(f"cluster: {type(err).__name__}: {err}") from err


@contextlib.contextmanager
def _interruptible(stop: asyncio.Event, display: ProgressLine) -> Iterator[None]:
    """Ctrl-C sets ``stop`` (the copy finishes its batch in flight and saves it); a second one
    cancels the running task at once. SIGINT is handled explicitly, not as KeyboardInterrupt,
    which could land anywhere (inside the state file's write, say); the handler is removed on
    the way out."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def interrupt() -> None:
        if stop.is_set():
            if task is not None:
                task.cancel()
            return
        stop.set()
        display.end()
        _say("stopping after the batch in flight (Ctrl-C again to abort at once)")

    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
    except (NotImplementedError, RuntimeError, ValueError):  # Windows; not the main thread
        installed = False
    else:
        installed = True
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


def _size(count: int) -> str:
    value, unit = float(count), "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
