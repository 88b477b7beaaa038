"""How the redis-py backends retell what redis-py raised: types the stages understand, no
command argument anywhere (design section 5), and the configured credentials refused named as
such (:class:`~resilient_cache.errors.CredentialsRefusedError`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import SlotNotCoveredError, TryAgainError

from resilient_cache.backends._redis_py_compat import (
    closed_in_use,
    cluster_cannot_be_connected,
    quoted_command_prefix,
    redirects_exhausted,
    slots_not_covered,
    unannotated,
)
from resilient_cache.errors import (
    ClusterUnreachableError,
    ConnectionClosedError,
    CredentialsRefusedError,
    SlotNotServedError,
    quotes_arguments,
    redacted_error,
    redis_error_code,
    refused_authentication,
    to_retell,
)
from resilient_cache.pipeline import BATCH_NAMES, Command

#: Commands that send credentials of their own: their WRONGPASS is their reply, not a refusal
#: of the configured credentials.
CREDENTIAL_COMMANDS = frozenset({"AUTH", "HELLO"})


def connection_closed_in_use(command: Command, err: AttributeError) -> Exception:
    """redis-py 8.1 raises ``AttributeError: 'NoneType' object has no attribute 'writelines'``
    (or ``'read'``...) when another task disconnected the connection this command was using.
    That is a broken connection, not a bug in the caller: report it as one. Any other
    AttributeError is left as it is."""
    may_have_run = closed_in_use(err)
    if may_have_run is None:
        return err
    return ConnectionClosedError(command.name, may_have_run=may_have_run)


def _batch_arguments(command: Command, position: int | None = None) -> list[Any]:
    """The arguments of the command at ``position`` (from 1) of a batch, else of them all.
    (A reply concerns its own command only, and so does redis-py's annotation.)"""
    if position is not None:
        return list(command.args[position - 1][0][1:])
    return [arg for args, _ in command.args for arg in args[1:]]


def translate_batch_error(
    command: Command,
    err: Exception,
    node_of: Callable[[Command, int | None], str | None],
    username: str | None = None,
) -> Exception:
    """What to raise for ``err``, raised while sending a batch (``err`` itself if it can stay)."""
    position, original = unannotated(err)
    if position is None and original is None:
        return translate_redis_py_error(
            command,
            err,
            node_of(command, None),
            arguments=_batch_arguments(command),
            username=username,
        )
    if position is not None and not 0 < position <= len(command.args):
        position = None
    part = Command.from_call(*command.args[position - 1]) if position else command
    return redacted_error(
        err, part.name, _batch_arguments(command, position), node_of(command, position),
        text=original, batch=command.name, position=position,
    )  # fmt: skip


def translate_redis_py_error(
    command: Command,
    err: Exception,
    node: str | None = None,
    *,
    arguments: Sequence[Any] | None = None,
    name: str | None = None,
    position: int | None = None,
    username: str | None = None,
) -> Exception:
    """What to raise for ``err``, which redis-py raised for ``command`` (answered by ``node``,
    ``"host:port"``, when known): ``err`` itself, or an error that replaces it, to be raised
    outside of the ``except`` block that caught ``err`` (else Python chains ``err`` to it).

    Types the stages (and ``except RedisError``) understand:

    - ``AttributeError: 'NoneType' object has no attribute 'writelines'``: another task closed
      the connection in use (see connection_closed_in_use).
    - ``ClusterError("TTL exhausted.")``: redis-py gave up after 16 redirects or TRYAGAIN
      replies inside one attempt (a slot migration in progress). Not executed: TryAgainError.
    - ``SlotNotCoveredError`` / "All slots are not covered" / ``KeyError(slot)``: not a
      RedisError at all in redis-py 8.1, and it names no command. SlotNotServedError (a
      ClusterDownError).
    - "Redis Cluster cannot be connected": no node answered while redis-py re-read the slot
      map inside the command, so it was never sent. ClusterUnreachableError (a
      ConnectionError).
    - ``AuthenticationError`` (alone, or wrapped by that "cannot be connected") for a command
      that sends no credentials of its own (AUTH, HELLO): the node refused the configured
      credentials (``username``) while connecting. CredentialsRefusedError, naming ``node``
      when known.

    Never an argument (design section 5): what :func:`to_retell` picks, and any error that
    shows an argument (in its message or down its chain), is retold by :func:`redacted_error`
    as the same redis-py class, with the command's name, the node and Redis's error code.
    ``arguments`` are those to look for (default: the command's); ``name`` and ``position``
    name the failed command of a batch.
    """
    if arguments is None:
        arguments = command.args
    batch = command.name if command.name in BATCH_NAMES else None
    name = name or command.name
    if isinstance(err, AttributeError):
        closed = connection_closed_in_use(command, err)
        if closed is not err:
            closed.__cause__ = err
            return closed
    quoted = quoted_command_prefix(err)
    if quoted is not None:
        return redacted_error(
            err,
            name,
            arguments,
            node,
            text=quoted,
            message=f"{name}: {quoted} (arguments not shown)",
            batch=batch,
        )
    text = str(err)
    translated: Exception | None = None
    if refused_authentication(err) is not None and not _sends_credentials(command, name):
        translated = credentials_refused(err, [node] if node else [], username, name)
    elif redirects_exhausted(err):
        translated = TryAgainError(f"{name}: still redirected after 16 tries (resharding?)")
    elif isinstance(err, SlotNotCoveredError) or slots_not_covered(err):
        translated = SlotNotServedError(name, text)
    elif cluster_cannot_be_connected(err):
        translated = ClusterUnreachableError(name, text)
    elif isinstance(err, KeyError) and err.args and isinstance(err.args[0], int):
        # redis-py looks an uncovered slot up in its slot map without a guard (possible since
        # require_full_coverage=False lets it load a map with holes).
        translated = SlotNotServedError(name, f"slot {err.args[0]} is not served by any node")
    if translated is not None and not quotes_arguments(err, arguments):
        translated.__cause__ = err
        return translated
    if to_retell(err) or quotes_arguments(err, arguments):
        return redacted_error(err, name, arguments, node, batch=batch, position=position)
    return err


def _sends_credentials(command: Command, name: str) -> bool:
    if name in CREDENTIAL_COMMANDS or command.name in CREDENTIAL_COMMANDS:
        return True
    if command.name not in BATCH_NAMES:
        return False
    for args, _ in command.args:
        first = args[0] if args else b""
        text = first.decode(errors="replace") if isinstance(first, bytes) else str(first)
        if text.upper() in CREDENTIAL_COMMANDS:
            return True
    return False


def credentials_refused(
    err: BaseException,
    nodes: Sequence[str],
    username: str | None,
    command: str | None = None,
) -> CredentialsRefusedError:
    """A :class:`CredentialsRefusedError` for ``err`` (an ``AuthenticationError``, or an error
    that wraps one), refused by ``nodes`` (empty when unknown). Nothing is chained to it: raise
    it with ``from`` the authentication error if that is to be kept."""
    auth = refused_authentication(err) or err
    if isinstance(auth, CredentialsRefusedError):  # told again, with the nodes named
        return CredentialsRefusedError(nodes, username, auth.redis_code, auth.detail, command)
    code = redis_error_code(auth)
    detail = str(auth.args[0]) if auth.args else ""
    if code is not None and detail.startswith(code + " "):
        detail = detail[len(code) + 1 :]
    return CredentialsRefusedError(nodes, username, code, detail.strip(), command)
