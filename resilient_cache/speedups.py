"""What ``pip install 'resilient-cache[fast]'`` adds, and saying which of it is in use.

The ``fast`` extra installs two optional accelerators; nothing in the library requires them:

- **hiredis**: redis-py parses every reply with it instead of its pure-Python parser as soon as
  it is installed (``redis.asyncio.connection.DefaultParser``; the cluster backend has no
  option to choose another). The memory tier's invalidation links always use redis-py's
  Python RESP3 parser (``coherence.py``), whatever is installed.
- **uvloop**: a faster event loop. A library cannot choose the loop its caller runs;
  :func:`run` is what ``resilient-cache demo`` and the benchmarks use: ``uvloop.run`` when
  uvloop is installed, ``asyncio.run`` otherwise. An application does the same with
  ``uvloop.run(main())`` (or an event-loop policy).

:func:`parser_name` and :func:`event_loop_name` are the words the demo and the benchmarks print.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

T = TypeVar("T")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def uvloop_available() -> bool:
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def hiredis_parser_class() -> type[Any] | None:
    """redis-py's asyncio hiredis parser when hiredis is installed in a version redis-py
    accepts (``redis.utils.HIREDIS_AVAILABLE``), else None."""
    from redis._parsers import _AsyncHiredisParser
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        return None
    return _AsyncHiredisParser


def python_parser_class() -> type[Any]:
    """redis-py's pure-Python asyncio parser (RESP2; redis-py swaps it for its RESP3 twin on a
    ``protocol=3`` connection)."""
    from redis._parsers import _AsyncRESP2Parser

    return _AsyncRESP2Parser


def parser_name(parser_class: type[Any] | None = None) -> str:
    """Which reply parser redis-py's connections use: ``parser_class`` when one is configured
    (``redis_options={"parser_class": ...}``), else redis-py's default."""
    if parser_class is None:
        from redis.asyncio.connection import DefaultParser

        parser_class = DefaultParser
    if "hiredis" in parser_class.__name__.lower():
        return f"hiredis {_version('hiredis') or '?'}"
    return f"Python ({parser_class.__name__})"


def event_loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``uvloop <version>`` or ``asyncio (<loop class>)`` for ``loop`` (default: the running
    loop)."""
    loop = loop or asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        return f"uvloop {_version('uvloop') or '?'}"
    return f"asyncio ({type(loop).__name__})"


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool | None = None) -> T:
    """Run ``main`` to completion on a new event loop: uvloop's when ``use_uvloop`` is true, or
    when it is None and uvloop is installed; asyncio's otherwise (Python >= 3.10)."""
    if use_uvloop is None:
        use_uvloop = uvloop_available()
    if use_uvloop:
        try:
            uvloop = importlib.import_module("uvloop")  # optional: the [fast] extra
        except ImportError:
            main.close()  # never started: no "coroutine was never awaited" warning
            raise
        result: T = uvloop.run(main)
        return result
    return asyncio.run(main)
