from __future__ import annotations

import random

import pytest

from resilient_cache.telemetry import CommandStats


def test_counts_and_percentiles_on_a_known_distribution() -> None:
    stats = CommandStats(window=10_000)
    values = [i / 1000.0 for i in range(1, 1001)]  # 1 ms .. 1000 ms
    random.Random(7).shuffle(values)
    for i, seconds in enumerate(values):
        stats.record(seconds, ok=i % 10 != 0)
    stats.retried = 5
    snap = stats.snapshot()
    assert (snap.commands.total, snap.commands.successful, snap.commands.failed) == (1000, 900, 100)
    assert snap.commands.retried == 5
    assert snap.latency.p50 == pytest.approx(500.0)
    assert snap.latency.p95 == pytest.approx(950.0)
    assert snap.latency.p99 == pytest.approx(990.0)
    assert snap.latency.avg == pytest.approx(500.5)


def test_window_keeps_recent_commands_only() -> None:
    stats = CommandStats(window=100)
    for _ in range(1000):
        stats.record(1.0, ok=True)
    for _ in range(100):
        stats.record(0.001, ok=True)
    assert stats.snapshot().latency.p99 == pytest.approx(1.0)
    assert stats.snapshot().commands.total == 1100


def test_empty_snapshot_is_zeros() -> None:
    snap = CommandStats().snapshot()
    assert snap.latency.p95 == 0.0
    assert snap.to_dict()["commands"]["total"] == 0
