"""Credentials a node refuses: the error the backends raise, and what the breaker makes of it."""

from __future__ import annotations

import pickle

import pytest
from redis.exceptions import AuthenticationError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache import CircuitBreakerOpenError, CredentialsRefusedError, RedisCommandError
from resilient_cache.backends.redis_py_errors import translate_redis_py_error
from resilient_cache.circuit import BreakerBoard, is_infrastructure_failure
from resilient_cache.errors import failure_summary, refused_authentication
from resilient_cache.pipeline import Command, batch_command
from resilient_cache.stages.retry import NOT_RETRYABLE

PASSWORD = "s3cret-pass"
WRONGPASS = "invalid username-password pair or user is disabled."


def _wrongpass() -> AuthenticationError:
    err = AuthenticationError(WRONGPASS)
    err.status_code = "WRONGPASS"
    return err


def _cannot_be_connected() -> RedisClusterException:
    cause = _wrongpass()
    err = RedisClusterException(
        "Redis Cluster cannot be connected. Please provide at least one reachable node: "
        + WRONGPASS
    )
    err.__cause__ = cause
    return err


def test_a_refusal_while_connecting_names_node_user_and_command() -> None:
    err = translate_redis_py_error(
        Command("GET", ("k",)), _wrongpass(), "10.0.0.1:7000", username="app"
    )
    assert isinstance(err, CredentialsRefusedError) and isinstance(err, AuthenticationError)
    assert isinstance(err, RedisConnectionError)  # what redis-py's AuthenticationError is
    assert (err.nodes, err.node, err.username, err.redis_code, err.command) == (
        ["10.0.0.1:7000"],
        "10.0.0.1:7000",
        "app",
        "WRONGPASS",
        "GET",
    )
    assert str(err) == (
        "GET: 10.0.0.1:7000 refused the credentials of user 'app' (WRONGPASS "
        f"{WRONGPASS}); check REDIS_USERNAME and REDIS_PASSWORD"
    )
    assert isinstance(err, NOT_RETRYABLE) and is_infrastructure_failure(err)
    assert failure_summary(err) == "CredentialsRefusedError WRONGPASS"


def test_a_refusal_wrapped_by_redis_py_while_it_read_the_slot_map() -> None:
    wrapped = _cannot_be_connected()
    assert refused_authentication(wrapped) is wrapped.__cause__
    err = translate_redis_py_error(Command("GET", ("k",)), wrapped, None)
    assert isinstance(err, CredentialsRefusedError)
    assert err.nodes == [] and err.username is None  # the backend names the nodes
    assert "a node refused the credentials of the default user (WRONGPASS" in str(err)
    assert err.__cause__ is wrapped


def test_a_wrongpass_reply_to_auth_or_hello_is_that_commands_reply() -> None:
    for command in (Command("AUTH", ("u", PASSWORD)), Command("HELLO", ("3", "AUTH", "u", "p"))):
        err = translate_redis_py_error(command, _wrongpass(), "10.0.0.1:7000", username="app")
        assert isinstance(err, RedisCommandError) and isinstance(err, AuthenticationError)
        assert not isinstance(err, CredentialsRefusedError)
    with_auth = batch_command([(("SET", "k", "v"), {}), (("AUTH", "u", PASSWORD), {})], False, True)
    err = translate_redis_py_error(with_auth, _wrongpass(), "10.0.0.1:7000", username="app")
    assert not isinstance(err, CredentialsRefusedError)
    without = batch_command([(("SET", "k", "v"), {}), (("GET", "k"), {})], False, True)
    err = translate_redis_py_error(without, _wrongpass(), "10.0.0.1:7000", username="app")
    assert isinstance(err, CredentialsRefusedError) and err.command == "PIPELINE"


def test_the_error_pickles_and_never_holds_a_password() -> None:
    err = CredentialsRefusedError(["10.0.0.1:7000", "10.0.0.1:7001"], "app", "WRONGPASS", "x")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is CredentialsRefusedError and str(again) == str(err)
    assert again.nodes == err.nodes
    assert str(err).startswith("10.0.0.1:7000, 10.0.0.1:7001 refused the credentials")
    assert PASSWORD not in repr(vars(err)) + str(err)


def test_a_breaker_opened_by_refused_credentials_says_so_and_awaits_no_failover(clock) -> None:
    board = BreakerBoard(threshold=2, reset_timeout=60, clock=clock)
    refusing, down, healthy = board.get("n1"), board.get("n2"), board.get("n3")
    healthy.on_success()
    for _ in range(2):
        refusing.on_failure(error=CredentialsRefusedError(["n1"], "app", "WRONGPASS", WRONGPASS))
        down.on_failure(error=RedisConnectionError("Error 111 connecting to n2."))
    assert refusing.is_open and down.is_open
    assert refusing.last_failure == "CredentialsRefusedError WRONGPASS"
    assert down.last_failure == "ConnectionError"
    with pytest.raises(CircuitBreakerOpenError) as refused:
        refusing.before_call()
    assert refused.value.last_failure == "CredentialsRefusedError WRONGPASS"
    assert str(refused.value).endswith("(last failure: CredentialsRefusedError WRONGPASS)")
    # A dead node may be failing over; a node that refuses the credentials is up: no wait.
    assert board.awaiting_failover("n2", clock(), 15.0)
    assert not board.awaiting_failover("n1", clock(), 15.0)
    board.reset("n1")
    assert refusing.last_failure is None and not refusing.refused_credentials
