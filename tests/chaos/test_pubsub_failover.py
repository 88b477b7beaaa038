"""A subscription's node is killed with SIGKILL while numbered messages are published.

The subscriber has a client of its own that sends no command, so nothing but its pub/sub
notices the failover (redis-py 8.1 by itself then never resubscribes, see docs/failover.md).
The checks: it receives again within a bound, never a message twice or out of order, and only
messages published while it had no subscription are lost (counted and printed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from resilient_cache import CommandInDoubtError, RedisClusterClient, create_redis_cluster
from resilient_cache.devcluster import DevCluster
from tests.conftest import async_wait_until

#: Pause between two publishes (seconds): about 200 messages a second.
PUBLISH_EVERY = 0.005


class Recoveries(logging.Handler):
    """When the subscriber's pub/sub said it was back (its INFO line), on the monotonic clock."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.back: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "subscriptions back" in record.getMessage():
            self.back.append(time.monotonic())


@pytest.fixture
def recoveries() -> Iterator[Recoveries]:
    logger = logging.getLogger("resilient_cache.pubsub")
    handler, level = Recoveries(), logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _client(cluster: DevCluster) -> RedisClusterClient:
    return create_redis_cluster(
        cluster.startup_nodes,
        max_retries=3,  # the original guide's options, as in test_primary_kill.py
        retry_delay=1.0,
        health_check_interval=0,  # no health probe re-reads the slot map behind pub/sub's back
        socket_timeout=1.0,
        socket_connect_timeout=0.5,
        autoload=False,
    )


@dataclass
class Stream:
    """Numbered messages: when each was sent, when Redis acknowledged it, when it arrived."""

    sent: dict[int, float] = field(default_factory=dict)
    acked: dict[int, float] = field(default_factory=dict)
    in_doubt: set[int] = field(default_factory=set)
    refused: int = 0
    received: list[tuple[int, float]] = field(default_factory=list)

    def numbers(self) -> list[int]:
        return [number for number, _ in self.received]

    def published_after(self, moment: float) -> list[tuple[int, float]]:
        """(number, arrival) of the received messages Redis acknowledged after ``moment``.
        By acknowledgement, not arrival: messages sent before a kill can still be read from
        the socket after it, and say nothing about a new subscription."""
        return [(n, at) for n, at in self.received if self.acked.get(n, 0.0) > moment]


async def _publish(stream: Stream, publish: Callable[[int], Awaitable[Any]], stop: asyncio.Event):
    number = 0
    while not stop.is_set():
        try:
            stream.sent[number] = time.monotonic()
            await publish(number)
            stream.acked[number] = time.monotonic()
        except CommandInDoubtError:
            stream.in_doubt.add(number)  # may have been delivered, or not
        except redis.RedisError:
            stream.refused += 1  # never sent
        number += 1
        await asyncio.sleep(PUBLISH_EVERY)  # the pace of publishing, not a wait for a condition


async def _subscribe(stream: Stream, messages: Callable[[], Awaitable[Any]]) -> None:
    while True:
        message = await messages()
        if message is not None and message["type"] in ("message", "smessage"):
            stream.received.append((int(message["data"]), time.monotonic()))


async def _kill_and_watch(
    cluster: DevCluster, victim: Any, stream: Stream, what: str
) -> tuple[float, float, float]:
    """Kill ``victim`` once messages flow; return (killed, failover seen, first message after)."""

    async def flowing() -> bool:
        return len(stream.received) >= 50

    await async_wait_until(flowing, 10, f"{what}: messages to arrive before the kill")
    killed_at = time.monotonic()
    cluster.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(cluster.wait_failover, victim, 30)
    failover_seen = time.monotonic()

    async def resumed() -> bool:
        return bool(stream.published_after(killed_at))

    # The bound the issue asks for: receiving again within 5 s of the failover being seen.
    await async_wait_until(resumed, failover_seen + 5.0 - time.monotonic(), f"{what} to resume")
    first = stream.published_after(killed_at)[0][1]
    resumed_count = len(stream.published_after(killed_at))

    async def steady() -> bool:  # and keeps receiving
        return len(stream.published_after(killed_at)) >= resumed_count + 100

    await async_wait_until(steady, 10, f"{what}: messages to keep arriving after the failover")
    return killed_at, failover_seen, first


async def _drain(stream: Stream, what: str) -> None:
    """After the publisher stopped: wait until the last acknowledged message has arrived."""
    last = max(stream.acked)

    async def arrived() -> bool:
        return any(number >= last for number in stream.numbers())

    await async_wait_until(arrived, 5, f"{what}: the last acknowledged message to arrive")


def _check_and_report(
    stream: Stream,
    what: str,
    killed_at: float,
    failover_seen: float,
    first: float,
    recoveries: Recoveries,
) -> None:
    numbers = stream.numbers()
    # Never twice, never out of order: each number greater than the one before.
    assert all(b > a for a, b in itertools.pairwise(numbers)), what
    assert set(numbers) <= set(stream.acked) | stream.in_doubt, "a message nobody published"
    lost = sorted(set(stream.acked) - set(numbers))
    assert len(recoveries.back) == 1, recoveries.back  # lost once, back once
    back = recoveries.back[0]  # when the recovery had its subscription answered again
    # Lost only while no subscription was in place: nothing acknowledged well before the kill
    # (50 ms: a SIGKILL can land between Redis's reply to the publisher and its write to the
    # subscriber), nothing sent after the subscription was back. (Not "nothing after the first
    # message published after the kill that arrived": the dying node can still deliver one in
    # the moments after the SIGKILL is sent, before the subscription moved, and the next one is
    # then lost for good. Seen once: message 54 lost, 53 received. And not "nothing
    # acknowledged after it was back": a message published before the new subscription existed
    # can be acknowledged after, its reply slowed by a busy machine. Seen once too: message 54
    # acknowledged after a move that took under 10 ms.)
    early = [n for n in lost if stream.acked[n] < killed_at - 0.05]
    late = [n for n in lost if stream.sent[n] > back]
    assert early == [], f"{what}: lost messages acknowledged before the kill: {early[:10]}"
    assert late == [], f"{what}: lost messages after it had resumed: {late[:10]}"
    print(
        f"\n{what}: failover seen {failover_seen - killed_at:.2f}s after the kill, subscription "
        f"back {back - killed_at:.2f}s after it ({back - failover_seen:+.2f}s from the failover), "
        f"first message published after the kill received {first - killed_at:.2f}s after it; "
        f"lost {len(lost)} of {len(stream.acked)} acknowledged "
        f"({len(stream.in_doubt)} in doubt, {stream.refused} refused), "
        f"received {len(numbers)}, duplicates 0, out of order 0"
    )


async def test_a_sharded_subscription_follows_its_shard_to_the_promoted_replica(
    ready_cluster: DevCluster, recoveries: Recoveries
) -> None:
    cluster = ready_cluster
    channel = f"chaos:pubsub:sharded:{uuid.uuid4().hex[:8]}"
    victim = cluster.primary_for_key(channel)
    stream, stop = Stream(), asyncio.Event()
    subscriber, publisher = _client(cluster), _client(cluster)
    async with subscriber, publisher:
        pubsub = subscriber.pubsub()
        await pubsub.ssubscribe(channel)
        node = next(iter(pubsub.node_pubsub_mapping))
        assert node == f"{victim.host}:{victim.port}", "the subscription is not on the victim"
        tasks = [
            asyncio.create_task(
                _subscribe(stream, lambda: pubsub.get_sharded_message(True, timeout=0.2))
            ),
            asyncio.create_task(
                _publish(stream, lambda n: publisher.spublish(channel, str(n)), stop)
            ),
        ]
        try:
            killed_at, seen, first = await _kill_and_watch(cluster, victim, stream, "sharded")
            stop.set()
            await tasks[1]
            await _drain(stream, "sharded")
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert next(iter(pubsub.node_pubsub_mapping)) != node  # on the promoted replica now
        await pubsub.aclose()
    _check_and_report(stream, "sharded", killed_at, seen, first, recoveries)


async def test_a_classic_subscription_moves_off_its_dead_node(
    ready_cluster: DevCluster, recoveries: Recoveries
) -> None:
    """The publisher publishes through a primary that stays up (``target_nodes``), so every
    lost message is one the subscriber missed while it moved to another node."""
    cluster = ready_cluster
    channel = f"chaos:pubsub:classic:{uuid.uuid4().hex[:8]}"
    victim = cluster.primary_for_key(channel)
    stream, stop = Stream(), asyncio.Event()
    subscriber, publisher = _client(cluster), _client(cluster)
    async with subscriber, publisher:
        pubsub = subscriber.pubsub()
        await pubsub.subscribe(channel)
        assert pubsub.get_pubsub_node().name == f"{victim.host}:{victim.port}"
        other = next(n for n in publisher.get_primaries() if n.port != victim.port)
        messages = pubsub.listen()  # reads without end, through the recovering get_message()

        def publish(number: int) -> Awaitable[Any]:
            return publisher.execute_command("PUBLISH", channel, str(number), target_nodes=other)

        tasks = [
            asyncio.create_task(_subscribe(stream, messages.__anext__)),
            asyncio.create_task(_publish(stream, publish, stop)),
        ]
        try:
            killed_at, seen, first = await _kill_and_watch(cluster, victim, stream, "classic")
            stop.set()
            await tasks[1]
            await _drain(stream, "classic")
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert pubsub.get_pubsub_node().port != victim.port
        await pubsub.aclose()
    # Classic messages reach every node: it resubscribed elsewhere without waiting for the
    # failover (2 s: loose for a loaded 2-core machine; measured well under 0.1 s).
    assert first - killed_at < 2.0, (first - killed_at, seen - killed_at)
    _check_and_report(stream, "classic", killed_at, seen, first, recoveries)
