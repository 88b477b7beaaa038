"""The memory tier and ``MultiLayerCache.get_or_set`` against cashews and aiocache, in one run.

Run ``.venv/bin/python -m benchmarks.bench_cache`` from the repository root; ``--help`` lists the
options, ``--quick`` is a short run that only checks the script works. docs/performance.md ("The
memory tier and get_or_set against cashews and aiocache") explains the method and has the
figures we got.

Part 1, on a Redis Cluster (a throwaway DevCluster unless ``REDIS_CLUSTER_NODES`` is set): the
cost of a GET served by the memory stage through the whole pipeline
(``create_redis_cluster(..., memory={"enabled": True})``, ``client.get`` on a cached key), of
``MultiLayerCache.get_or_set`` on a memory hit, of a GET through the same client with the memory
stage off (the default), and of a raw redis-py ``RedisCluster.get``. Sequential batches, the
clients taking turns in a new random order every round; the ratios are computed per round.

Part 2, on a throwaway standalone ``redis-server`` (cashews' two-level cache refuses Redis
Cluster, aiocache's Redis backend is single-node): ``get_or_set`` with a memory tier in front
of Redis, ours against cashews and aiocache, in three scenarios:

  (a) memory hit: the key is in this process's memory tier (batches, as in part 1);
  (b) memory miss + Redis hit: a fresh key written to Redis beforehand by another writer,
      so this reader has not seen it (each call timed on its own, clients interleaved op by op
      in random order, as bench_pipeline 1b);
  (c) full miss: a fresh key nobody wrote; a trivial async loader is called and the value
      stored in both tiers (timed as (b)).

Ours also runs on the cluster for reference. Before timing, an accounting pass counts the Redis
commands each contender sends per call (``INFO commandstats`` of the standalone server) and the
loader calls, to check that every scenario is what it claims to be.

Only the public API of resilient_cache is used (``create_redis_cluster``, ``client.get``,
``MultiLayerCache(...).get_or_set`` / ``.set``), so the script keeps working while the memory
stage and MultiLayerCache grow options. The contenders are built in _cache_contenders.py; the
servers and the helpers shared with the other benchmarks are in _common.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from resilient_cache import parse_cluster_nodes

from ._cache_contenders import (
    Contender,
    Loads,
    make_aiocache,
    make_cashews,
    make_ours,
    ours_cache,
    ours_client,
)
from ._common import (
    ORDER_SEED,
    YIELD_EVERY,
    Latencies,
    cluster_nodes,
    finish,
    fmt_ratio,
    library_state,
    make_raw_cluster,
    package_version,
    parse_with_quick,
    perf_counter,
    progress,
    standalone_redis,
)

QUICK = {  # --quick: every part, a few seconds each
    "rounds": 2,
    "hit_calls": 2_000,
    "get_calls": 100,
    "ops": 200,
    "blocks": 2,
}


# --------------------------------------------------------------------------- options


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Memory-tier hit cost and get_or_set against cashews and aiocache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the batch parts")
    parser.add_argument(
        "--hit-calls", type=int, default=20_000, help="calls per batch served from memory"
    )
    parser.add_argument(
        "--get-calls", type=int, default=1_000, help="calls per batch that go to Redis (part 1)"
    )
    parser.add_argument("--keys", type=int, default=100, help="keys cycled through in batches")
    parser.add_argument(
        "--ops", type=int, default=3_000, help="timed calls per contender in (b) and (c)"
    )
    parser.add_argument("--blocks", type=int, default=5, help="blocks of --ops (for min/max)")
    parser.add_argument(
        "--skip-cluster", action="store_true", help="no DevCluster: skip part 1 and ours-cluster"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    args = parse_with_quick(parser, argv, QUICK)
    if min(args.rounds, args.hit_calls, args.get_calls, args.keys, args.ops, args.blocks) < 1:
        parser.error("all counts must be >= 1")
    return args


# --------------------------------------------------------------------------- servers


def command_calls(probe: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` of the standalone server: calls per command name."""
    stats = probe.info("commandstats")
    return {k.removeprefix("cmdstat_").upper(): int(v["calls"]) for k, v in stats.items()}


# --------------------------------------------------------------------------- timing


async def batch_us(call: Callable[[str], Awaitable[Any]], keys: list[str], n: int) -> float:
    """µs per call of ``n`` sequential awaits of ``call(key)`` over ``keys``."""
    k = len(keys)
    start = perf_counter()
    for i in range(n):
        await call(keys[i % k])
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    return (perf_counter() - start) / n * 1e6


async def noop(key: str) -> Any:
    return None


@dataclass
class Batches:
    """µs per call of every contender, one value per round."""

    us: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.us[name])

    def ratios(self, num: str, den: str) -> list[float]:
        """Per round: µs of ``num`` / µs of ``den`` (how many times ``den`` is faster)."""
        return [a / b for a, b in zip(self.us[num], self.us[den], strict=True)]


async def run_batches(
    calls: dict[str, tuple[Callable[[str], Awaitable[Any]], list[str], int]],
    rounds: int,
    label: str,
) -> Batches:
    """Every round, each contender runs one batch; the order is shuffled every round."""
    names = list(calls)
    shuffle = random.Random(ORDER_SEED).shuffle
    for name in names:  # warm-up
        call, keys, n = calls[name]
        await batch_us(call, keys, max(1, n // 5))
    out = Batches({n: [] for n in names})
    for r in range(rounds):
        shuffle(names)
        for name in names:
            call, keys, n = calls[name]
            out.us[name].append(await batch_us(call, keys, n))
        if (r + 1) % 5 == 0 or r + 1 == rounds:
            progress(f"{label}: round {r + 1}/{rounds}")
    return out


async def interleaved(
    contenders: dict[str, Contender],
    scenario: str,
    ops: int,
    blocks: int,
) -> Latencies:
    """(b) or (c): each call on a fresh key, timed on its own, contenders interleaved op by op in
    a new random order each time. Before each block, (b) has the keys written to Redis by each
    contender's other writer (untimed)."""
    names = list(contenders)
    shuffle = random.Random(ORDER_SEED).shuffle
    per_block = max(1, ops // blocks)
    out: dict[str, list[list[float]]] = {n: [] for n in names}
    for b in range(-1, blocks):  # block -1 is the warm-up
        count = per_block if b >= 0 else min(per_block, 200)
        keys = [f"{scenario}:{b}:{i}" for i in range(count)]
        if scenario == "b":
            for name in names:
                for key in keys:
                    await contenders[name].write_redis_only(key)
        await asyncio.sleep(0.2)  # let cashews' listener read the invalidations of the writes
        samples: dict[str, list[float]] = {n: [] for n in names}
        for key in keys:
            shuffle(names)
            for name in names:
                call = contenders[name].get_or_set
                start = perf_counter()
                await call(key)
                samples[name].append(perf_counter() - start)
        if b >= 0:
            for name in contenders:
                out[name].append(samples[name])
    return Latencies(out)


async def accounting(contenders: dict[str, Contender], port: int, n: int = 100) -> dict[str, Any]:
    """Per contender and scenario, alone: Redis commands per call (standalone server only) and
    loader calls per call, over ``n`` calls."""
    result: dict[str, Any] = {}
    probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5.0)  # one connection
    for name, c in contenders.items():
        row: dict[str, Any] = {}
        for scenario in ("a", "b", "c"):
            keys = [f"acct-{scenario}:{i}" for i in range(n)]
            if scenario in "ab":
                for key in keys:
                    await c.write_redis_only(key)
            if scenario == "a":
                for key in keys:
                    await c.get_or_set(key)
            await asyncio.sleep(0.2)
            before_cmds = command_calls(probe) if c.standalone else {}
            before_loads = c.loads.calls
            for key in keys:
                await c.get_or_set(key)
            loads = (c.loads.calls - before_loads) / n
            if c.standalone:
                after = command_calls(probe)
                # The INFO call of the probe itself counts once, on "after".
                diff = {k: (v - before_cmds.get(k, 0)) for k, v in after.items()}
                diff["INFO"] = diff.get("INFO", 1) - 1
                per_call = {k: v / n for k, v in sorted(diff.items()) if v}
            else:
                per_call = None
            row[scenario] = {"redis_per_call": per_call, "loads_per_call": loads}
        result[name] = row
    probe.close()
    return result


# --------------------------------------------------------------------------- report


def summary(lat: Latencies) -> dict[str, Any]:
    return {
        name: {
            "median_us": lat.median_us(name),
            "mean_us": lat.mean_us(name),
            "p99_us": lat.p99_us(name),
            "vs_ours_per_block": lat.speed_ratios("ours", base=name),
        }
        for name in lat.blocks
    }


def fmt_cmds(per_call: dict[str, float] | None) -> str:
    if per_call is None:
        return "n/a (cluster)"
    if not per_call:
        return "none"
    return " + ".join(f"{v:g} {k}" for k, v in per_call.items())


def print_part1(b: Batches, args: argparse.Namespace, verified: str) -> None:
    print()
    print(
        f"1. Memory tier hit cost on the cluster: median of {args.rounds} rounds; a batch per "
        f"round per client ({args.hit_calls:,} calls when served from memory, "
        f"{args.get_calls:,} when sent to Redis), order shuffled every round"
    )
    print("   hit      = client.get(k) on a cached key, memory stage on, default pipeline")
    print("   mlc hit  = MultiLayerCache.get_or_set(k, loader) on a memory hit (memory stage off)")
    print("   off      = client.get(k) with the memory stage off (the default): a Redis GET")
    print("   raw      = redis.asyncio.cluster.RedisCluster.get(k)")
    print("   loop     = the batch loop awaiting `async def noop(key): return None`")
    print(f"   served from memory: {verified}")
    print(f"   {'client':<10}{'us/call':>9}{'minus loop':>12}  {'min..max us':<18}")
    loop = b.median("loop")
    for name in b.us:
        lo, hi = min(b.us[name]), max(b.us[name])
        print(f"   {name:<10}{b.median(name):>9.2f}{b.median(name) - loop:>12.2f}  "
              f"{lo:.2f}..{hi:.2f}")  # fmt: skip
    print("   per-round ratios, median [min..max]:")
    for num, den in (("off", "hit"), ("raw", "hit"), ("off", "mlc hit"), ("raw", "off")):
        print(f"   {num + ' / ' + den:<16}{fmt_ratio(b.ratios(num, den))}")
    hit = b.median("hit")
    speed = statistics.median(b.ratios("off", "hit"))
    print(
        f"   targets: hit <= 3 us: {'meets' if hit <= 3 else 'MISSES'} ({hit:.2f}); "
        f">= 30x a Redis GET: {'meets' if speed >= 30 else 'MISSES'} ({speed:.1f}x)"
    )


def print_part2(
    a: Batches, lat: dict[str, Latencies], acct: dict[str, Any], args: argparse.Namespace
) -> None:
    print()
    print("2. get_or_set with a memory tier in front of Redis (standalone redis-server)")
    print("   Redis commands and loader calls per call (accounting pass, each contender alone):")
    for name, row in acct.items():
        cells = [
            f"({s}) {fmt_cmds(row[s]['redis_per_call'])}, loads {row[s]['loads_per_call']:g}"
            for s in "abc"
        ]
        print(f"   {name:<18}" + "; ".join(cells))
    print()
    print(
        f"   (a) memory hit: batches of {args.hit_calls:,} calls over {args.keys} cached keys, "
        f"median of {args.rounds} rounds; 'vs ours' = per-round us / ours' us"
    )
    loop = a.median("loop")
    print(f"   {'contender':<18}{'us/call':>9}{'minus loop':>12}  {'vs ours':<22}")
    for name in a.us:
        ratio = fmt_ratio(a.ratios(name, "ours")) if name not in ("ours", "loop") else ""
        print(f"   {name:<18}{a.median(name):>9.2f}{a.median(name) - loop:>12.2f}  {ratio:<22}")
    per_block = max(1, args.ops // args.blocks)
    for scenario, title in (("b", "memory miss + Redis hit"), ("c", "full miss, loader")):
        lt = lat[scenario]
        print()
        print(
            f"   ({scenario}) {title}: {per_block * args.blocks:,} calls per contender on fresh "
            f"keys, each timed, interleaved op by op in random order, {args.blocks} blocks"
        )
        print("   'vs ours' = median us of the contender / median us of ours, per block")
        print(f"   {'contender':<18}{'median us':>10}{'mean us':>9}{'p99 us':>9}  {'vs ours':<22}")
        for name in lt.blocks:
            ratio = fmt_ratio(lt.speed_ratios("ours", base=name)) if name != "ours" else ""
            print(
                f"   {name:<18}{lt.median_us(name):>10.1f}{lt.mean_us(name):>9.1f}"
                f"{lt.p99_us(name):>9.1f}  {ratio:<22}"
            )


# --------------------------------------------------------------------------- main


def cluster_gets(nodes: str) -> int:
    """GET calls so far, summed over every node of the cluster (INFO commandstats)."""
    total = 0
    for node in parse_cluster_nodes(nodes):
        client = redis.Redis(host=node.host, port=node.port, socket_timeout=5.0)
        try:
            total += int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))
        finally:
            client.close()
    return total


async def part1(nodes: str, args: argparse.Namespace) -> tuple[Batches, str]:
    keys = [f"bench-mem:{i}" for i in range(args.keys)]
    on = ours_client(nodes, None, memory=True)
    off = ours_client(nodes, None, memory=False)
    raw = make_raw_cluster(nodes, off.settings)
    mlc = ours_cache("bench-part1", off, "p1:")
    loads = Loads()
    try:
        await on.connect()
        await off.connect()
        await raw.initialize()
        for key in keys:
            await raw.set(key, b"v" * 16)
        for key in keys:  # fill both memory tiers
            await on.get(key)
            await mlc.get_or_set(key, loads.load)
        # Served from memory? No GET may reach any node while the cached keys are read.
        before = cluster_gets(nodes)
        for key in keys * 10:
            await on.get(key)
        reached = cluster_gets(nodes) - before
        verified = f"{reached} GETs reached the nodes for {len(keys) * 10} hits"

        async def mlc_hit(key: str) -> Any:
            return await mlc.get_or_set(key, loads.load)

        calls = {
            "hit": (on.get, keys, args.hit_calls),
            "mlc hit": (mlc_hit, keys, args.hit_calls),
            "loop": (noop, keys, args.hit_calls),
            "off": (off.get, keys, args.get_calls),
            "raw": (raw.get, keys, args.get_calls),
        }
        try:
            memory = on.settings.stage_settings("memory").model_dump()
        except Exception:  # the settings API changed: not worth failing the run for
            memory = "?"
        print(f"   part 1:     memory stage settings {memory}; stages {on.active_stages}")
        sys.stdout.flush()
        result = await run_batches(calls, args.rounds, "part 1")
        return result, verified
    finally:
        with contextlib.suppress(Exception):
            for key in keys:  # leave a shared cluster (REDIS_CLUSTER_NODES) as we found it
                await raw.delete(key)
                await mlc.delete(key)
        for c in (on, off, raw):
            with contextlib.suppress(Exception):
                await c.aclose()


async def part2(
    port: int, nodes: str | None, args: argparse.Namespace
) -> tuple[Batches, dict[str, Latencies], dict[str, Any], dict[str, str]]:
    url = f"redis://127.0.0.1:{port}/0"
    clients = [ours_client(None, url, memory=False)]
    closers: list[Callable[[], Awaitable[Any]]] = []
    contenders: dict[str, Contender] = {}
    try:
        await clients[0].connect()
        ours = await make_ours(clients[0], "ours", "rc:", standalone=True)
        assert ours is not None
        contenders["ours"] = ours
        # The early refresh reads PTTL alongside every GET; this shows what that costs.
        no_early = await make_ours(
            clients[0], "ours no-early", "rc0:", standalone=True, early_refresh=False
        )
        if no_early is not None:
            contenders["ours no-early"] = no_early
        if nodes:
            cluster_client = ours_client(nodes, None, memory=False)
            clients.append(cluster_client)
            await cluster_client.connect()
            cluster = await make_ours(cluster_client, "ours-cluster", "rcc:", standalone=False)
            assert cluster is not None
            contenders["ours-cluster"] = cluster
        cashews, more = await make_cashews(port)
        closers += more
        for c in cashews:
            contenders[c.name] = c
        for timeout, name, namespace in ((5, "aiocache", "aio"), (None, "aiocache t=None", "aio0")):
            c = await make_aiocache(port, timeout, name, namespace)
            closers += c.close
            contenders[name] = c
        setups = {name: c.setup for name, c in contenders.items()}

        acct = await accounting(contenders, port)
        progress("accounting pass done")

        keys = [f"hit:{i}" for i in range(args.keys)]
        for c in contenders.values():  # (a): the keys in every memory tier
            for key in keys:
                await c.get_or_set(key)
        loads_before = {n: c.loads.calls for n, c in contenders.items()}
        calls: dict[str, tuple[Callable[[str], Awaitable[Any]], list[str], int]] = {
            name: (c.get_or_set, keys, args.hit_calls) for name, c in contenders.items()
        }
        calls["loop"] = (noop, keys, args.hit_calls)
        a = await run_batches(calls, args.rounds, "part 2 (a)")
        for name, c in contenders.items():
            if c.loads.calls != loads_before[name]:
                print(f"WARNING: {name} called its loader during (a)", file=sys.stderr)
        lat: dict[str, Latencies] = {}
        for scenario in ("b", "c"):
            before = {n: c.loads.calls for n, c in contenders.items()}
            lat[scenario] = await interleaved(contenders, scenario, args.ops, args.blocks)
            for name, c in contenders.items():
                loads = c.loads.calls - before[name]
                expected = 0 if scenario == "b" else loads
                if scenario == "b" and loads != expected:
                    print(f"WARNING: {name} loaded {loads} times in (b)", file=sys.stderr)
            progress(f"part 2 ({scenario}) done")
        return a, lat, acct, setups
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                await close()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()


async def amain(args: argparse.Namespace, port: int, nodes: str | None, where: str) -> dict:
    report: dict[str, Any] = {}
    server = redis.Redis(host="127.0.0.1", port=port).info("server")["redis_version"]
    print(
        f"resilient_cache memory tier / get_or_set benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    print(f"   standalone: redis-server {server} on 127.0.0.1:{port} (throwaway)")
    print(f"   cluster:    {where}")
    v = package_version
    print(f"   versions:   Python {platform.python_version()}, redis-py {v('redis')}, hiredis "
          f"{v('hiredis')}, resilient-cache {v('resilient-cache')}, cashews {v('cashews')}, "
          f"aiocache {v('aiocache')}")  # fmt: skip
    print(f"   machine:    {os.cpu_count()} CPUs, {platform.platform()}; shared with the servers")
    state = library_state()
    print(f"   library:    {state}")
    sys.stdout.flush()
    report["environment"] = {
        "redis_server": server,
        "python": platform.python_version(),
        "versions": {p: v(p) for p in ("redis", "resilient-cache", "cashews", "aiocache")},
        "args": vars(args),
        "library": state,
    }
    if nodes:
        p1, verified = await part1(nodes, args)
        report["part1"] = {"us": p1.us, "verified": verified}
    a, lat, acct, setups = await part2(port, nodes, args)
    report["part2"] = {
        "a_us": a.us,
        "b": summary(lat["b"]),
        "c": summary(lat["c"]),
        "accounting": acct,
        "setups": setups,
    }
    if nodes:
        print_part1(p1, args, verified)
    print_part2(a, lat, acct, args)
    print()
    print("   contenders:")
    for name, text in setups.items():
        print(f"   {name:<18}{text}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = perf_counter()
    with standalone_redis() as port:
        if args.skip_cluster:
            report = asyncio.run(amain(args, port, None, "skipped"))
        else:
            with cluster_nodes() as (nodes, where):
                report = asyncio.run(amain(args, port, nodes, f"{where}: {nodes}"))
    return finish(started, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
