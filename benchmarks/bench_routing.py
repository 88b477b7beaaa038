"""Read routing: throughput per strategy, and read latency with one replica delayed 20 ms.

Run ``.venv/bin/python -m benchmarks.bench_routing`` from the repository root (``make bench``
runs it after bench_pipeline); ``--help`` lists the options, ``--quick`` is a short run that
only checks the script works. docs/performance.md ("Read routing") has the figures we got.

1. No slow node. GET throughput (ops/s), one coroutine awaiting in a loop and
   ``--concurrency`` coroutines, through raw ``redis.asyncio.cluster.RedisCluster`` (primaries
   only; and its ``load_balancing_strategy`` ROUND_ROBIN, ROUND_ROBIN_REPLICAS and
   RANDOM_REPLICA) and through ``create_redis_cluster(routing=...)`` with each strategy. The
   clients take turns in every round (``_common.run_rounds``); a figure is the median over the
   rounds.
2. One replica slowed down for real: tests/slow_replica.py puts a TCP proxy (a process of its
   own) in front of it that holds every reply ``--delay`` seconds (20 ms), and the cluster
   announces the replica at the proxy's port, so every client reaches it only through the
   delay. Each read runs in a task of its own (``Guarded``, every client alike). Then
   2a. sequential GETs, the clients taking turns op by op in a random order
       (``_common.interleaved_latency``; its first block warms up, and lets ``latency`` learn):
       p50, p95, p99, max, the share of reads that took at least the delay, and for ours the
       share of reads hedged and of hedges that answered first (the routing stage's counters);
   2b. ``--readers`` concurrent readers per client, one client at a time, ``--concurrent-ops``
       reads after a warm-up by the same readers: p50, p99, reads/s, the GETs the servers
       executed per read (``INFO commandstats`` summed over the nodes), the hedges, and the
       connections opened to the slow replica (the proxy's count).
   The healthy reference is the same reads on the primaries only, which never touch the proxy.
   A read that fails (or ends cancelled without being cancelled) is counted and shown, not
   fatal.

Strategies the client refuses (``ConfigurationError``: the setting does not exist in this
version) are listed as not measured, with the reason. Part 2 needs a cluster of its own (it
changes a replica's announced port): with ``REDIS_CLUSTER_NODES`` set, only part 1 runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis
from redis.asyncio.cluster import ClusterNode as RedisPyClusterNode
from redis.asyncio.cluster import RedisCluster
from redis.cluster import LoadBalancingStrategy

from resilient_cache import ConfigurationError, create_redis_cluster
from resilient_cache.devcluster import DevCluster
from resilient_cache.settings import parse_cluster_nodes

from ._common import (
    Latencies,
    Mode,
    Series,
    add_round_options,
    finish,
    interleaved_latency,
    library_state,
    package_version,
    parse_with_quick,
    perf_counter,
    progress,
    redis_server_version,
    run_rounds,
)

WARMUP_CONCURRENT = 1_000  # part 2b: reads before the timed ones, with the same readers

#: Part 1: raw redis-py's load-balancing strategies and ours, each read-routing setting.
RAW_PART1: dict[str, LoadBalancingStrategy | None] = {
    "raw primary": None,
    "raw round_robin": LoadBalancingStrategy.ROUND_ROBIN,
    "raw round_robin_replicas": LoadBalancingStrategy.ROUND_ROBIN_REPLICAS,
    "raw random_replica": LoadBalancingStrategy.RANDOM_REPLICA,
}
OURS_PART1: dict[str, dict[str, Any]] = {
    "ours primary": {},
    "ours read_from_replicas": {"read_from_replicas": True},
    "ours round_robin_replicas": {"strategy": "round_robin_replicas"},
    "ours replica_preferred": {"strategy": "replica_preferred"},
    "ours random_replica": {"strategy": "random_replica"},
    "ours latency": {"strategy": "latency"},
}
#: Which raw client each of ours is compared with (the same nodes in the same proportions).
SAME_ROUTING = {
    "ours primary": "raw primary",
    "ours read_from_replicas": "raw round_robin",
    "ours round_robin_replicas": "raw round_robin_replicas",
    "ours random_replica": "raw random_replica",
}


#: In a contender's options: not a routing setting but the client's ``auto_pipeline``.
AUTO = "auto_pipeline"


def part2_contenders(hedge_budget: float) -> dict[str, dict[str, Any]]:
    hedged = {"strategy": "round_robin_replicas", "hedge_budget": hedge_budget}
    return {
        "ours primary": {},
        "ours read_from_replicas": {"read_from_replicas": True},
        "ours round_robin_replicas": {"strategy": "round_robin_replicas"},
        "ours latency": {"strategy": "latency"},
        "ours rr_replicas+hedge 5ms": {**hedged, "hedge_after": 0.005},
        "ours rr_replicas+hedge p95": {**hedged, "hedge_after": "p95"},
        # A hedge's loser is cancelled: alone, its connection is closed (the reply may still
        # come); in an auto-pipelined batch, its reply is read and dropped, the connection kept.
        "ours rr_replicas+hedge 5ms auto": {**hedged, "hedge_after": 0.005, AUTO: True},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Read throughput per routing strategy, and read latency with one replica "
        "delayed, against raw redis-py, in one run on one local Redis Cluster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_round_options(parser, seconds=0.25, rounds=9)
    parser.add_argument("--concurrency", type=int, default=50, help="coroutines in part 1")
    parser.add_argument("--keys", type=int, default=99, help="size of the key set")
    parser.add_argument("--delay", type=float, default=0.020, help="the slow replica's delay (s)")
    parser.add_argument(
        "--latency-ops", type=int, default=2_000, help="part 2a: timed reads per client"
    )
    parser.add_argument("--blocks", type=int, default=4, help="part 2a: blocks (+1 warm-up)")
    parser.add_argument("--readers", type=int, default=20, help="part 2b: concurrent readers")
    parser.add_argument(
        "--concurrent-ops", type=int, default=4_000, help="part 2b: timed reads per client"
    )
    parser.add_argument(
        "--hedge-budget",
        type=float,
        default=0.5,
        help="hedge_budget of the hedged clients (a third of the reads meet the slow replica)",
    )
    parser.add_argument("--skip-slow", action="store_true", help="part 1 only")
    return parse_with_quick(
        parser,
        argv,
        {
            "seconds": 0.05,
            "rounds": 2,
            "warmup": 0.05,
            "latency_ops": 200,
            "blocks": 2,
            "concurrent_ops": 400,
        },
    )


# --------------------------------------------------------------------------- clients


def raw_client(nodes: str, settings: Any, strategy: LoadBalancingStrategy | None) -> RedisCluster:
    """Raw redis-py with the library's socket timeouts and pool size (as make_raw_cluster)."""
    options: dict[str, Any] = {}
    if strategy is not None:
        options["load_balancing_strategy"] = strategy
    return RedisCluster(
        startup_nodes=[RedisPyClusterNode(n.host, n.port) for n in parse_cluster_nodes(nodes)],
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_connect_timeout,
        max_connections=settings.max_connections,
        decode_responses=settings.decode_responses,
        **options,
    )


async def open_clients(
    nodes: str,
    raws: dict[str, LoadBalancingStrategy | None],
    ours: dict[str, dict[str, Any]],
    refused: dict[str, str],
) -> dict[str, Any]:
    """Every client connected, raw first; a strategy the library refuses goes to ``refused``."""
    clients: dict[str, Any] = {}
    reference = create_redis_cluster(nodes, health_check_interval=0, autoload=False)
    for name, strategy in raws.items():
        raw = raw_client(nodes, reference.settings, strategy)
        await raw.initialize()
        clients[name] = raw
    for name, options in ours.items():
        routing = {k: v for k, v in options.items() if k != AUTO}
        try:
            client = create_redis_cluster(
                nodes,
                routing=routing,
                auto_pipeline=options.get(AUTO, False),
                health_check_interval=0,
                autoload=False,
            )
        except ConfigurationError as err:
            refused[name] = str(err).splitlines()[-1].strip()
            continue
        await client.connect()
        clients[name] = client
    await reference.aclose()
    return clients


async def close_all(clients: dict[str, Any]) -> None:
    for client in clients.values():
        with contextlib.suppress(Exception):
            await client.aclose()


# --------------------------------------------------------------------------- part 1


async def part1(
    nodes: str, args: argparse.Namespace, keys: list[str], value: bytes
) -> tuple[dict[str, Series], list[Mode], dict[str, str]]:
    refused: dict[str, str] = {}
    clients = await open_clients(nodes, RAW_PART1, OURS_PART1, refused)
    modes = [Mode("GET seq", "GET", 0), Mode(f"GET x{args.concurrency}", "GET", args.concurrency)]
    try:
        results = await run_rounds(clients, modes, args, keys, value, "part 1 throughput")
    finally:
        await close_all(clients)
    return results, modes, refused


def print_part1(
    results: dict[str, Series], modes: list[Mode], refused: dict[str, str], args: argparse.Namespace
) -> None:
    print()
    print(
        f"1. Read throughput, no slow node: GET ops/s, median of {args.rounds} rounds of "
        f"{args.seconds:g}s per client (clients alternating); {args.keys} keys"
    )
    print("   vs raw = ours / raw redis-py with the same routing, median [min..max] per round")
    head = f"   {'client':<28}" + "".join(f"{m.name:>12}" for m in modes)
    head += "".join(f"  {'vs raw ' + m.name:<24}" for m in modes)
    print(head)
    print("   " + "-" * (len(head) - 3))
    names = list(results[modes[0].name].ops)
    for name in names:
        row = f"   {name:<28}" + "".join(f"{results[m.name].median(name):>12,.0f}" for m in modes)
        twin = SAME_ROUTING.get(name)
        for m in modes:
            series = results[m.name]
            if twin is not None and twin in series.ops:
                ratios = series.ratios(name, twin)
                cell = f"{statistics.median(ratios):.3f} [{min(ratios):.3f}..{max(ratios):.3f}]"
            else:
                cell = ""
            row += f"  {cell:<24}"
        print(row)
    for name, reason in refused.items():
        print(f"   {name:<28}not measured: {reason}")


# --------------------------------------------------------------------------- part 2


def stats_of(samples: list[float], delay: float) -> dict[str, Any]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return {
        "reads": len(ordered),
        "p50_ms": pick(0.50),
        "p95_ms": pick(0.95),
        "p99_ms": pick(0.99),
        "max_ms": ordered[-1] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "slow_share": sum(1 for s in ordered if s >= delay) / len(ordered),
    }


def server_gets(cluster: DevCluster) -> int:
    """GETs the servers executed since their last CONFIG RESETSTAT, summed over the nodes."""
    total = 0
    for node in cluster.nodes:
        stats = cluster.admin(node).info("commandstats")
        total += int(stats.get("cmdstat_get", {}).get("calls", 0))
    return total


def reset_stats(cluster: DevCluster) -> None:
    for node in cluster.nodes:
        cluster.admin(node).config_resetstat()


class Guarded:
    """A client whose ``get()`` runs each read in a task of its own (as a request handler's
    would be) and counts a read that ends cancelled although nobody cancelled it (the client's
    own cancellation leaked out) in ``errors``, instead of ending the run. A Ctrl-C still ends
    it. Used for every client of part 2 alike."""

    def __init__(self, client: Any, errors: Counter[str]) -> None:
        self.client = client
        self.errors = errors

    async def get(self, key: str) -> Any:
        read = asyncio.ensure_future(self.client.get(key))
        try:
            return await read
        except asyncio.CancelledError:
            cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
            if cancelling is None or cancelling():
                raise  # this task was cancelled (the run is being stopped), or no way to tell
            self.errors["CancelledError"] += 1
            return None


async def concurrent_reads(
    client: Any, keys: list[str], ops: int, readers: int, errors: Counter[str]
) -> tuple[list[float], float]:
    """``ops`` GETs by ``readers`` coroutines pulling from one counter: each successful read's
    seconds, and the wall time. A read that fails is counted in ``errors`` by its type."""
    samples: list[float] = []
    next_op = [0]

    async def reader() -> None:
        get = client.get
        while next_op[0] < ops:
            key = keys[next_op[0] % len(keys)]
            next_op[0] += 1
            started = perf_counter()
            try:
                await get(key)
            except Exception as err:
                errors[type(err).__name__] += 1
            else:
                samples.append(perf_counter() - started)

    started = perf_counter()
    await asyncio.gather(*(reader() for _ in range(readers)))
    return samples, perf_counter() - started


def hedge_counts(client: Any) -> tuple[int, int] | None:
    """``(hedges sent, hedges that answered first)`` so far by ``client``'s routing stage, or
    None (raw redis-py, or a routing stage that does not hedge)."""
    stage_of = getattr(client, "stage", None)
    if stage_of is None:
        return None
    try:
        stage = stage_of("routing")
    except KeyError:
        return None
    hedges = getattr(stage, "hedges", None)
    return None if hedges is None else (int(hedges), int(getattr(stage, "hedges_won", 0)))


def hedge_share(
    before: tuple[int, int] | None, after: tuple[int, int] | None, reads: int
) -> tuple[float | None, float | None]:
    """Hedged reads as a share of ``reads``, and the share of those the hedge won."""
    if before is None or after is None:
        return None, None
    sent, won = after[0] - before[0], after[1] - before[1]
    return sent / reads, (won / sent if sent else None)


async def part2(
    cluster: DevCluster, nodes: str, args: argparse.Namespace, keys: list[str], proxy: Any
) -> dict[str, Any]:
    refused: dict[str, str] = {}
    raws = {
        "raw primary": None,
        "raw round_robin_replicas": LoadBalancingStrategy.ROUND_ROBIN_REPLICAS,
    }
    clients = await open_clients(nodes, raws, part2_contenders(args.hedge_budget), refused)
    out: dict[str, Any] = {"refused": refused, "sequential": {}, "concurrent": {}}
    leaked = {name: Counter[str]() for name in clients}
    guarded = {name: Guarded(client, leaked[name]) for name, client in clients.items()}
    try:
        hedges_before = {name: hedge_counts(client) for name, client in clients.items()}
        latencies: Latencies = await interleaved_latency(
            guarded, "GET", keys, b"", args.latency_ops, args.blocks
        )
        per_block = max(1, args.latency_ops // args.blocks)
        sent = per_block * args.blocks + min(per_block, 500)  # the warm-up block included
        for name, client in clients.items():
            row = stats_of(latencies.all(name), args.delay)
            row["hedged"], row["hedges_won"] = hedge_share(
                hedges_before[name], hedge_counts(client), sent
            )
            row["errors"] = dict(leaked[name])
            out["sequential"][name] = row
        progress("part 2a (sequential, interleaved) done")
        for name, client in clients.items():
            # Warm-up with the same readers: the pools grow to their size here (a connection
            # to the slow replica costs several delayed round trips to open), and the latency
            # strategy's averages settle under this load.
            errors = leaked[name] = Counter()
            guarded[name].errors = errors
            await concurrent_reads(guarded[name], keys, WARMUP_CONCURRENT, args.readers, errors)
            await asyncio.to_thread(reset_stats, cluster)
            opened = (await asyncio.to_thread(proxy.stats))["accepted"]
            before = hedge_counts(client)
            samples, wall = await concurrent_reads(
                guarded[name], keys, args.concurrent_ops, args.readers, errors
            )
            after = hedge_counts(client)
            gets = await asyncio.to_thread(server_gets, cluster)
            row = stats_of(samples, args.delay)
            row["reads_per_s"] = len(samples) / wall
            row["server_gets_per_read"] = gets / len(samples)
            row["hedged"], row["hedges_won"] = hedge_share(before, after, len(samples))
            row["slow_connections"] = (await asyncio.to_thread(proxy.stats))["accepted"] - opened
            row["errors"] = dict(errors)  # warm-up included
            out["concurrent"][name] = row
        progress("part 2b (concurrent) done")
    finally:
        await close_all(clients)
    return out


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def print_part2(result: dict[str, Any], args: argparse.Namespace, slow: str) -> None:
    per_block = max(1, args.latency_ops // args.blocks)
    delay_ms = args.delay * 1e3
    print()
    print(
        f"2. One replica ({slow}) behind a proxy that delays its replies {delay_ms:g} ms; "
        f"hedged clients: hedge_budget {args.hedge_budget:g}"
    )
    print(
        f"2a. Sequential GETs, the clients taking turns op by op (random order), "
        f"{per_block * args.blocks:,} timed reads per client after {min(per_block, 500)} "
        "warm-up reads"
    )
    head = (
        f"   {'client':<28}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'max ms':>8}{'mean ms':>8}"
        f"{'>=' + format(delay_ms, 'g') + ' ms':>10}{'hedged':>8}{'won':>6}"
    )
    print(head)
    print("   " + "-" * (len(head) - 3))
    for name, row in result["sequential"].items():
        print(
            f"   {name:<28}{row['p50_ms']:>8.2f}{row['p95_ms']:>8.2f}{row['p99_ms']:>8.2f}"
            f"{row['max_ms']:>8.1f}{row['mean_ms']:>8.2f}{row['slow_share']:>10.1%}"
            f"{share(row['hedged']):>8}{share(row['hedges_won']):>6}"
            + (f"  errors: {row['errors']}" if row["errors"] else "")
        )
    print("   hedged = hedges sent per read (warm-up included); won = hedges that answered first")
    print()
    print(
        f"2b. {args.readers} concurrent readers per client, one client at a time, "
        f"{args.concurrent_ops:,} timed reads each (after {WARMUP_CONCURRENT:,} warm-up reads by "
        "the same readers)"
    )
    head = (
        f"   {'client':<28}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'>=' + format(delay_ms, 'g') + ' ms':>10}{'reads/s':>10}{'GETs/read':>11}"
        f"{'hedged':>8}{'won':>6}{'conns':>7}"
    )
    print(head)
    print("   " + "-" * (len(head) - 3))
    for name, row in result["concurrent"].items():
        print(
            f"   {name:<28}{row['p50_ms']:>8.2f}{row['p99_ms']:>8.2f}{row['max_ms']:>8.1f}"
            f"{row['slow_share']:>10.1%}{row['reads_per_s']:>10,.0f}"
            f"{row['server_gets_per_read']:>11.3f}{share(row['hedged']):>8}"
            f"{share(row['hedges_won']):>6}{row['slow_connections']:>7}"
            + (f"  errors: {row['errors']}" if row["errors"] else "")
        )
    print(
        "   GETs/read = GETs the servers executed (INFO commandstats, all nodes) per read; "
        "conns = connections opened to the slow replica (through the proxy) during the timed reads"
    )
    for name, reason in result["refused"].items():
        print(f"   {name:<28}not measured: {reason}")


# --------------------------------------------------------------------------- main


async def write_keys(nodes: str, keys: list[str], value: bytes) -> None:
    async with create_redis_cluster(nodes, health_check_interval=0, autoload=False) as client:
        for key in keys:
            await client.set(key, value)


async def delete_keys(nodes: str, keys: list[str]) -> None:
    async with create_redis_cluster(nodes, health_check_interval=0, autoload=False) as client:
        for key in keys:
            await client.delete(key)


def print_header(nodes: str, where: str) -> dict[str, Any]:
    server = redis_server_version(nodes)
    state = library_state()
    v = package_version
    print(f"resilient_cache read routing benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"   cluster:   {where}: {nodes}")
    print(f"   versions:  redis-server {server}, Python {platform.python_version()}, "
          f"redis-py {v('redis')}, hiredis {v('hiredis')}, "
          f"resilient-cache {v('resilient-cache')}")  # fmt: skip
    print(f"   machine:   {os.cpu_count()} CPUs, {platform.platform()}; the client, the proxy "
          "process and the servers share them")  # fmt: skip
    print(f"   library:   {state}")
    sys.stdout.flush()
    return {
        "cluster": where,
        "redis_server": server,
        "python": platform.python_version(),
        "redis_py": v("redis"),
        "cpus": os.cpu_count(),
        "library": state,
    }


def run(
    args: argparse.Namespace, nodes: str, where: str, cluster: DevCluster | None
) -> dict[str, Any]:
    keys = [f"bench:routing:{i}" for i in range(args.keys)]
    value = b"v" * args.value_size
    report: dict[str, Any] = {"environment": print_header(nodes, where), "args": vars(args)}
    asyncio.run(write_keys(nodes, keys, value))
    try:
        results, modes, refused = asyncio.run(part1(nodes, args, keys, value))
        print_part1(results, modes, refused, args)
        sys.stdout.flush()
        report["part1"] = {"ops": {k: v.ops for k, v in results.items()}, "refused": refused}
        if args.skip_slow:
            return report
        if cluster is None:
            print("\n2. Skipped: the slow replica needs a cluster of this run's own (it changes "
                  "a replica's announced port); unset REDIS_CLUSTER_NODES")  # fmt: skip
            return report
        # Import here: the helper lives with the tests (tests/slow_replica.py).
        from tests.slow_replica import slow_replica

        with slow_replica(cluster, delay=args.delay) as slow:
            progress(f"slow replica {slow.replica.address} announced at {slow.address}")
            result = asyncio.run(part2(cluster, nodes, args, keys, slow.proxy))
            result["slow_replica"] = {"real": slow.replica.address, "announced": slow.address}
        where_slow = result["slow_replica"]
        print_part2(result, args, f"{where_slow['real']}, announced at {where_slow['announced']}")
        report["part2"] = result
    finally:
        with contextlib.suppress(redis.RedisError, OSError):
            asyncio.run(delete_keys(nodes, keys))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = perf_counter()
    external = os.environ.get("REDIS_CLUSTER_NODES")
    if external:
        report = run(args, external, "REDIS_CLUSTER_NODES", None)
    else:
        from tests.slow_replica import wait_replicas_listed

        began = perf_counter()
        with DevCluster() as cluster:
            # A fresh cluster's replicas are missing from CLUSTER SLOTS until something is
            # replicated (Redis 7): write to every shard and wait until every node lists them.
            wait_replicas_listed(cluster)
            where = (
                f"throwaway DevCluster (6 redis-server on 127.0.0.1, ready in "
                f"{perf_counter() - began:.1f}s)"
            )
            report = run(args, cluster.startup_nodes, where, cluster)
    return finish(started, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
