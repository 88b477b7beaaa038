"""docs/configuration.md lists every core setting, with its variable, in the core settings
table (the numeric ranges are checked in test_settings.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from resilient_cache import create_redis_cluster

DOCS = Path(__file__).parents[2] / "docs" / "configuration.md"


def _core_fields() -> list[str]:
    model = type(create_redis_cluster("127.0.0.1:7000", autoload=False).settings)
    return [
        name
        for name, info in model.model_fields.items()
        if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))
    ]


CORE_FIELDS = _core_fields()


def test_there_are_core_fields() -> None:
    assert {"cluster_nodes", "address_map", "redis_options"} <= set(CORE_FIELDS)


@pytest.mark.parametrize("field", CORE_FIELDS)
def test_every_core_field_has_a_row(field: str) -> None:
    rows = [line for line in DOCS.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    row = f"| `{field}` | `REDIS_{field.upper()}` |"
    assert any(line.startswith(row) for line in rows), f"no row {row!r} in docs/configuration.md"
