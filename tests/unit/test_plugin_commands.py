"""Command-line subcommands from plugins (``resilient_cache_register_commands``): the names a
plugin may take, and a plugin's command found through its entry point (the dualwrite plugin's
``migrate``)."""

from __future__ import annotations

import pytest

from resilient_cache import CommandRegistry, PluginError
from resilient_cache.cli import main


def _noop_configure(parser: object) -> None:
    return None


def _noop_run(args: object) -> int:
    return 0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Migrate", "lower case"),
        ("two words", "lower case"),
        ("cluster", "built-in command"),
    ],
)
def test_a_plugin_command_needs_a_free_well_formed_name(name: str, message: str) -> None:
    registry = CommandRegistry(builtin=["cluster", "ping"])
    registry.current_plugin = "acme"
    with pytest.raises(PluginError, match=message) as caught:
        registry.add(name, _noop_configure, _noop_run)
    assert "'acme'" in str(caught.value)


def test_two_plugins_cannot_register_the_same_command() -> None:
    registry = CommandRegistry()
    registry.current_plugin = "first"
    registry.add("copy-data", _noop_configure, _noop_run)
    registry.current_plugin = "second"
    with pytest.raises(PluginError, match="'first' registered already"):
        registry.add("copy-data", _noop_configure, _noop_run)


def test_a_plugins_command_is_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "migrate" in capsys.readouterr().out  # from resilient-cache-dualwrite's entry point
