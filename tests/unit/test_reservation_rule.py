"""The reservation rule: for every request, what admission reserves is at least the largest cost the upstream
request *as built* can be billed for, at the price of any model that may serve it.

An honest worst case is computed from the built upstream body alone: every prompt token is at least one byte of the
text sent (byte-level BPE) plus the chat template's tokens, and the upstream generates at most the `max_tokens` it was
sent (the model's max output when none was sent) per sequence. The reservation side is the gateway's own functions:
``validate.check`` -> the adapter's request -> ``validate.prompt_bound`` -> ``prices.reservation_nano`` at
``prices.dearest`` of the plan's prices (what ``Meter.admit`` computes).
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from therouter import validate
from therouter.config import Deployment, ProviderConfig, parse_settings
from therouter.errors import GatewayError
from therouter.metering.prices import PriceVersion, billable, cost_nano, dearest, reservation_nano
from therouter.protocol.usage import Usage
from therouter.providers._http import HttpxTransport
from therouter.providers.registry import build_provider

TEXTS = ["hello", "héllo wörld", "日本語のテキスト", "🙂🙃🚀" * 3, "a" * 300, "{\"json\": [1, 2]}", "\n\t\\\"", ""]


def _settings() -> Any:
    card = {"context_length": 1_000_000, "max_output_tokens": 4096,
            "supported_parameters": ["max_tokens", "tools", "tool_choice", "response_format", "n", "temperature"],
            "pricing": {"input": 1, "output": 2}}
    return parse_settings({
        "store": {"redis_url": "redis://127.0.0.1:1/0"},
        "providers": {k: {"kind": k, "base_url": f"http://127.0.0.1:9/{k}/v1"} for k in ("deepseek", "vllm", "sglang")},
        "models": {"m": {**card, "deployments": [{"provider": "deepseek", "model": "x"}]}},
    }, "test", {})


def _body(rnd: random.Random, endpoint: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m"}
    if endpoint == "chat":
        msgs = []
        for _ in range(rnd.randint(1, 6)):
            role = rnd.choice(["system", "user", "assistant", "developer"])
            if rnd.random() < 0.3:
                content: Any = [{"type": "text", "text": rnd.choice(TEXTS)} for _ in range(rnd.randint(1, 3))]
            else:
                content = rnd.choice(TEXTS)
            msgs.append({"role": role, "content": content})
        body["messages"] = msgs
        if rnd.random() < 0.4:
            body["tools"] = [{"type": "function", "function": {"name": f"f{i}", "description": rnd.choice(TEXTS),
                                                               "parameters": {"type": "object"}}}
                             for i in range(rnd.randint(1, 3))]
        r = rnd.random()
        if r < 0.3:
            schema = {"type": "object", "properties": {rnd.choice(TEXTS) or "k": {"type": "string"}
                                                       for _ in range(rnd.randint(1, 40))}}
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        elif r < 0.45:
            body["response_format"] = {"type": "json_object"}
        if rnd.random() < 0.3:
            body["n"] = rnd.randint(1, 4)
    else:
        r = rnd.random()
        if r < 0.4:
            body["prompt"] = rnd.choice(TEXTS) * rnd.randint(1, 5)
        elif r < 0.6:
            body["prompt"] = [rnd.randint(0, 200_000) for _ in range(rnd.randint(1, 50))]
        elif r < 0.8:
            body["prompt"] = [rnd.choice(TEXTS) for _ in range(rnd.randint(1, 3))]
        else:
            body["prompt"] = [[rnd.randint(0, 9) for _ in range(rnd.randint(1, 20))] for _ in range(rnd.randint(1, 3))]
        if rnd.random() < 0.3:
            body["n"] = rnd.randint(1, 3)
            if rnd.random() < 0.5:
                body["best_of"] = body["n"] + rnd.randint(0, 2)
    for field in ("max_tokens", "max_completion_tokens"):
        if rnd.random() < 0.5:
            body[field] = rnd.randint(1, 4096)
    body["stream"] = rnd.random() < 0.5
    return body


def _strings(node: Any) -> int:
    """UTF-8 bytes of every string (and one per token id) in a JSON value."""
    if isinstance(node, str):
        return len(node.encode())
    if isinstance(node, bool) or node is None:
        return 0
    if isinstance(node, int):
        return 1
    if isinstance(node, dict):
        return sum(_strings(v) for v in node.values())
    if isinstance(node, list):
        return sum(_strings(v) for v in node)
    return 0


def _honest_worst(sent: dict[str, Any], endpoint: str, sequences: int, max_output: int) -> Usage:
    if endpoint == "chat":
        prompt = _strings(sent["messages"]) + _strings(sent.get("tools")) + _strings(sent.get("response_format"))
        prompt += validate.TEMPLATE_TOKENS_PER_MESSAGE * len(sent["messages"])
    else:
        prompt = _strings(sent["prompt"]) + _strings(sent.get("suffix"))
    per_seq = sent.get("max_tokens") or max_output
    assert "max_completion_tokens" not in sent  # one limit, under one name
    return Usage(prompt_tokens=prompt, completion_tokens=per_seq * sequences)


PRICES = [PriceVersion("m", 1, 0, input=1_000_000_000, cached_input=100_000_000, output=2_000_000_000),
          PriceVersion("dear", 1, 0, input=9_000_000_000, cached_input=1_000_000_000, output=30_000_000_000),
          PriceVersion("cheap", 1, 0, input=10_000_000, cached_input=1_000_000, output=20_000_000)]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_reservation_covers_the_worst_cost_of_the_request_as_built(endpoint: str) -> None:
    settings = _settings()
    card = settings.models["m"]
    providers = {k: build_provider(k, ProviderConfig(kind=k, base_url=f"http://127.0.0.1:9/{k}/v1"),
                                   HttpxTransport()) for k in ("deepseek", "vllm", "sglang")}
    deployments = [Deployment(provider=k, model="x", capabilities=caps)
                   for k in providers for caps in ((), ("json_object",), ("json_schema",), ("tools", "json_object"))]
    rnd = random.Random(20261129)
    checked_requests = 0
    for _ in range(300):
        body = _body(rnd, endpoint)
        try:
            checked = validate.check(endpoint, body, card, "m")  # type: ignore[arg-type]
        except GatewayError:
            continue
        plan = rnd.sample(PRICES, rnd.randint(1, 3))
        built = []
        for dep in deployments:
            p = providers[dep.provider]
            build = p.chat_request if endpoint == "chat" else p.completion_request
            built.append(build(checked.body, dep, stream=checked.stream))
        bound = max(validate.prompt_bound(r.body, checked) for r in built)
        max_out = (checked.max_tokens or card.max_output_tokens) * checked.sequences
        reserved = reservation_nano(bound, max_out, dearest(*plan))
        for req in built:
            sent = orjson.loads(req.body)
            worst = _honest_worst(sent, endpoint, checked.sequences, card.max_output_tokens)
            for price in plan:
                # what an honest upstream can report, and what settlement bills after clamping to the bounds
                assert cost_nano(worst, price) <= reserved, (body, sent)
                assert cost_nano(billable(worst, bound, max_out), price) <= reserved
            checked_requests += 1
    assert checked_requests > 500  # most random requests are valid: the rule was exercised


def test_settlement_never_bills_past_the_bounds() -> None:
    """An upstream that reports more than the request could produce is billed at most the bounds."""
    u = Usage(prompt_tokens=10**9, completion_tokens=10**9, cached_tokens=10**9, reasoning_tokens=10**9)
    b = billable(u, 1000, 50)
    assert (b.prompt_tokens, b.completion_tokens, b.cached_tokens, b.reasoning_tokens) == (1000, 50, 1000, 50)
    assert cost_nano(b, PRICES[1]) <= reservation_nano(1000, 50, PRICES[1])
