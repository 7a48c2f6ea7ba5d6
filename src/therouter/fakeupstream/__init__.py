"""Fake OpenAI-compatible upstream (DeepSeek / vLLM / SGLang flavours) for demos, tests and drills.

Public API: :func:`create_app`, :class:`FakeConfig`, :func:`main`.

In-process::

    app = create_app(FakeConfig(flavor="vllm", api_key="k", chunks=4))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake/v1")

As a server: ``python -m therouter.fakeupstream --flavor sglang --port 0`` prints
``fake-upstream listening on http://HOST:PORT`` once ready. Knobs (see ``config.KNOB_DEFAULTS``)
are server defaults, overridable per request with ``x-fault: key=value;key=value`` or a
``"fake": {...}`` object in the JSON body (the header wins), and at runtime via
``POST /_fake/config``. ``GET /_fake/stats`` / ``POST /_fake/reset`` expose the request log.
"""

from __future__ import annotations

from therouter.fakeupstream.app import FakeUpstream, create_app
from therouter.fakeupstream.asgi import FakeConnectionCut
from therouter.fakeupstream.cli import LISTENING_PREFIX, main
from therouter.fakeupstream.config import DEFAULT_MODELS, ERROR_KINDS, KNOB_DEFAULTS, FakeConfig, KnobError

__all__ = [
    "DEFAULT_MODELS",
    "ERROR_KINDS",
    "KNOB_DEFAULTS",
    "LISTENING_PREFIX",
    "FakeConfig",
    "FakeConnectionCut",
    "FakeUpstream",
    "KnobError",
    "create_app",
    "main",
]
