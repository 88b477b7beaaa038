"""Fused fast paths (``FastPath``, ``compose()``/``fuse()``): the same behaviour as the stages'
``__call__`` nested, for synthetic stages of every shape and for the built-in stages.

The reference is the general path: each stage wrapped in a plain ``async def`` (which
``compose()`` never fuses), so the two compositions of the same stage objects can be compared
call by call.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from typing import Any

import pytest
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from resilient_cache import CircuitBreakerOpenError, Command, CommandTimeoutError
from resilient_cache.circuit import BreakerBoard, CircuitBreaker, RatePolicy
from resilient_cache.commands import (
    ARGUMENT_DEPENDENT,
    IDEMPOTENT_COMMANDS,
    READ_ONLY_COMMANDS,
    is_idempotent,
)
from resilient_cache.pipeline import FastPath, Handler, compose, fuse
from resilient_cache.stages.breaker import BreakerStage
from resilient_cache.stages.metrics import MetricsStage
from resilient_cache.stages.retry import RetrySettings, RetryStage
from resilient_cache.stages.routing import RoutingStage
from resilient_cache.stages.timeout import TimeoutStage
from resilient_cache.telemetry import CommandStats

from .conftest import FakeClock


def general(stage: Any) -> Any:
    """``stage`` as a plain function: compose() binds it with a partial and never fuses it."""

    async def run(command: Command, call_next: Handler) -> Any:
        return await stage(command, call_next)

    return run


# -- synthetic stages: every combination of hooks, failures anywhere ---------------------------


class Boom(Exception):
    pass


class Recording:
    """A stage with the hooks ``shape`` names, logging each into ``log``; ``fail`` makes one of
    them raise; ``on_error`` re-raises, recovers with a reply, or calls ``call_next`` again."""

    def __init__(
        self, name: str, shape: str, log: list[str], fail: str = "", mode: str = ""
    ) -> None:
        self.name, self.shape, self.log, self.fail, self.mode = name, shape, log, fail, mode

    def fast_path(self) -> FastPath | None:
        return self.hooks()

    def hooks(self) -> FastPath:
        return FastPath(
            self.before if "b" in self.shape else None,
            self.after if "a" in self.shape else None,
            self.on_error if "e" in self.shape else None,
            self.start if "s" in self.shape else None,  # before without the command
            self.end if "n" in self.shape else None,  # after without the command
        )

    def start(self) -> str:
        return self.before(Command("START"))

    def before(self, command: Command) -> str:
        self.log.append(f"{self.name}.before")
        if self.fail == "before":
            raise Boom(f"{self.name}.before")
        return f"{self.name}-token"

    def after(self, command: Command, token: Any) -> None:
        self.log.append(f"{self.name}.after({token})")
        if self.fail == "after":
            raise Boom(f"{self.name}.after")

    def end(self, token: Any) -> None:
        self.after(Command("END"), token)

    async def on_error(
        self, command: Command, token: Any, error: BaseException, call_next: Handler
    ) -> Any:
        self.log.append(f"{self.name}.on_error({token}, {error!r})")
        if self.mode == "recover":
            return f"{self.name}-recovered"
        if self.mode == "again" and isinstance(error, Boom):
            return await call_next(command)
        if self.mode == "replace":
            raise Boom(f"{self.name} replaced") from error
        raise error

    async def __call__(self, command: Command, call_next: Handler) -> Any:
        path = self.hooks()
        token = None
        if path.before is not None:
            token = path.before(command)
        elif path.start is not None:
            token = path.start()
        try:
            result = await call_next(command)
        except BaseException as error:
            if path.on_error is None:
                raise
            return await path.on_error(command, token, error, call_next)
        if path.after is not None:
            path.after(command, token)
        elif path.end is not None:
            path.end(token)
        return result


SHAPES = ["b", "a", "e", "ba", "se", "ae", "bae", "sae", "bn", "bne", "sn", "ne"]


def _cases() -> list[tuple[Any, ...]]:
    cases = []
    rng = random.Random(20261130)
    for shapes in itertools.product(SHAPES, repeat=3):
        for _ in range(2):
            fails = [rng.choice(["", "", "before", "after"]) for _ in shapes]
            modes = [rng.choice(["", "recover", "again", "replace"]) for _ in shapes]
            terminal_fails = rng.random() < 0.5
            cases.append((shapes, tuple(fails), tuple(modes), terminal_fails))
    return cases


@pytest.mark.parametrize(("shapes", "fails", "modes", "terminal_fails"), _cases())
async def test_fused_stages_behave_as_their_calls_nested(
    shapes: tuple[str, ...], fails: tuple[str, ...], modes: tuple[str, ...], terminal_fails: bool
) -> None:
    async def run(fused: bool) -> tuple[Any, list[str]]:
        log: list[str] = []
        calls = [0]

        async def terminal(command: Command) -> str:
            calls[0] += 1
            log.append("terminal")
            if terminal_fails and calls[0] == 1:
                raise Boom("terminal")
            return "reply"

        stages = [
            Recording(f"s{i}", shape, log, fail, mode)
            for i, (shape, fail, mode) in enumerate(zip(shapes, fails, modes, strict=True))
        ]
        handler = compose(stages if fused else [general(s) for s in stages], terminal)
        try:
            outcome = await handler(Command("GET", ("k",)))
        except Boom as err:
            outcome = f"raised {err} (cause {err.__cause__!r})"
        return outcome, log

    assert await run(fused=True) == await run(fused=False)


async def test_fused_source_reads_as_the_stages_nested() -> None:
    async def terminal(command: Command) -> str:
        return "reply"

    async def on_error(command: Command, token: Any, error: BaseException, call_next: Any) -> Any:
        raise error

    handler = fuse(
        [
            FastPath(after=print, on_error=on_error, start=print),
            FastPath(print),
            FastPath(on_error=on_error),
        ],
        terminal,
    )
    assert handler.source == (  # type: ignore[attr-defined]
        "async def fused(command):\n"
        "    token0 = before0()\n"
        "    try:\n"
        "        before1(command)\n"
        "        try:\n"
        "            result = await terminal(command)\n"
        "        except BaseException as error:\n"
        "            result = await on_error2(command, None, error, next2)\n"
        "    except BaseException as error:\n"
        "        result = await on_error0(command, token0, error, next0)\n"
        "    else:\n"
        "        after0(command, token0)\n"
        "    return result\n"
    )


async def test_an_end_hook_is_called_with_the_token_alone() -> None:
    async def terminal(command: Command) -> str:
        return "reply"

    handler = fuse([FastPath(print, end=print), FastPath(start=print, end=print)], terminal)
    assert handler.source == (  # type: ignore[attr-defined]
        "async def fused(command):\n"
        "    token0 = before0(command)\n"
        "    token1 = before1()\n"
        "    result = await terminal(command)\n"
        "    after1(token1)\n"
        "    after0(token0)\n"
        "    return result\n"
    )


async def test_general_stages_split_the_fused_runs_and_keep_the_order() -> None:
    log: list[str] = []

    async def plain(command: Command, call_next: Handler) -> Any:
        log.append("plain>")
        result = await call_next(command)
        log.append("<plain")
        return result

    async def terminal(command: Command) -> str:
        log.append("terminal")
        return "reply"

    stages = [
        Recording("a", "ba", log),
        plain,
        Recording("b", "ba", log),
        Recording("c", "ba", log),
    ]
    assert await compose(stages, terminal)(Command("GET", ("k",))) == "reply"
    assert log == [
        "a.before",
        "plain>",
        "b.before",
        "c.before",
        "terminal",
        "c.after(c-token)",
        "b.after(b-token)",
        "<plain",
        "a.after(a-token)",
    ]


async def test_a_stage_may_decline_a_fast_path_or_offer_an_empty_one() -> None:
    class Declines(Recording):
        def fast_path(self) -> None:  # type: ignore[override]
            return None

    class Idle:
        def fast_path(self) -> FastPath:
            return FastPath()

        async def __call__(self, command: Command, call_next: Handler) -> Any:
            return await call_next(command)

    log: list[str] = []

    async def terminal(command: Command) -> str:
        return "reply"

    assert compose([Idle()], terminal) is terminal  # nothing to do: nothing per call
    handler = compose([Declines("d", "ba", log)], terminal)
    assert await handler(Command("GET", ("k",))) == "reply"
    assert log == ["d.before", "d.after(d-token)"]


def test_a_fast_path_must_be_a_fast_path() -> None:
    class Wrong:
        def fast_path(self) -> Any:
            return (None, None, None)

        async def __call__(self, command: Command, call_next: Handler) -> Any:
            return await call_next(command)

    async def terminal(command: Command) -> str:
        return "reply"

    with pytest.raises(TypeError, match="must return a FastPath"):
        compose([Wrong()], terminal)

    class Both(Wrong):
        def fast_path(self) -> Any:
            return FastPath(before=print, start=print)

    with pytest.raises(TypeError, match="before or start, not both"):
        compose([Both()], terminal)

    class BothAfters(Wrong):
        def fast_path(self) -> Any:
            return FastPath(after=print, end=print)

    with pytest.raises(TypeError, match="after or end, not both"):
        compose([BothAfters()], terminal)


# -- the built-in stages: fused and nested, step by step ----------------------------------------


class Node:
    def __init__(self, name: str) -> None:
        self.name = name
        self.host, port = name.split(":")
        self.port = int(port)


class Backend:
    """Routes every keyed command to one node; ``outcomes`` say what each attempt does."""

    topology_stale = False

    def __init__(self, outcomes: list[Any]) -> None:
        self.node = Node("10.0.0.1:7000")
        self.outcomes = outcomes
        self.refreshes = 0

    def route(self, command: Command, replica: bool = False) -> Any:
        return self.node if command.keys else None

    def request_refresh(self) -> None:
        self.refreshes += 1

    async def execute(self, command: Command) -> Any:
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "hang":
            await asyncio.Event().wait()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class TickingClock(FakeClock):
    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def default_stages(clock: TickingClock, backend: Backend, **breaker: Any) -> tuple[list[Any], Any]:
    stats = CommandStats()
    board = BreakerBoard(clock=clock, reset_timeout=10.0, **breaker)
    stages = [
        MetricsStage(stats, clock, None),
        TimeoutStage(2.0, clock, resolution=1 / 16, sleep=clock.sleep),
        RetryStage(
            RetrySettings(max_retries=2), stats, clock, clock.sleep, backoff=ConstantBackoff(0.01)
        ),
        RoutingStage(backend),  # type: ignore[arg-type]
        BreakerStage(board, backend, clock),  # type: ignore[arg-type]
    ]
    return stages, (stats, board)


def _state(stats: CommandStats, board: BreakerBoard, backend: Backend) -> tuple[Any, ...]:
    breakers = {
        name: (b.state.value, b.failures, len(b.window or ()), b.last_failure)
        for name, b in board.breakers.items()
    }
    counts = (stats.total, stats.successful, stats.failed, stats.retried, stats.attempts)
    return counts, len(stats.latencies), breakers, backend.refreshes


OUTCOMES: list[Any] = [
    "ok",
    ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    RedisConnectionError("Error 111 connecting to 10.0.0.1:7000. Connection refused."),
    RedisConnectionError("Connection closed by server."),
    "hang",
]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("rates", [None, RatePolicy(window=6, minimum_calls=3)])
async def test_default_stages_fused_match_their_calls_nested(seed: int, rates: Any) -> None:
    rng = random.Random(seed)
    script = [rng.choice(OUTCOMES) for _ in range(40)]
    commands = [rng.choice([("GET", "k"), ("INCR", "n"), ("PING",)]) for _ in range(15)]

    async def run(fused: bool) -> list[Any]:
        clock = TickingClock()
        backend = Backend(list(script))
        stages, (stats, board) = default_stages(clock, backend, threshold=3, rates=rates)
        chain = stages if fused else [general(stage) for stage in stages]
        handler = compose(chain, backend.execute)
        seen = []
        for args in commands:
            command = Command.from_call(args, {})
            try:
                outcome: Any = await handler(command)
            except (Exception, asyncio.CancelledError) as err:
                outcome = (type(err).__name__, str(err), getattr(err, "attempts", None))
            seen.append((outcome, command.attempt, command.node and command.node.name))
            seen.append(_state(stats, board, backend))
            clock.advance(7.0)
        await stages[1].aclose()
        return seen

    assert await run(fused=True) == await run(fused=False)


async def test_fused_pipeline_turns_the_watchdogs_cancellation_into_a_timeout() -> None:
    clock = TickingClock()
    backend = Backend(["hang"])
    stages, (stats, _) = default_stages(clock, backend)
    handler = compose(stages, backend.execute)
    with pytest.raises(CommandTimeoutError):
        await handler(Command("GET", ("k",)))
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    assert (stats.total, stats.failed) == (1, 1)
    assert stages[1].watchdog.watched == {}
    await stages[1].aclose()


async def test_fused_pipeline_leaves_the_callers_cancellation_alone() -> None:
    clock = TickingClock()
    backend = Backend(["hang"])
    stages, (stats, board) = default_stages(clock, backend)
    handler = compose(stages, backend.execute)
    task = asyncio.create_task(handler(Command("GET", ("k",))))
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (stats.total, stats.failed) == (0, 0)  # a cancellation says nothing about Redis
    assert board.breakers["10.0.0.1:7000"].failures == 0
    assert stages[1].watchdog.watched == {}
    await stages[1].aclose()


async def test_fused_breaker_refuses_before_sending() -> None:
    clock = TickingClock()
    backend = Backend([])
    stages, (_, board) = default_stages(clock, backend)
    board.get("10.0.0.1:7000").isolate()
    handler = compose(stages, backend.execute)
    with pytest.raises(CircuitBreakerOpenError):
        await handler(Command("GET", ("k",)))
    await stages[1].aclose()


def test_timeout_stage_follows_the_loop_and_thread_it_runs_on() -> None:
    """The stage keeps the loop of the last command to find the running task cheaply; a new
    loop, or another thread's, must still be found, and its task watched."""
    clock = FakeClock()
    stage = TimeoutStage(0.05, clock, resolution=0.001)
    handler = compose([stage], Backend(["hang"] * 3).execute)

    async def one() -> None:
        task = asyncio.create_task(handler(Command("GET", ("k",))))
        await asyncio.sleep(0)
        clock.advance(1.0)  # the next look of the watchdog is past the deadline
        with pytest.raises(CommandTimeoutError):
            await task
        await stage.aclose()

    asyncio.run(one())
    asyncio.run(one())  # another loop on this thread
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            asyncio.run(one())
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert errors == []


# -- the per-call pieces the fast path relies on ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options"),
    [
        (("GET", "k"), {}),
        (("get", "k"), {"keys": ["k"]}),
        ((b"SET", "k", "v", "NX"), {}),
        (("SET", "k", "v", "EX", 5), {}),
        (("MSET", "a", 1, "b", 2), {}),
        (("FOO.BAR", "x"), {}),
        (("CLUSTER INFO",), {}),
        (("hget", "h", "f"), {"keys": ["h"], "target_nodes": "x"}),
    ],
)
def test_from_call_makes_the_same_command_as_the_constructor(args: Any, options: Any) -> None:
    name = args[0].decode() if isinstance(args[0], bytes) else args[0]
    made = Command.from_call(args, options)
    built = Command(name.upper(), args[1:], options)
    for field in Command.__slots__:
        assert getattr(made, field) == getattr(built, field), field


def test_command_flags_match_the_tables() -> None:
    for name in sorted(READ_ONLY_COMMANDS | IDEMPOTENT_COMMANDS | {"INCR", "FOO.BAR"}):
        for args in (("k", "v"), ("k", "v", "NX"), ("k",)):
            command = Command(name, args)
            assert command.read_only == (name in READ_ONLY_COMMANDS), name
            assert command.idempotent == (
                name in IDEMPOTENT_COMMANDS
                and (name not in ARGUMENT_DEPENDENT or is_idempotent(name, args))
            ), name


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(
    "rates",
    [
        RatePolicy(window=8, minimum_calls=4),
        RatePolicy(window=5, minimum_calls=5, failure_rate=None, slow_call_rate=40.0),
        RatePolicy(window=10, minimum_calls=2, failure_rate=20.0, slow_call_rate=50.0),
    ],
)
def test_quick_success_of_a_breaker_matches_the_full_bookkeeping(seed: int, rates: Any) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    quick = CircuitBreaker("n", threshold=4, reset_timeout=1.0, clock=clock, rates=rates)
    full = CircuitBreaker("n", threshold=4, reset_timeout=1.0, clock=clock, rates=rates)
    full._quiet_success = False  # every success through _record()
    for _ in range(300):
        step = rng.random()
        timed = rates.slow_call_rate is not None
        elapsed = rng.choice([0.1, 0.5, 2.0]) if timed else None
        for breaker in (quick, full):
            try:
                breaker.before_call()
            except CircuitBreakerOpenError:
                continue
            if step < 0.2:
                breaker.on_failure(elapsed)
            else:
                breaker.on_success(elapsed)
        if step > 0.95:
            clock.advance(1.5)
        assert quick.window is not None and full.window is not None
        assert (quick.state, quick.failures, list(quick.window.outcomes)) == (
            full.state,
            full.failures,
            list(full.window.outcomes),
        )
        assert (quick.window.failures, quick.window.slow) == (
            full.window.failures,
            full.window.slow,
        )
