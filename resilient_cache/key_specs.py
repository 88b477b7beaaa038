"""Which arguments of a command are keys, from Redis's own key specifications.

Redis 7 describes, per command, where its keys begin (an index, or after a keyword such as
``STREAMS``) and how to find the rest (a range, or a count such as ``EVAL``'s ``numkeys``). This
module reads those descriptions from ``key_specs.json`` (the ``COMMAND`` table of Redis 7.0,
written by ``scripts/generate_key_specs.py``) and applies them to a call's arguments the way the
server does, without a round trip.

:func:`keys_from_specs` returns a tuple of keys (``()``: the command has none), or ``None``
when they cannot be known: a command the table does not have (a module's, or one newer than
the table), a key specification Redis itself marks incomplete or unknown (``SORT ... STORE``,
``MIGRATE ... KEYS``), or arguments that do not parse (``EVAL`` with a ``numkeys`` that is not
a number). ``tests/integration/test_key_specs.py`` compares the answers with ``COMMAND
GETKEYS`` on a real server for generated arguments of every command.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

#: A key specification, compiled: (begin, find), each a tuple whose first item is its kind.
#: begin: ("index", i) | ("keyword", KEYWORD, startfrom);
#: find: ("range", lastkey, keystep, limit) | ("keynum", keynumidx, firstkey, keystep).
Spec = tuple[tuple[Any, ...], tuple[Any, ...]]

#: A command whose keys cannot be known from its arguments alone.
UNKNOWABLE: None = None


def _compile(entry: dict[str, Any]) -> tuple[Spec, ...] | None:
    specs: list[Spec] = []
    for spec in entry["specs"]:
        if "not_key" in spec["flags"]:
            continue  # a shard channel (SPUBLISH, SSUBSCRIBE): it has a slot but is no key
        begin, find = tuple(spec["begin"]), tuple(spec["find"])
        if "incomplete" in spec["flags"] or begin[0] == "unknown" or find[0] == "unknown":
            return UNKNOWABLE  # Redis falls back to code of its own for these
        specs.append((begin, find))
    return tuple(specs)


def _load() -> tuple[dict[str, tuple[Spec, ...] | None], frozenset[str], str]:
    data = json.loads(files("resilient_cache").joinpath("key_specs.json").read_text())
    table = {name: _compile(entry) for name, entry in data["commands"].items()}
    containers = frozenset(name.split("|", 1)[0] for name in table if "|" in name)
    return table, containers, data["redis_version"]


_TABLE, _CONTAINERS, REDIS_VERSION = _load()


def _simple(specs: tuple[Spec, ...] | None) -> tuple[int, int, int] | None:
    """(first, lastkey, step) over the arguments after the name, for a command whose one key
    specification is a range from a fixed index (most commands): read without the general loop."""
    if not specs or len(specs) != 1:
        return None
    (begin, find) = specs[0]
    if begin[0] != "index" or find[0] != "range" or (find[1] < 0 and find[3]):
        return None
    return begin[1] - 1, find[1], find[2]


#: Upper-case names (as :class:`~resilient_cache.pipeline.Command` spells them) of the commands
#: with one simple range of keys.
_SIMPLE = {
    name.upper(): simple
    for name, specs in _TABLE.items()
    if "|" not in name and name not in _CONTAINERS and (simple := _simple(specs)) is not None
}


def keys_of(name: str, args: Sequence[Any]) -> tuple[Any, ...] | None:
    """The keys of command ``name`` (upper case, ``"CLUSTER INFO"`` for a subcommand given with
    its container) called with ``args``: a tuple, ``()`` when it has none, ``None`` when they
    cannot be known (see :func:`keys_from_specs`)."""
    simple = _SIMPLE.get(name)
    if simple is not None:
        first, lastkey, step = simple
        if lastkey == 0:  # one key: GET, SET, INCR, HSET ...
            return (args[first],) if first < len(args) else UNKNOWABLE
        last = first + lastkey if lastkey >= 0 else len(args) + lastkey
        if last >= len(args) or last < first:
            return UNKNOWABLE
        return tuple(args[first : last + 1 : step])
    if " " in name:
        return keys_from_specs((*name.split(" "), *args))
    return keys_from_specs((name, *args))


def known(name: str) -> bool:
    """Whether the table has command ``name`` (``"get"``, ``"object|encoding"``)."""
    return name.lower() in _TABLE


def _text(arg: Any) -> str | None:
    if isinstance(arg, str):
        return arg
    if isinstance(arg, bytes):
        return arg.decode("utf-8", "replace")
    return None


def keys_from_specs(argv: Sequence[Any]) -> tuple[Any, ...] | None:
    """The keys of the call ``argv`` (the command's name first, as Redis counts positions)."""
    if not argv:
        return UNKNOWABLE
    name = _text(argv[0])
    if name is None:
        return UNKNOWABLE
    name = name.lower()
    if name in _CONTAINERS and len(argv) > 1:
        sub = _text(argv[1])
        if sub is None:
            return UNKNOWABLE
        name = f"{name}|{sub.lower()}"
    if name not in _TABLE:
        return UNKNOWABLE
    specs = _TABLE[name]
    if specs is None:
        return UNKNOWABLE
    keys: list[Any] = []
    argc = len(argv)
    for begin, find in specs:
        if begin[0] == "index":
            first = begin[1]
        else:  # keyword: search forwards from startfrom, or backwards from argc + startfrom
            first = _after_keyword(argv, begin[1], begin[2])
            if first == 0:
                continue  # no such keyword: this spec finds no key
        if find[0] == "range":
            _, lastkey, step, limit = find
            if lastkey >= 0:
                last = first + lastkey
            elif not limit:
                last = argc + lastkey
            else:
                last = first + ((argc - first) // limit + lastkey)
        else:  # keynum
            _, keynumidx, firstkey, step = find
            if first + keynumidx >= argc:
                return UNKNOWABLE
            try:
                count = int(argv[first + keynumidx])
            except (TypeError, ValueError):
                return UNKNOWABLE
            if count < 0:
                return UNKNOWABLE
            first += firstkey
            if count == 0:
                continue
            last = first + count - 1
        if last >= argc or last < first or first >= argc:
            return UNKNOWABLE  # a syntax error the server will report
        keys.extend(argv[first : last + 1 : step])
    return tuple(keys)


def _after_keyword(argv: Sequence[Any], keyword: str, startfrom: int) -> int:
    """The position after ``keyword``'s first match (searching as Redis does), or 0."""
    argc = len(argv)
    if startfrom > 0:
        positions: range = range(startfrom, argc - 1)  # a keyword in last place has no key
    else:
        positions = range(argc + startfrom, 0, -1)
    for i in positions:
        if i < 1 or i >= argc:
            break
        text = _text(argv[i])
        if text is not None and text.upper() == keyword:
            return i + 1
    return 0
