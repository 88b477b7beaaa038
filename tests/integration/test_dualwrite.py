"""The dualwrite plugin (plugins/dualwrite) between a real standalone redis-server (the old Redis)
and the dev cluster: each mode's reads and writes, the fallback and back-fill, cross-slot
refusals, and the old Redis killed under load in mode dual (no error reaches a caller)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import resilient_cache_dualwrite
from redis.asyncio import Redis
from resilient_cache_dualwrite.stage import (
    BACKFILLS,
    FALLBACKS,
    OUTCOME,
    SOURCE_WRITES,
    CrossSlotCommandError,
    DualWriteStage,
    SourceError,
)

from resilient_cache import ConfigurationError, RedisClusterClient, create_redis_cluster
from resilient_cache.devcluster import StandaloneServer
from tests.conftest import async_wait_until

from .test_telemetry import Otel, otel  # noqa: F401 - the fixture

STAGES = "tracing,metrics,dualwrite,memory,timeout,retry,routing,breaker"
CANARY = "canary-value-7f3a"


def make_client(nodes: str, mode: str, source_url: str, **section: Any) -> RedisClusterClient:
    return create_redis_cluster(
        nodes,
        autoload=True,  # the plugin comes from its entry point, as a user's would
        health_check_interval=0,
        stages=STAGES,
        dualwrite={"mode": mode, "source_url": source_url, **section},
    )


@pytest.fixture
def source_url(standalone_redis: str) -> str:
    return standalone_redis + "/7"  # a database of its own on the shared standalone server


@pytest.fixture
async def source(source_url: str) -> AsyncIterator[Redis]:
    old = Redis.from_url(source_url)
    await old.flushdb()
    yield old
    await old.flushdb()
    await old.aclose()


@pytest.fixture
def prefix() -> str:
    return f"dw:{uuid.uuid4().hex[:8]}:"


def stage_of(client: RedisClusterClient) -> DualWriteStage:
    stage = client.stage("dualwrite")
    assert isinstance(stage, DualWriteStage)
    return stage


async def drained(stage: DualWriteStage) -> None:
    async def empty() -> bool:
        return stage.pending == 0

    await async_wait_until(empty, 10, "the queue for the old Redis to drain")


# --------------------------------------------------------------------------- settings


def test_the_plugin_is_found_through_its_entry_point(cluster_nodes: str, source_url: str) -> None:
    client = make_client(cluster_nodes, "dual", source_url)
    assert "dualwrite" in client.active_stages
    assert resilient_cache_dualwrite.__version__ != "0+unknown"


@pytest.mark.parametrize("mode", ["off", "cluster"])
def test_modes_off_and_cluster_leave_the_stage_out(cluster_nodes: str, mode: str) -> None:
    client = make_client(cluster_nodes, mode, "")
    assert "dualwrite" not in client.active_stages


@pytest.mark.parametrize("mode", ["shadow", "dual"])
def test_a_mode_that_needs_the_old_redis_names_its_variable(cluster_nodes: str, mode: str) -> None:
    with pytest.raises(ConfigurationError, match=r"dualwrite\.source_url \(keyword") as caught:
        create_redis_cluster(cluster_nodes, stages=STAGES, dualwrite={"mode": mode})
    assert f"mode {mode}" in str(caught.value)


def test_a_bad_url_is_named_without_its_password(
    cluster_nodes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_DUALWRITE__MODE", "dual")
    monkeypatch.setenv("REDIS_DUALWRITE__SOURCE_URL", "http://:hunter2-secret@old-redis:6379")
    with pytest.raises(ConfigurationError, match="REDIS_DUALWRITE__SOURCE_URL") as caught:
        create_redis_cluster(cluster_nodes, stages=STAGES)
    assert "hunter2" not in str(caught.value)


# --------------------------------------------------------------------------- shadow


async def test_shadow(cluster_nodes: str, source_url: str, source: Redis, prefix: str) -> None:
    client = make_client(cluster_nodes, "shadow", source_url)
    plain = create_redis_cluster(cluster_nodes, health_check_interval=0, autoload=False)
    async with client, plain:
        # Writes reach both; the caller gets the old Redis's reply.
        assert await client.set(prefix + "a", "1") is True
        assert await source.get(prefix + "a") == b"1"
        assert await plain.get(prefix + "a") == b"1"
        # Keyed reads come from the old Redis, the truth in this mode.
        await plain.set(prefix + "a", "cluster-only")
        assert await client.get(prefix + "a") == b"1"
        # A write the cluster refuses (the key has another type there) still succeeds.
        await plain.set(prefix + "list", "a string on the cluster only")
        assert await client.lpush(prefix + "list", "x") == 1
        assert stage_of(client).stats.cluster_write_failures == 1
        assert await source.lrange(prefix + "list", 0, -1) == [b"x"]
        # The old Redis's own errors are the caller's, without the command's arguments.
        await source.set(prefix + "s", CANARY)
        with pytest.raises(SourceError) as caught:
            await client.hset(prefix + "s", "field", CANARY)
        assert caught.value.kind == "ResponseError" and CANARY not in str(caught.value)
        assert prefix not in str(caught.value)
        # Keyless commands are the cluster's business.
        assert await client.ping() is True
        # A transaction runs on the old Redis as one, then on the cluster.
        pipe = client.pipeline(transaction=True)
        pipe.incr(prefix + "{t}n")
        pipe.incr(prefix + "{t}n")
        assert await pipe.execute() == [1, 2]
        assert await source.get(prefix + "{t}n") == b"2"
        assert await plain.get(prefix + "{t}n") == b"2"
        await plain.delete(prefix + "a", prefix + "list", prefix + "{t}n")


# --------------------------------------------------------------------------- dual


async def test_dual_writes_reach_the_old_redis_in_order(
    cluster_nodes: str, source_url: str, source: Redis, prefix: str
) -> None:
    client = make_client(cluster_nodes, "dual", source_url)
    async with client:
        stage = stage_of(client)
        for i in range(200):
            await client.set(prefix + "k", str(i))
            await client.incr(prefix + "n")
        await client.delete(prefix + "gone-a", prefix + "gone-b")  # split per slot by the client
        await source.set(prefix + "gone-a", "x")
        await source.set(prefix + "gone-b", "x")
        await client.delete(prefix + "gone-a", prefix + "gone-b")
        pipe = client.pipeline(transaction=True)
        pipe.set(prefix + "{t}a", "1").set(prefix + "{t}b", "2")
        await pipe.execute()
        await drained(stage)
        assert await source.get(prefix + "k") == b"199"
        assert await source.get(prefix + "n") == b"200"
        assert await source.exists(prefix + "gone-a", prefix + "gone-b") == 0
        assert await source.mget(prefix + "{t}a", prefix + "{t}b") == [b"1", b"2"]
        assert stage.stats.source_writes_failed == stage.stats.source_writes_dropped == 0
        await client.delete(prefix + "k", prefix + "n", prefix + "{t}a", prefix + "{t}b")


async def test_dual_reads_fall_back_to_the_old_redis_and_back_fill(
    cluster_nodes: str, source_url: str, source: Redis, prefix: str
) -> None:
    client = make_client(cluster_nodes, "dual", source_url)
    plain = create_redis_cluster(cluster_nodes, health_check_interval=0, autoload=False)
    async with client, plain:
        stage = stage_of(client)
        await source.set(prefix + "old", "from-the-old-redis", ex=300)
        await source.hset(prefix + "h", mapping={"f": "v"})
        assert await client.get(prefix + "old") == b"from-the-old-redis"
        assert await client.hgetall(prefix + "h") == {b"f": b"v"}
        assert stage.stats.fallbacks_found == 2 and stage.stats.backfills == 2
        # Back-filled, with the TTL kept.
        assert await plain.get(prefix + "old") == b"from-the-old-redis"
        assert 290 <= await plain.ttl(prefix + "old") <= 300
        assert await plain.hgetall(prefix + "h") == {b"f": b"v"}
        # A miss on both: the cluster's reply, counted.
        assert await client.get(prefix + "nowhere") is None
        assert stage.stats.fallbacks_absent == 1
        # An empty value that exists on the cluster is a real reply: the old Redis is not asked.
        await plain.set(prefix + "empty", "")
        await source.set(prefix + "empty", "stale")
        assert await client.get(prefix + "empty") == b""
        assert stage.stats.fallbacks_found == 2
        await plain.delete(prefix + "old", prefix + "h", prefix + "empty")


async def test_cross_slot_commands_are_refused_before_either_redis(
    cluster_nodes: str, source_url: str, source: Redis, prefix: str
) -> None:
    for mode in ("shadow", "dual"):
        client = make_client(cluster_nodes, mode, source_url)
        async with client:
            keys = [f"{prefix}{mode}:{i}" for i in range(5)]
            args = [part for key in keys for part in (key, CANARY)]
            with pytest.raises(CrossSlotCommandError) as caught:
                await client.execute_command("MSET", *args)
            message = str(caught.value)
            assert "hash tag" in message and CANARY not in message and prefix not in message
            assert isinstance(caught.value, redis.ResponseError)
            assert await source.exists(*keys) == 0
            # With a hash tag the same command is fine, and reaches both.
            tagged = [f"{{{prefix}{mode}}}:{i}" for i in range(5)]
            await client.execute_command("MSET", *[p for k in tagged for p in (k, "v")])
            if mode == "dual":
                await drained(stage_of(client))
            assert await source.exists(*tagged) == 5
            await client.delete(*tagged)


# --------------------------------------------------------------------------- the old Redis dies


@pytest.fixture
def doomed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneServer]:
    with StandaloneServer(base_dir=tmp_path_factory.mktemp("doomed")) as server:
        yield server


async def test_old_redis_killed_during_dual_no_caller_sees_an_error(
    cluster_nodes: str,
    doomed_server: StandaloneServer,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_cache_dualwrite")
    client = make_client(
        cluster_nodes,
        "dual",
        doomed_server.url,
        source_timeout=0.2,
        retry_interval=0.05,
        max_attempts=2,
        queue_size=500,
        drain_timeout=0.5,
    )
    errors: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            key = f"{prefix}{i}:{n % 20}"
            n += 1
            try:
                await client.set(key, str(n))
                await client.get(key)
                await client.get(f"{prefix}missing:{i}:{n}")  # a miss: asks the old Redis
                calls["ok"] += 1
            except Exception as err:
                errors[type(err).__name__] += 1
            await asyncio.sleep(0)

    async with client:
        stage = stage_of(client)
        tasks = [asyncio.create_task(worker(i)) for i in range(10)]

        async def some_writes_reached_it() -> bool:
            return stage.stats.source_writes_ok > 100

        await async_wait_until(some_writes_reached_it, 10, "writes to reach the old Redis")
        process = doomed_server.node.process
        assert process is not None
        process.kill()
        await asyncio.to_thread(process.wait, 10)
        before = calls["ok"]

        async def went_on() -> bool:  # callers keep being served, and the losses are counted
            lost = stage.stats.source_writes_failed + stage.stats.source_writes_dropped
            return calls["ok"] > before + 200 and lost > 0 and stage.stats.fallbacks_failed > 0

        await async_wait_until(went_on, 20, "callers served while the old Redis is dead")
        stop.set()
        await asyncio.gather(*tasks)
        await client.delete(*[f"{prefix}{i}:{n}" for i in range(10) for n in range(20)])
    assert errors == Counter(), errors
    assert any("old Redis" in record.getMessage() for record in caplog.records)
    print(
        f"\nold Redis killed under dual: {calls['ok']} rounds, 0 errors; writes to it ok "
        f"{stage.stats.source_writes_ok}, failed {stage.stats.source_writes_failed}, dropped "
        f"{stage.stats.source_writes_dropped}; fallbacks that could not ask it "
        f"{stage.stats.fallbacks_failed}"
    )


async def test_the_counters_reach_an_otlp_endpoint(
    otel: Otel,  # noqa: F811 - the fixture
    cluster_nodes: str,
    source_url: str,
    source: Redis,
    prefix: str,
) -> None:
    client = otel.client(
        cluster_nodes,
        plugins=[resilient_cache_dualwrite],
        stages=STAGES,
        dualwrite={"mode": "dual", "source_url": source_url},
    )
    async with client:
        await source.set(prefix + "old", "v")
        for i in range(3):
            await client.set(f"{prefix}{i}", "v")
        assert await client.get(prefix + "old") == b"v"
        assert await client.get(prefix + "nowhere") is None
        await drained(stage_of(client))
        await client.delete(prefix + "old", *[f"{prefix}{i}" for i in range(3)])
        await drained(stage_of(client))
    metrics = otel.metrics()
    writes = metrics[SOURCE_WRITES]
    assert writes.monotonic and writes.scope == "resilient_cache_dualwrite"
    assert writes.total(**{OUTCOME: "ok"}) >= 4  # three SETs and the DELs, at least
    assert writes.total(**{OUTCOME: "failed"}) == writes.total(**{OUTCOME: "dropped"}) == 0
    assert metrics[FALLBACKS].total(**{OUTCOME: "found"}) == 1
    assert metrics[FALLBACKS].total(**{OUTCOME: "absent"}) == 1
    assert metrics[BACKFILLS].total() == 1
