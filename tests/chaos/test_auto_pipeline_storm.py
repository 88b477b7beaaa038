"""A cancellation storm under auto-pipelining: callers cancelled at every point of a batch's
life (queued, written, half read) never leave a reply for another caller (redis-py #2665 is
the failure this guards against: a cancelled read left its reply on a pooled connection, and
the next command on that connection got it)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from resilient_cache import create_redis_cluster
from resilient_cache.backends.redis_py_autopipeline import AutoPipeline
from tests.conftest import async_wait_until

CALLERS = 200
ROUNDS = 60


async def test_cancelled_callers_never_get_or_leave_another_callers_reply(ready_cluster) -> None:
    client = create_redis_cluster(
        ready_cluster.startup_nodes, health_check_interval=0, autoload=False, auto_pipeline=True
    )
    rng = random.Random(2665)
    # Values of very different sizes, so that a batch's replies span many socket reads and a
    # cancellation can land between any two of them.
    values = {i: (f"{i}:".encode() * rng.choice([1, 10, 400, 3000])) for i in range(CALLERS)}
    outcomes: Counter[str] = Counter()
    wrong: list[tuple[int, object]] = []

    async def caller(i: int) -> None:
        key = f"storm:{i}"
        for _ in range(ROUNDS):
            read = asyncio.ensure_future(client.get(key))
            cancel_after = rng.choice([None, 0, 1, 2, 3, 5])
            if cancel_after is not None:
                for _ in range(cancel_after):
                    await asyncio.sleep(0)
                read.cancel()
            try:
                got = await read
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
                continue
            outcomes["answered"] += 1
            if got != values[i]:
                wrong.append((i, got[:20] if isinstance(got, bytes) else got))

    async with client:
        await asyncio.gather(*(client.set(f"storm:{i}", v) for i, v in values.items()))
        await asyncio.gather(*(caller(i) for i in range(CALLERS)))
        auto = client._backend._auto  # type: ignore[attr-defined]
        assert isinstance(auto, AutoPipeline)

        async def batches_drained() -> bool:
            return not auto._tasks

        await async_wait_until(batches_drained, 10, "the batches still in flight to finish")
        # Afterwards every connection is clean: each key reads back as its own value.
        after = await asyncio.gather(*(client.get(f"storm:{i}") for i in range(CALLERS)))
        metrics = client.get_metrics()
    assert wrong == [], wrong[:5]
    assert [i for i, got in enumerate(after) if got != values[i]] == []
    # Five callers in six cancel their read, at different points: some before their batch was
    # written, some after (their reply then came and was dropped); the sixth reads.
    assert outcomes["cancelled"] > CALLERS * ROUNDS // 2, outcomes
    assert outcomes["answered"] > CALLERS * ROUNDS // 10, outcomes
    assert auto.replies_dropped > 0
    print(
        f"\ncancellation storm: {outcomes['answered']} answered, {outcomes['cancelled']} "
        f"cancelled ({auto.replies_dropped} after the write), 0 crossed; {auto.batches} batches, "
        f"{auto.batched_commands / max(auto.batches, 1):.1f} commands per batch; "
        f"{metrics.commands.total} commands counted"
    )


async def test_cancelled_pipelines_never_get_or_leave_another_callers_reply(
    ready_cluster,
) -> None:
    """The same storm with ``client.pipeline()``: each caller reads its own key and a
    neighbour's in one pipeline (so over two nodes at times, one node batch each) while plain
    auto-pipelined reads share the pools; pipelines are cancelled at every point."""
    client = create_redis_cluster(
        ready_cluster.startup_nodes, health_check_interval=0, autoload=False, auto_pipeline=True
    )
    rng = random.Random(4110)
    values = {i: (f"{i}:".encode() * rng.choice([1, 10, 400, 3000])) for i in range(CALLERS)}
    outcomes: Counter[str] = Counter()
    wrong: list[tuple[int, object]] = []

    async def caller(i: int) -> None:
        mine, theirs = i, (i + 1) % CALLERS
        for round_ in range(ROUNDS // 2):
            pipe = client.pipeline()
            pipe.get(f"storm:{mine}").get(f"storm:{theirs}")
            read: asyncio.Future[object] = asyncio.ensure_future(
                pipe.execute() if round_ % 3 else client.get(f"storm:{mine}")
            )
            cancel_after = rng.choice([None, 0, 1, 2, 3, 5, 8])
            if cancel_after is not None:
                for _ in range(cancel_after):
                    await asyncio.sleep(0)
                read.cancel()
            try:
                got = await read
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
                continue
            outcomes["answered"] += 1
            expected = [values[mine], values[theirs]] if round_ % 3 else values[mine]
            if got != expected:
                wrong.append((i, got))

    async with client:
        await asyncio.gather(*(client.set(f"storm:{i}", v) for i, v in values.items()))
        await asyncio.gather(*(caller(i) for i in range(CALLERS)))
        auto = client._backend._auto  # type: ignore[attr-defined]

        async def writes_drained() -> bool:
            return not auto._tasks

        await async_wait_until(writes_drained, 10, "the writes still in flight to finish")
        after = await asyncio.gather(*(client.get(f"storm:{i}") for i in range(CALLERS)))
    assert wrong == [], [(i, repr(got)[:60]) for i, got in wrong[:5]]
    assert [i for i, got in enumerate(after) if got != values[i]] == []
    assert outcomes["cancelled"] > CALLERS * ROUNDS // 4, outcomes
    assert outcomes["answered"] > CALLERS * ROUNDS // 20, outcomes
    assert auto.replies_dropped > 0
    print(
        f"\npipeline cancellation storm: {outcomes['answered']} answered, "
        f"{outcomes['cancelled']} cancelled ({auto.replies_dropped} replies read after their "
        "caller was gone), 0 crossed"
    )
