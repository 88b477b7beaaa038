"""The registries plugins fill, and the context a stage factory gets: a leaf module.

:class:`StageRegistry` and :class:`BackendRegistry` are handed to the registration hooks
(:mod:`resilient_cache.hookspecs`); :class:`BuildContext` is handed to every stage and backend
factory by :func:`resilient_cache.build.build_pipeline`. Nothing here imports another module of
the package at run time except the error classes, so every other module may import this one.
"""

from __future__ import annotations

import argparse
import keyword
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from resilient_cache.errors import PluginError

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from resilient_cache.backends import Backend
    from resilient_cache.circuit import BreakerBoard
    from resilient_cache.pipeline import Stage
    from resilient_cache.settings import Settings
    from resilient_cache.telemetry import CommandStats


@dataclass
class BuildContext:
    """What a stage factory gets besides its own settings section.

    Read-only facts of the build:
        settings: the whole validated configuration of this build. A stage reads its *own*
            section from the ``settings`` argument of its factory, never another stage's.
        backend: the backend the pipeline ends in (routing asks it for the slot map). Its
            capabilities (``routes_per_node``, ...) say what it can do; never compare names.
        clock: monotonic time in seconds; tests pass a fake one.
        sleep: ``async`` sleep; tests pass one that advances the fake clock.
        tracer_provider / meter_provider: where telemetry goes (the global ones by default).
        stats: the in-process command counters behind ``get_metrics()``; ``stats.instruments``
            holds this client's OpenTelemetry instruments, or ``None`` when none are exported.
        breakers: the circuit breakers behind ``is_circuit_breaker_open()`` (and the queries
            other stages need about them, such as ``awaiting_failover``).

    Facts stages publish for their peers while the pipeline is built. Factories run outer
    stage first, but a stage must not depend on that order: read these when a command runs
    (on the paths that need them), not in the factory.
        served_locally: names of commands a stage may answer without Redis (the memory tier
            adds its cacheable reads). Tracing then names no node for them before they ran.
        traced: True when a stage opens a span per command (the tracing stage sets it); the
            retry and breaker stages add span events only then.
        tier: an in-process tier whose ``hits``/``misses``/``evictions`` the client reports as
            ``resilient_cache.memory.*`` metrics (the memory stage sets itself).
    """

    settings: Settings
    backend: Backend
    clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    stats: CommandStats
    breakers: BreakerBoard
    served_locally: set[str] = field(default_factory=set)
    traced: bool = False
    tier: Any = None


_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_COMMAND_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


StageFactory = Callable[[Any, BuildContext], "Stage | None"]
"""``factory(section_settings, context)`` -> a stage, or ``None`` when it has nothing to do."""
BackendFactory = Callable[["Settings", BuildContext], "Backend"]
"""``factory(settings, context)`` -> a backend. It runs before any stage factory, while
``context.backend`` is not there yet (reading it raises)."""


class _NoBackendYet:
    """``BuildContext.backend`` while the backend itself is being made."""

    def __getattr__(self, name: str) -> Any:
        raise PluginError("a backend factory cannot use context.backend: it is making it")


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its name, settings model, factory and the plugin that gave it."""

    name: str
    settings_model: type[BaseModel]
    factory: StageFactory
    plugin: str
    description: str = ""


class _Registry:
    def __init__(self) -> None:
        self.current_plugin = "<unknown>"

    def _check_name(self, kind: str, name: str, taken: Iterable[str]) -> None:
        if not isinstance(name, str) or not _STAGE_NAME.match(name) or keyword.iskeyword(name):
            raise PluginError(
                f"plugin {self.current_plugin!r} registered {kind} {name!r}: a name must be a "
                "lower-case identifier such as 'slowlog'"
            )
        if name in taken:
            raise PluginError(
                f"plugin {self.current_plugin!r} registered {kind} {name!r}, which is already "
                "registered; block one of the two plugins with REDIS_PLUGINS_BLOCKED"
            )


class StageRegistry(_Registry):
    """Handed to ``resilient_cache_register_stages``; collects :class:`StageSpec` objects."""

    def __init__(self) -> None:
        super().__init__()
        self.specs: dict[str, StageSpec] = {}

    def add(
        self,
        name: str,
        settings_model: type[BaseModel],
        factory: StageFactory,
        *,
        description: str = "",
    ) -> None:
        """Register stage ``name``; see the hook's documentation for the arguments."""
        from resilient_cache.settings import Settings

        if name in Settings.model_fields:
            raise PluginError(
                f"plugin {self.current_plugin!r} registered stage {name!r}, which is the name "
                "of a core setting; choose another name"
            )
        self._check_name("stage", name, self.specs)
        if not (isinstance(settings_model, type) and issubclass(settings_model, BaseModel)):
            raise PluginError(
                f"plugin {self.current_plugin!r} registered stage {name!r} with a settings "
                "model that is not a pydantic BaseModel subclass"
            )
        try:
            settings_model()
        except ValidationError as err:
            raise PluginError(
                f"plugin {self.current_plugin!r} registered stage {name!r} whose settings "
                f"model has fields without defaults: {err.error_count()} error(s)"
            ) from None
        if not callable(factory):
            raise PluginError(
                f"plugin {self.current_plugin!r} registered stage {name!r} with a factory "
                "that is not callable"
            )
        self.specs[name] = StageSpec(
            name, settings_model, factory, self.current_plugin, description
        )


class BackendRegistry(_Registry):
    """Handed to ``resilient_cache_register_backends``; collects backend factories by name."""

    def __init__(self) -> None:
        super().__init__()
        self.factories: dict[str, tuple[BackendFactory, str]] = {}

    def add(self, name: str, factory: BackendFactory) -> None:
        """Register backend ``name``; ``factory(settings, context)`` returns a Backend."""
        self._check_name("backend", name, self.factories)
        self.factories[name] = (factory, self.current_plugin)


CommandConfigure = Callable[[argparse.ArgumentParser], None]
"""``configure(parser)``: adds a plugin command's arguments to its parser."""
CommandRun = Callable[[argparse.Namespace], int]
"""``run(args)`` -> the exit status of a plugin command."""


@dataclass(frozen=True)
class CommandSpec:
    """A command-line subcommand registered by a plugin."""

    name: str
    configure: CommandConfigure
    run: CommandRun
    plugin: str
    help: str = ""


class CommandRegistry(_Registry):
    """Handed to ``resilient_cache_register_commands``; collects command-line subcommands."""

    def __init__(self, builtin: Iterable[str] = ()) -> None:
        super().__init__()
        self._builtin = frozenset(builtin)
        self.specs: dict[str, CommandSpec] = {}

    def add(
        self, name: str, configure: CommandConfigure, run: CommandRun, *, help: str = ""
    ) -> None:
        """Register subcommand ``name``; see the hook's documentation for the arguments."""
        if not isinstance(name, str) or not _COMMAND_NAME.match(name):
            raise PluginError(
                f"plugin {self.current_plugin!r} registered command {name!r}: a name must be "
                "lower case, letters, digits and '-', such as 'migrate'"
            )
        if name in self._builtin:
            raise PluginError(
                f"plugin {self.current_plugin!r} registered command {name!r}, which is a "
                "built-in command of resilient-cache; choose another name"
            )
        if name in self.specs:
            raise PluginError(
                f"plugin {self.current_plugin!r} registered command {name!r}, which plugin "
                f"{self.specs[name].plugin!r} registered already"
            )
        if not callable(configure) or not callable(run):
            raise PluginError(
                f"plugin {self.current_plugin!r} registered command {name!r} with a configure "
                "or run that is not callable"
            )
        self.specs[name] = CommandSpec(name, configure, run, self.current_plugin, help)
