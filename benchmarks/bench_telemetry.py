"""Telemetry on vs off, and against the hand-assembled peer stack, measured in one run.

Run ``.venv/bin/python -m benchmarks.bench_telemetry`` from the repository root; ``--help`` lists
the options, ``--quick`` is a short run that only checks the script works. docs/performance.md
("Telemetry on vs off, and against the peer stack") explains the method and the figures.

The clients, all in one process and against the same Redis Cluster:

- ``raw``: ``redis.asyncio.cluster.RedisCluster``, no telemetry (the reference);
- ``off``: ``create_redis_cluster(...)``, default pipeline, no OTel SDK passed (the API's proxy
  providers, never set globally): the tracing stage drops out, metrics feeds only the snapshot;
- ``on``: the same with ``tracer_provider=`` an SDK ``TracerProvider`` (``BatchSpanProcessor``
  around an exporter that counts spans by instrumentation scope and discards them) and
  ``meter_provider=`` an SDK ``MeterProvider`` (``PeriodicExportingMetricReader`` around a
  discarding exporter);
- ``peer``: the hand-assembled stack: a ``RedisCluster`` traced by opentelemetry-instrumentation-
  redis (same SDK providers), each call wrapped in a tenacity ``@retry`` (3 attempts,
  ``wait_random_exponential``) around a pybreaker ``CircuitBreaker`` (``breaker.calling()``);
- ``peer+hist``: ``peer`` plus a hand-written ``db.client.operation.duration`` histogram record
  per call, the same work as ``on``'s metrics stage (the instrumentation records no metrics).

Parts:

1. Throughput with ``--concurrency`` coroutines (GET and SET), the clients alternating in
   rotating order within each round, ratios computed per round (as bench_pipeline.py part 1a).
2. Sequential latency, each op timed on its own, the clients taking turns op by op in a random
   order (as bench_pipeline.py part 1b): the figure to trust on a shared machine.
3. The layers' cost without the network: ours off/on composed around a terminal coroutine
   (built by the library's own stage factories), and the peer's layers around a terminal
   standing in for ``RedisCluster.execute_command``.
4. Global instrumentation check: ``RedisInstrumentor().instrument()`` patches the
   ``RedisCluster`` class, so it would also trace raw redis-py and our own backend (which calls
   ``RedisCluster.execute_command``). Parts 1-3 therefore instrument the peer's client instance
   only (``RedisInstrumentor.instrument_client``, the same wrapper function). This part turns
   the global instrumentation on, times a globally instrumented peer against the instance-
   instrumented one op by op, counts the spans every client then emits, and uninstruments.

The cluster is a throwaway ``resilient_cache.devcluster.DevCluster`` unless
``REDIS_CLUSTER_NODES`` names one. The measuring helpers (interleaved latency, throughput rounds,
raw client settings, the stage build) are the ones bench_pipeline uses, from _common.py; the SDK
and the peer stack are in _peer_stack.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pybreaker
import redis
import tenacity
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider
from redis.asyncio.cluster import RedisCluster

from resilient_cache import create_redis_cluster, telemetry
from resilient_cache.pipeline import Command, Handler, compose
from resilient_cache.settings import parse_cluster_nodes
from resilient_cache.stages.tracing import TracingStage

from ._common import (
    Latencies,
    Mode,
    Series,
    add_round_options,
    cluster_nodes,
    finish,
    fmt_ratio,
    interleaved_latency,
    library_state,
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
    run_concurrent,
    run_rounds,
    terminal,
    time_loop,
)
from ._peer_stack import PeerClient, Sdk, make_guarded, make_histogram

TARGET_VS_PEER = 1.2  # the target: ours with telemetry on >= 1.2x the peer stack
REDIS_SCOPE = "opentelemetry.instrumentation.redis"
OURS_SCOPE = telemetry.INSTRUMENTATION_NAME
CLIENTS = ("raw", "off", "on", "peer", "peer+hist")

QUICK = {  # --quick: every part, a few seconds each
    "seconds": 0.05,
    "rounds": 2,
    "latency_ops": 400,
    "blocks": 2,
    "warmup": 0.05,
    "micro_calls": 1_000,
    "micro_repeats": 2,
    "global_ops": 400,
}


# --------------------------------------------------------------------------- options


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Cost of tracing+metrics in resilient_cache (on vs off) and against the "
        "hand-assembled peer stack (redis-py + opentelemetry-instrumentation-redis + tenacity "
        "+ pybreaker), in one run on one local Redis Cluster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help="comma list of clients to compare, from: " + ", ".join(CLIENTS),
    )
    add_round_options(parser, seconds=0.5, rounds=20)
    parser.add_argument(
        "--concurrency", type=int, default=50, help="coroutines in the throughput part"
    )
    parser.add_argument("--keys", type=int, default=100, help="size of the key set")
    parser.add_argument(
        "--latency-ops",
        type=int,
        default=10_000,
        help="ops per client and command in the interleaved latency part (0 skips it)",
    )
    parser.add_argument("--blocks", type=int, default=5, help="blocks the latency ops are split in")
    parser.add_argument(
        "--micro-calls", type=int, default=10_000, help="calls per timed batch in part 3"
    )
    parser.add_argument(
        "--micro-repeats", type=int, default=5, help="timed batches per row in part 3 (0 skips)"
    )
    parser.add_argument(
        "--global-ops",
        type=int,
        default=4_000,
        help="GETs per client in the global-instrumentation check (part 4; 0 skips it)",
    )
    parser.add_argument(
        "--metric-interval",
        type=float,
        default=10.0,
        help="seconds between metric collections of the PeriodicExportingMetricReader",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of sequential GETs through off, on and peer",
    )
    args = parse_with_quick(parser, argv, QUICK)
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = [c for c in args.clients if c not in CLIENTS]
    if unknown:
        parser.error(f"--clients: unknown {unknown}; choose from {', '.join(CLIENTS)}")
    if "raw" not in args.clients:
        args.clients.insert(0, "raw")  # every ratio is also given against raw
    if min(args.seconds, args.rounds, args.concurrency, args.keys, args.blocks) <= 0:
        parser.error("--seconds, --rounds, --concurrency, --keys and --blocks must be positive")
    if min(args.latency_ops, args.micro_repeats, args.global_ops) < 0 or args.micro_calls < 1:
        parser.error("--latency-ops, --micro-repeats, --global-ops >= 0; --micro-calls >= 1")
    return args


# --------------------------------------------------------------------------- part 3


async def micro(probe: Any, nodes: str, sdk: Sdk, args: argparse.Namespace) -> dict[str, Any]:
    calls, repeats = args.micro_calls, args.micro_repeats
    tp, mp = sdk.tracer_provider, sdk.meter_provider
    noop_t, noop_m = NoOpTracerProvider(), NoOpMeterProvider()

    def build(tracer: Any, meter: Any, names: Sequence[str] | None = None) -> list[tuple[str, Any]]:
        """The client's stages made again with these providers; each build has fresh stats
        holding the instruments ``meter`` yields (none from the no-op provider), as a client
        given these providers has."""
        return rebuild_stages(probe, names, tracer_provider=tracer, meter_provider=meter)

    off = build(noop_t, noop_m)
    on = build(tp, mp)

    def chain(stages: list[tuple[str, Any]]) -> Handler:
        return compose([s for _, s in stages], terminal)

    def loop(handler: Callable[[Any], Awaitable[Any]], make: Callable[[], Any]) -> Any:
        return lambda: time_loop(handler, calls, make)

    contenders: dict[str, Callable[[], Awaitable[float]]] = {
        "terminal (ours)": loop(terminal, new_get),
        f"ours off: {', '.join(n for n, _ in off)}": loop(chain(off), new_get),
        f"ours on: {', '.join(n for n, _ in on)}": loop(chain(on), new_get),
        "only tracing (SDK)": loop(chain(build(tp, mp, ["tracing"])), new_get),
        "only metrics (SDK)": loop(chain(build(tp, mp, ["metrics"])), new_get),
        "only metrics (no SDK)": loop(chain(build(noop_t, noop_m, ["metrics"])), new_get),
    }

    # The peer's layers around a terminal standing in for RedisCluster.execute_command: a
    # RedisCluster instance (never connected) whose execute_command is replaced by the terminal
    # before instrument_client wraps it, so the instrumentation's wrapper runs as for real.
    async def fake_execute(*a: Any, **kw: Any) -> Any:
        return b"x"

    node = parse_cluster_nodes(nodes)[0]
    stand_in = RedisCluster(host=node.host, port=node.port)
    stand_in.execute_command = fake_execute  # type: ignore[method-assign]
    RedisInstrumentor.instrument_client(stand_in, tracer_provider=tp)
    traced_exec = stand_in.execute_command
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60.0)
    guarded = make_guarded(breaker)

    async def breaker_only(method: Any, *a: Any) -> Any:
        with breaker.calling():
            return await method(*a)

    retry_only = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=2.0),
        retry=tenacity.retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
        reraise=True,
    )(fake_execute)
    histogram = make_histogram(mp, "bench.peer.micro")
    attrs = {telemetry.DB_SYSTEM_NAME: "redis", telemetry.DB_OPERATION_NAME: "GET"}

    async def peer_hist(key: str) -> Any:
        start = time.monotonic()
        result = await guarded(traced_exec, "GET", key)
        histogram.record(time.monotonic() - start, attrs)
        return result

    def key() -> str:
        return "k"

    contenders |= {
        "terminal (peer)": loop(functools.partial(fake_execute, "GET"), key),
        "peer: instrumentation+tenacity+pybreaker": loop(
            functools.partial(guarded, traced_exec, "GET"), key
        ),
        "peer+hist": loop(peer_hist, key),
        "only instrumentation (SDK)": loop(functools.partial(traced_exec, "GET"), key),
        "only tenacity @retry": loop(functools.partial(retry_only, "GET"), key),
        "only pybreaker calling()": loop(functools.partial(breaker_only, fake_execute, "GET"), key),
    }
    peer_rows = {name for name in contenders if "peer" in name or name.startswith(
        ("only instrumentation", "only tenacity", "only pybreaker"))}  # fmt: skip
    sdk.reset_counts()
    timings = await per_call_us(contenders, calls, repeats)
    spans = sdk.flush_counts()
    out: dict[str, Any] = {"calls": calls, "repeats": repeats, "rows": {}, "spans": spans}
    for name, values in timings.items():
        if name.startswith("terminal"):
            continue
        base = timings["terminal (peer)" if name in peer_rows else "terminal (ours)"]
        over = [v - b for v, b in zip(values, base, strict=True)]
        out["rows"][name] = {
            "us": statistics.median(values),
            "overhead_us": statistics.median(over),
            "min": min(over),
            "max": max(over),
        }
    out["terminal_us"] = {
        "ours": statistics.median(timings["terminal (ours)"]),
        "peer": statistics.median(timings["terminal (peer)"]),
    }
    # The span of a 20,000-key MGET with include_keys (11 s when each argument was compared
    # with every key; now linear, and db.query.text is capped).
    keyed = compose([TracingStage(telemetry.get_tracer(tp), True, include_keys=True)], terminal)
    big = Command.from_call(("MGET", *(f"bench:key:{i}" for i in range(20_000))), {})
    started = time.perf_counter()
    for _ in range(max(1, repeats)):
        await keyed(big)
    out["big_mget_span_ms"] = (time.perf_counter() - started) / max(1, repeats) * 1000
    return out


# --------------------------------------------------------------------------- part 4


async def span_census(
    clients: dict[str, Any], sdk: Sdk, keys: list[str], ops: int
) -> dict[str, dict[str, int]]:
    """``ops`` sequential GETs through each client in turn; the spans each one produced."""
    census = {}
    for name, client in clients.items():
        sdk.reset_counts()
        for i in range(ops):
            await client.get(keys[i % len(keys)])
        census[name] = sdk.flush_counts()
    return census


async def global_check(
    clients: dict[str, Any], nodes: str, sdk: Sdk, keys: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    instrumentor = RedisInstrumentor()
    instrumentor.instrument(tracer_provider=sdk.tracer_provider)
    raw_g = make_raw_cluster(nodes, clients["off"].settings)
    peer_g = PeerClient(raw_g)
    try:
        await raw_g.initialize()
        pair = {"peer (instance)": clients["peer"], "peer (global)": peer_g}
        for client in pair.values():  # the same pools for both (see bench_pipeline 1b)
            await run_concurrent(client, "GET", keys, b"", args.warmup, args.concurrency)
        lat = await interleaved_latency(pair, "GET", keys, b"", args.global_ops, 4)
        census_clients = {
            name: clients[name] for name in ("raw", "off", "on", "peer") if name in clients
        }
        census_clients["peer (global)"] = peer_g
        census = await span_census(census_clients, sdk, keys, 500)
    finally:
        instrumentor.uninstrument()
    after = await span_census(
        {name: clients[name] for name in ("raw", "off") if name in clients}, sdk, keys, 200
    )
    await raw_g.aclose()
    return {
        "ops": args.global_ops,
        "median_us": {n: lat.median_us(n) for n in pair},
        "speed_global_vs_instance": lat.speed_ratios("peer (global)", base="peer (instance)"),
        "census_500_gets": census,
        "after_uninstrument_200_gets": after,
    }


# --------------------------------------------------------------------------- report

PAIRS = (  # (numerator, denominator, meaning) for the ratio lines
    ("on", "off", "cost of telemetry on"),
    ("on", "peer", f"ours full vs peer stack (target >= {TARGET_VS_PEER})"),
    ("on", "peer+hist", "ours full vs peer stack + hand-written histogram (same work)"),
    ("off", "peer", "ours, telemetry off, vs peer stack"),
)


def describe(clients: list[str]) -> None:
    text = {
        "raw": "redis.asyncio.cluster.RedisCluster, no telemetry (reference)",
        "off": "create_redis_cluster(nodes, health_check_interval=0): no SDK, tracing drops out",
        "on": "the same with tracer_provider=SDK TracerProvider, meter_provider=SDK MeterProvider",
        "peer": "RedisCluster + instrumentation-redis (instrument_client) + tenacity @retry "
        "(3 attempts, wait_random_exponential) + pybreaker calling()",
        "peer+hist": "peer + db.client.operation.duration histogram recorded by hand per call",
    }
    for name in clients:
        print(f"   {name:<10} {text[name]}")


def print_throughput(results: dict[str, Series], args: argparse.Namespace) -> None:
    print()
    print(
        f"1. Throughput with {args.concurrency} coroutines, ops/s (median of {args.rounds} "
        f"rounds of {args.seconds:g}s per client, clients alternating, order rotating)"
    )
    print("   ratios: median [min..max] over rounds of the per-round ratio")
    for mode, series in results.items():
        names = list(series.ops)
        print(f"   {mode}")
        for name in names:
            ratio = fmt_ratio(series.ratios(name, "raw")) if name != "raw" else "1"
            print(f"     {name:<10}{series.median(name):>9,.0f}  vs raw {ratio}")
        for num, den, meaning in PAIRS:
            if num in series.ops and den in series.ops:
                print(f"     {num}/{den:<10} {fmt_ratio(series.ratios(num, den)):<24} {meaning}")


def print_latency(results: dict[str, Latencies], args: argparse.Namespace) -> None:
    print()
    per_block = max(1, args.latency_ops // args.blocks)
    print(
        f"2. Sequential latency, one op at a time, the clients taking turns op by op (random "
        f"order), {per_block * args.blocks:,} ops per client and command in {args.blocks} blocks"
    )
    print(
        "   speed a/b = median latency of b / median latency of a, per block: median "
        "[min..max] over blocks (comparable with a throughput ratio a/b)"
    )
    for command, lat in results.items():
        print(f"   {command}   {'median us':>10}{'mean us':>9}{'p99 us':>9}  speed vs raw")
        for name in lat.blocks:
            speed = fmt_ratio(lat.speed_ratios(name)) if name != "raw" else "1"
            print(
                f"     {name:<10}{lat.median_us(name):>10.1f}{lat.mean_us(name):>9.1f}"
                f"{lat.p99_us(name):>9.1f}  {speed}"
            )
        for num, den, meaning in PAIRS:
            if num in lat.blocks and den in lat.blocks:
                extra = lat.median_us(num) - lat.median_us(den)
                print(
                    f"     {num}/{den:<10} {fmt_ratio(lat.speed_ratios(num, base=den)):<24}"
                    f"{extra:+7.1f} us  {meaning}"
                )


def print_verdict(throughput: dict[str, Series] | None, latency: dict[str, Latencies]) -> None:
    """The issue's target is on throughput (part 1, callers in parallel); the op-by-op speed
    of one sequential caller (part 2) is printed beside it, not judged."""
    print()
    judged = []
    for mode, s in (throughput or {}).items():
        if "on" in s.ops and "peer" in s.ops:
            judged.append((mode, statistics.median(s.ratios("on", "peer"))))
    sequential = [
        f"{command} {statistics.median(lat.speed_ratios('on', 'peer')):.3f}"
        for command, lat in latency.items()
        if "on" in lat.blocks and "peer" in lat.blocks
    ]
    if judged:
        met = all(ratio >= TARGET_VS_PEER for _, ratio in judged)
        print(
            f"   target on/peer throughput >= {TARGET_VS_PEER}: {'MET' if met else 'NOT MET'} ("
            + ", ".join(f"{mode} {ratio:.3f}" for mode, ratio in judged)
            + ")"
        )
    if sequential:
        print("   one sequential caller, on/peer speed (not judged): " + ", ".join(sequential))


def print_micro(m: dict[str, Any]) -> None:
    print()
    print(
        f"3. Layers without the network: {m['calls']:,} calls per batch, median of "
        f"{m['repeats']} batches; overhead = us/call minus the terminal's [min..max]"
    )
    print(
        f"   terminal: ours handler(Command('GET', ('k',), {{}})) {m['terminal_us']['ours']:.3f} "
        f"us/call; peer execute_command('GET', 'k') {m['terminal_us']['peer']:.3f} us/call"
    )
    for name, row in m["rows"].items():
        print(f"   {name:<58}{row['overhead_us']:>8.2f} us  [{row['min']:.2f}..{row['max']:.2f}]")
    print(f"   spans exported during part 3, by scope: {m['spans']}")
    print(
        "   tracing with include_keys, one MGET of 20,000 keys: "
        f"{m['big_mget_span_ms']:.2f} ms/span (the command built outside the timing)"
    )


def print_global(g: dict[str, Any]) -> None:
    print()
    print(
        "4. Global instrumentation (RedisInstrumentor().instrument()) vs the per-instance one "
        f"used above: {g['ops']:,} GETs each, interleaved op by op"
    )
    med = g["median_us"]
    print(
        f"   median us: instance {med['peer (instance)']:.1f}, global {med['peer (global)']:.1f};"
        f" speed global/instance {fmt_ratio(g['speed_global_vs_instance'])}"
    )
    print("   spans per 500 sequential GETs while instrumented globally (scope: count):")
    for name, counts in g["census_500_gets"].items():
        print(f"     {name:<16}{counts or '{}'}")
    print("   after uninstrument(), 200 GETs:")
    for name, counts in g["after_uninstrument_200_gets"].items():
        print(f"     {name:<16}{counts or '{}'}")


# --------------------------------------------------------------------------- main


async def make_clients(names: list[str], nodes: str, sdk: Sdk) -> dict[str, Any]:
    """Every client of ``names``, connected; ``raw``, ``off`` and ``peer`` always (parts 3-4)."""
    off = create_redis_cluster(nodes, health_check_interval=0)
    if "tracing" in off.active_stages:
        raise SystemExit("'off' has a tracing stage: is a global OTel SDK configured?")
    made: dict[str, Any] = {"raw": make_raw_cluster(nodes, off.settings), "off": off}
    if "on" in names:
        made["on"] = create_redis_cluster(
            nodes,
            health_check_interval=0,
            tracer_provider=sdk.tracer_provider,
            meter_provider=sdk.meter_provider,
        )
        if "tracing" not in made["on"].active_stages:
            raise SystemExit("'on' has no tracing stage although an SDK provider was passed")
    for name in ("peer", "peer+hist"):
        if name == "peer" or name in names:
            peer_raw = make_raw_cluster(nodes, off.settings)
            # This instance only: RedisInstrumentor().instrument() would patch the class and
            # trace raw and our backend too (part 4).
            RedisInstrumentor.instrument_client(peer_raw, tracer_provider=sdk.tracer_provider)
            hist = make_histogram(sdk.meter_provider, "bench.peer") if name != "peer" else None
            made[name] = PeerClient(peer_raw, hist)
    for client in made.values():
        if isinstance(client, PeerClient):
            await client.raw.initialize()
        elif isinstance(client, RedisCluster):
            await client.initialize()
        else:
            await client.connect()
    return made


async def amain(args: argparse.Namespace, nodes: str, where: str) -> dict[str, Any]:
    keys = [f"bench:{i}" for i in range(args.keys)]
    value = b"v" * args.value_size
    sdk = Sdk(args.metric_interval)
    all_clients = await make_clients(args.clients, nodes, sdk)
    clients = {name: all_clients[name] for name in args.clients}
    report: dict[str, Any] = {}
    try:
        raw = all_clients["raw"]
        for key in keys:
            await raw.set(key, value)
        server = redis_server_version(nodes)
        v = package_version
        print(f"resilient_cache telemetry benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}")
        print(f"   cluster:   {where}: {nodes}")
        print(f"   versions:  redis-server {server}, Python {platform.python_version()}, "
              f"redis-py {v('redis')}, hiredis {v('hiredis')}, opentelemetry-sdk "
              f"{v('opentelemetry-sdk')}, opentelemetry-instrumentation-redis "
              f"{v('opentelemetry-instrumentation-redis')}, tenacity {v('tenacity')}, pybreaker "
              f"{v('pybreaker')}")  # fmt: skip
        print(f"   library:   {library_state()}")
        print(f"   machine:   {os.cpu_count()} CPUs, {platform.platform()}; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
        print(f"   stages:    off {all_clients['off'].active_stages}; on "
              f"{all_clients['on'].active_stages if 'on' in all_clients else '-'}")  # fmt: skip
        print(f"   workload:  {args.keys} keys, {args.value_size}-byte values; gc "
              f"{'on' if gc.isenabled() else 'OFF'}; metric collection every "
              f"{args.metric_interval:g}s")  # fmt: skip
        describe(list(clients))
        report["environment"] = {
            "cluster": where,
            "redis_server": server,
            "python": platform.python_version(),
            "versions": {
                p: v(p)
                for p in (
                    "redis",
                    "opentelemetry-sdk",
                    "opentelemetry-instrumentation-redis",
                    "tenacity",
                    "pybreaker",
                )
            },
            "library": library_state(),
            "args": vars(args),
        }
        sys.stdout.flush()

        # Sanity: who emits spans (before anything is timed).
        census = await span_census(clients, sdk, keys, 200)
        print(f"   spans per 200 GETs: {census}")
        report["span_census"] = census

        modes = [
            Mode(f"GET x{args.concurrency}", "GET", args.concurrency),
            Mode(f"SET x{args.concurrency}", "SET", args.concurrency),
        ]
        throughput = await run_rounds(clients, modes, args, keys, value, "throughput")
        latency: dict[str, Latencies] = {}
        if args.latency_ops:
            for command in ("GET", "SET"):
                latency[command] = await interleaved_latency(
                    clients, command, keys, value, args.latency_ops, args.blocks
                )
                progress(f"latency: {command} done")
        spans_main = sdk.flush_counts()
        micro_result = None
        if args.micro_repeats:
            micro_result = await micro(all_clients["off"], nodes, sdk, args)
            progress("layers without the network done")
        global_result = None
        if args.global_ops and "peer" in all_clients:
            global_result = await global_check(all_clients, nodes, sdk, keys, args)
            progress("global instrumentation check done")
        profile = ""
        if args.profile:
            seconds = max(1.0, args.seconds * 4)
            profile = await profile_gets(clients, ("off", "on", "peer"), keys, seconds, 25)

        print_throughput(throughput, args)
        print_latency(latency, args)
        print_verdict(throughput, latency)
        print(
            f"   spans exported in parts 1-2 by scope: {spans_main}; BatchSpanProcessor "
            f"drops: {sdk.drops.dropped}; metric exports: {sdk.metric_exporter.exports}"
        )
        report["throughput"] = {k: s.ops for k, s in throughput.items()}
        report["latency"] = {k: lat.summary() for k, lat in latency.items()}
        report["ratios"] = {
            "throughput": {
                mode: {f"{a}/{b}": s.ratios(a, b) for a, b, _ in PAIRS if a in s.ops and b in s.ops}
                for mode, s in throughput.items()
            },
            "latency": {
                cmd: {
                    f"{a}/{b}": lat.speed_ratios(a, base=b)
                    for a, b, _ in PAIRS
                    if a in lat.blocks and b in lat.blocks
                }
                for cmd, lat in latency.items()
            },
        }
        report["spans_main"] = spans_main
        report["drops"] = sdk.drops.dropped
        if micro_result is not None:
            print_micro(micro_result)
            report["micro"] = micro_result
        if global_result is not None:
            print_global(global_result)
            report["global"] = global_result
        if profile:
            print(profile)
    finally:
        with contextlib.suppress(Exception):
            for key in keys:  # leave a shared cluster (REDIS_CLUSTER_NODES) as we found it
                await all_clients["raw"].delete(key)
        for c in all_clients.values():
            with contextlib.suppress(Exception):
                await c.aclose()
        sdk.shutdown()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = perf_counter()
    with cluster_nodes() as (nodes, where):
        report = asyncio.run(amain(args, nodes, where))
    return finish(started, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
