"""The key table against a real server: the shipped key specifications are the server's own, and
for generated arguments of every command in its COMMAND table, ``keys_of`` names the keys
``COMMAND GETKEYS`` names (or says it cannot know them, only where Redis's own specifications
are incomplete)."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from resilient_cache import key_specs
from resilient_cache.key_specs import keys_of

ROOT = Path(__file__).parents[2]
EXAMPLES_PER_COMMAND = 40


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "generate_key_specs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(standalone_redis: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(standalone_redis, decode_responses=True, protocol=2)
    client.set_response_callback("COMMAND", lambda response, **options: response)
    yield client
    client.close()


@pytest.fixture(scope="module")
def table(server: redis.Redis) -> dict[str, Any]:
    generator = _generator()
    entries: dict[str, Any] = {}
    for command in server.execute_command("COMMAND"):
        name, entry = generator._entry(command)
        entries[name] = entry
        for sub in command[9] or []:
            sub_name, sub_entry = generator._entry(sub)
            entries[sub_name] = sub_entry
    return entries


def test_the_shipped_table_is_the_servers(table: dict[str, Any]) -> None:
    shipped = json.loads((ROOT / "resilient_cache" / "key_specs.json").read_text())["commands"]
    assert set(table) - set(shipped) == set(), "regenerate with scripts/generate_key_specs.py"
    assert {name: shipped[name] for name in table} == table


def _tokens(entry: dict[str, Any]) -> list[str]:
    """Arguments to draw from: the command's keywords, small counts, and plain words."""
    keywords = [spec["begin"][1] for spec in entry["specs"] if spec["begin"][0] == "keyword"]
    return [*keywords, *keywords, "0", "1", "2", "3", "k1", "k2", "k3", "v", "LEFT", "-1"]


def _examples(name: str, entry: dict[str, Any], rng: random.Random) -> Iterator[list[str]]:
    prefix = name.upper().split("|")
    arity = entry["arity"]
    tokens = _tokens(entry)
    for _ in range(EXAMPLES_PER_COMMAND):
        length = arity if arity > 0 else -arity + rng.randrange(0, 7)
        rest = [rng.choice(tokens) for _ in range(max(0, length - len(prefix)))]
        yield [*prefix, *rest]


def test_keys_of_agrees_with_command_getkeys(server: redis.Redis, table: dict[str, Any]) -> None:
    rng = random.Random(20261130)
    checked: Counter[str] = Counter()
    unknowable: Counter[str] = Counter()
    mismatches: list[str] = []
    for name, entry in sorted(table.items()):
        if "|" not in name and any(other.startswith(name + "|") for other in table):
            continue  # a container: its subcommands are checked
        for argv in _examples(name, entry, rng):
            try:
                server_keys = server.execute_command("COMMAND", "GETKEYS", *argv)
            except redis.ResponseError as err:
                if "no key arguments" in str(err):
                    ours = keys_of(argv[0], argv[1:])
                    if ours != ():
                        mismatches.append(f"{argv}: server none, ours {ours}")
                    checked["keyless"] += 1
                continue  # arguments the server cannot parse: nothing to compare
            ours = keys_of(argv[0], argv[1:])
            if ours is None:
                # Only where Redis's own specifications cannot say (it runs code instead), or
                # for a call the server would refuse (EVAL with a numkeys that is no number:
                # GETKEYS names no key for it).
                if key_specs._TABLE[name] is not None and server_keys != []:
                    mismatches.append(f"{argv}: server {server_keys}, ours unknown")
                unknowable[name] += 1
                continue
            if list(ours) != list(server_keys):
                mismatches.append(f"{argv}: server {server_keys}, ours {list(ours)}")
            checked["keyed"] += 1
    print(
        f"\nkey specs: {checked['keyed']} keyed and {checked['keyless']} keyless calls agree "
        f"with COMMAND GETKEYS over {len(table)} commands; unknowable: {dict(unknowable)}"
    )
    assert mismatches == [], mismatches[:20]
    assert checked["keyed"] > 2000 and checked["keyless"] > 1000
