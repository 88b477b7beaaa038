"""The bulkhead stage on a fake clock: commands held on events, the queue timeout on a sleep the
test controls, so nothing depends on the machine's speed."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import pytest

from resilient_cache import BulkheadFullError, Command
from resilient_cache.stages.bulkhead import BulkheadSettings, BulkheadStage

from .conftest import FakeClock


class Node(NamedTuple):
    host: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


A, B = Node("10.0.0.1", 7000), Node("10.0.0.2", 7000)


class Timers:
    """A sleep that returns only when the test says time is up."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.started: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.started.append(seconds)
        await self.up.wait()


class Held:
    """A terminal that holds every command until released, and remembers the order."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running: list[str] = []
        self.ran: list[str] = []

    async def __call__(self, command: Command) -> Any:
        self.running.append(command.args[0])
        await self.gate.wait()
        self.running.remove(command.args[0])
        self.ran.append(command.args[0])
        return "ok"


def bulkhead(clock: FakeClock, timers: Timers, **settings: Any) -> BulkheadStage:
    return BulkheadStage(BulkheadSettings(**settings), clock, timers.sleep)


def call(stage: BulkheadStage, held: Held, key: str, node: Node | None = A) -> asyncio.Task[Any]:
    command = Command("GET", (key,))
    command.node = node
    return asyncio.create_task(stage(command, held))


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_per_node_limit_then_queue_then_refusal(clock: FakeClock) -> None:
    timers, held = Timers(), Held()
    stage = bulkhead(clock, timers, max_in_flight_per_node=2, max_queue=2, queue_timeout=5)
    tasks = [call(stage, held, f"k{i}") for i in range(6)]
    await turns()
    assert held.running == ["k0", "k1"]
    assert (stage.in_flight, stage.queued, stage.rejected) == (2, 2, 2)
    refused = [t for t in tasks if t.done()]
    assert len(refused) == 2
    for task in refused:
        err = task.exception()
        assert isinstance(err, BulkheadFullError) and not err.waited
        assert err.scope == A.name and "not sent" in str(err)
    held.gate.set()
    assert await asyncio.gather(*tasks[:4]) == ["ok"] * 4
    assert held.ran[2:] == ["k2", "k3"]  # the queue, first come first served
    assert (stage.in_flight, stage.queued, stage.per_node) == (0, 0, {})


async def test_another_node_is_not_held_up(clock: FakeClock) -> None:
    timers, held = Timers(), Held()
    stage = bulkhead(clock, timers, max_in_flight_per_node=1, max_queue=5, queue_timeout=5)
    first = call(stage, held, "a1", A)
    waiting = call(stage, held, "a2", A)
    other = call(stage, held, "b1", B)
    await turns()
    assert sorted(held.running) == ["a1", "b1"]
    assert stage.queued == 1
    held.gate.set()
    assert await asyncio.gather(first, waiting, other) == ["ok"] * 3


async def test_total_limit_across_nodes(clock: FakeClock) -> None:
    timers, held = Timers(), Held()
    stage = bulkhead(clock, timers, max_in_flight=2, max_queue=0)
    tasks = [call(stage, held, "a", A), call(stage, held, "b", B), call(stage, held, "c", None)]
    await turns()
    assert isinstance(tasks[2].exception(), BulkheadFullError)
    assert tasks[2].exception().scope == "cluster"  # type: ignore[union-attr]
    held.gate.set()
    await asyncio.gather(*tasks[:2])


async def test_a_waiter_gives_up_after_its_queue_timeout(clock: FakeClock) -> None:
    timers, held = Timers(), Held()
    stage = bulkhead(clock, timers, max_in_flight_per_node=1, max_queue=5, queue_timeout=0.25)
    first = call(stage, held, "k1")
    late = call(stage, held, "k2")
    await turns()
    assert timers.started == [0.25]
    timers.up.set()  # the queue timeout passes before any room
    with pytest.raises(BulkheadFullError) as caught:
        await late
    assert caught.value.waited
    assert (stage.queued, stage.rejected, stage.in_flight) == (0, 1, 1)
    held.gate.set()
    assert await first == "ok"


async def test_the_wait_never_outlasts_the_deadline(clock: FakeClock) -> None:
    timers, held = Timers(), Held()
    stage = bulkhead(clock, timers, max_in_flight_per_node=1, queue_timeout=5)
    first = call(stage, held, "k1")
    await turns()
    command = Command("GET", ("k2",))
    command.node, command.deadline = A, clock.now + 0.5
    waiting = asyncio.create_task(stage(command, held))
    await turns()
    assert timers.started == [0.5]
    expired = Command("GET", ("k3",))
    expired.node, expired.deadline = A, clock.now
    with pytest.raises(BulkheadFullError):
        await stage(expired, held)  # no time left: refused without queueing
    held.gate.set()
    assert await asyncio.gather(first, waiting) == ["ok", "ok"]


async def test_cancelled_waiters_leave_no_trace(clock: FakeClock) -> None:
    timers, held = Timers(), Held()
    stage = bulkhead(clock, timers, max_in_flight_per_node=1, max_queue=5, queue_timeout=5)
    first = call(stage, held, "k1")
    waiter = call(stage, held, "k2")
    await turns()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert stage.queued == 0
    held.gate.set()
    await first
    assert (stage.in_flight, stage.per_node) == (0, {})


def test_the_error_is_a_connection_error_that_never_ran() -> None:
    import pickle

    import redis

    from resilient_cache.circuit import is_infrastructure_failure
    from resilient_cache.stages.retry import NOT_RETRYABLE, may_have_run

    err = BulkheadFullError("GET", A.name, 3, waited=True)
    assert isinstance(err, redis.ConnectionError)
    assert not may_have_run(err)
    assert isinstance(err, NOT_RETRYABLE)  # shed at once, not retried behind the caller's back
    assert not is_infrastructure_failure(err)  # says nothing about the node
    again = pickle.loads(pickle.dumps(err))
    assert (again.command, again.scope, again.queued, again.waited) == ("GET", A.name, 3, True)
