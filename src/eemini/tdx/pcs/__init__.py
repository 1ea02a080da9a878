"""Collateral the verifier fetches itself: Intel PCS / PCCS, through a validity-driven disk cache.

The other half of `eemini.tdx` (which parses and verifies): `service` knows the endpoints and
what they answer, `http` makes the HTTPS requests, `items` verifies one item on its own, `cache`
keeps items on disk, and `fetch.CollateralFetcher` puts them together into the `Collateral` that
`eemini.tdx.verify.verify` reads. docs/verify.md, "Fetching collateral", describes the behaviour.
"""

from eemini.tdx.pcs.cache import default_dir
from eemini.tdx.pcs.fetch import CollateralFetcher, Fetched, platform_of
from eemini.tdx.pcs.http import HttpsClient
from eemini.tdx.pcs.service import INTEL_PCS_URL, ItemId, Kind, Source

__all__ = [
    "INTEL_PCS_URL",
    "CollateralFetcher",
    "Fetched",
    "HttpsClient",
    "ItemId",
    "Kind",
    "Source",
    "default_dir",
    "platform_of",
]
