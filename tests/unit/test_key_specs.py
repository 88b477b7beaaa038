"""Keys from Redis's key specifications (resilient_cache/key_specs.py), for the command forms
whose keys a fixed table got wrong or missed; the whole table is checked against the server's
COMMAND GETKEYS in tests/integration/test_key_specs.py."""

from __future__ import annotations

import pytest

from resilient_cache import Command
from resilient_cache.key_specs import REDIS_VERSION, keys_from_specs, keys_of
from resilient_cache.pipeline import batch_command


@pytest.mark.parametrize(
    ("name", "args", "keys"),
    [
        ("GET", ("k",), ("k",)),
        ("MSET", ("a", 1, "b", 2), ("a", "b")),
        ("EVAL", ("return 1", 2, "k1", "k2", "arg"), ("k1", "k2")),
        ("EVAL", ("return 1", 0, "arg"), ()),
        ("EVALSHA", ("abc", 1, "k1"), ("k1",)),
        ("FCALL", ("f", 1, "k1", "a"), ("k1",)),
        ("BLPOP", ("l1", "l2", 0), ("l1", "l2")),
        ("XREAD", ("COUNT", 1, "STREAMS", "s1", "s2", "0", "0"), ("s1", "s2")),
        ("XREADGROUP", ("GROUP", "g", "c", "STREAMS", "s1", ">"), ("s1",)),
        ("COPY", ("a", "b", "REPLACE"), ("a", "b")),
        ("ZUNIONSTORE", ("dst", 2, "a", "b", "WEIGHTS", 1, 2), ("dst", "a", "b")),
        ("LMPOP", (2, "a", "b", "LEFT"), ("a", "b")),
        ("GEORADIUS", ("g", 0, 0, 1, "km", "STORE", "dst"), ("g", "dst")),
        ("OBJECT", ("ENCODING", "k"), ("k",)),
        ("OBJECT ENCODING", ("k",), ("k",)),
        ("PING", (), ()),
        ("CLUSTER INFO", (), ()),
        ("PUBLISH", ("channel", "message"), ()),
    ],
)
def test_keys_of_known_forms(name: str, args: tuple[object, ...], keys: tuple[object, ...]) -> None:
    assert keys_of(name, args) == keys


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("SORT", ("k", "STORE", "dst")),  # Redis marks SORT's specs unknown
        ("MIGRATE", ("h", 6379, "", 0, 5000, "KEYS", "a", "b")),  # incomplete
        ("FOO.BAR", ("x",)),  # a module's command
        ("EVAL", ("return 1", "two", "k")),  # numkeys that is not a number
        ("EVAL", ("return 1", 3, "k")),  # more keys announced than given
        ("GET", ()),
    ],
)
def test_keys_that_cannot_be_known_are_none(name: str, args: tuple[object, ...]) -> None:
    assert keys_of(name, args) is None


def test_bytes_names_and_keywords_count_too() -> None:
    assert keys_from_specs((b"XREAD", b"streams", b"s", b"0")) == (b"s",)
    assert REDIS_VERSION.startswith("7.")


def test_a_batch_with_an_unknowable_command_has_unknowable_keys() -> None:
    known = batch_command([(("SET", "a", 1), {}), (("GET", "b"), {})], False, True)
    assert known.keys == ("a", "b")
    unknown = batch_command([(("SET", "a", 1), {}), (("FOO.BAR", "b"), {})], False, True)
    assert unknown.keys is None
    assert Command("PING").keys == ()
