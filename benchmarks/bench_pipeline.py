#!/usr/bin/env python
"""Pipeline overhead of resilient_cache against raw redis-py, measured in one run.

Run ``python benchmarks/bench_pipeline.py`` (or ``make bench``); ``--help`` lists the options.
docs/performance.md explains what is measured, how to read the output and the figures we got.

Three parts, all in one process:

1. Against a real Redis Cluster, GET and SET on a small key set through (a) raw
   ``redis.asyncio.cluster.RedisCluster``, (b) ``create_redis_cluster(...)`` with the default
   pipeline and (c) the same client with ``stages=[]`` (backend only):

   1a. throughput (ops/s), sequential (one coroutine awaiting in a loop) and ``--concurrency``
       coroutines at once. The clients take turns in every round (the order rotates from round
       to round) and each ratio is computed within one round, so slow drift of the machine
       cancels out; the table shows the median ratio over the rounds and its min/max.
   1b. sequential latency, each op timed on its own, the clients taking turns op by op in a
       random order: the least noisy figure on a shared machine.
   1c. with ``--ablation``: the same for clients with one stage each (``stages=[name]``).
2. Pipeline cost without the network: the default stages, built by the library's own stage
   factories with the client's settings, composed with ``resilient_cache.pipeline.compose``
   around a terminal that returns at once, against calling that terminal directly.
3. Cost of a call rejected by an open circuit breaker (``BreakerStage``), alone and through the
   whole default pipeline.

The cluster is a throwaway ``resilient_cache.devcluster.DevCluster`` (six ``redis-server``
processes on 127.0.0.1) unless ``REDIS_CLUSTER_NODES`` names one. Timings use
``time.perf_counter``; the garbage collector stays on, as in a real service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import gc
import io
import json
import logging
import os
import platform
import pstats
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import redis
from opentelemetry import metrics, trace
from redis.asyncio.cluster import ClusterNode as RedisPyClusterNode
from redis.asyncio.cluster import RedisCluster

from resilient_cache import CircuitBreakerOpenError, Command, create_redis_cluster
from resilient_cache.circuit import BreakerBoard
from resilient_cache.pipeline import Handler, Stage, compose
from resilient_cache.plugins import BuildContext, collect_stages, make_plugin_manager
from resilient_cache.settings import parse_cluster_nodes
from resilient_cache.stages.breaker import BreakerStage
from resilient_cache.telemetry import CommandStats

TARGET_RATIO = 0.97
ORDER_SEED = 20261126  # the interleaved latency part shuffles client order with this seed

perf_counter = time.perf_counter
sleep0 = asyncio.sleep
# Parts 2 and 3 run without the network, so nothing would ever suspend: give the event loop a
# turn every YIELD_EVERY calls, as a real workload does, or the timers that asyncio.timeout()
# schedules and cancels pile up in the loop's heap (they are only purged when the loop runs).
YIELD_EVERY = 1000


_T0 = perf_counter()


def progress(message: str) -> None:
    print(f"  [{perf_counter() - _T0:5.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- options


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput and per-call overhead of the resilient_cache pipeline "
        "against raw redis-py, in one run on one local Redis Cluster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=0.25,
        help="length of one timed throughput slice (one client, one mode, one round)",
    )
    parser.add_argument(
        "--rounds", type=int, default=15, help="alternating throughput rounds per mode"
    )
    parser.add_argument(
        "--concurrency", type=int, default=50, help="coroutines in the concurrent modes"
    )
    parser.add_argument("--keys", type=int, default=100, help="size of the key set")
    parser.add_argument("--value-size", type=int, default=16, help="bytes per value")
    parser.add_argument(
        "--latency-ops",
        type=int,
        default=10_000,
        help="ops per client and command in the interleaved latency part (0 skips it)",
    )
    parser.add_argument(
        "--blocks", type=int, default=5, help="blocks the latency ops are split in (for min/max)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.3, help="seconds of warm-up per client and mode"
    )
    parser.add_argument(
        "--micro-calls", type=int, default=50_000, help="calls per timed batch in parts 2 and 3"
    )
    parser.add_argument(
        "--micro-repeats", type=int, default=5, help="timed batches per row in parts 2 and 3"
    )
    parser.add_argument(
        "--rejected-calls",
        type=int,
        default=4,
        help="concurrent calls timed through the whole pipeline with an open breaker (part 3)",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also measure GET with one stage at a time (stages=[name]): interleaved latency "
        "and concurrent throughput; adds about 50s with the defaults",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of sequential GETs through raw redis-py and the default "
        "pipeline (profiling slows both; read it for where the time goes, not for speed)",
    )
    parser.add_argument(
        "--skip-throughput", action="store_true", help="skip part 1 (no network rounds)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    args = parser.parse_args(argv)
    if min(args.seconds, args.rounds, args.concurrency, args.keys, args.blocks) <= 0:
        parser.error("--seconds, --rounds, --concurrency, --keys and --blocks must be positive")
    if args.latency_ops < 0 or min(args.micro_calls, args.micro_repeats, args.rejected_calls) < 1:
        parser.error(
            "--latency-ops must be >= 0; --micro-calls, --micro-repeats and --rejected-calls >= 1"
        )
    return args


# --------------------------------------------------------------------------- cluster


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


def redis_server_version(nodes: str) -> str:
    node = parse_cluster_nodes(nodes)[0]
    client = redis.Redis(host=node.host, port=node.port, socket_timeout=5.0)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


def make_raw_cluster(nodes: str, settings: Any) -> RedisCluster:
    """Raw redis-py with the same socket timeouts and pool size as the library's backend
    (taken from the client's settings) and otherwise redis-py's defaults, as an application
    would use it."""
    return RedisCluster(
        startup_nodes=[RedisPyClusterNode(n.host, n.port) for n in parse_cluster_nodes(nodes)],
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_connect_timeout,
        max_connections=settings.max_connections,
        decode_responses=settings.decode_responses,
    )


# --------------------------------------------------------------------------- part 1


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
) -> dict[str, Series]:
    names = list(clients)
    for mode in modes:  # warm-up: connections opened, code paths hot
        for name in names:
            await measure(clients[name], mode, keys, value, args.warmup)
    results = {mode.name: Series() for mode in modes}
    for r in range(args.rounds):
        # Rotate the order every round so no client always runs first (or right after another).
        order = names[r % len(names) :] + names[: r % len(names)]
        for mode in modes:
            for name in order:
                results[mode.name].add(
                    name, await measure(clients[name], mode, keys, value, args.seconds)
                )
        progress(f"{label}: round {r + 1}/{args.rounds} done")
    return results


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


# --------------------------------------------------------------------------- parts 2 and 3


async def terminal(cmd: Command) -> Any:
    return b"x"


def build_stages(
    client: Any,
    names: Sequence[str] | None = None,
    board: BreakerBoard | None = None,
    stats: CommandStats | None = None,
) -> list[tuple[str, Stage]]:
    """Stages made again by the library's own factories, with the client's settings.

    Mirrors ``RedisClusterClient.__init__``: the same registered stages (built-ins only), the
    same settings sections, the same build context, except fresh stats and breakers and the
    client's connected backend, whose ``route()`` works on the real slot map in memory.
    Factories that return None (tracing without an SDK, memory when disabled) drop out.
    ``names`` defaults to the client's configured stage list.
    """
    specs = collect_stages(make_plugin_manager(autoload=False))
    context = BuildContext(
        settings=client.settings,
        backend=client.backend,
        clock=time.monotonic,
        sleep=asyncio.sleep,
        tracer_provider=trace.get_tracer_provider(),
        meter_provider=metrics.get_meter_provider(),
        stats=stats if stats is not None else CommandStats(),
        breakers=board if board is not None else BreakerBoard(),
    )
    built = []
    for name in client.settings.stages if names is None else names:
        stage = specs[name].factory(client.settings.stage_settings(name), context)
        if stage is not None:
            built.append((name, stage))
    return built


def open_breaker(board: BreakerBoard, scope: str) -> None:
    """Open the breaker of ``scope`` the way real failures do: ``threshold`` of them in a row."""
    breaker = board.get(scope)
    for _ in range(breaker.threshold):
        breaker.on_failure()
    assert breaker.is_open, "the breaker did not open"


async def time_loop(call: Handler, calls: int, make_cmd: Callable[[], Command]) -> float:
    """Seconds for ``calls`` awaits of ``call(make_cmd())`` (plus one loop turn per
    YIELD_EVERY calls, the same for every contender, so it cancels out in the differences)."""
    start = perf_counter()
    for i in range(calls):
        await call(make_cmd())
        if i % YIELD_EVERY == 0:
            await sleep0(0)
    return perf_counter() - start


async def time_rejections(call: Handler, calls: int, make_cmd: Callable[[], Command]) -> float:
    """Seconds for ``calls`` awaits of ``call(make_cmd())`` that each raise the breaker error."""
    start = perf_counter()
    for i in range(calls):
        try:  # noqa: SIM105 - contextlib.suppress would add its own cost to every call
            await call(make_cmd())
        except CircuitBreakerOpenError:
            pass
        if i % YIELD_EVERY == 0:
            await sleep0(0)
    return perf_counter() - start


def new_get() -> Command:
    return Command("GET", ("k",), {})


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


async def micro(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    calls, repeats = args.micro_calls, args.micro_repeats
    stages = build_stages(client)
    handler = compose([s for _, s in stages], terminal)
    contenders: dict[str, Callable[[], Awaitable[float]]] = {
        "terminal": lambda: time_loop(terminal, calls, new_get),
        "pipeline": lambda: time_loop(handler, calls, new_get),
    }
    # Each stage alone around the same terminal, to see where the pipeline's cost goes.
    for name, stage in stages:
        alone = compose([stage], terminal)
        contenders[f"only {name}"] = lambda h=alone: time_loop(h, calls, new_get)
    # What the client does before the pipeline: build the Command from execute_command's args.
    contenders["Command.from_call"] = lambda: time_from_call(calls)
    timings = await per_call_us(contenders, calls, repeats)
    base = timings["terminal"]
    return {
        "stages": [name for name, _ in stages],
        "calls": calls,
        "repeats": repeats,
        "terminal_us": statistics.median(base),
        "rows": {
            name: {
                "us": statistics.median(values),
                "overhead_us": statistics.median(
                    [v - b for v, b in zip(values, base, strict=True)]
                ),
                "min_overhead_us": min(v - b for v, b in zip(values, base, strict=True)),
                "max_overhead_us": max(v - b for v, b in zip(values, base, strict=True)),
            }
            for name, values in timings.items()
            if name not in ("terminal", "Command.from_call")
        },
        "from_call_us": statistics.median(timings["Command.from_call"]),
    }


async def time_from_call(calls: int) -> float:
    from_call = Command.from_call
    start = perf_counter()
    for _ in range(calls):
        from_call(("GET", "k"), {"keys": ["k"]})
    return perf_counter() - start


async def breaker_rejections(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    calls, repeats = args.micro_calls, args.micro_repeats
    node = client.backend.route(new_get())
    scope = node.name if node is not None else "cluster"

    def with_node() -> Command:
        cmd = new_get()
        cmd.node = node  # what routing would have set
        return cmd

    # The breaker stage alone (as its factory builds it), its breaker for the node open.
    open_board, closed_board = BreakerBoard(), BreakerBoard()
    breaker_stage = build_stages(client, ["breaker"], open_board)[0][1]
    assert isinstance(breaker_stage, BreakerStage)
    alone_open = compose([breaker_stage], terminal)
    alone_closed = compose(
        [s for _, s in build_stages(client, ["breaker"], closed_board)], terminal
    )
    open_breaker(open_board, scope)
    full_closed = compose([s for _, s in build_stages(client)], terminal)
    timings = await per_call_us(
        {
            "terminal": lambda: time_loop(terminal, calls, with_node),
            "breaker stage, closed": lambda: time_loop(alone_closed, calls, with_node),
            "breaker stage, open (rejected)": lambda: time_rejections(alone_open, calls, with_node),
            "default pipeline, closed": lambda: time_loop(full_closed, calls, new_get),
        },
        calls,
        repeats,
    )
    primaries = sorted(n.name for n in client.get_cluster().get_primaries())
    scenarios = {
        "only this node's breaker on the board": [],
        "other primaries' breakers closed (a client that served traffic)": [
            p for p in primaries if p != scope
        ],
    }
    full_open = {}
    for label, others in scenarios.items():
        full_open[label] = await rejected_through_pipeline(
            client, scope, others, args.rejected_calls
        )
    return {
        "node": scope,
        "calls": calls,
        "repeats": repeats,
        "rows": {name: statistics.median(values) for name, values in timings.items()},
        "full_open": full_open,
        "retry_settings": client.settings.stage_settings("retry").model_dump()
        if "retry" in client.settings.stages
        else None,
        "deadline": client.settings.stage_settings("timeout").model_dump().get("deadline")
        if "timeout" in client.settings.stages
        else None,
    }


async def rejected_through_pipeline(
    client: Any, scope: str, others: list[str], n: int
) -> dict[str, Any]:
    """``n`` concurrent GETs through the whole default pipeline, routed to ``scope`` whose
    breaker is open; ``others`` get closed breakers on the same board first.

    Whatever the stages do about the refusal (retries, backoff sleeps, waiting for a failover,
    slot-map refreshes) is timed for real; the calls run concurrently so that the wall time of
    this part stays near one call's, however long that is (at most the command deadline).
    """
    board, stats = BreakerBoard(), CommandStats()
    handler = compose([s for _, s in build_stages(client, board=board, stats=stats)], terminal)
    for other in others:
        board.get(other)
    open_breaker(board, scope)
    backend = client.backend
    refreshes = [0]
    real_refresh = backend.refresh_topology

    async def counting_refresh() -> None:
        refreshes[0] += 1
        await real_refresh()

    async def one() -> tuple[float, str, int]:
        start = perf_counter()
        try:
            await handler(new_get())
        except Exception as err:
            return (perf_counter() - start) * 1e3, type(err).__name__, getattr(err, "attempts", 1)
        raise RuntimeError("the call went through although the breaker was open")

    backend.refresh_topology = counting_refresh  # this client is used for nothing else
    try:
        results = await asyncio.gather(*(one() for _ in range(n)))
        await asyncio.sleep(0.05)  # let a background refresh started by the last call finish
    finally:
        del backend.refresh_topology
    ms = [r[0] for r in results]
    return {
        "calls": n,
        "ms_median": statistics.median(ms),
        "ms_min": min(ms),
        "ms_max": max(ms),
        "errors": sorted({r[1] for r in results}),
        "attempts_median": statistics.median(r[2] for r in results),
        "retries": stats.retried,
        "refreshes": refreshes[0],
    }


# --------------------------------------------------------------------------- profile


async def profile_gets(clients: dict[str, Any], keys: list[str], seconds: float) -> str:
    out = io.StringIO()
    for name in ("raw", "ours"):
        profiler = cProfile.Profile()
        profiler.enable()
        ops = await run_sequential(clients[name], "GET", keys, b"", seconds)
        profiler.disable()
        out.write(f"\n--- cProfile, sequential GET through {name} ({ops:,.0f} ops/s profiled)\n")
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(18)
    return out.getvalue()


# --------------------------------------------------------------------------- report


def fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:,.1f} ms"


def fmt_ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}..{max(values):.3f}]"


def print_throughput(results: dict[str, Series], modes: list[Mode], args: argparse.Namespace):
    print()
    print(
        f"1. Throughput, ops/s (median of {args.rounds} rounds of {args.seconds:g}s per client, "
        f"clients alternating)"
    )
    print("   raw  = redis.asyncio.cluster.RedisCluster")
    print("   ours = create_redis_cluster(nodes, health_check_interval=0), default pipeline")
    print("   bare = the same with stages=[] (backend only)")
    print("   ratios: median [min..max] over rounds of the per-round ratio")
    head = (
        f"   {'mode':<9}{'raw':>9}{'ours':>9}{'bare':>9}  {'ours/raw':<22}{'bare/raw':<22}"
        f"{'ours/bare':<22}{'extra us/op':>11}"
    )
    print(head)
    print("   " + "-" * (len(head) - 3))
    for mode in modes:
        s = results[mode.name]
        raw, ours, bare = s.median("raw"), s.median("ours"), s.median("bare")
        extra = (1 / ours - 1 / raw) * 1e6
        print(
            f"   {mode.name:<9}{raw:>9,.0f}{ours:>9,.0f}{bare:>9,.0f}  "
            f"{fmt_ratio(s.ratios('ours', 'raw')):<22}{fmt_ratio(s.ratios('bare', 'raw')):<22}"
            f"{fmt_ratio(s.ratios('ours', 'bare')):<22}{extra:>11.1f}"
        )
    print("   extra us/op = 1/ours - 1/raw (median throughputs), the time each op costs more")
    verdicts = []
    for mode in modes:
        med = statistics.median(results[mode.name].ratios("ours", "raw"))
        verdicts.append(f"{mode.name} {'meets' if med >= TARGET_RATIO else 'BELOW'}")
    print(f"   target ours/raw >= {TARGET_RATIO}: " + ", ".join(verdicts))


def print_latency(results: dict[str, Latencies], args: argparse.Namespace) -> None:
    print()
    per_block = max(1, args.latency_ops // args.blocks)
    print(
        f"1b. Sequential latency, one op at a time, the clients taking turns op by op (random "
        f"order), {per_block * args.blocks:,} ops per client and command in {args.blocks} blocks"
    )
    print("   speed = median latency of raw / median latency of the client, per block:")
    print("   median [min..max] over blocks (comparable with a throughput ratio client/raw)")
    head = (
        f"   {'cmd':<5}{'client':<16}{'median us':>10}{'mean us':>9}{'p99 us':>9}"
        f"  {'speed vs raw':<22}{'+us vs raw':>10}"
    )
    print(head)
    print("   " + "-" * (len(head) - 3))
    for command, lat in results.items():
        for name in lat.blocks:
            speed = fmt_ratio(lat.speed_ratios(name)) if name != "raw" else "1"
            extra = lat.median_us(name) - lat.median_us("raw")
            print(
                f"   {command:<5}{name:<16}{lat.median_us(name):>10.1f}{lat.mean_us(name):>9.1f}"
                f"{lat.p99_us(name):>9.1f}  {speed:<22}{extra:>+10.1f}"
            )
    verdicts = []
    for command, lat in results.items():
        med = statistics.median(lat.speed_ratios("ours"))
        verdicts.append(f"{command} {'meets' if med >= TARGET_RATIO else 'BELOW'}")
    print(f"   target ours/raw >= {TARGET_RATIO}: " + ", ".join(verdicts))


def print_ablation(
    latency: Latencies | None, throughput: Series | None, mode: Mode, args: argparse.Namespace
) -> None:
    print()
    print(
        "1c. Ablation: GET with one stage at a time (stages=[name]); raw, bare (stages=[]) and "
        "ours (default pipeline) alongside"
    )
    if latency is not None:
        print(
            "   sequential: interleaved latency as in 1b; speed = raw median / client median, "
            "median [min..max] over blocks"
        )
    if throughput is not None:
        print(
            f"   {mode.name}: throughput as in 1, {args.rounds} alternating rounds of "
            f"{args.seconds:g}s; ratio = client/raw per round, median [min..max]"
        )
    names = list(latency.blocks if latency is not None else throughput.ops)  # type: ignore[union-attr]
    head = (
        f"   {'client':<16}{'median us':>10}{'+us vs raw':>11}  {'speed vs raw':<22}"
        f"{mode.name + ' ops/s':>14}  {'ratio vs raw':<22}"
    )
    print(head)
    print("   " + "-" * (len(head) - 3))
    for name in names:
        row = f"   {name:<16}"
        if latency is not None:
            speed = fmt_ratio(latency.speed_ratios(name)) if name != "raw" else "1"
            row += f"{latency.median_us(name):>10.1f}"
            row += f"{latency.median_us(name) - latency.median_us('raw'):>+11.1f}  {speed:<22}"
        else:
            row += f"{'':>10}{'':>11}  {'':<22}"
        if throughput is not None:
            ratio = fmt_ratio(throughput.ratios(name, "raw")) if name != "raw" else "1"
            row += f"{throughput.median(name):>14,.0f}  {ratio:<22}"
        print(row)


def print_micro(m: dict[str, Any]) -> None:
    print()
    print(
        f"2. Pipeline cost without the network: {m['calls']:,} calls of "
        f"handler(Command('GET', ('k',), {{}})) per batch, median of {m['repeats']} batches"
    )
    print(f"   stages (outer to inner): {', '.join(m['stages']) or '(none)'}")
    print("   terminal = async def terminal(cmd): return b'x' (called directly: "
          f"{m['terminal_us']:.3f} us/call incl. Command())")  # fmt: skip
    print(f"   {'composed around terminal':<34}{'us/call':>9}{'overhead us':>13}  [min..max]")
    for name, row in m["rows"].items():
        label = "all default stages" if name == "pipeline" else name
        print(
            f"   {label:<34}{row['us']:>9.3f}{row['overhead_us']:>13.3f}  "
            f"[{row['min_overhead_us']:.3f}..{row['max_overhead_us']:.3f}]"
        )
    print(
        f"   Command.from_call(('GET','k'), {{'keys': ['k']}}) alone: {m['from_call_us']:.3f} us "
        "(paid by every client call before the pipeline)"
    )


def print_breaker(b: dict[str, Any]) -> None:
    rows = b["rows"]
    base = rows["terminal"]
    print()
    print(
        f"3. Calls while the breaker of {b['node']} is open: {b['calls']:,} calls per batch, "
        f"median of {b['repeats']} batches"
    )
    print(f"   {'':<36}{'us/call':>9}{'minus terminal':>16}")
    for name, value in rows.items():
        print(f"   {name:<36}{value:>9.3f}{value - base:>16.3f}")
    print("   a rejected call raises CircuitBreakerOpenError without touching the node")
    print(
        "   the whole default pipeline, routed to that node: "
        f"{next(iter(b['full_open'].values()))['calls']} concurrent calls per line, each timed"
    )
    for label, f in b["full_open"].items():
        print(
            f"   {label}:\n      {fmt_ms(f['ms_median'])} per call [{fmt_ms(f['ms_min'])}.."
            f"{fmt_ms(f['ms_max'])}], {' / '.join(f['errors'])}, {f['attempts_median']:g} "
            f"attempts per call, {f['retries']} retries and {f['refreshes']} slot-map refreshes "
            "in all"
        )
    r = b["retry_settings"] or {}
    settings = ", ".join(f"{k}={v}" for k, v in r.items() if k != "retry_in_doubt")
    print(f"   (retry: {settings}; command deadline {b['deadline']} s)")


# --------------------------------------------------------------------------- main


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


async def amain(args: argparse.Namespace, nodes: str, where: str) -> dict[str, Any]:
    logging.getLogger("resilient_cache.circuit").setLevel(logging.ERROR)  # part 3 opens breakers
    keys = [f"bench:{i}" for i in range(args.keys)]
    value = b"v" * args.value_size
    ours = create_redis_cluster(nodes, health_check_interval=0)
    raw = make_raw_cluster(nodes, ours.settings)
    bare = create_redis_cluster(nodes, health_check_interval=0, stages=[])
    clients: dict[str, Any] = {"raw": raw, "ours": ours, "bare": bare}
    extra: dict[str, Any] = {}
    report: dict[str, Any] = {}
    try:
        await raw.initialize()
        await ours.connect()
        await bare.connect()
        for key in keys:
            await raw.set(key, value)
        server = redis_server_version(nodes)
        print(f"resilient_cache pipeline benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}")
        print(f"   cluster:   {where}: {nodes}")
        print(f"   versions:  redis-server {server}, Python {platform.python_version()} "
              f"({platform.python_implementation()}), redis-py {package_version('redis')}, "
              f"hiredis {package_version('hiredis')}, "
              f"resilient-cache {package_version('resilient-cache')}")  # fmt: skip
        print(f"   machine:   {os.cpu_count()} CPUs, {platform.platform()}; the client and the "
              "servers share them")  # fmt: skip
        print(f"   ours:      {ours!r}")
        print(f"   workload:  {args.keys} keys, {args.value_size}-byte values; concurrency "
              f"{args.concurrency}; gc {'on' if gc.isenabled() else 'OFF'}; "
              f"{type(asyncio.get_running_loop()).__name__}")  # fmt: skip
        report["environment"] = {
            "cluster": where,
            "redis_server": server,
            "python": platform.python_version(),
            "redis_py": package_version("redis"),
            "cpus": os.cpu_count(),
            "active_stages": ours.active_stages,
            "args": vars(args),
        }
        sys.stdout.flush()

        modes = [
            Mode("GET seq", "GET", 0),
            Mode("SET seq", "SET", 0),
            Mode(f"GET x{args.concurrency}", "GET", args.concurrency),
            Mode(f"SET x{args.concurrency}", "SET", args.concurrency),
        ]
        throughput: dict[str, Series] | None = None
        latency: dict[str, Latencies] = {}
        abl_latency: Latencies | None = None
        abl_throughput: Series | None = None
        if not args.skip_throughput:
            throughput = await run_rounds(clients, modes, args, keys, value, "throughput")
            if args.latency_ops:
                for command in ("GET", "SET"):
                    latency[command] = await interleaved_latency(
                        clients, command, keys, value, args.latency_ops, args.blocks
                    )
                    progress(f"latency: {command} done")
            if args.ablation:
                abl_clients: dict[str, Any] = {"raw": raw, "bare": bare, "ours": ours}
                for name in ours.active_stages:
                    c = create_redis_cluster(nodes, health_check_interval=0, stages=[name])
                    await c.connect()
                    extra[name] = c
                    abl_clients[f"only {name}"] = c
                # Throughput first: its concurrent warm-up gives every client the same pools
                # (redis-py hands out a node's connections FIFO, so a client that once ran 50
                # coroutines cycles through 50 sockets even when sequential, which is slower
                # than reusing one: fresh clients must not be compared with used ones).
                abl_throughput = (
                    await run_rounds(abl_clients, [modes[2]], args, keys, value, "ablation")
                )[modes[2].name]
                if args.latency_ops:
                    abl_latency = await interleaved_latency(
                        abl_clients, "GET", keys, value, args.latency_ops, args.blocks
                    )
                    progress("ablation latency done")
        # Parts 2 and 3 use a client of their own: part 3 opens breakers and asks for refreshes.
        probe = create_redis_cluster(nodes, health_check_interval=0)
        extra["probe"] = probe
        await probe.connect()
        micro_result = await micro(probe, args)
        progress("pipeline cost without the network done")
        breaker_result = await breaker_rejections(probe, args)
        progress("breaker rejections done")
        profile = await profile_gets(clients, keys, max(1.0, args.seconds)) if args.profile else ""

        if throughput is not None:
            print_throughput(throughput, modes, args)
            report["throughput"] = {k: v.ops for k, v in throughput.items()}
        if latency:
            print_latency(latency, args)
            report["latency"] = {k: v.summary() for k, v in latency.items()}
        if args.ablation and not args.skip_throughput:
            print_ablation(abl_latency, abl_throughput, modes[2], args)
            report["ablation"] = {
                "latency": abl_latency.summary() if abl_latency is not None else None,
                "throughput": abl_throughput.ops if abl_throughput is not None else None,
            }
        print_micro(micro_result)
        print_breaker(breaker_result)
        report["micro"] = micro_result
        report["breaker"] = breaker_result
        if profile:
            print(profile)
    finally:
        with contextlib.suppress(Exception):
            for key in keys:  # leave a shared cluster (REDIS_CLUSTER_NODES) as we found it
                await raw.delete(key)
        for c in [raw, ours, bare, *extra.values()]:
            with contextlib.suppress(Exception):
                await c.aclose()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = perf_counter()
    with cluster_nodes() as (nodes, where):
        report = asyncio.run(amain(args, nodes, where))
    elapsed = perf_counter() - started
    print(f"\ntotal run time {elapsed:.0f}s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
