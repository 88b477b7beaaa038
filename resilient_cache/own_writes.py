"""Recognising the tracking link's report of this client's own writes (the memory tier's).

The tracking link reports this client's writes too, and on a busy machine that report can be
read after the next GET already stored the new value: evicting it then would cost every
write-then-read one more round trip. A report carries no writer; it is recognised by its place
in the stream:

- A write W of key k is noted before it is sent. The first push of k that arrives after that,
  on the link of the primary W ran on, reports a change Redis made no later than W (W's own
  report comes on that link, in order, and cannot come before W was sent).
- Every entry and every read of k in flight once W returned started after W returned (W's
  return drops them), so it already reflects W and every change before it: that first push is
  harmless to it and evicts nothing.
- Only writes whose reply proves they changed k count (``commands.changed_keys``), so W's report
  is sure to come; a push of k that arrives before W returned just ends W's note.
- Everything is forgotten when a link drops or the tier is flushed (:meth:`OwnWrites.clear`).

A later push of k, from anyone, evicts as usual. docs/coherence.md has the same argument.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Note", "OwnWrites"]


class Note:
    """A write of one key by this client, awaiting the push that reports it. ``node`` is set
    once the write returned and its reply proves it changed the key; ``seen`` once any push of
    the key arrived before that."""

    __slots__ = ("node", "seen")

    def __init__(self) -> None:
        self.node: str | None = None
        self.seen = False


class OwnWrites(dict[bytes, list[Note]]):
    """The writes whose report is still to come, by key (a dict, so ``key in own_writes`` is
    the cheap test a push makes first)."""

    def __init__(self, max_keys: int) -> None:
        super().__init__()
        self.max_keys = max_keys

    def note(self, keys: Iterable[bytes]) -> list[tuple[bytes, Note]]:
        """Before a write is sent: one note per key."""
        if len(self) > self.max_keys:
            self.clear()  # a bound, should reports go missing: fewer shortcuts, no harm
        noted = []
        for key in keys:
            note = Note()
            self.setdefault(key, []).append(note)
            noted.append((key, note))
        return noted

    def settle(
        self, noted: list[tuple[bytes, Note]], node: str | None, changed: set[bytes]
    ) -> None:
        """After the write returned: keep the notes of the keys it is known to have changed on
        ``node`` (their report is certain, and still to come); drop the others."""
        for key, note in noted:
            if node is not None and not note.seen and key in changed:
                note.node = node
                continue
            notes = self.get(key)
            if notes is not None and note in notes:
                notes.remove(note)
                if not notes:
                    del self[key]

    def reported(self, key: bytes, node: str) -> bool:
        """A push of ``key`` (held) came from ``node``: whether it is harmless (the report of a
        settled write of ours). It is the first push after every write of the key still noted."""
        notes = self[key]
        harmless = False
        for note in list(notes):
            if note.node is None:
                note.seen = True  # still running: this push is not known to be its report
            elif note.node == node:
                harmless = True
                notes.remove(note)
        if not notes:
            del self[key]
        return harmless
