"""The ``redis-server`` processes: finding the binary, spawning, signalling, reaping.

Servers must never outlive the process that owns them by accident: on Linux each
tied server gets ``PR_SET_PDEATHSIG=SIGKILL`` (forked from :class:`_SpawnerThread`,
see there why), and :func:`stop_at_exit` registers its owner with an ``atexit``
hook that stops it if nobody else did. Servers loaded from a state file are known
by pid only, so every signal to one first checks that the pid still is our
redis-server (:func:`is_our_redis`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis

from .admin import Admin
from .errors import DevClusterError, PortRaceError
from .node import DevNode
from .waits import POLL_INTERVAL, poll_until

__all__ = [
    "NODE_START_TIMEOUT",
    "START_ATTEMPTS",
    "find_redis_server",
    "forget_at_exit",
    "is_our_redis",
    "kill_now",
    "process_alive",
    "signal_node",
    "signal_quietly",
    "spawn",
    "stop_at_exit",
    "terminate",
    "wait_answering",
]

logger = logging.getLogger("resilient_cache.devcluster")

T = TypeVar("T")

# How long a single server may take to answer PING after being spawned. Redis
# normally needs a few milliseconds; the slack is for a loaded CI machine.
NODE_START_TIMEOUT = 15.0
# Port-race retries: another process may grab a port between our probe and the
# server's bind. Trying again with fresh ports is cheap.
START_ATTEMPTS = 3
# How long terminate() waits after SIGTERM before it escalates to SIGKILL. A
# throwaway server has nothing worth saving, so this is kept short.
_TERM_GRACE = 3.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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


# --------------------------------------------------------------------------- dying with us


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


class _Stoppable(Protocol):
    def stop(self) -> None: ...


# Owners of tied servers, stopped by the atexit hook if the owner forgot; the value
# says what the owner is, for the log.
_TIED_OWNERS: dict[_Stoppable, str] = {}
_TIED_LOCK = threading.Lock()


def stop_at_exit(owner: _Stoppable, what: str) -> None:
    """Have ``owner.stop()`` called at interpreter exit unless :func:`forget_at_exit` ran."""
    with _TIED_LOCK:
        _TIED_OWNERS[owner] = what


def forget_at_exit(owner: _Stoppable) -> None:
    """Undo :func:`stop_at_exit` (the owner stopped itself)."""
    with _TIED_LOCK:
        _TIED_OWNERS.pop(owner, None)


def _stop_tied_owners() -> None:
    with _TIED_LOCK:
        owners = list(_TIED_OWNERS.items())
    for owner, what in owners:
        try:
            owner.stop()
        except Exception:
            logger.exception("could not stop %s at exit", what)


atexit.register(_stop_tied_owners)


# --------------------------------------------------------------------------- pids


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


def is_our_redis(pid: int, port: int) -> bool:
    """Whether ``pid`` still is the redis-server we started on ``port``.

    Guards against killing an unrelated process that reused the pid. Redis rewrites
    its process title to ``redis-server 127.0.0.1:PORT [cluster]``, so the title
    names both the program and the port.
    """
    if not _pid_alive(pid):
        return False
    cmdline = _read_cmdline(pid)
    return cmdline is not None and "redis-server" in cmdline and f":{port}" in cmdline


def process_alive(node: DevNode) -> bool:
    """Whether ``node``'s server is running (paused counts as running)."""
    if node.process is not None:
        return node.process.poll() is None
    return is_our_redis(node.pid, node.port)


# --------------------------------------------------------------------------- starting


def spawn(binary: str, node: DevNode, *, tie_to_parent: bool) -> None:
    """Start ``binary`` with ``node``'s config; sets ``node.process`` and ``node.pid``."""
    argv = [binary, node.config_path]
    preexec = _die_with_parent_preexec() if tie_to_parent else None
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
            raise DevClusterError(f"could not run {binary}: {exc}") from exc
    logger.debug("spawned redis-server pid %d on %s in %s", node.pid, node.address, node.dir)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


def _exit_error(node: DevNode) -> DevClusterError:
    log = _tail(node.log_path)
    output = _tail(node.stdout_path)
    details = "\n".join(part for part in (log, output) if part)
    code = node.process.returncode if node.process is not None else None
    message = (
        f"redis-server for {node.address} exited (code {code}) during start; "
        f"last log lines:\n{details or '(no output)'}"
    )
    if "Address already in use" in details:
        return PortRaceError(message)
    return DevClusterError(message)


def wait_answering(nodes: Sequence[DevNode], admin: Admin, timeout: float) -> None:
    """Wait until every node answers PING; diagnose servers that exited.

    Raises:
        PortRaceError: a server exited because its port was taken.
        DevClusterError: a server exited otherwise (quoting its log), or timeout.
    """

    def problems() -> list[str]:
        missing: list[str] = []
        for node in nodes:
            if not process_alive(node):
                raise _exit_error(node)
            try:
                admin.client(node).ping()
            except redis.RedisError as exc:
                missing.append(f"{node.address} does not answer PING yet ({exc})")
        return missing

    poll_until(problems, timeout, "redis-server processes to accept connections")


# --------------------------------------------------------------------------- signals, stopping


def signal_node(node: DevNode, sig: int) -> None:
    """Send ``sig`` to ``node``'s server; DevClusterError if it is not running."""
    if node.process is not None:
        if node.process.poll() is not None:
            raise DevClusterError(f"{node.address} is not running")
        node.process.send_signal(sig)
        return
    # No Popen (loaded from a state file): make sure the pid was not reused.
    if not is_our_redis(node.pid, node.port):
        raise DevClusterError(f"{node.address} (pid {node.pid}) is not running")
    os.kill(node.pid, sig)


def signal_quietly(node: DevNode, sig: int) -> None:
    """:func:`signal_node`, ignoring a server that is already gone."""
    with contextlib.suppress(DevClusterError, ProcessLookupError, PermissionError):
        signal_node(node, sig)


def terminate(nodes: Sequence[DevNode]) -> list[DevNode]:
    """Stop the running servers among ``nodes`` and reap them; return those.

    Each gets SIGCONT (a paused one could not act on anything else), then SIGTERM,
    then SIGKILL if it is still there after a few seconds.
    """
    running = [node for node in nodes if process_alive(node)]
    for node in running:
        signal_quietly(node, signal.SIGCONT)
        signal_quietly(node, signal.SIGTERM)
    deadline = time.monotonic() + _TERM_GRACE
    while time.monotonic() < deadline and any(process_alive(n) for n in running):
        time.sleep(POLL_INTERVAL)
    stubborn = [node for node in running if process_alive(node)]
    for node in stubborn:
        logger.warning("%s ignored SIGTERM; sending SIGKILL", node.address)
        signal_quietly(node, signal.SIGKILL)
    _reap(running)
    return running


def kill_now(nodes: Sequence[DevNode]) -> None:
    """SIGKILL and reap every running server among ``nodes`` (between start attempts)."""
    for node in nodes:
        if process_alive(node):
            signal_quietly(node, signal.SIGKILL)
    _reap(nodes)


def _reap(nodes: Sequence[DevNode], timeout: float = 10.0) -> None:
    # Wait for the processes to be gone; for our own children this also reaps
    # them, so no zombie is left in the process table.
    deadline = time.monotonic() + timeout
    for node in nodes:
        if node.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        else:
            while is_our_redis(node.pid, node.port) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL)
        if process_alive(node):
            logger.error("%s (pid %d) is still running after SIGKILL", node.address, node.pid)
