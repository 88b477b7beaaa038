"""Watches: how a write of a key stops the reads and loads of it already running from storing.

A read or load takes a :class:`Watch` on its key before it asks Redis or the loader; a ``set``,
``delete`` or ``invalidate_prefix`` of the key meanwhile marks every watch on it stale. The
read or load still returns its value to its own caller, but does not store it: a value read
or loaded before a write must never overwrite (or resurrect) what that write left.
"""

from __future__ import annotations


class Watch:
    """One read or load of a key in flight; ``stale`` once the key was written meanwhile."""

    __slots__ = ("stale",)

    def __init__(self) -> None:
        self.stale = False


class Watches:
    """The watches of one cache, by key."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[Watch]] = {}

    def watch(self, key: str) -> Watch:
        """A new watch on ``key``; give it back with :meth:`unwatch` (in a ``finally``)."""
        watch = Watch()
        self._by_key.setdefault(key, set()).add(watch)
        return watch

    def unwatch(self, key: str, watch: Watch) -> None:
        watches = self._by_key.get(key)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._by_key[key]

    def touch(self, key: str) -> None:
        """``key`` is being written or deleted: reads and loads in flight must not store."""
        for watch in self._by_key.get(key, ()):
            watch.stale = True

    def touch_prefix(self, prefix: str) -> None:
        """:meth:`touch` of every watched key starting with ``prefix``."""
        for key in [k for k in self._by_key if k.startswith(prefix)]:
            self.touch(key)
