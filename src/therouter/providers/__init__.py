"""Provider adapters: one module per upstream kind behind the small interface in base.py."""

from therouter.providers._http import (
           Transport,
           UpstreamRequest,
           UpstreamResponse,
           make_transport,
)
from therouter.providers.base import Provider
from therouter.providers.events import UpstreamEvents
from therouter.providers.registry import ADAPTERS, build_provider

__all__ = [
           "ADAPTERS",
           "Provider",
           "Transport",
           "UpstreamEvents",
           "UpstreamRequest",
           "UpstreamResponse",
           "build_provider",
           "make_transport",
]
