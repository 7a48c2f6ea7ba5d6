"""Fake OpenAI-compatible upstream (DeepSeek / vLLM / SGLang flavours) for demos, tests and drills.

Public API: :func:`create_app`, :class:`FakeConfig`, :func:`main`.
"""

from __future__ import annotations

from therouter.fakeupstream.app import FakeUpstream, create_app
from therouter.fakeupstream.cli import LISTENING_PREFIX, main
from therouter.fakeupstream.config import DEFAULT_MODELS, ERROR_KINDS, KNOB_DEFAULTS, FakeConfig, KnobError

__all__ = [
    "DEFAULT_MODELS",
    "ERROR_KINDS",
    "KNOB_DEFAULTS",
    "LISTENING_PREFIX",
    "FakeConfig",
    "FakeUpstream",
    "KnobError",
    "create_app",
    "main",
]
