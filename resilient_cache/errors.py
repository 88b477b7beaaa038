"""The error hierarchy.

Every error raised by resilient_cache derives from :class:`ResilientCacheError`, keeps its cause
(``raise ... from err``) and names what the caller can act on: the setting, the node, the command.
Errors that stand for a Redis-level failure also derive from the matching redis-py exception, so an
application that already catches ``redis.exceptions.ConnectionError`` keeps working unchanged.

No error message ever contains a key, a value or a credential: messages are built from command
names, node addresses and setting names only.
"""

from __future__ import annotations

from redis.exceptions import ClusterDownError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class ResilientCacheError(Exception):
    """Base class of every error raised by resilient_cache itself."""


class ConfigurationError(ResilientCacheError, ValueError):
    """A setting is missing or invalid.

    The message starts with the environment variable or TOML key to fix, for example
    ``REDIS_CLUSTER_NODES: 'redis-1:abc' has no valid port``. ``problems`` holds one line per
    invalid setting when several were found at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class PluginError(ResilientCacheError):
    """A plugin failed to load or registered something invalid; the message names the plugin."""


class CircuitBreakerOpenError(ResilientCacheError, RedisError):
    """A call was refused because the circuit breaker guarding its target is open.

    ``retry_after`` is the number of seconds until the breaker lets a probe through.
    """

    def __init__(self, scope: str, retry_after: float) -> None:
        self.scope = scope
        self.retry_after = max(0.0, retry_after)
        super().__init__(
            f"Circuit breaker is open for {scope}; next probe in {self.retry_after:.2f}s"
        )


class CommandTimeoutError(ResilientCacheError, RedisTimeoutError):
    """A command did not finish within its deadline (retries and topology refreshes included)."""

    def __init__(self, command: str, timeout: float, attempts: int) -> None:
        self.command = command
        self.timeout = timeout
        self.attempts = attempts
        super().__init__(
            f"{command} did not complete within its {timeout:g}s deadline "
            f"({attempts} attempt{'s' if attempts != 1 else ''})"
        )


class CommandInDoubtError(ResilientCacheError, RedisConnectionError):
    """A command that is not safe to repeat lost its connection after it was sent.

    Redis may or may not have executed it, so it was not retried. It derives from redis-py's
    ``ConnectionError`` so existing handlers still catch it.
    """

    def __init__(self, command: str, node: str | None, attempts: int) -> None:
        self.command = command
        self.node = node
        self.attempts = attempts
        where = f" on {node}" if node else ""
        super().__init__(
            f"{command}{where}: the connection failed after the command was sent, so it may "
            "have run; it was not retried because it is not idempotent"
        )


class ConnectionClosedError(ResilientCacheError, RedisConnectionError):
    """Another task closed the connection while this command was using it.

    redis-py 8.1 reports this as ``AttributeError: 'NoneType' object has no attribute
    'writelines'`` (the stream is gone); the backend turns that into this connection error so
    the retry stage handles it like any broken connection. ``may_have_run`` is False when the
    command was never written.
    """

    def __init__(self, command: str, may_have_run: bool) -> None:
        self.command = command
        self.may_have_run = may_have_run
        super().__init__(
            f"{command}: the connection was closed by another task while in use"
            + ("" if may_have_run else " (before the command was sent)")
        )


class ClusterUnreachableError(ResilientCacheError, RedisConnectionError):
    """No node of the cluster answered while the client re-read its slot map, so the command
    was not sent. redis-py 8.1 raises a plain ``RedisClusterException`` here, which
    ``except redis.RedisError`` would miss."""

    #: The command never left: safe to retry whatever it is.
    may_have_run = False

    def __init__(self, command: str, detail: str) -> None:
        self.command = command
        super().__init__(f"{command}: no cluster node answered ({detail})")


class SlotNotServedError(ResilientCacheError, ClusterDownError):
    """No node serves the slot of this command's keys (a node and its replicas are gone, or
    slots were removed). A ``ClusterDownError``, so ``except redis.RedisError`` catches it,
    unlike redis-py's own ``SlotNotCoveredError``."""

    def __init__(self, command: str, detail: str) -> None:
        self.command = command
        super().__init__(f"{command}: {detail}")


class NotConnectedError(ResilientCacheError, RedisConnectionError):
    """The client was used after ``disconnect()``. (Before ``connect()``, the first command
    connects.)"""
