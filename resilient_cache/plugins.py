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
import logging
from collections.abc import Iterable, Sequence

import pluggy

from resilient_cache import hookspecs
from resilient_cache.errors import PluginError
from resilient_cache.registry import (
    BackendFactory,
    BackendRegistry,
    BuildContext,
    CommandRegistry,
    CommandSpec,
    StageFactory,
    StageRegistry,
    StageSpec,
    _Registry,
)

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "BackendFactory",
    "BackendRegistry",
    "BuildContext",
    "CommandRegistry",
    "CommandSpec",
    "StageFactory",
    "StageRegistry",
    "StageSpec",
    "collect_backends",
    "collect_commands",
    "collect_stages",
    "make_plugin_manager",
]

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
    "resilient_cache.stages.bulkhead",
    "resilient_cache.backends.redis_py",
)


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


def collect_commands(pm: pluggy.PluginManager, builtin: Iterable[str]) -> dict[str, CommandSpec]:
    """The command-line subcommands registered by the plugins of ``pm``, by name; ``builtin``
    names the command line's own, which no plugin may take."""
    registry = CommandRegistry(builtin)
    _call_each(pm, "resilient_cache_register_commands", registry)
    return registry.specs
