"""A cancellation storm under auto-pipelining: callers cancelled at every point of a batch's
life (queued, written, half read) never leave a reply for another caller (redis-py #2665 is
the failure this guards against: a cancelled read left its reply on a pooled connection, and
the next command on that connection got it)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from resilient_cache import create_redis_cluster
from resilient_cache.backends.redis_py_autopipeline import AutoPipeline
from tests.conftest import async_wait_until

CALLERS = 200
ROUNDS = 60


class Storm:
    """A client with auto-pipelining, a value per caller (of very different sizes, so that a
    batch's replies span many socket reads and a cancellation can land between any two of
    them), and the outcomes of reads cancelled at random points."""

    def __init__(self, cluster: Any, seed: int) -> None:
        self.client = create_redis_cluster(
            cluster.startup_nodes, health_check_interval=0, autoload=False, auto_pipeline=True
        )
        self.rng = random.Random(seed)
        sizes = [1, 10, 400, 3000]
        self.values = {i: f"{i}:".encode() * self.rng.choice(sizes) for i in range(CALLERS)}
        self.outcomes: Counter[str] = Counter()
        self.wrong: list[tuple[int, object]] = []
        self.counted = 0  # commands the client counted (get_metrics()), after run()

    async def read(
        self, caller: int, reading: Awaitable[Any], expected: object, points: list[int | None]
    ) -> None:
        """Run ``reading``, cancelled after a number of loop turns picked from ``points``
        (``None``: never); count the outcome, and keep a reply that is not ``expected``."""
        read = asyncio.ensure_future(reading)
        cancel_after = self.rng.choice(points)
        if cancel_after is not None:
            for _ in range(cancel_after):
                await asyncio.sleep(0)
            read.cancel()
        try:
            got = await read
        except asyncio.CancelledError:
            self.outcomes["cancelled"] += 1
            return
        self.outcomes["answered"] += 1
        if got != expected:
            self.wrong.append((caller, got))

    async def run(self, caller: Callable[[int], Awaitable[None]]) -> AutoPipeline:
        """Every caller at once; then wait for the writes in flight, and check that every
        connection is clean (each key reads back as its own value)."""
        client = self.client
        async with client:
            await asyncio.gather(*(client.set(f"storm:{i}", v) for i, v in self.values.items()))
            await asyncio.gather(*(caller(i) for i in range(CALLERS)))
            auto = client._backend._auto  # type: ignore[attr-defined]
            assert isinstance(auto, AutoPipeline)

            async def writes_drained() -> bool:
                return not auto._tasks

            await async_wait_until(writes_drained, 10, "the writes still in flight to finish")
            after = await asyncio.gather(*(client.get(f"storm:{i}") for i in range(CALLERS)))
            self.counted = client.get_metrics().commands.total
        assert self.wrong == [], [(i, repr(got)[:60]) for i, got in self.wrong[:5]]
        assert [i for i, got in enumerate(after) if got != self.values[i]] == []
        return auto


async def test_cancelled_callers_never_get_or_leave_another_callers_reply(ready_cluster) -> None:
    storm = Storm(ready_cluster, 2665)

    async def caller(i: int) -> None:
        for _ in range(ROUNDS):
            await storm.read(
                i, storm.client.get(f"storm:{i}"), storm.values[i], [None, 0, 1, 2, 3, 5]
            )

    auto = await storm.run(caller)
    outcomes = storm.outcomes
    # Five callers in six cancel their read, at different points: some before their batch was
    # written, some after (their reply then came and was dropped); the sixth reads.
    assert outcomes["cancelled"] > CALLERS * ROUNDS // 2, outcomes
    assert outcomes["answered"] > CALLERS * ROUNDS // 10, outcomes
    assert auto.replies_dropped > 0
    print(
        f"\ncancellation storm: {outcomes['answered']} answered, {outcomes['cancelled']} "
        f"cancelled ({auto.replies_dropped} after the write), 0 crossed; {auto.batches} batches, "
        f"{auto.batched_commands / max(auto.batches, 1):.1f} commands per batch; "
        f"{storm.counted} commands counted"
    )


async def test_cancelled_pipelines_never_get_or_leave_another_callers_reply(
    ready_cluster,
) -> None:
    """The same storm with ``client.pipeline()``: each caller reads its own key and a
    neighbour's in one pipeline (so over two nodes at times, one node batch each) while plain
    auto-pipelined reads share the pools; pipelines are cancelled at every point."""
    storm = Storm(ready_cluster, 4110)
    values = storm.values

    async def caller(i: int) -> None:
        mine, theirs = i, (i + 1) % CALLERS
        for round_ in range(ROUNDS // 2):
            points: list[int | None] = [None, 0, 1, 2, 3, 5, 8]
            if round_ % 3:
                pipe = storm.client.pipeline()
                pipe.get(f"storm:{mine}").get(f"storm:{theirs}")
                await storm.read(i, pipe.execute(), [values[mine], values[theirs]], points)
            else:
                await storm.read(i, storm.client.get(f"storm:{mine}"), values[mine], points)

    auto = await storm.run(caller)
    outcomes = storm.outcomes
    assert outcomes["cancelled"] > CALLERS * ROUNDS // 4, outcomes
    assert outcomes["answered"] > CALLERS * ROUNDS // 20, outcomes
    assert auto.replies_dropped > 0
    print(
        f"\npipeline cancellation storm: {outcomes['answered']} answered, "
        f"{outcomes['cancelled']} cancelled ({auto.replies_dropped} replies read after their "
        "caller was gone), 0 crossed"
    )
