"""How the client settles a pipeline's node batches (resilient_cache/batch.py): pure logic,
with a submit function standing in for the stages and the backend. The real thing (a
connection cut part-way by a proxy, a primary killed) is in
tests/integration/test_pipeline_nodes.py and tests/chaos/test_primary_kill.py."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from resilient_cache import CircuitBreakerOpenError, CommandInDoubtError, PipelineInterruptedError
from resilient_cache.backends.redis_py_node_batches import NodeBatch
from resilient_cache.batch import NODE_BATCH, POSITIONS, ClientPipeline
from resilient_cache.pipeline import Command


def lost(may_have_run: bool = True) -> RedisConnectionError:
    error = RedisConnectionError("Connection closed by server.")
    error.may_have_run = may_have_run  # type: ignore[attr-defined]
    return error


def interrupted(outcomes: list[Any], may_have_run: bool = True) -> PipelineInterruptedError:
    missing = [i for i, o in enumerate(outcomes) if isinstance(o, RedisConnectionError)]
    return PipelineInterruptedError(
        "PIPELINE", "127.0.0.1:7000", outcomes, missing, may_have_run=may_have_run, cause="x"
    )


def in_doubt(cause: PipelineInterruptedError) -> CommandInDoubtError:
    error = CommandInDoubtError("PIPELINE", "127.0.0.1:7000", 1)
    error.__cause__ = cause
    return error


class Script:
    """A submit function that answers each node batch from a list of scripted answers (a
    reply list, or an error to raise), by the first command's name, and records the batches."""

    def __init__(self, answers: dict[tuple[int, ...], list[Any]]) -> None:
        self.answers = answers  # positions -> answers, one per time it is sent
        self.sent: list[tuple[int, ...]] = []

    async def __call__(self, batch: Command) -> Any:
        assert batch.options[NODE_BATCH] is True
        positions = batch.options[POSITIONS]
        self.sent.append(positions)
        answer = self.answers[positions].pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def pipeline(script: Script, groups: list[list[int]], commands: list[tuple[Any, ...]]) -> Any:
    def split(buffered: Any) -> list[NodeBatch]:
        return [
            NodeBatch(
                indexes, frozenset(), [Command.from_call(buffered[i][0], {}) for i in indexes]
            )
            for indexes in groups
        ]

    pipe = ClientPipeline(script, False, encoder=None, event_dispatcher=None, split=split)
    for command in commands:
        pipe.execute_command(*command)
    return pipe


async def test_an_interrupted_batch_keeps_replies_resends_safe_commands_once() -> None:
    commands = [("SET", "a", 1), ("INCR", "n"), ("GET", "a"), ("INCR", "m"), ("GET", "b")]
    cut = interrupted([True, 1, lost(), lost(), lost()])
    script = Script(
        {
            (1, 2, 3, 4, 5): [in_doubt(cut)],
            (3, 5): [[b"1", None]],  # the two GETs without a reply: sent again together
        }
    )
    replies = await pipeline(script, [[0, 1, 2, 3, 4]], commands).execute(raise_on_error=False)
    assert script.sent == [(1, 2, 3, 4, 5), (3, 5)]
    assert replies[:3] == [True, 1, b"1"] and replies[4] is None
    assert isinstance(replies[3], CommandInDoubtError) and replies[3].position == 4


async def test_a_command_never_written_is_sent_again_even_if_not_idempotent() -> None:
    commands = [("INCR", "n"), ("INCR", "m")]
    cut = interrupted([1, lost(may_have_run=False)])
    script = Script({(1, 2): [in_doubt(cut)], (2,): [[1]]})
    assert await pipeline(script, [[0, 1]], commands).execute() == [1, 1]


async def test_a_second_interruption_is_not_resent_again() -> None:
    commands = [("INCR", "n"), ("GET", "a")]
    script = Script(
        {
            (1, 2): [in_doubt(interrupted([1, lost()]))],
            (2,): [interrupted([lost()])],  # idempotent alone: the retry stage gave up
        }
    )
    replies = await pipeline(script, [[0, 1]], commands).execute(raise_on_error=False)
    assert script.sent == [(1, 2), (2,)]
    assert replies[0] == 1 and isinstance(replies[1], RedisConnectionError)


async def test_without_the_retry_stage_saying_in_doubt_nothing_is_resent() -> None:
    # The retry stage retried the (idempotent) batch and gave up, or is not in the pipeline.
    commands = [("GET", "a"), ("GET", "b")]
    script = Script({(1, 2): [interrupted([b"x", lost()])]})
    replies = await pipeline(script, [[0, 1]], commands).execute(raise_on_error=False)
    assert script.sent == [(1, 2)]
    assert replies[0] == b"x" and isinstance(replies[1], RedisConnectionError)


async def test_a_batch_that_fails_whole_fails_only_its_positions() -> None:
    commands = [("SET", "a", 1), ("SET", "b", 1), ("SET", "c", 1)]
    refused = CircuitBreakerOpenError("127.0.0.1:7001", 30.0)
    script = Script({(1, 3): [[True, True]], (2,): [refused]})
    replies = await pipeline(script, [[0, 2], [1]], commands).execute(raise_on_error=False)
    assert replies == [True, refused, True]


async def test_raise_on_error_raises_the_lowest_position_over_all_batches() -> None:
    commands = [("GET", "a"), ("GET", "b"), ("GET", "c"), ("GET", "d")]
    late, early = ResponseError("late"), ResponseError("early")
    late.position, early.position = 4, 2  # type: ignore[attr-defined]
    script = Script({(1, 4): [late], (2, 3): [early]})
    with pytest.raises(ResponseError, match="early"):
        await pipeline(script, [[0, 3], [1, 2]], commands).execute()
    refused = CircuitBreakerOpenError("127.0.0.1:7001", 30.0)  # no position: its first one
    script = Script({(1, 4): [late], (2, 3): [refused]})
    with pytest.raises(CircuitBreakerOpenError):
        await pipeline(script, [[0, 3], [1, 2]], commands).execute()


async def test_the_batch_command_matches_batch_command() -> None:
    from resilient_cache.pipeline import batch_command

    commands = [("GET", "a"), ("INCR", "n")]
    seen: list[Command] = []

    async def submit(batch: Command) -> list[Any]:
        seen.append(batch)
        return [None, 1]

    split = lambda buffered: [  # noqa: E731
        NodeBatch([0, 1], frozenset({7}), [Command.from_call(c, {}) for c, _ in buffered])
    ]
    pipe = ClientPipeline(submit, False, encoder=None, event_dispatcher=None, split=split)
    pipe.execute_command(*commands[0]).execute_command(*commands[1])
    assert await pipe.execute() == [None, 1]
    (batch,) = seen
    expected = batch_command([(c, {}) for c in commands], False, True, slots=frozenset({7}))
    assert (batch.name, batch.args, batch.keys) == (expected.name, expected.args, expected.keys)
    assert (batch.read_only, batch.idempotent) == (expected.read_only, expected.idempotent)
    assert {k: v for k, v in batch.options.items() if k not in (NODE_BATCH, POSITIONS)} == (
        expected.options
    )
    assert batch.options[POSITIONS] == (1, 2)
