"""Configuration and fault knobs for the fake upstream.

Knobs are kept as a plain ``dict[str, Any]`` on the hot path; :class:`FakeConfig`
is the typed, user-facing way to build the server-wide defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

FLAVORS: tuple[str, ...] = ("deepseek", "vllm", "sglang", "anthropic", "openai")

DEFAULT_MODELS: dict[str, list[str]] = {
    "deepseek": ["deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro"],
    "vllm": ["deepseek-ai/DeepSeek-V3.2"],
    "sglang": ["deepseek-ai/DeepSeek-V3.2"],
    "anthropic": ["claude-opus-4-7", "claude-sonnet-4-5"],
    "openai": ["gpt-5.1", "gpt-4.1"],
}

ERROR_KINDS: frozenset[str] = frozenset(
    {
        "500", "503", "429", "400", "401", "402", "403", "408", "529",
        "context_length", "in_band", "cut", "stall", "bad_json", "no_done",
        "no_usage", "hang", "redirect", "empty_json",
        # misbehaving upstreams (issue 7, point 8)
        "bad_shape", "huge", "gzip_bomb", "in_band_mid",
    }
)

#: how ``error_kind=bad_shape`` mis-shapes the data event at ``fault_at`` (stream) or the body (non-stream)
SHAPES: tuple[str, ...] = (
    "choices_int", "choice_not_object", "delta_not_object", "content_int", "tool_calls_int", "tool_call_not_object",
    "chunk_int", "chunk_str", "chunk_list", "usage_int",
)

#: content-encodings the fake can put on its answers; ``br`` is a label only (the body is not brotli): an encoding
#: the gateway never asked for
ENCODINGS: tuple[str, ...] = ("identity", "gzip", "deflate", "br")

TOOL_CALL_MODES: frozenset[str] = frozenset({"auto", "always", "never"})

#: number of reasoning chunks emitted for ``reasoning=true`` (or a thinking request)
DEFAULT_REASONING_CHUNKS = 4

#: Server-wide knob defaults. Every key is also a FakeConfig field and a CLI flag.
KNOB_DEFAULTS: dict[str, Any] = {
    "latency_ms": 0.0,
    "ttft_ms": 0.0,
    "chunks": 8,
    "chunk_delay_ms": 0.0,
    "tokens_per_chunk": 1,
    "error_rate": 0.0,
    "error_kind": "500",
    "retry_after": 1.0,
    "cut_after": 2,
    "stall_after": 2,
    "stall_ms": 60000.0,
    "bad_json_at": 1,
    "keepalive_comments": 0,
    "keepalive_ms": 100.0,
    "reasoning": None,
    "tool_call": "auto",
    "parallel_tools": 1,
    "cached_tokens": 0,
    "cache_write_tokens": 0,
    "redacted_thinking": False,
    "max_model_len": 131072,
    "health_status": 200,
    "queue_depth": 0,
    "kv_cache_usage": 0.0,
    "usage_patch": {},
    "echo_request": False,
    "shape": "choices_int",
    "fault_at": 0,
    "huge_bytes": 2 * 1024 * 1024,
    "bomb_bytes": 256 * 1024 * 1024,
    "encoding": "identity",
}


class KnobError(ValueError):
    """An unknown knob name or an invalid knob value."""


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise KnobError("expected a number")
    f = float(v)
    if f < 0:
        raise KnobError("must be >= 0")
    return f


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise KnobError("expected an integer")
    i = int(float(v)) if isinstance(v, str) and "." in v else int(v)
    if i < 0:
        raise KnobError("must be >= 0")
    return i


def _to_rate(v: Any) -> float:
    f = _to_float(v)
    if f > 1:
        raise KnobError("must be within 0..1")
    return f


def _to_pos_int(v: Any) -> int:
    i = _to_int(v)
    if i < 1:
        raise KnobError("must be >= 1")
    return i


def _to_error_kind(v: Any) -> str:
    s = str(v).strip().lower()
    if s not in ERROR_KINDS:
        raise KnobError(f"unknown error_kind {s!r}; expected one of {sorted(ERROR_KINDS)}")
    return s


def _to_reasoning(v: Any) -> int | None:
    """``None``/"auto" follows the request (thinking enabled -> on); bool or a chunk count."""
    if v is None:
        return None
    if isinstance(v, bool):
        return DEFAULT_REASONING_CHUNKS if v else 0
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("auto", "none", ""):
            return None
        if s in _TRUE - {"1"}:
            return DEFAULT_REASONING_CHUNKS
        if s in _FALSE:
            return 0
    return _to_int(v)


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise KnobError("expected a boolean")


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in choices:
            raise KnobError(f"expected one of {list(choices)}")
        return s

    return parse


def _to_tool_call(v: Any) -> str:
    if isinstance(v, bool):
        return "always" if v else "never"
    s = str(v).strip().lower()
    if s in _TRUE:
        return "always"
    if s in _FALSE:
        return "never"
    if s not in TOOL_CALL_MODES:
        raise KnobError(f"tool_call must be one of {sorted(TOOL_CALL_MODES)} or a bool")
    return s


def _to_json_object(v: Any) -> dict[str, Any]:
    """A JSON object, given as one or as its text ("" or null: none)."""
    if v is None or v == "":
        return {}
    if isinstance(v, (str, bytes)):
        try:
            v = orjson.loads(v)
        except orjson.JSONDecodeError:
            raise KnobError("expected a JSON object") from None
    if not isinstance(v, dict):
        raise KnobError("expected a JSON object")
    return dict(v)


KNOB_PARSERS: dict[str, Callable[[Any], Any]] = {
    "latency_ms": _to_float,
    "ttft_ms": _to_float,
    "chunks": _to_int,
    "chunk_delay_ms": _to_float,
    "tokens_per_chunk": _to_pos_int,
    "error_rate": _to_rate,
    "error_kind": _to_error_kind,
    "retry_after": _to_float,
    "cut_after": _to_int,
    "stall_after": _to_int,
    "stall_ms": _to_float,
    "bad_json_at": _to_int,
    "keepalive_comments": _to_int,
    "keepalive_ms": _to_float,
    "reasoning": _to_reasoning,
    "tool_call": _to_tool_call,
    "parallel_tools": _to_pos_int,
    "cached_tokens": _to_int,
    "cache_write_tokens": _to_int,
    "redacted_thinking": _to_bool,
    "max_model_len": _to_pos_int,
    "health_status": _to_pos_int,
    "queue_depth": _to_int,
    "kv_cache_usage": _to_rate,
    "usage_patch": _to_json_object,
    "echo_request": _to_bool,
    "shape": _one_of(SHAPES),
    "fault_at": _to_int,
    "huge_bytes": _to_pos_int,
    "bomb_bytes": _to_pos_int,
    "encoding": _one_of(ENCODINGS),
}

KNOB_HELP: dict[str, str] = {
    "latency_ms": "delay before response headers",
    "ttft_ms": "stream: delay before the first data event",
    "chunks": "number of content chunks",
    "chunk_delay_ms": "stream: delay between chunks",
    "tokens_per_chunk": "tokens (words) per chunk",
    "error_rate": "probability 0..1 of answering with error_kind",
    "error_kind": "fault to inject: " + ", ".join(sorted(ERROR_KINDS)),
    "retry_after": "Retry-After seconds sent with 429 (0 = omit)",
    "cut_after": "cut: close the connection after N content chunks",
    "stall_after": "stall: go silent after N content chunks",
    "stall_ms": "stall/hang duration",
    "bad_json_at": "bad_json: 0-based index of the data event replaced by invalid JSON",
    "keepalive_comments": "N ': keep-alive' comments before the first event (deepseek non-stream: blank lines)",
    "keepalive_ms": "spacing of keep-alive comments",
    "reasoning": "reasoning chunks before content: auto (follow request thinking flag), true/false or a count",
    "tool_call": "auto (tools present and tool_choice != none) | always | never",
    "parallel_tools": "number of parallel tool calls",
    "cached_tokens": "prompt tokens reported as cache hits",
    "cache_write_tokens": "prompt tokens reported as written to the prompt cache (anthropic flavour)",
    "redacted_thinking": "anthropic flavour: a redacted_thinking block after the thinking (before the text)",
    "max_model_len": "context window reported by /models and context_length errors",
    "health_status": "HTTP status returned by /health and /health_generate",
    "queue_depth": "/metrics: reported waiting requests",
    "kv_cache_usage": "/metrics: reported KV cache usage 0..1",
    "usage_patch": "JSON object whose fields replace the reported usage's (absurd or wrong-typed counts)",
    "echo_request": "error bodies (4xx, 5xx, in-band) echo the request headers (Authorization too) plus a URL, an "
                    "IP:port, a file path and a Python traceback, as careless servers do",
    "shape": "bad_shape: which field goes wrong: " + ", ".join(SHAPES),
    "fault_at": "bad_shape / huge: 0-based index of the data event affected (streams)",
    "huge_bytes": "huge: size of the oversized SSE line (stream) or body (non-stream)",
    "bomb_bytes": "gzip_bomb: how large the gzip body inflates (its compressed size is ~1/1000 of it)",
    "encoding": "content-encoding of every answer: " + ", ".join(ENCODINGS) + " (br: a label we never decode)",
}


def normalize_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def parse_fault_header(value: str) -> dict[str, str]:
    """Parse ``x-fault: key=value;key=value`` (``,`` also separates pairs)."""
    out: dict[str, str] = {}
    for part in value.replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep:
            raise KnobError(f"malformed x-fault entry {part!r}; expected key=value")
        out[normalize_key(key)] = val.strip()
    return out


def merge_knobs(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``base`` with validated ``overrides`` applied.

    Setting ``error_kind`` in a layer while the resulting ``error_rate`` is 0 implies
    ``error_rate=1`` (so ``x-fault: error_kind=503`` just works).
    """
    merged = dict(base)
    for raw_key, raw_val in overrides.items():
        key = normalize_key(raw_key)
        parser = KNOB_PARSERS.get(key)
        if parser is None:
            raise KnobError(f"unknown fault knob {raw_key!r}")
        try:
            merged[key] = parser(raw_val)
        except KnobError as exc:
            raise KnobError(f"invalid value for {key}: {exc}") from None
        except (TypeError, ValueError):
            raise KnobError(f"invalid value for {key}: {raw_val!r}") from None
    keys = {normalize_key(k) for k in overrides}
    if "error_kind" in keys and "error_rate" not in keys and merged["error_rate"] == 0:
        merged["error_rate"] = 1.0
    return merged


@dataclass
class FakeConfig:
    """Server-wide defaults of a fake upstream. Knob fields mirror :data:`KNOB_DEFAULTS`."""

    flavor: str = "deepseek"
    api_key: str | None = None
    models: list[str] | None = None
    seed: int | None = None
    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    chunks: int = 8
    chunk_delay_ms: float = 0.0
    tokens_per_chunk: int = 1
    error_rate: float = 0.0
    error_kind: str = "500"
    retry_after: float = 1.0
    cut_after: int = 2
    stall_after: int = 2
    stall_ms: float = 60000.0
    bad_json_at: int = 1
    keepalive_comments: int = 0
    keepalive_ms: float = 100.0
    reasoning: int | bool | str | None = None
    tool_call: str | bool = "auto"
    parallel_tools: int = 1
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    redacted_thinking: bool = False
    max_model_len: int = 131072
    health_status: int = 200
    queue_depth: int = 0
    kv_cache_usage: float = 0.0
    usage_patch: dict[str, Any] = field(default_factory=dict)
    echo_request: bool = False
    shape: str = "choices_int"
    fault_at: int = 0
    huge_bytes: int = 2 * 1024 * 1024
    bomb_bytes: int = 256 * 1024 * 1024
    encoding: str = "identity"

    def __post_init__(self) -> None:
        self.flavor = self.flavor.strip().lower()
        if self.flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {self.flavor!r}; expected one of {FLAVORS}")
        if not self.models:
            self.models = list(DEFAULT_MODELS[self.flavor])

    def knobs(self) -> dict[str, Any]:
        """Validated knob dict (raises :class:`KnobError` on bad values)."""
        raw = {k: getattr(self, k) for k in KNOB_DEFAULTS}
        merged = merge_knobs(KNOB_DEFAULTS, raw)
        # error_kind set on the dataclass never implies a rate: keep what was given.
        merged["error_rate"] = _to_rate(self.error_rate)
        return merged


# sanity: every knob is a dataclass field
assert set(KNOB_DEFAULTS) <= {f.name for f in fields(FakeConfig)}
assert set(KNOB_DEFAULTS) == set(KNOB_PARSERS) == set(KNOB_HELP)
