"""Configuration: one pydantic-settings model, filled from keyword arguments, the environment,
``.env`` and a TOML file, in that order of precedence.

The core fields live on :class:`Settings`. Each pipeline stage brings its own section model
(``REDIS_RETRY__MAX_RETRIES`` fills ``retry.max_retries``); because stages come from plugins,
the full model is made per build by :func:`settings_model`, which adds one field per registered
stage. Every value is validated in one pass, and every problem is reported by the name the user
typed: the environment variable and the dotted TOML key.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, Field, SecretStr, ValidationError, create_model, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from resilient_cache.errors import ConfigurationError

ENV_PREFIX = "REDIS_"
DEFAULT_CONFIG_FILE = "resilient_cache.toml"
PYPROJECT_TABLE = ("tool", "resilient_cache")

#: The default pipeline, outermost first. Why this order is explained in docs/stages.md.
DEFAULT_STAGES: tuple[str, ...] = (
    "tracing",
    "metrics",
    "memory",
    "timeout",
    "retry",
    "routing",
    "breaker",
)

# redis-py options that would add a second, hidden retry layer under the retry stage, or that the
# client sets itself. Passing them through ``redis_options`` is refused with the reason.
_RESERVED_REDIS_OPTIONS = {
    "retry": "retries are the retry stage's job (REDIS_RETRY__*)",
    "retry_on_error": "retries are the retry stage's job (REDIS_RETRY__*)",
    "retry_on_timeout": "retries are the retry stage's job (REDIS_RETRY__*)",
    "cluster_error_retry_attempts": "retries are the retry stage's job (REDIS_RETRY__*)",
    "startup_nodes": "set the nodes with REDIS_CLUSTER_NODES or create_redis_cluster(nodes)",
    "password": "use REDIS_PASSWORD",
    "username": "use REDIS_USERNAME",
}


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """A node address as configured: ``host`` and ``port``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _parse_port(text: str, where: str, item: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigurationError(f"{where}: {item!r} has no valid port")
    return int(text)


def parse_cluster_nodes(
    text: str | Sequence[str | ClusterNode | tuple[str, int]],
    *,
    where: str = "REDIS_CLUSTER_NODES",
    default_port: int = 6379,
) -> list[ClusterNode]:
    """Parse ``"h1:6379,h2:6379"`` (or a list of such items) into :class:`ClusterNode` objects.

    Items are separated by commas or white space; a missing port means ``default_port``; an IPv6
    host is written in brackets (``[::1]:7000``). A bad item raises :class:`ConfigurationError`
    naming ``where`` and the item, e.g. ``REDIS_CLUSTER_NODES: 'redis-1:abc' has no valid port``.
    """
    items: list[Any] = re.split(r"[,\s]+", text) if isinstance(text, str) else list(text)
    nodes: list[ClusterNode] = []
    for item in items:
        if isinstance(item, ClusterNode):
            nodes.append(item)
            continue
        if isinstance(item, tuple):
            host, port = item
            nodes.append(ClusterNode(str(host), _parse_port(str(port), where, f"{host}:{port}")))
            continue
        item = str(item).strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, sep, rest = item[1:].partition("]")
            if not sep:
                raise ConfigurationError(f"{where}: {item!r} has an unclosed '['")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        if not host or ("[" not in item and not _HOST_RE.match(host)):
            raise ConfigurationError(f"{where}: {item!r} has no valid host")
        port = _parse_port(port_text, where, item) if port_text else default_port
        nodes.append(ClusterNode(host, port))
    if not nodes and isinstance(text, str) and text.strip():
        raise ConfigurationError(f"{where}: no node found in the value")
    return nodes


def _comma_list(value: Any) -> Any:
    """Accept ``a,b,c`` or a JSON list for list-valued variables (REDIS_STAGES, ...)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"is not a valid JSON list ({err.msg})") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """The core settings. Each field is read from ``REDIS_<FIELD>``; see docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    # Where the TOML file is; set on the per-build subclass, see settings_model().
    config_file: ClassVar[Path | None] = None

    cluster_nodes: Annotated[list[ClusterNode], NoDecode] = Field(
        default_factory=list,
        description="Cluster seed nodes, 'host:port,host:port'. Also REDIS_NODE_<n>_HOST/PORT.",
    )
    url: SecretStr | None = Field(
        default=None, description="redis:// URL of a single (non-cluster) Redis; a secret."
    )
    backend: str = Field(
        default="auto",
        description="Backend name: 'cluster', 'standalone', or 'auto' (standalone if only "
        "REDIS_URL is set, cluster otherwise).",
    )
    username: str | None = Field(default=None, description="ACL user name.")
    password: SecretStr | None = Field(default=None, description="Password; never shown.")
    ssl: bool = Field(default=False, description="Connect with TLS.")
    ssl_ca_certs: str | None = Field(default=None, description="CA bundle path for TLS.")
    ssl_certfile: str | None = Field(default=None, description="Client certificate path.")
    ssl_keyfile: str | None = Field(default=None, description="Client key path.")
    ssl_cert_reqs: Literal["required", "optional", "none"] = Field(
        default="required", description="Server certificate check."
    )
    ssl_check_hostname: bool = Field(default=True, description="Check the server host name.")
    socket_timeout: float | None = Field(
        default=5.0, gt=0, description="Seconds a read or write on a socket may take."
    )
    socket_connect_timeout: float | None = Field(
        default=5.0, gt=0, description="Seconds a TCP connect may take."
    )
    max_connections: int = Field(default=100, ge=1, description="Connections per node pool.")
    client_name: str | None = Field(default=None, description="CLIENT SETNAME on connect.")
    decode_responses: bool = Field(
        default=False, description="Return str instead of bytes (redis-py's decode_responses)."
    )
    redis_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword options for the redis-py client (JSON in the environment).",
    )
    stages: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_STAGES),
        description="Pipeline stages, outermost first (comma list or JSON list).",
    )
    health_check_interval: float = Field(
        default=30.0, ge=0, description="Seconds between health probes; 0 turns the monitor off."
    )
    health_check_timeout: float = Field(
        default=5.0, gt=0, description="Seconds one node's health probe may take."
    )
    drain_timeout: float = Field(
        default=5.0,
        ge=0,
        description="Seconds disconnect() waits for commands in flight before closing.",
    )
    plugins_autoload: bool = Field(
        default=True, description="Load plugins from the 'resilient_cache' entry-point group."
    )
    plugins_blocked: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Plugin names not to load (comma list)."
    )

    @field_validator("cluster_nodes", mode="before")
    @classmethod
    def _parse_nodes(cls, value: Any) -> Any:
        if isinstance(value, str | list | tuple):
            try:
                return parse_cluster_nodes(value, where="")
            except ConfigurationError as err:
                # load_settings() puts the variable name in front of the message.
                raise ValueError(str(err).removeprefix(": ")) from None
        return value

    @field_validator("stages", "plugins_blocked", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("stages")
    @classmethod
    def _unique_stages(cls, value: list[str]) -> list[str]:
        seen = set()
        for name in value:
            if name in seen:
                raise ValueError(f"stage {name!r} is listed twice")
            seen.add(name)
        return value

    @field_validator("redis_options")
    @classmethod
    def _no_reserved_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in _RESERVED_REDIS_OPTIONS:
                raise ValueError(f"{key!r} cannot be set here: {_RESERVED_REDIS_OPTIONS[key]}")
        return value

    def stage_settings(self, name: str) -> BaseModel:
        """The validated section of stage ``name``."""
        section = getattr(self, name, None)
        if not isinstance(section, BaseModel):
            raise KeyError(name)
        return section

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "standalone" if self.url is not None and not self.cluster_nodes else "cluster"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return tuple(source for _, source in _named_sources(settings_cls, init_settings))


class NumberedNodesSource(PydanticBaseSettingsSource):
    """Reads ``REDIS_NODE_<n>_HOST`` / ``REDIS_NODE_<n>_PORT`` pairs into ``cluster_nodes``.

    Looks at the environment first, then ``.env``; nodes are ordered by ``n``.
    """

    _PATTERN = re.compile(rf"^{ENV_PREFIX}NODE_(\d+)_(HOST|PORT)$", re.IGNORECASE)

    def __init__(self, settings_cls: type[BaseSettings], env_file: str | None = ".env") -> None:
        super().__init__(settings_cls)
        self._env_file = env_file

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole result

    def __call__(self) -> dict[str, Any]:
        variables: dict[str, str] = {}
        if self._env_file and Path(self._env_file).is_file():
            variables.update({k: v for k, v in dotenv_values(self._env_file).items() if v})
        variables.update(os.environ)
        found: dict[int, dict[str, str]] = {}
        for name, value in variables.items():
            match = self._PATTERN.match(name)
            if match:
                found.setdefault(int(match[1]), {})[match[2].upper()] = value
        nodes = []
        for n in sorted(found):
            parts = found[n]
            if "HOST" not in parts:
                # Not ours: Kubernetes injects REDIS_NODE_1_PORT=tcp://... for a Service named
                # redis-node-1. Only a HOST variable says the user meant this scheme.
                continue
            port = parts.get("PORT", "6379")
            if "://" in port:  # a Kubernetes service link, not a port number
                port = port.rpartition(":")[2]
            nodes.append(
                ClusterNode(
                    parts["HOST"],
                    _parse_port(port, f"{ENV_PREFIX}NODE_{n}_PORT", f"{parts['HOST']}:{port}"),
                )
            )
        return {"cluster_nodes": nodes} if nodes else {}


def _named_sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource | None = None
) -> list[tuple[str, PydanticBaseSettingsSource]]:
    """The sources in precedence order (first wins), each with the name ``config`` reports."""
    sources: list[tuple[str, PydanticBaseSettingsSource]] = []
    if init_settings is not None:
        sources.append(("keyword argument", init_settings))
    sources.append(("environment", EnvSettingsSource(settings_cls)))
    sources.append((".env", DotEnvSettingsSource(settings_cls)))
    sources.append(("REDIS_NODE_<n>_*", NumberedNodesSource(settings_cls)))
    config_file = getattr(settings_cls, "config_file", None)
    if config_file is not None:
        sources.append(
            (str(config_file), TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        )
    pyproject = Path("pyproject.toml")
    if _has_table(pyproject, PYPROJECT_TABLE):
        sources.append(
            (
                "pyproject.toml [tool.resilient_cache]",
                TomlConfigSettingsSource(
                    settings_cls, toml_file=pyproject, toml_table_header=PYPROJECT_TABLE
                ),
            )
        )
    return sources


def _has_table(path: Path, table: tuple[str, ...]) -> bool:
    """Whether the TOML file at ``path`` exists and has ``[table]`` (pyproject.toml usually
    belongs to the application, and has no section of ours)."""
    if not path.is_file():
        return False
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]
    try:
        data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigurationError(f"{path}: not valid TOML ({err})") from None
    for part in table:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The TOML file to read: ``explicit``, else ``REDIS_CONFIG_FILE``, else
    ``./resilient_cache.toml`` when it exists. A named file that does not exist is an error."""
    named = explicit if explicit is not None else os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
    if named:
        path = Path(named)
        if not path.is_file():
            where = "config_file" if explicit is not None else f"{ENV_PREFIX}CONFIG_FILE"
            raise ConfigurationError(f"{where}: file {str(path)!r} does not exist")
    else:
        path = Path(DEFAULT_CONFIG_FILE)
        if not path.is_file():
            return None
    _has_table(path, ())  # a file that is not valid TOML is reported with its name here
    return path


def settings_model(
    stage_models: Mapping[str, type[BaseModel]], config_file: Path | None = None
) -> type[Settings]:
    """The Settings class of one build: the core fields plus one section per registered stage."""
    fields: dict[str, Any] = {
        name: (model, Field(default_factory=model)) for name, model in stage_models.items()
    }
    model: type[Settings] = create_model("ResolvedSettings", __base__=Settings, **fields)
    model.config_file = config_file
    return model


def variable_name(location: Sequence[str | int]) -> str:
    """``("retry", "max_retries")`` -> ``REDIS_RETRY__MAX_RETRIES / retry.max_retries``."""
    parts = [str(p) for p in location]
    env = ENV_PREFIX + "__".join(p.upper() for p in parts if not p.isdigit())
    dotted = ".".join(parts)
    return env if "." not in dotted else f"{env} / {dotted}"


def load_settings(model: type[Settings], overrides: Mapping[str, Any]) -> Settings:
    """Instantiate ``model``; turn validation errors into one ConfigurationError naming each
    variable, without ever echoing the value (it may be a secret)."""
    try:
        return model(**overrides)
    except ConfigurationError:
        raise
    except SettingsError as err:
        # pydantic-settings could not decode a value (a section given as one variable, a list
        # that is not JSON): its message names the field, never the value.
        field = re.search(r'field "([^"]+)"', str(err))
        name = f"{ENV_PREFIX}{field[1].upper()}" if field else "settings"
        raise ConfigurationError(
            f"{name}: could not parse the value (sections take REDIS_<SECTION>__<FIELD> "
            "variables; list values take a JSON list)"
        ) from None
    except ValidationError as err:
        problems = []
        for error in err.errors(include_input=False, include_url=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{variable_name(error['loc'])}: {message}")
        summary = problems[0] if len(problems) == 1 else "; ".join(problems)
        raise ConfigurationError(summary, problems) from None


def describe_sources(
    model: type[Settings], overrides: Mapping[str, Any]
) -> Iterator[tuple[str, str]]:
    """For ``resilient-cache config``: ``(dotted key, where it came from)`` for each set value."""
    init = InitSettingsSource(model, init_kwargs=dict(overrides))
    origin: dict[str, str] = {}
    for source_name, source in reversed(_named_sources(model, init)):
        for key in _flatten(source()):
            origin[key] = source_name
    yield from sorted(origin.items())


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key != "redis_options":
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted
