"""The Command, the stage protocol and ``compose()``.

A *stage* is any object with ``async def __call__(command, call_next)``: it may look at the
command, call ``call_next(command)`` zero or more times, and return the reply or raise. The
pipeline is composed once, at build time, into a single ``handler(command)`` callable: per call
there is no plugin dispatch, no settings lookup and no list walk, only the chain of stages.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

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
        self.read_only = name in READ_ONLY_COMMANDS
        # The set lookup decides, except for the few names whose arguments matter (SET NX).
        self.idempotent = name in IDEMPOTENT_COMMANDS and (
            name not in ARGUMENT_DEPENDENT or is_idempotent(name, args)
        )
        self.deadline: float | None = None
        self.attempt = 1
        self.node: NodeRef | None = None
        self.redirects: list[Redirect] | None = None
        self.served_from_memory = False
        self.batch_size: int | None = None
        self._context: dict[str, Any] | None = None

    @classmethod
    def from_call(cls, args: tuple[Any, ...], options: dict[str, Any]) -> Command:
        """Build a Command from redis-py's ``execute_command(*args, **options)`` calling form."""
        try:
            name = args[0]
        except IndexError:
            raise TypeError("execute_command() needs at least the command name") from None
        if type(name) is not str:
            name = name.decode() if isinstance(name, bytes) else str(name)
        return cls(name.upper(), args[1:], options)

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
) -> Command:
    """One Command standing for a whole batch: its keys are every command's keys; it is
    read-only or idempotent only if every command in it is. ``slots``, when the caller knows
    them, are the hash slots of those keys (``options["slots"]``: routing then need not hash
    every key again)."""
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


def compose(stages: Sequence[Stage], terminal: Handler) -> Handler:
    """Compose ``stages`` (outermost first) around ``terminal`` into one handler.

    Called once per client build. Each stage is bound to the handler that follows it with
    ``functools.partial``, so a call through N stages costs N stage calls and nothing else.
    """
    handler: Handler = terminal
    for stage in reversed(stages):
        # A plain ``async def`` stage is called directly; an object through its bound
        # ``__call__``, which skips one type-slot lookup per call.
        call = stage if inspect.isfunction(stage) else stage.__call__
        handler = functools.partial(call, call_next=handler)
    return handler
