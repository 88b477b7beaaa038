"""Plugin loading and the registries plugins fill.

A :class:`pluggy.PluginManager` is made per client build, never shared: the built-in stage and
backend modules are registered first, exactly like third-party plugins, then the entry points of
group ``resilient_cache`` (unless autoload is off), then the plugin objects the caller passed.
Blocked names are skipped. Every failure names the plugin at fault.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import keyword
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ValidationError

from resilient_cache import hookspecs
from resilient_cache.errors import PluginError

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from resilient_cache.backends import Backend
    from resilient_cache.circuit import BreakerBoard
    from resilient_cache.pipeline import Stage
    from resilient_cache.settings import Settings
    from resilient_cache.telemetry import CommandStats

logger = logging.getLogger("resilient_cache.plugins")

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME

#: Built-in plugins, registered through the same hooks as third-party ones.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "resilient_cache.stages.tracing",
    "resilient_cache.stages.metrics",
    "resilient_cache.stages.memory",
    "resilient_cache.stages.timeout",
    "resilient_cache.stages.retry",
    "resilient_cache.stages.routing",
    "resilient_cache.stages.breaker",
    "resilient_cache.backends.redis_py",
)

_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class BuildContext:
    """What a stage factory gets besides its own settings section.

    Attributes:
        settings: the whole validated configuration of this build.
        backend: the backend the pipeline ends in (routing asks it for the slot map).
        clock: monotonic time in seconds; tests pass a fake one.
        sleep: ``async`` sleep; tests pass one that advances the fake clock.
        tracer_provider / meter_provider: where telemetry goes (the global ones by default).
        stats: the in-process command counters behind ``get_metrics()``.
        breakers: the circuit breakers behind ``is_circuit_breaker_open()``.
    """

    settings: Settings
    backend: Backend
    clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    stats: CommandStats
    breakers: BreakerBoard


StageFactory = Callable[[Any, BuildContext], "Stage | None"]
BackendFactory = Callable[["Settings", BuildContext | None], "Backend"]


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


def make_plugin_manager(
    *,
    plugins: Sequence[object] = (),
    autoload: bool = True,
    blocked: Iterable[str] = (),
) -> pluggy.PluginManager:
    """A fresh PluginManager with the built-ins, entry points (if ``autoload``) and ``plugins``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    for module_name in BUILTIN_PLUGINS:
        if not pm.is_blocked(module_name):
            _register(pm, importlib.import_module(module_name), module_name)
    if autoload:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as err:
                dist = ep.dist.name if ep.dist is not None else "unknown distribution"
                raise PluginError(
                    f"plugin {ep.name!r} (entry point {ep.value!r} from {dist}) failed to "
                    f"load: {type(err).__name__}: {err}"
                ) from err
            _register(pm, plugin, ep.name)
            logger.debug("loaded plugin %r from entry point %r", ep.name, ep.value)
    for plugin in plugins:
        name = _plugin_name(plugin)
        if pm.has_plugin(name):
            name = f"{name}#{id(plugin):x}"
        if not pm.is_blocked(name):
            _register(pm, plugin, name)
    return pm


def _plugin_name(plugin: object) -> str:
    """A readable name for a plugin passed as an object: a module's name, or the class path."""
    module_name = getattr(plugin, "__name__", None)
    if isinstance(module_name, str):
        return module_name
    cls = type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as err:
        raise PluginError(f"plugin {name!r} is invalid: {err}") from err


def _call_each(pm: pluggy.PluginManager, hook_name: str, registry: _Registry) -> None:
    """Call every implementation of a registration hook with ``registry``, one at a time, so that
    a failure and every registered name can be attributed to its plugin."""
    hook = getattr(pm.hook, hook_name)
    # get_hookimpls() lists them in registration order: built-ins first, then entry points,
    # then the plugins passed in; a clash is blamed on the later one.
    for impl in hook.get_hookimpls():
        registry.current_plugin = impl.plugin_name
        if inspect.iscoroutinefunction(impl.function):
            raise PluginError(
                f"plugin {impl.plugin_name!r}: {hook_name} must be a plain function, not "
                "async def (hooks run once at build time; the stages they return are async)"
            )
        try:
            impl.function(*[registry for _ in impl.argnames])
        except PluginError:
            raise
        except Exception as err:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(err).__name__}: {err}"
            ) from err


def collect_stages(pm: pluggy.PluginManager) -> dict[str, StageSpec]:
    """All stages registered by the plugins of ``pm``, by name."""
    registry = StageRegistry()
    _call_each(pm, "resilient_cache_register_stages", registry)
    return registry.specs


def collect_backends(pm: pluggy.PluginManager) -> dict[str, tuple[BackendFactory, str]]:
    """All backend factories registered by the plugins of ``pm``, by name."""
    registry = BackendRegistry()
    _call_each(pm, "resilient_cache_register_backends", registry)
    return registry.factories
