"""Quick start: the original guide's basic usage, against the cluster in REDIS_CLUSTER_NODES.

eval "$(python -m resilient_cache cluster up | grep ^export)"   # or your own cluster
python examples/quickstart.py
python -m resilient_cache cluster down
"""

from __future__ import annotations

import asyncio
import os
import sys

from resilient_cache import create_redis_cluster, parse_cluster_nodes


async def main() -> int:
    if "REDIS_CLUSTER_NODES" not in os.environ:
        print("set REDIS_CLUSTER_NODES=host:port,... (e.g. from `resilient-cache cluster up`)")
        return 2
    nodes = parse_cluster_nodes(os.environ["REDIS_CLUSTER_NODES"])
    cluster = create_redis_cluster(
        nodes,
        max_retries=3,
        retry_delay=1.0,
        health_check_interval=30.0,
        circuit_breaker_threshold=5,
    )
    async with cluster:
        await cluster.execute_command("SET", "mykey", "myvalue", "EX", 3600)
        value = await cluster.execute_command("GET", "mykey")
        print(f"GET mykey -> {value!r}")

        stats = await cluster.get_stats()
        print(f"Connected nodes: {stats.connected_nodes}/{stats.total_nodes}")
        print(f"Health: {stats.health}")

        metrics = cluster.get_metrics()
        print(f"P95 latency: {metrics.latency.p95:.2f}ms")
        rate = metrics.commands.successful / metrics.commands.total * 100
        print(f"Success rate: {rate:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
