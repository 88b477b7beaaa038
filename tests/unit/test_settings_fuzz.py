"""Property: whatever text a ``REDIS_*`` variable holds, building a client either works or
raises one ``ConfigurationError`` whose one-line message names that variable. Never another
exception (an OverflowError, a ValueError from ``int('²')``, a plugin blamed for a setting),
and never a message that blames another setting.

The variables are enumerated from the settings model of a build (core fields, every built-in
stage's section and each of its fields), plus the ones read outside the model. Deterministic
(``derandomize``, no example database) and bounded by ``max_examples``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from resilient_cache import ConfigurationError, create_redis_cluster

NODES = "127.0.0.1:7000"


def build(**options):
    return create_redis_cluster(autoload=False, **options)


def _variables() -> list[str]:
    """Every environment variable a build reads, from the model rather than by hand."""
    model = type(build(nodes=NODES).settings)
    names = []
    for field, info in model.model_fields.items():
        names.append(f"REDIS_{field.upper()}")
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names.extend(f"REDIS_{field.upper()}__{sub.upper()}" for sub in section.model_fields)
    # Read outside the model: the numbered nodes and the TOML file's path.
    names += ["REDIS_NODE_1_HOST", "REDIS_NODE_1_PORT", "REDIS_CONFIG_FILE"]
    return names


VARIABLES = _variables()


def _keys() -> list[str]:
    """Names a JSON object in a variable might hold: every field of every section, and every
    keyword option of redis-py's RedisCluster and Redis (for REDIS_REDIS_OPTIONS)."""
    import inspect

    from redis.asyncio import Redis, RedisCluster

    model = type(build(nodes=NODES).settings)
    names = set()
    for info in model.model_fields.values():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names |= set(info.annotation.model_fields)
    for client in (RedisCluster, Redis):
        names |= set(inspect.signature(client.__init__).parameters) - {"self"}
    return sorted(names)


# Variables whose test runs without REDIS_CLUSTER_NODES (it would win over them, or choose the
# backend they are about); every other variable is tried next to a valid node list.
_WITHOUT_NODES = {"REDIS_CLUSTER_NODES", "REDIS_NODE_1_HOST", "REDIS_NODE_1_PORT", "REDIS_URL"}

_characters = st.characters(codec="utf-8", exclude_characters="\x00")
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**18, max_value=10**60)
    | st.floats()
    | st.text(_characters, max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(_characters, max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)
# ASCII digits and what goes with numbers, and digits of other scripts: '²'.isdigit() and
# int('\uff17') (a fullwidth 7) are both true in Python, and neither is an ASCII number.
_digits = st.sampled_from("0123456789.-+eE_ :,") | st.characters(
    categories=("Nd", "No"), codec="utf-8"
)
VALUES = st.one_of(
    st.text(_characters, max_size=40),  # anything
    st.text(_digits, max_size=24),  # numbers, unicode digits among them
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats().map(repr),  # nan, inf, 1e-300, ...
    _json.map(json.dumps),  # JSON fragments: lists, objects, huge numbers
    # JSON objects with the names a section or redis_options has, and any values.
    st.dictionaries(st.sampled_from(_keys()), _json, max_size=3).map(json.dumps),
    st.builds(
        lambda host, port: f"{host}:{port}",
        st.text(_characters, max_size=10) | st.sampled_from(["h", "[::1]", "[$$$]", ""]),
        st.text(_digits, max_size=8),
    ),
    st.sampled_from(
        [
            "",
            " ",
            "10**30",
            "1000000000000000000000000000000",
            "1e-9",
            "1e400",
            "-1",
            "0",
            "nan",
            "null",
            "[]",
            "{}",
            '["127.0.0.1:7000"]',
            "[::1]garbage",
            "bad host!@#",
            '{"max_connections": -3}',
            '{"socket_timeout": "abc"}',
            "redis://h:0",
        ]
    ),
)


def check(variable: str, value: str, load: Callable[[], object]) -> None:
    """The property for one variable and one value; ``load`` builds the client."""
    try:
        load()
    except ConfigurationError as err:
        message = str(err)
        assert variable in message, f"{variable}={value!r} was blamed on: {message}"
        assert "\n" not in message, f"{variable}={value!r}: not one line: {message!r}"
    except Exception as err:  # anything else is the bug this test is for
        raise AssertionError(
            f"{variable}={value!r} raised {type(err).__name__}: {err}, not ConfigurationError"
        ) from err


def _load_with(variable: str, value: str) -> None:
    with pytest.MonkeyPatch.context() as env:
        if variable not in _WITHOUT_NODES:
            env.setenv("REDIS_CLUSTER_NODES", NODES)
        if variable == "REDIS_NODE_1_PORT":
            env.setenv("REDIS_NODE_1_HOST", "127.0.0.1")
        env.setenv(variable, value)
        check(variable, value, build)


@pytest.mark.parametrize("variable", VARIABLES)
@settings(
    max_examples=8,
    derandomize=True,
    database=None,
    deadline=None,
    # The autouse fixture that clears REDIS_* and changes directory is meant to be shared by
    # the examples; each example sets its variables in a MonkeyPatch context of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=VALUES)
@example(value="1000000000000000000000000000000")
@example(value="\uff11\uff12")  # fullwidth 12
@example(value="\u00b2")  # superscript two
@example(value="1e-9")
@example(value='{"max_connections": -3}')
def test_any_value_is_accepted_or_names_its_variable(variable: str, value: str) -> None:
    _load_with(variable, value)


def test_the_variables_cover_core_and_every_builtin_section() -> None:
    assert {"REDIS_MAX_CONNECTIONS", "REDIS_REDIS_OPTIONS", "REDIS_STAGES"} <= set(VARIABLES)
    for section in ("tracing", "metrics", "memory", "timeout", "retry", "routing", "breaker"):
        assert f"REDIS_{section.upper()}" in VARIABLES
    assert "REDIS_BREAKER__WINDOW_SIZE" in VARIABLES
    assert "REDIS_METRICS__LATENCY_WINDOW" in VARIABLES


class TestThePropertyCanFail:
    """The check above is only worth something if it fails on the bugs it is meant to catch."""

    def test_another_exception_fails_it(self) -> None:
        def overflow() -> None:
            raise OverflowError("Python int too large to convert to C ssize_t")

        with pytest.raises(AssertionError, match="OverflowError"):
            check("REDIS_MAX_CONNECTIONS", "1" * 31, overflow)

    def test_blaming_another_setting_fails_it(self) -> None:
        def blame_plugin() -> None:
            raise ConfigurationError("plugin 'metrics': the factory of stage 'metrics' failed")

        with pytest.raises(AssertionError, match="was blamed on"):
            check("REDIS_METRICS__LATENCY_WINDOW", "1" * 31, blame_plugin)

    def test_a_multi_line_message_fails_it(self) -> None:
        def two_lines() -> None:
            raise ConfigurationError("REDIS_STAGES: one\ntwo")

        with pytest.raises(AssertionError, match="not one line"):
            check("REDIS_STAGES", "x", two_lines)
