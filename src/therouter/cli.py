"""Command line: serve, check-config, keys, prices, usage, fake-upstream, demo. A leaf: nothing imports it."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from typing import Any, Callable, Coroutine

from therouter.config import ConfigError, Settings, load_settings

# budgets are exact in the admission script's arithmetic up to 2**53 nano-USD (about 9 million USD)
MAX_BUDGET_USD = 9_000_000
KEY_ID = re.compile(r"key_[A-Za-z0-9]{1,64}")
REDIS_HINT = ("start one with `redis-server --port 6379 --save '' --daemonize yes` (or `apt-get install -y "
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
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# ---- serve / check-config -------------------------------------------------------------------------------------


def cmd_check_config(a: argparse.Namespace) -> int:
    s = _settings(a.config_path or a.config)
    n_dep = sum(len(m.deployments) for m in s.models.values())
    print(f"ok: {len(s.providers)} providers, {len(s.models)} models, {n_dep} deployments")
    return 0


def app_factory() -> Any:
    """uvicorn factory for --workers N (each worker reads the config named in THEROUTER_CONFIG)."""
    from therouter.app import create_app

    return create_app(load_settings(os.environ.get("THEROUTER_CONFIG")))


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    s = _settings(a.config)
    code = _run(_with_store(s, _noop))
    if code:
        return code
    host = a.host or s.server.host
    port = a.port if a.port is not None else s.server.port
    workers = a.workers or s.server.workers
    kw: dict[str, Any] = dict(host=host, port=port, log_level=a.log_level, access_log=False,
                              timeout_graceful_shutdown=30, proxy_headers=False, server_header=False)
    if workers > 1:
        os.environ["THEROUTER_CONFIG"] = os.path.abspath(a.config or os.environ.get("THEROUTER_CONFIG")
                                                         or "config/therouter.yaml")
        uvicorn.run("therouter.cli:app_factory", factory=True, workers=workers, **kw)
    else:
        from therouter.app import create_app

        uvicorn.run(create_app(s), **kw)
    return 0


async def _noop(store: Any) -> int:
    return 0


# ---- keys -----------------------------------------------------------------------------------------------------


def cmd_keys(a: argparse.Namespace) -> int:
    from therouter.config import usd_to_nano
    from therouter.keys import KEY_PREFIX
    from therouter.metering.prices import nano_to_usd

    s = _settings(a.config)

    async def create(store: Any) -> int:
        try:
            budget = usd_to_nano(a.budget, "--budget", MAX_BUDGET_USD) if a.budget is not None else None
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if budget == 0:
            print("error: --budget must be more than 0 USD (leave it out for no budget; revoke a key to stop it)",
                  file=sys.stderr)
            return 2
        # an alias is stored as the model it names (routing, limits and records all use the canonical id)
        models = tuple(dict.fromkeys(s.canonical(m.strip()) for m in (a.models or "").split(",") if m.strip()))
        try:
            model_limits = {s.canonical(m): v for m, v in (_model_limit(v) for v in a.model_limit or ())}
        except ValueError as e:
            print(f"error: --model-limit {e}", file=sys.stderr)
            return 2
        unknown = [m for m in (*models, *model_limits) if m not in s.models]
        if unknown:
            print(f"error: unknown model(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        plaintext, rec = await store.create_key(a.name, budget_nano=budget, budget_period=a.budget_period,
                                                rpm=a.rpm, tpm=a.tpm, models=models, model_limits=model_limits)
        print(f"created key {rec.id} ({rec.name}); it is shown once, store it now:")
        print(plaintext)
        return 0

    async def list_(store: Any) -> int:
        print(f"{'id':<18} {'name':<20} {'key':<16} {'status':<8} {'budget':<14} {'rpm':>6} {'tpm':>9} models")
        for r in await store.list_keys():
            budget = "-" if r.budget_nano is None else f"${nano_to_usd(r.budget_nano)}/{r.budget_period}"
            print(f"{r.id:<18} {r.name[:20]:<20} {r.hint:<16} {'revoked' if r.revoked else 'active':<8} "
                  f"{budget:<14} {r.rpm or '-':>6} {r.tpm or '-':>9} {','.join(r.models) or '*'}")
        return 0

    async def revoke(store: Any) -> int:
        if not KEY_ID.fullmatch(a.id):  # never echoed: it may be a plaintext key pasted by mistake
            what = "an API key itself, not a key id" if a.id.startswith(KEY_PREFIX) else "not a key id"
            print(f"error: that is {what}; revoke by the key id (key_..., shown by `therouter keys list`)",
                  file=sys.stderr)
            return 2
        if await store.revoke_key(a.id):
            print(f"revoked {a.id}")
            return 0
        print(f"error: no key with id {a.id}", file=sys.stderr)
        return 1

    fn = {"create": create, "list": list_, "revoke": revoke}[a.keys_cmd]
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
                pv = await meter.set_price(a.model, a.input, a.cached_input or a.input, a.output)
            except InvalidRequest as e:
                print(f"error: {e.message}", file=sys.stderr)
                return 2
            pub = pv.public()
            print(f"{a.model}: version {pv.version} (USD per 1M tokens: input {pub['input_usd']}, "
                  f"cached_input {pub['cached_input_usd']}, output {pub['output_usd']})")
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
    s = _settings(a.config)

    async def run(store: Any) -> int:
        rows = await _meter(s, store).usage_rows(a.key, a.days)
        print(f"{'key':<18} {'model':<32} {'day':<10} {'requests':>8} {'prompt':>10} {'completion':>10} "
              f"{'cost (USD)':>14}")
        for r in rows:
            print(f"{r['key_id']:<18} {r['model']:<32} {r['day']:<10} {r['requests']:>8} {r['prompt_tokens']:>10} "
                  f"{r['completion_tokens']:>10} {r['cost_usd']:>14}")
        return 0

    return _run(_with_store(s, run))


# ---- fake-upstream / demo ---------------------------------------------------------------------------------------


def cmd_fake_upstream(rest: list[str]) -> int:
    from therouter.fakeupstream import main as fake_main

    return fake_main(rest)


def cmd_demo(a: argparse.Namespace) -> int:
    from therouter.demo import run_demo

    return run_demo(port=a.port, data_dir=a.data_dir)


# ---- parser -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="therouter", description="OpenAI-compatible LLM routing gateway")
    p.add_argument("--config", help="config file (default: $THEROUTER_CONFIG or config/therouter.yaml)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.add_argument("--log-level", default="warning")
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config file without starting")
    c.add_argument("config_path", nargs="?")
    c.set_defaults(fn=cmd_check_config)

    k = sub.add_parser("keys", help="create, list and revoke API keys")
    k.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create")
    kc.add_argument("--name", required=True)
    kc.add_argument("--budget", help=f"spend limit in USD (more than 0, at most {MAX_BUDGET_USD:,})")
    kc.add_argument("--budget-period", choices=["total", "day", "month"], default="total")
    kc.add_argument("--rpm", type=positive_int, help="requests per minute (>= 1; default: no limit)")
    kc.add_argument("--tpm", type=positive_int, help="tokens per minute (>= 1; default: no limit)")
    kc.add_argument("--models", help="comma-separated model ids this key may use (default: all)")
    kc.add_argument("--model-limit", action="append", metavar="MODEL=RPM/TPM",
                    help="a per-model override of the rate limits, on top of --rpm/--tpm ('-' for none); repeatable")
    ks.add_parser("list")
    kr = ks.add_parser("revoke")
    kr.add_argument("id", help="the key's id (key_..., see `keys list`), never the key itself")
    k.set_defaults(fn=cmd_keys)

    sub.add_parser("fake-upstream", help="run the DeepSeek / vLLM / SGLang simulator (see --help)", add_help=False)

    d = sub.add_parser("demo", help="start redis, a simulated upstream and the gateway, with a demo key")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--data-dir", default=".demo")
    d.set_defaults(fn=cmd_demo)

    pr = sub.add_parser("prices", help="show or set the per-model price table in Redis")
    pr.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    prs = pr.add_subparsers(dest="prices_cmd", required=True)
    prs.add_parser("show")
    pset = prs.add_parser("set")
    pset.add_argument("model")
    pset.add_argument("--input", required=True, help="USD per 1M input tokens")
    pset.add_argument("--cached-input", help="USD per 1M cached input tokens (default: --input)")
    pset.add_argument("--output", required=True, help="USD per 1M output tokens")
    pr.set_defaults(fn=cmd_prices)

    u = sub.add_parser("usage", help="spend and tokens per key / model / day")
    u.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    u.add_argument("--key", help="a key id (default: all keys)")
    u.add_argument("--days", type=int, default=7)
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
