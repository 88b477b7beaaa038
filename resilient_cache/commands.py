"""What the pipeline knows of a command before it runs: its keys, and whether it is safe to repeat.

The tables are decided once, here, never guessed per call. A command missing from them is treated
conservatively: not read-only, not idempotent, keys unknown (redis-py then finds the slot itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.cluster import READ_COMMANDS as _REDIS_PY_READ_COMMANDS

#: Commands that only read data. Taken from redis-py's own cluster table, which is the list it
#: uses to decide what may go to a replica.
READ_ONLY_COMMANDS: frozenset[str] = frozenset(c.upper() for c in _REDIS_PY_READ_COMMANDS) | {
    "PING",
    "ECHO",
    "HGETALL",
    "HMGET",
    "HKEYS",
    "HVALS",
    "SMEMBERS",
    "SISMEMBER",
    "ZSCORE",
    "ZRANGE",
    "LRANGE",
    "LLEN",
    "TYPE",
}

#: Writes that leave the same state however many times they run, so a retry after an unknown
#: outcome cannot change the result: SET k v (without GET/KEEPTTL tricks it is still a plain
#: overwrite), DEL, HSET, EXPIRE with an absolute value, ... INCR, LPUSH, RPOPLPUSH are not here.
IDEMPOTENT_WRITES: frozenset[str] = frozenset(
    {
        "SET",
        "SETEX",
        "PSETEX",
        "MSET",
        "DEL",
        "UNLINK",
        "HSET",
        "HMSET",
        "HDEL",
        "SADD",
        "SREM",
        "ZADD",
        "ZREM",
        "EXPIRE",
        "PEXPIRE",
        "EXPIREAT",
        "PEXPIREAT",
        "PERSIST",
    }
)

IDEMPOTENT_COMMANDS: frozenset[str] = READ_ONLY_COMMANDS | IDEMPOTENT_WRITES

#: Commands of IDEMPOTENT_COMMANDS for which is_idempotent() also reads the arguments. Every
#: other name decides alone, which lets Command skip the call on the hot path.
ARGUMENT_DEPENDENT: frozenset[str] = frozenset({"SET"})

# SET with one of these options has an outcome that depends on the state before it (SET NX as a
# lock, SET GET as a swap): running it twice can report a different reply, so it is not repeatable.
_CONDITIONAL_SET_OPTIONS = frozenset({"NX", "XX", "GET", b"NX", b"XX", b"GET"})


def is_idempotent(name: str, args: Sequence[Any]) -> bool:
    """Whether running the command twice leaves the same state and reply as running it once."""
    if name not in IDEMPOTENT_COMMANDS:
        return False
    if name == "SET" and len(args) > 2:  # listed in ARGUMENT_DEPENDENT
        return not any(
            isinstance(a, (str, bytes)) and a.upper() in _CONDITIONAL_SET_OPTIONS for a in args[2:]
        )
    return True


# -- what a write changes, for in-process tiers -------------------------------------------------

#: Read commands whose reply depends only on their one key and their arguments. (Commands whose
#: reply depends on the clock or on chance, such as TTL, PTTL, SRANDMEMBER, HRANDFIELD,
#: ZRANDMEMBER, or on a cursor, such as SCAN family, are deliberately absent.)
CACHEABLE = frozenset(
    {
        # strings
        "GET",
        "STRLEN",
        "GETRANGE",
        "SUBSTR",
        "GETBIT",
        "BITCOUNT",
        "BITPOS",
        # hashes
        "HGET",
        "HGETALL",
        "HMGET",
        "HKEYS",
        "HVALS",
        "HLEN",
        "HEXISTS",
        "HSTRLEN",
        # lists
        "LRANGE",
        "LINDEX",
        "LLEN",
        "LPOS",
        # sets
        "SMEMBERS",
        "SISMEMBER",
        "SMISMEMBER",
        "SCARD",
        # sorted sets
        "ZRANGE",
        "ZREVRANGE",
        "ZRANGEBYSCORE",
        "ZREVRANGEBYSCORE",
        "ZRANGEBYLEX",
        "ZREVRANGEBYLEX",
        "ZSCORE",
        "ZMSCORE",
        "ZRANK",
        "ZREVRANK",
        "ZCARD",
        "ZCOUNT",
        "ZLEXCOUNT",
        # others
        "TYPE",
        "EXISTS",
        "PFCOUNT",
        "XLEN",
        "XRANGE",
        "XREVRANGE",
        "GEOPOS",
        "GEODIST",
        "GEOHASH",
    }
)

#: Keyless commands that change no key: they never touch the tier. Any other write whose keys
#: are unknown flushes the whole tier (a conservative default for EVAL without keys, MIGRATE,
#: DEBUG, REPLICAOF, module commands, ...). Matched on the first word of the name.
KEYLESS = frozenset(
    {
        "ACL",
        "ASKING",
        "AUTH",
        "BGREWRITEAOF",
        "BGSAVE",
        "CLIENT",
        "CLUSTER",
        "COMMAND",
        "CONFIG",
        "DBSIZE",
        "ECHO",
        "FUNCTION",
        "HELLO",
        "INFO",
        "KEYS",
        "LASTSAVE",
        "LATENCY",
        "MEMORY",
        "MODULE",
        "PING",
        "PSUBSCRIBE",
        "PUBLISH",
        "PUBSUB",
        "PUNSUBSCRIBE",
        "QUIT",
        "RANDOMKEY",
        "READONLY",
        "READWRITE",
        "RESET",
        "ROLE",
        "SAVE",
        "SCAN",
        "SCRIPT",
        "SELECT",
        "SLOWLOG",
        "SPUBLISH",
        "SSUBSCRIBE",
        "SUBSCRIBE",
        "SUNSUBSCRIBE",
        "TIME",
        "UNSUBSCRIBE",
        "WAIT",
        "WAITAOF",
    }
)

#: Commands that drop every key.
FLUSHES = frozenset({"FLUSHALL", "FLUSHDB", "SWAPDB"})

#: Writes whose first two arguments are keys (source and destination).
_TWO_KEYS = frozenset(
    {"RENAME", "RENAMENX", "COPY", "SMOVE", "LMOVE", "BLMOVE", "RPOPLPUSH", "BRPOPLPUSH"}
)
#: Writes whose first argument is the destination key and whose other keys are only read.
_STORES = frozenset(
    {
        "SINTERSTORE",
        "SUNIONSTORE",
        "SDIFFSTORE",
        "ZINTERSTORE",
        "ZUNIONSTORE",
        "ZDIFFSTORE",
        "ZRANGESTORE",
        "GEOSEARCHSTORE",
        "PFMERGE",
    }
)
#: Writes missing from the command table whose first argument is the (only) key written.
_FIRST_KEY = frozenset(
    {
        "ZPOPMIN",
        "ZPOPMAX",
        "ZREMRANGEBYSCORE",
        "ZREMRANGEBYRANK",
        "ZREMRANGEBYLEX",
        "LINSERT",
        "LPUSHX",
        "RPUSHX",
        "GEOADD",
        "HSETEX",
        "HGETDEL",
        "HGETEX",
        "HEXPIRE",
        "HPEXPIRE",
        "HEXPIREAT",
        "HPEXPIREAT",
        "HPERSIST",
        "XACK",
        "XDEL",
        "XTRIM",
        "XCLAIM",
        "XAUTOCLAIM",
        "XSETID",
    }
)
#: Blocking pops: every argument but the last (the timeout) is a key.
_BLOCKING_POPS = frozenset({"BLPOP", "BRPOP", "BZPOPMIN", "BZPOPMAX"})
#: Consumer-group bookkeeping: changes no reply the tier caches (XRANGE, XLEN, ...).
_NO_DATA_WRITES = frozenset({"XREADGROUP", "XGROUP"})
SCRIPTS = frozenset({"EVAL", "EVALSHA", "FCALL", "EVAL_RO", "EVALSHA_RO", "FCALL_RO"})


ALL_KEYS = None
"""``written_keys()``'s answer for "any key may have changed"."""


def written_keys(name: str, args: tuple[Any, ...], keys: Any) -> tuple[Any, ...] | None:
    """The keys a write may change; ``None`` when it may change any key."""
    if name in FLUSHES:
        return ALL_KEYS
    if name in _TWO_KEYS:
        return tuple(args[:2])
    if name in _STORES:
        return tuple(args[:1])
    if name == "BITOP":
        return tuple(args[1:2])
    if name in _FIRST_KEY:
        return tuple(args[:1])
    if name in _BLOCKING_POPS:
        return tuple(args[:-1])
    if name in _NO_DATA_WRITES:
        return ()
    if name in ("LMPOP", "ZMPOP", "BLMPOP", "BZMPOP"):
        first = 1 if name.startswith("B") else 0  # after the timeout of the blocking forms
        try:
            count = int(args[first])
        except (IndexError, TypeError, ValueError):
            return ALL_KEYS
        return tuple(args[first + 1 : first + 1 + count])
    if name in SCRIPTS:
        try:
            count = int(args[1])
        except (IndexError, TypeError, ValueError):
            return ALL_KEYS
        return tuple(args[2 : 2 + count]) if count else ()
    if name == "SORT":
        for i, arg in enumerate(args[:-1]):
            if isinstance(arg, (str, bytes)) and arg.upper() in ("STORE", b"STORE"):
                return (args[i + 1],)
        return ()
    if keys:
        return tuple(keys)
    if name.split(" ", 1)[0] in KEYLESS:
        return ()
    return ALL_KEYS


#: Writes that change every key they name whenever they succeed (Redis then reports each key on
#: the tracking link). See the memory stage (its own writes' reports).
_CHANGE_ON_SUCCESS = frozenset(
    {"SETEX", "PSETEX", "GETSET", "MSET", "HSET", "HMSET", "LPUSH", "RPUSH"}
    | {"INCR", "DECR", "INCRBY", "DECRBY", "INCRBYFLOAT", "HINCRBY", "HINCRBYFLOAT"}
)
#: Writes whose reply counts what they changed: they changed their one key when it is above 0
#: (DEL and UNLINK: when it equals the number of keys).
_CHANGE_WHEN_COUNTED = frozenset(
    {"DEL", "UNLINK", "SADD", "SREM", "HDEL", "ZREM", "LREM", "PERSIST"}
    | {"EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT"}
)


#: The writes whose report on the tracking link can be recognised (see changed_keys).
OWN_WRITES_REPORTED = frozenset({"SET"} | _CHANGE_ON_SUCCESS | _CHANGE_WHEN_COUNTED)


def changed_keys(name: str, args: tuple[Any, ...], keys: Any, reply: Any) -> tuple[Any, ...]:
    """The keys a successful write is *known* to have changed, from its reply: only for those
    does Redis certainly report the change on the tracking link. ``()`` when unsure (SET NX that
    was not applied, a DEL of a missing key, SET ... GET, a ZADD that may only update)."""
    if name == "SET":
        if any(upper_option(a) == "GET" for a in args[2:]):
            return ()
        return tuple(args[:1]) if reply is True or reply in (b"OK", "OK") else ()
    if keys is None:
        return ()
    if name in _CHANGE_ON_SUCCESS:
        return tuple(keys)
    if name in _CHANGE_WHEN_COUNTED:
        if type(reply) not in (int, bool) or reply < 1:
            return ()
        if len(keys) == 1:
            return tuple(keys)
        return tuple(keys) if reply == len(set(keys)) and name in ("DEL", "UNLINK") else ()
    return ()


def upper_option(arg: Any) -> Any:
    """An option argument (``b"nx"``, ``"ex"``) in upper case, as ``str``; others unchanged."""
    if isinstance(arg, bytes):
        return arg.upper().decode(errors="replace")
    return arg.upper() if isinstance(arg, str) else arg
