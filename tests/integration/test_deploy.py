"""Deployment files as an operator runs them. There is no container engine here, so compose files are checked as data
(services, profiles, restart policies, pinned images, persistence, healthchecks on the configured port) and the
parts that run outside a container are run for real: `therouter healthcheck` against a live gateway, Prometheus's
config rendering, and every metric the Grafana dashboard queries against a live gateway's /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Fake, Gateway, make_key
from therouter.redisproc import free_port

MODEL = "deepseek/deepseek-v3.2"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose(repo_root: Path) -> dict[str, Any]:
    return _yaml(repo_root / "docker-compose.yml")  # type: ignore[no-any-return]


def test_compose_services_profiles_and_restart(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "gateway"} <= set(services)
    assert "profiles" not in services["redis"] and "profiles" not in services["gateway"]
    assert services["vllm"]["profiles"] == ["selfhost"]
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["grafana"]["profiles"] == ["observability"]
    for name, svc in services.items():
        assert svc.get("restart") in ("unless-stopped", "always"), name
        assert "healthcheck" in svc, name
    for name, svc in services.items():
        if "image" in svc:
            tag = svc["image"].rsplit(":", 1)
            assert len(tag) == 2 and tag[1] not in ("latest", ""), f"{name}: pin the image tag"
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", services["vllm"]["image"])


def test_redis_keeps_its_data(compose: dict[str, Any], repo_root: Path) -> None:
    cmd = compose["services"]["redis"]["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert "" not in cmd[cmd.index("--save") + 1:cmd.index("--save") + 2]  # never `--save ''`
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])
    from therouter.cli import REDIS_HINT

    hints = [ln for ln in (repo_root / "README.md").read_text().splitlines() if "redis-server --" in ln] + [REDIS_HINT]
    assert hints and all("--appendonly yes" in h and "--save ''" not in h and '--save ""' not in h for h in hints)


def test_healthchecks_follow_the_configured_port(compose: dict[str, Any], repo_root: Path) -> None:
    gw = compose["services"]["gateway"]
    assert gw["healthcheck"]["test"] == ["CMD", "therouter", "healthcheck"]
    assert gw["ports"] == ["${THEROUTER_PORT:-8080}:${THEROUTER_PORT:-8080}"]
    assert gw["environment"]["THEROUTER_PORT"] == "${THEROUTER_PORT:-8080}"
    shipped = _yaml(repo_root / "config" / "therouter.yaml")
    assert shipped["server"]["port"] == "${THEROUTER_PORT:-8080}"
    dockerfile = (repo_root / "Dockerfile").read_text()
    assert 'HEALTHCHECK' in dockerfile and '["therouter", "healthcheck"]' in dockerfile
    cmd = next(ln for ln in dockerfile.splitlines() if ln.startswith("CMD "))
    assert "--port" not in cmd and "8080" not in cmd  # the port comes from the config, like the healthcheck's
    prom = compose["services"]["prometheus"]
    assert prom["environment"]["THEROUTER_PORT"] == "${THEROUTER_PORT:-8080}"


def test_healthcheck_command_against_a_live_gateway(gateway: Gateway, tmp_path: Path) -> None:
    cfg = yaml.safe_load(gateway.config_path.read_text())
    cfg["server"]["port"] = int(gateway.url.rsplit(":", 1)[1])  # the port it serves on, in its config
    live = tmp_path / "live.yaml"
    live.write_text(yaml.safe_dump(cfg))
    cfg["server"]["port"] = free_port()  # nothing listens there
    dead = tmp_path / "dead.yaml"
    dead.write_text(yaml.safe_dump(cfg))
    run = [sys.executable, "-m", "therouter", "healthcheck", "--config"]
    ok = subprocess.run([*run, str(live)], capture_output=True, text=True, env=gateway.env, timeout=30, check=False)
    assert ok.returncode == 0 and "healthy" in ok.stdout, ok.stderr
    down = subprocess.run([*run, str(dead)], capture_output=True, text=True, env=gateway.env, timeout=30, check=False)
    assert down.returncode == 1 and "unhealthy" in down.stderr and "Traceback" not in down.stderr


def test_prometheus_config_is_rendered_with_port_and_token(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prometheus.yml"
    script = repo_root / "config" / "prometheus" / "entrypoint.sh"
    env = {"PATH": "/usr/bin:/bin", "PROMETHEUS_TEMPLATE": str(repo_root / "config" / "prometheus" / "prometheus.yml"),
           "PROMETHEUS_CONFIG": str(out), "THEROUTER_PORT": "9123", "METRICS_TOKEN": "tok-123"}
    r = subprocess.run(["sh", str(script), "echo", "started"], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "started", r.stderr
    job = _yaml(out)["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["gateway:9123"]
    assert job["authorization"] == {"type": "Bearer", "credentials": "tok-123"}
    del env["METRICS_TOKEN"]
    subprocess.run(["sh", str(script), "true"], env=env, check=True)
    assert "authorization" not in _yaml(out)["scrape_configs"][0]


def test_grafana_is_provisioned_with_the_dashboard(compose: dict[str, Any], repo_root: Path) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    provider = _yaml(repo_root / "config/grafana/provisioning/dashboards/therouter.yaml")["providers"][0]
    dashboards_dir = repo_root / mounts[provider["options"]["path"]]
    assert (dashboards_dir / "therouter.json").is_file()
    ds = _yaml(repo_root / "config/grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and mounts["/etc/grafana/provisioning"] == "./config/grafana/provisioning"
    dash = json.loads((dashboards_dir / "therouter.json").read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]}


def test_two_replicas_behind_nginx_share_one_redis(repo_root: Path) -> None:
    base = repo_root / "deploy" / "two-replicas"
    services = _yaml(base / "compose.yml")["services"]
    replicas = [n for n in services if n.startswith("gateway-")]
    assert len(replicas) == 2
    assert {services[n]["environment"]["REDIS_URL"] for n in replicas} == {"redis://redis:6379/0"}
    assert len({services[n]["volumes"][0] for n in replicas}) == 2  # a journal each
    assert all(services[n]["restart"] == "unless-stopped" for n in services)
    conf = (base / "nginx.conf").read_text()
    for n in replicas:
        assert f"server {n}:8080" in conf
    assert "proxy_buffering off" in conf and "proxy_read_timeout 600s" in conf
    cmd = services["redis"]["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"


def test_every_dashboard_metric_is_exported(gateway: Gateway, repo_root: Path, fakes: dict[str, Fake]) -> None:
    """Each metric name the dashboard's PromQL uses is one a real gateway exports after some traffic."""
    dash = json.loads((repo_root / "config/grafana/dashboards/therouter.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\btherouter_[a-z0-9_]+", e)}
    assert len(used) >= 14
    key = asyncio.run(make_key(gateway, "dash", rpm=2))
    client = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    for _ in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True):
        pass
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(gateway.url + "/metrics").text
    exported: set[str] = set()
    for fam in text_string_to_metric_families(text):
        exported.add(fam.name)
        exported.update(s.name for s in fam.samples)
        if fam.type == "counter":
            exported.add(fam.name + "_total")
        if fam.type == "histogram":
            exported.update(fam.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    assert used - exported == set()
