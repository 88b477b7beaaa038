"""What both redis-py backends share: the connection options taken from the settings, and the
runner of a batch (``client.pipeline()``) on redis-py's own pipeline; and, for the cluster
backend, the address map applied to what the nodes say about the topology."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
from resilient_cache.config_values import Remap
from resilient_cache.pipeline import TRANSACTION, Command

if TYPE_CHECKING:
    from resilient_cache.settings import Settings

__all__ = ["connection_options", "no_retry", "reachable_topology", "run_batch"]


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
        # One node's share of a pipeline (redis_py_node_batches.py) sent here (no node was
        # chosen for it) names each command by its position in the whole pipeline.
        positions = command.options.get("positions")
        for index, reply in enumerate(replies):
            if isinstance(reply, Exception):
                part = Command.from_call(*command.args[index])
                replies[index] = translate_redis_py_error(
                    command, reply, node_of(command, index + 1), arguments=part.args,
                    name=part.name, position=positions[index] if positions else index + 1,
                    username=username,
                )  # fmt: skip
        first = next((reply for reply in replies if isinstance(reply, Exception)), None)
        if first is not None and command.options["raise_on_error"]:
            raise first
        return replies
    raise failure  # outside the except block: Python would chain redis-py's error to it


#: The address redis-py knows a node by (its ``ClusterNode``), or ``None`` if it knows none there.
KnownAs = Callable[[str, int], tuple[str, int] | None]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def _reachable(
    address: tuple[str, int], aliases: Iterable[Any], remap: Remap, known_as: KnownAs
) -> tuple[str, int]:
    """Where the client reaches the node a reply shows at ``address`` (also named by
    ``aliases``: its hostname, its IP). The name redis-py knows it by when one of the
    addresses maps to a known node (so the health view, the failover view and the breakers
    all use redis-py's names), else the first address the map changes, else ``address``."""
    hosts = dict.fromkeys(h for h in (address[0], *map(_text, aliases)) if h and h != "?")
    announced = [(host, address[1]) for host in hosts]
    mapped = [remap(candidate) for candidate in announced]
    for candidate in mapped:
        node = known_as(*candidate)
        if node is not None:
            return node
    changed = (after for before, after in zip(announced, mapped, strict=True) if after != before)
    return next(changed, address)


def reachable_topology(command: str, reply: Any, remap: Remap, known_as: KnownAs) -> Any:
    """``reply`` to ``CLUSTER NODES``, ``CLUSTER SHARDS`` or ``CLUSTER SLOTS`` (in redis-py's
    parsed forms) with every node at the address the client reaches it (see
    :func:`_reachable`); any other reply unchanged. For the health probe (``get_stats()``) and
    the failover view, whose node names must be redis-py's."""
    if command == "CLUSTER NODES" and isinstance(reply, dict):
        renamed = {}
        for name, info in reply.items():
            host, _, port = _text(name).rpartition(":")
            if host and port.isdigit():  # not a node without an address yet
                hostname = [info.get("hostname")] if isinstance(info, dict) else []
                address = _reachable((host, int(port)), hostname, remap, known_as)
                name = f"{address[0]}:{address[1]}"
            renamed[name] = info
        return renamed
    if command == "CLUSTER SHARDS" and isinstance(reply, list):
        for shard in reply:
            for key in list(shard) if isinstance(shard, dict) else []:
                if _text(key) == "nodes" and isinstance(shard[key], list):
                    shard[key] = [_reachable_shard_node(n, remap, known_as) for n in shard[key]]
        return reply
    if command == "CLUSTER SLOTS" and isinstance(reply, list):
        for slot_range in reply:
            for node in slot_range[2:]:  # [host, port, id, {"ip": ..., "hostname": ...}]
                if isinstance(node, list) and len(node) >= 2:
                    extra = node[3] if len(node) > 3 and isinstance(node[3], dict) else {}
                    names = [v for k, v in extra.items() if _text(k) in ("hostname", "ip")]
                    shown = (_text(node[0]), int(node[1]))
                    node[:2] = _reachable(shown, names, remap, known_as)
        return reply
    return reply


def _reachable_shard_node(node: Any, remap: Remap, known_as: KnownAs) -> Any:
    """One node of a ``CLUSTER SHARDS`` reply, its keys as text, at its reachable address."""
    if not isinstance(node, dict):
        return node
    entry = {_text(key): value for key, value in node.items()}  # bytes keys without decoding
    kind = "port" if entry.get("port") else "tls-port"
    if not entry.get(kind):
        return node
    shown = (_text(entry.get("endpoint") or entry.get("ip")), int(entry[kind]))
    host, port = _reachable(shown, (entry.get("hostname"), entry.get("ip")), remap, known_as)
    entry.update({"endpoint": host, "ip": host, kind: port})
    return entry
