"""Hash-slot arithmetic shared by the cluster tools, the health probe and the backend."""

from __future__ import annotations

from collections.abc import Iterable

#: Slots in a Redis Cluster.
TOTAL_SLOTS = 16384

SlotRange = tuple[int, int]  # first and last slot, both included


def split_slots(parts: int) -> list[SlotRange]:
    """Split 0..16383 into ``parts`` contiguous ranges whose sizes differ by at most one."""
    bounds = [i * TOTAL_SLOTS // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(parts)]


def merge_ranges(ranges: Iterable[SlotRange]) -> list[SlotRange]:
    """Sorted, with overlapping and touching ranges joined."""
    merged: list[SlotRange] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def format_ranges(ranges: Iterable[SlotRange]) -> str:
    """``0-5460,10923-16383`` (a single slot as ``42``)."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
