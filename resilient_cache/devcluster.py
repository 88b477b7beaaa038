"""A throwaway local Redis Cluster built from the ``redis-server`` binary.

:class:`DevCluster` starts six ``redis-server`` processes (three primaries, three
replicas by default) on free loopback ports, each in its own directory under a
temporary directory, joins them into a cluster with plain admin commands and
waits until the cluster is really usable. It is what the test fixtures, the chaos
tests, ``resilient-cache cluster up|down|status`` and ``make demo`` run against.

Typical use::

    with DevCluster() as cluster:
        client = RedisCluster.from_url(f"redis://{cluster.nodes[0].address}")
        victim = cluster.primary_for_key("user:1")
        cluster.kill(victim)
        cluster.wait_failover(victim)
        cluster.restart(victim)  # comes back as a replica of the new primary
        cluster.wait_ready()

Design notes for newcomers:

* Everything binds to a loopback address only; nothing here is reachable from
  another machine.
* The cluster is formed with redis-py (``CLUSTER MEET``/``ADDSLOTSRANGE``/
  ``REPLICATE``) rather than ``redis-cli --cluster create``, because ``redis-cli``
  is not always installed next to ``redis-server``.
* Every wait polls a condition against a deadline and, on timeout, says which
  node failed which condition. Nothing sleeps and hopes.
* Servers must never outlive the process that owns them by accident: on Linux
  each one gets ``PR_SET_PDEATHSIG=SIGKILL`` and an ``atexit`` hook stops every
  cluster still running. ``tie_to_parent=False`` turns both off for the CLI's
  ``cluster up``, which records the cluster in a state file instead so that
  ``cluster down`` can find it later.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "DevCluster",
    "DevClusterError",
    "DevNode",
    "NodeStatus",
    "default_state_path",
    "find_redis_server",
]

logger = logging.getLogger("resilient_cache.devcluster")

T = TypeVar("T")

TOTAL_SLOTS = 16384
#: Redis Cluster listens for its node-to-node bus on the client port + 10000.
BUS_PORT_OFFSET = 10000
STATE_FILE_VERSION = 1

# How long a single server may take to answer PING after being spawned. Redis
# normally needs a few milliseconds; the slack is for a loaded CI machine.
_NODE_START_TIMEOUT = 15.0
# How long stop() waits after SIGTERM before it escalates to SIGKILL. A throwaway
# node has nothing worth saving, so this is kept short.
_TERM_GRACE = 3.0
# Port-race retries: another process may grab a port between our probe and the
# server's bind. Trying again with fresh ports is cheap.
_START_ATTEMPTS = 3
_POLL_INTERVAL = 0.05
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_TERMINATING_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


class DevClusterError(RuntimeError):
    """The dev cluster could not be started, reached or stopped as asked."""


class _PortRaceError(DevClusterError):
    """A server could not bind a port we had just seen free; retry with new ports."""


class NodeStatus(TypedDict):
    """One row of :meth:`DevCluster.status`, shaped for a CLI table or JSON."""

    address: str
    port: int
    pid: int
    dir: str
    alive: bool
    paused: bool
    role: str | None  # "master", "replica" or None when the node does not answer
    cluster_state: str | None  # "ok", "fail" or None when the node does not answer


@dataclasses.dataclass(eq=False)
class DevNode:
    """One ``redis-server`` of a :class:`DevCluster`.

    Nodes compare by identity: a cluster hands out the same objects for its whole
    life and updates ``pid``/``process`` in place when a node is restarted.
    """

    host: str
    port: int
    pid: int
    dir: str
    #: The live child process, or None when the cluster was loaded from a state
    #: file (then only ``pid`` is known) or the node has not been spawned yet.
    process: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``host:port``, the form used in ``REDIS_CLUSTER_NODES``."""
        return f"{self.host}:{self.port}"

    @property
    def bus_port(self) -> int:
        """The cluster bus port this node listens on."""
        return self.port + BUS_PORT_OFFSET

    @property
    def config_path(self) -> str:
        """The ``redis.conf`` this node was started with."""
        return os.path.join(self.dir, "redis.conf")

    @property
    def log_path(self) -> str:
        """The Redis log file (``logfile`` in the config)."""
        return os.path.join(self.dir, "redis.log")

    @property
    def stdout_path(self) -> str:
        """Where the server's stdout/stderr go (config errors appear here)."""
        return os.path.join(self.dir, "stdout.log")


# --------------------------------------------------------------------------- helpers


def find_redis_server() -> str:
    """Return the path of the ``redis-server`` binary to use.

    ``$REDIS_SERVER_BIN`` wins when set (a path or a name looked up on ``PATH``);
    otherwise ``redis-server`` is looked up on ``PATH``.

    Raises:
        DevClusterError: when no usable binary is found, with install hints.
    """
    override = os.environ.get("REDIS_SERVER_BIN")
    if override:
        found = shutil.which(override)
        if found is None:
            raise DevClusterError(
                f"REDIS_SERVER_BIN={override!r} is not an executable file. Point it at a "
                "redis-server binary (Redis >= 7.0) or unset it to search PATH."
            )
        return found
    found = shutil.which("redis-server")
    if found is None:
        raise DevClusterError(
            "redis-server was not found on PATH; the dev cluster needs Redis >= 7.0. "
            "Install it with `apt-get install redis-server` (as root) or set "
            "REDIS_SERVER_BIN to the path of a redis-server binary."
        )
    return found


def default_state_path() -> Path:
    """Where ``resilient-cache cluster up`` records the detached cluster it started.

    ``$XDG_RUNTIME_DIR/resilient-cache/devcluster.json`` when that directory
    exists (it is per user and cleared at logout), else
    ``/tmp/resilient-cache-<uid>/devcluster.json``.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "resilient-cache" / "devcluster.json"
    return Path(tempfile.gettempdir()) / f"resilient-cache-{os.getuid()}" / "devcluster.json"


def _check_loopback(host: str) -> str:
    # The dev cluster has no password and protected mode off, so it must never be
    # reachable from the network.
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be an IPv4 loopback address, got {host!r}") from None
    if address.version != 4 or not address.is_loopback:
        raise ValueError(f"host must be an IPv4 loopback address such as 127.0.0.1, got {host!r}")
    return host


def _port_search_range() -> tuple[int, int]:
    """Ports to draw client ports from, so both P and P+10000 avoid the ephemeral range.

    Binding port 0 would hand out ephemeral ports (32768-60999 on Linux): P+10000
    could then overflow 65535, and both ports could collide with the local end of
    some outgoing connection. Drawing below the ephemeral range avoids both.
    """
    ephemeral_low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral_low = int(text.split()[0])
    low, high = 10000, ephemeral_low - BUS_PORT_OFFSET - 1
    if high - low < 1000:  # unusual kernel settings: fall back to anything valid
        low, high = 1024, 65535 - BUS_PORT_OFFSET
    return low, high


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Redis sets SO_REUSEADDR too, so a TIME_WAIT leftover from an earlier run
        # does not stop it binding; probing the same way avoids skipping such ports.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _pick_free_ports(host: str, count: int) -> list[int]:
    """Pick ``count`` client ports whose cluster bus ports are free as well."""
    low, high = _port_search_range()
    rng = random.SystemRandom()
    chosen: list[int] = []
    reserved: set[int] = set()
    for _ in range(5000):
        if len(chosen) == count:
            return chosen
        port = rng.randint(low, high)
        pair = {port, port + BUS_PORT_OFFSET}
        if pair & reserved:
            continue
        if _port_is_free(host, port) and _port_is_free(host, port + BUS_PORT_OFFSET):
            chosen.append(port)
            reserved |= pair
    if len(chosen) == count:
        return chosen
    raise DevClusterError(f"could not find {count} free port pairs (P and P+10000) on {host}")


def _split_slots(parts: int) -> list[tuple[int, int]]:
    """Split 0..16383 into ``parts`` contiguous, nearly equal inclusive ranges."""
    bounds = [i * TOTAL_SLOTS // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(parts)]


def _format_ranges(slots: Sequence[int]) -> str:
    """Render sorted slot numbers compactly, e.g. ``0-5460,5462``."""
    parts: list[str] = []
    start = prev = -2
    for slot in [*slots, -10]:
        if slot == prev + 1:
            prev = slot
            continue
        if start >= 0:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = slot
    return ",".join(parts)


def _quote_config_value(value: str) -> str:
    # redis.conf values are split on spaces unless quoted; paths may contain spaces.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def _load_prctl() -> Any:
    """libc's prctl(), or None where it does not exist (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies.

    Linux actually sends the signal when the *thread* that forked the child exits,
    which is why tied servers are spawned by :class:`_SpawnerThread`.
    """
    prctl = _load_prctl()  # resolved before fork: the child must not load libraries
    if prctl is None:
        return None
    parent_pid = os.getpid()
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        # If the parent died between fork() and prctl(), the death signal will never
        # come: give up now rather than leave an orphan.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


class _SpawnerThread:
    """One daemon thread, alive until the process exits, that forks tied servers.

    PR_SET_PDEATHSIG fires when the forking *thread* exits, not the process. A
    node (re)started from a short-lived thread, say ``asyncio.to_thread`` in a
    chaos test, would be SIGKILLed as soon as that worker thread ended. Forking
    from a thread that lives exactly as long as the process avoids that.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._owner_pid = -1  # a forked copy of this process has no thread yet

    def run(self, job: Callable[[], T]) -> T:
        with self._lock:
            if self._owner_pid != os.getpid():
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, name="devcluster-spawner", daemon=True).start()
                self._owner_pid = os.getpid()
        result: Future[T] = Future()
        self._jobs.put((job, result))
        return result.result()

    def _serve(self) -> None:
        jobs = self._jobs
        while True:
            job, result = jobs.get()
            try:
                result.set_result(job())
            except BaseException as exc:  # handed to the caller, not lost here
                result.set_exception(exc)


_SPAWNER = _SpawnerThread()


def _read_cmdline(pid: int) -> str | None:
    """The command line of ``pid`` with NULs as spaces, or None if it is gone."""
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()
    # No procfs (macOS, BSD): ask ps.
    result = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or None


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    if Path("/proc/self").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        # The state letter follows the command name, which is in parentheses and
        # may itself contain spaces or parentheses.
        return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    # No procfs: signal 0 only checks existence (zombies count as alive here).
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_redis(pid: int, port: int) -> bool:
    """Whether ``pid`` still is the redis-server we started on ``port``.

    Guards against killing an unrelated process that reused the pid. Redis rewrites
    its process title to ``redis-server 127.0.0.1:PORT [cluster]``, so the title
    names both the program and the port.
    """
    if not _pid_alive(pid):
        return False
    cmdline = _read_cmdline(pid)
    return cmdline is not None and "redis-server" in cmdline and f":{port}" in cmdline


# Clusters tied to this process, stopped by the atexit hook if the owner forgot.
_LIVE_CLUSTERS: set[DevCluster] = set()
_LIVE_LOCK = threading.Lock()


def _stop_live_clusters() -> None:
    with _LIVE_LOCK:
        clusters = list(_LIVE_CLUSTERS)
    for cluster in clusters:
        try:
            cluster.stop()
        except Exception:
            logger.exception("could not stop dev cluster at exit")


atexit.register(_stop_live_clusters)


# --------------------------------------------------------------------------- cluster


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
    ) -> None:
        if primaries < 1:
            raise ValueError("primaries must be at least 1")
        if replicas_per_primary < 0:
            raise ValueError("replicas_per_primary must not be negative")
        if node_timeout_ms < 100:
            raise ValueError("node_timeout_ms must be at least 100")
        if isinstance(extra_config, str):  # a lone string would be split into characters
            raise TypeError("extra_config must be a sequence of config lines, not a string")
        self._host = _check_loopback(host)
        self._node_timeout_ms = node_timeout_ms
        self._n_primaries = primaries
        self._replicas_per_primary = replicas_per_primary
        self._tie_to_parent = tie_to_parent
        self._extra_config = [str(line) for line in extra_config]
        if state_path is not None:
            self._state_path: Path | None = Path(state_path)
        elif not tie_to_parent:
            self._state_path = default_state_path()
        else:
            self._state_path = None

        self._redis_bin = ""
        self._base_dir: Path | None = Path(base_dir) if base_dir else None
        self._owns_dir = base_dir is None
        self._nodes: list[DevNode] = []
        self._paused: set[int] = set()  # ports of nodes stopped with SIGSTOP
        # Slot ranges a node served just before kill()/pause(), for wait_failover().
        self._slots_before_fault: dict[int, list[int]] = {}
        self._last_slot_map: list[int | None] | None = None
        self._admins: dict[int, redis.Redis] = {}
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
        return list(self._nodes)

    @property
    def startup_nodes(self) -> str:
        """``host:port,host:port,...`` for ``REDIS_CLUSTER_NODES``."""
        return ",".join(node.address for node in self._nodes)

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
        for node in self._nodes:
            if node.port == port:
                return node
        raise DevClusterError(f"no node of this cluster listens on port {port}")

    def _own(self, node: DevNode) -> DevNode:
        # Accept a node from another handle on the same cluster (e.g. load_state),
        # but always act on our own object so pid/process stay in sync.
        return node if node in self._nodes else self.node_by_port(node.port)

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
            self._refuse_if_state_in_use(self._state_path)
        if self._base_dir is None:
            self._base_dir = Path(tempfile.mkdtemp(prefix="resilient-cache-cluster-"))
        else:
            self._base_dir.mkdir(parents=True, exist_ok=True)
        if self._tie_to_parent:
            # Registered before the first spawn so even an interrupted start is cleaned up.
            with _LIVE_LOCK:
                _LIVE_CLUSTERS.add(self)
        try:
            self._launch_with_retries()
            formed = time.monotonic()
            self._form_cluster(deadline=began + timeout)
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

    def _refuse_if_state_in_use(self, path: Path) -> None:
        # Overwriting the state file of a running cluster would orphan it.
        if not path.exists():
            return
        try:
            other = DevCluster.load_state(path)
        except (DevClusterError, OSError, ValueError) as exc:
            logger.warning("ignoring unreadable state file %s: %s", path, exc)
            return
        running = [node.address for node in other.nodes if _is_our_redis(node.pid, node.port)]
        if running:
            raise DevClusterError(
                f"a dev cluster recorded in {path} is still running ({', '.join(running)}); "
                "stop it first (`resilient-cache cluster down` or "
                "DevCluster.load_state(path).stop())"
            )
        logger.info("replacing stale state file %s", path)

    def _launch_with_retries(self) -> None:
        for attempt in range(1, _START_ATTEMPTS + 1):
            ports = _pick_free_ports(
                self._host, self._n_primaries * (1 + self._replicas_per_primary)
            )
            logger.debug("start attempt %d with ports %s", attempt, ports)
            try:
                self._launch(ports)
                return
            except _PortRaceError as exc:
                self._kill_processes_now()
                if attempt == _START_ATTEMPTS:
                    raise
                logger.info("port race on attempt %d (%s); retrying with new ports", attempt, exc)

    def _launch(self, ports: list[int]) -> None:
        assert self._base_dir is not None
        self._nodes = []
        for index, port in enumerate(ports):
            node_dir = self._base_dir / f"node-{index}"
            # A fresh directory: a leftover nodes.conf would make the node rejoin an
            # old cluster instead of starting empty.
            if node_dir.exists():
                shutil.rmtree(node_dir)
            node_dir.mkdir(parents=True)
            node = DevNode(host=self._host, port=port, pid=0, dir=str(node_dir))
            Path(node.config_path).write_text(self._config_text(node), encoding="utf-8")
            self._nodes.append(node)
        for node in self._nodes:
            self._spawn(node)
        if self._state_path is not None:
            # Written early so `cluster down` can clean up even if this process is
            # killed before the cluster is ready.
            self.save_state(self._state_path)
        self._wait_processes_up(self._nodes, _NODE_START_TIMEOUT)

    def _config_text(self, node: DevNode) -> str:
        lines = [
            "# Written by resilient_cache.devcluster for a throwaway test node.",
            f"port {node.port}",
            f"bind {self._host}",
            # Safe only because we bind loopback; there is no password.
            "protected-mode no",
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {self._node_timeout_ms}",
            # Persistence is pointless for a throwaway cluster and slows everything.
            "appendonly no",
            'save ""',
            "daemonize no",
            f"dir {_quote_config_value(node.dir)}",
            f"logfile {_quote_config_value(node.log_path)}",
            # A replica may always fail over, however long it was disconnected:
            # tests pause and kill nodes on purpose.
            "cluster-replica-validity-factor 0",
            # Keep the topology we built: replicas must not wander to other primaries.
            "cluster-allow-replica-migration no",
            # Full syncs straight over the socket, without waiting for more replicas.
            "repl-diskless-sync yes",
            "repl-diskless-sync-delay 0",
        ]
        if self._extra_config:
            lines.append("# extra_config")
            lines.extend(self._extra_config)
        return "\n".join(lines) + "\n"

    def _spawn(self, node: DevNode) -> None:
        argv = [self._redis_bin, node.config_path]
        preexec = _die_with_parent_preexec() if self._tie_to_parent else None
        with open(node.stdout_path, "ab") as output:

            def popen() -> subprocess.Popen[bytes]:
                process = subprocess.Popen(
                    argv,
                    cwd=node.dir,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    # A session of its own so a Ctrl-C in the terminal reaches only
                    # Python, which then stops the servers in order, and so the CLI's
                    # detached cluster survives the terminal closing.
                    start_new_session=True,
                    preexec_fn=preexec,
                )
                # Recorded here, not by the caller, so stop() still finds the server
                # if the caller is interrupted (Ctrl-C) while waiting for this.
                node.process, node.pid = process, process.pid
                return process

            try:
                if preexec is not None:
                    _SPAWNER.run(popen)
                else:
                    popen()
            except OSError as exc:
                raise DevClusterError(f"could not run {self._redis_bin}: {exc}") from exc
        logger.debug("spawned redis-server pid %d on %s in %s", node.pid, node.address, node.dir)

    def _wait_processes_up(self, nodes: Sequence[DevNode], timeout: float) -> None:
        """Wait until every node answers PING; diagnose servers that exited."""

        def problems() -> list[str]:
            missing: list[str] = []
            for node in nodes:
                if not self._process_alive(node):
                    raise self._exit_error(node)
                try:
                    self.admin(node).ping()
                except redis.RedisError as exc:
                    missing.append(f"{node.address} does not answer PING yet ({exc})")
            return missing

        self._poll_until(problems, timeout, "redis-server processes to accept connections")

    def _exit_error(self, node: DevNode) -> DevClusterError:
        log = _tail(node.log_path)
        output = _tail(node.stdout_path)
        details = "\n".join(part for part in (log, output) if part)
        code = node.process.returncode if node.process is not None else None
        message = (
            f"redis-server for {node.address} exited (code {code}) during start; "
            f"last log lines:\n{details or '(no output)'}"
        )
        if "Address already in use" in details:
            return _PortRaceError(message)
        return DevClusterError(message)

    def _form_cluster(self, deadline: float) -> None:
        primaries = self._nodes[: self._n_primaries]
        replicas = self._nodes[self._n_primaries :]
        ids = {node.port: str(self.admin(node).cluster("MYID")) for node in self._nodes}
        for epoch, (node, (first, last)) in enumerate(
            zip(primaries, _split_slots(len(primaries)), strict=True), start=1
        ):
            admin = self.admin(node)
            # Distinct config epochs up front, as redis-cli does, so the nodes need not
            # resolve epoch collisions one bump at a time after meeting.
            admin.cluster("SET-CONFIG-EPOCH", epoch)
            admin.cluster("ADDSLOTSRANGE", first, last)
            logger.debug("%s serves slots %d-%d", node.address, first, last)
        # One node introducing itself to all others is enough: gossip does the rest.
        hub = self.admin(self._nodes[0])
        for node in self._nodes[1:]:
            hub.cluster("MEET", node.host, node.port)
        self._poll_until(
            self._gossip_problems,
            max(1.0, deadline - time.monotonic()),
            "every node to know every other node",
        )
        for index, replica in enumerate(replicas):
            primary = primaries[index % len(primaries)]
            self.admin(replica).cluster("REPLICATE", ids[primary.port])
            logger.debug("%s replicates %s", replica.address, primary.address)

    def _gossip_problems(self) -> list[str]:
        problems: list[str] = []
        for node in self._nodes:
            table = self.admin(node).cluster("NODES")
            # redis-py parses CLUSTER NODES into {address: {"flags": ..., ...}}.
            known = [
                entry
                for entry in table.values()
                if "handshake" not in str(entry.get("flags", ""))
                and "noaddr" not in str(entry.get("flags", ""))
            ]
            if len(known) < len(self._nodes):
                problems.append(f"{node.address} knows {len(known)}/{len(self._nodes)} nodes")
        return problems

    # ------------------------------------------------------------------ waiting

    def _poll_until(
        self,
        problems_fn: Callable[[], list[str]],
        timeout: float,
        what: str,
        interval: float = _POLL_INTERVAL,
    ) -> None:
        """Call ``problems_fn`` until it returns no problems or ``timeout`` passes."""
        began = time.monotonic()
        deadline = began + timeout
        previous: list[str] = []
        while True:
            problems = problems_fn()
            if not problems:
                logger.debug("%s: done after %.2fs", what, time.monotonic() - began)
                return
            if problems != previous:  # log changes only, not every poll
                logger.debug("waiting for %s: %s", what, "; ".join(problems))
                previous = problems
            if time.monotonic() >= deadline:
                raise DevClusterError(
                    f"timed out after {timeout:.1f}s waiting for {what}: " + "; ".join(problems)
                )
            time.sleep(interval)

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 30.0,
        what: str = "condition",
        interval: float = _POLL_INTERVAL,
    ) -> T:
        """Poll ``predicate`` until it returns something truthy, and return that.

        Redis connection errors and timeouts inside the predicate count as "not
        yet" (nodes come and go in chaos tests); the last one is quoted in the
        error. Other exceptions propagate.

        Raises:
            DevClusterError: naming ``what`` when ``timeout`` seconds pass.
        """
        began = time.monotonic()
        deadline = began + timeout
        last_error: BaseException | None = None
        while True:
            try:
                value = predicate()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                last_error = exc
            else:
                if value:
                    logger.debug("%s: done after %.2fs", what, time.monotonic() - began)
                    return value
            if time.monotonic() >= deadline:
                detail = (
                    f" (last error: {type(last_error).__name__}: {last_error})"
                    if last_error is not None
                    else ""
                )
                raise DevClusterError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
            time.sleep(interval)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the cluster is fully usable.

        Ready means, for every live (running and not paused) node:
        ``cluster_state:ok`` and all 16384 slots assigned; every replica has
        ``master_link_status:up``; all live nodes agree on which node serves each
        slot, and each of those is a live node whose role is master.

        Raises:
            DevClusterError: on timeout, listing each node and unmet condition.
        """
        self._poll_until(self._readiness_problems, timeout, "the dev cluster to be ready")

    def _readiness_problems(self) -> list[str]:
        live = self._live_nodes()
        if not live:
            return ["no node is running"]
        problems: list[str] = []
        roles: dict[int, tuple[str, int | None]] = {}
        views: dict[int, list[int | None]] = {}
        flags: dict[int, dict[int, str]] = {}
        for node in live:
            try:
                info = self.cluster_info(node)
                role = roles[node.port] = self._role(node)
                state = info.get("cluster_state")
                if state != "ok":
                    problems.append(f"{node.address}: cluster_state:{state}")
                assigned = info.get("cluster_slots_assigned")
                if assigned != str(TOTAL_SLOTS):
                    problems.append(f"{node.address}: {assigned}/{TOTAL_SLOTS} slots assigned")
                if role[0] == "replica":
                    link = self.info(node, "replication").get("master_link_status")
                    if link != "up":
                        problems.append(
                            f"{node.address}: replica of port {role[1]} has "
                            f"master_link_status:{link}"
                        )
                views[node.port] = self._slot_owners(node)
                flags[node.port] = self._gossip_roles(node)
            except redis.RedisError as exc:
                problems.append(f"{node.address}: does not answer admin commands ({exc})")
        if not views:
            return problems
        reference_port, reference = next(iter(views.items()))
        for port, view in views.items():
            if view != reference:
                slot = next(s for s in range(TOTAL_SLOTS) if view[s] != reference[s])
                problems.append(
                    f"{self._host}:{port} routes slot {slot} to port {view[slot]} but "
                    f"{self._host}:{reference_port} routes it to port {reference[slot]}"
                )
        for owner, slots in _group_slots(reference).items():
            if owner is None:
                continue  # already reported as unassigned slots
            owner_role = roles.get(owner)
            where = f"slots {_format_ranges(slots)} are served by {self._host}:{owner}"
            if owner_role is None:
                problems.append(f"{where}, which is not running or not answering")
            elif owner_role[0] != "master":
                problems.append(f"{where}, whose role is {owner_role[0]}")
        # Every node's gossip view must show each live node in the role it really has, or a
        # client asking that node (CLUSTER NODES) would see e.g. 4 primaries and 2 replicas.
        for observer, seen in flags.items():
            for port, (actual, _) in roles.items():
                if seen.get(port) not in (None, actual):
                    problems.append(
                        f"{self._host}:{observer} still sees {self._host}:{port} as "
                        f"{seen.get(port)}, but it is a {actual}"
                    )
        if not problems:
            self._last_slot_map = reference
        return problems

    def _gossip_roles(self, observer: DevNode) -> dict[int, str]:
        """Each node's role ("master"/"replica") as ``observer``'s CLUSTER NODES shows it."""
        text = str(self.admin(observer).execute_command("CLUSTER", "NODES"))
        seen: dict[int, str] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3 or "@" not in parts[1]:
                continue
            port = int(parts[1].split("@", 1)[0].rpartition(":")[2])
            node_flags = parts[2].split(",")
            if "master" in node_flags:
                seen[port] = "master"
            elif "slave" in node_flags:
                seen[port] = "replica"
        return seen

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
        old = self._own(old_primary)
        slots = self._slots_served_by(old)
        if not slots:
            raise DevClusterError(
                f"{old.address} served no slots, so there is nothing to fail over "
                "(is it a replica, or did the failover already happen?)"
            )
        new_owner: list[int] = []

        def problems() -> list[str]:
            observers = [node for node in self._live_nodes() if node is not old]
            if not observers:
                return ["no other node is running"]
            found: list[str] = []
            for observer in observers:
                try:
                    state = self.cluster_info(observer).get("cluster_state")
                    owners = self._slot_owners(observer)
                except redis.RedisError as exc:
                    found.append(f"{observer.address}: does not answer ({exc})")
                    continue
                if state != "ok":
                    found.append(f"{observer.address}: cluster_state:{state}")
                stale = [s for s in slots if owners[s] == old.port or owners[s] is None]
                if stale:
                    found.append(
                        f"{observer.address} still routes slots {_format_ranges(stale)} "
                        f"to {old.address} or nowhere"
                    )
                    continue
                for port in {owners[s] for s in slots}:
                    assert port is not None
                    candidate = self.node_by_port(port)
                    if not self._is_live(candidate):
                        found.append(f"{observer.address} routes to {candidate.address}, not live")
                        continue
                    try:
                        role = self._role(candidate)[0]
                    except redis.RedisError as exc:
                        found.append(f"{candidate.address}: does not answer ({exc})")
                        continue
                    if role != "master":
                        found.append(f"{candidate.address} serves the slots but is a {role}")
                new_owner[:] = [p for p in (owners[slots[0]],) if p is not None]
            return found

        began = time.monotonic()
        self._poll_until(problems, timeout, f"failover away from {old.address}")
        winner = self.node_by_port(new_owner[0])
        logger.info(
            "failover: %s took over from %s (%.2fs of waiting)",
            winner.address,
            old.address,
            time.monotonic() - began,
        )
        self._slots_before_fault.pop(old.port, None)
        return winner

    def _slots_served_by(self, node: DevNode) -> list[int]:
        # Prefer what we recorded just before the fault, since by now the slots may
        # already have moved; then what a live node says now; then the last ready map.
        if node.port in self._slots_before_fault:
            return self._slots_before_fault[node.port]
        for observer in self._live_nodes():
            if observer is node:
                continue
            with contextlib.suppress(redis.RedisError):
                owners = self._slot_owners(observer)
                return [slot for slot, port in enumerate(owners) if port == node.port]
        if self._last_slot_map is not None:
            return [slot for slot, port in enumerate(self._last_slot_map) if port == node.port]
        return []

    # ------------------------------------------------------------------ queries

    def admin(self, node: DevNode) -> redis.Redis:
        """A synchronous client for one node, for admin commands.

        Short timeouts and no retries, so a dead or paused node fails fast instead
        of stalling a poll loop. Responses are decoded to ``str``. The client is
        cached per node and closed by :meth:`stop`.
        """
        node = self._own(node)
        client = self._admins.get(node.port)
        if client is None:
            client = redis.Redis(
                host=node.host,
                port=node.port,
                socket_connect_timeout=1.0,
                socket_timeout=2.0,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
            self._admins[node.port] = client
        return client

    def info(self, node: DevNode, section: str | None = None) -> dict[str, Any]:
        """``INFO`` (or one section of it) of ``node``, parsed into a dict."""
        result = self.admin(node).info(section) if section else self.admin(node).info()
        return dict(result)

    def cluster_info(self, node: DevNode) -> dict[str, str]:
        """``CLUSTER INFO`` of ``node`` as ``{"cluster_state": "ok", ...}``."""
        raw = self.admin(node).cluster("INFO")
        if isinstance(raw, dict):
            return {str(key): str(value) for key, value in raw.items()}
        # Older redis-py versions return the raw text.
        fields = (line.split(":", 1) for line in str(raw).splitlines() if ":" in line)
        return {key.strip(): value.strip() for key, value in fields}

    def _role(self, node: DevNode) -> tuple[str, int | None]:
        """("master", None) or ("replica", port of its primary), from ``ROLE``."""
        reply = self.admin(node).role()
        kind = str(reply[0])
        if kind == "slave":
            return "replica", int(reply[2])
        return kind, None

    def _slot_owners(self, observer: DevNode) -> list[int | None]:
        """For each slot, the port of its primary as ``observer`` sees it."""
        owners: list[int | None] = [None] * TOTAL_SLOTS
        # CLUSTER SLOTS: [[first, last, [ip, port, id, ...], replicas...], ...]
        for entry in self.admin(observer).cluster("SLOTS"):
            first, last, primary = int(entry[0]), int(entry[1]), entry[2]
            owners[first : last + 1] = [int(primary[1])] * (last - first + 1)
        return owners

    def primaries(self) -> list[DevNode]:
        """Live nodes whose current role (per ``ROLE``) is master.

        Roles change with failovers, so this always asks the servers. Dead and
        paused nodes are left out.
        """
        return [node for node in self._live_nodes() if self._role_or_none(node) == "master"]

    def replicas(self) -> list[DevNode]:
        """Live nodes whose current role (per ``ROLE``) is replica."""
        return [node for node in self._live_nodes() if self._role_or_none(node) == "replica"]

    def _role_or_none(self, node: DevNode) -> str | None:
        try:
            return self._role(node)[0]
        except redis.RedisError:
            return None

    def replica_of(self, primary: DevNode) -> DevNode | None:
        """A live replica currently replicating from ``primary``, or None.

        Works for a dead primary too: its replicas keep naming it until a failover.
        """
        primary = self._own(primary)
        for node in self._live_nodes():
            if node is primary:
                continue
            with contextlib.suppress(redis.RedisError):
                role, of_port = self._role(node)
                if role == "replica" and of_port == primary.port:
                    return node
        return None

    def primary_for_key(self, key: str) -> DevNode:
        """The node that currently serves ``key``'s slot, as a live node sees it."""
        errors: list[str] = []
        for observer in self._live_nodes():
            try:
                slot = int(self.admin(observer).cluster("KEYSLOT", key))
                owner = self._slot_owners(observer)[slot]
            except redis.RedisError as exc:
                errors.append(f"{observer.address}: {exc}")
                continue
            if owner is None:
                raise DevClusterError(f"slot {slot} of key {key!r} is not assigned to any node")
            return self.node_by_port(owner)
        raise DevClusterError(
            "no live node could say which node serves the key: " + ("; ".join(errors) or "none")
        )

    def _process_alive(self, node: DevNode) -> bool:
        if node.process is not None:
            return node.process.poll() is None
        return _is_our_redis(node.pid, node.port)

    def _is_live(self, node: DevNode) -> bool:
        return node.port not in self._paused and self._process_alive(node)

    def _live_nodes(self) -> list[DevNode]:
        return [node for node in self._nodes if self._is_live(node)]

    def status(self) -> list[NodeStatus]:
        """One row per node: address, pid, alive, paused, role and cluster_state."""
        rows: list[NodeStatus] = []
        for node in self._nodes:
            alive = self._process_alive(node)
            paused = node.port in self._paused
            role: str | None = None
            state: str | None = None
            if alive and not paused:
                with contextlib.suppress(redis.RedisError):
                    role = self._role(node)[0]
                    state = self.cluster_info(node).get("cluster_state")
            rows.append(
                NodeStatus(
                    address=node.address,
                    port=node.port,
                    pid=node.pid,
                    dir=node.dir,
                    alive=alive,
                    paused=paused,
                    role=role,
                    cluster_state=state,
                )
            )
        return rows

    # ------------------------------------------------------------------ faults

    def _remember_slots(self, node: DevNode) -> None:
        # Record what the node serves before we hurt it: wait_failover() needs it
        # even if the failover finishes before anyone asks.
        for observer in self._live_nodes():
            if observer is node:
                continue
            with contextlib.suppress(redis.RedisError):
                owners = self._slot_owners(observer)
                self._slots_before_fault[node.port] = [
                    slot for slot, port in enumerate(owners) if port == node.port
                ]
                return

    def _signal(self, node: DevNode, sig: int) -> None:
        if node.process is not None:
            if node.process.poll() is not None:
                raise DevClusterError(f"{node.address} is not running")
            node.process.send_signal(sig)
            return
        # No Popen (loaded from a state file): make sure the pid was not reused.
        if not _is_our_redis(node.pid, node.port):
            raise DevClusterError(f"{node.address} (pid {node.pid}) is not running")
        os.kill(node.pid, sig)

    def kill(self, node: DevNode, sig: int = signal.SIGKILL, *, timeout: float = 10.0) -> None:
        """Send ``sig`` to ``node``'s server (default SIGKILL: a crash).

        For SIGKILL, SIGTERM, SIGINT and SIGQUIT this also waits up to ``timeout``
        seconds for the process to be gone, so callers can rely on it being dead.
        """
        node = self._own(node)
        self._remember_slots(node)
        logger.info("sending %s to %s (pid %d)", signal.Signals(sig).name, node.address, node.pid)
        self._signal(node, sig)
        if sig not in _TERMINATING_SIGNALS:
            return
        if node.port in self._paused:
            # A stopped process only acts on SIGKILL; let it handle the others.
            self._signal_quietly(node, signal.SIGCONT)
            self._paused.discard(node.port)
        self._drop_admin(node)
        self.wait_for(lambda: not self._process_alive(node), timeout, f"{node.address} to exit")

    def pause(self, node: DevNode) -> None:
        """Freeze ``node`` with SIGSTOP: it keeps its sockets but answers nothing."""
        node = self._own(node)
        self._remember_slots(node)
        logger.info("pausing %s (pid %d)", node.address, node.pid)
        self._signal(node, signal.SIGSTOP)
        self._paused.add(node.port)

    def resume(self, node: DevNode) -> None:
        """Thaw a node frozen by :meth:`pause` (SIGCONT)."""
        node = self._own(node)
        logger.info("resuming %s (pid %d)", node.address, node.pid)
        self._signal(node, signal.SIGCONT)
        self._paused.discard(node.port)

    def restart(self, node: DevNode, timeout: float = _NODE_START_TIMEOUT) -> None:
        """Start a dead node again on the same port, dir and ``nodes.conf``.

        The node rejoins with its old identity; if it was a primary that has been
        failed over, the cluster turns it into a replica of the new primary. This
        waits only until the server answers PING; call :meth:`wait_ready` for the
        whole cluster.
        """
        node = self._own(node)
        if self._process_alive(node):
            raise DevClusterError(f"{node.address} is still running; kill() it first")
        if not self._redis_bin:
            self._redis_bin = find_redis_server()
        self._paused.discard(node.port)
        self._slots_before_fault.pop(node.port, None)
        self._drop_admin(node)
        logger.info("restarting %s", node.address)
        self._spawn(node)
        if self._state_path is not None and self._state_path.exists():
            self.save_state(self._state_path)  # the pid changed
        self._wait_processes_up([node], timeout)

    def _drop_admin(self, node: DevNode) -> None:
        client = self._admins.pop(node.port, None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _signal_quietly(self, node: DevNode, sig: int) -> None:
        with contextlib.suppress(DevClusterError, ProcessLookupError, PermissionError):
            self._signal(node, sig)

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
        with _LIVE_LOCK:
            _LIVE_CLUSTERS.discard(self)
        running = [node for node in self._nodes if self._process_alive(node)]
        for node in running:
            self._signal_quietly(node, signal.SIGCONT)
            self._signal_quietly(node, signal.SIGTERM)
        deadline = time.monotonic() + _TERM_GRACE
        while time.monotonic() < deadline and any(self._process_alive(n) for n in running):
            time.sleep(_POLL_INTERVAL)
        stubborn = [node for node in running if self._process_alive(node)]
        for node in stubborn:
            logger.warning("%s ignored SIGTERM; sending SIGKILL", node.address)
            self._signal_quietly(node, signal.SIGKILL)
        self._reap(running)
        self._paused.clear()
        for port in list(self._admins):
            self._drop_admin(self.node_by_port(port))
        if self._owns_dir and self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
        if self._state_path is not None:
            self._remove_state_file(self._state_path)
        if running:
            logger.info("dev cluster stopped (%d servers)", len(running))

    def _kill_processes_now(self) -> None:
        """SIGKILL and reap every server (used between start attempts)."""
        for node in self._nodes:
            if self._process_alive(node):
                self._signal_quietly(node, signal.SIGKILL)
        self._reap(self._nodes)
        for port in list(self._admins):
            self._drop_admin(self.node_by_port(port))

    def _reap(self, nodes: Sequence[DevNode], timeout: float = 10.0) -> None:
        # Wait for the processes to be gone; for our own children this also reaps
        # them, so no zombie is left in the process table.
        deadline = time.monotonic() + timeout
        for node in nodes:
            if node.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            else:
                while _is_our_redis(node.pid, node.port) and time.monotonic() < deadline:
                    time.sleep(_POLL_INTERVAL)
            if self._process_alive(node):
                logger.error("%s (pid %d) is still running after SIGKILL", node.address, node.pid)

    def _remove_state_file(self, path: Path) -> None:
        # Only remove the file if it still describes this cluster: someone may have
        # started another cluster that recorded itself there since.
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("base_dir") == self.base_dir:
            with contextlib.suppress(OSError):
                path.unlink()

    # ------------------------------------------------------------------ state file

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Record this cluster in a JSON file so :meth:`load_state` can find it.

        The file is replaced atomically; its directory is created private (0700).
        """
        target = Path(path)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {
            "version": STATE_FILE_VERSION,
            "base_dir": self.base_dir,
            "owns_dir": self._owns_dir,
            "host": self._host,
            "node_timeout_ms": self._node_timeout_ms,
            "primaries": self._n_primaries,
            "replicas_per_primary": self._replicas_per_primary,
            "extra_config": self._extra_config,
            "redis_server": self._redis_bin,
            "owner_pid": os.getpid(),
            "nodes": [{"port": n.port, "pid": n.pid, "dir": n.dir} for n in self._nodes],
        }
        scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        scratch.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(scratch, target)
        self._state_path = target
        logger.debug("saved dev cluster state to %s", target)

    @classmethod
    def load_state(cls, path: str | os.PathLike[str]) -> DevCluster:
        """Rebuild a handle on a cluster recorded by :meth:`save_state`.

        The handle knows the nodes by pid only (``DevNode.process`` is None). Its
        :meth:`stop` kills the recorded pids that still are our redis-servers and
        removes the directory (if the cluster created it) and the state file.
        """
        source = Path(path)
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DevClusterError(f"no dev cluster state file at {source}") from None
        if not isinstance(data, dict) or data.get("version") != STATE_FILE_VERSION:
            raise DevClusterError(f"{source} is not a dev cluster state file this version reads")
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
        cluster._redis_bin = str(data.get("redis_server") or "")
        cluster._nodes = [
            DevNode(host=cluster._host, port=int(n["port"]), pid=int(n["pid"]), dir=str(n["dir"]))
            for n in data["nodes"]
        ]
        cluster._started = True
        return cluster


def _group_slots(owners: Sequence[int | None]) -> dict[int | None, list[int]]:
    grouped: dict[int | None, list[int]] = {}
    for slot, port in enumerate(owners):
        grouped.setdefault(port, []).append(slot)
    return grouped
