"""Certificates for a dev cluster started with ``tls=True``, made with the ``openssl`` binary.

:func:`make_certificates` writes into one directory (private, 0700):

``ca.crt``                     a throwaway CA, the one certificate clients must trust
``server.crt``/``server.key``  every node's certificate, valid for the cluster's loopback
                               address, ``127.0.0.1`` and ``localhost``; the nodes also present
                               it to each other (cluster bus, replication), so it is good for
                               client authentication too
``client.crt``/``client.key``  the certificate clients present (the servers require one)

The CA's private key is deleted once the two certificates are signed: nothing else can ever
be signed by it. Keys are elliptic-curve P-256 (a few milliseconds each) and the certificates
follow the strict X.509 checks recent Python and OpenSSL apply (key usages, key identifiers,
a critical ``basicConstraints``). The ``openssl`` command line is used rather than the
``cryptography`` package so that the dev cluster needs nothing beyond the OpenSSL that a
TLS-enabled ``redis-server`` is built against anyway.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from .errors import DevClusterError

__all__ = ["CERTIFICATE_DAYS", "TlsFiles", "find_openssl", "make_certificates"]

#: How long the certificates are valid: a detached cluster may run for days.
CERTIFICATE_DAYS = 90

_OPENSSL_CONFIG = """\
# Written by resilient_cache.devcluster to make a throwaway cluster's certificates.
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {alt_names}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """The certificate files of one cluster, all in ``directory``."""

    directory: str

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def ca_cert(self) -> str:
        """The CA certificate clients must trust (``REDIS_SSL_CA_CERTS``)."""
        return self._path("ca.crt")

    @property
    def server_cert(self) -> str:
        """The certificate every node presents."""
        return self._path("server.crt")

    @property
    def server_key(self) -> str:
        """The private key of :attr:`server_cert`."""
        return self._path("server.key")

    @property
    def client_cert(self) -> str:
        """The certificate clients present (``REDIS_SSL_CERTFILE``)."""
        return self._path("client.crt")

    @property
    def client_key(self) -> str:
        """The private key of :attr:`client_cert` (``REDIS_SSL_KEYFILE``)."""
        return self._path("client.key")


def find_openssl() -> str:
    """The path of the ``openssl`` binary.

    Raises:
        DevClusterError: when it is not on ``PATH``, with an install hint.
    """
    found = shutil.which("openssl")
    if found is None:
        raise DevClusterError(
            "the openssl command was not found on PATH; a TLS dev cluster needs it to make "
            "its certificates. Install it with `apt-get install openssl` (as root)."
        )
    return found


def _run(openssl: str, directory: Path, *args: str) -> None:
    try:
        result = subprocess.run(
            [openssl, *args],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DevClusterError(f"could not run {openssl} {args[0]}: {exc}") from exc
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise DevClusterError(
            f"`openssl {args[0]}` failed (exit {result.returncode}) making the dev cluster's "
            f"certificates in {directory}: {output or '(no output)'}"
        )


def _new_key(openssl: str, directory: Path, name: str) -> None:
    _run(
        openssl,
        directory,
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        name,
    )
    os.chmod(directory / name, 0o600)


def _sign(openssl: str, directory: Path, who: str) -> None:
    _new_key(openssl, directory, f"{who}.key")
    csr = f"{who}.csr"
    _run(
        openssl,
        directory,
        "req",
        "-new",
        "-config",
        "openssl.cnf",
        "-key",
        f"{who}.key",
        "-subj",
        f"/CN=resilient-cache dev {who}",
        "-out",
        csr,
    )
    _run(
        openssl,
        directory,
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-set_serial",
        f"0x{secrets.token_hex(8)}",
        "-days",
        str(CERTIFICATE_DAYS),
        "-extfile",
        "openssl.cnf",
        "-extensions",
        who,
        "-out",
        f"{who}.crt",
    )
    (directory / csr).unlink()


def make_certificates(directory: str | os.PathLike[str], host: str) -> TlsFiles:
    """Make a fresh CA, server and client certificate in ``directory`` (see the module doc).

    ``host`` is the loopback address the servers bind; the server certificate names it,
    ``127.0.0.1`` and ``localhost``. Files already there are replaced.

    Raises:
        DevClusterError: ``openssl`` is missing or fails (its message is quoted).
    """
    openssl = find_openssl()
    target = Path(directory)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(target, 0o700)
    alt_names = ", ".join(
        dict.fromkeys([f"IP:{host}", "IP:127.0.0.1", "DNS:localhost"])  # no duplicates
    )
    (target / "openssl.cnf").write_text(
        _OPENSSL_CONFIG.format(alt_names=alt_names), encoding="utf-8"
    )
    try:
        _new_key(openssl, target, "ca.key")
        _run(
            openssl,
            target,
            "req",
            "-x509",
            "-new",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca",
            "-key",
            "ca.key",
            "-subj",
            "/CN=resilient-cache dev CA",
            "-set_serial",
            f"0x{secrets.token_hex(8)}",
            "-days",
            str(CERTIFICATE_DAYS),
            "-out",
            "ca.crt",
        )
        for who in ("server", "client"):
            _sign(openssl, target, who)
    finally:
        # Nothing may be signed by this CA later, and the scratch files are of no use.
        for leftover in ("ca.key", "openssl.cnf", "server.csr", "client.csr"):
            (target / leftover).unlink(missing_ok=True)
    return TlsFiles(str(target))
