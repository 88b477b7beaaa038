"""resilient_cache.speedups: what the [fast] extra adds, and the words the demo prints."""

from __future__ import annotations

import asyncio

import pytest

from resilient_cache import speedups


def test_parser_name_names_the_configured_parser_or_redis_pys_default() -> None:
    from redis.asyncio.connection import DefaultParser

    assert speedups.parser_name(speedups.python_parser_class()) == "Python (_AsyncRESP2Parser)"
    hiredis = speedups.hiredis_parser_class()
    if hiredis is not None:
        assert speedups.parser_name(hiredis).startswith("hiredis ")
    assert speedups.parser_name() == speedups.parser_name(DefaultParser)


def test_run_uses_asyncio_or_uvloop_and_says_which() -> None:
    async def loop_name() -> str:
        return speedups.event_loop_name()

    assert speedups.run(loop_name(), use_uvloop=False).startswith("asyncio (")
    if speedups.uvloop_available():
        assert speedups.run(loop_name(), use_uvloop=True).startswith("uvloop ")
        assert speedups.run(loop_name()).startswith("uvloop ")  # the default when installed
    else:
        with pytest.raises(ImportError):
            speedups.run(loop_name(), use_uvloop=True)


def test_run_returns_the_result() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert speedups.run(answer()) == 42
