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
