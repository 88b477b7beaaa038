"""A slow replica, for real: a delaying TCP proxy in front of one replica of a DevCluster.

Two parts:

- :class:`DelayProxy`, an asyncio TCP proxy on 127.0.0.1. It forwards every connection to one
  server and holds each chunk of data coming back from the server for ``delay`` seconds before
  passing it on to the client. Requests go through at once; replies keep their order; the
  delay is counted from the moment each chunk arrived, so it does not add up along a
  connection. :class:`ProxyProcess` runs one in a process of its own, so that sync code
  (fixtures, the benchmarks) can use it and it never shares the event loop, or the GIL, of the
  client under test.
- :func:`slow_replica`, a context manager that puts such a proxy in front of one replica of a
  :class:`~resilient_cache.devcluster.DevCluster` and makes that replica *announce the proxy's
  port* to the cluster, so that every client that learns the topology from ``CLUSTER SLOTS`` /
  ``CLUSTER NODES`` reaches the replica only through the delay. On exit the announced ports are
  restored and the proxy closed.

How the announcement works (checked on Redis 7.0.15):

- ``CONFIG SET cluster-announce-port <proxy port>`` on the replica changes the port it gossips
  for itself; every node's ``CLUSTER SLOTS`` shows the replica at that port within about 0.5 s
  (``cluster-node-timeout`` 2 s). ``cluster-announce-bus-port`` is set first to the replica's
  real bus port (from its own ``CLUSTER NODES`` line, ``ip:port@cport``), so the other nodes
  keep reaching its cluster bus whatever the server derives the bus port from.
- Redis 7 leaves a replica out of ``CLUSTER SLOTS`` while its replication offset is 0
  (``isReplicaAvailable()``): on a fresh cluster nothing has been replicated yet, and the
  replica (whatever port it announces) is not listed at all until the first write reaches it
  (or the primary's periodic replication PING, every 10 s). So a key of the replica's shard is
  written first.
- The replica's replication link is unaffected (it connects to its primary, not the other way
  round), and ``CONFIG SET`` is not persisted: a replica restarted after a kill announces its
  real port again.

Nothing sleeps and hopes: each step waits on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from resilient_cache.devcluster import DevCluster, DevNode

__all__ = [
    "DelayProxy",
    "ProxyProcess",
    "SlowReplica",
    "announced_replicas",
    "slow_replica",
    "wait_replicas_listed",
]

LOOPBACK = "127.0.0.1"
CHUNK = 64 * 1024


class DelayProxy:
    """An asyncio TCP proxy on 127.0.0.1 that delays what the server sends back.

    Every accepted connection gets its own connection to ``(target_host, target_port)``.
    Client to server: forwarded at once. Server to client: each chunk is held until ``delay``
    seconds after it arrived (never less; the event loop's timer granularity may add a
    millisecond), in order. ``delay`` may be changed while the proxy runs; it applies to chunks
    that arrive afterwards.

    ``async with DelayProxy(...) as proxy`` or ``await proxy.start()`` / ``await proxy.aclose()``,
    on one event loop.
    """

    def __init__(self, target_host: str, target_port: int, delay: float, *, port: int = 0) -> None:
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.target = (target_host, target_port)
        self.delay = delay
        self._port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._pumps: set[asyncio.Future[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False
        #: Connections accepted so far, open now, and replies (chunks) delayed so far.
        self.accepted = 0
        self.open = 0
        self.chunks = 0

    @property
    def port(self) -> int:
        """The port the proxy listens on (kept after it closed)."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, self._port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop accepting, close every connection (both sides) and wait for their handlers."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        for writer in list(self._writers):
            writer.close()
        current = asyncio.current_task()
        handlers = [task for task in self._handlers if task is not current]
        if handlers:
            _, late = await asyncio.wait(handlers, timeout=5.0)
            for task in late:  # still connecting upstream: give up on it
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        # The handler task is asyncio's server's, which logs it when it ends cancelled: when
        # aclose() has to cancel it, it still ends normally.
        with contextlib.suppress(asyncio.CancelledError):
            await self._connection(client_reader, client)

    async def _connection(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(client)
        self.accepted += 1
        self.open += 1
        upstream: asyncio.StreamWriter | None = None
        pumps: list[asyncio.Future[None]] = []
        try:
            if self._closing:
                return
            try:
                upstream_reader, upstream = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the server is gone: the client sees its connection closed
            self._writers.add(upstream)
            if self._closing:
                return
            replies: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
            pumps = [
                asyncio.ensure_future(self._requests(client_reader, upstream)),
                asyncio.ensure_future(self._receive(upstream_reader, replies)),
                asyncio.ensure_future(self._deliver(replies, client)),
            ]
            self._pumps.update(pumps)
            requests, _, deliver = pumps
            # Done when every reply was delivered (the server closed, or the client went away
            # while we wrote to it), or the client went away while sending. A client that only
            # half-closed still gets the replies to what it sent.
            await asyncio.wait([requests, deliver], return_when=asyncio.FIRST_COMPLETED)
            if not deliver.done() and not requests.cancelled() and not requests.exception():
                await asyncio.wait([deliver])
        finally:
            for pump in pumps:
                pump.cancel()
                self._pumps.discard(pump)
            if pumps:
                await asyncio.gather(*pumps, return_exceptions=True)
            self.open -= 1
            for writer in (client, upstream):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            self._handlers.discard(task)

    async def _requests(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        """Client to server, undelayed. At the client's end of stream, half-close upstream."""
        while data := await reader.read(CHUNK):
            upstream.write(data)
            await upstream.drain()
        if upstream.can_write_eof():
            with contextlib.suppress(OSError):
                upstream.write_eof()

    async def _receive(
        self, reader: asyncio.StreamReader, replies: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        """Server to queue: each chunk stamped with the time it may be delivered."""
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(CHUNK):
                replies.put_nowait((loop.time() + self.delay, data))
        finally:
            replies.put_nowait(None)  # the server's end of stream (or an error): deliver, close

    async def _deliver(
        self, replies: asyncio.Queue[tuple[float, bytes] | None], client: asyncio.StreamWriter
    ) -> None:
        """Queue to client, each chunk no earlier than its time, in arrival order."""
        loop = asyncio.get_running_loop()
        while (item := await replies.get()) is not None:
            due, data = item
            left = due - loop.time()
            if left > 0:  # asyncio's timers never fire early (epoll rounds its timeout up)
                await asyncio.sleep(left)
            client.write(data)
            self.chunks += 1
            await client.drain()


class ProxyProcess:
    """A :class:`DelayProxy` in a process of its own (``python -m tests.slow_replica``).

    Not a thread of the process under test: a proxy thread would wake up (to deliver a delayed
    reply, often one a hedged read has already given up on) while the client's loop runs, and
    take the GIL from it for up to the 5 ms switch interval, adding latency that no real slow
    replica causes. The process is controlled through its stdin, one command a line (``delay
    <seconds>``, ``stats``), and answers each with one line on its stdout; it closes every
    connection and exits when its stdin closes, so it also ends when this process dies.

    ``with ProxyProcess(host, port, 0.02) as proxy: proxy.port``.
    """

    def __init__(self, target_host: str, target_port: int, delay: float) -> None:
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.target = (target_host, target_port)
        self._delay = delay
        self._process: subprocess.Popen[str] | None = None
        self._port = 0

    @property
    def port(self) -> int:
        if self._process is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        if value < 0:
            raise ValueError("delay must not be negative")
        self._ask(f"delay {value!r}")
        self._delay = value

    def stats(self) -> dict[str, int]:
        """Connections accepted so far and open now, and the chunks delivered (delayed)."""
        return dict(json.loads(self._ask("stats")))

    def start(self, timeout: float = 10.0) -> ProxyProcess:
        root = str(Path(__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
        host, port = self.target
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.slow_replica", host, str(port), repr(self._delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
            env=env,
        )
        try:
            word, _, port_text = self._line(timeout).partition(" ")
            if word != "port":
                raise RuntimeError(f"the proxy process said {word!r} instead of its port")
            self._port = int(port_text)
        except BaseException:
            self.close()
            raise
        return self

    def _line(self, timeout: float) -> str:
        process = self._process
        assert process is not None and process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(
                f"the proxy process gave no answer within {timeout:g}s (exit code {process.poll()})"
            )
        return line.strip()

    def _ask(self, request: str, timeout: float = 5.0) -> str:
        process = self._process
        if process is None or process.stdin is None:
            raise RuntimeError("the proxy is not started")
        process.stdin.write(request + "\n")
        process.stdin.flush()
        return self._line(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Close its stdin (it closes every connection and exits); kill it if it lingers."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.close()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _serve(target_host: str, target_port: int, delay: float) -> None:
    """The proxy process: serve until stdin closes, answering its commands on stdout."""
    loop = asyncio.get_running_loop()
    async with DelayProxy(target_host, target_port, delay) as proxy:
        print(f"port {proxy.port}", flush=True)
        commands = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(commands), sys.stdin.buffer
        )
        while line := await commands.readline():
            word, _, argument = line.decode().strip().partition(" ")
            if word == "delay":
                proxy.delay = float(argument)
                print("ok", flush=True)
            elif word == "stats":
                stats = {"accepted": proxy.accepted, "open": proxy.open, "chunks": proxy.chunks}
                print(json.dumps(stats), flush=True)
            else:
                print(f"error unknown command {word!r}", flush=True)


# --------------------------------------------------------------------------- the slow replica


@dataclasses.dataclass
class SlowReplica:
    """What :func:`slow_replica` set up."""

    replica: DevNode  #: the real replica (its real port is ``replica.port``)
    primary: DevNode  #: the primary it replicates
    proxy: ProxyProcess  #: the proxy; ``proxy.delay`` may be changed while it runs
    bus_port: int  #: the replica's real cluster bus port, announced unchanged

    @property
    def port(self) -> int:
        """The port the replica is announced at (the proxy's)."""
        return self.proxy.port

    @property
    def address(self) -> str:
        return f"{self.replica.host}:{self.port}"


def announced_replicas(cluster: DevCluster, observer: DevNode) -> dict[int, set[int]]:
    """``{primary port: {announced replica ports}}`` as ``observer``'s ``CLUSTER SLOTS`` shows."""
    seen: dict[int, set[int]] = {}
    # [[first, last, [ip, port, id, ...] of the primary, [ip, port, id, ...] per replica], ...]
    for entry in cluster.admin(observer).execute_command("CLUSTER", "SLOTS"):
        replicas = seen.setdefault(int(entry[2][1]), set())
        replicas.update(int(node[1]) for node in entry[3:])
    return seen


def _own_bus_port(cluster: DevCluster, node: DevNode) -> int:
    """The cluster bus port ``node`` gives for itself (``ip:port@cport`` on its ``myself`` line)."""
    text = str(cluster.admin(node).execute_command("CLUSTER", "NODES"))
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 2 and "myself" in parts[2].split(",") and "@" in parts[1]:
            return int(parts[1].split("@", 1)[1].split(",", 1)[0])
    return node.bus_port


def _key_of(cluster: DevCluster, primary: DevNode) -> str:
    for n in range(10_000):
        key = f"slow-replica:{{{n}}}"
        if cluster.primary_for_key(key).port == primary.port:
            return key
    raise AssertionError(f"no key found for {primary.address}")


def _announce_problems(
    cluster: DevCluster, primary: DevNode, expected: int, other: int
) -> list[str]:
    problems: list[str] = []
    for node in cluster.nodes:
        if node.process is not None and node.process.poll() is not None:
            continue  # a dead node has no view
        try:
            seen = announced_replicas(cluster, node).get(primary.port, set())
        except redis.RedisError as err:
            problems.append(f"{node.address}: {type(err).__name__}: {err}")
            continue
        if expected not in seen or other in seen:
            problems.append(f"{node.address} lists the replicas of {primary.port} as {seen}")
    return problems


def wait_announced(
    cluster: DevCluster, primary: DevNode, expected: int, other: int, timeout: float
) -> None:
    """Until every live node's ``CLUSTER SLOTS`` lists the replica of ``primary`` at port
    ``expected`` and no longer at ``other``."""
    deadline = time.monotonic() + timeout
    while problems := _announce_problems(cluster, primary, expected, other):
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"replica of {primary.address} not announced at port {expected} after "
                f"{timeout:g}s: " + "; ".join(problems)
            )
        time.sleep(0.05)


def _listing_problems(cluster: DevCluster) -> list[str]:
    expected: dict[int, set[int]] = {}
    for replica in cluster.replicas():
        expected.setdefault(int(cluster.admin(replica).role()[2]), set()).add(replica.port)
    problems = []
    for node in cluster.nodes:
        if node.process is not None and node.process.poll() is not None:
            continue
        seen = announced_replicas(cluster, node)
        for primary, replicas in expected.items():
            # A replica announced at a proxy's port is listed under another port: count them.
            if len(seen.get(primary, set())) < len(replicas):
                problems.append(f"{node.address} lists {seen.get(primary)} for {primary}")
    return problems


def wait_replicas_listed(cluster: DevCluster, timeout: float = 15.0) -> None:
    """Write a key on every primary, then wait until every live node's ``CLUSTER SLOTS`` lists
    every live replica.

    Redis 7 leaves a replica out of ``CLUSTER SLOTS`` while its replication offset is 0, so on a
    fresh cluster (nothing written yet) a client sees no replica at all and every "replica" read
    goes to a primary.
    """
    for primary in cluster.primaries():
        cluster.admin(primary).set(_key_of(cluster, primary), "1")
    deadline = time.monotonic() + timeout
    while problems := _listing_problems(cluster):
        if time.monotonic() >= deadline:
            raise AssertionError("replicas not listed in CLUSTER SLOTS: " + "; ".join(problems))
        time.sleep(0.05)


@contextlib.contextmanager
def slow_replica(
    cluster: DevCluster,
    replica: DevNode | None = None,
    delay: float = 0.02,
    timeout: float = 15.0,
) -> Iterator[SlowReplica]:
    """Put a :class:`DelayProxy` of ``delay`` seconds in front of ``replica`` (default: the
    replica of the first live primary) and have the cluster announce it at the proxy's port.

    Use it on a DevCluster of your own (a chaos module's), never on a shared one: every client
    created afterwards reaches this replica only through the delay. Clients created before keep
    the old address until they re-read the slot map. On exit the replica announces its real
    port again (every node's ``CLUSTER SLOTS`` is waited on) and the proxy is closed.
    """
    if replica is None:
        primary = next(p for p in cluster.primaries() if cluster.replica_of(p) is not None)
        found = cluster.replica_of(primary)
        assert found is not None
        replica = found
    role = cluster.admin(replica).role()
    if str(role[0]) != "slave":
        raise ValueError(f"{replica.address} is not a replica (ROLE {role[0]})")
    primary = cluster.node_by_port(int(role[2]))
    bus_port = _own_bus_port(cluster, replica)
    # A write to the shard first, so the replica's replication offset is not 0 (Redis 7 leaves
    # such a replica out of CLUSTER SLOTS), and a wait until every node lists it.
    cluster.admin(primary).set(_key_of(cluster, primary), "1")
    wait_announced(cluster, primary, replica.port, -1, timeout)
    proxy = ProxyProcess(replica.host, replica.port, delay).start()
    admin = cluster.admin(replica)
    try:
        admin.config_set("cluster-announce-bus-port", bus_port)  # first: the bus stays put
        admin.config_set("cluster-announce-port", proxy.port)
        wait_announced(cluster, primary, proxy.port, replica.port, timeout)
        yield SlowReplica(replica=replica, primary=primary, proxy=proxy, bus_port=bus_port)
    finally:
        try:
            if replica.process is None or replica.process.poll() is None:
                admin.config_set("cluster-announce-port", 0)
                admin.config_set("cluster-announce-bus-port", 0)
                wait_announced(cluster, primary, replica.port, proxy.port, timeout)
        finally:
            proxy.close()


if __name__ == "__main__":
    # python -m tests.slow_replica <target host> <target port> <delay seconds> (ProxyProcess)
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
