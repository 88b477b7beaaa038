"""A throwaway plain (non-cluster) ``redis-server``, for ``REDIS_URL`` tests and benchmarks.

Typical use::

    with StandaloneServer() as server:
        client = redis.Redis.from_url(server.url)

The one place that launches a standalone server: the test fixture and the
benchmarks use it rather than each running ``redis-server`` their own way. Like
the cluster's nodes, it binds loopback only, keeps no data on disk, waits until
the server answers PING (with a deadline, quoting the server's log if it
exited), retries with a new port if another process took it first, and dies
with this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .admin import Admin
from .config import standalone_config
from .errors import DevClusterError, PortRaceError
from .node import DevNode
from .ports import check_loopback, pick_free_ports
from .processes import (
    NODE_START_TIMEOUT,
    START_ATTEMPTS,
    find_redis_server,
    forget_at_exit,
    kill_now,
    spawn,
    stop_at_exit,
    terminate,
    wait_answering,
)

__all__ = ["StandaloneServer"]

logger = logging.getLogger("resilient_cache.devcluster")


class StandaloneServer:
    """One ``redis-server`` without cluster mode on a free loopback port.

    Args:
        host: the loopback address the server binds to.
        base_dir: directory for the config and log. When None a temporary
            directory is created and removed by :meth:`stop`; a given one is kept.
        start_timeout: seconds the server may take to answer PING.
        extra_config: extra ``redis.conf`` lines.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = NODE_START_TIMEOUT,
        extra_config: Sequence[str] = (),
    ) -> None:
        if isinstance(extra_config, str):  # a lone string would be split into characters
            raise TypeError("extra_config must be a sequence of config lines, not a string")
        self._host = check_loopback(host)
        self._base_dir: Path | None = Path(base_dir) if base_dir is not None else None
        self._owns_dir = base_dir is None
        self._start_timeout = start_timeout
        self._extra_config = [str(line) for line in extra_config]
        self._node: DevNode | None = None
        self._admin = Admin()
        self._started = False
        self._stopped = False

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "started" if self._started else "new"
        where = self._node.address if self._node is not None else "(no port yet)"
        return f"<StandaloneServer {state} {where}>"

    def __enter__(self) -> StandaloneServer:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def node(self) -> DevNode:
        """The server's process record (port, pid, directory, log paths)."""
        if self._node is None:
            raise DevClusterError("this StandaloneServer has not been started")
        return self._node

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self.node.port

    @property
    def address(self) -> str:
        """``host:port``."""
        return self.node.address

    @property
    def url(self) -> str:
        """``redis://host:port/0``, for ``REDIS_URL`` or ``Redis.from_url``."""
        return f"redis://{self.address}/0"

    def start(self) -> StandaloneServer:
        """Start the server and wait until it answers PING.

        Raises:
            DevClusterError: if it does not start in time (anything started is stopped).
        """
        if self._started:
            raise DevClusterError("this StandaloneServer was already started; create a new one")
        self._started = True
        binary = find_redis_server()
        if self._base_dir is None:
            self._base_dir = Path(tempfile.mkdtemp(prefix="resilient-cache-standalone-"))
        else:
            self._base_dir.mkdir(parents=True, exist_ok=True)
        # Registered before the spawn so even an interrupted start is cleaned up.
        stop_at_exit(self, "standalone redis-server")
        try:
            self._launch_with_retries(binary, self._base_dir)
        except BaseException:
            # BaseException: a Ctrl-C during start must not leave a server behind.
            self.stop()
            raise
        logger.info("standalone redis-server ready on %s", self.address)
        return self

    def _launch_with_retries(self, binary: str, directory: Path) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            (port,) = pick_free_ports(self._host, 1, bus_ports=False)
            node = self._node = DevNode(host=self._host, port=port, pid=0, dir=str(directory))
            # Fresh logs: a port race quoted from an earlier attempt must not
            # decide how this attempt's failure is read.
            for path in (node.log_path, node.stdout_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            Path(node.config_path).write_text(
                standalone_config(node, self._extra_config), encoding="utf-8"
            )
            spawn(binary, node, tie_to_parent=True)
            try:
                wait_answering([node], self._admin, self._start_timeout)
                return
            except PortRaceError as exc:
                kill_now([node])
                self._admin.close_all()
                if attempt == START_ATTEMPTS:
                    raise
                logger.info("port race on attempt %d (%s); retrying with a new port", attempt, exc)

    def stop(self) -> None:
        """Stop the server and remove its directory if this object created it.

        Safe to call more than once.
        """
        if self._stopped:
            return
        self._stopped = True
        forget_at_exit(self)
        if self._node is not None:
            terminate([self._node])
        self._admin.close_all()
        if self._owns_dir and self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
