"""What a dev cluster's servers require of a connection: TLS, an ACL user, both or neither.

:class:`Security` is made from :class:`DevCluster`'s ``tls`` and ``acl`` arguments. When the
cluster starts it makes the certificates (:mod:`.tls`) and writes the ACL file, and from then
on it hands out the options every connection needs: the devcluster's own admin clients, and
the client variables ``resilient-cache cluster up`` prints.

The ACL file (``acl.conf`` in the cluster's directory, mode 0600) is included by every node's
``redis.conf``::

    user default off
    user NAME on #<sha256 of the password> ~* &* +@all
    masteruser NAME
    masterauth "PASSWORD"

Redis needs ``masterauth`` in clear (a replica logs in to its primary with it), so this file is
the one place the password is kept. The state file of a detached cluster records only the user
name; :meth:`Security.recorded` reads the password back from this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from .tls import TlsFiles, make_certificates

__all__ = ["ACL_FILE", "AclUser", "Security"]

logger = logging.getLogger("resilient_cache.devcluster")

#: The ACL file's name in the cluster's directory.
ACL_FILE = "acl.conf"
_TLS_DIR = "tls"
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclasses.dataclass(frozen=True)
class AclUser:
    """The one ACL user of a cluster: name and password (never in a repr)."""

    name: str
    password: str = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not _USER_NAME.fullmatch(self.name):
            raise ValueError(
                "the ACL user name must be 1-64 letters, digits or . _ @ - "
                "(starting with a letter or digit)"
            )
        if self.name == "default":
            raise ValueError("the ACL user must not be 'default': the default user is turned off")
        if not self.password:
            raise ValueError("the ACL password must not be empty")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in self.password):
            raise ValueError("the ACL password must not contain control characters")

    @classmethod
    def parse(cls, text: str) -> AclUser:
        """``USER:PASSWORD`` (the password may hold ``:``). ValueError never quotes ``text``."""
        name, colon, password = text.partition(":")
        if not colon:
            raise ValueError("expected USER:PASSWORD")
        return cls(name, password)


def _quote(value: str) -> str:
    # A double-quoted redis.conf value: only backslash and quote need escaping.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _unquote(text: str) -> str:
    """The inverse of :func:`_quote`."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ValueError("not a quoted value")
    out: list[str] = []
    chars = iter(text[1:-1])
    for ch in chars:
        out.append(next(chars, "") if ch == "\\" else ch)
    return "".join(out)


def acl_file_text(user: AclUser) -> str:
    """The ACL file of a cluster whose one user is ``user`` (see the module doc)."""
    digest = hashlib.sha256(user.password.encode()).hexdigest()
    return "\n".join(
        [
            "# Written by resilient_cache.devcluster: the ACL of a throwaway cluster.",
            "# It holds the password in clear (masterauth): keep it mode 0600.",
            "user default off",
            f"user {user.name} on #{digest} ~* &* +@all",
            # Replicas log in to their primary as this user.
            f"masteruser {user.name}",
            f"masterauth {_quote(user.password)}",
            "",
        ]
    )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an existing file keeps its mode otherwise
        handle.write(text)


def read_acl_user(path: Path) -> AclUser:
    """The user recorded in an ACL file written by :func:`acl_file_text`.

    Raises:
        OSError: the file cannot be read.
        ValueError: it holds no ``masteruser``/``masterauth``.
    """
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        directive, _, value = line.partition(" ")
        if directive in ("masteruser", "masterauth"):
            found[directive] = value
    if set(found) != {"masteruser", "masterauth"}:
        raise ValueError(f"{path} names no masteruser and masterauth")
    return AclUser(found["masteruser"], _unquote(found["masterauth"]))


class Security:
    """TLS and ACL of one cluster, and the connection options they call for.

    Args:
        tls: serve TLS only (see :mod:`.tls` for the certificates).
        acl: the one user allowed in; the default user is turned off.
    """

    def __init__(self, *, tls: bool = False, acl: AclUser | None = None) -> None:
        self.tls = tls
        self.acl = acl
        self.tls_files: TlsFiles | None = None
        self.acl_file: str | None = None

    def __repr__(self) -> str:
        user = self.acl.name if self.acl is not None else None
        return f"<Security tls={self.tls} acl_user={user!r}>"

    def prepare(self, base_dir: Path, host: str) -> None:
        """Make the certificates and write the ACL file in ``base_dir``, before the first spawn."""
        if self.tls:
            self.tls_files = make_certificates(base_dir / _TLS_DIR, host)
        if self.acl is not None:
            path = base_dir / ACL_FILE
            _write_private(path, acl_file_text(self.acl))
            self.acl_file = str(path)

    @classmethod
    def recorded(cls, base_dir: str | None, *, tls: bool, acl_user: str | None) -> Security:
        """The security of a cluster found through its state file, its files in ``base_dir``.

        The password is read back from the ACL file. If that file is gone, the handle can still
        stop the cluster (by pid) but not talk to it, and a warning says why.
        """
        security = cls(tls=tls)
        if base_dir is None:
            return security
        if tls:
            security.tls_files = TlsFiles(os.path.join(base_dir, _TLS_DIR))
        if acl_user is not None:
            path = Path(base_dir) / ACL_FILE
            try:
                security.acl = read_acl_user(path)
            except (OSError, ValueError) as exc:
                logger.warning(
                    "cannot read the ACL user %r from %s (%s); the cluster can be stopped but "
                    "not asked anything",
                    acl_user,
                    path,
                    type(exc).__name__,
                )
            else:
                security.acl_file = str(path)
        return security

    def connection_options(self) -> dict[str, Any]:
        """Keyword options for redis-py's clients and for ``create_redis_cluster`` alike.

        ``ssl``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` with TLS; ``username`` and
        ``password`` with an ACL user; empty for a plain cluster.
        """
        options: dict[str, Any] = {}
        if self.tls_files is not None:
            options.update(
                ssl=True,
                ssl_ca_certs=self.tls_files.ca_cert,
                ssl_certfile=self.tls_files.client_cert,
                ssl_keyfile=self.tls_files.client_key,
            )
        if self.acl is not None:
            options.update(username=self.acl.name, password=self.acl.password)
        return options

    def client_environment(self) -> dict[str, str]:
        """The ``REDIS_*`` variables (but the nodes) a client of this cluster needs."""
        env: dict[str, str] = {}
        if self.tls_files is not None:
            env.update(
                REDIS_SSL="true",
                REDIS_SSL_CA_CERTS=self.tls_files.ca_cert,
                REDIS_SSL_CERTFILE=self.tls_files.client_cert,
                REDIS_SSL_KEYFILE=self.tls_files.client_key,
            )
        if self.acl is not None:
            env.update(REDIS_USERNAME=self.acl.name, REDIS_PASSWORD=self.acl.password)
        return env
