"""Typed configuration: YAML with ``${VAR}`` / ``${VAR:-default}`` substitution.

Settings read the environment only here (``${VAR}`` substitution, ``api_key_env``, ``THEROUTER_ADMIN_KEY``,
``OTEL_EXPORTER_OTLP_ENDPOINT``), through an injectable mapping. Outside the settings, ``os.environ`` is read by the
command line (``THEROUTER_CONFIG``; ``serve --workers`` passes its workers the config path, the worker count and
prometheus-client's ``PROMETHEUS_MULTIPROC_DIR``), ``observability.multiproc_dir`` and the demo. A bad config raises :class:`ConfigError` naming the file, the key
path and what is wrong, in one line.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = "config/therouter.yaml"
ProviderKind = Literal["deepseek", "vllm", "sglang", "openai", "anthropic", "openai_compatible"]
HOSTED_KINDS = ("deepseek", "openai", "anthropic")
NANO = 10**9  # money unit: nano-USD; prices are integers of nano-USD per 1M tokens
# the dearest price accepted (USD per 1M tokens): far above any real model, and small enough that a worst-case
# reservation stays exact in the budget script's arithmetic (2**53 nano-USD)
MAX_PRICE_USD = Decimal(1_000_000)


class ConfigError(Exception):
    """One line: file, key path, problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(64 * 1024, ge=1024)  # all request headers together (names + values): else 431
    max_json_depth: int = Field(64, ge=4, le=1024)
    upstream_client: Literal["aiohttp", "httpx", "h1"] = "h1"
    # an upstream SSE line / event, and a non-stream upstream body (after content-decoding), over these end the
    # attempt as a provider fault; the gateway never holds more of them in memory
    max_upstream_event_bytes: int = Field(1024 * 1024, ge=1024)
    max_upstream_body_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024)
    request_deadline: float = Field(300.0, gt=0)  # seconds, one overall deadline for a non-stream request
    stream_write_timeout: float = Field(60.0, gt=0)  # a client that reads nothing for this long is disconnected
    model_check_interval: float = Field(600.0, ge=0)  # seconds between GET /models checks of hosted providers; 0 = off
    log_format: Literal["text", "json"] = "text"  # `serve --log-format` overrides it
    metrics_token: SecretStr | None = None  # set: GET /metrics needs `Authorization: Bearer <token>`

    @field_validator("metrics_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value() else None  # "${METRICS_TOKEN:-}" unset: no token
    # slow clients (see server.py): a connection must deliver a request's headers within header_timeout seconds
    # of connecting or of the request's first byte, and its body within body_timeout of the headers; else 408 and
    # the connection is closed. Requests being served by one worker at once are capped at max_concurrency (503 +
    # Retry-After beyond it, at once, instead of an unbounded queue); /health, /ready and /metrics are not counted.
    header_timeout: float = Field(10.0, gt=0)
    body_timeout: float = Field(60.0, gt=0)
    max_concurrency: int = Field(1024, ge=1)


class StoreConfig(_Strict):
    redis_url: str
    key_prefix: str = "tr:"
    socket_timeout: float = Field(0.25, gt=0)
    connect_timeout: float = Field(0.25, gt=0)
    key_cache_seconds: float = Field(60.0, ge=0)
    max_connections: int = Field(32, ge=1, le=10_000)  # per worker; callers beyond it wait for a free one
    pool_timeout: float = Field(1.0, gt=0)  # how long a caller may wait for a free connection

    @field_validator("redis_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v:
            raise ValueError("is empty (set REDIS_URL or write a redis:// URL)")
        if not v.startswith(("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")):
            raise ValueError("must start with redis://, rediss://, unix:// or, for a Redis Cluster, redis+cluster:// "
                             "or rediss+cluster://")
        if "+cluster://" in v:
            _cluster_nodes(v)
        return v

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if "{" in v or "}" in v:  # the hash tags that keep each script's keys in one Cluster slot come after it
            raise ValueError("must not contain { or }")
        return v


def _cluster_nodes(url: str) -> None:
    """A cluster URL names at least one host:port seed node, database 0 only, and no query options."""
    rest = url.split("://", 1)[1]
    hosts, _, path = rest.rpartition("@")[2].partition("/")
    if path not in ("", "0") or "?" in rest:
        raise ValueError("a Redis Cluster URL takes no database number (other than /0) and no options")
    for hp in hosts.split(","):
        host, sep, port = hp.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a Redis Cluster URL lists seed nodes as host:port[,host:port...], got {hp.strip()!r}")


class Timeouts(_Strict):
    connect: float = Field(3.0, gt=0)
    first_token: float = Field(30.0, gt=0)  # counts data events only, never keep-alive comments
    idle: float = Field(60.0, gt=0)  # gap between data events
    total: float = Field(600.0, gt=0)  # absolute cap for one attempt


class ProviderConfig(_Strict):
    kind: ProviderKind
    base_url: str
    api_key_env: str | None = None
    api_key: SecretStr | None = None  # resolved from api_key_env at load; may be written inline via ${VAR}
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(512, ge=1)
    on_client_disconnect: Literal["finish", "cancel"] | None = None  # default: finish if hosted, cancel if self-hosted
    # how a client's non-stream request is sent: `stream` (upstream streams, the gateway assembles one answer, so the
    # first-token / idle timeouts and the first-chunk gate bound it) or `passthrough` (the JSON body, bounded by
    # `total`). Default: stream for kind deepseek, passthrough for self-hosted kinds and kind openai.
    non_stream: Literal["stream", "passthrough"] | None = None
    health_path: str | None = None  # default per kind
    hosted: bool | None = None  # default: deepseek/openai/anthropic hosted; vllm/sglang/openai_compatible self-hosted
    fim_base_url: str | None = None  # DeepSeek: defaults to <base_url>/beta

    @field_validator("base_url")
    @classmethod
    def _base(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @property
    def is_hosted(self) -> bool:
        return self.hosted if self.hosted is not None else self.kind in HOSTED_KINDS

    @property
    def disconnect_policy(self) -> str:
        if self.on_client_disconnect:
            return self.on_client_disconnect
        return "finish" if self.is_hosted else "cancel"

    @property
    def assembles(self) -> bool:
        """A client's non-stream request is sent upstream as a stream and assembled by the gateway."""
        mode = self.non_stream or ("stream" if self.kind == "deepseek" else "passthrough")
        return mode == "stream"


Capability = Literal["tools", "json_object", "json_schema", "fim", "vision", "reasoning"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class Modalities(_Strict):
    input: tuple[Literal["text", "image", "audio", "file"], ...] = ("text",)
    output: tuple[Literal["text", "image", "audio"], ...] = ("text",)


class Pricing(_Strict):
    """USD per 1M tokens, kept exactly as integers of nano-USD per 1M tokens.

    ``cache_write``: what a provider that bills prompt-cache creation (Anthropic) charges per 1M tokens written to
    its cache; ``None`` where cache writes are not billed apart (they cost ``input``)."""

    input: int
    cached_input: int
    output: int
    cache_write: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _to_nano(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            # ValueError, not TypeError: pydantic reports only ValueError as a validation error naming the field
            msg = "must be a mapping {input, cached_input, output, cache_write?} in USD per 1M tokens"
            raise ValueError(msg)  # noqa: TRY004
        out = dict(data)
        if "cached_input" not in out and "input" in out:
            out["cached_input"] = out["input"]
        for k in ("input", "cached_input", "output", "cache_write"):
            if k in out and (k != "cache_write" or out[k] is not None):
                out[k] = usd_to_nano(out[k], k, MAX_PRICE_USD)
        return out


class Deployment(_Strict):
    provider: str
    model: str  # the upstream id, as the host names it
    priority: int = 0
    weight: int = Field(1, ge=0)
    capabilities: tuple[Capability, ...] = ()
    context_length: int | None = Field(None, ge=1)  # when the host serves a shorter window than the model card
    fim_tokens: tuple[str, str, str] | None = None  # (begin, hole, end) for self-hosted FIM built in the gateway
    cost: Pricing | None = None  # what this deployment costs the operator per 1M tokens (`provider.sort: price`)
    # the OpenAI parameters this host honours, where it differs from its model's supported_parameters (params.py)
    parameters: tuple[str, ...] | None = None
    # Anthropic: how the model is asked to think -- `adaptive` (Claude Opus 4.6 and later: the model decides, steered
    # by an effort) or `budget` (older models: `budget_tokens`) -- and the effort used when a request names none
    # (None: no thinking unless the request asks for it)
    thinking: Literal["adaptive", "budget"] = "adaptive"
    reasoning_effort: ReasoningEffort | None = None


def usd_to_nano(value: Any, what: str = "price", maximum: Decimal | int | None = None) -> int:
    """An amount of USD (a number or its decimal text) -> integer nano-USD. Raises ValueError naming ``what`` for
    anything else: bools, non-numbers, NaN, infinities, negatives, more than 9 decimals, more than ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError(f"{what} must be a number of USD")  # noqa: TRY004 - called by validators (see _to_nano)
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{what} must be a number of USD, got {str(value)[:40]!r}") from None
    if not d.is_finite():
        raise ValueError(f"{what} must be a finite number of USD")
    if d < 0:
        raise ValueError(f"{what} must not be negative")
    if maximum is not None and d > maximum:
        raise ValueError(f"{what} must be at most {maximum} USD")
    nano = d * NANO
    if nano != nano.to_integral_value():
        raise ValueError(f"{what} has more than 9 decimal places")
    return int(nano)


class ModelConfig(_Strict):
    context_length: int = Field(ge=1)
    # other names clients may use (e.g. `deepseek-chat`), resolved before routing; a name with `*` is a pattern
    # (e.g. `claude-*`): exact aliases and model ids win over patterns, and the longest matching pattern wins
    aliases: tuple[str, ...] = ()
    max_output_tokens: int = Field(ge=1)
    modalities: Modalities = Modalities()
    supported_parameters: tuple[str, ...] = ()
    pricing: Pricing
    deployments: tuple[Deployment, ...] = Field(min_length=1)
    created: int = 1735689600
    owned_by: str = "therouter"
    description: str | None = None


class BreakerPolicy(_Strict):
    """Per-deployment circuit breaker (Envoy-style outlier ejection, see routing/breaker.py)."""

    consecutive_failures: int = Field(5, ge=1)  # attempt failures in a row that open the circuit
    failure_ratio: float = Field(0.5, gt=0, le=1)  # ... or this share of failures in the window,
    ratio_window: float = Field(30.0, gt=0)  # seconds,
    ratio_min_requests: int = Field(20, ge=1)  # once the window holds at least this many outcomes
    base_ejection: float = Field(5.0, gt=0)  # seconds open after the first ejection; x N after the N-th
    max_ejection: float = Field(300.0, gt=0)
    decay: float = Field(60.0, gt=0)  # each this many seconds closed forgets one past ejection
    probe_timeout: float = Field(60.0, gt=0)  # a half-open probe that never reports frees its slot after this


class RoutingOptions(_Strict):
    """Routing knobs (config section `routing:`). Defaults follow Envoy: retry budget 20 % / min 3, jittered
    exponential backoff, consecutive-failure ejection growing with each ejection; the base ejection is short (5 s)
    because every half-open probe is a real request that falls back when it fails."""

    max_attempts: int = Field(3, ge=1, le=10)  # per model of the request (`models` gives each model its own)
    backoff_base: float = Field(0.1, ge=0)  # full jitter: uniform(0, min(backoff_max, base * 2**k))
    backoff_max: float = Field(2.0, ge=0)
    retry_after_cap: float = Field(10.0, ge=0)  # a longer upstream Retry-After is not waited for: fall back at once
    cooldown_max: float = Field(300.0, ge=0)  # a deployment's Retry-After cooldown is capped at this
    budget_percent: float = Field(0.2, ge=0, le=1)  # same-deployment retries <= max(budget_min, percent x in flight)
    budget_min: int = Field(3, ge=0)
    breaker: BreakerPolicy = BreakerPolicy()
    prefix_affinity: tuple[str, ...] = ()  # model ids ("*" = all) whose self-hosted replicas get sticky prefixes
    affinity_prefix_chars: int = Field(512, ge=1)  # the prompt prefix that is hashed
    affinity_max_imbalance: int = Field(8, ge=0)  # leave the sticky replica when it has this many more in flight
    ewma_alpha: float = Field(0.2, gt=0, le=1)  # measured latency / throughput smoothing
    stats_window: float = Field(60.0, gt=0)  # seconds of outcomes behind the admin error rate
    sync_interval: float = Field(1.0, gt=0)  # how stale a worker's copy of the shared drains/cooldowns may get
    # seconds between GET /health checks of self-hosted servers (routing/health.py): how soon a server that came
    # back is used again; hosted providers' model-list checks (server.model_check_interval) ride on the same tick
    health_check_interval: float = Field(10.0, gt=0)
    drain_ttl: float = Field(7 * 24 * 3600.0, gt=0)  # a drain lapses after this unless renewed
    max_models: int = Field(5, ge=1)  # entries allowed in a request's `models` list
    # a hint parameter (seed, penalties, user, ...) a deployment does not honour: dropped (and named in
    # x-therouter-dropped-params) or the deployment is skipped (400 naming it if none is left); see params.py
    unsupported_parameters: Literal["drop", "reject"] = "drop"

    def affinity_for(self, model_id: str) -> bool:
        return "*" in self.prefix_affinity or model_id in self.prefix_affinity


class MeteringConfig(_Strict):
    """Crash recovery (config section `metering:`): each gateway process heartbeats in Redis and checkpoints its
    requests in flight; a process silent for `instance_lost_after` is presumed lost and the survivors (or the
    process itself once restarted) settle what it had in flight as `gateway_lost`."""

    heartbeat_interval: float = Field(5.0, gt=0)  # seconds between heartbeats (and reaper passes)
    checkpoint_interval: float = Field(2.0, gt=0)  # seconds between checkpoints of streamed token counts
    instance_lost_after: float = Field(15.0, gt=0)  # a heartbeat older than this: the instance is lost

    @model_validator(mode="after")
    def _margin(self) -> MeteringConfig:
        if self.instance_lost_after < 2 * self.heartbeat_interval:
            raise ValueError("instance_lost_after must be at least twice heartbeat_interval (a live instance "
                             "missing one heartbeat must not be taken for lost)")
        return self


class Settings(_Strict):
    server: ServerConfig = ServerConfig()
    store: StoreConfig
    providers: dict[str, ProviderConfig] = Field(min_length=1)
    models: dict[str, ModelConfig] = Field(min_length=1)
    routing: RoutingOptions = RoutingOptions()
    metering: MeteringConfig = MeteringConfig()
    admin_key: SecretStr | None = None  # from THEROUTER_ADMIN_KEY
    otel_endpoint: str | None = None  # from OTEL_EXPORTER_OTLP_ENDPOINT: traces on (needs the `otel` extra)
    data_dir: str = ".therouter"  # journal and local state
    _aliases: dict[str, str] = PrivateAttr(default_factory=dict)  # alias -> canonical model id
    _patterns: tuple[tuple[str, str], ...] = PrivateAttr(default=())  # (pattern, canonical id), longest first

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for mid, m in self.models.items():
            for i, d in enumerate(m.deployments):
                if d.provider not in self.providers:
                    known = ", ".join(sorted(self.providers))
                    raise ValueError(
                        f"models.{mid}.deployments.{i}.provider: unknown provider {d.provider!r} (known: {known})"
                    )
        exact = _alias_map(self.models)
        self._aliases = {a: m for a, m in exact.items() if "*" not in a}
        self._patterns = tuple(sorted(((a, m) for a, m in exact.items() if "*" in a), key=lambda p: -len(p[0])))
        return self

    @property
    def aliases(self) -> dict[str, str]:
        """Every exact alias and the canonical model id it names (patterns are not names: see :meth:`canonical`)."""
        aliases: dict[str, str] = cast(dict[str, Any], self.__pydantic_private__)["_aliases"]  # (see canonical)
        return aliases

    def canonical(self, model_id: str) -> str:
        """The catalogue's id for a name a client sent: an exact alias resolves, a model id is itself, then the
        longest matching pattern alias (`claude-*`) resolves; anything else is returned as it is."""
        # a pydantic private attribute read as `self._aliases` goes through BaseModel.__getattr__ (~4 us measured
        # here; this is on every request): read from the instance's private values directly
        private = cast(dict[str, Any], self.__pydantic_private__)
        aliases: dict[str, str] = private["_aliases"]
        hit = aliases.get(model_id)
        if hit is not None:
            return hit
        if model_id in self.models:
            return model_id
        patterns: tuple[tuple[str, str], ...] = private["_patterns"]
        for pattern, mid in patterns:
            if fnmatch.fnmatchcase(model_id, pattern):
                return mid
        return model_id


def _alias_map(models: Mapping[str, ModelConfig]) -> dict[str, str]:
    out: dict[str, str] = {}
    for mid, m in models.items():
        for i, alias in enumerate(m.aliases):
            where = f"models.{mid}.aliases.{i}"
            if not alias or alias != alias.strip():
                raise ValueError(f"{where}: an alias must be a non-empty name without surrounding spaces")
            if alias in models:
                raise ValueError(f"{where}: alias {alias!r} is already a model id")
            if alias in out:
                raise ValueError(f"{where}: alias {alias!r} is already an alias of {out[alias]!r}")
            out[alias] = mid
    return out


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _substitute(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), node)
    if isinstance(node, list):
        return [_substitute(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _substitute(v, env) for k, v in node.items()}
    return node


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-before", "function-after"))


def parse_settings(raw: Any, source: str, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    data = _substitute(raw, env)
    for p in (data.get("providers") or {}).values():
        if isinstance(p, dict) and p.get("api_key_env") and not p.get("api_key"):
            key = env.get(str(p["api_key_env"]))
            if key:
                p["api_key"] = key
    if "admin_key" not in data and env.get("THEROUTER_ADMIN_KEY"):
        data["admin_key"] = env["THEROUTER_ADMIN_KEY"]
    if "otel_endpoint" not in data and env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        data["otel_endpoint"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        path = _loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        where = f"{path}: " if path else ""
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{source}: {where}{msg}{more}") from None


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    p = Path(path or env.get("THEROUTER_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{line}: {getattr(e, 'problem', e)}") from None
    return parse_settings(raw, str(p), env)
