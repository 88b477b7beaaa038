"""The Command, the stage protocol and ``compose()``.

A *stage* is any object with ``async def __call__(command, call_next)``: it may look at the
command, call ``call_next(command)`` zero or more times, and return the reply or raise. The
pipeline is composed once, at build time, into a single ``handler(command)`` callable: per call
there is no plugin dispatch, no settings lookup and no list walk, only the chain of stages.

A stage may also offer a :class:`FastPath`: the same work as its ``__call__``, split into
synchronous ``before``/``after`` hooks and an ``on_error`` hook that runs only on failure.
``compose()`` fuses consecutive stages that offer one into a single coroutine, so on the
success path the default pipeline costs one coroutine frame, not one per stage.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from types import CodeType
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

from resilient_cache.commands import (
    ARGUMENT_DEPENDENT,
    IDEMPOTENT_COMMANDS,
    READ_ONLY_COMMANDS,
    is_idempotent,
)
from resilient_cache.key_specs import keys_of

Handler = Callable[["Command"], Awaitable[Any]]
"""The next step of the pipeline: takes a Command, returns the reply."""


@runtime_checkable
class NodeRef(Protocol):
    """What a stage may rely on about the node a command goes to (a redis-py ClusterNode fits)."""

    host: str
    port: int
    name: str


@runtime_checkable
class Stage(Protocol):
    """One step of the pipeline.

    ``call_next`` runs the rest of the pipeline (the inner stages and the backend). A stage must
    keep no per-call state on itself: everything about one call lives on the Command.
    """

    async def __call__(self, command: Command, call_next: Handler) -> Any: ...


class Redirect(NamedTuple):
    """A MOVED or ASK redirect followed inside one attempt (see ``Command.redirects``)."""

    kind: str  # "MOVED" or "ASK"
    source: NodeRef  # the node that answered with the redirect
    host: str  # where it sent the command
    port: int
    time_ns: int  # when (time.time_ns())


#: ``Command(keys=...)`` not given: the keys are read from the arguments.
_FROM_ARGUMENTS: Any = object()

#: ``(read_only, idempotent)`` per command name, from the tables of
#: :mod:`resilient_cache.commands`: one lookup per command instead of three. ``idempotent`` is
#: ``None`` for the names whose arguments decide it (``SET ... NX``).
_FLAGS: dict[str, tuple[bool, bool | None]] = {
    name: (
        name in READ_ONLY_COMMANDS,
        None if name in ARGUMENT_DEPENDENT else name in IDEMPOTENT_COMMANDS,
    )
    for name in READ_ONLY_COMMANDS | IDEMPOTENT_COMMANDS | ARGUMENT_DEPENDENT
}
#: A name in none of the tables: neither read-only nor idempotent.
_UNKNOWN_COMMAND: tuple[bool, bool | None] = (False, False)
_new = object.__new__


class Command:
    """One logical Redis command on its way through the pipeline.

    Made once per call by the client. Fields:

    - ``name``: the command name, upper case (``"GET"``, ``"CLUSTER INFO"``).
    - ``args``: the arguments after the name, as given.
    - ``options``: keyword options for redis-py (``keys=``, ``target_nodes=``, ...).
    - ``keys``: the keys the command touches, from redis-py's ``keys=`` option or Redis's key
      specifications (:mod:`resilient_cache.key_specs`): ``()`` when it has none, ``None`` when
      they cannot be known (a module's command, ``SORT ... STORE``, bad arguments). A stage
      must then assume any key: the memory tier drops everything on such a write, routing
      lets redis-py choose the node.
    - ``read_only`` / ``idempotent``: from the command table (:mod:`resilient_cache.commands`).
    - ``deadline``: absolute time (on the pipeline clock) by which the command must finish, set by
      the timeout stage; ``None`` when unbounded.
    - ``attempt``: 1 for the first try, incremented by the retry stage.
    - ``node``: the node chosen for this attempt, set by the routing stage (``None`` lets the
      backend decide). After the attempt the backend puts there the node that answered when
      that is another one (Redis redirected the command, or the backend chose the node).
    - ``redirects``: the MOVED/ASK redirects the backend followed, oldest first, as
      :class:`Redirect` records; ``None`` when there were none.
    - ``served_from_memory``: set by the memory stage when it answered without Redis.
    - ``batch_size``: set by the backend when auto-pipelining wrote this command together with
      others on one connection: how many commands that write held (this one included);
      ``None`` when it was sent alone.
    - ``context``: a dict for plugins, created on first use. Use your stage name as key prefix.

    A stage sets only its own fields; it never rewrites another stage's.
    """

    __slots__ = (
        "_context",
        "args",
        "attempt",
        "batch_size",
        "deadline",
        "idempotent",
        "keys",
        "name",
        "node",
        "options",
        "read_only",
        "redirects",
        "served_from_memory",
    )

    def __init__(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        options: dict[str, Any] | None = None,
        *,
        keys: Sequence[Any] | None = _FROM_ARGUMENTS,
    ) -> None:
        self.name = name
        self.args = args
        if options is None:
            options = {}
        self.options: dict[str, Any] = options
        if keys is _FROM_ARGUMENTS:
            keys = options.get("keys") or keys_of(name, args)
        self.keys: Sequence[Any] | None = keys
        read_only, idempotent = _FLAGS.get(name, _UNKNOWN_COMMAND)
        self.read_only = read_only
        # The table decides, except for the few names whose arguments matter (SET NX).
        self.idempotent = idempotent if idempotent is not None else is_idempotent(name, args)
        self.deadline: float | None = None
        self.attempt = 1
        self.node: NodeRef | None = None
        self.redirects: list[Redirect] | None = None
        self.served_from_memory = False
        self.batch_size: int | None = None
        self._context: dict[str, Any] | None = None

    @classmethod
    def from_call(cls, args: tuple[Any, ...], options: dict[str, Any]) -> Command:
        """Build a Command from redis-py's ``execute_command(*args, **options)`` calling form.

        The same Command as ``Command(name.upper(), args[1:], options)``, made without
        ``__init__``'s call: this runs before every command the client sends (the fields are
        kept in step by ``tests/unit/test_fast_path.py``)."""
        try:
            name = args[0]
        except IndexError:
            raise TypeError("execute_command() needs at least the command name") from None
        if type(name) is not str:
            name = name.decode() if isinstance(name, bytes) else str(name)
        flags = _FLAGS.get(name)  # redis-py's mixins spell names in upper case already
        if flags is None:
            name = name.upper()
            flags = _FLAGS.get(name, _UNKNOWN_COMMAND)
        rest = args[1:]
        command = _new(cls)
        command.name = name
        command.args = rest
        command.options = options
        command.keys = options.get("keys") or keys_of(name, rest)
        command.read_only = flags[0]
        idempotent = flags[1]
        command.idempotent = idempotent if idempotent is not None else is_idempotent(name, rest)
        command.deadline = None
        command.attempt = 1
        command.node = None
        command.redirects = None
        command.served_from_memory = False
        command.batch_size = None
        command._context = None
        return command

    @property
    def context(self) -> dict[str, Any]:
        if self._context is None:
            self._context = {}
        return self._context

    def __repr__(self) -> str:
        # Never show arguments: they hold keys and values.
        node = self.node.name if self.node is not None else None
        return f"<Command {self.name} nargs={len(self.args)} attempt={self.attempt} node={node}>"


# -- batches ---------------------------------------------------------------------------------
#
# ``client.pipeline()`` sends many commands as one logical Command named ``PIPELINE`` (or
# ``MULTI`` for a transaction) whose ``args`` are the ``(args, options)`` of each command. Stages
# that look inside a batch (the memory tier, tracing) recognise it by these names.

PIPELINE = "PIPELINE"
TRANSACTION = "MULTI"
BATCH_NAMES = frozenset({PIPELINE, TRANSACTION})


def batch_command(
    commands: list[tuple[tuple[Any, ...], dict[str, Any]]],
    transaction: bool,
    raise_on_error: bool,
    *,
    slots: frozenset[int] | None = None,
    parts: Sequence[Command] | None = None,
) -> Command:
    """One Command standing for a whole batch: its keys are every command's keys; it is
    read-only or idempotent only if every command in it is. ``slots``, when the caller knows
    them, are the hash slots of those keys (``options["slots"]``: routing then need not hash
    every key again); ``parts``, the commands already made into Commands (else made here)."""
    if parts is None:
        parts = [Command.from_call(args, options) for args, options in commands]
    options: dict[str, Any] = {"raise_on_error": raise_on_error}
    if slots is not None:
        options["slots"] = slots
    known: list[Any] | None = []
    for part in parts:
        if part.keys is None:
            known = None  # one command's keys unknown: the batch's are too
            break
        known.extend(part.keys)  # type: ignore[union-attr]
    keys = tuple(known) if known is not None else None
    command = Command(TRANSACTION if transaction else PIPELINE, tuple(commands), options, keys=keys)
    command.read_only = all(part.read_only for part in parts)
    command.idempotent = all(part.idempotent for part in parts)
    return command


# -- composing ---------------------------------------------------------------------------------


class FastPath(NamedTuple):
    """A stage's work as hooks ``compose()`` can fuse with its neighbours' (all optional).

    - ``before(command) -> token``: synchronous, runs where ``__call__`` would run before
      ``await call_next(command)``. It may raise (the breaker refusing): the stages outside see
      that error, this stage's ``after``/``on_error`` do not run. What it returns (a start
      time, a breaker) is handed to the two others; ``None`` when there is no ``before``.
    - ``after(command, token)``: synchronous, runs once the rest of the pipeline returned. It
      cannot change the reply. If it raises, the stages outside see that error.
    - ``on_error(command, token, error, call_next) -> reply``: ``async``, runs when the rest of
      the pipeline (or a ``before``/``after`` inside it) raised ``error``, any
      ``BaseException`` (a cancellation too). It raises (``error`` or another), or returns a
      reply, as the retry stage does after calling ``call_next`` again; ``after`` does not run
      then. ``call_next`` is the rest of the pipeline, as for ``__call__``. Without it, errors
      pass through this stage untouched.
    - ``start() -> token``: a ``before`` that needs nothing of the command, called without
      arguments, so it can be a C function such as the clock (the metrics stage's). Give
      ``before`` or ``start``, not both.
    - ``end(token)``: an ``after`` that needs nothing of the command, called with the token
      alone, so it can be a method of the token's class, unbound (the breaker's is
      ``CircuitBreaker.on_success``: no frame of the stage's own around it). Give ``after``
      or ``end``, not both.

    The stage keeps its ``async __call__(command, call_next)``, which must do the same as the
    hooks (the built-in stages write it with them), for callers that do not fuse.
    """

    before: Callable[[Command], Any] | None = None
    after: Callable[[Command, Any], None] | None = None
    on_error: Callable[[Command, Any, BaseException, Handler], Awaitable[Any]] | None = None
    start: Callable[[], Any] | None = None
    end: Callable[[Any], None] | None = None


def fast_path(stage: Any) -> FastPath | None:
    """The :class:`FastPath` a stage offers through its ``fast_path()`` method, if any (the
    stage may return ``None``: no fast path in this configuration)."""
    offer = getattr(stage, "fast_path", None)
    if not callable(offer) or inspect.isfunction(stage):
        return None
    path = offer()
    if path is not None and not isinstance(path, FastPath):
        raise TypeError(f"{type(stage).__qualname__}.fast_path() must return a FastPath or None")
    if path is not None and path.before is not None and path.start is not None:
        raise TypeError(f"{type(stage).__qualname__}.fast_path(): give before or start, not both")
    if path is not None and path.after is not None and path.end is not None:
        raise TypeError(f"{type(stage).__qualname__}.fast_path(): give after or end, not both")
    return path


def compose(stages: Sequence[Stage], terminal: Handler) -> Handler:
    """Compose ``stages`` (outermost first) around ``terminal`` into one handler.

    Called once per client build. Consecutive stages that offer a :class:`FastPath` are fused
    into one coroutine function (see :func:`fuse`). Any other stage is bound to the handler
    after it with ``functools.partial``, so it costs one call of its ``__call__``.
    """
    handler: Handler = terminal
    run: list[FastPath] = []  # fast paths waiting to be fused, outermost first
    for stage in reversed(stages):
        path = fast_path(stage)
        if path is not None:
            if any(path):  # a stage with nothing to do costs nothing
                run.insert(0, path)
            continue
        if run:
            handler, run = fuse(run, handler), []
        # A plain ``async def`` stage is called directly; an object through its bound
        # ``__call__``, which skips one type-slot lookup per call.
        call = stage if inspect.isfunction(stage) else stage.__call__
        handler = functools.partial(call, call_next=handler)
    if run:
        handler = fuse(run, handler)
    return handler


def fuse(paths: Sequence[FastPath], terminal: Handler) -> Handler:
    """One ``async def fused(command)`` running ``paths`` (outermost first) around ``terminal``.

    The function is written out as source and compiled once per build, with every hook a name
    of its own, so a call costs one coroutine frame plus the hooks themselves. For two stages,
    ``a`` with all three hooks and ``b`` with ``before`` only, it reads::

        async def fused(command):
            token0 = before0(command)
            try:
                before1(command)
                result = await terminal(command)
            except BaseException as error:
                result = await on_error0(command, token0, error, next0)
            else:
                after0(command, token0)
            return result

    which is what ``a.__call__`` around ``b.__call__`` does. ``next{i}``, the ``call_next`` an
    ``on_error`` gets, is the fusion of the stages inside stage ``i`` around ``terminal``
    (each such rest is compiled once).
    """
    rests: dict[int, Handler] = {len(paths): terminal}

    def rest(first: int) -> Handler:  # paths[first:] fused
        if first not in rests:
            rests[first] = _compile(paths, first, terminal, rest)
        return rests[first]

    return rest(0)


def _compile(
    paths: Sequence[FastPath], first: int, terminal: Handler, rest: Callable[[int], Handler]
) -> Handler:
    namespace: dict[str, Any] = {"terminal": terminal}
    lines = ["async def fused(command):"]
    closing: list[list[str]] = []
    depth = 1
    for i in range(first, len(paths)):
        path = paths[i]
        pad = "    " * depth
        leave = path.after if path.after is not None else path.end
        kept = leave is not None or path.on_error is not None
        entry = path.before or path.start
        token = f"token{i}" if entry is not None and kept else "None"
        if entry is not None:
            namespace[f"before{i}"] = entry
            argument = "command" if path.before is not None else ""
            lines.append(f"{pad}{token + ' = ' if kept else ''}before{i}({argument})")
        leave_call = ""
        if leave is not None:
            namespace[f"after{i}"] = leave
            leave_call = f"after{i}({'command, ' if path.after is not None else ''}{token})"
        tail: list[str] = []
        if path.on_error is not None:
            namespace[f"on_error{i}"] = path.on_error
            namespace[f"next{i}"] = rest(i + 1)
            lines.append(f"{pad}try:")
            tail += [
                f"{pad}except BaseException as error:",
                f"{pad}    result = await on_error{i}(command, {token}, error, next{i})",
            ]
            if leave_call:
                tail += [f"{pad}else:", f"{pad}    {leave_call}"]
            depth += 1
        elif leave_call:
            tail.append(f"{pad}{leave_call}")
        closing.append(tail)
    lines.append(f"{'    ' * depth}result = await terminal(command)")
    for tail in reversed(closing):
        lines += tail
    lines.append("    return result")
    source = "\n".join(lines) + "\n"
    exec(_code(source), namespace)  # our own source; the hooks are its globals
    fused = namespace["fused"]
    fused.source = source  # what it runs, for a reader (and the tests)
    return cast(Handler, fused)


@functools.lru_cache(maxsize=256)
def _code(source: str) -> CodeType:
    # The source depends only on which hooks the stages have, so clients built alike (tests
    # build thousands) compile it once.
    return compile(source, "<resilient_cache.pipeline.fuse>", "exec")
