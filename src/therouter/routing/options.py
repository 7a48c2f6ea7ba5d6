"""Routing knobs: typed in config.py (section `routing:`), re-exported here for the routing package."""

from therouter.config import BreakerPolicy, RoutingOptions

__all__ = ["BreakerPolicy", "RoutingOptions"]
