"""What reaches the client from upstream (issue 7, point 7), against real processes with the OpenAI SDK.

The fake upstreams answer with careless error bodies (``echo_request``): the request's headers with our provider key
(plain, base64, URL-encoded), the start of the prompt, a URL, an IP:port, a file path and a Python traceback. The
client sees a 4xx explanation's useful words and otherwise our own words naming the provider; the attempt record
and the gateway log keep the full text, minus secrets.
"""

from __future__ import annotations

import json
import time

import openai
import pytest
import yaml

from tests.integration.conftest import Fake, Gateway
from tests.integration.upstream_helpers import (
    ECHO_PATH,
    ECHO_PEER,
    MODEL,
    NOWHERE_MODEL,
    UNHEALTHY_MODEL,
    error_event,
    leaks,
    module_fixtures,
    provider_report,
    record,
    secrets_in,
    stream_raw,
)

gw, _fresh_routing, key = module_fixtures("upstream-text")


def sdk(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)


def prompt(key: str) -> list[dict[str, str]]:
    # a user pasting their own gateway key: a careless upstream echoes it back with the prompt
    return [{"role": "user", "content": f"why does my key {key} not work?"}]


def assert_clean(text: str, key: str) -> None:
    found = [leak for leak in leaks(key) if leak in text]
    assert not found, (found, text)


def assert_full_but_secret_free(text: str, key: str) -> None:
    assert "Traceback (most recent call last)" in text and ECHO_PATH in text and ECHO_PEER in text, text
    assert not secrets_in(text, key), (secrets_in(text, key), text)


@pytest.mark.parametrize("kind,useful", [
    ("400", "Invalid request (injected by fake upstream)"),
    ("context_length", "maximum context length is 131072 tokens"),
])
def test_a_4xx_explanation_reaches_the_client_sanitised(gw: Gateway, key: str, fakes: dict[str, Fake], kind: str,
                                                        useful: str) -> None:
    fakes["deepseek"].configure(error_kind=kind, echo_request=True)
    with pytest.raises(openai.BadRequestError) as ei:
        sdk(gw, key).chat.completions.create(model=MODEL, messages=prompt(key))  # type: ignore[arg-type]
    e = ei.value
    assert isinstance(e.body, dict) and useful in e.body["message"]  # the useful words stay
    assert_clean(json.dumps(e.body) + str(e) + json.dumps(dict(e.response.headers)), key)
    sent = fakes["deepseek"].last()
    assert sent["headers"]["authorization"] == "valid"  # the fake did get our key, and echoed it

    rec = record(gw, key, e.response.headers["x-therouter-generation-id"])
    assert rec["outcome"] == "rejected"
    (attempt,) = rec["attempts"]
    assert attempt["provider"] == "deepseek" and attempt["status"] == 400
    assert_full_but_secret_free(attempt["error"], key)
    assert_full_but_secret_free(gw.logs(), key)


@pytest.mark.parametrize("stream", [False, True])
def test_5xx_bodies_never_reach_the_client(gw: Gateway, key: str, fakes: dict[str, Fake], stream: bool) -> None:
    for f in fakes.values():
        f.configure(error_kind="503", echo_request=True)
    with pytest.raises(openai.InternalServerError) as ei:  # a stream too: nothing passed the first-chunk gate
        sdk(gw, key).chat.completions.create(model=MODEL, messages=prompt(key), stream=stream)  # type: ignore
    e = ei.value
    assert isinstance(e.body, dict)
    msg = e.body["message"]
    for name in ("deepseek", "vllm-local", "sglang-local"):  # each provider named by its config name...
        assert name in msg
    assert "HTTP 503" in msg and "Server overloaded" not in msg  # ...in our words, not theirs
    assert_clean(json.dumps(e.body) + str(e), key)

    rec = record(gw, key, e.response.headers["x-therouter-generation-id"])
    assert rec["outcome"] == "failed" and len(rec["attempts"]) >= 3
    for attempt in rec["attempts"]:
        assert "Server overloaded, please retry shortly" in attempt["error"]
        assert_full_but_secret_free(attempt["error"], key)


def test_a_connect_error_names_the_provider_not_its_address(gw: Gateway, key: str) -> None:
    port = closed_port(gw)
    with pytest.raises(openai.InternalServerError) as ei:
        sdk(gw, key).chat.completions.create(model=NOWHERE_MODEL, messages=prompt(key))  # type: ignore[arg-type]
    e = ei.value
    assert isinstance(e.body, dict) and "nowhere-hosted" in e.body["message"]
    assert port not in json.dumps(e.body) and "Connect call failed" not in json.dumps(e.body)
    assert_clean(json.dumps(e.body), key)
    rec = record(gw, key, e.response.headers["x-therouter-generation-id"])
    assert rec["attempts"] and all(a["code"] == "upstream_connect_error" for a in rec["attempts"])
    assert port in rec["attempts"][0]["error"]  # the OS's words, with the address, for the operator


def test_an_unhealthy_deployment_is_skipped_without_its_address(gw: Gateway, key: str) -> None:
    """The health check's failure is the skip reason the client reads: our words only."""
    deadline = time.monotonic() + 10
    while (provider_report(gw, "nowhere")["health"] or {}).get("ok") is not False:
        assert time.monotonic() < deadline, "the health check never ran"
        time.sleep(0.1)
    with pytest.raises(openai.InternalServerError) as ei:
        sdk(gw, key).chat.completions.create(model=UNHEALTHY_MODEL, messages=prompt(key))  # type: ignore[arg-type]
    body = json.dumps(ei.value.body)
    assert "nowhere: unhealthy" in body
    assert closed_port(gw) not in body and "Connect call failed" not in body
    assert_clean(body, key)


def closed_port(gw: Gateway) -> str:
    cfg = yaml.safe_load(gw.config_path.read_text())
    return str(cfg["providers"]["nowhere"]["base_url"].rsplit(":", 1)[1].split("/")[0])


def test_an_in_band_error_mid_stream_is_our_words_and_the_record_keeps_theirs(gw: Gateway, key: str,
                                                                             fakes: dict[str, Fake]) -> None:
    fakes["deepseek"].configure(error_kind="in_band_mid", cut_after=2, echo_request=True)
    r, events = stream_raw(gw, key, {"model": MODEL, "messages": prompt(key)})
    assert r.status_code == 200
    err = error_event(events)
    assert err["message"] == "Provider `deepseek` failed mid-stream: The provider reported an error in its stream."
    assert err["code"] == "upstream_in_band_error"
    content = [json.loads(e) for e in events[:-1]]
    assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in content)  # it had started
    assert_clean("\n".join(events), key)

    rec = record(gw, key, r.headers["x-therouter-generation-id"])
    assert rec["outcome"] == "upstream_error"
    broke = rec["attempts"][-1]["stream_error"]
    assert broke["code"] == "upstream_in_band_error"
    assert_full_but_secret_free(broke["error"], key)
    assert_full_but_secret_free(gw.logs(), key)
