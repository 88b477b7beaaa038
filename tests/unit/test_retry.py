from __future__ import annotations

import pytest
from redis.backoff import ConstantBackoff
from redis.exceptions import AuthenticationError, ClusterDownError, ReadOnlyError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resilient_cache import Command, CommandInDoubtError
from resilient_cache.stages.retry import RetrySettings, RetryStage, may_have_run
from resilient_cache.telemetry import CommandStats

BROKEN = RedisConnectionError("Connection closed by server.")
REFUSED = RedisConnectionError("Error 111 connecting to 127.0.0.1:7000. Connection refused.")


class Script:
    """A backend that fails with the given errors, then answers."""

    def __init__(self, *errors: Exception, reply: str = "ok") -> None:
        self.errors = list(errors)
        self.reply = reply
        self.calls = 0
        self.attempts: list[int] = []

    async def __call__(self, command: Command) -> str:
        self.calls += 1
        self.attempts.append(command.attempt)
        if self.errors:
            raise self.errors.pop(0)
        return self.reply


def make(clock, **settings) -> tuple[RetryStage, CommandStats]:
    stats = CommandStats()
    stage = RetryStage(
        RetrySettings(**settings), stats, clock, clock.sleep, backoff=ConstantBackoff(0.5)
    )
    return stage, stats


async def test_happy_path_is_one_call(clock) -> None:
    stage, stats = make(clock)
    backend = Script()
    assert await stage(Command("GET", ("k",)), backend) == "ok"
    assert (backend.calls, stats.retried, clock.sleeps) == (1, 0, [])


@pytest.mark.parametrize(
    "error",
    [BROKEN, RedisTimeoutError("Timeout reading from 127.0.0.1:7000"), ClusterDownError("x")],
)
async def test_idempotent_command_is_retried_with_backoff(clock, error) -> None:
    stage, stats = make(clock, max_retries=3)
    backend = Script(error, error)
    assert await stage(Command("GET", ("k",)), backend) == "ok"
    assert backend.attempts == [1, 2, 3]
    assert stats.retried == 2
    assert clock.sleeps == [0.5, 0.5]


async def test_exhausted_raises_the_last_real_error_with_attempts(clock) -> None:
    stage, _ = make(clock, max_retries=2)
    last = RedisConnectionError("Connection closed by server (last).")
    backend = Script(BROKEN, BROKEN, last)
    with pytest.raises(RedisConnectionError) as info:
        await stage(Command("GET", ("k",)), backend)
    assert info.value is last
    assert info.value.attempts == 3


async def test_non_idempotent_write_broken_after_send_is_in_doubt(clock) -> None:
    stage, stats = make(clock)
    backend = Script(BROKEN)
    with pytest.raises(CommandInDoubtError) as info:
        await stage(Command("INCR", ("counter",)), backend)
    assert backend.calls == 1  # not repeated blindly
    assert stats.retried == 0
    assert isinstance(info.value, RedisConnectionError)  # existing handlers still catch it
    assert "may have run" in str(info.value)
    assert info.value.__cause__ is BROKEN


async def test_non_idempotent_write_that_never_connected_is_retried(clock) -> None:
    stage, _ = make(clock)
    backend = Script(REFUSED)
    assert await stage(Command("INCR", ("counter",)), backend) == "ok"
    assert backend.calls == 2


async def test_non_idempotent_write_rejected_by_clusterdown_is_retried(clock) -> None:
    stage, _ = make(clock)
    backend = Script(ClusterDownError("The cluster is down"))
    assert await stage(Command("LPUSH", ("l", "v")), backend) == "ok"


async def test_a_write_refused_by_a_demoted_primary_is_retried_even_if_not_idempotent(
    clock,
) -> None:
    stage, stats = make(clock)
    backend = Script(ReadOnlyError("You can't write against a read only replica."))
    assert await stage(Command("INCR", ("counter",)), backend) == "ok"
    assert backend.attempts == [1, 2] and stats.retried == 1
    assert not may_have_run(ReadOnlyError("x"))


async def test_retry_in_doubt_opt_in(clock) -> None:
    stage, _ = make(clock, retry_in_doubt=True)
    backend = Script(BROKEN)
    assert await stage(Command("INCR", ("counter",)), backend) == "ok"


async def test_tryagain_waits_briefly_not_exponentially(clock) -> None:
    stage, _ = make(clock)
    backend = Script(TryAgainError("TRYAGAIN"))
    await stage(Command("MGET", ("a", "b")), backend)
    assert clock.sleeps == [0.05]


async def test_authentication_error_is_not_retried(clock) -> None:
    stage, _ = make(clock)
    backend = Script(AuthenticationError("invalid password"))
    with pytest.raises(AuthenticationError):
        await stage(Command("GET", ("k",)), backend)
    assert backend.calls == 1


async def test_no_attempt_starts_that_cannot_finish_before_the_deadline(clock) -> None:
    stage, _ = make(clock, max_retries=10)
    command = Command("GET", ("k",))
    command.deadline = clock() + 1.2  # room for two 0.5 s backoffs, not three
    backend = Script(*[BROKEN] * 10)
    with pytest.raises(RedisConnectionError) as info:
        await stage(command, backend)
    assert backend.calls == 3
    assert info.value.attempts == 3
    assert clock() <= command.deadline


def test_may_have_run() -> None:
    assert may_have_run(BROKEN)
    assert may_have_run(RedisTimeoutError("Timeout reading from 127.0.0.1:7000"))
    assert not may_have_run(REFUSED)
    assert not may_have_run(RedisTimeoutError("Timeout connecting to server"))
    assert not may_have_run(ClusterDownError("CLUSTERDOWN"))


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match=r"max_delay \(1\) must be at least delay / retry_delay"):
        RetrySettings(delay=2, max_delay=1)
    # The original package's retryDelay of 3000 ms works without touching max_delay.
    assert RetrySettings(delay=3.0).delay_cap == 3.0
    assert RetrySettings(delay=0.1).delay_cap == 2.0


def test_exhausted_pool_never_ran_so_it_is_retried_not_in_doubt() -> None:
    from redis.exceptions import MaxConnectionsError

    from resilient_cache.circuit import is_infrastructure_failure

    err = MaxConnectionsError("Too many connections")
    assert not may_have_run(err)
    assert not is_infrastructure_failure(err)  # the node is fine; our pool is full


async def test_open_breaker_of_a_node_is_retried_and_rerouted(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    stage = _waiting_stage(clock, _board_with(clock, "127.0.0.1:7000", "127.0.0.1:7001"))
    backend = Script(CircuitBreakerOpenError("127.0.0.1:7000", 1.0))
    # INCR: the refused attempt never ran, so even a non-idempotent command is safe to retry.
    assert await stage(Command("INCR", ("n",)), backend) == "ok"
    assert backend.calls == 2


async def test_cluster_wide_breaker_refuses_fast(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    stage, _ = make(clock)
    backend = Script(CircuitBreakerOpenError("cluster", 1.0))
    with pytest.raises(CircuitBreakerOpenError):
        await stage(Command("GET", ("k",)), backend)
    assert (backend.calls, clock.sleeps) == (1, [])


def _board_with(clock, open_scope: str, *closed: str):
    from resilient_cache.circuit import BreakerBoard

    board = BreakerBoard(threshold=1, reset_timeout=60, clock=clock)
    board.get(open_scope).on_failure()
    for scope in closed:
        board.get(scope)
    return board


def _waiting_stage(clock, board, **settings):
    stats = CommandStats()
    return RetryStage(
        RetrySettings(max_retries=3, **settings),
        stats,
        clock,
        clock.sleep,
        backoff=ConstantBackoff(0.5),
        board=board,
    )


async def test_waiting_for_a_failover_does_not_use_up_retries(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    board = _board_with(clock, "10.0.0.1:7000", "10.0.0.2:7000")
    stage = _waiting_stage(clock, board)
    refusals = [CircuitBreakerOpenError("10.0.0.1:7000", 50.0) for _ in range(12)]
    backend = Script(*refusals)  # 12 refusals (3 s of polling), then the new primary answers
    assert await stage(Command("INCR", ("n",)), backend) == "ok"
    assert backend.calls == 13
    assert clock.sleeps == [0.25] * 12


async def test_no_waiting_when_every_node_is_refused(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    board = _board_with(clock, "10.0.0.1:7000")  # no other node answers: the cluster is down
    stage = _waiting_stage(clock, board)
    backend = Script(*[CircuitBreakerOpenError("10.0.0.1:7000", 50.0) for _ in range(12)])
    with pytest.raises(CircuitBreakerOpenError):
        await stage(Command("GET", ("k",)), backend)
    assert (backend.calls, clock.sleeps) == (1, [])  # refused fast, no backoff


async def test_waiting_is_bounded_by_failover_wait(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    board = _board_with(clock, "10.0.0.1:7000", "10.0.0.2:7000")
    stage = _waiting_stage(clock, board, failover_wait=1.0)
    backend = Script(*[CircuitBreakerOpenError("10.0.0.1:7000", 50.0) for _ in range(100)])
    with pytest.raises(CircuitBreakerOpenError) as info:
        await stage(Command("GET", ("k",)), backend)
    # about 1 s of 0.25 s polls after the breaker opened, then no failover came: refused fast
    assert backend.calls == 1 + 4
    assert info.value.attempts == backend.calls
    # A later command for that node is refused at once: the failover is overdue.
    late = Script(CircuitBreakerOpenError("10.0.0.1:7000", 50.0))
    with pytest.raises(CircuitBreakerOpenError):
        await stage(Command("GET", ("k",)), late)
    assert late.calls == 1


async def test_isolated_node_is_refused_fast(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    board = _board_with(clock, "10.0.0.1:7000", "10.0.0.2:7000")
    board.get("10.0.0.1:7000").isolate()
    stage = _waiting_stage(clock, board)
    backend = Script(CircuitBreakerOpenError("10.0.0.1:7000", float("inf")))
    with pytest.raises(CircuitBreakerOpenError):
        await stage(Command("GET", ("k",)), backend)
    assert backend.calls == 1


async def test_failed_probes_do_not_restart_the_failover_wait(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    board = _board_with(clock, "10.0.0.1:7000", "10.0.0.2:7000")
    node = board.get("10.0.0.1:7000")
    node.reset_timeout = 1.0
    stage = _waiting_stage(clock, board, failover_wait=3.0)
    for _ in range(3):  # the node stays down: each probe fails and re-opens the breaker
        clock.advance(1.0)
        node.before_call()
        node.on_failure()
    assert node.state.value == "open"
    backend = Script(CircuitBreakerOpenError("10.0.0.1:7000", 1.0))
    with pytest.raises(CircuitBreakerOpenError):
        await stage(Command("GET", ("k",)), backend)
    assert backend.calls == 1  # down for 3 s already: no more waiting


async def test_a_closed_cluster_scope_breaker_is_not_a_node_that_answers(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    board = _board_with(clock, "10.0.0.1:7000", "cluster")
    stage = _waiting_stage(clock, board)
    backend = Script(CircuitBreakerOpenError("10.0.0.1:7000", 50.0))
    with pytest.raises(CircuitBreakerOpenError):
        await stage(Command("GET", ("k",)), backend)
    assert backend.calls == 1


async def test_half_open_refusals_keep_waiting_for_the_failover(clock) -> None:
    """While one probe to the dead node is in flight, the other callers keep polling for the
    new primary instead of failing (make demo showed them failing at reset_timeout)."""
    from resilient_cache import CircuitBreakerOpenError

    board = _board_with(clock, "10.0.0.1:7000", "10.0.0.2:7000")
    node = board.get("10.0.0.1:7000")
    node.reset_timeout = 0.5
    clock.advance(0.5)
    node.before_call()  # the probe is now in flight: half-open
    assert node.state.value == "half_open"
    stage = _waiting_stage(clock, board)
    backend = Script(*[CircuitBreakerOpenError("10.0.0.1:7000", 0.0) for _ in range(4)])
    assert await stage(Command("GET", ("k",)), backend) == "ok"
    assert backend.calls == 5


class SlotMap:
    """What a cluster backend tells the retry stage about failovers."""

    def __init__(self, possible: bool | None, estimate: float | None = None) -> None:
        self.possible = possible
        self.failover_estimate = estimate

    def failover_possible(self, node: str) -> bool | None:
        return self.possible

    def slots_of(self, node: str) -> str:
        return "0-5460"


def _stage_on(clock, board, slot_map, **settings):
    return RetryStage(
        RetrySettings(max_retries=3, **settings),
        CommandStats(),
        clock,
        clock.sleep,
        backoff=ConstantBackoff(0.5),
        board=board,
        backend=slot_map,
    )


async def test_no_waiting_when_no_replica_can_take_over(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError, SlotNotServedError

    board = _board_with(clock, "10.0.0.1:7000", "10.0.0.2:7000")
    stage = _stage_on(clock, board, SlotMap(possible=False))
    backend = Script(*[CircuitBreakerOpenError("10.0.0.1:7000", 50.0) for _ in range(12)])
    with pytest.raises(SlotNotServedError) as info:
        await stage(Command("GET", ("k",)), backend)
    assert (backend.calls, clock.sleeps) == (1, [])  # at once: no failover can come
    message = str(info.value)
    assert "0-5460" in message and "10.0.0.1:7000" in message and "no replica" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert info.value.attempts == 1  # type: ignore[attr-defined]


async def test_the_wait_is_bounded_by_the_clusters_failover_estimate(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    board = _board_with(clock, "10.0.0.1:7000", "10.0.0.2:7000")
    stage = _stage_on(clock, board, SlotMap(possible=True, estimate=1.0), failover_wait=15.0)
    backend = Script(*[CircuitBreakerOpenError("10.0.0.1:7000", 50.0) for _ in range(100)])
    with pytest.raises(CircuitBreakerOpenError):
        await stage(Command("GET", ("k",)), backend)
    assert backend.calls == 1 + 4  # 1 s of 0.25 s polls, not 15 s


async def test_an_unknown_slot_map_keeps_the_configured_wait(clock) -> None:
    from resilient_cache import CircuitBreakerOpenError

    board = _board_with(clock, "10.0.0.1:7000", "10.0.0.2:7000")
    stage = _stage_on(clock, board, SlotMap(possible=None), failover_wait=1.0)
    refusals = [CircuitBreakerOpenError("10.0.0.1:7000", 50.0) for _ in range(3)]
    backend = Script(*refusals)  # then the new primary answers
    assert await stage(Command("GET", ("k",)), backend) == "ok"
    assert clock.sleeps == [0.25] * 3
