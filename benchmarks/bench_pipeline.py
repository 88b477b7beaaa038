"""Pipeline overhead of resilient_cache against raw redis-py, measured in one run.

Run ``.venv/bin/python -m benchmarks.bench_pipeline`` from the repository root (or ``make
bench``); ``--help`` lists the options, ``--quick`` is a short run that only checks the script
works. docs/performance.md explains what is measured, how to read the output and the figures we
got.

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
   around a terminal that returns at once (the stages that offer a fast path fused into one
   coroutine, as in the client), against calling that terminal directly; also each stage
   alone, ``Command.from_call``, and ``client.get("k")`` with those stages in place of the
   client's handler (the client's whole per-call path, nothing sent).
3. Cost of a call rejected by an open circuit breaker (``BreakerStage``), alone and through the
   whole default pipeline.

The cluster is a throwaway ``resilient_cache.devcluster.DevCluster`` (six ``redis-server``
processes on 127.0.0.1) unless ``REDIS_CLUSTER_NODES`` names one. Timings use
``time.perf_counter``; the garbage collector stays on, as in a real service. The helpers shared
with the other benchmarks (cluster, raw client, parts 1a/1b, the stage build) are in _common.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from resilient_cache import CircuitBreakerOpenError, Command, create_redis_cluster
from resilient_cache.build import build_stages, make_context
from resilient_cache.circuit import BreakerBoard
from resilient_cache.pipeline import Handler, compose
from resilient_cache.stages.breaker import BreakerStage

from ._common import (
    YIELD_EVERY,
    Latencies,
    Mode,
    Series,
    add_round_options,
    cluster_nodes,
    finish,
    fmt_ratio,
    interleaved_latency,
    make_raw_cluster,
    new_get,
    package_version,
    parse_with_quick,
    per_call_us,
    perf_counter,
    profile_gets,
    progress,
    rebuild_stages,
    redis_server_version,
    run_rounds,
    sleep0,
    terminal,
    time_loop,
)

TARGET_RATIO = 0.97

QUICK = {  # --quick: every part, a few seconds each (part 3 still waits out the deadline)
    "seconds": 0.05,
    "rounds": 2,
    "latency_ops": 400,
    "blocks": 2,
    "warmup": 0.05,
    "micro_calls": 2_000,
    "micro_repeats": 2,
    "rejected_calls": 2,
}

# --------------------------------------------------------------------------- options


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput and per-call overhead of the resilient_cache pipeline "
        "against raw redis-py, in one run on one local Redis Cluster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_round_options(parser, seconds=0.25, rounds=15)
    parser.add_argument(
        "--concurrency", type=int, default=50, help="coroutines in the concurrent modes"
    )
    parser.add_argument("--keys", type=int, default=100, help="size of the key set")
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
    args = parse_with_quick(parser, argv, QUICK)
    if min(args.seconds, args.rounds, args.concurrency, args.keys, args.blocks) <= 0:
        parser.error("--seconds, --rounds, --concurrency, --keys and --blocks must be positive")
    if args.latency_ops < 0 or min(args.micro_calls, args.micro_repeats, args.rejected_calls) < 1:
        parser.error(
            "--latency-ops must be >= 0; --micro-calls, --micro-repeats and --rejected-calls >= 1"
        )
    return args


# --------------------------------------------------------------------------- parts 2 and 3


def open_breaker(board: BreakerBoard, scope: str) -> None:
    """Open the breaker of ``scope`` the way real failures do: ``threshold`` of them in a row."""
    breaker = board.get(scope)
    for _ in range(breaker.threshold):
        breaker.on_failure()
    assert breaker.is_open, "the breaker did not open"


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


async def micro(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    calls, repeats = args.micro_calls, args.micro_repeats
    stages = rebuild_stages(client)
    handler = compose([s for _, s in stages], terminal)
    contenders: dict[str, Callable[[], Awaitable[float]]] = {
        "terminal": lambda: time_loop(terminal, calls, new_get),
        "pipeline": lambda: time_loop(handler, calls, new_get),
    }
    # Each stage alone around the same terminal, to see where the pipeline's cost goes.
    for name, stage in stages:
        alone = compose([stage], terminal)
        contenders[f"only {name}"] = lambda h=alone: time_loop(h, calls, new_get)
    # The client's own path around the same stages: redis-py's get() -> execute_command() ->
    # Command.from_call() -> the composed handler -> the terminal.
    contenders["client"] = lambda: time_client_get(client, handler, calls)
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


async def time_client_get(client: Any, handler: Handler, calls: int) -> float:
    """Seconds for ``calls`` awaits of ``client.get("k")`` with ``handler`` (the stages around
    the terminal) in place of the client's own, so nothing is sent."""
    own, client._handler = client._handler, handler
    get = client.get
    try:
        start = perf_counter()
        for i in range(calls):
            await get("k")
            if i % YIELD_EVERY == 0:
                await sleep0(0)
        return perf_counter() - start
    finally:
        client._handler = own


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
    breaker_stage = rebuild_stages(client, ["breaker"], breakers=open_board)[0][1]
    assert isinstance(breaker_stage, BreakerStage)
    alone_open = compose([breaker_stage], terminal)
    alone_closed = compose(
        [s for _, s in rebuild_stages(client, ["breaker"], breakers=closed_board)], terminal
    )
    open_breaker(open_board, scope)
    full_closed = compose([s for _, s in rebuild_stages(client)], terminal)
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
    # The build as rebuild_stages does it, keeping the context for its breakers and stats.
    context = make_context(client.settings, client.backend)
    board, stats = context.breakers, context.stats
    stages = build_stages(client.stage_specs, client.settings, context)
    handler = compose([s for _, s in stages], terminal)
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


# --------------------------------------------------------------------------- report


def fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:,.1f} ms"


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
        label = {
            "pipeline": "all default stages",
            "client": "client.get('k'), same stages",
        }.get(name, name)
        print(
            f"   {label:<34}{row['us']:>9.3f}{row['overhead_us']:>13.3f}  "
            f"[{row['min_overhead_us']:.3f}..{row['max_overhead_us']:.3f}]"
        )
    print(
        f"   Command.from_call(('GET','k'), {{'keys': ['k']}}) alone: {m['from_call_us']:.3f} us "
        "(paid by every client call before the pipeline)"
    )
    print(
        "   client.get('k'): redis-py's get() -> execute_command() -> Command.from_call() -> the "
        "same stages -> the terminal"
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
        profile = ""
        if args.profile:
            profile = await profile_gets(clients, ("raw", "ours"), keys, max(1.0, args.seconds), 18)

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
    return finish(started, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
