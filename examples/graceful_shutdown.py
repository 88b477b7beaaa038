"""A worker service that stops cleanly on SIGTERM (what Kubernetes sends a pod) or Ctrl-C.

eval "$(python -m resilient_cache cluster up | grep ^export)"   # or your own cluster
python examples/graceful_shutdown.py --workers 4
# ... then Ctrl-C, or `kill -TERM <pid>`

Every setting comes from the environment, as in a container: REDIS_CLUSTER_NODES,
REDIS_PASSWORD, REDIS_DRAIN_TIMEOUT, ... (docs/configuration.md). With OTEL_EXPORTER_OTLP_ENDPOINT
(or OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER) set, traces and metrics go out through
OpenTelemetry, which needs `pip install 'resilient-cache[otlp]'`.

Each worker loops over a job: INCR its counter, work a little (a sleep stands in), SET the
result and GET it back, on its own keys example:shutdown:{w<N>}:count and :last (they expire an
hour after a run). On a signal:

1. the workers take no new job: each finishes the one it is in (its work and its writes) and
   returns;
2. `client.disconnect()` refuses new commands, lets the ones still in flight finish (up to
   REDIS_DRAIN_TIMEOUT seconds), then closes the connections;
3. one summary line is printed and the process exits 0 (1 if a worker was still busy after
   REDIS_DRAIN_TIMEOUT seconds and had to be cut off).

Every INCR the summary counts as acknowledged is in Redis: `:count` of worker N equals the
"increments" it reports (an INCR that failed in doubt may have run too, and is counted as an
error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass

from redis.exceptions import RedisError

from resilient_cache import ConfigurationError, RedisClusterClient, create_redis_cluster

KEY_TTL = 3600  # seconds: a demo run leaves nothing behind for long


@dataclass
class Tally:
    increments: int = 0  # INCRs acknowledged: what the :count key must hold
    commands: int = 0  # every command acknowledged
    errors: int = 0


def keys(worker: int) -> tuple[str, str]:
    # One hash tag per worker puts both of its keys in one slot (so on one node).
    return f"example:shutdown:{{w{worker}}}:count", f"example:shutdown:{{w{worker}}}:last"


async def worker(
    n: int, client: RedisClusterClient, stop: asyncio.Event, work: float, tally: Tally
) -> None:
    count_key, last_key = keys(n)
    while not stop.is_set():  # checked between jobs only: a job is never cut in half
        try:
            value = await client.incr(count_key)
            tally.increments += 1
            tally.commands += 1
            if value == 1:
                await client.expire(count_key, KEY_TTL)
                tally.commands += 1
            await asyncio.sleep(work)  # the job's own work, between its commands
            await client.set(last_key, value, ex=KEY_TTL)
            tally.commands += 1
            read = await client.get(last_key)
            tally.commands += 1
            if read is None or int(read) != value:
                raise RuntimeError(f"{last_key}: read {read!r} after writing {value}")
        except Exception as err:  # a service logs, backs off, and goes on
            tally.errors += 1
            print(f"worker {n}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            # An open breaker refuses at once: do not spin on it. A signal cuts this short.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


async def main(workers: int, work: float) -> int:
    telemetry = None
    if any(
        name in os.environ
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER")
    ):
        from resilient_cache import configure_telemetry

        # Before the client is built: it decides then whether anyone listens.
        telemetry = configure_telemetry(default_service_name="graceful-shutdown-example")
    try:
        return await run(workers, work)
    finally:
        if telemetry is not None:
            # Last: flush the final spans and metrics. With the collector unreachable this
            # blocks until the exporters give up (about 10 s per signal by default).
            telemetry.shutdown()


async def run(workers: int, work: float) -> int:
    client = create_redis_cluster()  # REDIS_* variables, .env, resilient_cache.toml

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # replaces KeyboardInterrupt for Ctrl-C

    tallies = [Tally() for _ in range(workers)]
    tasks: list[asyncio.Task[None]] = []
    stuck: set[asyncio.Task[None]] = set()
    try:
        try:
            await client.connect()
            # A fresh count for this run (one DEL per slot: each worker's keys share one).
            await client.delete(*(key for n in range(workers) for key in keys(n)))
        except (OSError, RedisError) as err:  # no cluster to talk to: one line, exit 1
            print(f"cannot start: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        print("ready", flush=True)  # flushed: stdout is a pipe under a supervisor or a test
        tasks = [
            asyncio.create_task(worker(n, client, stop, work, tallies[n])) for n in range(workers)
        ]
        await stop.wait()

        # 1. Let the workers finish their job. Give them as long as the client gives
        #    in-flight commands: a job is its work and a few commands, each bounded by the
        #    command deadline (REDIS_TIMEOUT__DEADLINE), so this normally takes milliseconds.
        drain = client.settings.drain_timeout
        _, stuck = await asyncio.wait(tasks, timeout=drain)
        if stuck:
            print(f"{len(stuck)} worker(s) still busy after {drain}s", file=sys.stderr)
    finally:
        # 2. Refuse new commands, wait up to drain_timeout for those in flight, close.
        #    A worker still busy gets NotConnectedError on its next command and stops.
        await client.disconnect()
    await asyncio.gather(*tasks)  # workers catch their own errors: this does not raise

    # 3. The summary.
    for n, tally in enumerate(tallies):
        print(f"worker {n}: {tally.increments} increments acknowledged ({keys(n)[0]})")
    print(
        f"shutdown: {workers} workers stopped, {sum(t.commands for t in tallies)} commands "
        f"acknowledged, {sum(t.errors for t in tallies)} errors",
        flush=True,
    )
    return 1 if stuck else 0  # 1: a worker had to be cut off mid-job


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="worker coroutines (default 4)")
    parser.add_argument(
        "--work", type=float, default=0.01, help="seconds of work per job (default 0.01)"
    )
    args = parser.parse_args()
    if args.workers < 1 or args.work < 0:
        parser.error("--workers must be at least 1 and --work at least 0")
    try:
        sys.exit(asyncio.run(main(args.workers, args.work)))
    except ConfigurationError as err:  # a missing or invalid REDIS_* variable: one line
        print(f"configuration error: {err}", file=sys.stderr)
        sys.exit(2)
