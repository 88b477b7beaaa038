"""The dev cluster's TLS and ACL parts that need no server: the ACL user and file, the
``redis.conf`` lines, the options handed to clients, and the certificates ``openssl`` makes.

tests/integration/test_tls_acl.py runs a whole TLS + ACL cluster.
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest

from resilient_cache import cli
from resilient_cache.devcluster import AclUser, DevNode
from resilient_cache.devcluster.config import cluster_node_config
from resilient_cache.devcluster.security import Security, acl_file_text, read_acl_user
from resilient_cache.devcluster.tls import TlsFiles, make_certificates

SECRET = "s3cr:et"


def test_acl_user_parses_user_colon_password_and_hides_the_password() -> None:
    user = AclUser.parse(f"app:{SECRET}")
    assert (user.name, user.password) == ("app", SECRET)
    assert SECRET not in repr(user)
    for text in ("apps3cret", "app:", f"default:{SECRET}", f"a b:{SECRET}"):
        with pytest.raises(ValueError) as caught:
            AclUser.parse(text)
        assert "s3cr" not in str(caught.value)
    with pytest.raises(ValueError, match="control characters"):
        AclUser("app", "line\nbreak")


def test_cli_acl_error_does_not_echo_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli._parser().parse_args(["cluster", "up", "--acl", "default:hunter2"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--acl" in err and "'default'" in err
    assert "hunter2" not in err
    args = cli._parser().parse_args(["cluster", "up", "--tls", "--acl", f"app:{SECRET}"])
    assert args.tls and args.acl == AclUser("app", SECRET)


@pytest.mark.parametrize("password", [SECRET, 'q"uo\\te \\n x', "unicodé ünïcode", "#>~&"])
def test_acl_file_round_trips_the_password(tmp_path: Path, password: str) -> None:
    path = tmp_path / "acl.conf"
    path.write_text(acl_file_text(AclUser("app", password)), encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    assert "user default off" in text.splitlines()
    assert any(line.startswith("user app on #") for line in text.splitlines())
    assert read_acl_user(path) == AclUser("app", password)


def test_security_options_and_environment() -> None:
    plain = Security()
    assert plain.connection_options() == {} and plain.client_environment() == {}
    secured = Security(tls=True, acl=AclUser("app", SECRET))
    secured.tls_files = TlsFiles("/x/tls")
    assert secured.connection_options() == {
        "ssl": True,
        "ssl_ca_certs": "/x/tls/ca.crt",
        "ssl_certfile": "/x/tls/client.crt",
        "ssl_keyfile": "/x/tls/client.key",
        "username": "app",
        "password": SECRET,
    }
    assert secured.client_environment() == {
        "REDIS_SSL": "true",
        "REDIS_SSL_CA_CERTS": "/x/tls/ca.crt",
        "REDIS_SSL_CERTFILE": "/x/tls/client.crt",
        "REDIS_SSL_KEYFILE": "/x/tls/client.key",
        "REDIS_USERNAME": "app",
        "REDIS_PASSWORD": SECRET,
    }
    assert SECRET not in repr(secured)


def test_recorded_security_reads_the_password_back_or_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "acl.conf").write_text(acl_file_text(AclUser("app", SECRET)), encoding="utf-8")
    found = Security.recorded(str(tmp_path), tls=True, acl_user="app")
    assert found.acl == AclUser("app", SECRET)
    assert found.tls_files == TlsFiles(str(tmp_path / "tls"))
    (tmp_path / "acl.conf").unlink()
    lost = Security.recorded(str(tmp_path), tls=False, acl_user="app")
    assert lost.acl is None and "cannot read the ACL user 'app'" in caplog.text


def test_tls_node_config_has_no_plain_port_and_tls_everywhere() -> None:
    node = DevNode(host="127.0.0.1", port=17001, pid=0, dir="/d/node 0")
    lines = cluster_node_config(
        node, 2000, ["maxmemory 1mb"], tls=TlsFiles("/d/tls"), acl_file="/d/acl.conf"
    ).splitlines()
    for expected in (
        "port 0",
        "tls-port 17001",
        'tls-cert-file "/d/tls/server.crt"',
        'tls-key-file "/d/tls/server.key"',
        'tls-ca-cert-file "/d/tls/ca.crt"',
        "tls-auth-clients yes",
        "tls-replication yes",
        "tls-cluster yes",
        'include "/d/acl.conf"',
    ):
        assert expected in lines
    assert "port 17001" not in lines
    assert lines[-1] == "maxmemory 1mb"  # extra_config still last
    plain = cluster_node_config(node, 2000, []).splitlines()
    assert "port 17001" in plain and not [line for line in plain if line.startswith("tls")]


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, pipes: list[ssl.MemoryBIO]) -> None:
    """Run a TLS handshake between two in-memory ends until both are done."""
    c_in, c_out, s_in, s_out = pipes
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError(f"handshake did not finish: {done}")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("server_name", ["127.0.0.1", "localhost"])
def test_certificates_pass_strict_mutual_verification(tmp_path: Path, server_name: str) -> None:
    files = make_certificates(tmp_path / "tls", "127.0.0.1")
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == [
        "ca.crt",
        "client.crt",
        "client.key",
        "server.crt",
        "server.key",
    ]
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(files.ca_cert)
    client_ctx.load_cert_chain(files.client_cert, files.client_key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_verify_locations(files.ca_cert)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # as tls-auth-clients yes
    for ctx in (client_ctx, server_ctx):
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # what newer Pythons turn on by default
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(pipes[0], pipes[1], server_hostname=server_name)
    server = server_ctx.wrap_bio(pipes[2], pipes[3], server_side=True)
    _handshake(client, server, pipes)
    peer = server.getpeercert()
    assert peer is not None
    assert peer["subject"] == ((("commonName", "resilient-cache dev client"),),)
