"""What the benchmark scripts share: servers, clients, timing loops, the stage build, reporting.

The scripts of this package import it as a sibling module, so they run as modules from the
repository root: ``.venv/bin/python -m benchmarks.bench_pipeline`` (likewise ``bench_telemetry``
and ``bench_cache``). Each script keeps only its own measurements; docs/performance.md explains
what they measure.

- servers: :func:`cluster_nodes` (``REDIS_CLUSTER_NODES`` or a throwaway DevCluster),
  :func:`standalone_redis`, :func:`make_raw_cluster` (the raw redis-py reference);
- throughput (:func:`run_rounds`) and interleaved op-by-op latency (:func:`interleaved_latency`);
- the pipeline without the network: :func:`rebuild_stages` (the client's stages made again by
  ``resilient_cache.build``), :func:`terminal`, :func:`time_loop`, :func:`per_call_us`;
- options (:func:`parse_with_quick`), environment lines, ratio formatting, cProfile, the end of
  a run (:func:`finish`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import io
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import redis
from redis.asyncio.cluster import ClusterNode as RedisPyClusterNode
from redis.asyncio.cluster import RedisCluster

from resilient_cache import Command
from resilient_cache.build import build_stages, make_context
from resilient_cache.pipeline import Handler, Stage
from resilient_cache.settings import parse_cluster_nodes

ORDER_SEED = 20261126  # the interleaved parts shuffle the order of the clients with this seed

perf_counter = time.perf_counter
sleep0 = asyncio.sleep
# The parts without the network never suspend: give the event loop a turn every YIELD_EVERY
# calls, as a real workload does, or the timers that asyncio.timeout() schedules and cancels
# pile up in the loop's heap (they are only purged when the loop runs).
YIELD_EVERY = 1000

_T0 = perf_counter()


def progress(message: str) -> None:
    print(f"  [{perf_counter() - _T0:5.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- options


def add_round_options(
    parser: argparse.ArgumentParser, *, seconds: float, rounds: int, warmup: float = 0.3
) -> None:
    """The options every benchmark of alternating rounds takes (``run_rounds``), with its own
    defaults: the slice length, the rounds, the warm-up, the value size and ``--json``."""
    parser.add_argument(
        "--seconds", type=float, default=seconds, help="length of one timed throughput slice"
    )
    parser.add_argument("--rounds", type=int, default=rounds, help="alternating rounds per mode")
    parser.add_argument(
        "--warmup", type=float, default=warmup, help="seconds of warm-up per client and mode"
    )
    parser.add_argument("--value-size", type=int, default=16, help="bytes per value")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")


def parse_with_quick(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict[str, Any]
) -> argparse.Namespace:
    """Add ``--quick`` to ``parser`` and parse ``argv``. ``--quick`` replaces the defaults with
    ``quick`` (a short run that only checks the script works; its figures mean little); an
    option given explicitly still wins."""
    shown = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in quick.items())
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run to check the script works (figures too noisy to use): {shown}",
    )
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def cluster_nodes() -> Iterator[tuple[str, str]]:
    """Yield ``(nodes, where)``: REDIS_CLUSTER_NODES if set, else a fresh DevCluster."""
    nodes = os.environ.get("REDIS_CLUSTER_NODES")
    if nodes:
        yield nodes, "REDIS_CLUSTER_NODES"
        return
    from resilient_cache.devcluster import DevCluster

    started = perf_counter()
    with DevCluster() as cluster:
        ready = perf_counter() - started
        where = f"throwaway DevCluster (6 redis-server on 127.0.0.1, ready in {ready:.1f}s)"
        yield cluster.startup_nodes, where


@contextlib.contextmanager
def standalone_redis() -> Iterator[int]:
    """A throwaway redis-server on 127.0.0.1 (no persistence), stopped at the end."""
    from resilient_cache.devcluster import StandaloneServer

    with StandaloneServer() as server:
        yield server.port


def redis_server_version(nodes: str) -> str:
    node = parse_cluster_nodes(nodes)[0]
    client = redis.Redis(host=node.host, port=node.port, socket_timeout=5.0)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


def make_raw_cluster(nodes: str, settings: Any, **options: Any) -> RedisCluster:
    """Raw redis-py with the same socket timeouts and pool size as the library's backend
    (taken from the client's settings) and otherwise redis-py's defaults, as an application
    would use it. ``options`` are more of redis-py's keyword options (``parser_class``)."""
    return RedisCluster(
        startup_nodes=[RedisPyClusterNode(n.host, n.port) for n in parse_cluster_nodes(nodes)],
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_connect_timeout,
        max_connections=settings.max_connections,
        decode_responses=settings.decode_responses,
        **options,
    )


# --------------------------------------------------------------------------- environment


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def library_state() -> str:
    """The commit and whether the library's files had uncommitted changes (read-only git)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: no index refresh
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "resilient_cache"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {head}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


# --------------------------------------------------------------------------- throughput


@dataclass
class Mode:
    name: str
    command: str  # "GET" or "SET"
    concurrency: int  # 0 = one coroutine awaiting in a loop


async def run_sequential(
    client: Any, command: str, keys: list[str], value: bytes, secs: float
) -> float:
    """Ops/s of one coroutine awaiting ``command`` in a loop over ``keys`` for ``secs``."""
    ops = 0
    start = perf_counter()
    deadline = start + secs
    if command == "GET":
        get = client.get
        while True:
            for key in keys:
                await get(key)
            ops += len(keys)
            if perf_counter() >= deadline:
                break
    else:
        set_ = client.set
        while True:
            for key in keys:
                await set_(key, value)
            ops += len(keys)
            if perf_counter() >= deadline:
                break
    return ops / (perf_counter() - start)


async def run_concurrent(
    client: Any, command: str, keys: list[str], value: bytes, secs: float, workers: int
) -> float:
    """Ops/s of ``workers`` coroutines each awaiting ``command`` in a loop, for ``secs``."""
    running = [True]
    counts = [0] * workers

    async def worker(index: int) -> None:
        # Each worker starts at a different key so the load spreads over the shards.
        mine = keys[index % len(keys) :] + keys[: index % len(keys)]
        n = 0
        if command == "GET":
            get = client.get
            while running[0]:
                for key in mine:
                    await get(key)
                    n += 1
                    if not running[0]:
                        break
        else:
            set_ = client.set
            while running[0]:
                for key in mine:
                    await set_(key, value)
                    n += 1
                    if not running[0]:
                        break
        counts[index] = n

    start = perf_counter()
    tasks = [asyncio.ensure_future(worker(i)) for i in range(workers)]
    await asyncio.sleep(secs)
    running[0] = False
    await asyncio.gather(*tasks)
    return sum(counts) / (perf_counter() - start)


async def measure(client: Any, mode: Mode, keys: list[str], value: bytes, secs: float) -> float:
    if mode.concurrency:
        return await run_concurrent(client, mode.command, keys, value, secs, mode.concurrency)
    return await run_sequential(client, mode.command, keys, value, secs)


#: ``measure(client, mode, keys, value, secs) -> ops/s``: one slice of one client and mode.
MeasureFn = Callable[[Any, Mode, list[str], bytes, float], Awaitable[float]]


@dataclass
class Series:
    """ops/s of every client, per round, for one mode."""

    ops: dict[str, list[float]] = field(default_factory=dict)

    def add(self, client: str, value: float) -> None:
        self.ops.setdefault(client, []).append(value)

    def median(self, client: str) -> float:
        return statistics.median(self.ops[client])

    def ratios(self, num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(self.ops[num], self.ops[den], strict=True)]


async def run_rounds(
    clients: dict[str, Any],
    modes: list[Mode],
    args: argparse.Namespace,
    keys: list[str],
    value: bytes,
    label: str,
    measure_fn: MeasureFn | None = None,
) -> dict[str, Series]:
    """``args.rounds`` rounds of ``args.seconds`` per client and mode, after ``args.warmup``.

    ``measure_fn`` (default :func:`measure`) times one slice; it is called once per client and
    mode for the warm-up first, then once per round."""
    timed = measure_fn or measure
    names = list(clients)
    for mode in modes:  # warm-up: connections opened, code paths hot
        for name in names:
            await timed(clients[name], mode, keys, value, args.warmup)
    results = {mode.name: Series() for mode in modes}
    for r in range(args.rounds):
        # Rotate the order every round so no client always runs first (or right after another).
        order = names[r % len(names) :] + names[: r % len(names)]
        for mode in modes:
            for name in order:
                results[mode.name].add(
                    name, await timed(clients[name], mode, keys, value, args.seconds)
                )
        progress(f"{label}: round {r + 1}/{args.rounds} done")
    return results


# --------------------------------------------------------------------------- latency


@dataclass
class Latencies:
    """Per-op latencies (seconds) of every client, split in blocks, for one command."""

    blocks: dict[str, list[list[float]]]

    def all(self, client: str) -> list[float]:
        return [x for block in self.blocks[client] for x in block]

    def median_us(self, client: str) -> float:
        return statistics.median(self.all(client)) * 1e6

    def mean_us(self, client: str) -> float:
        return statistics.fmean(self.all(client)) * 1e6

    def p99_us(self, client: str) -> float:
        samples = sorted(self.all(client))
        return samples[min(len(samples) - 1, int(0.99 * len(samples)))] * 1e6

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "median_us": self.median_us(name),
                "mean_us": self.mean_us(name),
                "p99_us": self.p99_us(name),
                "speed_vs_raw_per_block": self.speed_ratios(name),
            }
            for name in self.blocks
        }

    def speed_ratios(self, client: str, base: str = "raw") -> list[float]:
        """Per block: median latency of ``base`` / median latency of ``client`` (higher is
        better, comparable with a throughput ratio client/base)."""
        return [
            statistics.median(b) / statistics.median(c)
            for b, c in zip(self.blocks[base], self.blocks[client], strict=True)
        ]


async def interleaved_latency(
    clients: dict[str, Any],
    command: str,
    keys: list[str],
    value: bytes,
    ops: int,
    blocks: int,
) -> Latencies:
    """Time each op on its own, the clients taking turns op by op.

    Every iteration sends the same key through each client once, in a new random order each
    time. Order matters: the first client of an iteration finds the server idle (a wake-up costs
    microseconds on a shared machine), and a client can leave work behind for the next one
    (cancelled timers in the event loop's heap, garbage). Even a rotating order keeps the same
    neighbours in the same sequence; shuffling spreads all of that evenly.
    """
    names = list(clients)
    shuffle = random.Random(ORDER_SEED).shuffle
    if command == "GET":
        calls = {n: c.get for n, c in clients.items()}
    else:
        calls = {n: functools.partial(c.set, value=value) for n, c in clients.items()}
    per_block = max(1, ops // blocks)
    out: dict[str, list[list[float]]] = {n: [] for n in clients}
    for b in range(-1, blocks):  # block -1 is the warm-up
        samples: dict[str, list[float]] = {n: [] for n in names}
        for i in range(per_block if b >= 0 else min(per_block, 500)):
            key = keys[i % len(keys)]
            shuffle(names)
            for name in names:
                call = calls[name]
                start = perf_counter()
                await call(key)
                samples[name].append(perf_counter() - start)
        if b >= 0:
            for name in clients:
                out[name].append(samples[name])
    return Latencies(out)


# --------------------------------------------------------------------------- without the network


def rebuild_stages(
    client: Any, names: Sequence[str] | None = None, **context: Any
) -> list[tuple[str, Stage]]:
    """The client's stages made again by the library's own build (``resilient_cache.build``):
    the client's stage registry and settings, and its connected backend, whose ``route()`` works
    on the real slot map in memory; but a build context of their own.

    ``context`` are :func:`~resilient_cache.build.make_context`'s keyword arguments: by default
    the global providers, fresh breakers and fresh stats with the instruments an SDK would see
    (none without an SDK). Factories that return None (tracing without an SDK, memory when
    disabled) drop out. ``names`` defaults to the client's configured stage list.
    """
    built = make_context(client.settings, client.backend, **context)
    return build_stages(client.stage_specs, client.settings, built, names)


async def terminal(cmd: Command) -> Any:
    return b"x"


def new_get() -> Command:
    return Command("GET", ("k",), {})


async def time_loop(call: Handler, calls: int, make_cmd: Callable[[], Any]) -> float:
    """Seconds for ``calls`` awaits of ``call(make_cmd())`` (plus one loop turn per
    YIELD_EVERY calls, the same for every contender, so it cancels out in the differences)."""
    start = perf_counter()
    for i in range(calls):
        await call(make_cmd())
        if i % YIELD_EVERY == 0:
            await sleep0(0)
    return perf_counter() - start


async def per_call_us(
    contenders: dict[str, Callable[[], Awaitable[float]]], calls: int, repeats: int
) -> dict[str, list[float]]:
    """Microseconds per call of each contender, one batch each per repeat, interleaved."""
    out: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        await fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            out[name].append(await fn() / calls * 1e6)
    return out


# --------------------------------------------------------------------------- report


def fmt_ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}..{max(values):.3f}]"


async def profile_gets(
    clients: dict[str, Any], names: Sequence[str], keys: list[str], seconds: float, lines: int
) -> str:
    """A cProfile of sequential GETs through each client of ``names`` that ``clients`` has."""
    out = io.StringIO()
    for name in names:
        if name not in clients:
            continue
        profiler = cProfile.Profile()
        profiler.enable()
        ops = await run_sequential(clients[name], "GET", keys, b"", seconds)
        profiler.disable()
        out.write(f"\n--- cProfile, sequential GET through {name} ({ops:,.0f} ops/s profiled)\n")
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def finish(started: float, report: dict[str, Any], json_path: str | None) -> int:
    """The last line of every run, and the JSON report if asked for."""
    print(f"\ntotal run time {perf_counter() - started:.0f}s")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
    return 0
