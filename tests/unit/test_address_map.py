"""REDIS_ADDRESS_MAP: parsing, validation, precedence, the lookup, and the topology replies
rewritten for the health and failover views (the integration test runs it on a real cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from resilient_cache import ConfigurationError, create_redis_cluster
from resilient_cache.backends.redis_py_common import reachable_topology
from resilient_cache.config_values import AddressMap, parse_address_map

NORMALISED = {"10.0.0.5:6379": "127.0.0.1:7000", "10.0.0.6": "127.0.0.1"}


def build(**options: Any) -> Any:
    return create_redis_cluster("127.0.0.1:7000", autoload=False, **options)


def error_of(**options: Any) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        build(**options)
    return caught.value


class TestForms:
    @pytest.mark.parametrize(
        "value",
        [
            '{"10.0.0.5:6379": "127.0.0.1:7000", "10.0.0.6": "127.0.0.1"}',
            "10.0.0.5:6379=127.0.0.1:7000,10.0.0.6=127.0.0.1",
            " 10.0.0.5:6379 = 127.0.0.1:7000 ,\n10.0.0.6=127.0.0.1, ",  # spaces, a YAML block
            {"10.0.0.5:6379": "127.0.0.1:7000", "10.0.0.6": "127.0.0.1"},
        ],
        ids=["json", "pairs", "pairs-spaced", "dict"],
    )
    def test_every_form_gives_the_same_normalised_map(self, monkeypatch, value) -> None:
        assert build(address_map=value).settings.address_map == NORMALISED
        if isinstance(value, str):
            monkeypatch.setenv("REDIS_ADDRESS_MAP", value)
            assert build().settings.address_map == NORMALISED

    def test_normalised_hosts(self) -> None:
        value = {"Redis-0.Redis.NS:06379": "LocalHost", "[FD00:0::5]": "[0:0::1]"}
        assert parse_address_map(value) == {
            "redis-0.redis.ns:6379": "localhost",
            "[fd00::5]": "[::1]",
        }

    @pytest.mark.parametrize("value", ["", "  ", "{}", " , ,", None, {}])
    def test_empty_is_no_map(self, value) -> None:
        assert build(address_map=value).settings.address_map == {}

    def test_default_is_no_map(self) -> None:
        assert build().settings.address_map == {}

    def test_host_port_to_bare_host_keeps_the_port(self) -> None:
        assert parse_address_map("10.0.0.5:6379=127.0.0.1") == {"10.0.0.5:6379": "127.0.0.1"}
        assert AddressMap({"10.0.0.5:6379": "127.0.0.1"})(("10.0.0.5", 6379)) == ("127.0.0.1", 6379)


class TestErrors:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("10.0.0.5:abc=127.0.0.1", "entry '10.0.0.5:abc=127.0.0.1': the announced address "
             "'10.0.0.5:abc' has no valid port (1-65535)"),
            ("a=b:0", "entry 'a=b:0': the reachable address 'b:0' has no valid port"),
            ("a=b:70000", "entry 'a=b:70000': the reachable address 'b:70000' has no valid port"),
            ("a:=b", "entry 'a:=b': the announced address 'a:' has no valid port"),
            ("=127.0.0.1", "entry '=127.0.0.1': the announced address is empty"),
            ("10.0.0.5=", "entry '10.0.0.5=': the reachable address is empty"),
            ("10.0.0.6=127.0.0.1:7000", "entry '10.0.0.6=127.0.0.1:7000': a host-only announced "
             "address keeps its port, so it cannot map to a port"),
            ("a=b,A=c", "entry 'A=c': 'a' is mapped twice"),
            ('{"a:1": "b", "a:1": "c"}', "entry {'a:1': 'c'}: 'a:1' is mapped twice"),
            ("just-a-host", "entry 'just-a-host' is not an 'announced=reachable' pair"),
            ("::1=b", "entry '::1=b': the announced address '::1' has no valid host (an IPv6 "
             "address must be written in brackets"),
            ("bad host!=b", "entry 'bad host!=b': the announced address 'bad host!' has no "
             "valid host"),
            ("[::1]x=b", "entry '[::1]x=b': the announced address '[::1]x' has text after ']' "
             "that is not ':port'"),
            ('{"a": 5}', "entry {'a': 5}: each side is a 'host' or 'host:port' string"),
            ('{"a": "b"', "not a valid JSON object"),
        ],
    )  # fmt: skip
    def test_names_the_variable_and_the_entry_on_one_line(self, monkeypatch, value, expected):
        monkeypatch.setenv("REDIS_ADDRESS_MAP", value)
        err = error_of()
        message = str(err)
        assert message.startswith("REDIS_ADDRESS_MAP: ") and expected in message, message
        assert "\n" not in message
        # No chained exception, so no deep traceback behind the one line.
        assert err.__cause__ is None and err.__suppress_context__

    def test_keyword_and_toml_are_named_as_written(self, monkeypatch, tmp_path: Path) -> None:
        message = str(error_of(address_map={"a:x": "b"}))
        assert message.startswith("address_map (keyword argument): entry {'a:x': 'b'}: ")
        monkeypatch.chdir(tmp_path)
        Path("resilient_cache.toml").write_text('[address_map]\n"a" = "b:1"\n', encoding="utf-8")
        message = str(error_of())
        assert message.startswith("address_map in resilient_cache.toml: entry {'a': 'b:1'}: ")

    def test_not_a_map_at_all(self) -> None:
        assert "is a JSON object, 'announced=reachable' pairs or a dict, not list" in str(
            error_of(address_map=["a=b"])
        )

    def test_the_standalone_backend_refuses_it(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
        monkeypatch.setenv("REDIS_ADDRESS_MAP", "a=b")
        with pytest.raises(ConfigurationError, match=r"^REDIS_ADDRESS_MAP: the standalone backend"):
            create_redis_cluster(autoload=False)
        with pytest.raises(ConfigurationError, match=r"^REDIS_ADDRESS_MAP: the standalone backend"):
            build(backend="standalone")

    def test_not_together_with_redis_pys_own_address_remap(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_ADDRESS_MAP", "a=b")
        message = str(error_of(redis_options={"address_remap": lambda address: address}))
        assert message.startswith("REDIS_ADDRESS_MAP: cannot be used together with redis_options")

    def test_cli_exits_2_with_one_line(self, monkeypatch, capsys) -> None:
        from resilient_cache.cli import EXIT_CONFIG, main

        monkeypatch.setenv("REDIS_PLUGINS_AUTOLOAD", "false")
        monkeypatch.setenv("REDIS_CLUSTER_NODES", "127.0.0.1:7000")
        monkeypatch.setenv("REDIS_ADDRESS_MAP", "10.0.0.5:6379=127.0.0.1:x")
        assert main(["config"]) == EXIT_CONFIG
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.splitlines() == [
            "resilient-cache: configuration error: REDIS_ADDRESS_MAP: entry "
            "'10.0.0.5:6379=127.0.0.1:x': the reachable address '127.0.0.1:x' has no valid port "
            "(1-65535)"
        ]


class TestPrecedence:
    @pytest.fixture
    def toml_map(self, monkeypatch, tmp_path: Path) -> None:
        monkeypatch.chdir(tmp_path)
        Path("resilient_cache.toml").write_text(
            '[address_map]\n"10.0.0.5:6379" = "127.0.0.1:7000"\n"10.0.0.6" = "127.0.0.1"\n',
            encoding="utf-8",
        )

    def test_a_toml_table(self, toml_map) -> None:
        assert build().settings.address_map == NORMALISED

    def test_the_variable_replaces_the_files_map(self, toml_map, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_ADDRESS_MAP", "10.0.0.7=h")
        assert build().settings.address_map == {"10.0.0.7": "h"}

    def test_a_keyword_string_replaces_a_keyword_dict_merges(self, toml_map) -> None:
        assert build(address_map="10.0.0.7=h").settings.address_map == {"10.0.0.7": "h"}
        merged = build(address_map={"10.0.0.6": "other", "10.0.0.7": "h"}).settings.address_map
        assert merged == {"10.0.0.5:6379": "127.0.0.1:7000", "10.0.0.6": "other", "10.0.0.7": "h"}

    def test_config_names_its_source(self, toml_map, monkeypatch, capsys) -> None:
        from resilient_cache.cli import main

        monkeypatch.setenv("REDIS_PLUGINS_AUTOLOAD", "false")
        monkeypatch.setenv("REDIS_CLUSTER_NODES", "127.0.0.1:7000")
        assert main(["config"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("address_map"))
        assert line == (
            'address_map = {"10.0.0.5:6379": "127.0.0.1:7000", "10.0.0.6": "127.0.0.1"}  '
            "[resilient_cache.toml]"
        )


class TestLookup:
    REMAP = AddressMap(
        {
            "10.0.0.5:6379": "127.0.0.1:7000",
            "10.0.0.5": "127.0.0.9",
            "redis-1.ns": "localhost",
            "[fd00::5]:6379": "[::1]:7005",
        }
    )

    @pytest.mark.parametrize(
        ("announced", "reachable"),
        [
            (("10.0.0.5", 6379), ("127.0.0.1", 7000)),  # host:port wins over the host's entry
            (("10.0.0.5", 6380), ("127.0.0.9", 6380)),  # the host's entry keeps the port
            (("REDIS-1.ns", 6379), ("localhost", 6379)),  # DNS names ignore case
            (("fd00:0::5", 6379), ("::1", 7005)),  # IPv6 as redis-py writes it: no brackets
            (("10.0.0.8", 6379), ("10.0.0.8", 6379)),  # no entry: unchanged
            (("Other.Host", 1), ("Other.Host", 1)),  # unchanged, not even in lower case
        ],
    )
    def test_remap(self, announced, reachable) -> None:
        assert self.REMAP(announced) == reachable

    def test_an_empty_map_is_false(self) -> None:
        assert not AddressMap({}) and self.REMAP


# -- the topology replies the health probe and the failover view read -------------------------

REMAP = AddressMap({"redis-0.redis": "127.0.0.1", "10.1.0.7:6379": "127.0.0.1:7001"})
#: The nodes redis-py knows (from CLUSTER SLOTS, remapped): by address.
KNOWN = {("127.0.0.1", 6379): ("127.0.0.1", 6379), ("127.0.0.1", 7001): ("127.0.0.1", 7001)}


def known_as(host: str, port: int) -> tuple[str, int] | None:
    return KNOWN.get((host, port))


def test_cluster_nodes_are_named_as_redis_py_names_them() -> None:
    # Kubernetes-like: the nodes announce a hostname (what CLUSTER SLOTS shows, what the map
    # names) and their pod IP (the key of redis-py's parsed CLUSTER NODES).
    reply = {
        "10.1.0.5:6379": {"node_id": "a", "hostname": "redis-0.redis", "flags": "master"},
        "10.1.0.7:6379": {"node_id": "b", "hostname": "", "flags": "slave"},  # its IP mapped
        "10.1.0.9:6379": {"node_id": "c", "hostname": "", "flags": "slave"},  # no entry
        ":6379": {"node_id": "d", "hostname": "", "flags": "myself,master"},  # no address yet
    }
    renamed = reachable_topology("CLUSTER NODES", reply, REMAP, known_as)
    assert list(renamed) == ["127.0.0.1:6379", "127.0.0.1:7001", "10.1.0.9:6379", ":6379"]
    assert [info["node_id"] for info in renamed.values()] == ["a", "b", "c", "d"]


def test_cluster_shards_with_bytes_keys() -> None:
    node = {b"id": b"a", b"port": 6379, b"ip": b"10.1.0.5", b"endpoint": b"redis-0.redis",
            b"hostname": b"redis-0.redis", b"role": b"master", b"health": b"online"}  # fmt: skip
    reply = [{"slots": [0, 16383], "nodes": [node]}]
    [shard] = reachable_topology("CLUSTER SHARDS", reply, REMAP, known_as)
    [entry] = shard["nodes"]
    assert (entry["ip"], entry["endpoint"], entry["port"]) == ("127.0.0.1", "127.0.0.1", 6379)
    assert entry["role"] == b"master"


def test_cluster_slots() -> None:
    reply = [
        [0, 8191, [b"redis-0.redis", 6379, b"a", {b"ip": b"10.1.0.5"}]],
        [8192, 16383, [b"10.1.0.7", 6379, b"b"], [b"10.1.0.9", 6379, b"c"]],
    ]
    rewritten = reachable_topology("CLUSTER SLOTS", reply, REMAP, known_as)
    nodes = [(node[0], node[1]) for entry in rewritten for node in entry[2:]]
    assert nodes == [("127.0.0.1", 6379), ("127.0.0.1", 7001), ("10.1.0.9", 6379)]


def test_other_replies_are_left_alone() -> None:
    assert reachable_topology("INFO", {"10.1.0.7:6379": 1}, REMAP, known_as) == {"10.1.0.7:6379": 1}
    assert reachable_topology("CLUSTER NODES", "raw text", REMAP, known_as) == "raw text"
