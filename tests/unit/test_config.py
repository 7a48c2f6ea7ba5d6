"""Config parsing: typed, strict, secrets from the environment, one-line errors naming the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from therouter.cli import WORKERS_ENV, with_workers, worker_settings
from therouter.config import ConfigError, load_settings, parse_settings, usd_to_nano
from therouter.metering import MeterOptions

ROOT = Path(__file__).resolve().parents[2]


def shipped() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / "therouter.yaml").read_text())  # type: ignore[no-any-return]


def test_shipped_config_has_the_model_card() -> None:
    s = load_settings(ROOT / "config" / "therouter.yaml", env={})
    m = s.models["deepseek/deepseek-v3.2"]
    assert (m.context_length, m.max_output_tokens) == (131072, 32768)
    assert (m.pricing.input, m.pricing.cached_input, m.pricing.output) == (960_000_000, 960_000_000, 2_880_000_000)
    # the seed's parameters, and what DeepSeek's chat API honours besides (hosted); the self-hosted ones honour more
    assert set(m.supported_parameters) == {"temperature", "max_tokens", "top_p", "tools", "tool_choice",
                                           "response_format", "stop", "presence_penalty", "frequency_penalty",
                                           "logprobs", "top_logprobs"}
    assert {"seed", "n", "logit_bias"} <= set(m.deployments[1].parameters or ())
    assert [d.provider for d in m.deployments] == ["deepseek", "vllm-local", "sglang-local"]
    assert {"deepseek/deepseek-v4-flash", "deepseek/deepseek-v4-pro"} <= set(s.models)
    assert s.providers["deepseek"].api_key is None  # DEEPSEEK_API_KEY unset: loads anyway
    assert s.store.redis_url == "redis://127.0.0.1:6379/0"


def test_env_substitution_and_api_key_env() -> None:
    s = load_settings(ROOT / "config" / "therouter.yaml",
                      env={"REDIS_URL": "redis://10.0.0.1:7000/1", "DEEPSEEK_API_KEY": "sk-secret",
                           "THEROUTER_ADMIN_KEY": "adm"})
    assert s.store.redis_url == "redis://10.0.0.1:7000/1"
    assert s.providers["deepseek"].api_key is not None
    assert s.providers["deepseek"].api_key.get_secret_value() == "sk-secret"
    assert "sk-secret" not in repr(s)  # SecretStr never prints
    assert s.admin_key is not None and s.admin_key.get_secret_value() == "adm"


@pytest.mark.parametrize("value,nano", [(0.96, 960_000_000), ("2.88", 2_880_000_000), (0.0028, 2_800_000),
                                        (0, 0), ("0.000000001", 1)])
def test_prices_are_exact_integers(value: Any, nano: int) -> None:
    assert usd_to_nano(value) == nano


@pytest.mark.parametrize("value", ["0.0000000001", -1, "abc", True])
def test_bad_prices_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        usd_to_nano(value)


def test_routing_section_is_typed_and_strict() -> None:
    raw = shipped()
    raw["routing"] = {"max_attempts": 2, "breaker": {"consecutive_failures": 3}, "prefix_affinity": ["*"]}
    s = parse_settings(raw, "x.yaml", env={})
    assert s.routing.max_attempts == 2 and s.routing.breaker.consecutive_failures == 3
    assert s.routing.affinity_for("anything")
    raw["routing"] = {"max_attemps": 2}
    with pytest.raises(ConfigError, match=r"x.yaml: routing.max_attemps: unknown key"):
        parse_settings(raw, "x.yaml", env={})


def test_unset_variable_without_default_is_named() -> None:
    raw = shipped()
    raw["store"]["redis_url"] = "${NOPE_NOT_SET}"
    with pytest.raises(ConfigError, match=r"store.redis_url: is empty"):
        parse_settings(raw, "x.yaml", env={})


def test_metering_section_is_typed_strict_and_wired_into_the_meter() -> None:
    assert MeterOptions.from_settings(parse_settings(shipped(), "x.yaml", env={})) == MeterOptions()  # same defaults
    raw = shipped()
    raw["metering"] = {"heartbeat_interval": 0.5, "checkpoint_interval": 0.25, "instance_lost_after": 2}
    o = MeterOptions.from_settings(parse_settings(raw, "x.yaml", env={}))
    assert (o.heartbeat_interval, o.checkpoint_interval, o.instance_lost_after) == (0.5, 0.25, 2)
    raw["metering"] = {"heartbeat_interval": 5, "instance_lost_after": 6}  # one late heartbeat would look lost
    with pytest.raises(ConfigError, match=r"x.yaml: metering: instance_lost_after must be at least twice"):
        parse_settings(raw, "x.yaml", env={})
    for bad in ({"checkpoint_interval": 0}, {"heartbeat_intervall": 5}):
        raw["metering"] = bad
        with pytest.raises(ConfigError, match=r"x.yaml: metering\.(checkpoint_interval|heartbeat_intervall)"):
            parse_settings(raw, "x.yaml", env={})


def test_upstream_read_limits() -> None:
    s = parse_settings(shipped(), "x.yaml", env={})
    assert s.server.max_upstream_event_bytes == 1024 * 1024  # an SSE line / event
    assert s.server.max_upstream_body_bytes == 32 * 1024 * 1024  # a non-stream body, after content-decoding
    raw = shipped()
    raw["server"] = {**raw["server"], "max_upstream_event_bytes": 65536, "max_upstream_body_bytes": 1 << 20}
    s = parse_settings(raw, "x.yaml", env={})
    assert (s.server.max_upstream_event_bytes, s.server.max_upstream_body_bytes) == (65536, 1 << 20)
    raw["server"]["max_upstream_event_bytes"] = 10
    with pytest.raises(ConfigError, match=r"server.max_upstream_event_bytes"):
        parse_settings(raw, "x.yaml", env={})


def test_store_takes_a_redis_cluster_url() -> None:
    raw = shipped()
    for url in ("redis+cluster://10.0.0.1:7000", "rediss+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7001/0"):
        raw["store"]["redis_url"] = url
        assert parse_settings(raw, "x.yaml", env={}).store.redis_url == url
    for url, needle in (("redis+cluster://10.0.0.1:7000/2", "no database number"),
                        ("redis+cluster://10.0.0.1", "host:port"), ("redis+cluster://h:1,h2", "host:port"),
                        ("redis+cluster://h:7000?ssl_cert_reqs=none", "no options"), ("memcached://h:1", "redis://")):
        raw["store"]["redis_url"] = url
        with pytest.raises(ConfigError, match=r"store.redis_url: .*" + needle):
            parse_settings(raw, "x.yaml", env={})
    raw = shipped()
    raw["store"]["key_prefix"] = "tr:{x}:"  # would take the hash tags that keep each script in one cluster slot
    with pytest.raises(ConfigError, match=r"store.key_prefix: must not contain"):
        parse_settings(raw, "x.yaml", env={})


def test_slow_client_limits_are_typed() -> None:
    s = parse_settings(shipped(), "x.yaml", env={})
    assert (s.server.header_timeout, s.server.body_timeout, s.server.max_concurrency) == (10.0, 60.0, 1024)
    for bad in ({"header_timeout": 0}, {"body_timeout": -1}, {"max_concurrency": 0}):
        raw = shipped()
        raw.setdefault("server", {}).update(bad)
        with pytest.raises(ConfigError, match=r"server\." + next(iter(bad))):
            parse_settings(raw, "x.yaml", env={})


def test_shipped_aliases_resolve_to_canonical_ids() -> None:
    s = load_settings(ROOT / "config" / "therouter.yaml", env={})
    assert s.canonical("deepseek-chat") == "deepseek/deepseek-v3.2"
    assert s.canonical("deepseek-v4-flash") == "deepseek/deepseek-v4-flash"
    assert s.canonical("deepseek/deepseek-v4-pro") == "deepseek/deepseek-v4-pro"  # an id is its own name
    assert s.canonical("gpt-4o") == "gpt-4o"  # unknown names are left for the caller's 404
    assert set(s.aliases.values()) <= set(s.models)


@pytest.mark.parametrize("aliases,error", [
    (["deepseek/deepseek-v4-pro"], r"alias 'deepseek/deepseek-v4-pro' is already a model id"),
    (["x", "x"], r"alias 'x' is already an alias of 'deepseek/deepseek-v3.2'"),
    ([" x"], r"non-empty name without surrounding spaces"),
    ([""], r"non-empty name"),
])
def test_an_alias_that_collides_is_a_config_error(aliases: list[str], error: str) -> None:
    raw = shipped()
    raw["models"]["deepseek/deepseek-v3.2"]["aliases"] = aliases
    with pytest.raises(ConfigError, match=r"x.yaml: models.deepseek/deepseek-v3.2.aliases.\d: .*" + error):
        parse_settings(raw, "x.yaml", env={})


def test_an_alias_of_one_model_colliding_with_an_alias_of_another_is_a_config_error() -> None:
    raw = shipped()
    raw["models"]["deepseek/deepseek-v4-pro"]["aliases"] = ["deepseek-chat"]  # shipped on v3.2 already
    with pytest.raises(ConfigError, match=r"alias 'deepseek-chat' is already an alias of 'deepseek/deepseek-v3.2'"):
        parse_settings(raw, "x.yaml", env={})


@pytest.mark.parametrize("kind,mode,assembles", [
    ("deepseek", None, True), ("openai", None, False), ("vllm", None, False), ("sglang", None, False),
    ("deepseek", "passthrough", False), ("vllm", "stream", True), ("openai", "stream", True),
])
def test_non_stream_mode_defaults_per_kind_and_is_switchable(kind: str, mode: str | None, assembles: bool) -> None:
    raw = shipped()
    raw["providers"]["p"] = {"kind": kind, "base_url": "http://127.0.0.1:9/v1", **({"non_stream": mode} if mode else {})}
    assert parse_settings(raw, "x.yaml", env={}).providers["p"].assembles is assembles
    raw["providers"]["p"]["non_stream"] = "buffered"
    with pytest.raises(ConfigError, match=r"providers.p.non_stream"):
        parse_settings(raw, "x.yaml", env={})


def test_pattern_aliases_lose_to_exact_aliases_and_ids_and_the_longest_pattern_wins() -> None:
    raw = shipped()
    raw["models"]["deepseek/deepseek-v3.2"]["aliases"] = ["claude-*", "claude-opus-4-7-exact"]
    raw["models"]["deepseek/deepseek-v4-pro"]["aliases"] = ["claude-opus-*", "deepseek/*"]
    s = parse_settings(raw, "x.yaml", env={})
    assert s.canonical("claude-sonnet-4-5") == "deepseek/deepseek-v3.2"
    assert s.canonical("claude-3-7-sonnet-latest") == "deepseek/deepseek-v3.2"
    assert s.canonical("claude-opus-4-7-20260101") == "deepseek/deepseek-v4-pro"  # the longer pattern
    assert s.canonical("claude-opus-4-7-exact") == "deepseek/deepseek-v3.2"  # an exact alias beats any pattern
    assert s.canonical("deepseek/deepseek-v4-flash") == "deepseek/deepseek-v4-flash"  # a real id beats a pattern
    assert s.canonical("deepseek/unknown") == "deepseek/deepseek-v4-pro"
    assert s.canonical("gpt-4o") == "gpt-4o"
    assert "claude-*" not in s.aliases  # a pattern is not a name: /v1/models does not list it


def test_the_shipped_config_maps_claude_ids_to_deepseek() -> None:
    s = load_settings(ROOT / "config" / "therouter.yaml", env={})
    for mid in ("claude-sonnet-4-5", "claude-opus-4-7", "claude-sonnet-4-5-20250929", "claude-3-5-haiku-latest"):
        assert s.canonical(mid) == "deepseek/deepseek-v3.2"
    assert s.canonical("anthropic/claude-opus-4.7") == "anthropic/claude-opus-4.7"


def test_workers_set_each_workers_share_of_a_rate_limit_while_redis_is_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = shipped()
    raw["server"]["workers"] = 4
    assert MeterOptions.from_settings(parse_settings(raw, "x.yaml", env={})).local_limit_divisor == 4
    # `serve --workers N` wins over server.workers, in every worker process it starts (they load the config anew)
    path = tmp_path / "therouter.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("THEROUTER_CONFIG", str(path))
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert MeterOptions.from_settings(worker_settings()).local_limit_divisor == 4
    monkeypatch.setenv(WORKERS_ENV, "3")
    s = worker_settings()
    assert s.server.workers == 3 and MeterOptions.from_settings(s).local_limit_divisor == 3
    assert s.model_copy(update={"server": s.server.model_copy(update={"workers": 4})}) == load_settings(path)
    with pytest.raises(ConfigError, match=r"--workers: Input should be greater than or equal to 1"):
        with_workers(s, 0)
