"""The memory tier against a dict model on the real cluster, driven by hypothesis.

tests/unit/test_cache_model.py checks the tiers' TTL and LRU bookkeeping on a fake clock. This
one checks what a user of the memory tier relies on most: whatever mix of writes happens, by
this client, by a batch, or by another client behind its back, a read through the tier never
returns anything but what Redis holds. Every step runs against the session's 6-node cluster
with coherence (RESP3 tracking) on. TTLs are long, so nothing expires during a run: what is
checked is invalidation, not expiry. A write by the other client is followed by a wait, bounded
by a deadline, until the tier has seen it; that wait is the coherence lag, reported at the end.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from resilient_cache import RedisClusterClient, create_redis_cluster
from resilient_cache.stages.memory import MemoryStage

# Two keys share a hash slot ({a}), so RENAME and batches across them are allowed.
KEYS = ["model:{a}1", "model:{a}2", "model:b", "model:c"]
PAIRS = [("model:{a}1", "model:{a}2"), ("model:{a}2", "model:{a}1")]
VALUES = st.binary(min_size=0, max_size=6)
SEEN_DEADLINE = 2.0  # seconds for another client's write to reach the tier
LAGS: list[float] = []


class MemoryTierModel(RuleBasedStateMachine):
    def __init__(self, nodes: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.client: RedisClusterClient = create_redis_cluster(
            nodes,
            autoload=False,
            health_check_interval=0,
            memory={"enabled": True, "ttl": 600, "max_size": 3},  # small: LRU evicts too
        )
        host, port = nodes.split(",")[0].rsplit(":", 1)
        self.other = redis.RedisCluster(host=host, port=int(port))  # plain redis-py, no tier
        self.other.delete(*KEYS)  # one key per slot group: DEL of many keys is per slot here
        self.model: dict[str, bytes] = {}
        self.run(self.client.connect())
        self.tier = dict(zip(self.client.active_stages, self.client._stages, strict=True))["memory"]
        assert isinstance(self.tier, MemoryStage)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.client.disconnect())
        finally:
            self.other.close()
            self.loop.close()

    def _read(self, key: str) -> bytes | None:
        return self.run(self.client.get(key))

    def _await_seen(self, key: str) -> None:
        """After another client's write: wait until a read through the tier shows it."""
        expected = self.model.get(key)
        started = time.monotonic()
        while self._read(key) != expected:
            if time.monotonic() - started > SEEN_DEADLINE:
                raise AssertionError(
                    f"{key}: the tier still served an old value {SEEN_DEADLINE}s after "
                    "another client's write"
                )
            self.run(asyncio.sleep(0.001))
        LAGS.append(time.monotonic() - started)

    # -- writes by this client ------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS), value=VALUES)
    def set(self, key: str, value: bytes) -> None:
        assert self.run(self.client.set(key, value))
        self.model[key] = value

    @rule(key=st.sampled_from(KEYS), value=VALUES)
    def append(self, key: str, value: bytes) -> None:
        self.run(self.client.append(key, value))
        self.model[key] = self.model.get(key, b"") + value

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: str) -> None:
        self.run(self.client.delete(key))
        self.model.pop(key, None)

    @rule(pair=st.sampled_from(PAIRS))
    def rename(self, pair: tuple[str, str]) -> None:
        source, target = pair
        if source not in self.model:
            return  # RENAME of a missing key is an error reply; nothing changes
        self.run(self.client.rename(source, target))
        self.model[target] = self.model.pop(source)

    @rule(pair=st.sampled_from(PAIRS), value=VALUES)
    def batch(self, pair: tuple[str, str], value: bytes) -> None:
        first, second = pair

        async def send() -> list[Any]:
            async with self.client.pipeline(transaction=True) as tx:
                tx.set(first, value).append(second, value).get(first)
                return await tx.execute()

        replies = self.run(send())
        self.model[first] = value
        self.model[second] = self.model.get(second, b"") + value
        assert replies[-1] == value

    # -- writes by another client ---------------------------------------------------------

    @rule(key=st.sampled_from(KEYS), value=VALUES)
    def other_sets(self, key: str, value: bytes) -> None:
        self._read(key)  # likely cached now: the other write must evict it
        self.other.set(key, value)
        self.model[key] = value
        self._await_seen(key)

    @rule(key=st.sampled_from(KEYS))
    def other_deletes(self, key: str) -> None:
        self._read(key)
        self.other.delete(key)
        self.model.pop(key, None)
        self._await_seen(key)

    # -- reads ----------------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS))
    def get_twice(self, key: str) -> None:
        hits = self.tier.hits
        expected = self.model.get(key)
        assert self._read(key) == expected
        assert self._read(key) == expected
        assert self.tier.hits > hits, "the second read of a key is served from memory"

    @rule(key=st.sampled_from(KEYS))
    def strlen(self, key: str) -> None:
        assert self.run(self.client.strlen(key)) == len(self.model.get(key, b""))


def test_memory_tier_matches_a_dict_whatever_the_writes(cluster_nodes: str) -> None:
    LAGS.clear()
    run_state_machine_as_test(
        lambda: MemoryTierModel(cluster_nodes),
        settings=settings(max_examples=25, stateful_step_count=30, deadline=None),
    )
    assert LAGS, "no write by another client was generated"
    LAGS.sort()
    print(
        f"\nmemory tier model: {len(LAGS)} writes by another client seen after median "
        f"{LAGS[len(LAGS) // 2] * 1000:.2f} ms, max {LAGS[-1] * 1000:.2f} ms"
    )
