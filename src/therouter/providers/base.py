"""The Provider interface and the OpenAI-compatible behaviour every adapter starts from.

An adapter turns our (OpenAI-shaped) request into an upstream request and the upstream's answer back into OpenAI's
shapes plus :class:`Usage`. It never touches Redis, Prometheus, FastAPI or prices. What differs per upstream lives
in a subclass as a handful of small hooks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import orjson

from therouter import __version__
from therouter.config import Deployment, ProviderConfig
from therouter.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamBadResponse,
    UpstreamTimeout,
)
from therouter.protocol.endpoint import Endpoint
from therouter.protocol.usage import Usage
from therouter.providers._http import (
    DEFAULT_MAX_BODY,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    error_from_upstream,
)
from therouter.providers._sanitize import MAX_INPUT, secret_forms
from therouter.providers.events import DEFAULT_MAX_EVENT, UpstreamEvents
from therouter.providers.shapes import check_chunk, check_completion
from therouter.providers.wire import NativeRequest

JSON_INSTRUCTION = (
    "Respond only with a JSON object that conforms to this JSON Schema (no prose, no code fences):\n"
)
_USER_AGENT = f"therouter/{__version__}"
# one stream's upstream event -> the OpenAI chunk for the client (None: nothing to send for it)
StreamTranslator = Callable[[dict[str, Any]], "dict[str, Any] | None"]


class Provider:
    kind: ClassVar[str] = "openai"
    max_stop: ClassVar[int] = 4
    reasoning_field: ClassVar[str] = "reasoning_content"  # what the upstream calls reasoning in message/delta
    default_health_path: ClassVar[str | None] = None  # relative to the server root
    native_fim: ClassVar[bool] = False  # accepts `suffix` on its completions endpoint
    speaks: ClassVar[str | None] = None  # a client wire format it takes as it is (native_request): "anthropic"

    def __init__(self, name: str, config: ProviderConfig, transport: Transport) -> None:
        self.name = name
        self.config = config
        self.transport = transport
        self._secret = config.api_key.get_secret_value() if config.api_key else ""
        self._secret_forms = secret_forms(self._secret)  # every spelling of our key an upstream might echo
        self._headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "user-agent": _USER_AGENT,
        }
        if self._secret:
            self._headers["authorization"] = f"Bearer {self._secret}"

    # ---- configuration facts ----------------------------------------------------------------------------------

    @property
    def usable(self) -> tuple[bool, str]:
        """Whether routing may use this provider at all (e.g. a hosted provider needs its API key)."""
        if self.config.is_hosted and self.config.api_key_env and not self._secret:
            return False, f"{self.config.api_key_env} is not set"
        return True, ""

    def secrets(self) -> tuple[str, ...]:
        """Our key for this provider in every encoding an upstream might echo it in (for redaction)."""
        return self._secret_forms

    def health_url(self) -> str | None:
        path = self.config.health_path or self.default_health_path
        if not path:
            return None
        root = self.config.base_url.removesuffix("/v1")
        return root + path

    def models_url(self) -> str:
        return self.config.base_url + "/models"

    def headers(self, request_id: str | None = None) -> dict[str, str]:
        h = dict(self._headers)
        if request_id:
            h["x-request-id"] = request_id
        return h

    # ---- requests -----------------------------------------------------------------------------------------------

    def request(
        self, endpoint: Endpoint, body: dict[str, Any], dep: Deployment, *, stream: bool,
        request_id: str | None = None, max_output: int | None = None,
    ) -> UpstreamRequest:
        """The upstream request for ``endpoint`` (:meth:`chat_request` or :meth:`completion_request`)."""
        build = self.chat_request if endpoint.chat else self.completion_request
        return build(body, dep, stream=stream, request_id=request_id, max_output=max_output)

    def chat_request(
        self, body: dict[str, Any], dep: Deployment, *, stream: bool, request_id: str | None = None,
        max_output: int | None = None,
    ) -> UpstreamRequest:
        """``body`` is the checked client body (its one output limit, if any, as ``max_tokens``); ``max_output`` the
        model card's max output, for an upstream that needs an output limit on every request."""
        out = dict(body)
        out["model"] = dep.model
        _strip_gateway_fields(out)
        _max_tokens(out)
        self._response_format(out, dep)
        out["messages"] = [self.adapt_message(m) for m in out["messages"]]
        if stream:
            out["stream"] = True
            so = dict(out.get("stream_options") or {})
            so["include_usage"] = True  # always meter, whatever the client asked
            out["stream_options"] = so
        else:
            out.pop("stream", None)
            out.pop("stream_options", None)
        _reasoning_request(out)
        self.adapt_chat(out, dep)
        return UpstreamRequest(
            "POST", self.config.base_url + "/chat/completions", self.headers(request_id), orjson.dumps(out)
        )

    def completion_request(
        self, body: dict[str, Any], dep: Deployment, *, stream: bool, request_id: str | None = None,
        max_output: int | None = None,
    ) -> UpstreamRequest:
        out = dict(body)
        out["model"] = dep.model
        _strip_gateway_fields(out)
        url = self.config.base_url + "/completions"
        if out.get("suffix") is not None:
            url = self.fim(out, dep)
        if stream:
            out["stream"] = True
            so = dict(out.get("stream_options") or {})
            so["include_usage"] = True
            out["stream_options"] = so
        else:
            out.pop("stream", None)
            out.pop("stream_options", None)
        return UpstreamRequest("POST", url, self.headers(request_id), orjson.dumps(out))

    def native_request(
        self, native: NativeRequest, body: dict[str, Any], dep: Deployment, *, stream: bool,
        request_id: str | None = None,
    ) -> UpstreamRequest | None:
        """A request in the provider's own wire format, from a client that spoke it (``native``: e.g. an Anthropic
        Messages body from /v1/messages), with ``body`` the checked OpenAI translation whose limits hold; its
        ``meta["wire"]`` says the answer comes back in that format too (:mod:`therouter.native` relays it). None:
        this provider takes the OpenAI translation (:meth:`request`)."""
        return None

    # hooks ----------------------------------------------------------------------------------------------------

    def adapt_message(self, m: dict[str, Any]) -> dict[str, Any]:
        return m

    def adapt_chat(self, out: dict[str, Any], dep: Deployment) -> None:
        """Provider-specific rewrites of an outgoing chat body (in place)."""

    def fim(self, out: dict[str, Any], dep: Deployment) -> str:
        """Turn a request with `suffix` into what this provider accepts; returns the URL to post to."""
        if self.native_fim:
            return self.config.base_url + "/completions"
        if dep.fim_tokens is None:
            raise InvalidRequest("this deployment has no fill-in-the-middle support", param="suffix")
        begin, hole, end = dep.fim_tokens
        prompt = out.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequest("fill-in-the-middle needs a string prompt", param="prompt")
        out["prompt"] = f"{begin}{prompt}{hole}{out.pop('suffix')}{end}"
        return self.config.base_url + "/completions"

    def _response_format(self, out: dict[str, Any], dep: Deployment) -> None:
        rf = out.get("response_format")
        if not isinstance(rf, dict) or rf.get("type") != "json_schema" or "json_schema" in dep.capabilities:
            return
        # The host only has JSON mode: ask for json_object and give the model the schema as an instruction.
        schema = (rf.get("json_schema") or {}).get("schema", {})
        out["response_format"] = {"type": "json_object"}
        note = {"role": "system", "content": JSON_INSTRUCTION + orjson.dumps(schema).decode()}
        out["messages"] = [note, *out["messages"]]

    # ---- the upstream call ------------------------------------------------------------------------------------

    async def open_stream(self, req: UpstreamRequest, *, first_token: float, total: float,
                          clock: Callable[[], float] = time.monotonic, max_event_bytes: int = DEFAULT_MAX_EVENT,
                          max_error_bytes: int = DEFAULT_MAX_BODY) -> UpstreamEvents:
        """Send a stream request; a 200 becomes its data events under the first-token / idle / total clocks (counted
        from now), anything else the mapped :class:`GatewayError`."""
        t = self.config.timeouts
        sent_at = clock()
        resp = await self.transport.send(req, connect=t.connect, headers_timeout=first_token)
        if resp.status != 200:
            raise await self._refusal(resp, max_error_bytes)
        return UpstreamEvents(resp, first_token=first_token, idle=t.idle, total=total, clock=clock, started=sent_at,
                              max_event_bytes=max_event_bytes)

    async def complete(self, req: UpstreamRequest, *, budget: float,
                       max_body_bytes: int = DEFAULT_MAX_BODY) -> tuple[dict[str, Any], Usage | None]:
        """Send a non-stream request and read its answer within ``budget`` seconds: the OpenAI-shaped body and the
        usage it reports (None: it reported none), or the mapped :class:`GatewayError`."""
        obj = self.parse_json(await self.complete_raw(req, budget=budget, max_body_bytes=max_body_bytes))
        u = obj.get("usage")
        return obj, self.usage(u) if isinstance(u, dict) else None

    async def complete_raw(self, req: UpstreamRequest, *, budget: float,
                           max_body_bytes: int = DEFAULT_MAX_BODY) -> bytes:
        """The body of a 200 answer to a non-stream request, read within ``budget`` seconds, as it came (a native
        answer is relayed in its own wire format); any other status is the mapped :class:`GatewayError`."""
        resp = await self.transport.send(req, connect=self.config.timeouts.connect, headers_timeout=budget)
        try:
            if resp.buffered():  # (the common case for a small answer: it came with its headers, no timer)
                raw = await resp.read(max_body_bytes)
            else:
                try:
                    async with asyncio.timeout(budget):
                        raw = await resp.read(max_body_bytes)
                except TimeoutError:
                    raise UpstreamTimeout("upstream did not finish its answer in time", sent=True) from None
            if resp.status != 200:
                raise self.map_error(resp.status, raw, resp.headers)
            return raw
        finally:
            await resp.close()

    async def get(self, url: str, timeout: float = 3.0) -> tuple[int, bytes]:
        """A GET on this provider (health and model-list checks): status and body, within ``timeout``."""
        req = UpstreamRequest("GET", url, self.headers())
        resp = await self.transport.send(req, connect=min(self.config.timeouts.connect, timeout),
                                         headers_timeout=timeout)
        try:
            async with asyncio.timeout(timeout):
                return resp.status, await resp.read()
        finally:
            await resp.close()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def _refusal(self, resp: UpstreamResponse, limit: int) -> GatewayError:
        """A non-200 answer to a stream request as an error (its body read for at most 5 s)."""
        try:
            async with asyncio.timeout(5):
                raw = await resp.read(limit)
        except (TimeoutError, GatewayError):
            raw = b""
        finally:
            await resp.close()
        return self.map_error(resp.status, raw, resp.headers)

    # ---- responses ----------------------------------------------------------------------------------------------

    def parse_json(self, raw: bytes) -> dict[str, Any]:
        """A non-stream answer. Leading blank lines (DeepSeek's keep-alive while queued) are tolerated."""
        try:
            obj = orjson.loads(raw.strip())
        except orjson.JSONDecodeError:
            raise UpstreamBadResponse("The provider sent a body that is not JSON.", sent=True,
                                      detail=raw[:200].decode("utf-8", "replace")) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            raise UpstreamBadResponse("The provider sent an answer without choices.", sent=True,
                                      detail=f"body is {type(obj).__name__} without a choices list")
        check_completion(obj)
        return self.normalize_completion(obj)

    def normalize_completion(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A non-stream answer (as received, or assembled from a stream), in place: OpenAI's spellings and shape.
        Optional top-level fields that are null (``system_fingerprint``; vLLM's ``service_tier``, ``prompt_logprobs``,
        ``kv_transfer_params``) are absent, as in a stream's chunks; other fields pass through as they are."""
        for choice in obj["choices"]:
            msg = choice.get("message")
            if msg is not None:
                self._reasoning_out(msg)
                _openai_message(msg)
            choice.setdefault("logprobs", None)
        for k in _ABSENT_WHEN_NULL:
            if k in obj and obj[k] is None:
                del obj[k]
        return obj

    def stream_translator(self) -> StreamTranslator:
        """A fresh translator for one stream: each upstream data event -> the OpenAI chunk it becomes, or None when
        it carries nothing for the client. OpenAI-compatible upstreams need no state: their chunk, normalised in
        place. An upstream with its own event protocol (Anthropic) returns an object holding the stream's state."""
        return self._translate_chunk

    @property
    def plain_chunks(self) -> bool:
        """Its plain content chunks are already OpenAI's (they may be relayed as bytes, see
        :mod:`therouter.streaming`): true unless the adapter translates or normalises chunks itself."""
        cls = type(self)
        return cls.stream_translator is Provider.stream_translator and cls.normalize_chunk is Provider.normalize_chunk

    def _translate_chunk(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        self.normalize_chunk(obj)
        return obj

    def normalize_chunk(self, obj: dict[str, Any]) -> None:
        """A stream chunk, in place: its shape checked (UpstreamBadResponse), provider spellings become OpenAI's."""
        check_chunk(obj)
        if self.reasoning_field != "reasoning_content":
            for choice in obj.get("choices") or ():
                delta = choice.get("delta")
                if delta is not None:
                    self._reasoning_out(delta)

    def _reasoning_out(self, msg: dict[str, Any]) -> None:
        f = self.reasoning_field
        if f != "reasoning_content" and f in msg:
            val = msg.pop(f)
            if "reasoning_content" not in msg or msg["reasoning_content"] is None:
                msg["reasoning_content"] = val

    def usage(self, u: Mapping[str, Any]) -> Usage:
        return Usage.from_openai(dict(u))

    # ---- errors -------------------------------------------------------------------------------------------------

    def error_fields(self, obj: Any) -> tuple[str, str | None, str | None]:
        """(message, code, param) from an error body in any of the shapes upstreams use. The message is the
        upstream's own text, untrusted: ``error_from_upstream`` decides what of it anyone sees."""
        err = obj.get("error") if isinstance(obj, dict) and isinstance(obj.get("error"), (dict, str)) else obj
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or ""
            code = err.get("code")
            param = err.get("param")
            return (
                str(msg)[:MAX_INPUT],
                code if isinstance(code, str) and code else None,  # vLLM / SGLang use an int status as code
                param if isinstance(param, str) else None,
            )
        if isinstance(err, str):
            return err[:MAX_INPUT], None, None
        return "", None, None

    def map_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
        try:
            obj = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            obj = {"message": body[:MAX_INPUT].decode("utf-8", "replace")}
        msg, code, param = self.error_fields(obj)
        return error_from_upstream(status, msg, code, param, headers, secrets=self.secrets())

    def in_band_error(self, obj: dict[str, Any]) -> GatewayError | None:
        """An error object inside a 200 stream (OpenAI shape, or vLLM / SGLang ``{"object":"error"}``)."""
        if obj.get("error"):
            err = obj["error"]
        elif obj.get("object") == "error":
            err = obj
        else:
            return None
        msg, code, param = self.error_fields({"error": err} if isinstance(err, dict) else err)
        num = err.get("code") if isinstance(err, dict) else None
        status = num if isinstance(num, int) and 400 <= num < 600 else 500
        return error_from_upstream(status, msg, code, param, {}, secrets=self.secrets(), in_stream=True)


_NOT_NULLABLE = ("annotations", "function_call", "audio", "tool_calls", "reasoning_content")
_ABSENT_WHEN_NULL = ("system_fingerprint", "service_tier", "prompt_logprobs", "kv_transfer_params")  # top level


def _openai_message(msg: dict[str, Any]) -> None:
    """OpenAI's message shape: `refusal` is always present; list/object fields and `reasoning_content` are absent
    rather than null (or, for `tool_calls`, empty); a tool call has no stream `index`; a message that only calls tools
    has `content: null` (DeepSeek sends "", vLLM and SGLang null). One answer whichever served it, and whether it was
    streamed upstream or not."""
    msg.setdefault("refusal", None)
    for k in _NOT_NULLABLE:
        if k in msg and msg[k] is None:
            del msg[k]
    calls = msg.get("tool_calls")
    if calls == []:
        del msg["tool_calls"]
    elif calls:
        msg["tool_calls"] = [{k: v for k, v in tc.items() if k != "index"} if "index" in tc else tc for tc in calls]
        if msg.get("content") == "":
            msg["content"] = None


_GATEWAY_FIELDS = ("models", "provider", "route", "transforms", "fake_gateway")


def _reasoning_request(out: dict[str, Any]) -> None:
    """OpenRouter's ``reasoning: {effort, max_tokens, exclude, enabled}`` folded into OpenAI's ``reasoning_effort``
    (``"none"``: thinking off) or DeepSeek's ``thinking: {type: enabled}``, which each adapter maps to its host's
    switch. ``max_tokens`` has no equivalent on these hosts and is not sent; ``exclude`` is the gateway's (it strips
    reasoning from the answer)."""
    r = out.pop("reasoning", None)
    if not isinstance(r, dict):
        return
    effort = r.get("effort") or out.get("reasoning_effort")
    enabled = r.get("enabled")
    if enabled is False or effort == "none":
        out["reasoning_effort"] = "none"
    elif effort:
        out["reasoning_effort"] = effort
    elif enabled or r.get("max_tokens"):
        out.setdefault("thinking", {"type": "enabled"})


def _strip_gateway_fields(out: dict[str, Any]) -> None:
    for k in _GATEWAY_FIELDS:
        out.pop(k, None)


def _max_tokens(out: dict[str, Any]) -> None:
    mct = out.pop("max_completion_tokens", None)
    if mct is not None and out.get("max_tokens") is None:
        out["max_tokens"] = mct
