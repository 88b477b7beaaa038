from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from resilient_cache import CircuitBreakerOpenError, Command, RedisCircuitBreaker
from resilient_cache.circuit import BreakerBoard, BreakerState, CircuitBreaker
from resilient_cache.stages.breaker import BreakerStage


def test_opens_after_threshold_consecutive_failures(clock) -> None:
    breaker = CircuitBreaker("n1", threshold=3, reset_timeout=10, clock=clock)
    for _ in range(2):
        breaker.before_call()
        breaker.on_failure()
    breaker.before_call()
    breaker.on_success()  # a success resets the count
    for _ in range(3):
        breaker.before_call()
        breaker.on_failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitBreakerOpenError) as info:
        breaker.before_call()
    assert str(info.value).startswith("Circuit breaker is open for n1; next probe in 10.00s")
    assert info.value.retry_after == pytest.approx(10.0)


def test_half_open_after_reset_timeout_then_closes_on_success(clock) -> None:
    changes = []
    breaker = CircuitBreaker(
        "n1", threshold=1, reset_timeout=5, clock=clock, on_change=lambda *c: changes.append(c)
    )
    breaker.before_call()
    breaker.on_failure()
    clock.advance(4.9)
    with pytest.raises(CircuitBreakerOpenError):
        breaker.before_call()
    clock.advance(0.2)
    breaker.before_call()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.on_success()
    assert breaker.state is BreakerState.CLOSED
    assert [(old.value, new.value) for _, old, new in changes] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_failed_probe_reopens_for_a_full_timeout(clock) -> None:
    breaker = CircuitBreaker("n1", threshold=1, reset_timeout=5, clock=clock)
    breaker.before_call()
    breaker.on_failure()
    clock.advance(5)
    breaker.before_call()
    breaker.on_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == pytest.approx(5.0)


async def test_half_open_lets_exactly_n_probes_through_under_50_callers(clock) -> None:
    board = BreakerBoard(threshold=1, reset_timeout=1, half_open_max_calls=2, clock=clock)
    stage = BreakerStage(board)
    board.get("cluster").before_call()
    board.get("cluster").on_failure()
    clock.advance(1)
    release = asyncio.Event()
    reached_backend = 0

    async def slow_backend(command: Command) -> str:
        nonlocal reached_backend
        reached_backend += 1
        await release.wait()
        return "ok"

    calls = [asyncio.create_task(stage(Command("GET", ("k",)), slow_backend)) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert reached_backend == 2
    assert sum(isinstance(r, CircuitBreakerOpenError) for r in results) == 48
    assert board.get("cluster").state is BreakerState.CLOSED


async def test_application_errors_do_not_count(clock) -> None:
    board = BreakerBoard(threshold=2, reset_timeout=1, clock=clock)
    stage = BreakerStage(board)

    async def wrongtype(command: Command) -> None:
        raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    for _ in range(5):
        with pytest.raises(ResponseError):
            await stage(Command("GET", ("k",)), wrongtype)
    assert not board.any_open()


async def test_cancellation_does_not_count(clock) -> None:
    board = BreakerBoard(threshold=1, reset_timeout=1, clock=clock)

    async def hang(command: Command) -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(BreakerStage(board)(Command("GET", ("k",)), hang))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not board.any_open()


def test_isolate_and_reset(clock) -> None:
    board = BreakerBoard(clock=clock)
    board.get("a").isolate()
    clock.advance(10_000)
    with pytest.raises(CircuitBreakerOpenError):
        board.get("a").before_call()
    assert board.open_scopes() == ["a"]
    board.reset()
    board.get("a").before_call()
    assert not board.any_open()


async def test_redis_circuit_breaker_wrapper(clock) -> None:
    class FlakyRedis:
        def __init__(self) -> None:
            self.calls = 0

        async def get(self, key):
            self.calls += 1
            raise RedisConnectionError("Connection closed by server.")

    redis = FlakyRedis()
    wrapped = RedisCircuitBreaker(redis=redis, failure_threshold=2, reset_timeout=60, clock=clock)
    for _ in range(2):
        with pytest.raises(RedisConnectionError):
            await wrapped.get("k")
    with pytest.raises(CircuitBreakerOpenError):
        await wrapped.get("k")
    assert redis.calls == 2  # refused without touching Redis
    assert wrapped.is_open()
    wrapped.reset()
    assert not wrapped.is_open()


def test_failure_rate_over_the_window_opens_it(clock) -> None:
    from resilient_cache.circuit import RatePolicy

    rates = RatePolicy(window=10, minimum_calls=10, failure_rate=50.0)
    breaker = CircuitBreaker("n1", threshold=5, reset_timeout=5, clock=clock, rates=rates)
    # Every other call fails: never 5 in a row, but half of the window.
    for i in range(9):
        breaker.before_call()
        breaker.on_failure() if i % 2 == 0 else breaker.on_success()
    assert breaker.state is BreakerState.CLOSED  # 9 calls: below minimum_calls
    breaker.before_call()
    breaker.on_failure()  # 10th call: 6 of 10 failed
    assert breaker.state is BreakerState.OPEN


def test_window_slides(clock) -> None:
    from resilient_cache.circuit import RatePolicy

    rates = RatePolicy(window=10, minimum_calls=10, failure_rate=50.0)
    breaker = CircuitBreaker("n1", threshold=100, reset_timeout=5, clock=clock, rates=rates)
    for _ in range(4):
        breaker.on_failure()
    for _ in range(100):  # the old failures slide out of the window
        breaker.on_success()
    for _ in range(4):
        breaker.on_failure()
    assert breaker.state is BreakerState.CLOSED  # 4 of 10 < 50 %
    breaker.on_failure()
    assert breaker.state is BreakerState.OPEN  # 5 of 10


async def test_slow_call_rate_opens_it_and_durations_use_the_clock(clock) -> None:
    from resilient_cache.circuit import RatePolicy

    board = BreakerBoard(
        threshold=100,
        reset_timeout=5,
        clock=clock,
        rates=RatePolicy(
            window=4,
            minimum_calls=4,
            failure_rate=None,
            slow_call_rate=50.0,
            slow_call_duration=1.0,
        ),
    )
    stage = BreakerStage(board, clock=clock)

    async def answer_in(seconds: float):
        async def backend(command: Command) -> str:
            clock.advance(seconds)
            return "ok"

        return backend

    for seconds in (0.1, 2.0, 0.1):
        await stage(Command("GET", ("k",)), await answer_in(seconds))
    assert not board.any_open()
    await stage(Command("GET", ("k",)), await answer_in(1.5))  # 2 of 4 slow
    assert board.open_scopes() == ["cluster"]


def test_allow_probe_skips_the_rest_of_the_open_period(clock) -> None:
    breaker = CircuitBreaker("n1", threshold=1, reset_timeout=60, clock=clock)
    breaker.on_failure()
    with pytest.raises(CircuitBreakerOpenError):
        breaker.before_call()
    breaker.allow_probe()
    breaker.before_call()  # the probe goes through now
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.on_success()
    assert breaker.state is BreakerState.CLOSED
    breaker.isolate()
    breaker.allow_probe()  # an isolated node stays isolated
    with pytest.raises(CircuitBreakerOpenError):
        breaker.before_call()
