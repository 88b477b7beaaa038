"""A first-party plugin: move from one Redis to Redis Cluster without downtime.

- The stage ``dualwrite`` (``REDIS_DUALWRITE__*``, :mod:`resilient_cache_dualwrite.stage`)
  writes to both the cluster and the old single Redis and reads from one of them, by mode.
- The command ``resilient-cache migrate copy|verify`` (:mod:`resilient_cache_dualwrite.migrate`)
  copies the old Redis's keys into the cluster and checks the copy.

docs/migration.md in the resilient_cache repository gives the steps in order, and how to roll
back.
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from resilient_cache import CommandRegistry, StageRegistry, hookimpl
from resilient_cache_dualwrite.stage import (
    DualWriteSettings,
    DualWriteStage,
    make_dualwrite_stage,
)

try:
    __version__ = version("resilient-cache-dualwrite")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["DualWriteSettings", "DualWriteStage", "make_dualwrite_stage"]


@hookimpl
def resilient_cache_register_stages(registry: StageRegistry) -> None:
    registry.add(
        "dualwrite",
        DualWriteSettings,
        make_dualwrite_stage,
        description="writes to the cluster and an old single Redis; reads by mode",
    )


@hookimpl
def resilient_cache_register_commands(registry: CommandRegistry) -> None:
    registry.add(
        "migrate",
        _configure_migrate,
        _run_migrate,
        help="copy an old single Redis's keys into the cluster (copy) and check them (verify)",
    )


# The command's module is imported only when the command line is built: a client never needs it.
def _configure_migrate(parser: argparse.ArgumentParser) -> None:
    from resilient_cache_dualwrite import migrate_cli

    migrate_cli.configure(parser)


def _run_migrate(args: argparse.Namespace) -> int:
    from resilient_cache_dualwrite import migrate_cli

    return migrate_cli.run(args)
