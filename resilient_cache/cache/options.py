"""What a ``MultiLayerCache`` is configured with and what it counts.

The tier options are pydantic models (``memory={...}``, ``redis={...}``); the other options are
plain keyword arguments, checked by :func:`check_options`; the TTLs of one call by
:func:`check_ttls`. docs/caching.md describes every option and counter.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, Field, computed_field

from resilient_cache.errors import ConfigurationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class MemoryTierOptions(BaseModel):
    max_size: int = Field(default=1000, ge=1, description="Entries kept (LRU beyond).")
    default_ttl: float = Field(default=300.0, gt=0, description="Seconds an entry is served.")
    cleanup_interval: float = Field(default=60.0, gt=0, description="Seconds between sweeps.")


class RedisTierOptions(BaseModel):
    default_ttl: float = Field(default=3600, gt=0, description="Seconds a value lives in Redis.")
    key_prefix: str = Field(default="", description="Prepended to every key in Redis.")


class CacheStats(BaseModel):
    """Counters of one cache (``cache.stats``). ``load_time`` is seconds spent in loaders."""

    memory_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    loads: int = 0
    load_time: float = 0.0
    stale_served: int = 0
    refreshes: int = 0
    redis_errors: int = 0
    loader_errors: int = 0
    writeback_queued: int = 0
    writeback_written: int = 0
    writeback_dropped: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def errors(self) -> int:
        return self.redis_errors + self.loader_errors


def parse_tier_options(model: type[ModelT], given: Any, where: str) -> ModelT:
    """``given`` (a dict, an instance of ``model``, or None for the defaults) as ``model``."""
    if isinstance(given, model):
        return given
    try:
        return model.model_validate(given or {})
    except Exception as err:
        # The caller wrote MultiLayerCache(..., memory={...}): name that, not pydantic's model.
        raise ConfigurationError(f"MultiLayerCache {where}: {err}") from None


def check_options(
    *,
    lock_ttl: float,
    lock_poll_interval: float,
    none_ttl: float,
    writeback_interval: float,
    beta: float,
    max_stale: float,
    writeback_max: int,
    scan_count: int,
) -> None:
    """Raise ConfigurationError for an option out of its range."""
    for option, value, low in (
        ("lock_ttl", lock_ttl, 0.0),
        ("lock_poll_interval", lock_poll_interval, 0.0),
        ("none_ttl", none_ttl, 0.0),
        ("writeback_interval", writeback_interval, 0.0),
    ):
        if not value > low:  # written so that NaN is refused too
            raise ConfigurationError(f"MultiLayerCache {option}: must be > 0, got {value}")
    if beta < 0 or max_stale < 0 or writeback_max < 0 or scan_count < 1:
        raise ConfigurationError(
            "MultiLayerCache: beta, max_stale and writeback_max must be >= 0 and scan_count >= 1"
        )


def check_ttls(method: str, ttl: float | None, memory_ttl: float | None) -> None:
    """Raise ValueError for a TTL of one call that is 0 or less."""
    # ``None`` means the default; 0 or less is a mistake, not "the default" nor "forever".
    for name, value in (("ttl", ttl), ("memory_ttl", memory_ttl)):
        if value is not None and not value > 0:
            raise ValueError(
                f"MultiLayerCache.{method}: {name} must be > 0 seconds (or None for the "
                f"default), got {value!r}"
            )
