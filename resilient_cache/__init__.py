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

from importlib.metadata import PackageNotFoundError, version

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.backends import Backend
from resilient_cache.cache import CacheStats, MultiLayerCache
from resilient_cache.circuit import CircuitBreaker, RedisCircuitBreaker
from resilient_cache.client import RedisClusterClient, create_redis_cluster
from resilient_cache.errors import (
    BulkheadFullError,
    CircuitBreakerOpenError,
    ClusterUnreachableError,
    CommandInDoubtError,
    CommandTimeoutError,
    ConfigurationError,
    ConnectionClosedError,
    CredentialsRefusedError,
    NotConnectedError,
    PipelineInterruptedError,
    PluginError,
    RedisCommandError,
    ResilientCacheError,
    SlotNotServedError,
)
from resilient_cache.exporters import configure_telemetry
from resilient_cache.health import ClusterStats, NodeStats
from resilient_cache.hookspecs import hookimpl
from resilient_cache.key_specs import keys_of
from resilient_cache.pipeline import Command, Handler, NodeRef, Redirect, Stage
from resilient_cache.registry import (
    BackendRegistry,
    BuildContext,
    CommandRegistry,
    StageRegistry,
    StageSpec,
)
from resilient_cache.serializers import Serializer
from resilient_cache.settings import ClusterNode, Settings, parse_cluster_nodes
from resilient_cache.telemetry import MetricsSnapshot

try:
    __version__ = version("resilient-cache")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Backend",
    "BackendRegistry",
    "BuildContext",
    "BulkheadFullError",
    "CacheStats",
    "CircuitBreaker",
    "CircuitBreakerOpenError",
    "ClusterNode",
    "ClusterStats",
    "ClusterUnreachableError",
    "Command",
    "CommandInDoubtError",
    "CommandRegistry",
    "CommandTimeoutError",
    "ConfigurationError",
    "ConnectionClosedError",
    "CredentialsRefusedError",
    "Handler",
    "MetricsSnapshot",
    "MultiLayerCache",
    "NodeRef",
    "NodeStats",
    "NotConnectedError",
    "PipelineInterruptedError",
    "PluginError",
    "Redirect",
    "RedisCircuitBreaker",
    "RedisClusterClient",
    "RedisCommandError",
    "ResilientCacheError",
    "Serializer",
    "Settings",
    "SlotNotServedError",
    "Stage",
    "StageRegistry",
    "StageSpec",
    "__version__",
    "cancel_and_wait",
    "configure_telemetry",
    "create_redis_cluster",
    "hookimpl",
    "keys_of",
    "parse_cluster_nodes",
]
