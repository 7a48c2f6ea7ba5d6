"""Command line: serve, check-config, keys, prices, usage, fake-upstream, demo. A leaf: nothing imports it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import ValidationError

from therouter.config import DEFAULT_CONFIG_PATH, ConfigError, Settings, load_settings
from therouter.errors import InvalidRequest
from therouter.keys import KEY_ID, KEY_PREFIX
from therouter.keyspec import MAX_BUDGET_USD, key_fields

REDIS_HINT = ("start one with `redis-server --port 6379 --appendonly yes --daemonize yes` (or `apt-get install -y "
              "redis-server`), then set REDIS_URL or store.redis_url")


def _settings(path: str | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


async def _with_store(settings: Settings, fn: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    from therouter.errors import StoreUnavailable
    from therouter.store import Store

    store = Store(settings.store)
    try:
        if not await store.ping():
            print(f"error: Redis at {_safe_url(settings.store.redis_url)} is unreachable; {REDIS_HINT}",
                  file=sys.stderr)
            return 3
        return await fn(store)
    except StoreUnavailable as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 3
    finally:
        await store.aclose()


def _safe_url(url: str) -> str:
    from therouter.logs import safe_url

    return safe_url(url)


# ---- serve / check-config -------------------------------------------------------------------------------------


def cmd_check_config(a: argparse.Namespace) -> int:
    s = _settings(a.config_path or a.config)
    n_dep = sum(len(m.deployments) for m in s.models.values())
    print(f"ok: {len(s.providers)} providers, {len(s.models)} models, {n_dep} deployments")
    return 0


WORKERS_ENV = "THEROUTER_WORKERS"  # set by `serve --workers N` for its worker processes


def app_factory() -> Any:
    """uvicorn factory for --workers N (each worker reads the config named in THEROUTER_CONFIG)."""
    from therouter.app import create_app

    return create_app(worker_settings())


def worker_settings() -> Settings:
    """A worker's settings: the config named in THEROUTER_CONFIG, with the worker count `serve` started (which
    `--workers` may have set over `server.workers`): each worker's share of a rate limit while Redis is down
    follows it."""
    s = load_settings(os.environ.get("THEROUTER_CONFIG"))
    n = os.environ.get(WORKERS_ENV)
    return with_workers(s, int(n)) if n else s


def with_workers(s: Settings, workers: int) -> Settings:
    """These settings with ``server.workers`` set (validated like the config's own value)."""
    if workers == s.server.workers:
        return s
    try:
        server = type(s.server).model_validate({**s.server.model_dump(), "workers": workers})
    except ValidationError as e:
        raise ConfigError(f"--workers: {e.errors()[0]['msg']}") from None
    return s.model_copy(update={"server": server})


def cmd_serve(a: argparse.Namespace) -> int:
    import logging.config

    from therouter.logs import dict_config
    from therouter.server import uvicorn_options

    s = _settings(a.config)
    log_config = dict_config(a.log_format or s.server.log_format, a.log_level)
    logging.config.dictConfig(log_config)
    code = _run(_with_store(s, _noop))
    if code:
        return code
    host = a.host or s.server.host
    port = a.port if a.port is not None else s.server.port
    workers = a.workers if a.workers is not None else s.server.workers
    try:
        s = with_workers(s, workers)  # the metering's fail-open share (MeterOptions.local_limit_divisor) follows it
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config_path = os.path.abspath(a.config or os.environ.get("THEROUTER_CONFIG") or DEFAULT_CONFIG_PATH)
    _announce(s, host, port, workers, config_path)
    kw: dict[str, Any] = {"host": host, "port": port, "log_level": a.log_level, **uvicorn_options(s),
                          "log_config": log_config, "access_log": False}
    if workers > 1:
        _serve_workers(config_path, workers, kw)
    else:
        import uvicorn

        from therouter.app import create_app
        from therouter.observability import clear_multiproc_dir

        clear_multiproc_dir()  # a PROMETHEUS_MULTIPROC_DIR set by the operator starts empty
        uvicorn.run(create_app(s), **kw)
    return 0


def _serve_workers(config_path: str, workers: int, kw: dict[str, Any]) -> None:
    """N uvicorn workers sharing one metrics folder (prometheus-client's multiprocess mode), fresh for this run:
    set before any worker imports prometheus-client, emptied at the start and removed (or emptied) at the end."""
    import shutil
    import tempfile

    import uvicorn

    from therouter.observability import MULTIPROC_ENV, clear_multiproc_dir, multiproc_dir

    given = multiproc_dir()
    path = given or tempfile.mkdtemp(prefix="therouter-metrics-")
    os.makedirs(path, exist_ok=True)
    clear_multiproc_dir(path)  # another run's numbers would be added to this one's
    os.environ[MULTIPROC_ENV] = path
    os.environ["THEROUTER_CONFIG"] = config_path
    os.environ[WORKERS_ENV] = str(workers)
    try:
        uvicorn.run("therouter.cli:app_factory", factory=True, workers=workers, **kw)
    finally:
        if given:
            clear_multiproc_dir(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _announce(s: Settings, host: str, port: int, workers: int, config_path: str) -> None:
    """At the default level: where it listens, with how many workers, which config and Redis, each provider."""
    import logging

    from therouter.logs import safe_url

    log = logging.getLogger("therouter.serve")
    redis = safe_url(s.store.redis_url)
    log.info("listening on http://%s:%d with %d worker%s; config %s; Redis %s", host, port, workers,
             "" if workers == 1 else "s", config_path, redis,
             extra={"event": "serve", "host": host, "port": port, "workers": workers, "config": config_path,
                    "redis": redis})
    for name, p in s.providers.items():
        where = "hosted" if p.is_hosted else "self-hosted"
        state = "configured"
        if p.is_hosted and p.api_key_env and p.api_key is None:
            state = f"skipped by routing: {p.api_key_env} is not set"
        log.info("provider %s (%s, %s) at %s: %s", name, p.kind, where, safe_url(p.base_url), state,
                 extra={"event": "provider", "provider": name, "kind": p.kind, "hosted": p.is_hosted,
                        "base_url": safe_url(p.base_url), "state": state})


async def _noop(store: Any) -> int:
    return 0


def cmd_healthcheck(a: argparse.Namespace) -> int:
    """For container healthchecks: GET /health on the port the config gives ``serve`` (so it follows it)."""
    import httpx

    s = _settings(a.config)
    host = s.server.host if s.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    port = a.port if a.port is not None else s.server.port
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/health"
    try:
        ok = httpx.get(url, timeout=a.timeout).status_code == 200
    except httpx.HTTPError as e:
        print(f"unhealthy: {url}: {type(e).__name__}", file=sys.stderr)
        return 1
    print(f"{'healthy' if ok else 'unhealthy'}: {url}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


# ---- keys -----------------------------------------------------------------------------------------------------


CLI_LABELS = {"name": "--name", "budget_usd": "--budget", "budget_period": "--budget-period", "rpm": "--rpm",
              "tpm": "--tpm", "models": "--models", "model_limits": "--model-limit", "expires_at": "--expires-at",
              "metadata": "--metadata"}
CLEARABLE = {"budget": "budget_usd", "rpm": "rpm", "tpm": "tpm", "models": "models", "model-limits": "model_limits",
             "expires-at": "expires_at", "metadata": "metadata"}


def _key_body(a: argparse.Namespace) -> dict[str, Any]:
    """The flags of `keys create|update` -> the body POST / PATCH /admin/keys take (keyspec checks both alike)."""
    body: dict[str, Any] = {}
    for flag, field in (("name", "name"), ("budget", "budget_usd"), ("budget_period", "budget_period"),
                        ("rpm", "rpm"), ("tpm", "tpm"), ("expires_at", "expires_at")):
        if getattr(a, flag, None) is not None:
            body[field] = getattr(a, flag)
    if a.models is not None:
        body["models"] = [m.strip() for m in a.models.split(",") if m.strip()]
    if a.model_limit:
        try:
            body["model_limits"] = {m: {"rpm": r, "tpm": t} for m, (r, t) in map(_model_limit, a.model_limit)}
        except ValueError as e:
            raise ValueError(f"--model-limit {e}") from None
    if a.metadata:
        pairs = [m.partition("=") for m in a.metadata]
        if any(not k or not sep for k, sep, _ in pairs):
            raise ValueError("--metadata takes KEY=VALUE")
        body["metadata"] = {k: v for k, _, v in pairs}
    for name in getattr(a, "clear", None) or ():
        body[CLEARABLE[name]] = None
    return body


def _key_fields(a: argparse.Namespace, s: Settings, creating: bool) -> dict[str, Any]:
    try:
        return key_fields(_key_body(a), s.models, time.time(), creating=creating, labels=CLI_LABELS,
                          aliases=s.aliases)
    except InvalidRequest as e:
        raise ValueError(e.message) from None


def _key_id_ok(key_id: str, action: str) -> bool:
    if KEY_ID.fullmatch(key_id):
        return True
    what = "an API key itself, not a key id" if key_id.startswith(KEY_PREFIX) else "not a key id"
    # never echoed: it may be a plaintext key pasted by mistake
    print(f"error: that is {what}; {action} by the key id (key_..., shown by `therouter keys list`)", file=sys.stderr)
    return False


def cmd_keys(a: argparse.Namespace) -> int:
    from therouter.metering.prices import nano_to_usd

    s = _settings(a.config)
    try:
        fields = _key_fields(a, s, creating=True) if a.keys_cmd == "create" else \
            _key_fields(a, s, creating=False) if a.keys_cmd == "update" else {}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    async def create(store: Any) -> int:
        plaintext, rec = await store.create_key(fields.pop("name"), **fields)
        print(f"created key {rec.id} ({rec.name}); it is shown once, store it now:")
        print(plaintext)
        return 0

    async def list_(store: Any) -> int:
        now = time.time()
        print(f"{'id':<18} {'name':<20} {'key':<16} {'status':<8} {'budget':<14} {'rpm':>6} {'tpm':>9} models")
        for r in await store.list_keys():
            budget = "-" if r.budget_nano is None else f"${nano_to_usd(r.budget_nano)}/{r.budget_period}"
            print(f"{r.id:<18} {r.name[:20]:<20} {r.hint:<16} {r.status(now):<8} "
                  f"{budget:<14} {r.rpm or '-':>6} {r.tpm or '-':>9} {','.join(r.models) or '*'}")
        return 0

    async def show(store: Any) -> int:
        rec = (await store.keys_by_ids([a.id])).get(a.id)
        if rec is None:
            print(f"error: no key with id {a.id}", file=sys.stderr)
            return 1
        detail = await _meter(s, store).reports.key_detail(rec)
        print(json.dumps({**rec.public(), **detail}, indent=2))
        return 0

    async def update(store: Any) -> int:
        rec = (await store.keys_by_ids([a.id])).get(a.id)
        if rec is None or rec.revoked:
            print(f"error: {'no key with id' if rec is None else 'a revoked key cannot be changed:'} {a.id}",
                  file=sys.stderr)
            return 1
        updated = await store.update_key(a.id, **fields)
        print(f"updated {a.id} (every gateway applies it within 2 s):")
        print(json.dumps(updated.public(), indent=2))
        return 0

    async def revoke(store: Any) -> int:
        if await store.revoke_key(a.id):
            print(f"revoked {a.id}")
            return 0
        print(f"error: no key with id {a.id}", file=sys.stderr)
        return 1

    async def rebuild(store: Any) -> int:
        if a.id not in await store.keys_by_ids([a.id]):
            print(f"error: no key with id {a.id}", file=sys.stderr)
            return 1
        report = await _meter(s, store).rebuild_totals(a.id)
        if a.json:
            print(json.dumps(report, indent=2))
            return 0
        left = "; left as they are: " + ("records kept arriving meanwhile, run it again" if report["complete"] else
                                         "the record stream was trimmed, so it no longer holds every record")
        print(f"{a.id}: {report['records']} records; counters " + ("matched them" if report["match"] else
              "did not match them") + ("; rewritten from the records" if report["written"] else left))
        return 0

    if a.keys_cmd in ("show", "update", "revoke", "rebuild-totals") and not _key_id_ok(a.id, a.keys_cmd):
        return 2
    fn = {"create": create, "list": list_, "show": show, "update": update, "revoke": revoke,
          "rebuild-totals": rebuild}[a.keys_cmd]
    return _run(_with_store(s, fn))


def _model_limit(spec: str) -> tuple[str, tuple[int | None, int | None]]:
    """MODEL=RPM/TPM, either side '-' for none (e.g. deepseek/deepseek-v4-pro=10/50000)."""
    model, sep, limits = spec.rpartition("=")
    rpm_s, sep2, tpm_s = limits.partition("/")
    if not sep or not sep2 or not model:
        raise ValueError(f"{spec!r}: expected MODEL=RPM/TPM ('-' for no limit)")

    def num(v: str) -> int | None:
        if v.strip() == "-":
            return None
        try:
            return positive_int(v)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{spec!r}: limits {e} ('-' for no limit)") from None

    return model, (num(rpm_s), num(tpm_s))


def positive_int(v: str) -> int:
    """A rate limit: a whole number >= 1 (no limit is written by leaving the option out)."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n} (leave it out for no limit)")
    return n


# ---- prices / usage ------------------------------------------------------------------------------------------


def _meter(settings: Settings, store: Any) -> Any:
    from pathlib import Path

    from therouter.metering.meter import Meter

    return Meter(store, settings, Path(settings.data_dir) / "journal")


def cmd_prices(a: argparse.Namespace) -> int:
    from therouter.errors import InvalidRequest

    s = _settings(a.config)

    async def run(store: Any) -> int:
        meter = _meter(s, store)
        if a.prices_cmd == "set":
            if a.model not in s.models:
                print(f"error: unknown model {a.model!r}", file=sys.stderr)
                return 2
            try:
                pv = await meter.set_price(a.model, a.input, a.cached_input or a.input, a.output,
                                           cache_write_usd=a.cache_write)
            except InvalidRequest as e:
                print(f"error: {e.message}", file=sys.stderr)
                return 2
            pub = pv.public()
            print(f"{a.model}: version {pv.version} (USD per 1M tokens: input {pub['input_usd']}, "
                  f"cached_input {pub['cached_input_usd']}, output {pub['output_usd']}"
                  + (f", cache_write {pub['cache_write_usd']})" if "cache_write_usd" in pub else ")"))
            return 0
        rows = await meter.list_prices()
        print(f"{'model':<32} {'version':>7} {'input':>10} {'cached':>10} {'output':>10}  source  (USD per 1M tokens)")
        for r in rows:
            c = r["current"] or {}
            print(f"{r['model']:<32} {c.get('version', '-'):>7} {c.get('input_usd', '-'):>10} "
                  f"{c.get('cached_input_usd', '-'):>10} {c.get('output_usd', '-'):>10}  {c.get('source', '-')}")
        return 0

    return _run(_with_store(s, run))


def cmd_usage(a: argparse.Namespace) -> int:
    from therouter.metering.usage import usage_query

    s = _settings(a.config)
    try:
        q = usage_query(a.group_by, a.from_day, a.to_day, time.time(), days=a.days, key_id=a.key)
    except InvalidRequest as e:
        print(f"error: --{(e.param or 'group_by').replace('_', '-')}: {e.message}", file=sys.stderr)
        return 2

    async def run(store: Any) -> int:
        report = await _meter(s, store).reports.usage(q)
        if a.json:
            print(json.dumps(report, indent=2))
        elif a.csv:
            _usage_csv(report)
        else:
            _usage_table(report)
        return 0

    return _run(_with_store(s, run))


def _usage_columns(report: dict[str, Any]) -> list[str]:
    dims = {"key": ["key_id", "key_name"], "model": ["model"], "provider": ["provider"], "day": ["day"]}
    return [c for d in report["group_by"] for c in dims[d]] + [
        "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cost_usd"]


def _usage_csv(report: dict[str, Any]) -> None:
    import csv

    cols = _usage_columns(report)
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(cols)
    for r in report["data"]:
        w.writerow(["" if r.get(c) is None else r[c] for c in cols])


def _usage_table(report: dict[str, Any]) -> None:
    cols = _usage_columns(report)
    width = {"key_id": 18, "key_name": 16, "model": 32, "provider": 16, "day": 10}
    print(f"usage {report['from']} .. {report['to']} (UTC)")
    print(" ".join(f"{c:<{width[c]}}" if c in width else f"{c.removesuffix('_tokens'):>12}" for c in cols))
    for r in report["data"]:
        print(" ".join(f"{str(r.get(c) or '-')[:width[c]]:<{width[c]}}" if c in width else f"{r[c]:>12}"
                       for c in cols))
    t = report["total"]
    print(f"total: {t['requests']} requests, {t['prompt_tokens']} prompt + {t['completion_tokens']} completion "
          f"tokens, {t['cost_usd']} USD")


# ---- fake-upstream / demo ---------------------------------------------------------------------------------------


def cmd_fake_upstream(rest: list[str]) -> int:
    from therouter.fakeupstream import main as fake_main

    return fake_main(rest)


def cmd_demo(a: argparse.Namespace) -> int:
    from therouter.demo import run_demo

    return run_demo(port=a.port, data_dir=a.data_dir)


# ---- parser -----------------------------------------------------------------------------------------------------


CONFIG_HELP = "config file (default: $THEROUTER_CONFIG or config/therouter.yaml)"


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="config", default=argparse.SUPPRESS, help=CONFIG_HELP)


def _key_flags(parser: argparse.ArgumentParser, creating: bool) -> None:
    """The settings `keys create` and `keys update` share (the same fields as POST / PATCH /admin/keys)."""
    keep = "" if creating else "; default: unchanged"
    parser.add_argument("--name", required=creating, help="a name for the key, shown in listings and usage"
                        + ("" if creating else " (default: unchanged)"))
    parser.add_argument("--budget", help=f"spend limit in USD (more than 0, at most {MAX_BUDGET_USD:,}"
                        + (")" if creating else "; --clear budget for none)"))
    parser.add_argument("--budget-period", choices=["total", "day", "month"], default="total" if creating else None,
                        help="what the budget covers: the key's whole life, each UTC day or each UTC month"
                        + (" (default: total)" if creating else keep))
    parser.add_argument("--rpm", type=positive_int, help="requests per minute (>= 1"
                        + ("; default: no limit)" if creating else keep + ")"))
    parser.add_argument("--tpm", type=positive_int, help="tokens per minute (>= 1"
                        + ("; default: no limit)" if creating else keep + ")"))
    parser.add_argument("--models", help="comma-separated model ids this key may use"
                        + (" (default: all)" if creating else " (replaces the list; --clear models for all)"))
    parser.add_argument("--model-limit", action="append", metavar="MODEL=RPM/TPM",
                        help="a per-model override of the rate limits, on top of --rpm/--tpm ('-' for none); "
                        "repeatable" + ("" if creating else "; replaces every override"))
    parser.add_argument("--expires-at", metavar="WHEN",
                        help="when the key stops working: unix seconds or ISO 8601, e.g. 2030-01-31T00:00:00Z"
                        + (" (default: never)" if creating else keep))
    parser.add_argument("--metadata", action="append", metavar="KEY=VALUE",
                        help="a label for the key (up to 16); repeatable" + ("" if creating else "; replaces all"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="therouter", description="OpenAI-compatible LLM routing gateway")
    p.add_argument("--config", help=CONFIG_HELP)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gateway")
    _config_flag(s)
    s.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default: server.port, 8080)")
    s.add_argument("--workers", type=int, help="worker processes (default: server.workers, 1); metrics sum over all")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                   help="log level (default: info: one line per request, start-up and notable events)")
    s.add_argument("--log-format", choices=["text", "json"],
                   help="log line format (default: server.log_format, text); json: one object per line")
    s.set_defaults(fn=cmd_serve)

    h = sub.add_parser("healthcheck", help="exit 0 if the gateway answers /health on its configured port")
    _config_flag(h)
    h.add_argument("--port", type=int, help="check this port instead of server.port")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    h.set_defaults(fn=cmd_healthcheck)

    c = sub.add_parser("check-config", help="validate a config file without starting")
    c.add_argument("config_path", nargs="?", help="the file to check (default: --config, $THEROUTER_CONFIG or "
                   "config/therouter.yaml)")
    c.set_defaults(fn=cmd_check_config)

    k = sub.add_parser("keys", help="create, list, show, update and revoke API keys; rebuild their counters")
    _config_flag(k)
    ks = k.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    _key_flags(ks.add_parser("create", help="create a key; prints it once, alone on the last line"), creating=True)
    ks.add_parser("list", help="every key: id, name, hint, status, budget and limits (never the key itself)")
    kshow = ks.add_parser("show", help="one key as JSON: settings, spend per period, last used")
    kshow.add_argument("id", help="the key's id (key_..., see `keys list`), never the key itself")
    ku = ks.add_parser("update", help="change a key's settings; every gateway applies it within 2 s")
    ku.add_argument("id", help="the key's id (key_..., see `keys list`), never the key itself")
    _key_flags(ku, creating=False)
    ku.add_argument("--clear", action="append", choices=sorted(CLEARABLE),
                    help="remove a setting (no budget, no limit, all models, never expires, no metadata); repeatable")
    kr = ks.add_parser("revoke", help="stop a key for good (it then gets an unknown key's 401)")
    kr.add_argument("id", help="the key's id (key_..., see `keys list`), never the key itself")
    kb = ks.add_parser("rebuild-totals", help="recompute a key's spend and usage counters from its usage records "
                       "(the records are the truth) and rewrite them; says whether they matched")
    kb.add_argument("id", help="the key's id (key_..., see `keys list`), never the key itself")
    kb.add_argument("--json", action="store_true", help="print the whole report (counters before and after)")
    k.set_defaults(fn=cmd_keys)

    sub.add_parser("fake-upstream", help="run the DeepSeek / vLLM / SGLang simulator (see --help)", add_help=False)

    d = sub.add_parser("demo", help="start redis, simulated upstreams and the gateway, with a demo key and an admin "
                       "key")
    d.add_argument("--port", type=int, default=8080, help="the gateway's port on 127.0.0.1 (default: 8080; "
                   "scripts/demo.sh takes $PORT)")
    d.add_argument("--data-dir", default=".demo", help="where the demo keeps its Redis data (default: .demo); "
                   "one demo at a time per folder")
    d.set_defaults(fn=cmd_demo)

    pr = sub.add_parser("prices", help="show or set the per-model price table in Redis")
    _config_flag(pr)
    prs = pr.add_subparsers(dest="prices_cmd", required=True, metavar="ACTION")
    prs.add_parser("show", help="the price in force per model (USD per 1M tokens) and its version")
    pset = prs.add_parser("set", help="set a model's price now (a new version; the config never overrides it)")
    pset.add_argument("model", help="a model id of the config's catalogue")
    pset.add_argument("--input", required=True, help="USD per 1M input tokens")
    pset.add_argument("--cached-input", help="USD per 1M cached input tokens (default: --input)")
    pset.add_argument("--cache-write", default=None,
                      help="USD per 1M tokens written to the provider's prompt cache (default: billed at --input)")
    pset.add_argument("--output", required=True, help="USD per 1M output tokens")
    pr.set_defaults(fn=cmd_prices)

    u = sub.add_parser("usage", help="requests, tokens and spend grouped by key / model / provider / day")
    _config_flag(u)
    u.add_argument("--key", help="one key id (default: all keys)")
    u.add_argument("--group-by", default=None, metavar="DIMS",
                   help="comma-separated: key, model, provider, day (model and provider not together; "
                   "default: key,model,day)")
    u.add_argument("--from", dest="from_day", metavar="YYYY-MM-DD", help="first UTC day (default: --days before --to)")
    u.add_argument("--to", dest="to_day", metavar="YYYY-MM-DD", help="last UTC day (default: today)")
    u.add_argument("--days", type=int, default=None, help="without --from: this many days ending at --to (default: "
                   "7)")
    out = u.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the report as JSON (as GET /admin/usage answers)")
    out.add_argument("--csv", action="store_true", help="print the rows as CSV with a header line")
    u.set_defaults(fn=cmd_usage)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fake-upstream":
        return cmd_fake_upstream(argv[1:])
    args = build_parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    return int(args.fn(args) or 0)
