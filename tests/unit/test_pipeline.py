from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from resilient_cache import Command, ConfigurationError, PluginError, create_redis_cluster, hookimpl
from resilient_cache.pipeline import compose
from resilient_cache.plugins import BUILTIN_PLUGINS, collect_stages, make_plugin_manager


async def test_compose_runs_stages_outermost_first() -> None:
    seen: list[str] = []

    def stage(name: str):
        async def run(command, call_next):
            seen.append(f"{name}>")
            result = await call_next(command)
            seen.append(f"<{name}")
            return result + name

        return run

    async def terminal(command: Command) -> str:
        seen.append("backend")
        return ""

    handler = compose([stage("a"), stage("b"), stage("c")], terminal)
    assert await handler(Command("GET", ("k",))) == "cba"
    assert seen == ["a>", "b>", "c>", "backend", "<c", "<b", "<a"]


async def test_compose_with_no_stages_is_the_terminal() -> None:
    async def terminal(command: Command) -> str:
        return command.name

    assert compose([], terminal) is terminal


def test_command_fields_come_from_the_table() -> None:
    get = Command.from_call(("get", "k"), {})
    assert (get.name, get.keys, get.read_only, get.idempotent) == ("GET", ("k",), True, True)
    incr = Command.from_call(("INCR", "n"), {})
    assert (incr.read_only, incr.idempotent) == (False, False)
    set_plain = Command.from_call(("SET", "k", "v", "EX", 5), {})
    assert set_plain.idempotent
    set_nx = Command.from_call(("SET", "k", "v", "NX"), {})
    assert not set_nx.idempotent  # a lock: a retry could report failure for a success
    mset = Command.from_call(("MSET", "a", 1, "b", 2), {})
    assert mset.keys == ("a", "b")
    mixin = Command.from_call(("HGET", "h", "f"), {"keys": ["h"]})
    assert mixin.keys == ["h"]
    unknown = Command.from_call(("FOO.BAR", "x"), {})
    assert (unknown.keys, unknown.read_only, unknown.idempotent) == (None, False, False)


def test_command_repr_hides_arguments() -> None:
    command = Command.from_call(("SET", "secret-key", "secret-value"), {})
    assert "secret" not in repr(command)
    assert "SET" in repr(command)


def test_command_needs_a_name() -> None:
    with pytest.raises(TypeError, match="command name"):
        Command.from_call((), {})


class TagSettings(BaseModel):
    tag: str = Field(default="x", min_length=1)


class TagPlugin:
    """A third-party plugin passed as an object."""

    @hookimpl
    def resilient_cache_register_stages(self, registry) -> None:
        registry.add("tag", TagSettings, self.build)

    @staticmethod
    def build(settings: TagSettings, context):
        async def tag(command, call_next):
            command.context["tag"] = settings.tag
            return await call_next(command)

        return tag


def build(**options):
    return create_redis_cluster("127.0.0.1:1", autoload=False, **options)


def test_builtins_are_registered_through_the_hook() -> None:
    specs = collect_stages(make_plugin_manager(autoload=False))
    assert set(specs) == {
        "tracing",
        "metrics",
        "memory",
        "timeout",
        "retry",
        "routing",
        "breaker",
        "bulkhead",
    }
    assert {spec.plugin for spec in specs.values()} <= set(BUILTIN_PLUGINS)


def test_plugin_stage_is_placed_and_configured(monkeypatch) -> None:
    monkeypatch.setenv("REDIS_STAGES", "retry,tag,breaker")
    monkeypatch.setenv("REDIS_TAG__TAG", "blue")
    client = build(plugins=[TagPlugin()])
    assert client.active_stages == ["retry", "tag", "breaker"]
    assert client.settings.tag.tag == "blue"


def test_plugin_settings_are_validated_by_its_model(monkeypatch) -> None:
    monkeypatch.setenv("REDIS_TAG__TAG", "")
    with pytest.raises(ConfigurationError, match=r"^REDIS_TAG__TAG / tag\.tag:"):
        build(plugins=[TagPlugin()])


def test_default_pipeline_drops_stages_with_nothing_to_do() -> None:
    # No OTel SDK configured (tracing), memory tier off by default.
    assert build().active_stages == ["metrics", "timeout", "retry", "routing", "breaker"]


def test_blocking_a_builtin(monkeypatch) -> None:
    monkeypatch.setenv("REDIS_PLUGINS_BLOCKED", "resilient_cache.stages.memory")
    monkeypatch.setenv("REDIS_STAGES", "retry,breaker")
    client = build()
    assert "memory" not in client.stage_specs


def test_duplicate_stage_name_names_both_sides() -> None:
    class Clash:
        @hookimpl
        def resilient_cache_register_stages(self, registry) -> None:
            registry.add("retry", TagSettings, TagPlugin.build)

    with pytest.raises(PluginError, match="registered stage 'retry', which is already registered"):
        build(plugins=[Clash()])


@pytest.mark.parametrize(
    ("name", "model", "factory", "message"),
    [
        ("Bad-Name", TagSettings, TagPlugin.build, "lower-case identifier"),
        ("ok", dict, TagPlugin.build, "not a pydantic BaseModel"),
        ("ok", TagSettings, "not callable", "factory that is not callable"),
        ("url", TagSettings, TagPlugin.build, "name of a core setting"),
        ("max_connections", TagSettings, TagPlugin.build, "name of a core setting"),
    ],
)
def test_bad_registration_names_the_plugin(name, model, factory, message) -> None:
    class Bad:
        @hookimpl
        def resilient_cache_register_stages(self, registry) -> None:
            registry.add(name, model, factory)

    with pytest.raises(PluginError) as info:
        build(plugins=[Bad()])
    assert message in str(info.value)
    assert "plugin '" in str(info.value)


def test_model_without_defaults_is_refused() -> None:
    class Needy(BaseModel):
        required: int

    class Bad:
        @hookimpl
        def resilient_cache_register_stages(self, registry) -> None:
            registry.add("needy", Needy, TagPlugin.build)

    with pytest.raises(PluginError, match="fields without defaults"):
        build(plugins=[Bad()])


def test_failing_factory_names_plugin_and_stage(monkeypatch) -> None:
    class Boom:
        @hookimpl
        def resilient_cache_register_stages(self, registry) -> None:
            registry.add("boom", TagSettings, self.build)

        @staticmethod
        def build(settings, context):
            raise RuntimeError("cannot start")

    monkeypatch.setenv("REDIS_STAGES", "boom")
    with pytest.raises(PluginError, match=r"factory of stage 'boom' failed: RuntimeError"):
        build(plugins=[Boom()])


def test_async_hookimpl_is_refused() -> None:
    class Async:
        @hookimpl
        async def resilient_cache_register_stages(self, registry) -> None:
            registry.add("never", TagSettings, TagPlugin.build)

    with pytest.raises(PluginError, match="must be a plain function, not async def"):
        build(plugins=[Async()])


def test_unknown_hook_is_refused() -> None:
    class Typo:
        @hookimpl
        def resilient_cache_register_stage(self, registry) -> None:  # missing "s"
            pass

    with pytest.raises(PluginError, match="is invalid"):
        build(plugins=[Typo()])


@pytest.fixture
def broken_distribution(tmp_path: Path, monkeypatch):
    """A real installed distribution (a .dist-info on sys.path) whose entry point fails."""
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[resilient_cache]\nbroken = broken_plugin_mod\n")
    (tmp_path / "broken_plugin_mod.py").write_text(
        textwrap.dedent("raise ImportError('needs a module that is not installed')\n")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "broken"
    sys.modules.pop("broken_plugin_mod", None)


def test_entry_point_that_fails_to_load_names_the_plugin(broken_distribution) -> None:
    with pytest.raises(PluginError) as info:
        create_redis_cluster("127.0.0.1:1")
    assert "plugin 'broken'" in str(info.value)
    assert "broken-plugin" in str(info.value)
    assert "needs a module that is not installed" in str(info.value)


def test_blocked_entry_point_is_not_loaded(broken_distribution, monkeypatch) -> None:
    monkeypatch.setenv("REDIS_PLUGINS_BLOCKED", broken_distribution)
    assert create_redis_cluster("127.0.0.1:1").active_stages


def test_autoload_off_skips_entry_points(broken_distribution) -> None:
    assert create_redis_cluster("127.0.0.1:1", autoload=False).active_stages
