"""The one sanitiser of upstream text: `redact` (logs, records) and `sanitize` (the client), from nasty real-looking
examples."""

from __future__ import annotations

import base64
import re
from urllib.parse import quote

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from therouter.errors import UpstreamRequestRejected
from therouter.providers._http import error_from_upstream, redact, sanitize
from therouter.providers._sanitize import MAX_CLIENT, secret_forms

from ._helpers import CANARY, make_provider

KEY = CANARY  # our provider key
CLIENT_KEY = "tr-Qm9vX2FfY2xpZW50X2tleV90aGF0X2lzX2xvbmdfZW5vdWdo"  # the shape of a gateway key (keys.new_key)
FORMS = secret_forms(KEY)

TRACEBACK = """Traceback (most recent call last):
  File "/opt/venv/lib/python3.11/site-packages/vllm/entrypoints/openai/serving_chat.py", line 212, in create
    request_prompts, engine_prompts = await self._preprocess_chat(
  File "C:\\\\inference\\\\server\\\\handler.py", line 88, in _preprocess_chat
    raise ValueError(f"bad temperature from {peer}")
ValueError: bad temperature from 10.1.2.3:51234"""

# what a careless upstream puts in a 400: the useful sentence, then everything it should not
NASTY_400 = (
    "temperature must be between 0 and 2, got 7. "
    f"Request headers: {{'host': 'vllm-0.vllm.svc.cluster.local:8000', 'authorization': 'Bearer {KEY}', "
    f"'x-api-key': '{KEY}', 'cookie': 'session=abc'}} "
    "docs: https://internal.example.com/v1/docs?token=s3cr3t#temperature "
    "upstream=10.0.0.12:8443 peer [fe80::1%eth0]:9000 ipv6 2001:db8:85a3::8a2e:370:7334 "
    "config /etc/vllm/config.yaml and ~/models/llama/config.json and C:\\Users\\svc\\models\\m.bin "
    "and \\\\fileserver\\share\\weights.safetensors\n" + TRACEBACK
)


# ---- secret_forms / redact -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [
    lambda k: k,
    lambda k: quote(k, safe=""),
    lambda k: k.encode().hex(),
    lambda k: k.encode().hex().upper(),
    lambda k: base64.b64encode(k.encode()).decode(),
    lambda k: base64.b64encode(f"Bearer {k}".encode()).decode(),  # the key at another byte alignment
    lambda k: base64.b64encode(f"user:{k}".encode()).decode(),  # HTTP Basic of user:key
    lambda k: base64.urlsafe_b64encode(f"xy{k}zz".encode()).decode(),
    lambda k: f"Authorization: Bearer {k}",
    lambda k: f"https://api.example.com/v1?api_key={quote(k, safe='')}&x=1",
])
def test_redact_removes_our_key_in_any_encoding(wrap: object) -> None:
    text = f"upstream says: {wrap(KEY)} is not valid"  # type: ignore[operator]
    out = redact(text, FORMS)
    for form in FORMS:
        assert form not in out
    assert "upstream says" in out and "is not valid" in out


def test_redact_without_knowing_the_key() -> None:
    for text in (f"Authorization: Bearer {KEY}", "Bearer abc.DEF_123-xyz", f"key {CLIENT_KEY} unknown",
                 "x-api-key: 9f8e7d6c5b4a", "password=hunter22", '{"api_key": "whatever-it-is"}',
                 "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                 "hf_abcdefghijklmnopqrstuvwxyz", "AKIAIOSFODNN7EXAMPLE", "Basic dXNlcjpwYXNzd29yZA=="):
        out = redact(text)
        assert "[redacted]" in out, text
    assert CLIENT_KEY not in redact(f"bad key {CLIENT_KEY}")
    assert "9f8e7d6c5b4a" not in redact("x-api-key: 9f8e7d6c5b4a")
    assert "hunter22" not in redact("password=hunter22")


def test_redact_keeps_what_an_operator_debugs_with() -> None:
    out = redact(NASTY_400, FORMS)
    assert KEY not in out
    for kept in ("temperature must be between 0 and 2", "vllm-0.vllm.svc.cluster.local:8000", "10.0.0.12:8443",
                 "/etc/vllm/config.yaml", "Traceback (most recent call last)", "serving_chat.py"):
        assert kept in out, kept


def test_redact_leaves_ordinary_words() -> None:
    for text in ("The basic idea is fine", "max_tokens must be at most 8192", "token limit exceeded",
                 "Invalid key in tools[0]", "a bearer of bad news"):
        assert redact(text) == text


def test_short_keys_are_redacted_as_is_but_not_by_their_fragments() -> None:
    forms = secret_forms("abc123")
    assert "abc123" in forms
    assert all(len(f) >= 8 for f in forms if f != "abc123")  # no 4-character base64 fragment redacting words
    assert "abc123" not in redact("key abc123!", forms)


# ---- sanitize ------------------------------------------------------------------------------------------------------


def test_sanitize_keeps_the_explanation_and_nothing_else() -> None:
    out = sanitize(NASTY_400, FORMS)
    assert out.startswith("temperature must be between 0 and 2, got 7.")
    for gone in (KEY, "s3cr3t", "https://", "internal.example.com", "10.0.0.12", "8443", "fe80", "2001:db8",
                 "cluster.local", "/etc/vllm", "config.yaml", "~/models", "C:\\", "Users", "fileserver", "Traceback",
                 "serving_chat", "site-packages", "handler.py", "ValueError", "10.1.2.3", "line 212"):
        assert gone not in out, gone
    assert "\n" not in out


@pytest.mark.parametrize("text,gone", [
    ("connect to http://127.0.0.1:8000/v1/chat/completions failed", "127.0.0.1"),
    ("see ftp://files.internal/x", "files.internal"),
    ("backend localhost:30000 is busy", "localhost:30000"),
    ("backend sglang-worker-3:30000 is busy", "sglang-worker-3"),
    ("peer [::1]:8080 reset", "::1"),
    ("peer ::ffff:10.0.0.1 reset", "10.0.0.1"),
    ("open /var/lib/models/weights.bin: permission denied", "/var/lib"),
    ("open ../secrets/x.json failed", "secrets"),
    ("file D:/models/llama/config.json missing", "D:/models"),
    ("at C:\\\\srv\\\\app\\\\main.py line 3", "srv"),
])
def test_sanitize_removes_locations(text: str, gone: str) -> None:
    assert gone not in sanitize(text)


@pytest.mark.parametrize("text", [
    "max_tokens must be at most 8192, got 100000",
    "The model `deepseek-ai/DeepSeek-V3.2` does not support tools",
    "text/event-stream and application/json are the only content types",
    "stop must be a string or a list of up to 4 strings (got 1/2 of the way)",
    "Invalid value at 12:30:45 for std::vector<int>",
    "'max_tokens':4096 is too large",
    "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens.",
])
def test_sanitize_leaves_ordinary_explanations(text: str) -> None:
    assert sanitize(text) == text


def test_sanitize_caps_the_length_and_one_lines() -> None:
    out = sanitize("word " * 5000)
    assert len(out) <= MAX_CLIENT and out.endswith("...")
    assert sanitize("bad\n\n  stop\tvalue") == "bad stop value"


@settings(max_examples=200, deadline=None, database=None)
@given(prefix=st.text(max_size=40), suffix=st.text(max_size=40),
       enc=st.sampled_from(["plain", "b64", "hex", "url", "bearer"]))
def test_our_key_never_survives_sanitize(prefix: str, suffix: str, enc: str) -> None:
    shown = {"plain": KEY, "b64": base64.b64encode((prefix + KEY).encode()).decode(), "hex": KEY.encode().hex(),
             "url": quote(KEY, safe=""), "bearer": f"Bearer {KEY}"}[enc]
    out = sanitize(f"{prefix} {shown} {suffix}", FORMS)
    assert KEY not in out
    assert not any(f in out for f in FORMS)


def test_hostile_long_input_is_handled() -> None:
    """Patterns are anchored at token starts and the input is capped: a long hostile body is just text."""
    for text in ("a-" * 50_000, "1." * 50_000, ":" * 100_000, "/a" * 50_000, "\\" * 100_000, "f:" * 50_000,
                 "Traceback (most recent call last):\n" + "  x\n" * 50_000):
        out = sanitize(text, FORMS)
        assert len(out) <= MAX_CLIENT


def test_a_cut_never_leaves_half_a_key() -> None:
    text = "x" * 7990 + " " + KEY  # the key straddles the input cap
    assert not re.search(r"sk-CAN", redact(text, FORMS))


# ---- error_from_upstream / map_error: message for the client, detail for us ----------------------------------------


def test_4xx_explanation_is_sanitised_and_detail_keeps_the_full_text() -> None:
    err = make_provider("vllm").map_error(400, orjson.dumps({"error": {"message": NASTY_400, "code": 400}}), {})
    assert isinstance(err, UpstreamRequestRejected) and err.status == 400
    assert err.message.startswith("temperature must be between 0 and 2")
    body = orjson.dumps(err.body()).decode()
    for gone in (KEY, "10.0.0.12", "/etc/vllm", "Traceback", "https://"):
        assert gone not in body
    assert err.detail is not None
    assert KEY not in err.detail
    assert "/etc/vllm/config.yaml" in err.detail and "Traceback" in err.detail


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_5xx_never_shows_upstream_words(status: int) -> None:
    err = make_provider("deepseek").map_error(status, NASTY_400.encode(), {})
    assert err.message == f"The provider failed (HTTP {status})."
    assert "temperature" not in orjson.dumps(err.body()).decode()
    assert err.detail is not None and "temperature must be" in err.detail and KEY not in err.detail


def test_detail_is_never_rendered() -> None:
    err = error_from_upstream(500, "secret internals", None, None, {})
    assert err.detail and "secret internals" in err.detail
    assert "secret internals" not in orjson.dumps(err.body()).decode()


def test_a_4xx_with_nothing_useful_left_says_so_in_our_words() -> None:
    err = make_provider("vllm").map_error(400, orjson.dumps({"error": {"message": "https://x.example/y"}}), {})
    assert err.message == "The provider rejected the request (HTTP 400)."


def test_upstream_code_and_param_reach_the_client_only_when_identifier_shaped() -> None:
    body = orjson.dumps({"error": {"message": "bad", "code": "see http://10.0.0.1/", "param": "/etc/passwd x"}})
    err = make_provider("deepseek").map_error(400, body, {})
    assert err.code == "invalid_request_error" and err.param is None
    body = orjson.dumps({"error": {"message": "bad", "code": CLIENT_KEY, "param": KEY}})  # secret-shaped
    err = make_provider("deepseek").map_error(400, body, {})
    assert err.code == "invalid_request_error" and err.param is None
    body = orjson.dumps({"error": {"message": "bad", "code": "invalid_value", "param": "messages[0].content"}})
    err = make_provider("deepseek").map_error(400, body, {})
    assert err.code == "invalid_value" and err.param == "messages[0].content"
