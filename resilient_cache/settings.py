"""Configuration: one pydantic-settings model, filled from keyword arguments, the environment,
``.env`` and a TOML file, in that order of precedence.

The core fields live on :class:`Settings`. Each pipeline stage brings its own section model
(``REDIS_RETRY__MAX_RETRIES`` fills ``retry.max_retries``); because stages come from plugins,
the full model is made per build by :func:`settings_model`, which adds one field per registered
stage. Every value is validated in one pass (what a value may be is in
:mod:`resilient_cache.config_values`), and every problem is one ConfigurationError naming the
setting the way the user wrote it: the environment variable, the TOML key and file, or the
keyword argument (see :func:`load_settings`).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)
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

from resilient_cache.config_values import (
    MAX_CONNECTIONS,
    MAX_INTERVAL,
    MAX_TIMEOUT,
    MIN_HEALTH_CHECK_INTERVAL,
    MIN_TIMEOUT,
    check_redis_options,
    comma_list,
    parse_address_map,
    url_problem,
)
from resilient_cache.config_values import ClusterNode as ClusterNode
from resilient_cache.config_values import parse_cluster_nodes as parse_cluster_nodes
from resilient_cache.errors import ConfigurationError
from resilient_cache.settings_sources import ENV_PREFIX, NumberedNodesSource, is_file

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


class Settings(BaseSettings):
    """The core settings. Each field is read from ``REDIS_<FIELD>``; see docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
        allow_inf_nan=False,
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
        default=5.0,
        ge=MIN_TIMEOUT,
        le=MAX_TIMEOUT,
        description="Seconds a read or write on a socket may take.",
    )
    socket_connect_timeout: float | None = Field(
        default=5.0,
        ge=MIN_TIMEOUT,
        le=MAX_TIMEOUT,
        description="Seconds a TCP connect may take.",
    )
    max_connections: int = Field(
        default=100, ge=1, le=MAX_CONNECTIONS, description="Connections per node pool."
    )
    client_name: str | None = Field(
        default=None,
        pattern=r"^[!-~]*$",
        max_length=256,
        description="CLIENT SETNAME on connect (printable ASCII, no spaces).",
    )
    decode_responses: bool = Field(
        default=False, description="Return str instead of bytes (redis-py's decode_responses)."
    )
    redis_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword options for the redis-py client (JSON in the environment).",
    )
    address_map: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Addresses the cluster's nodes announce -> addresses the client reaches "
        "them at: 'announced=reachable,...' or a JSON object; each side 'host' or 'host:port'.",
    )
    auto_pipeline: bool = Field(
        default=False,
        description="Write commands that concurrent callers send to one node in the same "
        "turn of the event loop together, on one connection (cluster backend).",
    )
    stages: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_STAGES),
        description="Pipeline stages, outermost first (comma list or JSON list).",
    )
    health_check_interval: float = Field(
        default=30.0,
        ge=0,
        le=MAX_INTERVAL,
        description="Seconds between health probes (0, or at least "
        f"{MIN_HEALTH_CHECK_INTERVAL:g}); 0 turns the monitor off.",
    )
    health_check_timeout: float = Field(
        default=5.0,
        ge=MIN_TIMEOUT,
        le=MAX_TIMEOUT,
        description="Seconds one node's health probe may take.",
    )
    drain_timeout: float = Field(
        default=5.0,
        ge=0,
        le=MAX_TIMEOUT,
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
        return comma_list(value)

    @field_validator("stages")
    @classmethod
    def _unique_stages(cls, value: list[str]) -> list[str]:
        seen = set()
        for name in value:
            if name in seen:
                raise ValueError(f"stage {name!r} is listed twice")
            seen.add(name)
        return value

    @staticmethod
    def _backend_of(info: ValidationInfo) -> str:
        """The backend :meth:`resolved_backend` will give, while the fields are validated."""
        backend, url = info.data.get("backend", "auto"), info.data.get("url")
        if backend == "auto":
            nodes = info.data.get("cluster_nodes")
            backend = "standalone" if url is not None and not nodes else "cluster"
        return str(backend)

    @field_validator("redis_options")
    @classmethod
    def _check_redis_options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Checked against the client the backend will make: its fields come before this one.
        backend, url = cls._backend_of(info), info.data.get("url")
        if backend == "standalone" and url is not None:  # Redis.from_url(): the scheme decides
            backend = url.get_secret_value().partition("://")[0].lower()
        return check_redis_options(value, backend)

    @field_validator("address_map", mode="before")
    @classmethod
    def _parse_address_map(cls, value: Any) -> Any:
        try:
            return parse_address_map(value, where="")
        except ConfigurationError as err:
            # load_settings() puts the variable name in front of the message.
            raise ValueError(str(err).removeprefix(": ")) from None

    @field_validator("address_map")
    @classmethod
    def _address_map_applies(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        # Its fields come before this one. A single Redis tells the client no other address
        # (no slot map, no redirect): a map there would silently do nothing.
        if value and cls._backend_of(info) == "standalone":
            raise ValueError(
                "the standalone backend connects only to REDIS_URL (or the first node) and "
                "learns no other address; put the reachable address there instead"
            )
        if value and info.data.get("redis_options", {}).get("address_remap") is not None:
            raise ValueError(
                "cannot be used together with redis_options 'address_remap' (both remap the "
                "addresses the nodes announce); keep one"
            )
        return value

    @field_validator("health_check_interval")
    @classmethod
    def _not_a_busy_loop(cls, value: float) -> float:
        if 0 < value < MIN_HEALTH_CHECK_INTERVAL:
            raise ValueError(
                f"must be 0 (off) or at least {MIN_HEALTH_CHECK_INTERVAL:g} seconds; a "
                "shorter interval probes every node continuously"
            )
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr | None) -> SecretStr | None:
        # Never echo the URL: it can hold a password.
        problem = url_problem(value.get_secret_value()) if value is not None else None
        if problem is not None:
            raise ValueError(f"not a valid redis://, rediss:// or unix:// URL ({problem})")
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


def _named_sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource | None = None
) -> list[tuple[str, PydanticBaseSettingsSource]]:
    """The sources in precedence order (first wins), each with the name ``config`` reports."""
    sources: list[tuple[str, PydanticBaseSettingsSource]] = []
    if init_settings is not None:
        sources.append(("keyword argument", init_settings))
    sources.append(("environment", EnvSettingsSource(settings_cls)))
    env_file = settings_cls.model_config.get("env_file")
    if isinstance(env_file, str) and is_file(Path(env_file)):  # nothing to read otherwise
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
    if not is_file(path):
        return False
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]
    try:
        data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigurationError(_one_line(f"{path}: not valid TOML ({err})")) from None
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
        where = "config_file" if explicit is not None else f"{ENV_PREFIX}CONFIG_FILE"
        if not is_file(path):
            raise ConfigurationError(f"{where}: file {str(path)!r} does not exist")
        try:
            _has_table(path, ())
        except ConfigurationError as err:  # name the setting that chose the file too
            raise ConfigurationError(f"{where}: {err}") from None
        return path
    path = Path(DEFAULT_CONFIG_FILE)
    if not is_file(path):
        return None
    _has_table(path, ())  # a file that is not valid TOML is reported with its name here
    return path


def settings_model(
    stage_models: Mapping[str, type[BaseModel]], config_file: Path | None = None
) -> type[Settings]:
    """The Settings class of one build: the core fields plus one section per registered stage.

    Made once per set of stage models and file (making a pydantic model costs milliseconds,
    most of a build's time), then reused."""
    return _settings_model(tuple(stage_models.items()), config_file)


@functools.lru_cache(maxsize=64)
def _settings_model(
    stage_models: tuple[tuple[str, type[BaseModel]], ...], config_file: Path | None
) -> type[Settings]:
    fields: dict[str, Any] = {
        name: (model, Field(default_factory=model)) for name, model in stage_models
    }
    model: type[Settings] = create_model("ResolvedSettings", __base__=Settings, **fields)
    model.config_file = config_file
    return model


def _dotted(location: Sequence[str | int]) -> str:
    """``("memory", "key_prefixes", 0)`` -> ``memory.key_prefixes[0]``; a key that is not a
    plain name is quoted, so that the message stays on one line."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part, re.ASCII):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def _raw_variables(source_name: str, model: type[Settings]) -> dict[str, str]:
    """The variables of the environment or of ``.env``, by upper-case name."""
    if source_name == "environment":
        return {name.upper(): value for name, value in os.environ.items()}
    env_file = model.model_config.get("env_file")
    if source_name == ".env" and isinstance(env_file, str) and is_file(Path(env_file)):
        values = dotenv_values(env_file)
        return {name.upper(): value for name, value in values.items() if value is not None}
    return {}


def _section_names(model: type[Settings]) -> set[str]:
    return {
        name
        for name, field in model.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }


def _env_name(location: Sequence[str | int], model: type[Settings], source_name: str) -> str:
    """The variable that set ``location`` in the environment (or ``.env``)."""
    if not location:
        return "settings"
    field = str(location[0])
    top = f"{ENV_PREFIX}{field.upper()}"
    rest = list(location[1:])
    if field == "redis_options" and rest:
        nested = f"{top}__{str(rest[0]).upper()}"
        if nested in _raw_variables(source_name, model):
            return nested
        tail = _dotted(rest)
        return top + (tail if tail.startswith("[") else f".{tail}")
    if field not in _section_names(model):
        return top
    variables = _raw_variables(source_name, model)
    dotted = _dotted(location)
    if rest and isinstance(rest[0], str):
        nested = f"{top}__{rest[0].upper()}"
        if nested in variables or top not in variables:
            return f"{nested} / {dotted}"
        return f"{top} / {dotted}"
    # A check across the fields of a section: name every variable of the section that is set.
    named = sorted(name for name in variables if name.startswith(f"{top}__"))
    if top in variables:
        named.insert(0, top)
    return ", ".join(named) if named else top


SourceData = list[tuple[str, Any]]


def _source_data(model: type[Settings], overrides: Mapping[str, Any]) -> SourceData:
    """What each source gives, in precedence order, named as :func:`describe_sources` does."""
    init = InitSettingsSource(model, init_kwargs=dict(overrides))
    data: SourceData = []
    for source_name, source in _named_sources(model, init):
        try:
            data.append((source_name, source()))
        except Exception:  # the error being named may be this source's own
            continue
    return data


def _source_of(data: SourceData, location: Sequence[str | int]) -> str | None:
    """The source that gave ``location``: the one whose data goes deepest along it, the first
    in precedence order on a tie."""
    best: tuple[int, str | None] = (0, None)
    for source_name, node in data:
        depth = 0
        for part in location:
            in_mapping = isinstance(node, Mapping) and part in node
            in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
            if not (in_mapping or in_list):
                break
            node = node[part]
            depth += 1
        if depth > best[0]:
            best = (depth, source_name)
    return best[1]


def setting_name(
    model: type[Settings],
    overrides: Mapping[str, Any],
    location: Sequence[str | int],
    data: SourceData | None = None,
) -> str:
    """How an error message names the setting at ``location``: by the environment variable
    when the value came from the environment or ``.env``, by the TOML key and the file when it
    came from a file, and as a keyword argument when it was passed in code. ``data`` is
    :func:`_source_data`, when the caller has it already."""
    if data is None:
        data = _source_data(model, overrides)
    source = _source_of(data, location)
    if source == "keyword argument":
        return f"{_dotted(location)} (keyword argument)"
    if source == "pyproject.toml [tool.resilient_cache]":
        return f"{_dotted([*PYPROJECT_TABLE, *location])} in pyproject.toml"
    if source is not None and source not in ("environment", ".env", "REDIS_NODE_<n>_*"):
        return f"{_dotted(location)} in {source}"
    return _env_name(location, model, source or "environment")


def _undecodable_variable(model: type[Settings], field: str) -> str:
    """The variable pydantic-settings could not decode as JSON for ``field``: a list or dict
    field inside a section (``REDIS_MEMORY__KEY_PREFIXES=a,b``), else the field's own."""
    import json

    top = f"{ENV_PREFIX}{field.upper()}"
    section = model.model_fields.get(field)
    for source_name in ("environment", ".env"):
        variables = _raw_variables(source_name, model)
        if section is not None and field in _section_names(model):
            for name, value in sorted(variables.items()):
                if name.startswith(f"{top}__") and value:
                    try:
                        json.loads(value)
                    except ValueError:
                        sub = name[len(top) + 2 :].lower()
                        return f"{name} / {field}.{sub}"
        if top in variables:
            return top
    return top


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def load_settings(model: type[Settings], overrides: Mapping[str, Any]) -> Settings:
    """Instantiate ``model``; turn every error into one ConfigurationError naming each setting
    (see :func:`setting_name`), without ever echoing the value (it may be a secret)."""
    try:
        return model(**overrides)
    except ConfigurationError:
        raise
    except SettingsError as err:
        # pydantic-settings could not decode a value (a section given as one variable, a list
        # that is not JSON): its message names the field, never the value.
        field = re.search(r'field "([^"]+)"', str(err))
        name = _undecodable_variable(model, field[1]) if field else "settings"
        raise ConfigurationError(
            f"{name}: could not parse the value (sections take REDIS_<SECTION>__<FIELD> "
            "variables; list and dict values take JSON)"
        ) from None
    except ValidationError as err:
        problems = []
        data = _source_data(model, overrides)
        for error in err.errors(include_input=False, include_url=False):
            location: list[str | int] = list(error["loc"])
            context = error.get("ctx") or {}
            if error["type"] == "redis_option":
                location.append(str(context["option"]))
            message = str(error["msg"]).removeprefix("Value error, ")
            name = setting_name(model, overrides, location, data)
            problems.append(_one_line(f"{name}: {message}"))
        summary = problems[0] if len(problems) == 1 else "; ".join(problems)
        raise ConfigurationError(summary, problems) from None
    except (ValueError, TypeError, ArithmeticError, OSError) as err:
        # Not expected: every validator reports through pydantic. Still one line, never a
        # traceback, and never the value (the exception's text may quote it).
        raise ConfigurationError(
            f"settings: could not be loaded ({type(err).__name__} while reading the "
            "environment, .env and the TOML files)"
        ) from None


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
        if isinstance(value, Mapping) and value and key not in ("redis_options", "address_map"):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted
