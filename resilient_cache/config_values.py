"""The values settings may take, checked before anything uses them: the numeric ranges, node
addresses (``host:port``, hosts, ports), ``REDIS_URL``, the keyword options redis-py's asyncio
clients accept (``redis_options``), and the address map (``REDIS_ADDRESS_MAP``: its parsing and,
as :class:`AddressMap`, its lookup).

Every check reports by raising :class:`~resilient_cache.errors.ConfigurationError` (node lists)
or ``ValueError`` (inside a pydantic validator, which names the variable); none lets an
``OverflowError`` or a ``ValueError`` from ``int()`` through, and none echoes a URL or a value.
"""

from __future__ import annotations

import functools
import json
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from resilient_cache.errors import ConfigurationError

# Ranges of the numeric settings (docs/configuration.md lists them). An upper bound keeps a
# typo such as 10**30 from being accepted and failing later (OverflowError in a deque, a timer
# asyncio cannot arm); a lower bound keeps a near-zero interval from turning into a busy loop.
#: Shortest timeout, in seconds (socket, connect, health probe).
MIN_TIMEOUT = 0.001
#: Longest timeout, in seconds.
MAX_TIMEOUT = 3600.0
#: Longest interval between background checks, in seconds (a day).
MAX_INTERVAL = 86400.0
#: Shortest interval between health probes, in seconds (0 turns them off).
MIN_HEALTH_CHECK_INTERVAL = 0.1
#: Most connections in one node's pool.
MAX_CONNECTIONS = 100_000

# redis-py options that would add a second, hidden retry layer under the retry stage, or that the
# client sets itself. Passing them through ``redis_options`` is refused with the reason.
RESERVED_REDIS_OPTIONS = {
    "retry": "retries are the retry stage's job (REDIS_RETRY__*)",
    "retry_on_error": "retries are the retry stage's job (REDIS_RETRY__*)",
    "retry_on_timeout": "retries are the retry stage's job (REDIS_RETRY__*)",
    "cluster_error_retry_attempts": "retries are the retry stage's job (REDIS_RETRY__*)",
    "startup_nodes": "set the nodes with REDIS_CLUSTER_NODES or create_redis_cluster(nodes)",
    "host": "set the nodes with REDIS_CLUSTER_NODES (or REDIS_NODE_<n>_*), or REDIS_URL",
    "port": "set the nodes with REDIS_CLUSTER_NODES (or REDIS_NODE_<n>_*), or REDIS_URL",
    "password": "use REDIS_PASSWORD",
    "username": "use REDIS_USERNAME",
    "read_from_replicas": "replica reads are the routing stage's job "
    "(REDIS_ROUTING__READ_FROM_REPLICAS)",
    "load_balancing_strategy": "replica reads are the routing stage's job "
    "(REDIS_ROUTING__READ_FROM_REPLICAS)",
    "reinitialize_steps": "the cluster backend sets it (slot map refreshes are the routing "
    "stage's job)",
    "require_full_coverage": "the cluster backend sets it (a partial cluster still serves its "
    "slots)",
}


def _codec(name: str) -> str:
    import codecs

    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError("not a text encoding Python knows") from None
    return name


def _error_handler(name: str) -> str:
    import codecs

    try:
        codecs.lookup_error(name)
    except LookupError:
        raise ValueError("not a codec error handler ('strict', 'replace', ...)") from None
    return name


_Timeout = Annotated[float, Field(ge=MIN_TIMEOUT, le=MAX_TIMEOUT, allow_inf_nan=False)]
_OptionalText = str | None

# The value types of the redis-py options that can be written in JSON or TOML, with the same
# ranges as the core settings. Options taking Python objects are in _OBJECT_OPTIONS; options
# a newer redis-py adds are passed through unchecked (but their name must exist).
_REDIS_OPTION_TYPES: dict[str, Any] = {
    "socket_timeout": _Timeout | None,
    "socket_connect_timeout": _Timeout | None,
    "health_check_interval": Annotated[float, Field(ge=0, le=MAX_INTERVAL, allow_inf_nan=False)],
    "max_connections": Annotated[int, Field(ge=1, le=MAX_CONNECTIONS)],
    "socket_read_size": Annotated[int, Field(ge=1, le=64 * 1024 * 1024)],
    "socket_keepalive": bool | None,
    "socket_keepalive_options": dict[
        Annotated[int, Field(ge=0, le=2**31 - 1)], Annotated[int, Field(ge=0, le=2**31 - 1)]
    ]
    | None,
    "db": Annotated[int, Field(ge=0, le=2**31 - 1)],
    "path": _OptionalText,
    "unix_socket_path": _OptionalText,
    "encoding": Annotated[str, AfterValidator(_codec)],
    "encoding_errors": Annotated[str, AfterValidator(_error_handler)],
    "decode_responses": bool,
    "ssl": bool,
    "ssl_check_hostname": bool,
    "single_connection_client": bool,
    "legacy_responses": bool,
    "dynamic_startup_nodes": bool,
    "auto_close_connection_pool": bool | None,
    "ssl_ca_certs": _OptionalText,
    "ssl_ca_data": _OptionalText,
    "ssl_ca_path": _OptionalText,
    "ssl_certfile": _OptionalText,
    "ssl_keyfile": _OptionalText,
    "ssl_ciphers": _OptionalText,
    "ssl_password": _OptionalText,
    "client_name": Annotated[str, Field(pattern=r"^[!-~]*$", max_length=256)] | None,
    "lib_name": _OptionalText,
    "lib_version": _OptionalText,
    "ssl_cert_reqs": Literal["required", "optional", "none"] | ssl.VerifyMode | None,
    "ssl_min_version": ssl.TLSVersion | None,
    "ssl_include_verify_flags": list[ssl.VerifyFlags] | None,
    "ssl_exclude_verify_flags": list[ssl.VerifyFlags] | None,
    "protocol": Literal[2, 3] | None,
}

# redis-py options that take a Python object (a credential provider, a callable, ...): they can
# only be passed in code, never as a JSON or TOML value.
_OBJECT_OPTIONS = frozenset(
    {
        "address_remap",
        "connection_pool",
        "credential_provider",
        "driver_info",
        "encoder_class",
        "event_dispatcher",
        "maint_notifications_config",
        "parser_class",
        "policy_resolver",
        "redis_connect_func",
    }
)
_CALLABLE_OPTIONS = frozenset({"address_remap", "redis_connect_func"})


@functools.cache
def _option_adapter(name: str) -> TypeAdapter[Any]:
    return TypeAdapter(_REDIS_OPTION_TYPES[name], config=ConfigDict(hide_input_in_errors=True))


@functools.cache
def redis_option_names(target: str) -> tuple[str, frozenset[str]]:
    """``(what, names)``: the keyword options redis-py's asyncio client for ``target`` accepts,
    read from its signatures. ``target`` is ``cluster`` (``RedisCluster``), ``standalone``
    (``Redis``), ``redis``/``rediss``/``unix`` (``Redis.from_url``: the options go to the
    connection class of that URL scheme), or anything else (a plugin's backend: any of them)."""
    import inspect

    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio import connection as aio

    def params(function: Any) -> set[str]:
        return {
            name
            for name, param in inspect.signature(function).parameters.items()
            if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        }

    connection = params(aio.AbstractConnection.__init__) | {
        "max_connections",  # ConnectionPool.from_url
        "single_connection_client",  # Redis.from_url
        "auto_close_connection_pool",
    }
    if target == "cluster":
        return "redis.asyncio.RedisCluster", frozenset(params(RedisCluster.__init__))
    if target == "standalone":
        return "redis.asyncio.Redis", frozenset(params(Redis.__init__))
    if target == "redis":
        names = connection | params(aio.Connection.__init__)
        return "a redis:// connection", frozenset(names)
    if target == "rediss":
        names = connection | params(aio.Connection.__init__) | params(aio.SSLConnection.__init__)
        return "a rediss:// connection", frozenset(names)
    if target == "unix":
        names = connection | params(aio.UnixDomainSocketConnection.__init__)
        return "a unix:// connection", frozenset(names)
    names = params(RedisCluster.__init__) | params(Redis.__init__)
    return "redis.asyncio.RedisCluster or Redis", frozenset(names)


def _option_error(key: str, message: str) -> PydanticCustomError:
    # load_settings() names it REDIS_REDIS_OPTIONS.<key> (or the TOML key / keyword argument).
    return PydanticCustomError("redis_option", "{message}", {"option": key, "message": message})


def check_redis_options(options: Mapping[str, Any], target: str) -> dict[str, Any]:
    """Validate ``redis_options`` for the backend ``target`` (see :func:`redis_option_names`):
    reserved keys are refused with the reason, unknown keys with the close matches, and values
    of the wrong type or out of range name their key. Returns the options with values coerced
    (``"5"`` -> ``5.0`` for a timeout, as for the core settings)."""
    import difflib

    what, names = redis_option_names(target)
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key in RESERVED_REDIS_OPTIONS:
            raise ValueError(f"{key!r} cannot be set here: {RESERVED_REDIS_OPTIONS[key]}")
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3, cutoff=0.6)
            hint = (
                f"; close matches: {', '.join(close)}"
                if close
                else f"; see the keyword arguments of {what.split(' or ')[0]}"
            )
            raise _option_error(key, f"{what} has no option {key!r}{hint}")
        if target == "cluster" and key == "db" and value not in (0, "0", None):
            raise _option_error(key, "a cluster has database 0 only")
        if target == "cluster" and key == "path" and value:
            raise _option_error(key, "a cluster cannot be reached over a unix socket")
        if key in _REDIS_OPTION_TYPES:
            try:
                checked[key] = _option_adapter(key).validate_python(value)
            except ValidationError as err:
                first = err.errors(include_url=False, include_input=False)[0]
                raise _option_error(key, str(first["msg"]).removeprefix("Value error, ")) from None
        elif key in _OBJECT_OPTIONS:
            if isinstance(value, str | int | float | list | dict):
                raise _option_error(
                    key,
                    "takes a Python object, not a JSON or TOML value; pass it in code "
                    f"(redis_options={{{key!r}: ...}})",
                )
            if key in _CALLABLE_OPTIONS and value is not None and not callable(value):
                raise _option_error(key, "takes a callable")
            checked[key] = value
        else:
            checked[key] = value
    return checked


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """A node address as configured: ``host`` and ``port``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# A DNS name: labels of ASCII letters, digits, '-' (not first or last) and '_' (Docker and
# Kubernetes service names use it), 1-63 characters each, 253 in all, an optional final dot.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?", re.ASCII)
_DOTTED_NUMBERS_RE = re.compile(r"[0-9.]+", re.ASCII)
_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)
_SCOPE_RE = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)


def host_problem(host: str, *, bare_ipv6: bool = False) -> str | None:
    """Why ``host`` is not a DNS name, an IPv4 address or (bracketed, or bare when
    ``bare_ipv6``) an IPv6 address; ``None`` when it is one."""
    import ipaddress

    if not host:
        return "the host is empty"
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
        if not host:
            return "the brackets hold no IPv6 address"
    elif ":" in host and not bare_ipv6:
        return "an IPv6 address must be written in brackets, as in [::1]:7000"
    if bracketed or ":" in host:
        address, _, scope = host.partition("%")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return "not a valid IPv6 address"
        if "%" in host and not _SCOPE_RE.fullmatch(scope):
            return "not a valid IPv6 zone"
        return None
    if len(host) > 253 or not _DNS_NAME_RE.fullmatch(host):
        return "not a valid host name or IP address"
    if _DOTTED_NUMBERS_RE.fullmatch(host.rstrip(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "not a valid IPv4 address"
    return None


def parse_port(value: object) -> int | None:
    """A TCP port from ``value``: an int, or ASCII digits only (``'²'.isdigit()`` is true,
    and so are fullwidth digits: neither is a port), 1-65535. ``None`` when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and _PORT_RE.fullmatch(value):
        port = int(value)
    else:
        return None
    return port if 0 < port < 65536 else None


def parse_port_of(value: object, where: str, item: str) -> int:
    port = parse_port(value)
    if port is None:
        raise ConfigurationError(f"{where}: {item!r} has no valid port")
    return port


def check_host(host: str, where: str, item: str, *, bare_ipv6: bool = False) -> str:
    problem = host_problem(host, bare_ipv6=bare_ipv6)
    if problem is not None:
        raise ConfigurationError(f"{where}: {item!r} has no valid host ({problem})")
    return host[1:-1] if host.startswith("[") else host


def _json_node_list(text: str, where: str) -> list[Any] | None:
    """``'["h1:7000", "h2:7001"]'`` -> the list; ``None`` when ``text`` is not meant as JSON
    (``[::1]:7000`` also starts with a bracket: JSON is a '[' followed by '"' or ']')."""
    if not re.match(r"\[\s*(\"|\]\s*$)", text):
        return None
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ConfigurationError(f"{where}: not a valid JSON list ({err})") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigurationError(f"{where}: a JSON list must hold 'host:port' strings only")
    return value


def parse_cluster_nodes(
    text: str | Sequence[str | ClusterNode | tuple[str, int]],
    *,
    where: str = "REDIS_CLUSTER_NODES",
    default_port: int = 6379,
) -> list[ClusterNode]:
    """Parse ``"h1:6379,h2:6379"`` (or a list of such items) into :class:`ClusterNode` objects.

    Items are separated by commas or white space, or given as a JSON list of strings
    (``'["h1:6379", "h2:6379"]'``); a missing port means ``default_port``; an IPv6 host is
    written in brackets (``[::1]:7000``). A host is a DNS name, an IPv4 address or a bracketed
    IPv6 address; a port is 1-65535 in ASCII digits. A bad item raises
    :class:`ConfigurationError` naming ``where`` and the item, e.g.
    ``REDIS_CLUSTER_NODES: 'redis-1:abc' has no valid port``.
    """
    items: list[Any]
    if isinstance(text, str):
        json_items = _json_node_list(text.strip(), where)
        items = json_items if json_items is not None else re.split(r"[,\s]+", text)
    else:
        items = list(text)
    nodes: list[ClusterNode] = []
    for item in items:
        if isinstance(item, ClusterNode | tuple):
            if isinstance(item, tuple) and len(item) != 2:
                raise ConfigurationError(f"{where}: {item!r} is not a (host, port) pair")
            host, port = (item.host, item.port) if isinstance(item, ClusterNode) else item
            small = isinstance(port, str) or (isinstance(port, int) and port.bit_length() < 64)
            shown = f"{host}:{port if small else '?'}"
            if not isinstance(host, str):
                raise ConfigurationError(f"{where}: {shown!r} has no valid host")
            nodes.append(
                ClusterNode(
                    check_host(host, where, shown, bare_ipv6=True),
                    parse_port_of(port, where, shown),
                )
            )
            continue
        if not isinstance(item, str):
            raise ConfigurationError(
                f"{where}: a node is a 'host:port' string, a (host, port) pair or a "
                f"ClusterNode, not {type(item).__name__}"
            )
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            inside, sep, rest = item[1:].partition("]")
            if not sep:
                raise ConfigurationError(f"{where}: {item!r} has an unclosed '['")
            if rest and not rest.startswith(":"):
                raise ConfigurationError(
                    f"{where}: {item!r} has text after ']' that is not ':port'"
                )
            host, has_port, port_text = f"[{inside}]", bool(rest), rest[1:]
        else:
            host, colon, port_text = item.rpartition(":")
            if not colon:
                host = item
            has_port = bool(colon)
        port = parse_port_of(port_text, where, item) if has_port else default_port
        nodes.append(ClusterNode(check_host(host, where, item), port))
    if not nodes and isinstance(text, str) and text.strip():
        raise ConfigurationError(f"{where}: no node found in the value")
    return nodes


def url_problem(url: str) -> str | None:
    """Why ``url`` is not a ``redis://``, ``rediss://`` or ``unix://`` URL redis-py can use;
    ``None`` when it is one. The answer never quotes the URL (it can hold a password)."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
    except ValueError:
        return "it cannot be parsed"
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        return "the scheme must be redis, rediss or unix"
    if scheme == "unix":
        if not parts.path:
            return "a unix:// URL needs a socket path"
    else:
        hostport = parts.netloc.rpartition("@")[2]
        host, port_text = hostport, ""
        if hostport.startswith("["):
            host, _, rest = hostport.partition("]")
            host += "]"
            if rest and not rest.startswith(":"):
                return "text after the IPv6 address that is not ':port'"
            port_text = rest[1:]
        elif ":" in hostport:
            host, _, port_text = hostport.rpartition(":")
        problem = host_problem(host) if host else None
        if problem is not None:
            return f"bad host: {problem}"
        if port_text and parse_port(port_text) is None:
            return "the port must be 1-65535"
        db = parts.path.lstrip("/")
        if db and not re.fullmatch(r"[0-9]{1,9}", db, re.ASCII):
            return "the path must be a database number"
    _, names = redis_option_names(scheme)
    for key in query:
        if key not in names:
            return f"unknown query parameter {key!r}"
    return None


def comma_list(value: Any) -> Any:
    """Accept ``a,b,c`` or a JSON list for list-valued variables (REDIS_STAGES, ...)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"is not a valid JSON list ({err.msg})") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


# -- REDIS_ADDRESS_MAP: addresses the nodes announce -> addresses the client reaches ---------

#: ``(host, port)`` -> ``(host, port)``: the shape of redis-py's ``address_remap``.
Remap = Callable[[tuple[str, int]], tuple[str, int]]


def _canonical_host(host: str) -> str:
    """One spelling per host, so that an entry matches however Redis writes the address: DNS
    names in lower case (they are case-insensitive), IPv6 addresses compressed."""
    if ":" not in host:
        return host.lower()
    import ipaddress

    address, percent, zone = host.partition("%")
    try:
        return ipaddress.IPv6Address(address).compressed + percent + zone
    except ValueError:
        return host


def _map_side(text: str, where: str, side: str, entry: str) -> tuple[str, int | None]:
    """``(host, port or None)`` of one side of an address map entry."""
    problem = f"{where}: entry {entry}: the {side} address"
    text = text.strip()
    if not text:
        raise ConfigurationError(f"{problem} is empty")
    port_text: str | None = None
    if text.startswith("["):  # [ipv6] or [ipv6]:port
        inside, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigurationError(f"{problem} {text!r} has text after ']' that is not ':port'")
        host, port_text = f"[{inside}]", (rest[1:] if rest else None)
    else:
        host, colon, after = text.rpartition(":")
        host, port_text = (host, after) if colon else (text, None)
    reason = host_problem(host)
    if reason is not None:
        raise ConfigurationError(f"{problem} {text!r} has no valid host ({reason})")
    port = parse_port(port_text) if port_text is not None else None
    if port_text is not None and port is None:
        raise ConfigurationError(f"{problem} {text!r} has no valid port (1-65535)")
    return _canonical_host(host.strip("[]")), port


def _joined(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def _address_map_entries(value: object, where: str) -> list[tuple[object, object, str]]:
    """``(announced, reachable, the entry as an error shows it)`` for each entry."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:  # as pairs, not a dict: a key given twice must be seen
            pairs: list[tuple[Any, Any]] = json.loads(value, object_pairs_hook=list)
        except (ValueError, RecursionError) as err:
            raise ConfigurationError(f"{where}: not a valid JSON object ({err})") from None
        return [(key, target, f"{{{key!r}: {target!r}}}") for key, target in pairs]
    if isinstance(value, str):
        entries: list[tuple[object, object, str]] = []
        for item in (part.strip() for part in re.split(r"[,\n]", value)):  # newlines: a YAML block
            announced, equals, reachable = item.partition("=")
            if item and not equals:
                raise ConfigurationError(
                    f"{where}: entry {item!r} is not an 'announced=reachable' pair"
                )
            if item:
                entries.append((announced, reachable, repr(item)))
        return entries
    if isinstance(value, Mapping):
        return [(key, target, f"{{{key!r}: {target!r}}}") for key, target in value.items()]
    raise ConfigurationError(
        f"{where}: an address map is a JSON object, 'announced=reachable' pairs or a dict, "
        f"not {type(value).__name__}"
    )


def parse_address_map(value: object, *, where: str = "REDIS_ADDRESS_MAP") -> dict[str, str]:
    """Parse an address map into its normalised form, ``{"announced": "reachable"}``.

    ``value`` is a JSON object (``'{"10.0.0.5:6379": "127.0.0.1:7000"}'``), comma- or
    newline-separated ``announced=reachable`` pairs (``10.0.0.5:6379=127.0.0.1:7000``), a
    mapping, or ``None`` (no map). Each side is ``host`` or ``host:port`` (IPv6 in brackets).
    A host-only announced address maps that host on every port and keeps the port, so it cannot
    map to a ``host:port``; a ``host:port`` may map to a bare host (the port is kept). Hosts are
    normalised (DNS names in lower case, IPv6 compressed); an announced address given twice is
    an error. A bad entry raises :class:`ConfigurationError` naming ``where`` and the entry.
    """
    normalised: dict[str, str] = {}
    for announced, reachable, entry in _address_map_entries({} if value is None else value, where):
        if not isinstance(announced, str) or not isinstance(reachable, str):
            raise ConfigurationError(
                f"{where}: entry {entry}: each side is a 'host' or 'host:port' string"
            )
        host, port = _map_side(announced, where, "announced", entry)
        to_host, to_port = _map_side(reachable, where, "reachable", entry)
        if port is None and to_port is not None:
            raise ConfigurationError(
                f"{where}: entry {entry}: a host-only announced address keeps its port, so it "
                f"cannot map to a port; map each '{_joined(host, None)}:<port>' instead"
            )
        key = _joined(host, port)
        if key in normalised:
            raise ConfigurationError(f"{where}: entry {entry}: {key!r} is mapped twice")
        normalised[key] = _joined(to_host, to_port)
    return normalised


class AddressMap:
    """A normalised map (:func:`parse_address_map`) as redis-py's ``address_remap``: called with
    an announced ``(host, port)``, it returns the address to connect to. A ``host:port`` entry
    wins over a host-only one; an address without an entry comes back unchanged."""

    __slots__ = ("_by_address", "_by_host")

    def __init__(self, normalised: Mapping[str, str]) -> None:
        self._by_address: dict[tuple[str, int], tuple[str, int | None]] = {}
        self._by_host: dict[str, str] = {}
        for announced, reachable in parse_address_map(normalised, where="address_map").items():
            host, port = _map_side(announced, "address_map", "announced", announced)
            target = _map_side(reachable, "address_map", "reachable", reachable)
            if port is None:
                self._by_host[host] = target[0]
            else:
                self._by_address[(host, port)] = target

    def __call__(self, address: tuple[str, int]) -> tuple[str, int]:
        host, port = address[0], int(address[1])
        canonical = _canonical_host(host)
        target = self._by_address.get((canonical, port))
        if target is not None:
            return target[0], port if target[1] is None else target[1]
        return self._by_host.get(canonical, host), port

    def __bool__(self) -> bool:
        return bool(self._by_address or self._by_host)
