"""Topology faults that kill nothing: a manual failover, a paused primary, a slot being migrated
and a slot nobody serves. Each test restores the slot map and the roles it changed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache import (
    CircuitBreakerOpenError,
    CommandInDoubtError,
    CommandTimeoutError,
    create_redis_cluster,
)
from tests.conftest import async_wait_until

CONCURRENCY = 20

# The original guide's options (DESIGN §6), used wherever a test does not need others.
GUIDE_OPTIONS = dict(max_retries=3, retry_delay=1.0, health_check_interval=0, autoload=False)

#: These tests run with auto-pipelining off and on: a batch's MOVED, ASK, TRYAGAIN, CLUSTERDOWN
#: and broken connections must be handled per command, as they are without it.
AUTO_PIPELINE = pytest.mark.parametrize("auto_pipeline", [False, True], ids=["alone", "auto"])


# --------------------------------------------------------------------------- helpers


def _keys_by_owner(cluster, pattern: str, owner_port: int, mine: int, others: int):
    """``mine`` keys on ``owner_port``'s shard and ``others`` keys elsewhere (hash tags pick
    the slot): ``pattern`` is formatted with ``n``."""
    on, off = [], []
    n = 0
    while len(on) < mine or len(off) < others:
        key = pattern.format(n=n)
        n += 1
        port = cluster.primary_for_key(key).port
        if port == owner_port and len(on) < mine:
            on.append(key)
        elif port != owner_port and len(off) < others:
            off.append(key)
    return on, off


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err} (attempts={getattr(err, 'attempts', None)})"


async def _timed(coro):
    """(seconds, reply, error) of one call; any exception is an outcome, not a crash: redis-py's
    RedisClusterException is not even a RedisError."""
    started = time.monotonic()
    try:
        reply = await coro
    except Exception as err:
        return time.monotonic() - started, None, err
    return time.monotonic() - started, reply, None


def _slots_of(cluster, node) -> set[int]:
    """The slots ``node`` serves, as ``node`` itself says (CLUSTER SLOTS)."""
    slots: set[int] = set()
    for entry in cluster.admin(node).cluster("SLOTS"):
        if int(entry[2][1]) == node.port:
            slots.update(range(int(entry[0]), int(entry[1]) + 1))
    return slots


def _node_id(cluster, node) -> str:
    return str(cluster.admin(node).cluster("MYID"))


def _owner_port_of_slot(cluster, slot: int, observer) -> int | None:
    for entry in cluster.admin(observer).cluster("SLOTS"):
        if int(entry[0]) <= slot <= int(entry[1]):
            return int(entry[2][1])
    return None


def _start_migration(cluster, slot: int, source, target) -> None:
    """Redis' migration protocol, first step: target IMPORTING, source MIGRATING."""
    cluster.admin(target).cluster("SETSLOT", slot, "IMPORTING", _node_id(cluster, source))
    cluster.admin(source).cluster("SETSLOT", slot, "MIGRATING", _node_id(cluster, target))


def _migrate_keys(cluster, source, target, keys: list[str]) -> None:
    cluster.admin(source).execute_command(
        "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys
    )


def _finish_migration(cluster, slot: int, source, target) -> None:
    """Move the keys of ``slot`` still on ``source``, then assign the slot to ``target`` on the
    target, the source and every other primary (replicas follow by gossip). Idempotent."""
    while True:
        left = cluster.admin(source).cluster("GETKEYSINSLOT", slot, 100)
        if not left:
            break
        _migrate_keys(cluster, source, target, list(left))
    target_id = _node_id(cluster, target)
    ordered = [target, source] + [
        p for p in cluster.primaries() if p.port not in (target.port, source.port)
    ]
    for node in ordered:
        cluster.admin(node).cluster("SETSLOT", slot, "NODE", target_id)


def _move_slot(cluster, slot: int, source, target) -> None:
    _start_migration(cluster, slot, source, target)
    _finish_migration(cluster, slot, source, target)


def _manual_failover(cluster, replica, primary, timeout: float = 15.0) -> None:
    """CLUSTER FAILOVER on ``replica`` (coordinated: no write is lost) and wait until the roles
    have swapped and every node agrees."""
    cluster.wait_ready(timeout=30)  # the replica must be in sync for a manual failover
    cluster.admin(replica).cluster("FAILOVER")
    cluster.wait_for(
        lambda: (
            {n.port for n in cluster.primaries()} >= {replica.port}
            and primary.port not in {n.port for n in cluster.primaries()}
        ),
        timeout,
        f"{replica.address} to take over from {primary.address}",
    )
    cluster.wait_ready(timeout=30)


# --------------------------------------------------------------------------- 1. CLUSTER FAILOVER


@AUTO_PIPELINE
async def test_manual_failover_under_load_loses_no_acknowledged_write(
    ready_cluster, auto_pipeline: bool
) -> None:
    cluster = ready_cluster
    # A shard of its own per variant: after a failover, the primaries refuse to vote for another
    # replica of the same shard for 2 x node-timeout (Redis' rule), and this test's first variant
    # has just failed its shard over and back.
    victim = sorted(cluster.primaries(), key=lambda node: node.port)[int(auto_pipeline)]
    set_prefix = f"fo:set:{'auto' if auto_pipeline else 'alone'}"  # not the other variant's
    replica = cluster.replica_of(victim)
    assert replica is not None
    counters_victim, counters_other = _keys_by_owner(
        cluster, "fo:counter:{{{n}}}", victim.port, 4, 8
    )
    counters = counters_victim + counters_other
    victim_slots = _slots_of(cluster, victim)
    client = create_redis_cluster(
        cluster.startup_nodes, auto_pipeline=auto_pipeline, **GUIDE_OPTIONS
    )

    acked_sets: set[str] = set()
    doubtful_sets: set[str] = set()
    acked: Counter[str] = Counter()
    in_doubt: Counter[str] = Counter()
    errors: list[str] = []
    slowest = [0.0]
    stop = asyncio.Event()
    failover_at = 0.0

    async def worker(i: int) -> None:
        j = 0
        while not stop.is_set():
            j += 1
            started = time.monotonic()
            if j % 2:
                key = f"{set_prefix}:{i}:{j}"
                try:
                    await client.set(key, key)
                    acked_sets.add(key)
                except CommandInDoubtError:
                    doubtful_sets.add(key)
                except Exception as err:
                    errors.append(f"SET +{started - failover_at:.2f}s {_describe(err)}")
            else:
                key = counters[(i + j) % len(counters)]
                try:
                    await client.incr(key)
                    acked[key] += 1
                except CommandInDoubtError:
                    in_doubt[key] += 1
                except Exception as err:
                    errors.append(f"INCR +{started - failover_at:.2f}s {_describe(err)}")
            slowest[0] = max(slowest[0], time.monotonic() - started)
            await asyncio.sleep(0.001)

    swapped = False
    try:
        async with client:
            await client.delete(*counters)
            tasks = [asyncio.create_task(worker(i)) for i in range(CONCURRENCY)]
            await asyncio.sleep(1.0)
            before = sum(acked.values()) + len(acked_sets)
            failover_at = time.monotonic()
            await asyncio.to_thread(cluster.admin(replica).cluster, "FAILOVER")
            await asyncio.to_thread(
                cluster.wait_for,
                lambda: (
                    replica.port in {n.port for n in cluster.primaries()}
                    and victim.port not in {n.port for n in cluster.primaries()}
                ),
                15,
                f"{replica.address} to take over",
            )
            swapped = True
            promoted_at = time.monotonic()
            await asyncio.to_thread(cluster.wait_ready, 30)
            agreed_at = time.monotonic()
            # Keep the load on until the failed-over shard has taken plenty of writes.
            mark = sum(acked[k] for k in counters_victim)

            async def victim_writes_resumed() -> bool:
                return sum(acked[k] for k in counters_victim) >= mark + 50

            await async_wait_until(
                victim_writes_resumed, 10, "writes to the failed-over shard to resume"
            )
            resumed_at = time.monotonic()
            stop.set()
            await asyncio.gather(*tasks)
            during_load = client.get_metrics().commands

            # Every acknowledged SET reads back; nothing else under the prefix exists.
            keys = sorted(acked_sets | doubtful_sets)
            values: dict[str, bytes | None] = {}
            for start in range(0, len(keys), 50):  # well under a node's connection pool
                chunk = keys[start : start + 50]
                replies = await asyncio.gather(*(client.get(k) for k in chunk))
                values.update(zip(chunk, replies, strict=True))
            finals = {key: int(await client.get(key) or 0) for key in counters}
            stored: set[str] = set()
            for node in cluster.primaries():
                stored.update(cluster.admin(node).scan_iter(match=f"{set_prefix}:*", count=1000))
    finally:
        if swapped:  # give the shard back to its first primary: the next test expects it
            await asyncio.to_thread(_manual_failover, cluster, victim, replica)

    lost = [k for k in acked_sets if values[k] != k.encode()]
    wrong_doubtful = [k for k in doubtful_sets if values[k] not in (None, k.encode())]
    sets_on_victim = sum(1 for k in acked_sets if key_slot(k.encode()) in victim_slots)
    doubt_victim = sum(in_doubt[k] for k in counters_victim)
    doubt_other = sum(in_doubt[k] for k in counters_other) + len(doubtful_sets)
    print(
        f"\nmanual failover: promoted {promoted_at - failover_at:.2f}s, all nodes agree "
        f"{agreed_at - failover_at:.2f}s, writes there resumed by "
        f"{resumed_at - failover_at:.2f}s after CLUSTER FAILOVER; acked SET {len(acked_sets)} "
        f"({sets_on_victim} on the failed-over shard), INCR {sum(acked.values())}; in-doubt "
        f"{doubt_victim} on that shard, {doubt_other} elsewhere; other errors {len(errors)}; "
        f"slowest call {slowest[0] * 1000:.0f} ms; retried {during_load.retried}"
    )
    assert before > 0 and sets_on_victim > 0
    assert errors == [], errors[:10]
    assert lost == [], f"{len(lost)} acknowledged SETs lost, e.g. {lost[:5]}"
    assert wrong_doubtful == [], wrong_doubtful[:5]
    assert acked_sets <= stored
    assert stored - acked_sets <= doubtful_sets, sorted(stored - acked_sets - doubtful_sets)[:5]
    for key in counters:
        assert acked[key] <= finals[key] <= acked[key] + in_doubt[key], (
            key,
            acked[key],
            in_doubt[key],
            finals[key],
        )


# --------------------------------------------------------------------------- 2. CLIENT PAUSE

PAUSE_MS = 1500
PAUSE_DEADLINE = 5.0


async def test_client_pause_delays_writes_on_one_shard_only(ready_cluster) -> None:
    cluster = ready_cluster
    victim = cluster.primary_for_key("pause:victim")
    counters_victim, counters_other = _keys_by_owner(
        cluster, "pause:counter:{{{n}}}", victim.port, 4, 4
    )
    client = create_redis_cluster(
        cluster.startup_nodes, timeout={"deadline": PAUSE_DEADLINE}, **GUIDE_OPTIONS
    )
    # (shard, started, seconds) of every acknowledged write.
    done: list[tuple[str, float, float]] = []
    errors: list[str] = []
    stop = asyncio.Event()

    async def worker(i: int, shard: str, counters: list[str]) -> None:
        j = 0
        while not stop.is_set():
            j += 1
            counter = counters[(i + j) % len(counters)]
            tag = counter[counter.index("{") :]  # same slot as the counter
            started = time.monotonic()
            try:
                if j % 2:
                    key = f"pause:set:{tag}:{i}:{j}"
                    await client.set(key, key)
                else:
                    await client.incr(counter)
                done.append((shard, started, time.monotonic() - started))
            except Exception as err:
                errors.append(f"{shard} {_describe(err)}")
            await asyncio.sleep(0.001)

    async with client:
        await client.delete(*counters_victim, *counters_other)
        half = CONCURRENCY // 2
        tasks = [asyncio.create_task(worker(i, "victim", counters_victim)) for i in range(half)]
        tasks += [asyncio.create_task(worker(i, "other", counters_other)) for i in range(half)]
        try:
            await asyncio.sleep(0.5)
            paused_at = time.monotonic()
            await asyncio.to_thread(
                cluster.admin(victim).execute_command, "CLIENT", "PAUSE", PAUSE_MS, "WRITE"
            )
            pause_end = paused_at + PAUSE_MS / 1000

            # Writes on the paused shard that started after the pause are acknowledged again.
            async def victim_writes_resumed() -> bool:
                after = [t for s, t, _ in done if s == "victim" and t > pause_end + 0.1]
                return len(after) >= 50

            await async_wait_until(
                victim_writes_resumed,
                PAUSE_MS / 1000 + 5,
                "writes on the paused shard to resume",
            )
            resumed_at = time.monotonic()
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await asyncio.to_thread(cluster.admin(victim).execute_command, "CLIENT", "UNPAUSE")
        metrics = client.get_metrics()
        open_breakers = client.breakers.open_scopes()

    in_pause = [(s, t, d) for s, t, d in done if paused_at <= t < pause_end]
    victim_slowest = max(d for s, _, d in done if s == "victim")
    other_slowest = max(d for s, _, d in done if s == "other")
    other_in_pause = sum(1 for s, _, _ in in_pause if s == "other")
    print(
        f"\nclient pause {PAUSE_MS} ms WRITE: paused-shard slowest write "
        f"{victim_slowest * 1000:.0f} ms, writes there resumed {resumed_at - pause_end:.2f}s "
        f"after the pause ended; other shards slowest {other_slowest * 1000:.0f} ms, "
        f"{other_in_pause} writes during the pause; total {metrics.commands.total}, "
        f"failed {metrics.commands.failed}, retried {metrics.commands.retried}, "
        f"errors {len(errors)}, open breakers {open_breakers}"
    )
    assert errors == [], errors[:10]
    # The pause was real: some write on the paused shard waited most of it out ...
    assert victim_slowest >= PAUSE_MS / 1000 * 0.6, victim_slowest
    # ... and it was a delay, not a failure: nothing retried, failed or tripped a breaker.
    assert metrics.commands.failed == 0
    assert metrics.commands.retried == 0
    assert open_breakers == []
    # The other shards kept going through the pause, never held up by it.
    assert other_in_pause > 0
    assert other_slowest < PAUSE_MS / 1000 / 2, other_slowest


# --------------------------------------------------------------------------- 3. slot migration

MIGRATION_DEADLINE = 5.0
ASK_ROUNDS = 2
FINISH_AFTER = 2.0


def _migration_setup(cluster, tag: str):
    keys = [f"{{{tag}}}:{i}" for i in range(4)]
    source = cluster.primary_for_key(keys[0])
    target = next(p for p in cluster.primaries() if p.port != source.port)
    return keys, source, target, key_slot(keys[0].encode())


def _restore_slot(cluster, slot: int, source, target) -> None:
    """Whatever state a started migration was left in, give the slot back to ``source``."""
    _finish_migration(cluster, slot, source, target)
    _move_slot(cluster, slot, target, source)
    cluster.wait_ready(timeout=30)
    assert _owner_port_of_slot(cluster, slot, source) == source.port


@AUTO_PIPELINE
async def test_migrating_slot_ask_is_no_failure_and_tryagain_is_retried(
    ready_cluster, auto_pipeline: bool
) -> None:
    cluster = ready_cluster
    keys, source, target, slot = _migration_setup(cluster, "mig")
    client = create_redis_cluster(
        cluster.startup_nodes,
        auto_pipeline=auto_pipeline,
        timeout={"deadline": MIGRATION_DEADLINE},
        **GUIDE_OPTIONS,
    )
    finisher: asyncio.Task[None] | None = None
    migrating = False
    try:
        async with client:
            for key in keys:
                await client.set(key, key)
            migrating = True
            await asyncio.to_thread(_start_migration, cluster, slot, source, target)
            await asyncio.to_thread(_migrate_keys, cluster, source, target, keys[:1])
            before = client.get_metrics().commands

            # ASK: redis-py follows it inside one attempt; not a failure, not a retry.
            ask_elapsed, reply, err = await _timed(client.get(keys[0]))
            assert err is None, _describe(err)
            assert reply == keys[0].encode()
            assert await client.get(keys[1]) == keys[1].encode()  # still on the source
            after_ask = client.get_metrics().commands
            assert after_ask.retried == before.retried
            assert after_ask.failed == before.failed
            assert not client.is_circuit_breaker_open()

            # TRYAGAIN: the keys of one slot are split between source and target. We choose
            # that the library retries it (short delays, within the deadline) until the
            # migration finishes, which happens in the background FINISH_AFTER seconds later.
            async def finish_later() -> None:
                await asyncio.sleep(FINISH_AFTER)
                await asyncio.to_thread(_finish_migration, cluster, slot, source, target)

            finisher = asyncio.create_task(finish_later())
            mget_elapsed, values, err = await _timed(client.mget(keys))
            await finisher
            after_mget = client.get_metrics().commands
            print(
                f"\nslot migration: ASK-redirected GET {ask_elapsed * 1000:.1f} ms, "
                f"{after_ask.retried - before.retried} retries; MGET across the split slot "
                f"{'failed' if err else 'succeeded'} after {mget_elapsed:.2f}s with "
                f"{after_mget.retried - after_ask.retried} retries (migration finished at "
                f"{FINISH_AFTER:.1f}s)" + (f": {_describe(err)}" if err else "")
            )
            if err is not None:
                raise err
            assert values == [k.encode() for k in keys]
            assert FINISH_AFTER * 0.9 <= mget_elapsed <= MIGRATION_DEADLINE + 0.1, mget_elapsed
            assert after_mget.retried > after_ask.retried  # visible retries, not hidden ones
            assert not client.is_circuit_breaker_open()
    finally:
        if finisher is not None:
            await asyncio.gather(finisher, return_exceptions=True)
        if migrating:
            await asyncio.to_thread(_restore_slot, cluster, slot, source, target)


@AUTO_PIPELINE
async def test_concurrent_ask_redirects_are_no_failures(ready_cluster, auto_pipeline: bool) -> None:
    cluster = ready_cluster
    keys, source, target, slot = _migration_setup(cluster, "askload")
    _, elsewhere = _keys_by_owner(cluster, "askload:other:{{{n}}}", source.port, 0, 4)
    client = create_redis_cluster(
        cluster.startup_nodes,
        auto_pipeline=auto_pipeline,
        timeout={"deadline": MIGRATION_DEADLINE},
        **GUIDE_OPTIONS,
    )
    migrating = False
    try:
        async with client:
            for key in keys + elsewhere:
                await client.set(key, key)
            migrating = True
            await asyncio.to_thread(_start_migration, cluster, slot, source, target)
            await asyncio.to_thread(_migrate_keys, cluster, source, target, keys[:1])
            before = client.get_metrics().commands
            started = time.monotonic()
            outcomes = []
            for _round in range(ASK_ROUNDS):
                calls = [client.get(keys[0]) for _ in range(CONCURRENCY)]
                calls += [client.get(k) for k in elsewhere]
                outcomes += await asyncio.gather(*calls, return_exceptions=True)
            elapsed = time.monotonic() - started
            after = client.get_metrics().commands
            open_breakers = client.breakers.open_scopes()
    finally:
        if migrating:
            await asyncio.to_thread(_restore_slot, cluster, slot, source, target)

    expected = ([keys[0].encode()] * CONCURRENCY + [k.encode() for k in elsewhere]) * ASK_ROUNDS
    wrong = Counter(
        _describe(o)[:90] if isinstance(o, BaseException) else repr(o)[:40]
        for o, e in zip(outcomes, expected, strict=True)
        if o != e
    )
    print(
        f"\nconcurrent ASK: {len(outcomes)} GETs in {elapsed:.2f}s, wrong outcomes "
        f"{sum(wrong.values())}, retried {after.retried - before.retried}, failed "
        f"{after.failed - before.failed}, open breakers {open_breakers}"
    )
    assert not wrong, wrong.most_common(5)
    assert after.retried == before.retried
    assert after.failed == before.failed
    assert open_breakers == []


# --------------------------------------------------------------------------- 4. uncovered slot

HOLE_DEADLINE = 2.0
RECOVERY_DEADLINE = 10.0
# Errors that say what is wrong. CircuitBreakerOpenError is the documented fast refusal
# (DESIGN §5) once CLUSTERDOWN replies have opened the node's breaker. A connection error is
# possible too: on a CLUSTERDOWN reply redis-py 8.1 closes every connection of the client
# (RedisCluster.aclose() in _execute_command), so a command in flight at that moment loses its
# connection; it is retried, and reported as that ConnectionError if the deadline runs out.
CLEAR_ERRORS = (
    ClusterDownError,
    SlotNotCoveredError,
    CommandTimeoutError,
    CircuitBreakerOpenError,
    RedisConnectionError,
)


@AUTO_PIPELINE
async def test_uncovered_slot_fails_clearly_within_deadline_then_recovers(
    ready_cluster, auto_pipeline: bool
) -> None:
    cluster = ready_cluster
    hole_key = "hole:{slot}"
    owner = cluster.primary_for_key(hole_key)
    slot = key_slot(hole_key.encode())
    same_node, other_nodes = _keys_by_owner(cluster, "hole:other:{{{n}}}", owner.port, 1, 2)
    other_keys = same_node + other_nodes
    # Short breaker reset: this test is about the client's own state coming back, not about
    # sitting out the default 60 s open period if CLUSTERDOWN replies opened a breaker.
    client = create_redis_cluster(
        cluster.startup_nodes,
        auto_pipeline=auto_pipeline,
        timeout={"deadline": HOLE_DEADLINE},
        circuit_breaker_timeout=1.0,
        **GUIDE_OPTIONS,
    )
    try:
        async with client:
            for key in [hole_key, *other_keys]:
                await client.set(key, "v")
            for node in cluster.nodes:  # every node's view: nobody serves the slot any more
                await asyncio.to_thread(cluster.admin(node).cluster, "DELSLOTS", slot)
            await asyncio.to_thread(
                cluster.wait_for,
                lambda: all(
                    cluster.cluster_info(n)["cluster_state"] == "fail" for n in cluster.nodes
                ),
                10,
                "every node to report cluster_state:fail",
            )
            # Round 1 all at once, round 2 the uncovered slot alone (a stale client state).
            round1 = await asyncio.gather(
                _timed(client.get(hole_key)),
                _timed(client.set(hole_key, "w")),
                *(_timed(client.get(k)) for k in other_keys),
            )
            round2 = [await _timed(client.get(hole_key)) for _ in range(2)]
            hole_outcomes = round1[:2] + round2
            other_outcomes = round1[2:]
            breakers_during = client.breakers.open_scopes()

            readded_at = time.monotonic()
            await asyncio.to_thread(cluster.admin(owner).cluster, "ADDSLOTS", slot)

            async def serves_again() -> bool:
                outcomes = await asyncio.gather(
                    *(_timed(client.get(k)) for k in [hole_key, *other_keys])
                )
                return all(reply == b"v" for _, reply, _ in outcomes)

            await async_wait_until(
                serves_again, RECOVERY_DEADLINE, "the same client to serve again", interval=0.1
            )
            recovered = time.monotonic() - readded_at
    finally:
        if _owner_port_of_slot(cluster, slot, owner) is None:  # the test stopped half-way
            await asyncio.to_thread(cluster.admin(owner).cluster, "ADDSLOTS", slot)
        await asyncio.to_thread(cluster.wait_ready, 30)

    def show(outcomes) -> str:
        return "; ".join(
            f"{elapsed:.2f}s " + (_describe(err)[:110] if err else f"ok {reply!r}")
            for elapsed, reply, err in outcomes
        )

    print(
        f"\nuncovered slot: its commands: {show(hole_outcomes)}\n  other slots (cluster "
        f"down everywhere): {show(other_outcomes)}\n  breakers open during: {breakers_during}; "
        f"same client served again {recovered:.2f}s after ADDSLOTS"
    )
    for elapsed, _, err in hole_outcomes:
        assert err is not None
        assert elapsed <= HOLE_DEADLINE + 0.1, elapsed
        assert isinstance(err, CLEAR_ERRORS), _describe(err)
    # With cluster-require-full-coverage yes (the default) Redis refuses every slot while one is
    # uncovered; whatever the client reports there must be bounded and clear as well.
    for elapsed, _, err in other_outcomes:
        assert elapsed <= HOLE_DEADLINE + 0.1, elapsed
        assert err is None or isinstance(err, CLEAR_ERRORS), _describe(err)


@AUTO_PIPELINE
async def test_a_clusterdown_reply_leaves_other_nodes_commands_in_flight_alone(
    ready_cluster,
    auto_pipeline: bool,
) -> None:
    """redis-py answers a CLUSTERDOWN reply by closing every connection of every node, those
    other callers are waiting on included (during a failover with full coverage required, the
    promoted replica's breaker opened on the connection errors that made). Here one node
    answers CLUSTERDOWN (one slot deleted on it alone) while a GET waits on another, frozen,
    node: that GET must get its reply. No retries, so the first attempt's fate is what the
    caller sees."""
    cluster = ready_cluster
    down_key = "clusterdown:{probe}"
    down = cluster.primary_for_key(down_key)
    slot = key_slot(down_key.encode())
    _, [busy_key] = _keys_by_owner(cluster, "clusterdown:busy:{{{n}}}", down.port, 0, 1)
    busy = cluster.primary_for_key(busy_key)
    client = create_redis_cluster(
        cluster.startup_nodes,
        auto_pipeline=auto_pipeline,
        max_retries=0,
        health_check_interval=0,
        timeout={"deadline": 5.0},
        autoload=False,
    )
    try:
        async with client:
            await client.set(busy_key, "v")
            await asyncio.to_thread(cluster.admin(down).cluster, "DELSLOTS", slot)
            await asyncio.to_thread(
                cluster.wait_for,
                lambda: cluster.cluster_info(down)["cluster_state"] == "fail",
                10,
                f"{down.address} to report cluster_state:fail",
            )
            node = client.backend.raw.get_node(host=busy.host, port=busy.port)
            cluster.pause(busy)
            try:
                waiting = asyncio.create_task(client.get(busy_key))

                async def get_in_flight() -> bool:  # a connection taken and not given back
                    return len(node._connections) > len(node._free)

                await async_wait_until(get_in_flight, 5.0, "the GET to be sent to the frozen node")
                _, _, down_error = await _timed(client.get(down_key))
            finally:
                cluster.resume(busy)
            _, reply, error = await _timed(waiting)
    finally:
        if _owner_port_of_slot(cluster, slot, down) is None:
            await asyncio.to_thread(cluster.admin(down).cluster, "ADDSLOTS", slot)
        await asyncio.to_thread(cluster.wait_ready, 30)
    assert isinstance(down_error, ClusterDownError), _describe(down_error)
    assert error is None, _describe(error)
    assert reply == b"v"
