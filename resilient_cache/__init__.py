"""resilient_cache: an asyncio Redis Cluster client whose every command runs through a pipeline
of stages (retry, timeout, circuit breaker, tracing, metrics, memory tier, routing) declared in
configuration and assembled from pluggy plugins.

Quick start::

    from resilient_cache import create_redis_cluster, parse_cluster_nodes

    cluster = create_redis_cluster(parse_cluster_nodes("127.0.0.1:7000,127.0.0.1:7001"))
    async with cluster:
        await cluster.set("greeting", "hello")
        print(await cluster.get("greeting"))
"""

from resilient_cache.cache import CacheStats, MultiLayerCache
from resilient_cache.circuit import CircuitBreaker, RedisCircuitBreaker
from resilient_cache.client import RedisClusterClient, create_redis_cluster
from resilient_cache.errors import (
    CircuitBreakerOpenError,
    CommandInDoubtError,
    CommandTimeoutError,
    ConfigurationError,
    NotConnectedError,
    PluginError,
    ResilientCacheError,
)
from resilient_cache.exporters import configure_telemetry
from resilient_cache.health import ClusterStats, NodeStats
from resilient_cache.hookspecs import hookimpl
from resilient_cache.pipeline import Command, Handler, Stage
from resilient_cache.serializers import Serializer
from resilient_cache.settings import ClusterNode, Settings, parse_cluster_nodes
from resilient_cache.telemetry import MetricsSnapshot

__all__ = [
    "CacheStats",
    "CircuitBreaker",
    "CircuitBreakerOpenError",
    "ClusterNode",
    "ClusterStats",
    "Command",
    "CommandInDoubtError",
    "CommandTimeoutError",
    "ConfigurationError",
    "Handler",
    "MetricsSnapshot",
    "MultiLayerCache",
    "NodeStats",
    "NotConnectedError",
    "PluginError",
    "RedisCircuitBreaker",
    "RedisClusterClient",
    "ResilientCacheError",
    "Serializer",
    "Settings",
    "Stage",
    "configure_telemetry",
    "create_redis_cluster",
    "hookimpl",
    "parse_cluster_nodes",
]
