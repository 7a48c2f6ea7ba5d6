"""Metering: prices and cost (pure), admission (rate limits + budget reservation), exactly-once settlement, the
local journal, and the reports built on them. Only :mod:`therouter.store` talks to Redis; the scripts live in the
``.lua`` files beside these modules. Key layout: :mod:`therouter.metering.layout`."""

from therouter.metering.admission import Admission, MeterOptions
from therouter.metering.meter import Meter
from therouter.metering.prices import PriceVersion, cost_nano, nano_to_usd, reservation_nano
from therouter.metering.records import GenerationRecord

__all__ = [
    "Admission", "GenerationRecord", "Meter", "MeterOptions", "PriceVersion", "cost_nano", "nano_to_usd",
    "reservation_nano",
]
