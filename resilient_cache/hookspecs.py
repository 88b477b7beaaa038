"""Every hook a resilient_cache plugin can implement.

Hooks run only while a client is being built, never per command. They are synchronous (pluggy
calls them in order and collects results); what they register is then composed once into the
pipeline. A plugin is a module or object with functions marked ``@hookimpl``, registered through
the entry-point group ``resilient_cache`` or passed as ``create_redis_cluster(plugins=[...])``.
The built-in stages and backends are registered through these same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from resilient_cache.registry import BackendRegistry, CommandRegistry, StageRegistry

PROJECT_NAME = "resilient_cache"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    """Register the pipeline stages this plugin provides.

    Call ``registry.add(name, settings_model, factory)`` once per stage:

    - ``name``: the stage's name in ``REDIS_STAGES`` and its settings section
      (``REDIS_<NAME>__<FIELD>``). A lower-case identifier, unique across all plugins.
    - ``settings_model``: a pydantic ``BaseModel`` whose fields all have defaults; the section is
      validated against it at build time, and a bad value names ``REDIS_<NAME>__<FIELD>``.
    - ``factory(settings, context)``: called once per build with the validated section and the
      :class:`~resilient_cache.registry.BuildContext`. Returns the stage (an object or function with
      ``async def __call__(command, call_next)``), or ``None`` when the stage has nothing to do with
      these settings (then it costs nothing per call).

    :param registry: the :class:`~resilient_cache.registry.StageRegistry` of this build; it records
        which plugin registered each stage, for error messages.
    """


@hookspec
def resilient_cache_register_backends(registry: BackendRegistry) -> None:
    """Register backends: what finally sends a command to Redis.

    Call ``registry.add(name, factory)``; ``factory(settings, context)`` returns an object
    implementing :class:`~resilient_cache.backends.Backend`. The build picks the backend named
    by ``REDIS_BACKEND`` (``auto`` chooses between the built-in ``cluster`` and ``standalone``).

    :param registry: the :class:`~resilient_cache.registry.BackendRegistry` of this build.
    """


@hookspec
def resilient_cache_register_commands(registry: CommandRegistry) -> None:
    """Register subcommands of the ``resilient-cache`` command line.

    Called once when the command line starts (not when a client is built). Call
    ``registry.add(name, configure, run, help=...)`` once per subcommand:

    - ``name``: the subcommand (``resilient-cache <name> ...``): lower case, letters, digits and
      ``-``; it cannot take the name of a built-in command or of another plugin's.
    - ``configure(parser)``: adds the arguments (or sub-subcommands) to the
      :class:`argparse.ArgumentParser` made for it.
    - ``run(args)``: runs the subcommand with the parsed :class:`argparse.Namespace` and returns
      the exit status. A :class:`~resilient_cache.ConfigurationError` it raises is printed as
      one line with exit status 2, and Ctrl-C as "interrupted" with 130, as for the built-in
      commands; anything else is the plugin's to report.

    :param registry: the :class:`~resilient_cache.registry.CommandRegistry` of the command line.
    """
