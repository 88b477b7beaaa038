"""Where settings come from besides pydantic-settings' own sources: the numbered node
variables (``REDIS_NODE_<n>_HOST`` / ``_PORT``), and a file check that never raises."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from resilient_cache.config_values import ClusterNode, check_host, parse_port_of

__all__ = ["ENV_PREFIX", "NumberedNodesSource", "is_file"]

#: The prefix of every environment variable of this package.
ENV_PREFIX = "REDIS_"


class NumberedNodesSource(PydanticBaseSettingsSource):
    """Reads ``REDIS_NODE_<n>_HOST`` / ``REDIS_NODE_<n>_PORT`` pairs into ``cluster_nodes``.

    Looks at the environment first, then ``.env``; nodes are ordered by ``n``.
    """

    _PATTERN = re.compile(rf"^{ENV_PREFIX}NODE_([0-9]+)_(HOST|PORT)$", re.IGNORECASE | re.ASCII)

    def __init__(self, settings_cls: type[BaseSettings], env_file: str | None = ".env") -> None:
        super().__init__(settings_cls)
        self._env_file = env_file

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole result

    def __call__(self) -> dict[str, Any]:
        variables: dict[str, str] = {}
        if self._env_file and is_file(Path(self._env_file)):
            variables.update(
                {k: v for k, v in dotenv_values(self._env_file).items() if v is not None}
            )
        variables.update(os.environ)
        found: dict[int, dict[str, tuple[str, str]]] = {}
        for name, value in variables.items():
            match = self._PATTERN.match(name)
            if match:
                found.setdefault(int(match[1]), {})[match[2].upper()] = (name, value)
        nodes = []
        for n in sorted(found):
            parts = found[n]
            if "HOST" not in parts:
                # Not ours: Kubernetes injects REDIS_NODE_1_PORT=tcp://... for a Service named
                # redis-node-1. Only a HOST variable says the user meant this scheme.
                continue
            host_name, host = parts["HOST"]
            host = host.strip()
            port_name, port = parts.get("PORT", (f"{ENV_PREFIX}NODE_{n}_PORT", "6379"))
            port = port.strip()
            if "://" in port:  # a Kubernetes service link, not a port number
                port = port.rpartition(":")[2]
            item = f"{host}:{port}"
            nodes.append(
                ClusterNode(
                    check_host(host, host_name.upper(), item, bare_ipv6=True),
                    parse_port_of(port, port_name.upper(), item),
                )
            )
        return {"cluster_nodes": nodes} if nodes else {}


def is_file(path: Path) -> bool:
    """``path.is_file()``, false instead of OSError for a name the system refuses (too long)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
