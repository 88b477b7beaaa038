"""Write resilient_cache/key_specs.json from a running Redis's COMMAND reply.

    .venv/bin/python scripts/generate_key_specs.py redis://127.0.0.1:6379

The file holds, per command (and subcommand, as ``container|sub``), its key specifications as
Redis 7 describes them (``COMMAND DOCS``/``COMMAND INFO``: where the keys begin, how to find the
rest) and whether its keys move with its arguments. ``tests/integration/test_key_specs.py``
checks the shipped file against the test server's own table, and our keys against ``COMMAND
GETKEYS``. Regenerate it when a new Redis release adds commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import redis

OUT = Path(__file__).parents[1] / "resilient_cache" / "key_specs.json"


def _pairs(flat: list[Any]) -> dict[str, Any]:
    """A RESP2 map (a flat list of name, value, ...) as a dict with str names."""
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _spec(raw: list[Any]) -> dict[str, Any]:
    spec = _pairs(raw)
    begin = _pairs(spec["begin_search"])
    find = _pairs(spec["find_keys"])
    begin_spec = _pairs(begin["spec"]) if begin["spec"] else {}
    find_spec = _pairs(find["spec"]) if find["spec"] else {}
    if begin["type"] == "index":
        begin_search: list[Any] = ["index", int(begin_spec["index"])]
    elif begin["type"] == "keyword":
        begin_search = ["keyword", str(begin_spec["keyword"]), int(begin_spec["startfrom"])]
    else:
        begin_search = ["unknown"]
    if find["type"] == "range":
        find_keys: list[Any] = [
            "range",
            int(find_spec["lastkey"]),
            int(find_spec["keystep"]),
            int(find_spec["limit"]),
        ]
    elif find["type"] == "keynum":
        find_keys = [
            "keynum",
            int(find_spec["keynumidx"]),
            int(find_spec["firstkey"]),
            int(find_spec["keystep"]),
        ]
    else:
        find_keys = ["unknown"]
    flags = sorted(str(flag) for flag in spec["flags"])
    return {"flags": flags, "begin": begin_search, "find": find_keys}


def _entry(command: list[Any]) -> tuple[str, dict[str, Any]]:
    name = str(command[0]).lower()
    flags = {str(flag) for flag in command[2]}
    entry: dict[str, Any] = {
        "arity": int(command[1]),
        "movablekeys": "movablekeys" in flags,
        "specs": [_spec(raw) for raw in command[8]],
    }
    return name, entry


def main(url: str) -> None:
    client = redis.Redis.from_url(url, decode_responses=True, protocol=2)
    client.set_response_callback("COMMAND", lambda response, **options: response)  # raw
    table: dict[str, Any] = {}
    for command in client.execute_command("COMMAND"):
        name, entry = _entry(command)
        table[name] = entry
        for sub in command[9] or []:
            sub_name, sub_entry = _entry(sub)
            table[sub_name] = sub_entry
    server = client.info("server")["redis_version"]
    # One command per line: a new Redis release shows as the lines it adds or changes.
    lines = [f"{json.dumps(name)}: {json.dumps(entry)}" for name, entry in sorted(table.items())]
    OUT.write_text(
        f'{{"redis_version": {json.dumps(server)}, "commands": {{\n' + ",\n".join(lines) + "\n}}\n"
    )
    print(f"{len(table)} commands from Redis {server} -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379")
