"""The errors of the dev cluster package."""

from __future__ import annotations

__all__ = ["DevClusterError", "PortRaceError"]


class DevClusterError(RuntimeError):
    """The dev cluster could not be started, reached or stopped as asked."""


class PortRaceError(DevClusterError):
    """A server could not bind a port we had just seen free; retry with new ports."""
