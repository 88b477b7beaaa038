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


# (first key index, last key index (-1 = to the end), step) in the arguments after the name, for
# commands called through ``execute_command`` without redis-py's ``keys=`` option.
_KEY_SPECS: dict[str, tuple[int, int, int]] = {
    **dict.fromkeys(
        [
            "GET",
            "SET",
            "SETEX",
            "PSETEX",
            "SETNX",
            "GETSET",
            "GETDEL",
            "GETEX",
            "APPEND",
            "STRLEN",
            "INCR",
            "INCRBY",
            "INCRBYFLOAT",
            "DECR",
            "DECRBY",
            "EXPIRE",
            "PEXPIRE",
            "EXPIREAT",
            "PEXPIREAT",
            "TTL",
            "PTTL",
            "PERSIST",
            "TYPE",
            "HGET",
            "HSET",
            "HSETNX",
            "HMSET",
            "HMGET",
            "HDEL",
            "HGETALL",
            "HKEYS",
            "HVALS",
            "HLEN",
            "HEXISTS",
            "HINCRBY",
            "HINCRBYFLOAT",
            "LPUSH",
            "RPUSH",
            "LPOP",
            "RPOP",
            "LRANGE",
            "LLEN",
            "LINDEX",
            "LSET",
            "LREM",
            "LTRIM",
            "SADD",
            "SREM",
            "SMEMBERS",
            "SISMEMBER",
            "SCARD",
            "SPOP",
            "SRANDMEMBER",
            "ZADD",
            "ZREM",
            "ZSCORE",
            "ZRANGE",
            "ZRANK",
            "ZREVRANK",
            "ZCARD",
            "ZINCRBY",
            "ZCOUNT",
            "ZRANGEBYSCORE",
            "ZREVRANGE",
            "PFADD",
            "GETRANGE",
            "SETRANGE",
            "BITCOUNT",
            "GETBIT",
            "SETBIT",
            "XADD",
            "XLEN",
            "XRANGE",
            "XREVRANGE",
            "DUMP",
            "RESTORE",
        ],
        (0, 0, 1),
    ),
    **dict.fromkeys(("MGET", "DEL", "UNLINK", "EXISTS", "TOUCH", "SINTER", "SUNION"), (0, -1, 1)),
    **dict.fromkeys(("MSET", "MSETNX"), (0, -1, 2)),
}


def keys_of(name: str, args: Sequence[Any]) -> tuple[Any, ...]:
    """Return the keys a command touches, from the static table, or ``()`` when not known."""
    spec = _KEY_SPECS.get(name)
    if spec is None or not args:
        return ()
    first, last, step = spec
    end = len(args) if last < 0 else last + 1
    return tuple(args[first:end:step])
