"""The redis-py standalone backend: one Redis (no cluster) through ``redis.asyncio.Redis``.

Configured like the cluster backend (backends/redis_py.py, which registers both): redis-py does
not retry by itself, and its errors are retold by backends/redis_py_errors.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache.backends.redis_py_common import connection_options, no_retry, run_batch
from resilient_cache.backends.redis_py_errors import (
    credentials_refused,
    translate_redis_py_error,
)
from resilient_cache.errors import ConfigurationError
from resilient_cache.node_facts import NodeFacts
from resilient_cache.pipeline import BATCH_NAMES, Command, NodeRef

if TYPE_CHECKING:
    from resilient_cache.settings import Settings


class RedisPyStandaloneBackend:
    """A single Redis (no cluster) through ``redis.asyncio.Redis``: REDIS_URL, or one node."""

    name = "standalone"
    routes_per_node = False

    def __init__(self, settings: Settings) -> None:
        options = connection_options(settings)
        if settings.url is not None:
            url = settings.url.get_secret_value()
            try:
                self._redis = Redis.from_url(url, retry=no_retry(), **options)
            except ValueError:
                # redis-py's message may quote the URL, which can hold a password: drop it.
                raise ConfigurationError(
                    "REDIS_URL: not a valid redis://, rediss:// or unix:// URL"
                ) from None
        elif settings.cluster_nodes:
            node = settings.cluster_nodes[0]
            self._redis = Redis(host=node.host, port=node.port, retry=no_retry(), **options)
        else:
            raise ConfigurationError("REDIS_URL: no Redis is configured for the standalone backend")
        kwargs = self._redis.connection_pool.connection_kwargs
        self._address = (str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)))
        self._name = f"{self._address[0]}:{self._address[1]}"
        self.node_facts = NodeFacts()

    async def connect(self) -> None:
        try:
            await self._redis.ping()
        except AuthenticationError as err:
            raise credentials_refused(err, [self._name], self._username) from err
        except RedisConnectionError as err:
            raise RedisConnectionError(
                f"Unable to connect to Redis at {self._address[0]}:{self._address[1]} "
                f"({type(err).__name__}: {err})"
            ) from err

    @property
    def _username(self) -> str | None:
        username = self._redis.connection_pool.connection_kwargs.get("username")
        return username if isinstance(username, str) else None

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def execute(self, command: Command) -> Any:
        if command.name in BATCH_NAMES:
            return await run_batch(self._redis, command, self._node_of, self._username)
        failure: Exception
        try:
            return await self._redis.execute_command(command.name, *command.args, **command.options)
        except Exception as err:
            failure = translate_redis_py_error(command, err, self._name, username=self._username)
            if failure is err:
                raise
        raise failure  # outside the except block: Python would chain redis-py's error to it

    def _node_of(self, command: Command, position: int | None) -> str | None:
        return self._name

    def route(self, command: Command, replica: bool = False) -> NodeRef | None:
        return None

    def slot_nodes(self, command: Command) -> Sequence[NodeRef] | None:
        return None  # one server: no slot, no replica

    @property
    def topology_stale(self) -> bool:
        return False

    def request_refresh(self) -> None:
        return None

    async def refresh_topology(self) -> None:
        return None

    def known_nodes(self) -> list[tuple[str, int]]:
        return [self._address]

    async def execute_on(self, address: tuple[str, int], *args: Any) -> Any:
        return await self._redis.execute_command(*args)

    def enable_replica_reads(self) -> None:
        pass  # one server: no replica to read from

    def failover_possible(self, node: str) -> bool | None:
        return None  # one server: no failover to wait for, and none to rule out

    @property
    def failover_estimate(self) -> float | None:
        return None

    def slots_of(self, node: str) -> str:
        return ""

    @property
    def raw(self) -> Redis:
        return self._redis
