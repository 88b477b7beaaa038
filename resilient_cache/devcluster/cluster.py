""":class:`DevCluster`, the public face of the package, composing its other modules.

It holds the cluster's settings and lifecycle (start, stop, state file) and
answers questions about the running cluster; the work is done by
:mod:`.processes`, :mod:`.topology`, :mod:`.faults` and the other modules.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis

from . import queries
from .admin import Admin
from .config import cluster_node_config
from .errors import DevClusterError, PortRaceError
from .faults import Faults
from .node import DevNode, NodeStatus
from .ports import check_loopback
from .processes import (
    NODE_START_TIMEOUT,
    START_ATTEMPTS,
    find_redis_server,
    forget_at_exit,
    kill_now,
    process_alive,
    spawn,
    stop_at_exit,
    terminate,
    wait_answering,
)
from .roster import Roster
from .security import AclUser, Security
from .state import (
    default_state_path,
    read_state,
    refuse_if_in_use,
    remove_state_file,
    write_state,
)
from .topology import SlotMap, form_cluster, readiness_problems
from .waits import POLL_INTERVAL, poll_until, wait_for

__all__ = ["DevCluster"]

logger = logging.getLogger("resilient_cache.devcluster")

T = TypeVar("T")


def _pick_free_ports(host: str, count: int) -> list[int]:
    # Looked up on the package at each call rather than imported: tests replace
    # resilient_cache.devcluster._pick_free_ports to make a start lose a port race.
    package = importlib.import_module(__name__.rpartition(".")[0])
    pick: Callable[[str, int], list[int]] = package._pick_free_ports
    return pick(host, count)


class DevCluster:
    """A local Redis Cluster of ``primaries * (1 + replicas_per_primary)`` servers.

    Args:
        base_dir: directory for the node directories (``node-0`` ...). When None a
            temporary directory is created and removed by :meth:`stop`; a given
            directory is kept, but its ``node-*`` subdirectories are recreated on
            every :meth:`start`.
        node_timeout_ms: ``cluster-node-timeout``; failover starts after roughly
            this long without contact with a primary.
        primaries: number of primaries. Automatic failover needs at least 3, since
            a majority of primaries must vote.
        replicas_per_primary: replicas attached to each primary.
        host: the loopback address every server binds to.
        tie_to_parent: kill the servers when this process dies (PDEATHSIG and
            atexit). False for a cluster that must outlive its creator, such as the
            CLI's ``cluster up``; such a cluster writes a state file.
        extra_config: extra ``redis.conf`` lines appended to every node's config.
        state_path: where to record the cluster for :meth:`load_state`. Defaults to
            :func:`default_state_path` when ``tie_to_parent`` is False; otherwise no
            state file is written unless a path is given here.
        tls: serve TLS only: each node gets ``port 0`` and a ``tls-port``, and the cluster
            bus and replication use TLS too. A CA, a server and a client certificate are
            made with ``openssl`` in ``<base_dir>/tls`` at each start; the servers require
            the client certificate (``tls-auth-clients yes``).
        acl: ``(user, password)`` (or an ``AclUser``): the default user is turned off and
            only this user may connect (``+@all`` on every key and channel). Replicas log in
            to their primaries as this user; the devcluster's own admin clients do too.

    :attr:`connection_options` and :attr:`client_environment` give clients what they need
    to connect to a TLS or ACL cluster.
    """

    def __init__(
        self,
        base_dir: str | None = None,
        node_timeout_ms: int = 2000,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        host: str = "127.0.0.1",
        tie_to_parent: bool = True,
        extra_config: Sequence[str] = (),
        state_path: str | os.PathLike[str] | None = None,
        *,
        tls: bool = False,
        acl: tuple[str, str] | AclUser | None = None,
    ) -> None:
        if primaries < 1:
            raise ValueError("primaries must be at least 1")
        if replicas_per_primary < 0:
            raise ValueError("replicas_per_primary must not be negative")
        if node_timeout_ms < 100:
            raise ValueError("node_timeout_ms must be at least 100")
        if isinstance(extra_config, str):  # a lone string would be split into characters
            raise TypeError("extra_config must be a sequence of config lines, not a string")
        self._host = check_loopback(host)
        self._node_timeout_ms = node_timeout_ms
        self._n_primaries = primaries
        self._replicas_per_primary = replicas_per_primary
        self._tie_to_parent = tie_to_parent
        self._extra_config = [str(line) for line in extra_config]
        if acl is not None and not isinstance(acl, AclUser):
            acl = AclUser(*acl)
        self._security = Security(tls=tls, acl=acl)
        if state_path is not None:
            self._state_path: Path | None = Path(state_path)
        elif not tie_to_parent:
            self._state_path = default_state_path()
        else:
            self._state_path = None

        self._redis_bin = ""
        self._base_dir: Path | None = Path(base_dir) if base_dir else None
        self._owns_dir = base_dir is None
        self._roster = Roster()
        self._admin = Admin()
        self._faults = Faults(self._roster, self._admin)
        # The slot map of the last successful readiness check, for wait_failover().
        self._last_slot_map: SlotMap | None = None
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ basics

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "started" if self._started else "new"
        return f"<DevCluster {state} {self.startup_nodes or '(no nodes)'}>"

    def __enter__(self) -> DevCluster:
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
    def nodes(self) -> list[DevNode]:
        """All nodes, alive or not, in start order (the initial primaries come first)."""
        return list(self._roster.nodes)

    @property
    def startup_nodes(self) -> str:
        """``host:port,host:port,...`` for ``REDIS_CLUSTER_NODES``."""
        return ",".join(node.address for node in self._roster.nodes)

    @property
    def base_dir(self) -> str | None:
        """The directory holding the node directories, once started."""
        return str(self._base_dir) if self._base_dir is not None else None

    @property
    def state_path(self) -> Path | None:
        """The state file this cluster writes and removes, if any."""
        return self._state_path

    @property
    def tie_to_parent(self) -> bool:
        """Whether the servers die with this process."""
        return self._tie_to_parent

    def node_by_port(self, port: int) -> DevNode:
        """The node listening on ``port``."""
        return self._roster.by_port(port)

    @property
    def tls(self) -> bool:
        """Whether the servers speak TLS only."""
        return self._security.tls

    @property
    def acl_user(self) -> str | None:
        """The ACL user clients must log in as, or None when the default user is on."""
        return self._security.acl.name if self._security.acl is not None else None

    @property
    def connection_options(self) -> dict[str, Any]:
        """What a client needs besides the nodes, once started (empty for a plain cluster).

        ``ssl``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``username``,
        ``password``: keyword options of redis-py's clients and of ``create_redis_cluster``
        alike, e.g. ``create_redis_cluster(cluster.startup_nodes, **cluster.connection_options)``.
        """
        return self._security.connection_options()

    @property
    def client_environment(self) -> dict[str, str]:
        """The ``REDIS_*`` variables of a client of this cluster, as ``cluster up`` prints them.

        ``REDIS_CLUSTER_NODES``, plus ``REDIS_SSL``, ``REDIS_SSL_CA_CERTS``,
        ``REDIS_SSL_CERTFILE`` and ``REDIS_SSL_KEYFILE`` with TLS, and ``REDIS_USERNAME`` and
        ``REDIS_PASSWORD`` with an ACL user.
        """
        return {"REDIS_CLUSTER_NODES": self.startup_nodes, **self._security.client_environment()}

    # ------------------------------------------------------------------ start

    def start(self, timeout: float = 30.0) -> DevCluster:
        """Start the servers, form the cluster and wait until it is ready.

        Args:
            timeout: seconds allowed for cluster formation and :meth:`wait_ready`.

        Returns:
            self, so ``cluster = DevCluster().start()`` works.

        Raises:
            DevClusterError: if a server does not start or the cluster does not
                become ready in time. Anything already started is stopped again.
        """
        if self._started:
            raise DevClusterError("this DevCluster was already started; create a new one")
        self._started = True
        began = time.monotonic()
        self._redis_bin = find_redis_server()
        if self._state_path is not None:
            refuse_if_in_use(self._state_path, lambda path: DevCluster.load_state(path).nodes)
        if self._base_dir is None:
            self._base_dir = Path(tempfile.mkdtemp(prefix="resilient-cache-cluster-"))
        else:
            self._base_dir.mkdir(parents=True, exist_ok=True)
        if self._tie_to_parent:
            # Registered before the first spawn so even an interrupted start is cleaned up.
            stop_at_exit(self, "dev cluster")
        try:
            self._security.prepare(self._base_dir, self._host)
            self._admin.configure(self._security.connection_options())
            self._launch_with_retries()
            formed = time.monotonic()
            form_cluster(self._admin, self._roster.nodes, self._n_primaries, began + timeout)
            self.wait_ready(timeout=max(1.0, timeout - (time.monotonic() - began)))
        except BaseException:
            # BaseException: a Ctrl-C during start must not leave servers behind.
            logger.warning("dev cluster start failed; stopping what was started")
            self.stop()
            raise
        if self._state_path is not None:
            self.save_state(self._state_path)
        logger.info(
            "dev cluster ready in %.2fs (servers up in %.2fs): %s",
            time.monotonic() - began,
            formed - began,
            self.startup_nodes,
        )
        return self

    def _launch_with_retries(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            ports = _pick_free_ports(
                self._host, self._n_primaries * (1 + self._replicas_per_primary)
            )
            logger.debug("start attempt %d with ports %s", attempt, ports)
            try:
                self._launch(ports)
                return
            except PortRaceError as exc:
                kill_now(self._roster.nodes)
                self._admin.close_all()
                if attempt == START_ATTEMPTS:
                    raise
                logger.info("port race on attempt %d (%s); retrying with new ports", attempt, exc)

    def _launch(self, ports: list[int]) -> None:
        assert self._base_dir is not None
        self._roster.nodes = []
        for index, port in enumerate(ports):
            node_dir = self._base_dir / f"node-{index}"
            # A fresh directory: a leftover nodes.conf would make the node rejoin an
            # old cluster instead of starting empty.
            if node_dir.exists():
                shutil.rmtree(node_dir)
            node_dir.mkdir(parents=True)
            node = DevNode(host=self._host, port=port, pid=0, dir=str(node_dir))
            config = cluster_node_config(
                node,
                self._node_timeout_ms,
                self._extra_config,
                tls=self._security.tls_files,
                acl_file=self._security.acl_file,
            )
            Path(node.config_path).write_text(config, encoding="utf-8")
            self._roster.nodes.append(node)
        for node in self._roster.nodes:
            spawn(self._redis_bin, node, tie_to_parent=self._tie_to_parent)
        if self._state_path is not None:
            # Written early so `cluster down` can clean up even if this process is
            # killed before the cluster is ready.
            self.save_state(self._state_path)
        wait_answering(self._roster.nodes, self._admin, NODE_START_TIMEOUT)

    # ------------------------------------------------------------------ waiting

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 30.0,
        what: str = "condition",
        interval: float = POLL_INTERVAL,
    ) -> T:
        """Poll ``predicate`` until it returns something truthy, and return that (see
        :func:`resilient_cache.devcluster.waits.wait_for`)."""
        return wait_for(predicate, timeout, what, interval)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the cluster is fully usable.

        Ready means, for every live (running and not paused) node:
        ``cluster_state:ok`` and all 16384 slots assigned; every replica has
        ``master_link_status:up``; all live nodes agree on which node serves each
        slot, and each of those is a live node whose role is master.

        Raises:
            DevClusterError: on timeout, listing each node and unmet condition.
        """

        def problems() -> list[str]:
            found, slot_map = readiness_problems(self._admin, self._roster.live(), self._host)
            if slot_map is not None:
                self._last_slot_map = slot_map
            return found

        poll_until(problems, timeout, "the dev cluster to be ready")

    def wait_failover(self, old_primary: DevNode, timeout: float = 30.0) -> DevNode:
        """Wait until another node serves the slots ``old_primary`` served.

        Call it after :meth:`kill` or :meth:`pause` of a primary. Done when every
        live node reports ``cluster_state:ok`` and routes those slots to a live
        node other than ``old_primary`` whose role is master.

        Returns:
            The node now serving ``old_primary``'s (first) slot.

        Raises:
            DevClusterError: if ``old_primary`` served no slots, or on timeout.
        """
        return self._faults.wait_failover(old_primary, timeout, self._last_slot_map)

    # ------------------------------------------------------------------ queries

    def admin(self, node: DevNode) -> redis.Redis:
        """A synchronous client for one node, for admin commands.

        Short timeouts and no retries, so a dead or paused node fails fast instead
        of stalling a poll loop. Responses are decoded to ``str``. The client is
        cached per node and closed by :meth:`stop`. On a TLS or ACL cluster it
        connects with :attr:`connection_options`.
        """
        return self._admin.client(self._roster.own(node))

    def info(self, node: DevNode, section: str | None = None) -> dict[str, Any]:
        """``INFO`` (or one section of it) of ``node``, parsed into a dict."""
        return self._admin.info(self._roster.own(node), section)

    def cluster_info(self, node: DevNode) -> dict[str, str]:
        """``CLUSTER INFO`` of ``node`` as ``{"cluster_state": "ok", ...}``."""
        return self._admin.cluster_info(self._roster.own(node))

    def primaries(self) -> list[DevNode]:
        """Live nodes whose current role (per ``ROLE``) is master.

        Roles change with failovers, so this always asks the servers. Dead and
        paused nodes are left out.
        """
        return queries.nodes_in_role(self._roster, self._admin, "master")

    def replicas(self) -> list[DevNode]:
        """Live nodes whose current role (per ``ROLE``) is replica."""
        return queries.nodes_in_role(self._roster, self._admin, "replica")

    def replica_of(self, primary: DevNode) -> DevNode | None:
        """A live replica currently replicating from ``primary``, or None.

        Works for a dead primary too: its replicas keep naming it until a failover.
        """
        return queries.replica_of(self._roster, self._admin, primary)

    def primary_for_key(self, key: str) -> DevNode:
        """The node that currently serves ``key``'s slot, as a live node sees it."""
        return queries.primary_for_key(self._roster, self._admin, key)

    def status(self) -> list[NodeStatus]:
        """One row per node: address, pid, alive, paused, role and cluster_state."""
        return queries.status_rows(self._roster, self._admin)

    # ------------------------------------------------------------------ faults

    def kill(self, node: DevNode, sig: int = signal.SIGKILL, *, timeout: float = 10.0) -> None:
        """Send ``sig`` to ``node``'s server (default SIGKILL: a crash).

        For SIGKILL, SIGTERM, SIGINT and SIGQUIT this also waits up to ``timeout``
        seconds for the process to be gone, so callers can rely on it being dead.
        """
        self._faults.kill(node, sig, timeout)

    def pause(self, node: DevNode) -> None:
        """Freeze ``node`` with SIGSTOP: it keeps its sockets but answers nothing."""
        self._faults.pause(node)

    def resume(self, node: DevNode) -> None:
        """Thaw a node frozen by :meth:`pause` (SIGCONT)."""
        self._faults.resume(node)

    def restart(self, node: DevNode, timeout: float = NODE_START_TIMEOUT) -> None:
        """Start a dead node again on the same port, dir and ``nodes.conf``.

        The node rejoins with its old identity; if it was a primary that has been
        failed over, the cluster turns it into a replica of the new primary. This
        waits only until the server answers PING; call :meth:`wait_ready` for the
        whole cluster.
        """
        node = self._roster.own(node)
        if process_alive(node):
            raise DevClusterError(f"{node.address} is still running; kill() it first")
        if not self._redis_bin:
            self._redis_bin = find_redis_server()
        self._faults.forget(node)
        logger.info("restarting %s", node.address)
        spawn(self._redis_bin, node, tie_to_parent=self._tie_to_parent)
        if self._state_path is not None and self._state_path.exists():
            self.save_state(self._state_path)  # the pid changed
        wait_answering([node], self._admin, timeout)

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Stop every server and clean up. Safe to call more than once.

        Each server gets SIGCONT (a paused one could not act on anything else),
        then SIGTERM, then SIGKILL if it is still there after a few seconds. The
        base directory is removed if this cluster created it, and so is the state
        file this cluster wrote or was loaded from.
        """
        if self._stopped:
            return
        self._stopped = True
        forget_at_exit(self)
        running = terminate(self._roster.nodes)
        self._roster.paused.clear()
        self._admin.close_all()
        if self._owns_dir and self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
        if self._state_path is not None:
            remove_state_file(self._state_path, self.base_dir)
        if running:
            logger.info("dev cluster stopped (%d servers)", len(running))

    # ------------------------------------------------------------------ state file

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Record this cluster in a JSON file so :meth:`load_state` can find it.

        The file is replaced atomically; its directory is created private (0700).
        """
        self._state_path = write_state(
            path,
            base_dir=self.base_dir,
            owns_dir=self._owns_dir,
            host=self._host,
            node_timeout_ms=self._node_timeout_ms,
            primaries=self._n_primaries,
            replicas_per_primary=self._replicas_per_primary,
            extra_config=self._extra_config,
            redis_server=self._redis_bin,
            nodes=self._roster.nodes,
            tls=self._security.tls,
            acl_user=self.acl_user,
        )

    @classmethod
    def load_state(cls, path: str | os.PathLike[str]) -> DevCluster:
        """Rebuild a handle on a cluster recorded by :meth:`save_state`.

        The handle knows the nodes by pid only (``DevNode.process`` is None). Its
        :meth:`stop` kills the recorded pids that still are our redis-servers and
        removes the directory (if the cluster created it) and the state file. For a TLS
        or ACL cluster its admin clients use the certificates and the ACL file in the
        cluster's directory (the state file holds no password).
        """
        source = Path(path)
        data = read_state(source)
        cluster = cls(
            base_dir=data["base_dir"],
            node_timeout_ms=int(data["node_timeout_ms"]),
            primaries=int(data["primaries"]),
            replicas_per_primary=int(data["replicas_per_primary"]),
            host=str(data["host"]),
            tie_to_parent=False,
            extra_config=[str(line) for line in data.get("extra_config", [])],
            state_path=source,
        )
        cluster._owns_dir = bool(data["owns_dir"])
        acl_user = data.get("acl_user")
        cluster._security = Security.recorded(
            data["base_dir"],
            tls=bool(data.get("tls", False)),
            acl_user=None if acl_user is None else str(acl_user),
        )
        cluster._admin.configure(cluster._security.connection_options())
        cluster._redis_bin = str(data.get("redis_server") or "")
        cluster._roster.nodes = [
            DevNode(host=cluster._host, port=int(n["port"]), pid=int(n["pid"]), dir=str(n["dir"]))
            for n in data["nodes"]
        ]
        cluster._started = True
        return cluster
