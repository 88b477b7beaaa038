"""Loopback-only addresses and the search for free ports to start servers on."""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
from pathlib import Path

from .errors import DevClusterError
from .node import BUS_PORT_OFFSET

__all__ = ["check_loopback", "pick_free_ports"]


def check_loopback(host: str) -> str:
    """Return ``host`` if it is an IPv4 loopback address, else raise ValueError."""
    # The dev servers have no password and protected mode off, so they must never
    # be reachable from the network.
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be an IPv4 loopback address, got {host!r}") from None
    if address.version != 4 or not address.is_loopback:
        raise ValueError(f"host must be an IPv4 loopback address such as 127.0.0.1, got {host!r}")
    return host


def _port_search_range() -> tuple[int, int]:
    """Ports to draw client ports from, so both P and P+10000 avoid the ephemeral range.

    Binding port 0 would hand out ephemeral ports (32768-60999 on Linux): P+10000
    could then overflow 65535, and both ports could collide with the local end of
    some outgoing connection. Drawing below the ephemeral range avoids both.
    """
    ephemeral_low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral_low = int(text.split()[0])
    low, high = 10000, ephemeral_low - BUS_PORT_OFFSET - 1
    if high - low < 1000:  # unusual kernel settings: fall back to anything valid
        low, high = 1024, 65535 - BUS_PORT_OFFSET
    return low, high


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Redis sets SO_REUSEADDR too, so a TIME_WAIT leftover from an earlier run
        # does not stop it binding; probing the same way avoids skipping such ports.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_ports(host: str, count: int, *, bus_ports: bool = True) -> list[int]:
    """Pick ``count`` free client ports on ``host``, below the ephemeral range.

    With ``bus_ports`` (a cluster) each port's cluster bus port P+10000 must be free
    as well; a standalone server needs only P. A port seen free may still be taken
    before the server binds it, so callers retry on :class:`PortRaceError`.
    """
    low, high = _port_search_range()
    rng = random.SystemRandom()
    chosen: list[int] = []
    reserved: set[int] = set()
    for _ in range(5000):
        if len(chosen) == count:
            return chosen
        port = rng.randint(low, high)
        group = {port, port + BUS_PORT_OFFSET} if bus_ports else {port}
        if group & reserved:
            continue
        if all(_port_is_free(host, candidate) for candidate in sorted(group)):
            chosen.append(port)
            reserved |= group
    if len(chosen) == count:
        return chosen
    if bus_ports:
        raise DevClusterError(f"could not find {count} free port pairs (P and P+10000) on {host}")
    raise DevClusterError(f"could not find {count} free ports on {host}")
