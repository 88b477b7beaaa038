"""Keeping the memory tier coherent across processes: RESP3 client tracking in BCAST mode.

One dedicated RESP3 connection per primary runs ``CLIENT TRACKING ON BCAST [PREFIX p ...]``.
From then on that primary pushes an ``invalidate`` message naming every key under the prefixes
that is modified, by *any* client (this library or not), expires or is evicted, and
``invalidate`` with no keys on ``FLUSHALL`` / ``FLUSHDB``. Why tracking and not a pub/sub
channel, and the guarantees, are in docs/coherence.md.

:class:`TrackingCoherence` is the component; it knows nothing of the memory stage beyond two
callbacks:

- ``on_invalidate(keys, node)``: ``keys`` is a list of ``bytes``, or ``None`` for "everything";
  ``node`` is the ``host:port`` of the primary whose link brought it. Pushes of one link arrive
  in the order that primary made the changes (what the memory stage relies on to recognise the
  report of its own write).
- ``on_ready(ready)``: ``True`` once every primary's link is up (tracking acknowledged),
  ``False`` as soon as one is not (connection lost, no reply to ``PING`` within ``timeout``,
  a new primary without a link yet, stopped). The stage flushes on every change and serves
  only while ready.

It needs a running event loop: :meth:`start` is called from inside one (the memory stage does
it on its first command). A supervisor task re-reads the backend's primaries every
``check_interval`` seconds (and at once when a link fails, after asking the backend for a slot
map refresh), opens a link to each new primary and closes the links of nodes that are no longer
primaries. Each link pings every ``check_interval`` seconds and is declared down when no reply
(or push) arrives within ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from resilient_cache._tasks import cancel_and_wait
from resilient_cache.backends._redis_py_compat import RESP3_PUSH_PARSER, connection_parser
from resilient_cache.errors import describe_error, failure_summary, redact

if TYPE_CHECKING:
    from resilient_cache.backends import Backend

logger = logging.getLogger("resilient_cache.coherence")

InvalidateCallback = Callable[[list[bytes] | None, str], None]
ReadyCallback = Callable[[bool], None]

#: Push message types that mean the invalidation stream can no longer be trusted.
_BROKEN_PUSHES = frozenset({b"tracking-redir-broken", "tracking-redir-broken"})


def bcast_prefixes(prefixes: Iterable[str | bytes]) -> list[bytes]:
    """The prefixes to register, without overlaps (Redis refuses ``a`` together with ``ab``;
    ``a`` already covers ``ab``). Empty means every key."""
    encoded = sorted({p.encode() if isinstance(p, str) else bytes(p) for p in prefixes})
    if b"" in encoded:
        return []
    kept: list[bytes] = []
    for prefix in encoded:  # sorted: a prefix comes before every string it is a prefix of
        if not any(prefix.startswith(k) for k in kept):
            kept.append(prefix)
    return kept


class _Link:
    __slots__ = ("name", "reported", "seen", "task", "up")

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = False
        self.seen = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        #: The last failure logged at WARNING (a refusal is logged once, not at every retry).
        self.reported: str | None = None


class TrackingCoherence:
    """Invalidation pushes from every primary of the backend, with link supervision."""

    def __init__(
        self,
        backend: Backend,
        prefixes: Iterable[str | bytes],
        *,
        on_invalidate: InvalidateCallback,
        on_ready: ReadyCallback,
        check_interval: float = 1.0,
        timeout: float = 1.0,
    ) -> None:
        self._backend = backend
        self.prefixes = bcast_prefixes(prefixes)
        self._on_invalidate = on_invalidate
        self._on_ready = on_ready
        self.check_interval = check_interval
        self.timeout = timeout
        self._links: dict[str, _Link] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._ready_event: asyncio.Event | None = None
        self.ready = False
        #: Times the links went down (or were found missing) after having been ready.
        self.losses = 0
        self._tracking_args: tuple[Any, ...] = ("CLIENT", "TRACKING", "ON", "BCAST")
        for prefix in self.prefixes:
            self._tracking_args += ("PREFIX", prefix)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the supervisor (idempotent). Must be called with a running loop."""
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._ready_event = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(), name="resilient_cache.coherence"
        )

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every link to be up; return whether they are."""
        if self.ready or self._ready_event is None:
            return self.ready
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready_event.wait(), timeout)
        return self.ready

    async def stop(self) -> None:
        """Close every link and stop; the tier is told it is no longer coherent."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        links, self._links = self._links, {}
        for link in links.values():
            await cancel_and_wait(link.task)
        if self.ready:
            self.ready = False
            self._on_ready(False)

    def link_states(self) -> dict[str, bool]:
        """``{"host:port": up}`` for every primary currently followed."""
        return {name: link.up for name, link in self._links.items()}

    # -- supervision ------------------------------------------------------------------------

    def _wanted(self) -> dict[str, tuple[type[Any], dict[str, Any]]]:
        raw: Any = self._backend.raw
        get_primaries = getattr(raw, "get_primaries", None)
        if get_primaries is not None:
            return {
                node.name: (node.connection_class, node.connection_kwargs)
                for node in get_primaries()
            }
        pool = raw.connection_pool  # a standalone redis.asyncio.Redis
        kwargs = pool.connection_kwargs
        name = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        return {name: (pool.connection_class, kwargs)}

    async def _supervise(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                wanted = self._wanted()
            except Exception as err:  # never let the supervisor die; retry next round
                logger.debug("coherence: cannot read the primaries: %s", err)
                wanted = {}
            for name in [n for n in self._links if n not in wanted]:
                link = self._links.pop(name)
                logger.info("coherence: %s is no longer a primary; closing its link", name)
                await cancel_and_wait(link.task)
            for name, (connection_class, kwargs) in wanted.items():
                if name not in self._links:
                    link = self._links[name] = _Link(name)
                    link.task = asyncio.get_running_loop().create_task(
                        self._run_link(link, connection_class, kwargs),
                        name=f"resilient_cache.coherence.{name}",
                    )
            self._update()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.check_interval)

    def _update(self) -> None:
        if self._task is None:
            return  # stopping: stop() reports the end itself
        links = self._links.values()
        self._set_ready(bool(self._links) and all(link.up for link in links))

    def _set_ready(self, ready: bool) -> None:
        if ready == self.ready:
            return
        self.ready = ready
        if ready:
            logger.info(
                "coherence: tracking on %d primaries; memory tier serving", len(self._links)
            )
            if self._ready_event is not None:
                self._ready_event.set()
        else:
            self.losses += 1
            logger.warning("coherence: invalidation link lost; memory tier flushed and bypassed")
            if self._ready_event is not None:
                self._ready_event.clear()
        self._on_ready(ready)

    # -- one link ---------------------------------------------------------------------------

    def _connection(self, connection_class: type[Any], kwargs: dict[str, Any]) -> Any:
        options = dict(kwargs)
        for name in ("oss_cluster_maint_notifications_handler", "maint_notifications_pool_handler"):
            options.pop(name, None)
        options.update(
            protocol=3,
            parser_class=RESP3_PUSH_PARSER,  # the pure-Python parser hands us push messages
            decode_responses=False,  # keys arrive as bytes, as the stage keeps them
            retry=Retry(NoBackoff(), 0),
            maint_notifications_config=None,
            health_check_interval=0,
            socket_timeout=None,
        )
        if options.get("socket_connect_timeout") is None:
            options["socket_connect_timeout"] = self.timeout
        return connection_class(**options)

    async def _run_link(
        self, link: _Link, connection_class: type[Any], kwargs: dict[str, Any]
    ) -> None:
        delay = 0.05
        while True:
            connection = self._connection(connection_class, kwargs)
            try:
                await asyncio.wait_for(connection.connect(), self.timeout)
                parser = connection_parser(connection)
                parser.set_invalidation_push_handler(functools.partial(self._push, link.name))
                parser.set_pubsub_push_handler(self._other_push)
                await connection.send_command(*self._tracking_args, check_health=False)
                reply = await connection.read_response(timeout=self.timeout, push_request=True)
                if reply not in (b"OK", "OK"):
                    raise RedisConnectionError(f"CLIENT TRACKING answered {reply!r}")
                link.up = True
                link.reported = None
                delay = 0.05
                self._update()
                await self._pump(connection, link)
            except asyncio.CancelledError:
                raise
            except (ResponseError, AuthenticationError) as err:
                # Refused: credentials (WRONGPASS, a node with another password), a command
                # (NOPERM, an ACL without CLIENT TRACKING) or Redis < 6. Retrying will not fix
                # it by itself: WARNING, once per change. Never the reply as it is: a server
                # without HELLO quotes "HELLO 3 AUTH user <password>" back, and the prefixes
                # are (parts of) keys.
                reason = f"{failure_summary(err)}: {redact(str(err), self._secrets(kwargs))}"
                log = logger.warning if reason != link.reported else logger.debug
                link.reported = reason
                log("coherence: %s refused the tracking link: %s", link.name, reason)
            except Exception as err:
                logger.info(
                    "coherence: link to %s: %s",
                    link.name,
                    describe_error(err, self._secrets(kwargs)),
                )
            finally:
                link.up = False
                self._update()
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)
            # Maybe a failover: let the backend re-read the slot map, and re-read the primaries.
            with contextlib.suppress(Exception):
                self._backend.request_refresh()
            if self._wake is not None:
                self._wake.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.check_interval)

    def _secrets(self, kwargs: dict[str, Any]) -> list[Any]:
        """What an error of a link must not show: its credentials and the tracked prefixes."""
        credentials = [kwargs.get("username"), kwargs.get("password")]
        return [value for value in (*credentials, *self.prefixes) if value]

    async def _pump(self, connection: Any, link: _Link) -> None:
        """Read pushes until the link fails; ping every ``check_interval``. Only returns by
        raising."""
        reader = asyncio.get_running_loop().create_task(self._read(connection, link))
        try:
            while True:
                link.seen.clear()
                if reader.done() or not connection.is_connected:
                    break
                await connection.send_command("PING", check_health=False)
                seen = asyncio.ensure_future(link.seen.wait())
                done, _ = await asyncio.wait(
                    {reader, seen}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
                )
                seen.cancel()
                if reader in done:
                    break
                if seen not in done:
                    raise TimeoutError(f"no reply to PING within {self.timeout}s")
                done, _ = await asyncio.wait({reader}, timeout=self.check_interval)
                if done:
                    break
            reader.result()  # raises what ended it
            raise RedisConnectionError("tracking connection closed")
        finally:
            await cancel_and_wait(reader)

    async def _read(self, connection: Any, link: _Link) -> None:
        while True:
            await connection.read_response(timeout=math.inf, push_request=True)
            link.seen.set()

    async def _push(self, node: str, message: list[Any]) -> None:
        keys = message[1] if len(message) > 1 else None
        self._on_invalidate(keys if isinstance(keys, list) else None, node)

    async def _other_push(self, message: list[Any]) -> None:
        if message and message[0] in _BROKEN_PUSHES:
            raise RedisConnectionError("the server reports the tracking connection lost")
