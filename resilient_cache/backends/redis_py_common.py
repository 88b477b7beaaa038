"""What both redis-py backends share: the connection options taken from the settings, and the
runner of a batch (``client.pipeline()``) on redis-py's own pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from resilient_cache.backends._redis_py_compat import (
    annotate_batch_errors_with,
    note_batch_position,
)
from resilient_cache.backends.redis_py_errors import translate_batch_error, translate_redis_py_error
from resilient_cache.pipeline import TRANSACTION, Command

if TYPE_CHECKING:
    from resilient_cache.settings import Settings

__all__ = ["connection_options", "no_retry", "run_batch"]


def no_retry() -> Retry:
    """No retry inside redis-py: the retry stage is the only retry layer."""
    return Retry(NoBackoff(), 0)


def connection_options(settings: Settings) -> dict[str, Any]:
    """redis-py keyword options shared by both backends, from the core settings."""
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_connect_timeout,
        "max_connections": settings.max_connections,
        "decode_responses": settings.decode_responses,
    }
    if settings.client_name:
        options["client_name"] = settings.client_name
    if settings.username:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.ssl:
        options.update(
            ssl=True,
            ssl_ca_certs=settings.ssl_ca_certs,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
            ssl_cert_reqs=settings.ssl_cert_reqs,
            ssl_check_hostname=settings.ssl_check_hostname,
        )
    options.update(settings.redis_options)
    return options


async def run_batch(
    client: RedisCluster | Redis,
    command: Command,
    node_of: Callable[[Command, int | None], str | None],
    username: str | None = None,
) -> Any:
    """Send a PIPELINE / MULTI command (see :mod:`resilient_cache.batch`) with redis-py's own
    pipeline, which groups the commands per node.

    redis-py writes the failed command, arguments and all, into the error it raises
    (``Command # 1 (SET key value) of pipeline caused error: ...``), and Redis quotes arguments
    in some replies. So redis-py is asked for the replies (``raise_on_error=False``), every
    error among them is retold without arguments (:func:`redacted_error`), and the first is
    raised here when the caller asked for that. ``node_of(command, position)`` names the node
    of the command at ``position`` (from 1) in the batch; ``username`` is the configured user,
    for a :class:`CredentialsRefusedError`."""
    failure: Exception
    try:
        pipe: Any = client.pipeline(transaction=command.name == TRANSACTION)
        # redis-py annotates errors in place, through these (cluster transactions, standalone).
        annotate_batch_errors_with(pipe, note_batch_position)
        for args, options in command.args:
            pipe.execute_command(*args, **options)  # a cluster transaction may raise here
        replies = await pipe.execute(raise_on_error=False)
    except Exception as err:
        failure = translate_batch_error(command, err, node_of, username)
        if failure is err:
            raise
    else:
        for index, reply in enumerate(replies):
            if isinstance(reply, Exception):
                part = Command.from_call(*command.args[index])
                replies[index] = translate_redis_py_error(
                    command, reply, node_of(command, index + 1), arguments=part.args,
                    name=part.name, position=index + 1, username=username,
                )  # fmt: skip
        first = next((reply for reply in replies if isinstance(reply, Exception)), None)
        if first is not None and command.options["raise_on_error"]:
            raise first
        return replies
    raise failure  # outside the except block: Python would chain redis-py's error to it
