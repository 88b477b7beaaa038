"""Unit tests: pure logic, no Redis, no real sleeping."""

from __future__ import annotations

import pytest


class FakeClock:
    """A clock that only moves when told; ``sleep`` advances it instead of waiting."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Every unit test starts with no REDIS_* variable and in an empty directory, so a developer's
    own environment, .env or resilient_cache.toml cannot change the outcome."""
    import os

    for name in list(os.environ):
        if name.startswith("REDIS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
