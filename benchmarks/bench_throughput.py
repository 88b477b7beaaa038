"""Throughput and latency at 1, 50 and 500 callers: raw redis-py, ours, ours auto-pipelined.

Run ``.venv/bin/python -m benchmarks.bench_throughput`` from the repository root (``make bench``
runs it after bench_pipeline); ``--help`` lists the options, ``--quick`` only checks the script
works. docs/performance.md ("Throughput at 1, 50 and 500 callers, auto-pipelining off and on")
has the figures and the commands that produced them.

Three clients on one Redis Cluster, in one process:

- ``raw``: ``redis.asyncio.cluster.RedisCluster`` configured as in ``_common.make_raw_cluster``
  (the library's socket timeouts and pool size, otherwise redis-py's defaults);
- ``ours-off``: ``create_redis_cluster(nodes, health_check_interval=0)``;
- ``ours-on``: the same with ``auto_pipeline=True``. When the library has no such option yet
  (a ConfigurationError for an unknown option), that client is skipped and the report says so.

Workloads: GET and SET over ``--keys`` keys, MGET of 10 keys sharing one hash tag (one slot,
so one command; ``--keys / 10`` such groups spread over the shards), and PIPE, a
``client.pipeline()`` of 20 SETs over the shards (one op is one pipeline), each at every
``--concurrency`` (coroutines awaiting the command in a loop). For every (command, callers) cell
the clients take turns in every round, the order rotating from round to round
(``_common.run_rounds``); ratios to raw are computed within a round, then the median over the
rounds is shown with its min and max. Every op is also timed on its own with
``time.perf_counter_ns`` in the same slices, giving p50 and p99 per client and cell (all rounds
pooled). At one caller, auto-pipelining must not make p99 worse: the last table compares
ours-on with ours-off there, op by op (``--p99-ops`` ops, each sent by one of the two at random
and timed alone, so both see the same moments of the machine: the verdict), and from the
slices (per round and pooled, shown beside it: slices a second apart see different moments).

``--loop`` picks the event loop (uvloop when installed), ``--parser`` redis-py's reply parser
(``auto``: hiredis when installed; ``python`` / ``hiredis`` make one redis-py's default for the
whole process, see :func:`force_parser`). The cluster is a throwaway DevCluster unless
``REDIS_CLUSTER_NODES`` names one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import inspect
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from resilient_cache import create_redis_cluster
from resilient_cache.errors import ConfigurationError
from resilient_cache.settings import Settings
from resilient_cache.speedups import (
    event_loop_name,
    hiredis_parser_class,
    parser_name,
    python_parser_class,
    run,
    uvloop_available,
)

from ._common import (
    Mode,
    Series,
    add_round_options,
    cluster_nodes,
    finish,
    fmt_ratio,
    library_state,
    make_raw_cluster,
    package_version,
    parse_with_quick,
    perf_counter,
    progress,
    redis_server_version,
    run_rounds,
)

CLIENTS = ("raw", "ours-off", "ours-on")
COMMANDS = ("GET", "SET", "MGET", "PIPE")
MGET_KEYS = 10  # keys per MGET, all under one hash tag
PIPE_SETS = 20  # SETs per client.pipeline() (PIPE), over the shards; one op = one pipeline
P99_TOLERANCE = 1.05  # ours-on's p99 at one caller counts as "not worse" up to this x ours-off
P99_WARMUP_OPS = 2_000  # ops of the op-by-op p99 check left out at its start

QUICK = {"seconds": 0.05, "rounds": 2, "warmup": 0.05, "p99_ops": 500}

ns = time.perf_counter_ns


# --------------------------------------------------------------------------- options


def _csv(kind: type, allowed: Sequence[str] = ()) -> Any:
    def parse(text: str) -> list[Any]:
        items = [kind(t.strip().upper() if kind is str else t) for t in text.split(",") if t]
        if not items or any(allowed and i not in allowed for i in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed}")
        if kind is int and min(items) < 1:
            raise argparse.ArgumentTypeError("every concurrency must be >= 1")
        return items

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput (ops/s) and p50/p99 latency of raw redis-py, resilient_cache "
        "and resilient_cache with auto-pipelining, at 1, 50 and 500 concurrent callers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_round_options(parser, seconds=0.4, rounds=9)
    parser.add_argument(
        "--concurrency", type=_csv(int), default=[1, 50, 500], help="callers, e.g. 1,50,500"
    )
    parser.add_argument(
        "--commands", type=_csv(str, COMMANDS), default=list(COMMANDS), help="e.g. GET,SET,MGET"
    )
    parser.add_argument("--keys", type=int, default=100, help="keys (MGET: keys/10 groups)")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="uvloop" if uvloop_available() else "asyncio",
        help="event loop (default: uvloop when installed)",
    )
    parser.add_argument(
        "--parser",
        choices=("auto", "python", "hiredis"),
        default="auto",
        help="redis-py's reply parser: auto = redis-py's choice (hiredis when installed)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="connections per node pool on every client; 0: the library's default (100), "
        "raised to the largest --concurrency (redis-py's cluster client raises "
        "MaxConnectionsError when a node's pool is exhausted instead of waiting)",
    )
    parser.add_argument(
        "--p99-ops",
        type=int,
        default=40_000,
        help="ops of the op-by-op p99 check at one caller (ours-off and ours-on in turn)",
    )
    args = parse_with_quick(parser, argv, QUICK)
    if min(args.seconds, args.rounds, args.keys, args.value_size) <= 0 or args.warmup < 0:
        parser.error("--seconds, --rounds, --keys and --value-size must be positive")
    if args.keys < MGET_KEYS and "MGET" in args.commands:
        parser.error(f"MGET needs --keys >= {MGET_KEYS}")
    if args.loop == "uvloop" and not uvloop_available():
        parser.error("--loop uvloop: uvloop is not installed (pip install 'resilient-cache[fast]')")
    if args.parser == "hiredis" and hiredis_parser_class() is None:
        parser.error("--parser hiredis: hiredis >= 3.2 is not installed")
    return args


def force_parser(choice: str) -> type[Any] | None:
    """Make ``choice`` redis-py's default reply parser in this process; return it (None for
    ``auto``: redis-py's own choice, hiredis when installed).

    redis-py 8.1's asyncio ``RedisCluster`` has no ``parser_class`` option (its connection
    options are a fixed list), so neither the raw client nor the library's ``redis_options``
    can pass one. What hiredis being installed or not changes is the default of
    ``AbstractConnection.__init__(parser_class=DefaultParser)``, bound when redis-py was
    imported; the benchmark changes that default instead, for every asyncio connection of the
    process (the memory tier's invalidation links name their parser explicitly, unaffected).
    ``live_parser`` then checks open connections."""
    if choice == "auto":
        return None
    from redis.asyncio.connection import AbstractConnection

    cls = python_parser_class() if choice == "python" else hiredis_parser_class()
    init = inspect.unwrap(AbstractConnection.__init__)
    defaults = init.__kwdefaults__ or {}
    if "parser_class" not in defaults:
        raise RuntimeError("this redis-py has no parser_class default to change; use auto")
    defaults["parser_class"] = cls
    return cls


def live_parser(cluster: Any) -> type[Any] | None:
    """The parser class of one open connection of a redis-py RedisCluster, to check the choice
    took effect (redis-py internals, read only: ClusterNode._connections, Connection._parser)."""
    for node in cluster.get_nodes():
        for connection in getattr(node, "_connections", ()):
            parser = getattr(connection, "_parser", None)
            if parser is not None:
                return type(parser)
    return None


# --------------------------------------------------------------------------- measurement


@dataclass
class Workload:
    """What one command's workers call: ``fn_name(*item)`` for each item, in a loop."""

    fn_name: str
    items: list[tuple[Any, ...]]


def workloads(keys: list[str], groups: list[list[str]], value: bytes) -> dict[str, Workload]:
    # PIPE: pipelines of PIPE_SETS keys taken in turn from the key set (spread over the shards).
    batches = [
        tuple(keys[(start + i) % len(keys)] for i in range(PIPE_SETS))
        for start in range(0, len(keys), PIPE_SETS)
    ]
    return {
        "GET": Workload("get", [(k,) for k in keys]),
        "SET": Workload("set", [(k, value) for k in keys]),
        "MGET": Workload("mget", [(g,) for g in groups]),
        "PIPE": Workload("pipeline", [(batch, value) for batch in batches]),
    }


async def pipelined_sets(client: Any, keys: tuple[str, ...], value: bytes) -> None:
    """One op of PIPE: ``client.pipeline()`` with a SET per key (redis-py's cluster pipeline
    for raw, one batch per node for ours)."""
    pipe = client.pipeline()
    for key in keys:
        pipe.set(key, value)
    await pipe.execute()


def call_for(client: Any, work: Workload) -> Any:
    """What to await with each of ``work``'s items on ``client``."""
    if work.fn_name == "pipeline":
        return functools.partial(pipelined_sets, client)
    return getattr(client, work.fn_name)


async def alternated_p99(
    clients: dict[str, Any], work: Workload, ops: int, seed: int = 2665
) -> dict[str, list[int]]:
    """ours-off and ours-on at one caller, op by op: each op goes to one of the two, picked at
    random, and is timed alone; the sorted latencies (ns) per client. Taking turns op by op,
    both see the same moments of the machine, which slices of a second apart do not: their
    p99 is then a comparison of the code, not of when each slice ran."""
    rng = random.Random(seed)
    names = ("ours-off", "ours-on")
    calls = {name: call_for(clients[name], work) for name in names}
    items = work.items
    latencies: dict[str, list[int]] = {name: [] for name in names}
    for i in range(P99_WARMUP_OPS + ops):
        name = names[rng.random() < 0.5]
        item = items[i % len(items)]
        t0 = ns()
        await calls[name](*item)
        if i >= P99_WARMUP_OPS:
            latencies[name].append(ns() - t0)
    return {name: sorted(found) for name, found in latencies.items()}


@dataclass
class Sampler:
    """``measure_fn`` for ``run_rounds``: ops/s of ``mode.concurrency`` coroutines, every op's
    latency kept in ns, one list per slice (the first slice of a client and cell is the
    warm-up)."""

    names: dict[int, str]  # id(client) -> name
    work: dict[str, Workload]
    slices: dict[tuple[str, str], list[list[int]]] = field(default_factory=dict)
    errors: dict[tuple[str, str], list[dict[str, int]]] = field(default_factory=dict)

    async def measure(
        self, client: Any, mode: Mode, keys: list[str], value: bytes, secs: float
    ) -> float:
        work = self.work[mode.command]
        call = call_for(client, work)
        items = work.items
        workers = mode.concurrency
        running = [True]
        per_worker: list[list[int]] = [[] for _ in range(workers)]
        errors: dict[str, int] = {}

        async def worker(index: int) -> None:
            # Each worker starts at a different item so the load spreads over the shards.
            shift = index % len(items)
            mine = items[shift:] + items[:shift]
            append = per_worker[index].append
            while running[0]:
                for item in mine:
                    t0 = ns()
                    try:
                        await call(*item)
                    except Exception as err:  # counted, not timed (redis-py's pool full, ...)
                        errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                        await asyncio.sleep(0)  # it may have raised without ever yielding
                        continue
                    append(ns() - t0)
                    if not running[0]:
                        break

        start = perf_counter()
        tasks = [asyncio.ensure_future(worker(i)) for i in range(workers)]
        await asyncio.sleep(secs)
        running[0] = False
        await asyncio.gather(*tasks)
        elapsed = perf_counter() - start
        samples = [x for w in per_worker for x in w]
        key = (mode.name, self.names[id(client)])
        self.slices.setdefault(key, []).append(samples)
        self.errors.setdefault(key, []).append(errors)
        return len(samples) / elapsed

    def rounds(self, mode: str, client: str) -> list[list[int]]:
        return self.slices[(mode, client)][1:]  # without the warm-up

    def error_counts(self, mode: str, client: str) -> dict[str, int]:
        total: dict[str, int] = {}
        for errors in self.errors[(mode, client)][1:]:
            for name, n in errors.items():
                total[name] = total.get(name, 0) + n
        return total

    def pooled(self, mode: str, client: str) -> list[int]:
        return sorted(x for s in self.rounds(mode, client) for x in s)


def ops_per_slice(sampler: Sampler, mode: str, client: str) -> int:
    """Ops per timed slice, on average (to say how many samples a per-round p99 rests on)."""
    rounds = sampler.rounds(mode, client)
    return sum(len(r) for r in rounds) // max(1, len(rounds))


def pct_us(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e3


# --------------------------------------------------------------------------- report


def print_cells(
    results: dict[str, Series], sampler: Sampler, modes: list[Mode], names: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    head = (
        f"   {'command':<8}{'callers':>8}  {'client':<10}{'ops/s':>10}  {'vs raw, per round':<23}"
        f"{'p50 us':>9}{'p99 us':>10}  errors"
    )
    print(head)
    print("   " + "-" * (len(head) - 3))
    for mode in modes:
        series = results[mode.name]
        cell: dict[str, Any] = {}
        for i, name in enumerate(names):
            lat = sampler.pooled(mode.name, name)
            ratio = fmt_ratio(series.ratios(name, "raw")) if name != "raw" else "1"
            p50, p99 = pct_us(lat, 0.50), pct_us(lat, 0.99)
            label = (mode.command, str(mode.concurrency)) if i == 0 else ("", "")
            errors = sampler.error_counts(mode.name, name)
            shown = ", ".join(f"{n} {e}" for e, n in errors.items()) or "0"
            print(
                f"   {label[0]:<8}{label[1]:>8}  {name:<10}{series.median(name):>10,.0f}  "
                f"{ratio:<23}{p50:>9.1f}{p99:>10.1f}  {shown}"
            )
            cell[name] = {
                "ops_per_s_rounds": series.ops[name],
                "ops_per_s_median": series.median(name),
                "ratio_vs_raw_rounds": series.ratios(name, "raw"),
                "p50_us": p50,
                "p99_us": p99,
                "samples": len(lat),
                "errors": errors,
            }
        out[mode.name] = cell
    return out


def print_p99_at_one(
    sampler: Sampler,
    modes: list[Mode],
    names: list[str],
    alternated: dict[str, dict[str, list[int]]],
) -> dict[str, Any]:
    """Auto-pipelining at one caller: ours-on's p99 against ours-off's. The verdict rests on
    ``alternated`` (:func:`alternated_p99`, per command); the slices' p99 is shown beside it."""
    print()
    singles = [m for m in modes if m.concurrency == 1]
    if "ours-on" not in names or not singles:
        print("   p99 at 1 caller, auto-pipelining on vs off: not measured (no ours-on client")
        print("   or no concurrency 1 in this run)")
        return {}
    ops = sum(len(found) for found in next(iter(alternated.values())).values())
    print(
        "   p99 at 1 caller, auto-pipelining on vs off: it must not be worse (verdict: op by op "
        f"on/off <= {P99_TOLERANCE:.2f})"
    )
    print(f"   op by op = {ops:,} ops after {P99_WARMUP_OPS:,} of warm-up, each sent by ours-off "
          "or ours-on at random and timed alone;")  # fmt: skip
    per_slice = ops_per_slice(sampler, singles[0].name, "ours-off")
    print("   slices = the throughput slices above: p99 over every round's ops, and per round")
    print(f"   (about {per_slice:,} ops a round: its p99 rests on {per_slice // 100:,} of them)")
    head = (
        f"   {'command':<8}{'off p99':>9}{'on p99':>9}{'on/off':>8}  {'p50 on/off':>10}  "
        f"{'slices: on/off pooled, per round':<38}verdict"
    )
    print(head)
    print("   " + "-" * (len(head) - 3))
    out: dict[str, Any] = {}
    for mode in singles:
        turns = alternated[mode.command]
        off99, on99 = pct_us(turns["ours-off"], 0.99), pct_us(turns["ours-on"], 0.99)
        p50 = pct_us(turns["ours-on"], 0.5) / pct_us(turns["ours-off"], 0.5)
        slices = {n: pct_us(sampler.pooled(mode.name, n), 0.99) for n in names}
        per_round = [
            pct_us(sorted(on), 0.99) / pct_us(sorted(off), 0.99)
            for on, off in zip(
                sampler.rounds(mode.name, "ours-on"),
                sampler.rounds(mode.name, "ours-off"),
                strict=True,
            )
        ]
        pooled = slices["ours-on"] / slices["ours-off"]
        ratio = on99 / off99
        ok = ratio <= P99_TOLERANCE
        print(
            f"   {mode.command:<8}{off99:>9.1f}{on99:>9.1f}{ratio:>8.3f}  {p50:>10.3f}  "
            f"{f'{pooled:.3f}, {fmt_ratio(per_round)}':<38}{'not worse' if ok else 'WORSE'}"
        )
        out[mode.command] = {
            "op_by_op": {"p99_us": {"ours-off": off99, "ours-on": on99}, "on_off": ratio,
                         "p50_on_off": p50},
            "slices": {"p99_us": slices, "on_off_pooled": pooled, "on_off_rounds": per_round},
        }  # fmt: skip
    return out


# --------------------------------------------------------------------------- run


async def amain(args: argparse.Namespace, nodes: str, where: str) -> dict[str, Any]:
    keys = [f"bench-tp:{i}" for i in range(args.keys)]
    groups = [
        [f"bench-tp:{{g{g}}}:{k}" for k in range(MGET_KEYS)] for g in range(args.keys // MGET_KEYS)
    ]
    value = b"v" * args.value_size
    forced = force_parser(args.parser)
    default_pool = Settings.model_fields["max_connections"].default
    pool = args.max_connections or max(default_pool, *args.concurrency)
    options: dict[str, Any] = {"health_check_interval": 0}
    if pool != default_pool:
        options["max_connections"] = pool
    off = create_redis_cluster(nodes, **options)
    clients: dict[str, Any] = {"raw": make_raw_cluster(nodes, off.settings)}
    clients["ours-off"] = off
    skipped = ""
    try:
        clients["ours-on"] = create_redis_cluster(nodes, auto_pipeline=True, **options)
    except ConfigurationError as err:
        if "auto_pipeline" not in str(err):
            raise
        skipped = f"ours-on SKIPPED: this resilient_cache has no auto_pipeline option yet ({err})"
        skipped = skipped[:160] + ("...)" if len(skipped) > 160 else "")
    names = list(clients)
    report: dict[str, Any] = {}
    try:
        await clients["raw"].initialize()
        for name in names[1:]:
            await clients[name].connect()
        for key in keys + [k for g in groups for k in g]:
            await clients["raw"].set(key, value)
        server = redis_server_version(nodes)
        loop = event_loop_name()
        live = {n: live_parser(c if n == "raw" else c.get_cluster()) for n, c in clients.items()}
        parsers = {parser_name(cls or forced) for cls in live.values()}
        parser = " / ".join(sorted(parsers))  # one name: every client parses the same way
        print(f"resilient_cache throughput benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}")
        print(f"   cluster:   {where}: {nodes}")
        print(f"   versions:  redis-server {server}, Python {platform.python_version()}, "
              f"redis-py {package_version('redis')}, hiredis {package_version('hiredis')}, "
              f"uvloop {package_version('uvloop')}")  # fmt: skip
        print(f"   library:   resilient-cache {package_version('resilient-cache')}, "
              f"{library_state()}")  # fmt: skip
        print(f"   machine:   {os.cpu_count()} CPUs, {platform.platform()}; the client and the "
              "servers share them")  # fmt: skip
        print(f"   parser:    {parser} (--parser {args.parser}; read on the clients' open "
              "connections)")  # fmt: skip
        print(f"   loop:      {loop} (--loop {args.loop}); gc {'on' if gc.isenabled() else 'OFF'}")
        print(f"   workload:  GET/SET over {len(keys)} keys, MGET of {MGET_KEYS} keys under one "
              f"hash tag ({len(groups)} such groups), PIPE = client.pipeline() of {PIPE_SETS} "
              f"SETs over the shards (1 op), {args.value_size}-byte values")  # fmt: skip
        print("   clients:   raw = redis.asyncio.cluster.RedisCluster (the library's timeouts and "
              "pool size);")  # fmt: skip
        print("              ours-off = create_redis_cluster(nodes, health_check_interval=0);")
        print("              ours-on = the same with auto_pipeline=True")
        print(f"   pools:     max_connections {pool} per node on every client"
              + (f" (the library's default {default_pool} raised to the largest concurrency)"
                 if pool > default_pool and not args.max_connections else ""))  # fmt: skip
        if skipped:
            print(f"   NOTE:      {skipped}")
        sys.stdout.flush()
        report["environment"] = {
            "cluster": where,
            "redis_server": server,
            "python": platform.python_version(),
            "redis_py": package_version("redis"),
            "hiredis": package_version("hiredis"),
            "uvloop": package_version("uvloop"),
            "library": library_state(),
            "cpus": os.cpu_count(),
            "parser": parser,
            "live_parsers": {n: getattr(c, "__name__", None) for n, c in live.items()},
            "loop": loop,
            "max_connections": pool,
            "skipped": skipped or None,
            "args": vars(args),
        }
        modes = [
            Mode(f"{command} x{n}", command, n)
            for command in args.commands
            for n in args.concurrency
        ]
        sampler = Sampler({id(c): n for n, c in clients.items()}, workloads(keys, groups, value))
        results = await run_rounds(
            clients, modes, args, keys, value, "throughput", measure_fn=sampler.measure
        )
        print()
        print(
            f"Throughput, ops/s: median of {args.rounds} rounds of {args.seconds:g}s per client "
            "and cell, clients alternating (rotated order)"
        )
        print("   vs raw: client/raw per round, median [min..max]; p50/p99: every op timed, rounds "
              "pooled")  # fmt: skip
        report["cells"] = print_cells(results, sampler, modes, names)
        alternated: dict[str, dict[str, list[int]]] = {}
        if "ours-on" in clients and 1 in args.concurrency:
            progress("p99 at one caller, op by op, ours-off and ours-on in turn")
            work = workloads(keys, groups, value)
            for command in args.commands:
                alternated[command] = await alternated_p99(clients, work[command], args.p99_ops)
        report["p99_at_one_caller"] = print_p99_at_one(sampler, modes, names, alternated)
        if skipped:
            print(f"\n   {skipped}")
    finally:
        with contextlib.suppress(Exception):
            for key in keys + [k for g in groups for k in g]:  # leave a shared cluster clean
                await clients["raw"].delete(key)
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = perf_counter()
    with cluster_nodes() as (nodes, where):
        progress(f"cluster ready; running on {args.loop}")
        report = run(amain(args, nodes, where), use_uvloop=args.loop == "uvloop")
    return finish(started, report, args.json)


if __name__ == "__main__":
    sys.exit(main())
