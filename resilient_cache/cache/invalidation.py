"""Prefix invalidation in Redis: ``SCAN MATCH <prefix>*`` on every primary, ``DEL`` in batches.

A cluster's keys are spread over its primaries and SCAN walks one node, so each primary is
scanned in turn (a single server, or a client without ``get_primaries``, is scanned once).
Glob characters in the prefix are escaped: a prefix is matched literally. The walk is bounded
by ``max_keys``, so a prefix that matches far more than expected cannot hold the caller for
long.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

# One logger for every part of the cache (the name it had as one module).
logger = logging.getLogger("resilient_cache.cache")


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def delete_prefix(
    client: Any, redis_prefix: str, *, scan_count: int, max_keys: int, cache_name: str
) -> int:
    """Delete the Redis keys starting with ``redis_prefix``, ``scan_count`` a round and a DEL,
    stopping after ``max_keys`` (logged). Returns the keys deleted. Raises Redis failures."""
    pattern = glob_escape(redis_prefix) + "*"
    deleted = 0
    batch: list[Any] = []
    async for rkey in _scan(client, pattern, scan_count):
        batch.append(rkey)
        if len(batch) >= scan_count:
            deleted += await _delete_batch(client, batch)
            batch = []
        if deleted + len(batch) >= max_keys:
            logger.warning(
                "cache %s: invalidate_prefix stopped after %d keys (max_keys)",
                cache_name,
                max_keys,
            )
            break
    if batch:
        deleted += await _delete_batch(client, batch)
    return deleted


async def _delete_batch(client: Any, keys: list[Any]) -> int:
    result = await client.delete(*keys)
    return int(result) if isinstance(result, int) else len(keys)


async def _scan(client: Any, pattern: str, count: int) -> AsyncIterator[Any]:
    # A RedisClusterClient sends SCAN through its own pipeline but lists the primaries of its
    # redis-py cluster; a RedisCircuitBreaker holds its client as ``.redis``; a raw client is
    # both the scanner and the lister.
    raw = client.get_cluster() if hasattr(client, "get_cluster") else None
    raw = raw if raw is not None else getattr(client, "redis", client)
    scanner = client if hasattr(client, "scan") else raw
    primaries = raw.get_primaries() if hasattr(raw, "get_primaries") else None
    if primaries is None:  # a single server
        async for rkey in scanner.scan_iter(match=pattern, count=count):
            yield rkey
        return
    for node in primaries:
        cursor = 0
        while True:
            reply = await scanner.scan(cursor, match=pattern, count=count, target_nodes=node)
            cursors, keys = reply
            for rkey in keys:
                yield rkey
            # A cluster client answers {node name: cursor}; a plain one, the cursor.
            cursor = cursors.get(node.name, 0) if isinstance(cursors, dict) else cursors
            if not cursor:
                break
