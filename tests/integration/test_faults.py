"""Upstream faults as real processes: fallback before the first byte, clean error events after it, cancellation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, CANARY, Fake, Gateway, post_raw, read_events

MODEL = "deepseek/deepseek-v3.2"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(autouse=True)
def _fresh_routing(gateway: Gateway) -> Iterator[None]:
    """Faults leave routing state behind on the shared gateway (a 429's Retry-After cooldown, failures counted toward
    a circuit): each test here starts from a fresh state, as after an operator's reset."""
    yield
    for provider in ("deepseek", "vllm-local", "sglang-local"):
        httpx.post(f"{gateway.url}/admin/providers/{provider}/reset",
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5).raise_for_status()


@pytest.mark.parametrize("kind", ["500", "503", "402", "401", "429"])
def test_primary_fault_falls_back_to_vllm(client: openai.OpenAI, fakes: dict[str, Fake], kind: str) -> None:
    fakes["deepseek"].configure(error_rate=1, error_kind=kind, retry_after=1)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    r = raw.parse()
    assert r.choices[0].message.content
    assert raw.headers["x-therouter-provider"] == "vllm-local"
    assert raw.headers["x-therouter-attempts"] == "2"


def test_primary_fault_falls_back_for_streams(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_rate=1, error_kind="503")
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert {c.model_extra["provider"] for c in chunks} == {"vllm-local"}


def test_in_band_error_as_first_event_falls_back(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_rate=1, error_kind="in_band")
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
    assert chunks and {c.model_extra["provider"] for c in chunks} == {"vllm-local"}


def test_client_error_from_upstream_is_not_retried(client: openai.OpenAI, fakes: dict[str, Fake], gateway: Gateway,
                                                   api_key: str) -> None:
    fakes["deepseek"].configure(error_rate=1, error_kind="400")
    before = fakes["vllm"].stats()["requests"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert fakes["vllm"].stats()["requests"] == before
    gen_id = e.value.response.headers["x-therouter-generation-id"]
    rec = httpx.get(gateway.v1 + "/generation", params={"id": gen_id},
                    headers={"Authorization": f"Bearer {api_key}"}).json()["data"]
    assert rec["outcome"] == "rejected" and rec["cost_nano"] == 0
    assert [(a["provider"], a["status"]) for a in rec["attempts"]] == [("deepseek", 400)]


def test_all_deployments_down_gives_clean_5xx(client: openai.OpenAI, fakes: dict[str, Fake],
                                               gateway: Gateway) -> None:
    for f in fakes.values():
        f.configure(error_rate=1, error_kind="503")
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert e.value.status_code in (502, 503, 504)
    body = e.value.body
    assert isinstance(body, dict) and "deepseek" in body["message"] and "vllm-local" in body["message"]
    assert CANARY not in json.dumps(body)
    rec = httpx.get(gateway.v1 + "/generation", params={"id": e.value.response.headers["x-therouter-generation-id"]},
                    headers={"Authorization": f"Bearer {client.api_key}"}).json()["data"]
    assert rec["outcome"] == "failed" and rec["cost_nano"] == 0 and len(rec["attempts"]) >= 2


def test_stream_cut_after_first_chunk_ends_with_error_event(gateway: Gateway, api_key: str,
                                                            fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_rate=1, error_kind="cut", cut_after=3)
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL, "messages": HELLO, "stream": True}, timeout=15) as r:
        assert r.status_code == 200
        body = r.read().decode()
    events = [e[6:] for e in body.split("\n\n") if e.startswith("data: ")]
    assert "[DONE]" not in events  # a truncated answer never looks complete
    last = json.loads(events[-1])
    assert last["error"]["type"] == "server_error" and last["error"]["message"]
    content = [json.loads(e) for e in events[:-1]]
    assert content and all("choices" in c for c in content)


def test_stream_cut_raises_in_sdk(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_rate=1, error_kind="cut", cut_after=2)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model=MODEL, messages=HELLO, stream=True):
            pass


def test_stream_stall_hits_idle_timeout(gateway: Gateway, api_key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_rate=1, error_kind="stall", stall_after=2, stall_ms=30000)
    t0 = time.monotonic()
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL, "messages": HELLO, "stream": True}, timeout=15) as r:
        body = r.read().decode()
    assert time.monotonic() - t0 < 10  # idle timeout in the test config is 2 s
    last = json.loads([e for e in body.split("\n\n") if e.startswith("data: ")][-1][6:])
    assert last["error"]["code"] == "stream_idle_timeout"


def test_malformed_event_mid_stream_ends_with_error(gateway: Gateway, api_key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_rate=1, error_kind="bad_json", bad_json_at=3)
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL, "messages": HELLO, "stream": True}, timeout=15) as r:
        body = r.read().decode()
    events = [e[6:] for e in body.split("\n\n") if e.startswith("data: ")]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]
    for e in events:
        json.loads(e)  # no garbage forwarded


def test_keepalive_comments_do_not_break_stream(client: openai.OpenAI, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(keepalive_comments=3, keepalive_ms=50)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = client.chat.completions.create(model=MODEL, messages=HELLO)  # blank lines before the JSON body
    assert r.choices[0].message.content


def test_keepalives_alone_trip_first_token_timeout_then_fall_back(client: openai.OpenAI,
                                                                   fakes: dict[str, Fake]) -> None:
    # 40 comments 100 ms apart = 4 s of keep-alives, first_token is 2 s: the clock must not be re-armed by comments
    fakes["deepseek"].configure(keepalive_comments=40, keepalive_ms=100)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
    assert {c.model_extra["provider"] for c in chunks} == {"vllm-local"}


def test_client_disconnect_cancels_upstream_stream(gateway: Gateway, api_key: str, fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(chunks=200, chunk_delay_ms=50)
    fakes["deepseek"].reset()
    s = post_raw(gateway, api_key, {"model": MODEL, "messages": HELLO, "stream": True})
    read_events(s, 3)
    s.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        st = fakes["deepseek"].stats()
        if st["in_flight"] == 0 and st["log"] and st["log"][-1].get("closed_by") == "client":
            break
        time.sleep(0.05)
    st = fakes["deepseek"].stats()
    assert st["in_flight"] == 0
    assert st["log"][-1]["closed_by"] == "client"
    assert st["log"][-1]["tokens_sent"] < 200


def test_client_leaving_during_first_token_wait_cancels_upstream(gateway: Gateway, api_key: str,
                                                                  fakes: dict[str, Fake]) -> None:
    """The first-chunk gate holds the 200 while the upstream thinks; a client that leaves then must not leave the
    upstream generating."""
    fakes["deepseek"].configure(ttft_ms=1800)
    fakes["deepseek"].reset()
    seen = len(gateway.logs())  # the gateway (and its log) is shared with the module's other tests
    s = post_raw(gateway, api_key, {"model": MODEL, "messages": HELLO, "stream": True})
    time.sleep(0.3)
    s.close()
    t_closed = time.monotonic()
    while time.monotonic() - t_closed < 1.2:
        log = fakes["deepseek"].stats()["log"]
        if log and log[-1].get("closed_by") == "client":
            break
        time.sleep(0.05)
    last = fakes["deepseek"].stats()["log"][-1]
    assert last.get("closed_by") == "client" and last["tokens_sent"] == 0
    # a client leaving is ordinary (a 499 in the request log), never a server error with a traceback
    deadline = time.monotonic() + 2
    while "outcome=client_cancelled" not in gateway.logs()[seen:] and time.monotonic() < deadline:
        time.sleep(0.05)
    logs = gateway.logs()[seen:]
    assert "outcome=client_cancelled" in logs
    assert "Exception in ASGI application" not in logs and "Traceback" not in logs


def test_upstream_redirect_is_not_followed(client: openai.OpenAI, fakes: dict[str, Fake], gateway: Gateway,
                                           api_key: str) -> None:
    """A 302 from the primary is a provider fault, never a hop to wherever it points: the fallback serves."""
    fakes["deepseek"].configure(error_kind="redirect")  # Location: http://127.0.0.1:1/
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    assert raw.headers["x-therouter-provider"] == "vllm-local"
    rec = httpx.get(gateway.v1 + "/generation", params={"id": raw.parse().id},
                    headers={"Authorization": f"Bearer {api_key}"}).json()["data"]
    first = rec["attempts"][0]
    # following it would have ended in a refused connection; the attempt shows the 302 itself was the answer
    assert first["provider"] == "deepseek" and first["code"] == "bad_upstream_response", first
