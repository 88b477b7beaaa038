"""Many-slot helpers against raw redis-py: mset/mget_nonatomic, exists and delete over 1,000 and
20,000 keys, ours (one batch per node through the stages) and redis-py's (one pipeline), in
alternating rounds of the same run.

    .venv/bin/python -m benchmarks.bench_many_keys [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from time import perf_counter
from typing import Any

from resilient_cache import create_redis_cluster

from ._common import cluster_nodes, make_raw_cluster, parse_with_quick, progress

OPERATIONS = ("mset_nonatomic", "mget_nonatomic", "exists", "delete")


async def one_round(client: Any, keys: list[str], mapping: dict[str, str]) -> dict[str, float]:
    times: dict[str, float] = {}
    for operation in OPERATIONS:
        started = perf_counter()
        if operation == "mset_nonatomic":
            await client.mset_nonatomic(mapping)
        elif operation == "mget_nonatomic":
            await client.mget_nonatomic(keys)
        else:
            await getattr(client, operation)(*keys)
        times[operation] = perf_counter() - started
    return times


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per key count")
    args = parse_with_quick(parser, None, {"rounds": 3})
    with cluster_nodes() as (nodes, where):
        print(f"cluster: {where}")
        ours = create_redis_cluster(nodes, autoload=False, health_check_interval=0)
        async with ours:
            raw = make_raw_cluster(nodes, ours.settings)
            await raw.initialize()
            try:
                for count in (1_000, 20_000):
                    keys = [f"many:{n}" for n in range(count)]
                    mapping = {key: "v" for key in keys}
                    spent: dict[str, dict[str, list[float]]] = {"ours": {}, "raw": {}}
                    for round_ in range(args.rounds):
                        order = [("ours", ours), ("raw", raw)]
                        if round_ % 2:
                            order.reverse()
                        for name, client in order:
                            for op, secs in (await one_round(client, keys, mapping)).items():
                                spent[name].setdefault(op, []).append(secs)
                    progress(f"{count} keys done")
                    print(f"\n{count:,} keys, median of {args.rounds} rounds (ms), ours/raw time:")
                    for op in OPERATIONS:
                        o = statistics.median(spent["ours"][op]) * 1000
                        r = statistics.median(spent["raw"][op]) * 1000
                        print(f"   {op:<16} ours {o:8.1f}   raw {r:8.1f}   ours/raw {o / r:5.2f}")
            finally:
                await raw.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
