from __future__ import annotations

from pathlib import Path

import pytest

from resilient_cache import (
    ClusterNode,
    ConfigurationError,
    create_redis_cluster,
    parse_cluster_nodes,
)
from resilient_cache.settings import DEFAULT_STAGES


def build(**options):
    return create_redis_cluster(autoload=False, **options)


class TestParseClusterNodes:
    def test_comma_list(self) -> None:
        assert parse_cluster_nodes("redis-1:6379,redis-2:6380") == [
            ClusterNode("redis-1", 6379),
            ClusterNode("redis-2", 6380),
        ]

    def test_spaces_default_port_and_ipv6(self) -> None:
        assert parse_cluster_nodes(" a , b:7000 [::1]:7001") == [
            ClusterNode("a", 6379),
            ClusterNode("b", 7000),
            ClusterNode("::1", 7001),
        ]

    def test_bad_port_names_variable_and_item(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            parse_cluster_nodes("redis-1:abc")
        assert str(info.value) == "REDIS_CLUSTER_NODES: 'redis-1:abc' has no valid port"

    @pytest.mark.parametrize("bad", ["h:0", "h:70000", "h:-1", ":6379", "ba/d:1"])
    def test_other_bad_items(self, bad: str) -> None:
        with pytest.raises(ConfigurationError, match="REDIS_CLUSTER_NODES"):
            parse_cluster_nodes(bad)


class TestSources:
    def test_cluster_nodes_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("REDIS_CLUSTER_NODES", "n1:7000,n2:7001")
        assert build().settings.cluster_nodes == [ClusterNode("n1", 7000), ClusterNode("n2", 7001)]

    def test_bad_environment_value_is_one_clear_error(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_CLUSTER_NODES", "redis-1:abc")
        with pytest.raises(ConfigurationError) as info:
            build()
        assert str(info.value) == "REDIS_CLUSTER_NODES: 'redis-1:abc' has no valid port"

    def test_numbered_nodes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("REDIS_NODE_2_HOST", "second")
        monkeypatch.setenv("REDIS_NODE_2_PORT", "7002")
        monkeypatch.setenv("REDIS_NODE_1_HOST", "first")
        monkeypatch.setenv("REDIS_NODE_1_PORT", "7001")
        monkeypatch.setenv("REDIS_NODE_3_HOST", "third")  # port defaults to 6379
        assert build().settings.cluster_nodes == [
            ClusterNode("first", 7001),
            ClusterNode("second", 7002),
            ClusterNode("third", 6379),
        ]

    def test_numbered_node_bad_port_names_its_variable(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_NODE_1_HOST", "first")
        monkeypatch.setenv("REDIS_NODE_1_PORT", "x")
        with pytest.raises(ConfigurationError, match=r"^REDIS_NODE_1_PORT: 'first:x'"):
            build()

    def test_kubernetes_service_links_are_not_nodes(self, monkeypatch) -> None:
        # A Service named redis-node-1 injects these; they are not the user's node settings.
        monkeypatch.setenv("REDIS_NODE_1_PORT", "tcp://10.0.0.7:6379")
        monkeypatch.setenv("REDIS_NODE_1_PORT_6379_TCP_ADDR", "10.0.0.7")
        monkeypatch.setenv("REDIS_CLUSTER_NODES", "listed:7000")
        assert build().settings.cluster_nodes == [ClusterNode("listed", 7000)]

    def test_cluster_nodes_variable_wins_over_numbered(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_NODE_1_HOST", "numbered")
        monkeypatch.setenv("REDIS_CLUSTER_NODES", "listed:7000")
        assert build().settings.cluster_nodes == [ClusterNode("listed", 7000)]

    def test_precedence_kwargs_env_dotenv_toml(self, monkeypatch, tmp_path: Path) -> None:
        monkeypatch.chdir(tmp_path)
        Path("resilient_cache.toml").write_text(
            'cluster_nodes = "toml:1"\nhealth_check_timeout = 1.0\n'
            "health_check_interval = 1.0\nmax_connections = 1\n"
            "[retry]\nmax_retries = 1\ndelay = 0.5\n"
        )
        Path(".env").write_text(
            "REDIS_HEALTH_CHECK_TIMEOUT=2.0\nREDIS_HEALTH_CHECK_INTERVAL=2.0\n"
            "REDIS_RETRY__MAX_RETRIES=2\n"
        )
        monkeypatch.setenv("REDIS_HEALTH_CHECK_INTERVAL", "3.0")
        monkeypatch.setenv("REDIS_RETRY__MAX_RETRIES", "3")
        settings = build(max_retries=4).settings
        assert settings.cluster_nodes == [ClusterNode("toml", 1)]  # only TOML sets it
        assert settings.max_connections == 1  # TOML
        assert settings.health_check_timeout == 2.0  # .env beats TOML
        assert settings.health_check_interval == 3.0  # environment beats .env
        assert settings.retry.max_retries == 4  # keyword argument beats everything
        assert settings.retry.delay == 0.5  # sections merge across sources

    def test_pyproject_table(self, monkeypatch, tmp_path: Path) -> None:
        monkeypatch.chdir(tmp_path)
        Path("pyproject.toml").write_text(
            '[project]\nname = "app"\n[tool.resilient_cache]\ncluster_nodes = "pp:7000"\n'
            "[tool.resilient_cache.breaker]\nthreshold = 9\n"
        )
        settings = build().settings
        assert settings.cluster_nodes == [ClusterNode("pp", 7000)]
        assert settings.breaker.threshold == 9

    def test_pyproject_without_our_table_is_ignored(self, monkeypatch, tmp_path: Path) -> None:
        monkeypatch.chdir(tmp_path)
        Path("pyproject.toml").write_text('[project]\nname = "app"\n')
        assert build(nodes="a:1").settings.cluster_nodes == [ClusterNode("a", 1)]

    def test_explicit_config_file_must_exist(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match=r"config_file: file .* does not exist"):
            build(nodes="a:1", config_file=tmp_path / "missing.toml")

    def test_config_file_from_environment(self, monkeypatch, tmp_path: Path) -> None:
        path = tmp_path / "elsewhere.toml"
        path.write_text("[breaker]\nthreshold = 7\n")
        monkeypatch.setenv("REDIS_CONFIG_FILE", str(path))
        assert build(nodes="a:1").settings.breaker.threshold == 7

    def test_invalid_toml_names_the_file(self, monkeypatch, tmp_path: Path) -> None:
        monkeypatch.chdir(tmp_path)
        Path("resilient_cache.toml").write_text("[retry\nmax_retries = 1\n")
        with pytest.raises(ConfigurationError, match=r"^resilient_cache.toml: not valid TOML"):
            build(nodes="a:1")

    def test_undecodable_section_variable_is_a_configuration_error(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_RETRY", "abc")
        with pytest.raises(ConfigurationError, match=r"^REDIS_RETRY: could not parse"):
            build(nodes="a:1")

    def test_misspelt_stage_variable_is_an_error(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_RETRY__MAX_RETRIS", "9")
        with pytest.raises(
            ConfigurationError, match=r"^REDIS_RETRY__MAX_RETRIS / retry\.max_retris"
        ):
            build(nodes="a:1")

    def test_unrelated_redis_variables_are_ignored(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_HOST", "whatever")
        monkeypatch.setenv("REDIS_SOMETHING__ELSE", "x")
        monkeypatch.setenv("REDIS_VERSION", "7")
        assert build(nodes="a:1").settings.cluster_nodes == [ClusterNode("a", 1)]


class TestValidation:
    def test_negative_max_retries_names_the_field(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_RETRY__MAX_RETRIES", "-1")
        with pytest.raises(ConfigurationError) as info:
            build(nodes="a:1")
        assert str(info.value).startswith("REDIS_RETRY__MAX_RETRIES / retry.max_retries:")
        assert "max_retries" in str(info.value)

    def test_shortcut_names_are_validated_too(self) -> None:
        with pytest.raises(ConfigurationError, match=r"retry\.max_retries"):
            build(nodes="a:1", max_retries=-3)

    def test_unknown_keyword_option(self) -> None:
        with pytest.raises(ConfigurationError, match="unknown option 'max_retry'"):
            build(nodes="a:1", max_retry=3)

    def test_several_problems_are_all_reported(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_BREAKER__THRESHOLD", "0")
        monkeypatch.setenv("REDIS_HEALTH_CHECK_TIMEOUT", "never")
        with pytest.raises(ConfigurationError) as info:
            build(nodes="a:1")
        assert len(info.value.problems) == 2
        assert any("REDIS_BREAKER__THRESHOLD" in p for p in info.value.problems)
        assert any("REDIS_HEALTH_CHECK_TIMEOUT" in p for p in info.value.problems)

    def test_reserved_redis_options_are_refused_with_reason(self) -> None:
        with pytest.raises(ConfigurationError, match="retry stage"):
            build(nodes="a:1", redis_options={"retry_on_timeout": True})

    def test_no_nodes_at_all(self) -> None:
        with pytest.raises(ConfigurationError, match="REDIS_CLUSTER_NODES: no cluster node"):
            build()


class TestStagesSetting:
    def test_default_order(self) -> None:
        assert build(nodes="a:1").settings.stages == list(DEFAULT_STAGES)

    def test_comma_list(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_STAGES", "retry, breaker")
        assert build(nodes="a:1").settings.stages == ["retry", "breaker"]

    def test_json_list(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_STAGES", '["breaker", "retry"]')
        assert build(nodes="a:1").settings.stages == ["breaker", "retry"]

    def test_unknown_stage_lists_the_existing_ones(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_STAGES", "retry,retyr")
        with pytest.raises(ConfigurationError) as info:
            build(nodes="a:1")
        message = str(info.value)
        assert message.startswith("REDIS_STAGES: unknown stage 'retyr'")
        for name in DEFAULT_STAGES:
            assert name in message

    def test_duplicate_stage(self) -> None:
        with pytest.raises(ConfigurationError, match="listed twice"):
            build(nodes="a:1", stages=["retry", "retry"])


class TestSecrets:
    def test_password_never_in_repr_or_settings_dump(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_PASSWORD", "hunter2-secret")
        client = build(nodes="a:1")
        assert client.settings.password.get_secret_value() == "hunter2-secret"
        for text in (repr(client), repr(client.settings), str(client.settings.model_dump())):
            assert "hunter2-secret" not in text

    def test_url_is_secret_and_bad_url_error_does_not_echo_it(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_URL", "nope://user:hunter2-secret@host:1")
        with pytest.raises(ConfigurationError) as info:
            build()
        assert "hunter2-secret" not in str(info.value)
        assert str(info.value).startswith("REDIS_URL:")

    def test_invalid_secret_value_is_not_echoed(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_RETRY__DELAY", "hunter2-secret")
        with pytest.raises(ConfigurationError) as info:
            build(nodes="a:1")
        assert "hunter2-secret" not in str(info.value)

    def test_standalone_backend_chosen_from_url(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_URL", "redis://:pw@localhost:6390/0")
        client = build()
        assert client.backend.name == "standalone"
        assert "routing" not in client.active_stages  # nothing to route on one node


def error_of(**options) -> str:
    """The message of the ConfigurationError a build raises; fails on any other outcome."""
    with pytest.raises(ConfigurationError) as info:
        build(**options)
    message = str(info.value)
    assert "\n" not in message
    return message


class TestHugeAndTinyNumbers:
    @pytest.mark.parametrize("value", ["10**30", "1000000000000000000000000000000", "1e400"])
    def test_max_connections(self, monkeypatch, value: str) -> None:
        monkeypatch.setenv("REDIS_MAX_CONNECTIONS", value)
        assert error_of(nodes="a:1").startswith("REDIS_MAX_CONNECTIONS: ")

    @pytest.mark.parametrize("value", ["10**30", "1000000000000000000000000000000"])
    def test_latency_window_blames_the_variable_not_the_plugin(self, monkeypatch, value) -> None:
        monkeypatch.setenv("REDIS_METRICS__LATENCY_WINDOW", value)
        message = error_of(nodes="a:1")
        assert message.startswith("REDIS_METRICS__LATENCY_WINDOW / metrics.latency_window: ")
        assert "plugin" not in message

    def test_breaker_window_size_is_refused_at_build_time(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_BREAKER__WINDOW_SIZE", "1000000000000000000000000000000")
        message = error_of(nodes="a:1")
        assert message.startswith("REDIS_BREAKER__WINDOW_SIZE / breaker.window_size: ")
        assert "less than or equal to 100000" in message

    @pytest.mark.parametrize("value", ["1e-9", "0.05", "nan", "inf", "-1", "86401"])
    def test_health_check_interval_has_a_sane_range(self, monkeypatch, value: str) -> None:
        monkeypatch.setenv("REDIS_HEALTH_CHECK_INTERVAL", value)
        assert error_of(nodes="a:1").startswith("REDIS_HEALTH_CHECK_INTERVAL: ")

    @pytest.mark.parametrize("value", ["0", "0.1", "30", "86400"])
    def test_health_check_interval_zero_still_turns_it_off(self, monkeypatch, value) -> None:
        monkeypatch.setenv("REDIS_HEALTH_CHECK_INTERVAL", value)
        assert build(nodes="a:1").settings.health_check_interval == float(value)


def _numeric_fields() -> list[tuple[str, object]]:
    """(environment variable, FieldInfo) of every int/float setting, core and built-in stages."""
    from pydantic import BaseModel

    model = type(build(nodes="a:1").settings)
    found = []

    def visit(prefix: str, fields) -> None:
        for name, info in fields.items():
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                visit(f"{prefix}{name.upper()}__", kind.model_fields)
            elif kind in (int, float, int | None, float | None):
                found.append((f"{prefix}{name.upper()}", info))

    visit("REDIS_", model.model_fields)
    return found


NUMERIC_FIELDS = _numeric_fields()


class TestEveryNumberHasARange:
    def test_there_are_numbers_to_check(self) -> None:
        names = {name for name, _ in NUMERIC_FIELDS}
        assert {"REDIS_MAX_CONNECTIONS", "REDIS_BREAKER__WINDOW_SIZE"} <= names
        assert "REDIS_METRICS__LATENCY_WINDOW" in names

    @pytest.mark.parametrize(("variable", "info"), NUMERIC_FIELDS, ids=lambda v: str(v)[:40])
    def test_lower_and_upper_bound(self, variable: str, info) -> None:
        import annotated_types as at

        bounds = {type(m) for m in info.metadata}
        assert bounds & {at.Ge, at.Gt}, f"{variable} has no lower bound"
        assert bounds & {at.Le, at.Lt}, f"{variable} has no upper bound"

    @pytest.mark.parametrize(("variable", "info"), NUMERIC_FIELDS, ids=lambda v: str(v)[:40])
    def test_range_is_documented(self, variable: str, info) -> None:
        docs = Path(__file__).parents[2] / "docs" / "configuration.md"
        rows = [x for x in docs.read_text().splitlines() if x.startswith("|")]
        line = next((x for x in rows if f"`{variable}`" in x), None)
        assert line is not None, f"{variable} is not in docs/configuration.md"
        upper = next(m for m in info.metadata if hasattr(m, "le") or hasattr(m, "lt"))
        limit = getattr(upper, "le", None) or getattr(upper, "lt", None)
        shown = {f"{limit:,}", f"{limit:,g}", f"{limit:g}", str(limit)}
        if isinstance(limit, int) and limit >= 2**20 and limit & (limit - 1) == 0:
            shown.add(f"2^{limit.bit_length() - 1}")
        assert any(text in line for text in shown), f"{variable}: upper bound not in: {line}"


class TestRedisOptions:
    def test_negative_max_connections_names_the_key(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_REDIS_OPTIONS", '{"max_connections": -3}')
        assert error_of(nodes="a:1").startswith("REDIS_REDIS_OPTIONS.max_connections: ")

    def test_wrong_type_is_refused_at_build_time(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_REDIS_OPTIONS", '{"socket_timeout": "abc"}')
        message = error_of(nodes="a:1")
        assert message.startswith("REDIS_REDIS_OPTIONS.socket_timeout: ")
        assert "abc" not in message  # values are never echoed

    def test_unknown_key_lists_close_matches(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_REDIS_OPTIONS", '{"socket_timout": 5}')
        message = error_of(nodes="a:1")
        assert message.startswith("REDIS_REDIS_OPTIONS.socket_timout: ")
        assert "redis.asyncio.RedisCluster has no option 'socket_timout'" in message
        assert "close matches: socket_timeout" in message

    def test_unknown_key_without_close_match(self) -> None:
        message = error_of(nodes="a:1", redis_options={"zzz": 5})
        assert "has no option 'zzz'" in message
        assert "see the keyword arguments of redis.asyncio.RedisCluster" in message

    def test_good_options_pass_coerced(self, monkeypatch) -> None:
        monkeypatch.setenv(
            "REDIS_REDIS_OPTIONS",
            '{"socket_timeout": "2.5", "socket_keepalive": true, "max_connections": 25}',
        )
        options = build(nodes="a:1").settings.redis_options
        assert options == {"socket_timeout": 2.5, "socket_keepalive": True, "max_connections": 25}

    def test_nested_variable_is_named(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_REDIS_OPTIONS__SOCKET_TIMEOUT", "abc")
        assert error_of(nodes="a:1").startswith("REDIS_REDIS_OPTIONS__SOCKET_TIMEOUT: ")

    def test_keyword_argument_is_named_as_such(self) -> None:
        message = error_of(nodes="a:1", redis_options={"health_check_interval": -1})
        assert message.startswith("redis_options.health_check_interval (keyword argument): ")

    def test_cluster_has_database_zero_only(self) -> None:
        message = error_of(nodes="a:1", redis_options={"db": 3})
        assert message.startswith("redis_options.db (keyword argument): a cluster has database 0")
        assert build(nodes="a:1", redis_options={"db": 0}).settings.redis_options == {"db": 0}

    def test_standalone_takes_redis_options(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_URL", "redis://localhost:6390/0")
        assert build(redis_options={"single_connection_client": True})
        # A redis:// URL makes a plain TCP connection: TLS options would fail at connect.
        monkeypatch.setenv("REDIS_REDIS_OPTIONS", '{"ssl_keyfile": "k.pem"}')
        message = error_of()
        assert message.startswith("REDIS_REDIS_OPTIONS.ssl_keyfile: a redis:// connection has")

    def test_object_options_only_in_code(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_REDIS_OPTIONS", '{"credential_provider": "me"}')
        assert "takes a Python object" in error_of(nodes="a:1")

    @pytest.mark.parametrize("key", ["host", "port", "read_from_replicas", "reinitialize_steps"])
    def test_options_the_client_sets_are_refused_with_the_reason(self, monkeypatch, key) -> None:
        monkeypatch.setenv("REDIS_REDIS_OPTIONS", f'{{"{key}": 1}}')
        message = error_of(nodes="a:1")
        assert message.startswith(f"REDIS_REDIS_OPTIONS: {key!r} cannot be set here: ")

    def test_not_a_json_object(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_REDIS_OPTIONS", "[1, 2]")
        assert error_of(nodes="a:1").startswith("REDIS_REDIS_OPTIONS: ")


class TestPorts:
    @pytest.mark.parametrize("port", ["\u00b2", "\uff17\uff10\uff10\uff10", "\u0667", "99999"])
    def test_numbered_port_only_ascii_digits(self, monkeypatch, port: str) -> None:
        monkeypatch.setenv("REDIS_NODE_1_HOST", "first")
        monkeypatch.setenv("REDIS_NODE_1_PORT", port)
        assert error_of().startswith("REDIS_NODE_1_PORT: ")

    @pytest.mark.parametrize("port", ["\u00b2", "\uff17\uff10\uff10\uff10", "\u0667"])
    def test_cluster_nodes_port_only_ascii_digits(self, monkeypatch, port: str) -> None:
        monkeypatch.setenv("REDIS_CLUSTER_NODES", f"a:{port}")
        assert error_of() == f"REDIS_CLUSTER_NODES: 'a:{port}' has no valid port"

    @pytest.mark.parametrize("item", [("h", "\uff17"), ("h", 0), ("h", 2**70), ("h", True)])
    def test_pairs_in_code(self, item) -> None:
        with pytest.raises(ConfigurationError, match=r"^nodes: .* has no valid port"):
            parse_cluster_nodes([item], where="nodes")

    def test_trailing_colon_is_not_the_default_port(self) -> None:
        with pytest.raises(ConfigurationError, match="has no valid port"):
            parse_cluster_nodes("h:")

    def test_url_port(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_URL", "redis://user:hunter2-secret@h:\uff17/0")
        message = error_of()
        assert message.startswith("REDIS_URL: not a valid redis://")
        assert "hunter2-secret" not in message


class TestHosts:
    @pytest.mark.parametrize(
        "value",
        ["[$$$]:7000", "[::1]garbage", "[]:7000", "bad!@#:1", "999.1.1.1:1", "::1:7000"],
    )
    def test_bad_cluster_nodes(self, monkeypatch, value: str) -> None:
        monkeypatch.setenv("REDIS_CLUSTER_NODES", value)
        assert error_of().startswith(f"REDIS_CLUSTER_NODES: {value!r} ")

    @pytest.mark.parametrize("host", ["bad host!@#", "", "  ", "[::1", "h/x", "-lead"])
    def test_numbered_host_is_checked(self, monkeypatch, host: str) -> None:
        monkeypatch.setenv("REDIS_NODE_1_HOST", host)
        monkeypatch.setenv("REDIS_NODE_1_PORT", "7000")
        assert error_of().startswith("REDIS_NODE_1_HOST: ")

    @pytest.mark.parametrize(
        ("host", "expected"),
        [("::1", "::1"), ("[::1]", "::1"), ("10.0.0.1", "10.0.0.1"), ("redis_node.svc.", None)],
    )
    def test_numbered_good_hosts(self, monkeypatch, host: str, expected) -> None:
        monkeypatch.setenv("REDIS_NODE_1_HOST", host)
        assert build().settings.cluster_nodes == [ClusterNode(expected or host, 6379)]

    def test_pairs_and_nodes_in_code_are_checked(self) -> None:
        with pytest.raises(ConfigurationError, match=r"^nodes: 'bad host:1' has no valid host"):
            build(nodes=[("bad host", 1)])
        with pytest.raises(ConfigurationError, match=r"^nodes: 'x!:1' has no valid host"):
            build(nodes=[ClusterNode("x!", 1)])
        assert build(nodes=[("::1", 7000)]).settings.cluster_nodes == [ClusterNode("::1", 7000)]

    def test_good_items(self) -> None:
        assert parse_cluster_nodes("redis_1:1 [fe80::1%eth0]:2 a.b.c.:3 10.1.2.3") == [
            ClusterNode("redis_1", 1),
            ClusterNode("fe80::1%eth0", 2),
            ClusterNode("a.b.c.", 3),
            ClusterNode("10.1.2.3", 6379),
        ]


class TestClusterNodesAsJson:
    def test_json_list_of_strings(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_CLUSTER_NODES", '["127.0.0.1:7000", "[::1]:7001"]')
        assert build().settings.cluster_nodes == [
            ClusterNode("127.0.0.1", 7000),
            ClusterNode("::1", 7001),
        ]

    def test_bracketed_ipv6_is_still_not_json(self) -> None:
        assert parse_cluster_nodes("[::1]:7000") == [ClusterNode("::1", 7000)]

    @pytest.mark.parametrize("value", ['["a:1",', "[1, 2]", '["a:1", null]'])
    def test_bad_json(self, monkeypatch, value: str) -> None:
        monkeypatch.setenv("REDIS_CLUSTER_NODES", value)
        assert error_of().startswith("REDIS_CLUSTER_NODES: ")

    def test_json_item_is_checked_like_any_other(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_CLUSTER_NODES", '["a:\u00b2"]')
        assert error_of() == "REDIS_CLUSTER_NODES: 'a:\u00b2' has no valid port"


class TestWhereTheValueCameFrom:
    def test_toml_key_and_file(self, monkeypatch, tmp_path: Path) -> None:
        monkeypatch.chdir(tmp_path)
        Path("resilient_cache.toml").write_text(
            "max_connections = 1000000000000000000\n[breaker]\nwindow_size = 0\n"
        )
        with pytest.raises(ConfigurationError) as info:
            build(nodes="a:1")
        assert info.value.problems == [
            "max_connections in resilient_cache.toml: Input should be less than or equal to 100000",
            "breaker.window_size in resilient_cache.toml: "
            "Input should be greater than or equal to 1",
        ]

    def test_pyproject_table(self, monkeypatch, tmp_path: Path) -> None:
        monkeypatch.chdir(tmp_path)
        Path("pyproject.toml").write_text("[tool.resilient_cache.breaker]\nthreshold = 0\n")
        assert error_of(nodes="a:1").startswith(
            "tool.resilient_cache.breaker.threshold in pyproject.toml: "
        )

    def test_keyword_argument(self) -> None:
        assert error_of(nodes="a:1", max_connections=0).startswith(
            "max_connections (keyword argument): "
        )
        assert error_of(nodes="a:1", breaker={"window_size": 0}).startswith(
            "breaker.window_size (keyword argument): "
        )

    def test_environment_wins_over_the_file_it_overrides(self, monkeypatch, tmp_path) -> None:
        monkeypatch.chdir(tmp_path)
        Path("resilient_cache.toml").write_text("max_connections = 5\n")
        monkeypatch.setenv("REDIS_MAX_CONNECTIONS", "0")
        assert error_of(nodes="a:1").startswith("REDIS_MAX_CONNECTIONS: ")

    def test_whole_section_variable(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_RETRY", '{"max_retries": -1}')
        assert error_of(nodes="a:1").startswith("REDIS_RETRY / retry.max_retries: ")

    def test_check_across_fields_names_the_variables_set(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_RETRY__MAX_DELAY", "0.01")
        assert error_of(nodes="a:1").startswith("REDIS_RETRY__MAX_DELAY: max_delay (0.01)")

    def test_undecodable_list_in_a_section_names_its_variable(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_MEMORY__KEY_PREFIXES", "a,b")
        assert error_of(nodes="a:1").startswith(
            "REDIS_MEMORY__KEY_PREFIXES / memory.key_prefixes: could not parse"
        )

    def test_config_file_variable_naming_a_file_that_is_not_toml(self, monkeypatch, tmp_path):
        path = tmp_path / "settings.toml"
        path.write_bytes(b"\xff\xfe not toml")
        monkeypatch.setenv("REDIS_CONFIG_FILE", str(path))
        assert error_of(nodes="a:1").startswith(f"REDIS_CONFIG_FILE: {path}: not valid TOML")

    def test_config_file_name_too_long(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_CONFIG_FILE", "x" * 5000)
        assert error_of(nodes="a:1").startswith("REDIS_CONFIG_FILE: file ")


class TestOtherChecks:
    @pytest.mark.parametrize(
        ("url", "reason"),
        [
            ("http://u:hunter2-secret@h:1", "the scheme must be"),
            ("redis://u:hunter2-secret@h:0", "the port must be 1-65535"),
            ("redis://u:hunter2-secret@h?timeout=1", "unknown query parameter 'timeout'"),
            ("redis://u:hunter2-secret@h!:1", "bad host"),
            ("redis://u:hunter2-secret@h/x", "the path must be a database number"),
            ("unix://u:hunter2-secret@", "a unix:// URL needs a socket path"),
        ],
    )
    def test_url_that_redis_py_would_refuse_later(self, monkeypatch, url, reason) -> None:
        monkeypatch.setenv("REDIS_URL", url)
        message = error_of()
        assert message.startswith("REDIS_URL: not a valid redis://, rediss:// or unix:// URL")
        assert reason in message
        assert "hunter2-secret" not in message

    def test_client_name_redis_would_refuse(self, monkeypatch) -> None:
        monkeypatch.setenv("REDIS_CLIENT_NAME", "my app")
        assert error_of(nodes="a:1").startswith("REDIS_CLIENT_NAME: ")


class TestCommandLine:
    @pytest.mark.parametrize("command", ["config", "ping", "stats"])
    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("REDIS_MAX_CONNECTIONS", "1000000000000000000000000000000"),
            ("REDIS_NODE_1_PORT", "\u00b2"),
            ("REDIS_METRICS__LATENCY_WINDOW", "10**30"),
        ],
    )
    def test_exit_2_and_one_line(self, monkeypatch, capsys, command, variable, value) -> None:
        from resilient_cache.cli import EXIT_CONFIG, main

        monkeypatch.setenv("REDIS_PLUGINS_AUTOLOAD", "false")
        monkeypatch.setenv("REDIS_NODE_1_HOST", "127.0.0.1")
        monkeypatch.setenv(variable, value)
        assert main([command]) == EXIT_CONFIG
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1
        assert lines[0].startswith(f"resilient-cache: configuration error: {variable}")
