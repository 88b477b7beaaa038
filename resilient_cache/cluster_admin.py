"""Administering a real Redis Cluster node by node: what ``cluster create`` and ``check`` share.

``resilient-cache cluster create`` (:mod:`resilient_cache.cluster_create`) and ``cluster check``
(:mod:`resilient_cache.cluster_check`) talk to each node on its own, not through the client's
pipeline: they must work before a cluster exists, and see each node's own view. Here:

* the exit codes both commands share;
* :class:`ConnectionOptions`: ``REDIS_USERNAME`` / ``REDIS_PASSWORD`` / ``REDIS_SSL*`` and the
  socket timeouts, from the same settings as the client; the password never printed, logged or
  put in an error (only whether one is set);
* :class:`AdminNode`: one synchronous redis-py connection to one node, without redis-py's own
  retries (each wait has its own deadline), refused credentials turned into an exit code;
* :class:`NodeEntry` / :class:`NodeView`: the parsed ``CLUSTER NODES`` and ``CLUSTER INFO`` of
  one node.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from resilient_cache.config_values import ClusterNode
from resilient_cache.settings import Settings
from resilient_cache.slots import TOTAL_SLOTS

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "TOTAL_SLOTS",
    "AdminError",
    "AdminNode",
    "ConnectionOptions",
    "NodeEntry",
    "NodeView",
    "describe_error",
    "format_slots",
    "plural",
]


EXIT_OK = 0  #: the cluster is formed / the check found nothing
EXIT_PROBLEMS = 1  #: the check found problems, or the cluster did not become ok in time
EXIT_USAGE = 2  #: bad arguments or configuration (credentials, a node not in cluster mode)
EXIT_UNREACHABLE = 3  #: nodes did not answer (create: within --timeout; check: no seed)
EXIT_REFUSED = 4  #: create: the nodes hold a partly formed cluster or data; nothing was changed

Say = Callable[[str], None]


class AdminError(Exception):
    """A reason to stop, with the exit code it maps to; the message never holds a secret."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class ConnectionOptions:
    """How the admin connections log in: the client's own settings, password kept out of repr."""

    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ssl: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    connect_timeout: float = 5.0
    socket_timeout: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionOptions:
        password = settings.password.get_secret_value() if settings.password else None
        return cls(
            username=settings.username,
            password=password or None,
            ssl=settings.ssl,
            ssl_ca_certs=settings.ssl_ca_certs,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
            ssl_cert_reqs=settings.ssl_cert_reqs,
            ssl_check_hostname=settings.ssl_check_hostname,
            connect_timeout=settings.socket_connect_timeout or 5.0,
            socket_timeout=settings.socket_timeout or 5.0,
        )

    def redis_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.socket_timeout,
        }
        if self.ssl:
            kwargs.update(
                ssl=True,
                ssl_ca_certs=self.ssl_ca_certs,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_cert_reqs=self.ssl_cert_reqs,
                ssl_check_hostname=self.ssl_check_hostname,
            )
        return kwargs

    def describe(self) -> str:
        """Who we log in as, for messages: the user name, and only whether a password is set."""
        who = f"user {self.username!r}" if self.username else "the default user"
        secret = "with REDIS_PASSWORD" if self.password else "without a password"
        return f"{who} {secret}{' over TLS' if self.ssl else ''}"


@dataclasses.dataclass(frozen=True)
class NodeEntry:
    """One line of ``CLUSTER NODES``: a node as the answering node sees it."""

    id: str
    host: str  # the announced IP; "" while the node does not know its own address
    port: int
    bus_port: int
    flags: frozenset[str]
    master_id: str | None
    config_epoch: int
    link_state: str
    slots: tuple[tuple[int, int], ...]
    migrating: tuple[tuple[int, str], ...] = ()  # (slot, id of the node it moves to)
    importing: tuple[tuple[int, str], ...] = ()  # (slot, id of the node it comes from)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        """Flagged ``fail``: the majority of primaries agreed it is down."""
        return "fail" in self.flags

    @property
    def suspected(self) -> bool:
        """Flagged ``fail?``: the answering node alone has not heard from it in time."""
        return "fail?" in self.flags

    @property
    def slot_count(self) -> int:
        return sum(end - start + 1 for start, end in self.slots)


def parse_nodes_reply(text: str) -> list[NodeEntry]:
    """Parse the text of ``CLUSTER NODES`` (Redis 7 format)."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, where, flags, master, _ping, _pong, epoch, link = fields[:8]
        address = where.split(",", 1)[0]  # ip:port@cport[,hostname]
        address, _, bus = address.partition("@")
        host, _, port = address.rpartition(":")
        slots: list[tuple[int, int]] = []
        migrating: list[tuple[int, str]] = []
        importing: list[tuple[int, str]] = []
        for item in fields[8:]:
            if item.startswith("["):  # [slot->-id] or [slot-<-id]
                slot, arrow, other = item.strip("[]").partition("->-")
                if arrow:
                    migrating.append((int(slot), other))
                else:
                    slot, _, other = item.strip("[]").partition("-<-")
                    importing.append((int(slot), other))
            else:
                start, _, end = item.partition("-")
                slots.append((int(start), int(end or start)))
        entries.append(
            NodeEntry(
                id=node_id,
                host=host.strip("[]"),
                port=int(port),
                bus_port=int(bus) if bus.isdigit() else int(port) + 10000,
                flags=frozenset(flags.split(",")),
                master_id=None if master == "-" else master,
                config_epoch=int(epoch),
                link_state=link,
                slots=tuple(slots),
                migrating=tuple(migrating),
                importing=tuple(importing),
            )
        )
    return entries


def parse_info_reply(text: str) -> dict[str, str]:
    """Parse ``CLUSTER INFO`` into ``{field: value}``."""
    info = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            info[key] = value
    return info


@dataclasses.dataclass
class NodeView:
    """What one node said: its ``CLUSTER NODES``, ``CLUSTER INFO`` and ``INFO replication``."""

    address: str  # where it was reached
    entries: list[NodeEntry]
    info: dict[str, str]
    keys: int = 0  # DBSIZE, when asked
    replication: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def myself(self) -> NodeEntry:
        for entry in self.entries:
            if "myself" in entry.flags:
                return entry
        raise AdminError(f"{self.address}: CLUSTER NODES has no 'myself' line", EXIT_PROBLEMS)

    @property
    def known_ids(self) -> set[str]:
        return {entry.id for entry in self.entries}

    @property
    def slots_assigned(self) -> int:
        return int(self.info.get("cluster_slots_assigned", "0"))

    def entry(self, node_id: str) -> NodeEntry | None:
        return next((entry for entry in self.entries if entry.id == node_id), None)

    def owners(self) -> list[str | None]:
        """The id of the primary each slot is assigned to in this view (None: unassigned)."""
        owners: list[str | None] = [None] * TOTAL_SLOTS
        for entry in self.entries:
            if entry.is_primary:
                for start, end in entry.slots:
                    owners[start : end + 1] = [entry.id] * (end - start + 1)
        return owners

    def uncovered(self) -> list[int]:
        """Slots with no primary, or whose primary this view flags as failing."""
        failing = {entry.id for entry in self.entries if entry.failing}
        return [
            slot for slot, owner in enumerate(self.owners()) if owner is None or owner in failing
        ]


def describe_error(err: BaseException) -> str:
    if isinstance(err, socket.gaierror) or "Name or service not known" in str(err):
        return "its name does not resolve (yet)"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


class AdminNode:
    """One node, reached at ``address`` with its own synchronous redis-py connection.

    No retries inside redis-py: every wait here has its own deadline and says what it waits for.
    """

    def __init__(self, node: ClusterNode, options: ConnectionOptions) -> None:
        self.host = node.host.strip("[]")
        self.port = node.port
        self.address = str(node)
        self._options = options
        self._client: redis.Redis | None = None

    def __repr__(self) -> str:
        return f"<AdminNode {self.address}>"

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis(
                host=self.host,
                port=self.port,
                decode_responses=True,
                retry=Retry(NoBackoff(), 0),
                **self._options.redis_kwargs(),
            )
        return self._client

    def call(self, *args: Any) -> Any:
        """Run one command; refused credentials and permissions become :class:`AdminError`."""
        try:
            return self.client.execute_command(*args)
        except redis.AuthenticationError as err:
            if not self._options.password:
                raise AdminError(
                    f"{self.address} requires a password: set REDIS_PASSWORD (and "
                    "REDIS_USERNAME for an ACL user)",
                    EXIT_USAGE,
                ) from None
            raise AdminError(
                f"{self.address} refused the credentials ({self._options.describe()}): "
                f"{describe_error(err).rstrip('.')}; check REDIS_USERNAME / REDIS_PASSWORD",
                EXIT_USAGE,
            ) from None
        except redis.exceptions.NoPermissionError as err:
            raise AdminError(
                f"{self.address}: {self._options.describe()} may not run {args[0]} "
                f"{args[1] if len(args) > 1 else ''}: {describe_error(err)}",
                EXIT_USAGE,
            ) from None
        except redis.ResponseError as err:
            if "cluster support disabled" in str(err):
                raise AdminError(
                    f"{self.address} is not in cluster mode (it needs 'cluster-enabled yes')",
                    EXIT_USAGE,
                ) from None
            raise

    def ping(self) -> str | None:
        """None when the node answers PING, else why not (a name that does not resolve, ...)."""
        try:
            self.call("PING")
            return None
        except AdminError:
            raise
        except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
            return describe_error(err)

    def view(self, *, with_keys: bool = False) -> NodeView:
        nodes = self.call("CLUSTER", "NODES")
        info = self.call("CLUSTER", "INFO")
        keys = int(self.call("DBSIZE")) if with_keys else 0
        replication = self.call("INFO", "replication")  # a dict: redis-py parses INFO
        if not isinstance(replication, dict):
            replication = parse_info_reply(str(replication))
        return NodeView(
            self.address,
            parse_nodes_reply(nodes),
            parse_info_reply(info),
            keys,
            {str(key): str(value) for key, value in replication.items()},
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``plural(1, "replica")`` -> ``"1 replica"``, ``plural(3, "primary", "primaries")``."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def format_slots(slots: Iterable[int], limit: int = 8) -> str:
    """``[0, 1, 2, 7]`` -> ``"0-2, 7"``; past ``limit`` ranges, ``", ..."``."""
    ranges: list[list[int]] = []
    for slot in sorted(slots):
        if ranges and slot == ranges[-1][1] + 1:
            ranges[-1][1] = slot
        else:
            ranges.append([slot, slot])
    text = [f"{a}-{b}" if a != b else str(a) for a, b in ranges[:limit]]
    return ", ".join(text) + (f", ... ({len(ranges)} ranges)" if len(ranges) > limit else "")
