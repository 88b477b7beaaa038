"""The build: options + settings + plugins -> a pipeline, composed once.

This is the only place a pipeline is built (the client, the CLI, benchmarks and tests all call
:func:`build_pipeline` or its parts), in the spirit of Starlette's ``build_middleware_stack``:

1. Keyword options become settings overrides (the original package's option names included).
2. A PluginManager is made for this build (built-ins, entry points, the caller's plugins);
   every plugin registers its stages and backends.
3. The settings are validated once, with a section per registered stage.
4. The backend is made, then every stage in ``REDIS_STAGES`` order by its factory; the factories
   share one :class:`~resilient_cache.registry.BuildContext`.
5. The stages are composed around ``backend.execute`` into one handler.

Nothing here runs per command.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from opentelemetry import metrics, trace

from resilient_cache import telemetry
from resilient_cache.backends import Backend
from resilient_cache.circuit import BreakerBoard
from resilient_cache.errors import ConfigurationError, PluginError
from resilient_cache.pipeline import Handler, Stage, compose
from resilient_cache.plugins import collect_backends, collect_stages, make_plugin_manager
from resilient_cache.registry import BackendFactory, BuildContext, StageSpec, _NoBackendYet
from resilient_cache.settings import (
    Settings,
    find_config_file,
    load_settings,
    parse_cluster_nodes,
    settings_model,
)
from resilient_cache.telemetry import CommandStats

#: The original package's option names, mapped onto stage sections.
OPTION_SHORTCUTS: dict[str, tuple[str, str]] = {
    "max_retries": ("retry", "max_retries"),
    "retry_delay": ("retry", "delay"),
    "circuit_breaker_threshold": ("breaker", "threshold"),
    "circuit_breaker_timeout": ("breaker", "reset_timeout"),
    "command_timeout": ("timeout", "deadline"),
}


@dataclass
class BuiltPipeline:
    """Everything one build made; the client keeps it and never rebuilds.

    ``stages`` are the active ones, outermost first, as ``(name, stage)``: a factory that
    returned ``None`` (a stage with nothing to do under these settings) is not there.
    """

    settings: Settings
    stage_specs: dict[str, StageSpec]
    backend: Backend
    context: BuildContext
    stages: list[tuple[str, Stage]]
    handler: Handler

    @property
    def stats(self) -> CommandStats:
        return self.context.stats

    @property
    def breakers(self) -> BreakerBoard:
        return self.context.breakers


def resolve_options(
    nodes: str | Sequence[Any] | None, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Turn ``create_redis_cluster``'s arguments into keyword overrides for the settings model."""
    overrides: dict[str, Any] = {}
    if nodes is not None:
        overrides["cluster_nodes"] = parse_cluster_nodes(nodes, where="nodes")
    for name, value in options.items():
        if name in OPTION_SHORTCUTS:
            section, field = OPTION_SHORTCUTS[name]
            overrides.setdefault(section, {})[field] = value
        elif isinstance(value, Mapping) and isinstance(overrides.get(name), dict):
            overrides[name].update(value)
        else:
            overrides[name] = value
    return overrides


@dataclass
class Configuration:
    """Steps 1-3: the validated settings and what the plugins registered."""

    settings: Settings
    stage_specs: dict[str, StageSpec]
    backend_factories: dict[str, tuple[BackendFactory, str]]


def load_configuration(
    nodes: str | Sequence[Any] | None = None,
    *,
    plugins: Sequence[object] = (),
    autoload: bool | None = None,
    config_file: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Configuration:
    """Load plugins and validate every setting (core and per stage) once."""
    overrides = resolve_options(nodes, options)
    path = find_config_file(config_file)
    pm = make_plugin_manager(
        plugins=plugins, **_plugin_control(settings_model({}, path), overrides, autoload)
    )
    specs = collect_stages(pm)
    backends = collect_backends(pm)
    model = settings_model({name: spec.settings_model for name, spec in specs.items()}, path)
    _reject_unknown_options(model, overrides)
    settings = load_settings(model, overrides)
    unknown = [name for name in settings.stages if name not in specs]
    if unknown:
        raise ConfigurationError(
            f"REDIS_STAGES: unknown stage {unknown[0]!r}; the stages that exist are: "
            + ", ".join(sorted(specs))
        )
    return Configuration(settings, specs, backends)


def make_context(
    settings: Settings,
    backend: Backend | None = None,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    stats: CommandStats | None = None,
    breakers: BreakerBoard | None = None,
) -> BuildContext:
    """The context every factory of one build shares. The client's OpenTelemetry instruments
    are made here, once, when an SDK would see them (the metrics stage may switch them off)."""
    meter_provider = meter_provider or metrics.get_meter_provider()
    if stats is None:
        stats = CommandStats()
        stats.instruments = telemetry.make_instruments(meter_provider)
    return BuildContext(
        settings=settings,
        backend=backend if backend is not None else cast(Backend, _NoBackendYet()),
        clock=clock,
        sleep=sleep,
        tracer_provider=tracer_provider or trace.get_tracer_provider(),
        meter_provider=meter_provider,
        stats=stats,
        breakers=breakers if breakers is not None else BreakerBoard(clock=clock),
    )


def make_backend(configuration: Configuration, context: BuildContext) -> Backend:
    """The backend ``REDIS_BACKEND`` names, made by its factory; ``context.backend`` is set."""
    name = configuration.settings.resolved_backend()
    if name not in configuration.backend_factories:
        raise ConfigurationError(
            f"REDIS_BACKEND: unknown backend {name!r}; the backends that exist are: "
            + ", ".join(sorted(configuration.backend_factories))
        )
    factory, plugin = configuration.backend_factories[name]
    try:
        backend = factory(configuration.settings, context)
    except (ConfigurationError, PluginError):
        raise
    except Exception as err:
        raise PluginError(
            f"plugin {plugin!r}: the factory of backend {name!r} failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    context.backend = backend
    return backend


def build_stages(
    specs: Mapping[str, StageSpec],
    settings: Settings,
    context: BuildContext,
    names: Sequence[str] | None = None,
) -> list[tuple[str, Stage]]:
    """Call the factory of every stage in ``names`` (default: ``settings.stages``) once, in
    order; keep those that returned a stage. A failure names the plugin at fault."""
    built: list[tuple[str, Stage]] = []
    for name in settings.stages if names is None else names:
        spec = specs[name]
        try:
            stage = spec.factory(settings.stage_settings(name), context)
        except (ConfigurationError, PluginError):
            raise
        except Exception as err:
            raise PluginError(
                f"plugin {spec.plugin!r}: the factory of stage {name!r} failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        if stage is None:
            continue
        if not callable(stage):
            raise PluginError(
                f"plugin {spec.plugin!r}: the factory of stage {name!r} returned "
                f"{type(stage).__name__}, which has no async __call__(command, call_next)"
            )
        built.append((name, stage))
    return built


def build_pipeline(
    nodes: str | Sequence[Any] | None = None,
    *,
    plugins: Sequence[object] = (),
    autoload: bool | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    config_file: str | os.PathLike[str] | None = None,
    **options: Any,
) -> BuiltPipeline:
    """Build a whole pipeline from ``create_redis_cluster``'s arguments (see the client)."""
    configuration = load_configuration(
        nodes, plugins=plugins, autoload=autoload, config_file=config_file, **options
    )
    context = make_context(
        configuration.settings,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        clock=clock,
        sleep=sleep,
    )
    backend = make_backend(configuration, context)
    stages = build_stages(configuration.stage_specs, configuration.settings, context)
    handler = compose([stage for _, stage in stages], backend.execute)
    return BuiltPipeline(
        configuration.settings, configuration.stage_specs, backend, context, stages, handler
    )


def _plugin_control(
    core_model: type[Settings], overrides: Mapping[str, Any], autoload: bool | None
) -> dict[str, Any]:
    """Read the two settings needed before plugins load. Any invalid setting is reported later,
    together with the stage sections, by the full validation pass."""
    try:
        core = load_settings(core_model, overrides)
    except ConfigurationError:
        return {"autoload": autoload is not False, "blocked": ()}
    return {
        "autoload": core.plugins_autoload if autoload is None else autoload,
        "blocked": core.plugins_blocked,
    }


def _reject_unknown_options(model: type[Settings], overrides: Mapping[str, Any]) -> None:
    known = set(model.model_fields)
    for name in overrides:
        if name not in known:
            choices = sorted(known | set(OPTION_SHORTCUTS))
            raise ConfigurationError(
                f"unknown option {name!r}; the options that exist are: {', '.join(choices)}"
            )
