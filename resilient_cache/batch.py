"""``client.pipeline()``: many commands sent together, as one logical command of the pipeline.

The buffered commands travel as one :class:`~resilient_cache.pipeline.Command` named ``PIPELINE``
(or ``MULTI`` for a transaction) whose ``args`` are the ``(args, options)`` of each command. So a
batch is traced as one span with its length, counted once, bounded by one deadline, and retried
only if every command in it is safe to repeat. The backend sends it with redis-py's own pipeline.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal

from redis.commands.cluster import AsyncRedisClusterCommands

from resilient_cache.pipeline import (
    BATCH_NAMES,
    PIPELINE,
    TRANSACTION,
    Handler,
    batch_command,
)

__all__ = ["BATCH_NAMES", "PIPELINE", "TRANSACTION", "ClientPipeline", "batch_command"]


class ClientPipeline(AsyncRedisClusterCommands):
    """Buffers commands (the whole redis-py command API) until :meth:`execute`.

    ``async with client.pipeline() as pipe: pipe.set("a", 1).incr("b"); await pipe.execute()``.
    A transaction (``transaction=True``) needs all its keys in one slot on a cluster.
    """

    _is_async_client: Literal[True] = True

    def __init__(
        self, submit: Handler, transaction: bool, *, encoder: Any, event_dispatcher: Any
    ) -> None:
        """``submit`` runs the batch's Command through the client's pipeline; ``encoder`` and
        ``event_dispatcher`` are what redis-py's command mixins read."""
        self._submit = submit
        self.transaction = transaction
        self._commands: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.encoder = encoder
        self._event_dispatcher = event_dispatcher

    def execute_command(self, *args: Any, **options: Any) -> ClientPipeline:
        self._commands.append((args, options))
        return self

    # redis-py's cluster mixins split these across slots with awaits of their own; in a batch
    # they are buffered as the plain command (redis-py's pipeline splits per node).
    def delete(self, *names: Any) -> ClientPipeline:  # type: ignore[override]
        return self.execute_command("DEL", *names)

    def unlink(self, *names: Any) -> ClientPipeline:  # type: ignore[override]
        return self.execute_command("UNLINK", *names)

    def exists(self, *names: Any) -> ClientPipeline:  # type: ignore[override]
        return self.execute_command("EXISTS", *names)

    def touch(self, *names: Any) -> ClientPipeline:  # type: ignore[override]
        return self.execute_command("TOUCH", *names)

    def __len__(self) -> int:
        return len(self._commands)

    def clear(self) -> None:
        """Drop the buffered commands. (Not ``reset()``: that is the RESET command here.)"""
        self._commands = []

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send every buffered command; the replies, in order. Empties the buffer."""
        commands, self._commands = self._commands, []
        if not commands:
            return []
        result: list[Any] = await self._submit(
            batch_command(commands, self.transaction, raise_on_error)
        )
        return result

    async def __aenter__(self) -> ClientPipeline:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.clear()
