"""The memory tier recognising the tracking link's report of this client's own writes.

Pure bookkeeping, driven by hand: the "backend" is a function that answers and says which node
answered, and pushes are delivered by calling the tier's push callback directly. The same rules
run against the real cluster in tests/integration/test_coherence.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest

from resilient_cache.commands import changed_keys
from resilient_cache.pipeline import Command
from resilient_cache.stages.memory import MemorySettings, MemoryStage

from .conftest import FakeClock


class Node(NamedTuple):
    host: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


A = Node("10.0.0.1", 7000)
B = Node("10.0.0.2", 7000)


class FakeRaw:
    def get_primaries(self) -> list[Any]:
        return []


class FakeBackend:
    raw = FakeRaw()

    def request_refresh(self) -> None:
        pass


@pytest.fixture
def tier(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> MemoryStage:
    backend: Any = FakeBackend()
    stage = MemoryStage(MemorySettings(enabled=True, ttl=30), clock, backend)
    assert stage.coherence is not None
    # The links are not run here: the test delivers their pushes itself.
    monkeypatch.setattr(type(stage.coherence), "started", True)
    stage._on_ready(True)
    return stage


def answer(reply: Any, node: Node = A):
    async def call_next(command: Command) -> Any:
        command.node = node
        return reply

    return call_next


async def read(tier: MemoryStage, key: bytes, value: Any) -> Any:
    return await tier(Command("GET", (key,)), answer(value))


async def test_the_first_push_after_an_own_write_keeps_the_fresh_value(tier: MemoryStage) -> None:
    await tier(Command("SET", (b"k", b"v")), answer(True))
    await read(tier, b"k", b"v")
    tier._on_push([b"k"], A.name)  # the report of the SET
    assert tier.holds(b"k")
    tier._on_push([b"k"], A.name)  # anything after it evicts
    assert not tier.holds(b"k")


async def test_a_push_from_another_primary_evicts(tier: MemoryStage) -> None:
    await tier(Command("SET", (b"k", b"v")), answer(True, A))
    await read(tier, b"k", b"v")
    tier._on_push([b"k"], B.name)  # not the link the SET's report comes on
    assert not tier.holds(b"k")


async def test_a_push_while_the_write_runs_ends_its_note(tier: MemoryStage) -> None:
    async def slow_set(command: Command) -> Any:
        command.node = A
        tier._on_push([b"k"], A.name)  # arrives before the reply: maybe an earlier change
        return True

    await tier(Command("SET", (b"k", b"v")), slow_set)
    await read(tier, b"k", b"v")
    tier._on_push([b"k"], A.name)
    assert not tier.holds(b"k")


async def test_a_failed_or_unapplied_write_notes_nothing(tier: MemoryStage) -> None:
    async def failing(command: Command) -> Any:
        command.node = A
        raise ConnectionError("in doubt")

    with pytest.raises(ConnectionError):
        await tier(Command("SET", (b"k", b"v")), failing)
    await tier(Command("SET", (b"k", b"v", "NX")), answer(None))
    await tier(Command("DEL", (b"k",)), answer(0))
    assert tier._own_writes == {}
    await read(tier, b"k", b"v")
    tier._on_push([b"k"], A.name)
    assert not tier.holds(b"k")


async def test_a_lost_link_forgets_every_note(tier: MemoryStage) -> None:
    await tier(Command("SET", (b"k", b"v")), answer(True))
    tier._on_ready(False)
    tier._on_ready(True)
    await read(tier, b"k", b"v")
    tier._on_push([b"k"], A.name)  # its report may have gone with the link
    assert not tier.holds(b"k")


@pytest.mark.parametrize(
    ("name", "args", "reply", "changed"),
    [
        ("SET", (b"k", b"v"), True, (b"k",)),
        ("SET", (b"k", b"v", "NX"), None, ()),
        ("SET", (b"k", b"v", "GET"), b"old", ()),
        ("SET", (b"k", b"v", "XX", "EX", 5), True, (b"k",)),
        ("DEL", (b"a", b"b"), 2, (b"a", b"b")),
        ("DEL", (b"a", b"b"), 1, ()),
        ("EXPIRE", (b"k", 5), True, (b"k",)),
        ("EXPIRE", (b"k", 5), False, ()),
        ("SADD", (b"s", b"m"), 0, ()),
        ("INCR", (b"n",), 3, (b"n",)),
        ("ZADD", (b"z", 1, b"m"), 1, ()),
    ],
)
def test_changed_keys_trusts_only_replies_that_prove_a_change(
    name: str, args: tuple[Any, ...], reply: Any, changed: tuple[Any, ...]
) -> None:
    keys = args[:2] if name == "DEL" else args[:1]
    assert changed_keys(name, args, keys, reply) == changed
