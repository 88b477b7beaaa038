"""The dualwrite stage's pure parts: what counts as a miss, and errors from the old Redis
retold without the command's arguments."""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError
from resilient_cache_dualwrite.stage import (
    DualWriteSettings,
    SourceError,
    _looks_missing,
    _source_error,
    _writes_data,
)

from resilient_cache import Command

CANARY = "canary-7f3a-value"


@pytest.mark.parametrize("reply", [None, 0, b"", "", [], {}, set(), ()])
def test_replies_of_a_missing_key_look_missing(reply: object) -> None:
    assert _looks_missing(reply)


@pytest.mark.parametrize("reply", [False, True, 1, -2, b"x", [None], {b"f": b"v"}, 0.0])
def test_other_replies_do_not(reply: object) -> None:
    assert not _looks_missing(reply)  # False is a reply (SET NX refused), not a miss


def test_an_error_that_quotes_an_argument_is_withheld() -> None:
    command = Command("HSET", ("user:1", "field", CANARY))
    error = _source_error(command, ResponseError(f"ERR something about '{CANARY}'"))
    assert isinstance(error, SourceError) and error.kind == "ResponseError"
    assert CANARY not in str(error) and "user:1" not in str(error)
    assert "withheld" in str(error)


def test_an_error_without_arguments_keeps_its_words() -> None:
    command = Command("HSET", ("user:1", "field", CANARY))
    message = "WRONGTYPE Operation against a key holding the wrong kind of value"
    assert message in str(_source_error(command, ResponseError(message)))


def test_a_batch_error_is_redacted_against_every_part() -> None:
    batch = Command("PIPELINE", ((("SET", "k", CANARY), {}), (("GET", "k"), {})))
    text = str(_source_error(batch, ResponseError(f"Command # 1 (SET k {CANARY}) caused error")))
    assert CANARY not in text


@pytest.mark.parametrize(
    ("name", "args", "writes"),
    [
        ("SET", ("k", "v"), True),
        ("GET", ("k",), False),
        ("EVAL", ("return 1", 0), True),
        ("FLUSHDB", (), True),
        ("PING", (), False),
        ("CONFIG SET", ("maxmemory", "1"), False),
    ],
)
def test_which_commands_both_redis_must_see(
    name: str, args: tuple[object, ...], writes: bool
) -> None:
    assert _writes_data(Command(name, args)) is writes


def test_the_url_is_checked_without_being_shown() -> None:
    with pytest.raises(ValueError) as caught:
        DualWriteSettings(mode="dual", source_url="redis://:pw-canary@host:notaport/0")
    assert "pw-canary" not in str(caught.value)
    assert DualWriteSettings(mode="cluster").source_url is None
