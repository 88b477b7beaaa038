"""The state file that lets a later process find a detached dev cluster.

``resilient-cache cluster up`` starts a cluster that outlives it
(``tie_to_parent=False``) and records it here, so that ``cluster down`` and
``cluster status`` can find its servers by pid later.

For a TLS or ACL cluster the file records only that the cluster uses TLS and the ACL user's
name, never the password: a later process reads that back from the ACL file in the cluster's
own directory (see :mod:`.security`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import DevClusterError
from .node import DevNode
from .processes import is_our_redis

__all__ = [
    "STATE_FILE_VERSION",
    "default_state_path",
    "read_state",
    "refuse_if_in_use",
    "remove_state_file",
    "write_state",
]

logger = logging.getLogger("resilient_cache.devcluster")

STATE_FILE_VERSION = 1


def default_state_path() -> Path:
    """Where ``resilient-cache cluster up`` records the detached cluster it started.

    ``$XDG_RUNTIME_DIR/resilient-cache/devcluster.json`` when that directory
    exists (it is per user and cleared at logout), else
    ``/tmp/resilient-cache-<uid>/devcluster.json``.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "resilient-cache" / "devcluster.json"
    return Path(tempfile.gettempdir()) / f"resilient-cache-{os.getuid()}" / "devcluster.json"


def write_state(
    path: str | os.PathLike[str],
    *,
    base_dir: str | None,
    owns_dir: bool,
    host: str,
    node_timeout_ms: int,
    primaries: int,
    replicas_per_primary: int,
    extra_config: list[str],
    redis_server: str,
    nodes: Sequence[DevNode],
    tls: bool = False,
    acl_user: str | None = None,
) -> Path:
    """Record a cluster in ``path`` and return it as a Path.

    The file is replaced atomically; its directory is created private (0700).
    """
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = {
        "version": STATE_FILE_VERSION,
        "base_dir": base_dir,
        "owns_dir": owns_dir,
        "host": host,
        "node_timeout_ms": node_timeout_ms,
        "primaries": primaries,
        "replicas_per_primary": replicas_per_primary,
        "extra_config": extra_config,
        "redis_server": redis_server,
        "tls": tls,
        "acl_user": acl_user,
        "owner_pid": os.getpid(),
        "nodes": [{"port": n.port, "pid": n.pid, "dir": n.dir} for n in nodes],
    }
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(scratch, target)
    logger.debug("saved dev cluster state to %s", target)
    return target


def read_state(path: Path) -> dict[str, Any]:
    """The fields :func:`write_state` recorded in ``path``.

    Raises:
        DevClusterError: no file there, or not a state file of this version.
        ValueError: the file is not JSON.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DevClusterError(f"no dev cluster state file at {path}") from None
    if not isinstance(data, dict) or data.get("version") != STATE_FILE_VERSION:
        raise DevClusterError(f"{path} is not a dev cluster state file this version reads")
    return data


def refuse_if_in_use(path: Path, recorded_nodes: Callable[[Path], Sequence[DevNode]]) -> None:
    """Raise if the cluster recorded in ``path`` still runs; overwriting would orphan it.

    ``recorded_nodes`` loads the nodes recorded in a state file. An unreadable file
    is only logged, and a stale one is left for the caller to replace.
    """
    if not path.exists():
        return
    try:
        nodes = recorded_nodes(path)
    except (DevClusterError, OSError, ValueError) as exc:
        logger.warning("ignoring unreadable state file %s: %s", path, exc)
        return
    running = [node.address for node in nodes if is_our_redis(node.pid, node.port)]
    if running:
        raise DevClusterError(
            f"a dev cluster recorded in {path} is still running ({', '.join(running)}); "
            "stop it first (`resilient-cache cluster down` or "
            "DevCluster.load_state(path).stop())"
        )
    logger.info("replacing stale state file %s", path)


def remove_state_file(path: Path, base_dir: str | None) -> None:
    """Remove ``path`` if it still records the cluster living in ``base_dir``."""
    # Only remove the file if it still describes this cluster: someone may have
    # started another cluster that recorded itself there since.
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("base_dir") == base_dir:
        with contextlib.suppress(OSError):
            path.unlink()
