"""The `therouter` command line, run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from tests.integration.conftest import Gateway
from therouter.redisproc import free_port

MODEL = "deepseek/deepseek-v3.2"


def therouter(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "therouter", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, check=False)


def test_check_config_shipped_files(repo_root: Path) -> None:
    r = therouter("check-config", str(repo_root / "config" / "therouter.yaml"))
    assert r.returncode == 0, r.stderr
    assert "6 models" in r.stdout
    r = therouter("check-config", str(repo_root / "config" / "demo.yaml"), env={"REDIS_URL": "redis://127.0.0.1:1"})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("mutate,expect", [
    (lambda c: c["providers"]["deepseek"].update(kindd="x"), "providers.deepseek.kindd: unknown key"),
    (lambda c: c["models"]["deepseek/deepseek-v3.2"].update(context_length=-5),
     "models.deepseek/deepseek-v3.2.context_length"),
    (lambda c: c["models"]["deepseek/deepseek-v3.2"]["deployments"][1].update(provider="ghost"),
     "unknown provider 'ghost'"),
    (lambda c: c["providers"]["vllm-local"].update(kind="bedrock"), "providers.vllm-local.kind"),
    (lambda c: c["models"]["deepseek/deepseek-v3.2"]["pricing"].update(input="cheap"), "pricing"),
])
def test_check_config_names_file_and_key_path(repo_root: Path, tmp_path: Path, mutate: Any, expect: str) -> None:
    cfg = yaml.safe_load((repo_root / "config" / "therouter.yaml").read_text())
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = therouter("check-config", str(path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and expect in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_check_config_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server: {host: [unclosed\n")
    r = therouter("check-config", str(path))
    assert r.returncode == 2 and str(path) in r.stderr and "invalid YAML" in r.stderr
    r = therouter("check-config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_serve_without_redis_says_so_in_one_line(repo_root: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    r = therouter("serve", "--config", str(repo_root / "config" / "therouter.yaml"), "--port", str(free_port()),
                  env={"REDIS_URL": dead}, timeout=20)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and "redis-server" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def _cfg_env(gateway: Gateway) -> dict[str, str]:
    return gateway.env


def test_keys_create_list_revoke(gateway: Gateway) -> None:
    cfg = str(gateway.config_path)
    r = therouter("keys", "--config", cfg, "create", "--name", "cli-user", "--budget", "5", "--budget-period",
                  "month", "--rpm", "100", "--tpm", "100000", "--models", MODEL, env=gateway.env)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("tr-") and len(key) > 30
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]).id
    with pytest.raises(openai.PermissionDeniedError):  # restricted to one model
        client.chat.completions.create(model="selfhost/only-vllm", messages=[{"role": "user", "content": "hi"}])

    listing = therouter("keys", "--config", cfg, "list", env=gateway.env)
    assert listing.returncode == 0
    assert "cli-user" in listing.stdout and key not in listing.stdout and key[-4:] in listing.stdout
    key_id = next(line.split()[0] for line in listing.stdout.splitlines() if "cli-user" in line)

    r = therouter("keys", "--config", cfg, "revoke", key_id, env=gateway.env)
    assert r.returncode == 0
    import time

    time.sleep(2.1)  # the gateway's positive key cache is fresh for 2 s
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert therouter("keys", "--config", cfg, "revoke", "key_nope", env=gateway.env).returncode == 1


def test_keys_create_bad_budget_and_model(gateway: Gateway) -> None:
    cfg = str(gateway.config_path)
    r = therouter("keys", "--config", cfg, "create", "--name", "x", "--budget", "lots", env=gateway.env)
    assert r.returncode == 2 and "budget" in r.stderr and "Traceback" not in r.stderr
    r = therouter("keys", "--config", cfg, "create", "--name", "x", "--models", "no/such", env=gateway.env)
    assert r.returncode == 2 and "no/such" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--rpm", "-5"], "--rpm: must be at least 1"), (["--tpm", "0"], "--tpm: must be at least 1"),
    (["--rpm", "ten"], "--rpm: must be a whole number"), (["--budget", "0"], "--budget must be more than 0"),
    (["--budget", "-1"], "--budget must not be negative"), (["--budget", "NaN"], "--budget must be a finite"),
    (["--budget", "1e30"], "--budget must be at most"),
    (["--model-limit", f"{MODEL}=0/-"], "limits must be at least 1"),
    (["--model-limit", f"{MODEL}=-/-3"], "limits must be at least 1"),
])
def test_keys_create_refuses_limits_that_mean_nothing(gateway: Gateway, args: list[str], needle: str) -> None:
    before = therouter("keys", "--config", str(gateway.config_path), "list", env=gateway.env).stdout
    r = therouter("keys", "--config", str(gateway.config_path), "create", "--name", "bad-limits", *args,
                  env=gateway.env)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "tr-" not in r.stdout
    assert therouter("keys", "--config", str(gateway.config_path), "list", env=gateway.env).stdout == before


def test_keys_revoke_never_echoes_a_plaintext_key(gateway: Gateway) -> None:
    cfg = str(gateway.config_path)
    made = therouter("keys", "--config", cfg, "create", "--name", "pasted", env=gateway.env)
    key = made.stdout.strip().splitlines()[-1]
    for arg in (key, "tr-" + "x" * 40, "sk-not-a-key-id-12345"):
        r = therouter("keys", "--config", cfg, "revoke", arg, env=gateway.env)
        assert r.returncode == 2
        assert arg not in r.stdout + r.stderr and arg[-8:] not in r.stdout + r.stderr
        assert "key id" in r.stderr and "key_" in r.stderr
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]).id  # not revoked


def test_prices_set_refuses_absurd_prices(gateway: Gateway) -> None:
    cfg = str(gateway.config_path)
    for price, needle in (("NaN", "finite"), ("1e30", "at most"), ("-2", "negative")):
        r = therouter("prices", "--config", cfg, "set", "test/vision-less", "--input", price, "--output", "1",
                      env=gateway.env)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_health_and_ready(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok"}
    r = httpx.get(gateway.url + "/ready")
    body = r.json()
    assert r.status_code == 200 and body["store"] == "ok"
    assert f"{MODEL}@deepseek" in body["usable_deployments"]
    # the provider whose server is not running is reported and skipped
    assert body["providers"]["nowhere"]["ok"] is False
    # a deployment whose upstream id the hosted provider no longer lists is reported, in /ready and in the log
    assert body["providers"]["deepseek"]["missing_models"] == ["deepseek-chat"]
    assert "deepseek no longer lists deepseek-chat" in gateway.logs()


def test_metrics_endpoint(gateway: Gateway, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(gateway.url + "/metrics").text
    assert 'therouter_upstream_attempts_total{outcome="ok",provider="deepseek"}' in text


def test_prices_and_usage_commands(gateway: Gateway, client: openai.OpenAI) -> None:
    cfg = str(gateway.config_path)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    r = therouter("prices", "--config", cfg, "show", env=gateway.env)
    assert r.returncode == 0 and MODEL in r.stdout and "0.96" in r.stdout and "2.88" in r.stdout
    r = therouter("prices", "--config", cfg, "set", "test/vision-less", "--input", "0.5", "--output", "1.5",
                  env=gateway.env)
    assert r.returncode == 0, r.stderr
    assert "version 2" in r.stdout
    r = therouter("prices", "--config", cfg, "set", "no/such", "--input", "1", "--output", "1", env=gateway.env)
    assert r.returncode == 2
    r = therouter("usage", "--config", cfg, env=gateway.env)
    assert r.returncode == 0 and MODEL in r.stdout
    assert any(line.split()[0].startswith("key_") for line in r.stdout.splitlines()[1:])


def test_keys_rebuild_totals_restores_counters_from_the_records(gateway: Gateway) -> None:
    cfg = str(gateway.config_path)
    r = therouter("keys", "--config", cfg, "create", "--name", "rebuilt", "--budget", "5", env=gateway.env)
    assert r.returncode == 0, r.stderr
    key_id = r.stdout.split("created key ", 1)[1].split()[0]
    client = openai.OpenAI(base_url=gateway.v1, api_key=r.stdout.strip().splitlines()[-1], max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    total = f"{gateway.prefix}{{k:{key_id}}}:per:total"
    with redis.Redis.from_url(gateway.redis_url, decode_responses=True) as rds:
        for _ in range(100):  # settlement may finish just after the answer
            if rds.hget(total, "requests") == "2":
                break
            time.sleep(0.05)
        good = rds.hgetall(total)
        assert good["requests"] == "2" and int(good["cost"]) > 0
        rds.hset(total, mapping={"cost": "1", "requests": "7"})  # counters that drifted from the records

        r = therouter("keys", "--config", cfg, "rebuild-totals", key_id, env=gateway.env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{key_id}: 2 records; counters did not match them; rewritten from the records"
        assert rds.hgetall(total) == good
    r = therouter("keys", "--config", cfg, "rebuild-totals", key_id, env=gateway.env)
    assert "counters matched them" in r.stdout
    r = therouter("keys", "--config", cfg, "rebuild-totals", "key_000000000000", env=gateway.env)
    assert r.returncode == 1 and "no key with id" in r.stderr
