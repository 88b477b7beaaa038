"""The failover demo behind ``make demo`` / ``resilient-cache demo``.

A chat bot's cache workload runs through the pipeline for ``duration`` seconds: user profiles
read through a :class:`~resilient_cache.MultiLayerCache` (loaded from a pretend database on a
miss), per-guild message counters (INCR, not idempotent) and presence keys with a TTL (SET EX).
Halfway through, one primary of a throwaway local cluster is killed with SIGKILL; a live line
shows the client riding through the failover. Then the cluster stats and the metrics snapshot
are printed and the cluster is torn down.

With ``REDIS_CLUSTER_NODES`` set, the demo runs against that cluster and kills nothing. It runs
on uvloop when that is installed (``pip install 'resilient-cache[fast]'``) and prints which
event loop and which reply parser (hiredis or redis-py's Python one) it ran with.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from resilient_cache.cache import MultiLayerCache
from resilient_cache.client import RedisClusterClient, create_redis_cluster
from resilient_cache.errors import CommandInDoubtError
from resilient_cache.health import format_stats
from resilient_cache.speedups import event_loop_name, parser_name, run

USERS = 5_000
GUILDS = 50


@dataclass
class Tally:
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    in_doubt: int = 0
    acknowledged_incr: Counter[str] = field(default_factory=Counter)
    last_error_at: float = 0.0


async def _load_profile(user_id: int) -> dict[str, Any]:
    await asyncio.sleep(0.002)  # the pretend database
    return {"id": user_id, "name": f"user-{user_id}", "locale": random.choice(["en", "fr", "ja"])}


async def _worker(
    client: RedisClusterClient, cache: MultiLayerCache, tally: Tally, stop: asyncio.Event
) -> None:
    rng = random.Random()
    while not stop.is_set():
        roll = rng.random()
        try:
            if roll < 0.5:
                user = rng.randrange(USERS)
                await cache.get_or_set(f"user:{user}", functools.partial(_load_profile, user))
            elif roll < 0.8:
                guild = f"guild:{{{rng.randrange(GUILDS)}}}:messages"
                await client.incr(guild)
                tally.acknowledged_incr[guild] += 1
            else:
                await client.set(f"presence:{rng.randrange(USERS)}", "online", ex=60)
            tally.ok += 1
        except CommandInDoubtError:
            tally.in_doubt += 1
            tally.last_error_at = time.monotonic()
        except Exception as err:
            tally.errors[type(err).__name__] += 1
            tally.last_error_at = time.monotonic()
        await asyncio.sleep(0)


def _progress(line: str, final: bool = False) -> None:
    if sys.stdout.isatty():
        print("\r" + line.ljust(110), end="\n" if final else "", flush=True)
    else:
        print(line, flush=True)


def main(duration: float = 20.0, concurrency: int = 20, kill: bool = True) -> int:
    """Run the demo on uvloop when it is installed (the ``fast`` extra), else on asyncio's
    loop; returns the process exit status."""
    return run(run_demo(duration=duration, concurrency=concurrency, kill=kill))


async def run_demo(duration: float = 20.0, concurrency: int = 20, kill: bool = True) -> int:
    """Run the demo; returns the process exit status."""
    external = os.environ.get("REDIS_CLUSTER_NODES")
    dev = None
    if external:
        print(f"Using the cluster at REDIS_CLUSTER_NODES={external}; no node will be killed.")
        kill = False
    else:
        from resilient_cache.devcluster import DevCluster

        print("Starting a throwaway 6-node Redis Cluster on 127.0.0.1 ...", flush=True)
        started = time.monotonic()
        dev = DevCluster().start()
        print(f"  ready in {time.monotonic() - started:.1f}s: {dev.startup_nodes}")
    try:
        client = create_redis_cluster(
            None if external else dev.startup_nodes,  # type: ignore[union-attr]
            max_retries=6,  # about 5 s of backoff: longer than a failover takes here
            retry_delay=0.2,
            health_check_interval=1.0,
            health_check_timeout=0.5,
            circuit_breaker_threshold=5,
            circuit_breaker_timeout=2.0,
            socket_timeout=1.0,
            socket_connect_timeout=0.5,
        )
        async with client:
            return await _run(client, dev, duration, concurrency, kill)
    finally:
        if dev is not None:
            dev.stop()
            print("Local cluster stopped and removed.")


async def _run(
    client: RedisClusterClient, dev: Any, duration: float, concurrency: int, kill: bool
) -> int:
    cache = MultiLayerCache(
        "profiles",
        client,
        memory={"max_size": 1000, "default_ttl": 5, "cleanup_interval": 10},
        redis={"default_ttl": 300, "key_prefix": "demo:"},
    )
    print(f"Stages (outermost first): {', '.join(client.active_stages)}")
    parser = parser_name(client.settings.redis_options.get("parser_class"))
    loop = event_loop_name()
    print(f"Reply parser: {parser}; event loop: {loop}")
    if "hiredis" not in parser or not loop.startswith("uvloop"):
        print("  (pip install 'resilient-cache[fast]' adds hiredis and uvloop)")
    print(
        f"Running {concurrency} workers for {duration:.0f}s"
        + (f"; a primary is killed at {duration / 2:.0f}s" if kill else "")
        + "\n"
    )
    tally, stop = Tally(), asyncio.Event()
    workers = [asyncio.create_task(_worker(client, cache, tally, stop)) for _ in range(concurrency)]
    start = time.monotonic()
    killed_at: float | None = None
    victim = None
    last_ok, last_t = 0, start
    try:
        while (now := time.monotonic()) - start < duration:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            if kill and killed_at is None and now - start >= duration / 2:
                victim = dev.primary_for_key("guild:{0}:messages")
                dev.kill(victim, signal.SIGKILL)
                killed_at = now
                _progress(
                    f"[{now - start:5.1f}s] killed primary {victim.address} (SIGKILL)", final=True
                )
            rate = (tally.ok - last_ok) / max(now - last_t, 1e-6)
            last_ok, last_t = tally.ok, now
            metrics = client.get_metrics()
            health = client._monitor.last.health if client._monitor.last else "?"
            open_breakers = ",".join(client.breakers.open_scopes()) or "none"
            _progress(
                f"[{now - start:5.1f}s] ok {tally.ok:>7,} ({rate:>6,.0f}/s)  "
                f"errors {sum(tally.errors.values()):>3}  in-doubt {tally.in_doubt:>2}  "
                f"p95 {metrics.latency.p95:6.2f}ms  health {health:<9}  open breakers: "
                f"{open_breakers}"
            )
    finally:
        stop.set()
        for task in workers:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*workers, return_exceptions=True)
    _progress(f"[{time.monotonic() - start:5.1f}s] done", final=True)

    print("\n== Outcome ==")
    print(f"commands acknowledged: {tally.ok:,}")
    print(
        f"in-doubt (INCR in flight when the node died; may or may not have run): {tally.in_doubt}"
    )
    print(f"other errors surfaced to callers: {dict(tally.errors) or 'none'}")
    if killed_at is not None and victim is not None:
        if tally.last_error_at > killed_at:
            print(
                f"last error {tally.last_error_at - killed_at:.2f}s after the kill; "
                "every command after that succeeded"
            )
        else:
            print("no command failed after the kill")
    print(
        f"memory tier: {cache.stats.memory_hits:,} hits, {cache.stats.redis_hits:,} Redis "
        f"hits, {cache.stats.loads:,} loads"
    )
    stats = await client.get_stats()
    print("\n== get_stats() ==")
    print(format_stats(stats))
    metrics = client.get_metrics()
    print("\n== get_metrics() ==")
    c, lat = metrics.commands, metrics.latency
    print(
        f"commands: total {c.total:,}  successful {c.successful:,}  failed {c.failed:,}  "
        f"retried {c.retried:,}"
    )
    print(f"latency ms: p50 {lat.p50:.2f}  p95 {lat.p95:.2f}  p99 {lat.p99:.2f}  avg {lat.avg:.2f}")
    return 0
