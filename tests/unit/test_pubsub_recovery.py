"""The recovery of a lost pub/sub connection (resilient_cache/pubsub.py), on a fake clock: backoff
within the caller's timeout, the give-up, what is and is not recovered, the shared slot-map
re-read. The real connections are in tests/integration/test_pubsub.py and
tests/chaos/test_pubsub_failover.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache.errors import NotConnectedError
from resilient_cache.pubsub import PubSubs, _connection_lost, _Recovering


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Backend:
    raw = None

    def __init__(self) -> None:
        self.refreshes = 0
        self.gate: asyncio.Event | None = None

    async def refresh_topology(self) -> None:
        self.refreshes += 1
        if self.gate is not None:
            await self.gate.wait()


class Reader(_Recovering):
    def __init__(self, clock: FakeClock) -> None:
        self._pubsubs = PubSubs(Backend(), clock, clock.sleep)
        self._outages = {}

    async def read(
        self, read: Callable[[float | None], Awaitable[Any]], recover: Any, timeout: float | None
    ) -> Any:
        return await self._read("classic", read, recover, timeout, _connection_lost)


def lost_once(then: Any = "message") -> Callable[[float | None], Awaitable[Any]]:
    calls = 0

    async def read(timeout: float | None) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RedisConnectionError("Connection closed by server.")
        return then

    return read


def failing(times: float, error: Exception | None = None) -> Any:
    """A recovery that fails ``times`` times (``math.inf``: always), then succeeds."""

    async def recover() -> None:
        recover.calls += 1  # type: ignore[attr-defined]
        if recover.calls <= times:  # type: ignore[attr-defined]
            raise error or RedisConnectionError("Error 111 connecting to 127.0.0.1:7000.")

    recover.calls = 0  # type: ignore[attr-defined]
    return recover


async def test_a_read_that_works_is_returned_as_is() -> None:
    clock = FakeClock()

    async def read(timeout: float | None) -> str:
        assert timeout == 1.0
        return "message"

    assert await Reader(clock).read(read, failing(0), 1.0) == "message"
    assert clock.sleeps == []


async def test_a_lost_connection_is_recovered_with_backoff_and_read_again() -> None:
    clock, recover = FakeClock(), failing(3)
    reader = Reader(clock)
    assert await reader.read(lost_once(), recover, None) == "message"
    assert recover.calls == 4  # the first at once, then after each wait
    assert len(clock.sleeps) == 3
    for wait, delay in zip(clock.sleeps, (0.05, 0.1, 0.2), strict=True):
        assert delay / 2 <= wait <= delay  # doubled each time, jittered
    assert reader._outages == {}


async def test_the_waits_stop_growing_at_the_cap() -> None:
    clock = FakeClock()
    await Reader(clock).read(lost_once(), failing(12), None)
    assert max(clock.sleeps) <= 0.25
    assert min(clock.sleeps[4:]) >= 0.125


async def test_the_callers_timeout_bounds_the_recovery() -> None:
    clock, recover = FakeClock(), failing(float("inf"))
    reader = Reader(clock)
    assert await reader.read(lost_once(), recover, 1.0) is None  # as "no message yet"
    assert clock.now == pytest.approx(1.0)
    attempts = recover.calls
    # A poll (timeout 0) before the next attempt is due tries nothing and does not wait.
    reader._outages["classic"].next_at = clock.now + 0.2
    assert await reader.read(lost_once(), recover, 0.0) is None
    assert recover.calls == attempts and clock.now == pytest.approx(1.0)


async def test_it_gives_up_after_give_up_after_and_then_fails_at_each_attempt() -> None:
    clock, recover = FakeClock(), failing(float("inf"))
    reader = Reader(clock)
    with pytest.raises(RedisConnectionError, match="Error 111") as raised:
        await reader.read(lost_once(), recover, None)
    assert 30.0 <= clock.now <= 30.0 + 0.25
    if hasattr(raised.value, "__notes__"):
        assert "classic pub/sub down for" in raised.value.__notes__[-1]
    before = clock.now
    with pytest.raises(RedisConnectionError):
        await reader.read(lost_once(), recover, None)  # still down: one attempt, then raised
    assert clock.now - before <= 0.25
    recover_now = failing(0)
    assert await reader.read(lost_once("back"), recover_now, None) == "back"


async def test_refused_credentials_are_raised_at_once() -> None:
    clock = FakeClock()
    recover = failing(float("inf"), AuthenticationError("WRONGPASS invalid password"))
    with pytest.raises(AuthenticationError):
        await Reader(clock).read(lost_once(), recover, None)
    assert recover.calls == 1


async def test_other_errors_are_not_recovered() -> None:
    clock, recover = FakeClock(), failing(0)

    async def read(timeout: float | None) -> Any:
        raise ResponseError("ERR wrong number of arguments")

    with pytest.raises(ResponseError):
        await Reader(clock).read(read, recover, None)
    assert recover.calls == 0


async def test_a_closed_client_says_so() -> None:
    clock = FakeClock()
    reader = Reader(clock)
    reader._pubsubs.closed = True

    async def read(timeout: float | None) -> Any:
        raise AssertionError("not read: the client is closed")

    with pytest.raises(NotConnectedError, match="disconnected"):
        await reader.read(read, failing(0), None)


async def test_a_connection_lost_because_the_client_closed_is_not_recovered() -> None:
    clock = FakeClock()
    reader = Reader(clock)
    recover = failing(0)

    async def read(timeout: float | None) -> Any:
        reader._pubsubs.closed = True  # closed while this read waited
        raise RedisConnectionError("Connection closed by server.")

    with pytest.raises(NotConnectedError) as raised:
        await reader.read(read, recover, None)
    assert isinstance(raised.value.__cause__, RedisConnectionError)
    assert recover.calls == 0


async def test_recovering_subscriptions_share_one_slot_map_read() -> None:
    clock = FakeClock()
    pubsubs = PubSubs(Backend(), clock, clock.sleep)
    backend = pubsubs._backend
    backend.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(pubsubs.refresh()) for _ in range(5)]
    await asyncio.sleep(0)
    backend.gate.set()
    await asyncio.gather(*waiters)
    assert backend.refreshes == 1  # five callers, one read
    await pubsubs.refresh()
    assert backend.refreshes == 1  # within REFRESH_INTERVAL: none
    await pubsubs.refresh(force=True)
    assert backend.refreshes == 2
    clock.now += PubSubs.REFRESH_INTERVAL
    await pubsubs.refresh()
    assert backend.refreshes == 3
    await pubsubs.aclose()
    assert pubsubs.closed


async def test_a_cancelled_waiter_does_not_cancel_the_shared_read() -> None:
    clock = FakeClock()
    pubsubs = PubSubs(Backend(), clock, clock.sleep)
    backend = pubsubs._backend
    backend.gate = asyncio.Event()
    first = asyncio.ensure_future(pubsubs.refresh())
    second = asyncio.ensure_future(pubsubs.refresh())
    await asyncio.sleep(0)
    first.cancel()
    backend.gate.set()
    await second  # the read went on for the other waiter
    assert backend.refreshes == 1 and first.cancelled()
