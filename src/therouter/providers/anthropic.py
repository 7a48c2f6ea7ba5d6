"""Anthropic's Messages API (``kind: anthropic``): ``POST {base_url}/v1/messages`` with ``x-api-key`` and
``anthropic-version``.

The request is built from the checked OpenAI body by :mod:`_anthropic_request` and the answers are turned back into
OpenAI's shapes by :mod:`_anthropic_response` (a per-stream translator for SSE); this module holds the provider facts
and the error table:

- ``overloaded_error`` (529), ``api_error`` (500), ``rate_limit_error`` (429, with ``retry-after``) are provider faults
  that fall back; ``authentication_error`` (401), ``permission_error`` (403) and ``billing_error`` (402), and a 400
  about our credit balance, are our account's fault at the provider: they fall back and never reach the client as
  its own 401; ``invalid_request_error`` (400) is the client's, shown sanitised (a prompt that is too long is
  ``context_length_exceeded``); ``request_too_large`` (413) likewise. The same table reads an ``error`` event inside
  a stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from therouter.config import Deployment
from therouter.errors import GatewayError, InvalidRequest, UpstreamBadResponse
from therouter.providers._anthropic_request import DEFAULT_MAX_TOKENS, build_body
from therouter.providers._anthropic_response import (
           AnthropicStream,
           finish_reason,
           openai_usage,
           reasoning_entry,
           to_completion,
)
from therouter.providers._http import UpstreamRequest, error_from_upstream
from therouter.providers._sanitize import MAX_INPUT
from therouter.providers.base import Provider, StreamTranslator
from therouter.providers.wire import FORWARDED_HEADERS, NativeRequest

# the translation helpers the Messages surface (therouter.native, anthropic_surface) uses are re-exported here
__all__ = ["ANTHROPIC_VERSION", "ERROR_STATUS", "AnthropicProvider", "finish_reason", "openai_usage",
           "reasoning_entry"]

ANTHROPIC_VERSION = "2023-06-01"
# Anthropic's error type -> the HTTP status it comes with (what an in-stream error event is read as)
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                "permission_error": 403, "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
                "api_error": 500, "timeout_error": 504, "overloaded_error": 529}


class AnthropicProvider(Provider):
    kind = "anthropic"
    speaks = "anthropic"  # /v1/messages requests are sent as they came, answers relayed as they come
    max_stop = 64  # [verify] Anthropic documents no small limit on stop_sequences

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._headers.pop("authorization", None)
        self._headers["anthropic-version"] = ANTHROPIC_VERSION
        if self._secret:
            self._headers["x-api-key"] = self._secret

    def models_url(self) -> str:
        return self.config.base_url + "/v1/models?limit=1000"

    # ---- requests -----------------------------------------------------------------------------------------------

    def chat_request(
        self, body: dict[str, Any], dep: Deployment, *, stream: bool, request_id: str | None = None,
        max_output: int | None = None,
    ) -> UpstreamRequest:
        out = build_body(body, dep, stream=stream, max_output=max_output)
        return UpstreamRequest("POST", self.config.base_url + "/v1/messages", self.headers(request_id),
                               orjson.dumps(out))

    def native_request(
        self, native: NativeRequest, body: dict[str, Any], dep: Deployment, *, stream: bool,
        request_id: str | None = None,
    ) -> UpstreamRequest | None:
        """A client's own Messages body, sent as it came (``cache_control``, thinking signatures, documents and
        server tools survive), except what the gateway decides: the deployment's model, the checked output limit
        (the one reserved for), and streaming. Thinking blocks without a signature (another model's, from an earlier
        turn served elsewhere) are left out: Anthropic refuses them. The client's ``anthropic-version`` and
        ``anthropic-beta`` headers go with it (only those: our key is ours); the answer comes back natively."""
        if native.wire != self.speaks:
            return None
        out = {k: v for k, v in native.body.items() if k not in ("model", "max_tokens", "stream")}
        out["messages"] = [_signed_only(m) for m in native.body.get("messages") or ()]
        out = {"model": dep.model, "max_tokens": body.get("max_tokens") or DEFAULT_MAX_TOKENS, **out}
        if stream:
            out["stream"] = True
        headers = self.headers(request_id)
        headers.update((k, v) for k, v in native.headers.items() if k in FORWARDED_HEADERS[self.speaks])
        return UpstreamRequest("POST", self.config.base_url + "/v1/messages", headers, orjson.dumps(out),
                               meta={"wire": self.speaks})

    def completion_request(
        self, body: dict[str, Any], dep: Deployment, *, stream: bool, request_id: str | None = None,
        max_output: int | None = None,
    ) -> UpstreamRequest:
        raise InvalidRequest("This model is served through the chat API only; use /v1/chat/completions.",
                             param="prompt", code="unsupported_endpoint")

    # ---- responses ----------------------------------------------------------------------------------------------

    def parse_json(self, raw: bytes) -> dict[str, Any]:
        try:
            obj = orjson.loads(raw.strip())
        except orjson.JSONDecodeError:
            raise UpstreamBadResponse("The provider sent a body that is not JSON.", sent=True,
                                      detail=raw[:200].decode("utf-8", "replace")) from None
        return to_completion(obj)

    def stream_translator(self) -> StreamTranslator:
        return AnthropicStream()

    # ---- errors -------------------------------------------------------------------------------------------------

    def map_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
        try:
            obj = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            obj = {"message": body[:MAX_INPUT].decode("utf-8", "replace")}
        return self._error(status, obj, headers, in_stream=False)

    def in_band_error(self, obj: dict[str, Any]) -> GatewayError | None:
        if obj.get("type") != "error":
            return None
        err = obj.get("error")
        etype = err.get("type") if isinstance(err, dict) else None
        return self._error(ERROR_STATUS.get(str(etype), 500), obj, {}, in_stream=True)

    def _error(self, status: int, obj: Any, headers: Mapping[str, str], *, in_stream: bool) -> GatewayError:
        msg, _, param = self.error_fields(obj)
        err = obj.get("error") if isinstance(obj, dict) else None
        etype = err.get("type") if isinstance(err, dict) and isinstance(err.get("type"), str) else None
        low = msg.lower()
        if status == 400 and "credit balance" in low:
            status = 402  # our account at the provider, not the client's request
        if status == 400 and "prompt is too long" in low:
            etype = "context_length_exceeded"
        return error_from_upstream(status, msg, etype, param, headers, secrets=self.secrets(), in_stream=in_stream)


def _signed_only(m: Any) -> Any:
    content = m.get("content") if isinstance(m, dict) and m.get("role") == "assistant" else None
    if not isinstance(content, list):
        return m
    kept = [b for b in content if not (isinstance(b, dict) and b.get("type") == "thinking" and not b.get("signature"))]
    return m if len(kept) == len(content) else {**m, "content": kept}
