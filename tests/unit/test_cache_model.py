"""MultiLayerCache's own logic: the two tiers against a dict model, XFetch, negative caching,
serializers, write-back bounds, instruments.

The stateful test drives the cache against a tiny in-memory async key-value store (``FakeKV``)
on a fake clock, not the real cluster, on purpose: what it checks is the cache's pure TTL / LRU /
write-back bookkeeping, which needs time to jump by minutes in microseconds, and Redis expires
keys on its own wall clock, which a fake clock cannot move. Everything that depends on real Redis
behaviour (routing, SCAN across primaries, the lock script, concurrency, outages) is tested
against the real cluster in tests/integration/test_cache.py and tests/chaos/test_cache_outage.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache import ConfigurationError, MultiLayerCache
from resilient_cache.serializers import get_serializer
from tests.unit.conftest import FakeClock


class FakeKV:
    """GET/SET(PX, NX)/DEL/PTTL/EVAL(compare-and-delete)/SCAN on a dict, expiring on ``clock``.
    ``fail = True`` makes every call raise a ConnectionError (Redis down)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[bytes, float]] = {}
        self.fail = False

    def _check(self) -> None:
        if self.fail:
            raise RedisConnectionError("fake Redis is down")

    def _alive(self, key: str) -> tuple[bytes, float] | None:
        item = self.data.get(key)
        if item is not None and item[1] <= self.clock():
            del self.data[key]
            return None
        return item

    async def get(self, key: str) -> bytes | None:
        self._check()
        item = self._alive(key)
        return None if item is None else item[0]

    async def set(
        self, key: str, value: Any, *, px: int | None = None, nx: bool = False, **_: Any
    ) -> bool | None:
        self._check()
        if nx and self._alive(key) is not None:
            return None
        data = value if isinstance(value, bytes) else str(value).encode()
        self.data[key] = (data, self.clock() + px / 1000 if px else math.inf)
        return True

    async def delete(self, *keys: str) -> int:
        self._check()
        found = [k for k in keys if self._alive(k) is not None]
        for k in found:
            del self.data[k]
        return len(found)

    async def execute_command(self, *args: Any, **_: Any) -> Any:
        self._check()
        name = args[0].upper()
        if name == "PTTL":
            item = self._alive(args[1])
            if item is None:
                return -2
            return -1 if item[1] == math.inf else int((item[1] - self.clock()) * 1000)
        if name == "EVAL":  # the lock release script: compare-and-delete
            key, token = args[3], args[4]
            item = self._alive(key)
            if item is not None and item[0] == token.encode():
                del self.data[key]
                return 1
            return 0
        raise NotImplementedError(name)

    async def scan_iter(self, match: str, count: int = 10):
        self._check()
        assert match.endswith("*")
        prefix = match[:-1].replace("\\", "")  # the cache escapes glob characters only
        for key in [k for k in self.data if k.startswith(prefix)]:
            if self._alive(key) is not None:
                yield key


KEYS = st.sampled_from(["a", "ab", "b"])
VALUES = st.integers(min_value=-5, max_value=5)
TTLS = st.sampled_from([None, 3, 20])
MEMORY_TTL, REDIS_TTL, MAX_SIZE, MAX_STALE, WRITEBACK_MAX = 5.0, 10.0, 3, 4.0, 2


class CacheModel(RuleBasedStateMachine):
    """Memory tier (TTL, LRU, kept-for-stale entries), Redis tier, and write-back queue against
    plain dicts. Rules also write Redis behind the cache's back (another process) and take Redis
    down and up."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.kv = FakeKV(self.clock)
        self.cache = MultiLayerCache(
            "model",
            self.kv,
            memory={"max_size": MAX_SIZE, "default_ttl": MEMORY_TTL, "cleanup_interval": 7},
            redis={"default_ttl": REDIS_TTL, "key_prefix": "m:"},
            early_refresh=False,
            max_stale=MAX_STALE,
            writeback_max=WRITEBACK_MAX,
            writeback_interval=1e6,  # flushed by the rule below only
            clock=self.clock,
        )
        # key -> (value, expires, keep_until), in LRU order
        self.mem: OrderedDict[str, tuple[int, float, float]] = OrderedDict()
        self.redis: dict[str, tuple[int, float]] = {}
        self.queue: OrderedDict[str, tuple[int | None, float]] = OrderedDict()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.cache.aclose())
        self.loop.close()

    # -- the model -------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock()

    def m_store(self, key: str, value: int, fresh: float) -> None:
        expires = min(self.now + MEMORY_TTL, fresh)
        self.mem[key] = (value, expires, max(expires, fresh + MAX_STALE))
        self.mem.move_to_end(key)
        if len(self.mem) > MAX_SIZE:
            for k in [k for k, e in self.mem.items() if e[2] <= self.now]:
                del self.mem[k]
            while len(self.mem) > MAX_SIZE:
                self.mem.popitem(last=False)

    def m_entry(self, key: str) -> tuple[int, float, float] | None:
        entry = self.mem.get(key)
        if entry is not None and entry[2] <= self.now:
            del self.mem[key]
            return None
        return entry

    def r_get(self, key: str) -> tuple[int, float] | None:
        item = self.redis.get(key)
        if item is not None and item[1] <= self.now:
            del self.redis[key]
            return None
        return item

    def m_enqueue(self, key: str, value: int | None, expires: float) -> None:
        self.queue.pop(key, None)
        self.queue[key] = (value, expires)
        while len(self.queue) > WRITEBACK_MAX:
            self.queue.popitem(last=False)

    def m_redis_write(self, key: str, value: int | None, expires: float) -> None:
        if self.kv.fail:
            self.m_enqueue(key, value, expires)
            return
        if value is None:
            self.redis.pop(key, None)
        else:
            self.redis[key] = (value, expires)
        self.queue.pop(key, None)

    def m_read(self, key: str) -> tuple[bool, int | None]:
        """What get() returns, updating the model as the cache updates itself."""
        entry = self.m_entry(key)
        if entry is not None and self.now < entry[1]:
            self.mem.move_to_end(key)
            return True, entry[0]
        return self.m_read_redis(key, entry)

    def m_read_redis(self, key: str, entry: tuple[int, float, float] | None) -> tuple[bool, Any]:
        if self.kv.fail:
            if entry is not None and self.now < entry[2]:
                return True, entry[0]
            return False, None
        item = self.r_get(key)
        if item is not None:
            self.m_store(key, item[0], self.now + MEMORY_TTL)
            return True, item[0]
        self.mem.pop(key, None)
        return False, None

    # -- rules -----------------------------------------------------------------------------

    @rule(key=KEYS, value=VALUES, ttl=TTLS)
    def set(self, key: str, value: int, ttl: int | None) -> None:
        self.run(self.cache.set(key, value, ttl=ttl))
        t = ttl or REDIS_TTL
        self.m_store(key, value, self.now + t)
        self.m_redis_write(key, value, self.now + t)

    @rule(items=st.dictionaries(KEYS, VALUES, max_size=3))
    def set_many(self, items: dict[str, int]) -> None:
        self.run(self.cache.set_many(items))
        for key, value in items.items():
            self.m_store(key, value, self.now + REDIS_TTL)
            self.m_redis_write(key, value, self.now + REDIS_TTL)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        found, value = self.m_read(key)
        assert self.run(self.cache.get(key)) == (value if found else None)

    @rule(keys=st.lists(KEYS, max_size=4))
    def get_many(self, keys: list[str]) -> None:
        got = self.run(self.cache.get_many(keys))
        expected: dict[str, int] = {}
        wanted: list[tuple[str, Any]] = []
        for key in dict.fromkeys(keys):
            entry = self.m_entry(key)
            if entry is not None and self.now < entry[1]:
                self.mem.move_to_end(key)
                expected[key] = entry[0]
            else:
                wanted.append((key, entry))
        for key, entry in wanted:
            found, value = self.m_read_redis(key, entry)
            if found:
                expected[key] = value
        assert got == expected

    @rule(key=KEYS, value=VALUES)
    def get_or_set(self, key: str, value: int) -> None:
        calls: list[int] = []

        def loader() -> int:
            calls.append(1)
            return value

        got = self.run(self.cache.get_or_set(key, loader))
        found, cached = self.m_read(key)
        if found:
            assert (got, calls) == (cached, [])
        else:
            assert (got, calls) == (value, [1])
            self.m_store(key, value, self.now + REDIS_TTL)
            self.m_redis_write(key, value, self.now + REDIS_TTL)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        self.run(self.cache.delete(key))
        self.mem.pop(key, None)
        self.m_redis_write(key, None, math.inf)

    @rule(prefix=st.sampled_from(["", "a", "ab", "b"]))
    def invalidate_prefix(self, prefix: str) -> None:
        for key in [k for k in self.mem if k.startswith(prefix)]:
            del self.mem[key]
        for key in [k for k in self.queue if k.startswith(prefix)]:
            del self.queue[key]
        if self.kv.fail:
            with pytest.raises(RedisConnectionError):
                self.run(self.cache.invalidate_prefix(prefix))
            return
        alive = [k for k in list(self.redis) if k.startswith(prefix) and self.r_get(k)]
        assert self.run(self.cache.invalidate_prefix(prefix)) == len(alive)
        for key in [k for k in self.redis if k.startswith(prefix)]:
            del self.redis[key]

    @rule(key=KEYS, value=VALUES, ttl=st.sampled_from([1, 10]))
    def another_process_sets(self, key: str, value: int, ttl: int) -> None:
        if not self.kv.fail:
            self.kv.data["m:" + key] = (str(value).encode(), self.now + ttl)
            self.redis[key] = (value, self.now + ttl)

    @rule(key=KEYS)
    def another_process_deletes(self, key: str) -> None:
        if not self.kv.fail:
            self.kv.data.pop("m:" + key, None)
            self.redis.pop(key, None)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 4.0, 11.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def redis_goes_down(self) -> None:
        self.kv.fail = True

    @precondition(lambda self: self.kv.fail)
    @rule()
    def redis_comes_back_and_queue_flushes(self) -> None:
        self.kv.fail = False
        self.run(self.cache.flush_writeback())
        for key, (value, expires) in list(self.queue.items()):
            if value is None:
                self.redis.pop(key, None)
            elif expires > self.now:
                self.redis[key] = (value, expires)
        self.queue.clear()

    @invariant()
    def redis_matches(self) -> None:
        alive = {k: v for k, (v, exp) in self.redis.items() if exp > self.now}
        stored = {k[2:]: int(v) for k, (v, exp) in self.kv.data.items() if exp > self.now and k[2:]}
        assert stored == alive

    @invariant()
    def queue_matches(self) -> None:
        assert list(self.cache._writeback) == list(self.queue)


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(max_examples=400, stateful_step_count=50, deadline=None)


# -- focused unit tests ------------------------------------------------------------------------


def make(clock: FakeClock, kv: FakeKV | None = None, **options: Any) -> MultiLayerCache:
    options.setdefault("memory", {"default_ttl": 100, "max_size": 100})
    options.setdefault("redis", {"default_ttl": 100})
    return MultiLayerCache("unit", kv or FakeKV(clock), clock=clock, **options)


async def test_xfetch_refreshes_early_in_the_background_once(clock: FakeClock) -> None:
    kv = FakeKV(clock)
    cache = make(clock, kv, rng=random.Random(1), beta=1.0, early_refresh=True)
    loads: list[float] = []
    gate = asyncio.Event()

    async def loader() -> str:
        loads.append(clock())
        if len(loads) > 1:
            await gate.wait()
        clock.advance(2.0)  # the load "takes" 2 s: delta = 2
        return f"v{len(loads)}"

    assert await cache.get_or_set("k", loader) == "v1"
    # Far from expiry: -2 * log(rand) exceeds 98 s only with probability e^-49.
    for _ in range(50):
        assert await cache.get_or_set("k", loader) == "v1"
    assert len(loads) == 1
    clock.advance(97.0)  # 1 s before expiry, delta 2: the early refresh is very likely
    results = [await cache.get_or_set("k", loader) for _ in range(50)]
    assert results == ["v1"] * 50  # served the current value while refreshing
    await asyncio.sleep(0)
    assert len(loads) == 2  # one refresh at a time for the key
    gate.set()
    await asyncio.sleep(0.01)
    assert await cache.get_or_set("k", loader) == "v2"
    assert cache.stats.refreshes == 1
    await cache.aclose()


async def test_stale_if_error_within_max_stale_then_loader(clock: FakeClock) -> None:
    kv = FakeKV(clock)
    cache = make(clock, kv, max_stale=30.0, early_refresh=False)
    await cache.set("k", "old", ttl=10)
    kv.fail = True
    clock.advance(20.0)  # 10 s past expiry, within max_stale
    assert await cache.get_or_set("k", lambda: "new") == "old"
    assert cache.stats.stale_served == 1
    clock.advance(25.0)  # 35 s past expiry
    assert await cache.get_or_set("k", lambda: "new") == "new"
    assert cache.writeback_pending == 1
    kv.fail = False
    assert await cache.flush_writeback() == 1
    assert kv.data["k"][0] == b'"new"'
    await cache.aclose()


async def test_loader_failure_serves_stale_else_raises(clock: FakeClock) -> None:
    cache = make(clock, max_stale=30.0, early_refresh=False)
    await cache.set("k", 1, ttl=10)
    clock.advance(15.0)
    await cache.delete("other")

    def broken() -> int:
        raise RuntimeError("db down")

    # Redis answers (the key expired there), the loader fails: the kept value is served.
    assert await cache.get_or_set("k", broken) == 1
    with pytest.raises(RuntimeError):
        await cache.get_or_set("never", broken)
    assert cache.stats.loader_errors == 2


async def test_negative_caching_has_its_own_ttl(clock: FakeClock) -> None:
    kv = FakeKV(clock)
    cache = make(clock, kv, cache_none=True, none_ttl=5.0, early_refresh=False)
    calls: list[int] = []

    def loader() -> None:
        calls.append(1)

    assert await cache.get_or_set("k", loader) is None
    assert await cache.get_or_set("k", loader) is None
    assert calls == [1]
    assert kv.data["k"] == (b"null", clock() + 5.0)
    clock.advance(6.0)
    assert await cache.get_or_set("k", loader) is None
    assert calls == [1, 1]
    # Without cache_none, None is never stored.
    plain = make(clock, FakeKV(clock))
    await plain.get_or_set("k", loader)
    await plain.get_or_set("k", loader)
    assert calls == [1, 1, 1, 1]


async def test_writeback_queue_drops_oldest_with_a_counter(clock: FakeClock) -> None:
    kv = FakeKV(clock)
    cache = make(clock, kv, writeback_max=2, writeback_interval=1e6)
    kv.fail = True
    for n in range(5):
        await cache.set(f"k{n}", n)
    assert list(cache._writeback) == ["k3", "k4"]
    assert cache.stats.writeback_dropped == 3
    await cache.delete("k4")  # a delete replaces the queued write: nothing resurrects
    kv.fail = False
    assert await cache.flush_writeback() == 2
    assert set(kv.data) == {"k3"}
    await cache.aclose()


async def test_race_delete_during_load_is_not_undone(clock: FakeClock) -> None:
    kv = FakeKV(clock)
    cache = make(clock, kv)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "loaded"

    task = asyncio.create_task(cache.get_or_set("k", slow))
    await started.wait()
    await cache.delete("k")
    release.set()
    assert await task == "loaded"  # the caller gets it ...
    assert await cache.get("k") is None  # ... the cache does not keep it
    assert "k" not in kv.data


async def test_single_flight_in_process(clock: FakeClock) -> None:
    cache = make(clock)
    calls: list[int] = []

    async def loader() -> int:
        calls.append(1)
        await asyncio.sleep(0.01)
        return 7

    assert await asyncio.gather(*(cache.get_or_set("k", loader) for _ in range(200))) == [7] * 200
    assert calls == [1]


async def test_lock_loser_waits_for_the_winners_value(clock: FakeClock) -> None:
    kv = FakeKV(clock)
    a = make(clock, kv, lock=True, lock_poll_interval=0.5, sleep=clock.sleep)
    b = make(clock, kv, lock=True, lock_poll_interval=0.5, sleep=clock.sleep)
    await kv.set("k:lock", "someone-else", px=10_000)

    calls: list[int] = []

    async def sleep_then_maybe_publish(seconds: float) -> None:
        # The other process stores its value two seconds into our wait.
        clock.advance(seconds)
        if clock() >= 1002.0 and "k" not in kv.data:
            await kv.set("k", b'"theirs"', px=100_000)

    b._sleep = sleep_then_maybe_publish
    assert await b.get_or_set("k", lambda: calls.append(1) or "mine") == "theirs"
    assert calls == []
    assert clock() >= 1002.0
    # The lock expires without a value: the waiter loads after lock_ttl.
    await kv.set("j:lock", "stuck", px=10_000)
    a._sleep = lambda s: _yielding_sleep(clock, s)
    assert await a.get_or_set("j", lambda: "mine") == "mine"
    assert kv.data["j"][0] == b'"mine"'


async def _yielding_sleep(clock: FakeClock, seconds: float) -> None:
    clock.advance(seconds)
    await asyncio.sleep(0)


async def test_lock_released_only_by_its_holder(clock: FakeClock) -> None:
    kv = FakeKV(clock)
    cache = make(clock, kv, lock=True)

    async def loader() -> str:
        # Our lock expired and someone else took it: our release must not delete theirs.
        kv.data["k:lock"] = (b"theirs", math.inf)
        return "v"

    assert await cache.get_or_set("k", loader) == "v"
    assert kv.data["k:lock"][0] == b"theirs"
    del kv.data["k:lock"]
    await cache.delete("k")

    async def loader2() -> str:
        return "w"

    assert await cache.get_or_set("k", loader2) == "w"
    assert "k:lock" not in kv.data  # released


def test_serializers_round_trip_and_msgpack_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    value = {"a": [1, 2.5, "x", None, True]}
    for name in ("json", "msgpack", "pickle"):
        serializer = get_serializer(name)
        assert serializer.loads(serializer.dumps(value)) == value
    with pytest.raises(ConfigurationError, match="unknown 'yaml'"):
        get_serializer("yaml")
    monkeypatch.setitem(sys.modules, "msgpack", None)  # as if not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'resilient-cache\[msgpack\]'"):
        get_serializer("msgpack")


async def test_pickle_warns_once_per_cache_that_it_trusts_every_writer(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.WARNING and "pickle" in r.message]

    caplog.set_level(logging.WARNING, logger="resilient_cache.cache")
    for name in ("json", "msgpack"):
        make(clock, serializer=name)
    assert warnings() == []
    cache = make(clock, serializer="pickle", redis={"key_prefix": "app:"})
    (record,) = warnings()
    assert record.name == "resilient_cache.cache"
    assert "cache unit:" in record.message and "'app:'" in record.message
    assert "anyone who can write those keys can run code in this process" in record.message
    for n in range(3):  # using the cache does not repeat it
        await cache.set(f"k{n}", {"a": n})
        cache._memory.delete(f"k{n}")  # the next get decodes what Redis holds
        assert await cache.get(f"k{n}") == {"a": n}
    assert len(warnings()) == 1
    make(clock, serializer=get_serializer("pickle"))  # another cache: its own warning
    assert len(warnings()) == 2
    assert "no key_prefix: any key" in warnings()[1].message


async def test_options_are_validated(clock: FakeClock) -> None:
    with pytest.raises(ConfigurationError, match="memory"):
        make(clock, memory={"max_size": 0})
    with pytest.raises(ConfigurationError, match="lock_ttl"):
        make(clock, lock_ttl=0)


async def test_stats_exported_as_observable_instruments(clock: FakeClock) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    cache = MultiLayerCache("otel", FakeKV(clock), clock=clock, meter_provider=provider)
    other = MultiLayerCache("otel-2", FakeKV(clock), clock=clock, meter_provider=provider)
    await cache.get_or_set("k", lambda: 1)
    await cache.get_or_set("k", lambda: 1)
    await other.get("missing")
    points: dict[tuple[str, tuple[Any, ...]], float] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    points[(metric.name, tuple(sorted(point.attributes.items())))] = point.value
    name = "resilient_cache.cache.name"
    assert points[("resilient_cache.cache.loads", ((name, "otel"),))] == 1
    hits = (
        "resilient_cache.cache.hits",
        ((name, "otel"), ("resilient_cache.cache.tier", "memory")),
    )
    assert points[hits] == 1
    assert points[("resilient_cache.cache.misses", ((name, "otel-2"),))] == 1
    assert points[("resilient_cache.cache.entries", ((name, "otel"),))] == 1
    provider.shutdown()


def test_no_instruments_without_an_sdk(clock: FakeClock) -> None:
    from resilient_cache import cache as cache_module

    before = len(cache_module._CACHE_OBSERVERS)
    MultiLayerCache("quiet", FakeKV(clock), clock=clock, meter_provider=NoOpMeterProvider())
    assert len(cache_module._CACHE_OBSERVERS) == before


def test_model_sequence_gone_from_redis_is_not_served_when_redis_fails_later() -> None:
    # A sequence the random search rarely reaches: Redis said the key is gone, so the memory
    # entry kept for stale-if-error must go too.
    machine = CacheModel()
    try:
        machine.set(key="a", value=1, ttl=3)
        machine.time_passes(seconds=4.0)
        machine.get(key="a")
        machine.redis_goes_down()
        machine.get(key="a")
        machine.redis_matches()
    finally:
        machine.teardown()
