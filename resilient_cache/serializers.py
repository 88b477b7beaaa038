"""How :class:`~resilient_cache.MultiLayerCache` turns values into bytes for Redis.

- ``"json"`` (default): any JSON value; tuples come back as lists, dict keys as strings.
- ``"msgpack"``: the ``msgpack`` extra (``pip install 'resilient-cache[msgpack]'``); compact and
  keeps ``bytes``; tuples come back as lists.
- ``"pickle"``: any picklable object, **only when asked for by name**: unpickling runs code chosen
  by whoever wrote the bytes, so anyone who can write to the Redis keys of the cache can run code
  in every process that reads them.

Any object with ``name``, ``dumps(value) -> bytes`` and ``loads(bytes) -> value`` works too.
"""

from __future__ import annotations

import importlib
import json
import pickle
from typing import Any, Protocol, runtime_checkable

from resilient_cache.errors import ConfigurationError

MSGPACK_HINT = "pip install 'resilient-cache[msgpack]'"


@runtime_checkable
class Serializer(Protocol):
    name: str

    def dumps(self, value: Any) -> bytes: ...
    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    name = "json"

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackSerializer:
    name = "msgpack"

    def __init__(self) -> None:
        try:
            msgpack = importlib.import_module("msgpack")
        except ImportError:
            raise ConfigurationError(
                f"MultiLayerCache serializer 'msgpack' needs the msgpack package: {MSGPACK_HINT}"
            ) from None
        self._msgpack: Any = msgpack

    def dumps(self, value: Any) -> bytes:
        data: bytes = self._msgpack.packb(value, use_bin_type=True)
        return data

    def loads(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False)


class PickleSerializer:
    """Any picklable value. Only safe when nobody untrusted can write to the cache's keys."""

    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)  # opt-in only; see the module docstring


SERIALIZERS: dict[str, type[Serializer]] = {
    "json": JsonSerializer,
    "msgpack": MsgpackSerializer,
    "pickle": PickleSerializer,
}


def get_serializer(spec: str | Serializer) -> Serializer:
    """The serializer named ``spec`` (``"json"``, ``"msgpack"``, ``"pickle"``), or ``spec``."""
    if isinstance(spec, str):
        factory = SERIALIZERS.get(spec.lower())
        if factory is None:
            raise ConfigurationError(
                f"MultiLayerCache serializer: unknown {spec!r}; choose one of "
                + ", ".join(SERIALIZERS)
                + " or pass an object with dumps()/loads()"
            )
        return factory()
    if not isinstance(spec, Serializer):
        raise ConfigurationError(
            "MultiLayerCache serializer: expected a name or an object with name, dumps() "
            f"and loads(), got {type(spec).__name__}"
        )
    return spec
