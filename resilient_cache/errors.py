"""The error hierarchy.

Every error raised by resilient_cache derives from :class:`ResilientCacheError`, keeps its cause
(``raise ... from err``) and names what the caller can act on: the setting, the node, the command.
Errors that stand for a Redis-level failure also derive from the matching redis-py exception, so an
application that already catches ``redis.exceptions.ConnectionError`` keeps working unchanged.

No error message ever contains a key, a value or a credential: messages are built from command
names, node addresses and setting names only. An error from Redis or redis-py that quotes a
command's arguments is replaced by a :class:`RedisCommandError` of the same redis-py class, with
nothing chained to it (see :func:`redacted_error`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, cast

from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    ExceptionType,
    RedisClusterException,
    RedisError,
    ResponseError,
)
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

    ``retry_after`` is the number of seconds until the breaker lets a probe through;
    ``last_failure`` the class and Redis code of the failure that the breaker counted last
    (``"AuthenticationError WRONGPASS"``), when known.
    """

    def __init__(self, scope: str, retry_after: float, last_failure: str | None = None) -> None:
        self.scope = scope
        self.retry_after = max(0.0, retry_after)
        self.last_failure = last_failure
        because = f" (last failure: {last_failure})" if last_failure else ""
        super().__init__(
            f"Circuit breaker is open for {scope}; next probe in {self.retry_after:.2f}s{because}"
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

    def __init__(
        self, command: str, node: str | None, attempts: int, *, position: int | None = None
    ) -> None:
        self.command = command
        self.node = node
        self.attempts = attempts
        #: In a ``client.pipeline()``: the command's number in it (from 1), and ``"PIPELINE"``.
        self.position = position
        self.batch = "PIPELINE" if position is not None else None
        where = f" on {node}" if node else ""
        if position is not None:
            where += f" (command #{position} of the pipeline)"
        super().__init__(
            f"{command}{where}: the connection failed after the command was sent, so it may "
            "have run; it was not retried because it is not idempotent"
        )


class PipelineInterruptedError(ResilientCacheError, RedisConnectionError):
    """The connection carrying one node's share of a ``client.pipeline()`` failed before every
    reply came back (see docs/architecture.md, "Batches").

    Raised by the cluster backend, seen by the stages (the retry stage treats it as any
    connection error: ``may_have_run`` says whether a command of the batch may have run), and
    taken apart by the client, which returns the replies that came (``outcomes``: per command,
    its reply or the error it got) and settles the others (``unanswered``: their indexes in
    ``outcomes``, each holding an error with a ``may_have_run`` flag) command by command. Its
    message and repr show no reply.
    """

    def __init__(
        self,
        batch: str,
        node: str | None,
        outcomes: list[Any],
        unanswered: list[int],
        *,
        may_have_run: bool,
        cause: str,
    ) -> None:
        self.batch = batch
        self.node = node
        self.outcomes = outcomes
        self.unanswered = unanswered
        self.may_have_run = may_have_run
        where = f" to {node}" if node else ""
        super().__init__(
            f"{batch}{where}: {len(unanswered)} of {len(outcomes)} commands were not answered "
            f"({cause})"
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


class CredentialsRefusedError(ResilientCacheError, AuthenticationError):
    """A node refused the configured credentials (``REDIS_USERNAME`` / ``REDIS_PASSWORD``, or
    those of ``REDIS_URL``) while a connection was being opened: Redis's ``WRONGPASS``.

    An ``AuthenticationError`` (so also a redis-py ``ConnectionError``): never retried, and
    counted by the breaker of the node. The message names the nodes and the user, never the
    password: ``127.0.0.1:7001 refused the credentials of user 'app' (WRONGPASS invalid
    username-password pair or user is disabled.); check REDIS_USERNAME and REDIS_PASSWORD``.
    Attributes: ``nodes`` (``"host:port"`` each; empty when unknown), ``node`` (the first, or
    ``None``), ``username`` (``None`` for the default user), ``redis_code``, ``command`` (the
    command that was to be sent, ``None`` from ``connect()``) and ``detail`` (Redis's reply
    without its code).
    """

    def __init__(
        self,
        nodes: Iterable[str],
        username: str | None,
        redis_code: str | None,
        detail: str,
        command: str | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.node = self.nodes[0] if self.nodes else None
        self.username = username
        self.redis_code = redis_code
        self.detail = detail
        self.command = command
        self.status_code = redis_code
        self.error_type = ExceptionType.AUTH
        who = f"user {username!r}" if username else "the default user"
        where = ", ".join(self.nodes) if self.nodes else "a node"
        reply = " ".join(part for part in (redis_code, detail) if part)
        message = f"{where} refused the credentials of {who}"
        if reply:
            message += f" ({reply})"
        message += "; check REDIS_USERNAME and REDIS_PASSWORD"
        super().__init__(f"{command}: {message}" if command else message)

    def __reduce__(self) -> Any:
        fields = (self.nodes, self.username, self.redis_code, self.detail, self.command)
        return (type(self), fields)


# -- errors retold without the command's arguments ------------------------------------------
#
# Redis quotes a command's arguments in some error replies ("unknown command 'X', with args
# beginning with: ...", "unknown subcommand '...'", "Error in ACL SETUSER modifier '...'", a
# script's own error text), and redis-py adds whole commands to others ("Command # 1 (SET key
# value) of pipeline caused error: ...", "No way to dispatch ... Command: (...)"). The backend
# replaces every such error by an instance of RedisCommandError made for the same redis-py
# class, so ``except redis.exceptions.ResponseError`` (or NoScriptError, NoPermissionError,
# AuthenticationError, ...) keeps catching it. Its message is Redis's error code, the reply with
# anything that could be an argument blanked out, and where it happened; nothing is chained to
# it, since ``__context__`` would keep the original for any traceback to print.

#: What stands in for a redacted argument in a message.
REDACTED = "***"

_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{1,31}")
_QUOTED = re.compile(r"""(?<!\w)'(.*?)'(?!\w)|(?<!\w)"(.*?)"(?!\w)""", re.DOTALL)
_WORD = re.compile(r"""[^\s'",;:()\[\]{}]+""")
#: An argument this long is looked for anywhere in a message, and a word of a message this
#: long that begins an argument is taken for a piece of it (shorter ones: whole words only).
_LONG = 4
#: Attributes of a redis-py exception that never hold an argument and that callers may read.
_KEPT_ATTRIBUTES = ("error_type", "status_code", "connection", "last_failed_node_name")


def _as_text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def redact(
    text: str, arguments: Iterable[object], keep: Iterable[str] = (), *, quoted: bool = True
) -> str:
    """``text`` (an error message) with anything that may come from ``arguments`` blanked out.

    Blanked: with ``quoted``, every quoted part (Redis quotes the arguments it repeats) unless
    it is one of ``keep`` (the command's own name); every occurrence of an argument of 4
    characters or more; and every word that is an argument or begins one (Redis cuts long
    arguments short), compared without case. An argument that is text (it has spaces: a
    script, say) counts word by word too.
    """
    keep_words = {word.lower() for word in keep}
    values = [v for v in (_as_text(a).lower() for a in arguments) if v]
    words = set(values)
    for value in values:
        if any(c.isspace() for c in value):
            words.update(word.strip(".-") for word in _WORD.findall(value))
    words.discard("")

    def blank_quoted(match: re.Match[str]) -> str:
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        if inner.lower() in keep_words:
            return match.group(0)
        mark = match.group(0)[0]
        return f"{mark}{REDACTED}{mark}"

    def from_arguments(word: str) -> bool:
        word = word.lower().strip(".-")
        if not word or word in keep_words or word == REDACTED:
            return False
        if word in words:
            return True
        return len(word) >= _LONG and any(v.startswith(word) for v in values)

    if quoted:
        text = _QUOTED.sub(blank_quoted, text)
    lowered = text.lower()
    for value in sorted(values, key=len, reverse=True):
        if len(value) >= _LONG and value in lowered:  # shown whole, separators and all
            text = re.sub(re.escape(value), REDACTED, text, flags=re.IGNORECASE)
            lowered = text.lower()
    return _WORD.sub(lambda m: REDACTED if from_arguments(m.group(0)) else m.group(0), text)


def redis_error_code(err: BaseException, arguments: Iterable[object] = ()) -> str | None:
    """Redis's own code of an error reply (``ERR``, ``WRONGTYPE``, ``NOPERM``...), or ``None``
    for an error that is no reply. redis-py keeps the code in ``status_code`` when it picks a
    class from it, and leaves it at the start of the message otherwise."""
    code = getattr(err, "status_code", None)
    if isinstance(code, str) and _ERROR_CODE.fullmatch(code):
        return code
    if isinstance(err, ResponseError) and err.args:
        first = str(err.args[0]).split(" ", 1)[0]
        if _ERROR_CODE.fullmatch(first) and redact(first, arguments) == first:
            return first
    return None


class RedisCommandError(ResilientCacheError):
    """A failure of one command, reported by Redis or redis-py, retold without its arguments.

    Never instantiated as such: :func:`redacted_error` makes a subclass of it and of the
    original's redis-py class (same name), so existing ``except`` clauses still match. The
    message reads ``ERR unknown subcommand '***'. Try CLIENT HELP. (CLIENT on
    127.0.0.1:7000)``. Attributes:

    - ``command``: the command's name (in a batch, the name of the command that failed);
    - ``node``: ``"host:port"`` of the node that answered, when known;
    - ``redis_code``: Redis's error code (``"ERR"``, ``"WRONGTYPE"``...), ``None`` when the
      error is no reply from Redis (redis-py refused the command);
    - ``original_type``: the name of the class of the error that was replaced;
    - ``batch`` / ``position``: ``"PIPELINE"`` or ``"MULTI"`` and the failed command's number
      (from 1) when it was part of a pipeline or transaction;
    - ``detail``: the reply without its code, arguments blanked out.

    Nothing is chained to it (``__cause__`` and ``__context__`` are ``None``).
    """

    command: str
    node: str | None
    redis_code: str | None
    original_type: str
    batch: str | None
    position: int | None
    detail: str

    def __init__(
        self,
        message: str,
        *,
        command: str,
        node: str | None = None,
        redis_code: str | None = None,
        original_type: str = "",
        batch: str | None = None,
        position: int | None = None,
        detail: str = "",
    ) -> None:
        Exception.__init__(self, message)
        self.command = command
        self.node = node
        self.redis_code = redis_code
        self.original_type = original_type
        self.batch = batch
        self.position = position
        self.detail = detail
        self.status_code = redis_code
        self.error_type = ExceptionType.SERVER

    def __reduce__(self) -> Any:
        base = getattr(type(self), "_replaces", RedisError)
        fields = {
            name: getattr(self, name)
            for name in ("command", "node", "redis_code", "original_type", "batch", "position")
        }
        fields["detail"] = self.detail
        return (_rebuild, (base, str(self), fields))


def _rebuild(base: type[Exception], message: str, fields: dict[str, Any]) -> RedisCommandError:
    return redacted_class(base)(message, **fields)


_REDACTED_CLASSES: dict[type[BaseException], type[RedisCommandError]] = {}


def redacted_class(base: type[BaseException]) -> type[RedisCommandError]:
    """The RedisCommandError class standing for ``base`` (one per class, made on first use)."""
    if issubclass(base, RedisCommandError):
        return base
    cls = _REDACTED_CLASSES.get(base)
    if cls is None:
        namespace = {
            "__module__": __name__,
            "__qualname__": base.__qualname__,
            "__doc__": f"{base.__qualname__} retold without the command's arguments.",
            "_replaces": base,
        }
        try:
            made = type(base.__name__, (RedisCommandError, base), namespace)
        except TypeError:  # a class that cannot be mixed in (instance layout)
            return redacted_class(RedisError)
        cls = _REDACTED_CLASSES[base] = cast("type[RedisCommandError]", made)
    return cls


def redacted_error(
    err: BaseException,
    command: str,
    arguments: Iterable[object],
    node: str | None = None,
    *,
    text: str | None = None,
    message: str | None = None,
    batch: str | None = None,
    position: int | None = None,
) -> RedisCommandError:
    """``err`` retold without ``arguments`` (see :class:`RedisCommandError`).

    ``text`` is the original message when redis-py has rewritten ``err``'s (it defaults to
    ``err``'s own); ``message``, when given, is the whole message to use instead. The new error
    has no ``__cause__`` or ``__context__``: raise it outside of any ``except`` block that holds
    ``err``, or Python chains ``err`` to it again.
    """
    arguments = list(arguments)
    keep = command.split()
    code = redis_error_code(err, arguments)
    if text is None:
        text = str(err.args[0]) if err.args else ""
    if code is not None and text.startswith(code + " "):
        text = text[len(code) + 1 :]
    detail = redact(text, arguments, keep).strip()
    where = command
    if position is not None:
        kind = "transaction" if batch == "MULTI" else "pipeline"
        where = f"{command}, command #{position} of the {kind}"
    elif batch is not None and batch != command:
        where = f"{batch}: {command}"
    if node:
        where += f" on {node}"
    if message is None:
        message = " ".join(part for part in (code, detail, f"({where})") if part)
    new = redacted_class(type(err))(
        message,
        command=command,
        node=node,
        redis_code=code,
        original_type=type(err).__qualname__,
        batch=batch,
        position=position,
        detail=detail,
    )
    for name in _KEPT_ATTRIBUTES:
        if name in vars(err):
            setattr(new, name, getattr(err, name))
    new.status_code = code if code is not None else getattr(err, "status_code", None)
    if hasattr(err, "message"):  # ClusterDownError and a few others keep the text here too
        new.message = message  # type: ignore[attr-defined]
    new.__cause__ = None
    new.__context__ = None
    new.__suppress_context__ = True
    return new


def quotes_arguments(err: BaseException, arguments: Iterable[object]) -> bool:
    """Whether ``err``, or anything chained to it, shows one of ``arguments`` (or a word of
    one, see :func:`redact`) in its message or notes."""
    arguments = list(arguments)
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        for text in (str(current), *map(str, getattr(current, "__notes__", ()))):
            if redact(text, arguments, quoted=False) != text:
                return True
        todo += (current.__cause__, current.__context__)
    return False


def describe_error(err: BaseException, arguments: Iterable[object] = ()) -> str:
    """``"TypeName: message"`` for a log line: the message with ``arguments`` blanked out (see
    :func:`redact`), and nothing of what is chained to ``err``."""
    return f"{type(err).__name__}: {redact(str(err), arguments)}"


def to_retell(err: BaseException) -> bool:
    """Whether ``err`` is retold even when it quotes nothing: any redis-py error but a plain
    connection failure or timeout, whose message names the node already and is read by the
    retry stage (an error reply such as ``WRONGPASS`` or ``LOADING`` is retold)."""
    if not isinstance(err, RedisError | RedisClusterException):
        return False
    if isinstance(err, RedisCommandError):
        return False  # retold already
    network = isinstance(err, RedisConnectionError | RedisTimeoutError)
    return not network or getattr(err, "status_code", None) is not None


def refused_authentication(err: BaseException) -> AuthenticationError | None:
    """The ``AuthenticationError`` that ``err`` is, or wraps: redis-py reports credentials
    refused while it reads the slot map as a ``RedisClusterException`` ("Redis Cluster cannot
    be connected") with the ``AuthenticationError`` as its cause."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, AuthenticationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def failure_summary(err: BaseException) -> str:
    """``"AuthenticationError WRONGPASS"``: an error's class and Redis's code, for a breaker's
    or a probe's account of why a node failed (never the message: it may quote a value)."""
    code = redis_error_code(err) or getattr(err, "redis_code", None)
    return f"{type(err).__name__} {code}" if code else type(err).__name__


class BulkheadFullError(ResilientCacheError, RedisConnectionError):
    """The bulkhead stage had no room for the command: never sent, so safe to try again later.

    ``command``, ``scope`` (the node's ``host:port``, or ``"cluster"``), ``queued`` (commands
    waiting when it was refused) and ``waited`` (whether it waited in the queue first)."""

    def __init__(self, command: str, scope: str, queued: int, *, waited: bool) -> None:
        self.command = command
        self.scope = scope
        self.queued = queued
        self.waited = waited
        why = "no room came within its queue timeout" if waited else "the queue is full"
        super().__init__(
            f"{command}: bulkhead full for {scope} ({why}; {queued} waiting); not sent"
        )

    def __reduce__(self) -> Any:
        return (_bulkhead_full, (self.command, self.scope, self.queued, self.waited))


def _bulkhead_full(command: str, scope: str, queued: int, waited: bool) -> BulkheadFullError:
    return BulkheadFullError(command, scope, queued, waited=waited)
