"""`CollateralFetcher`: the collateral a quote needs, from memory, the disk cache, or the service.

Each of the four items (TCB info for the FMSPC, the TDX QE identity, the PCK CRL for the CA, the
root CA CRL) is looked up on its own:

1. The entry in the disk cache, verified (`items.check`) the first time this fetcher reads that
   version of the file; a process keeps the verified item and reads the file again only when it
   changed (another process refreshed it; the file is looked at at most once a second). An entry
   that does not verify is fetched again, never used.
2. A verified entry is used while it is current at the verification time and, when the policy
   sets a maximum age, young enough (TCB info and QE identity by `issueDate`, the PCK CRL by
   `thisUpdate`; the root CA CRL, which Intel issues about once a year, by its `nextUpdate` only).
3. Within `refresh_margin` of its `nextUpdate` an item is refreshed ahead of time, at most once
   per `refetch_interval` (wall clock): if that fails, the still-current entry is used, with a
   warning.
4. Otherwise the item is fetched, under the item's lock (so that concurrent verifiers make one
   request per item: whoever waited finds the entry the first one wrote), verified, and stored.
   When the service answers with an item that is still stale or too old, this fetcher does not
   ask again for `refetch_interval` seconds; the verifier rejects the item meanwhile.

With `offline`, only the cache is read, and a missing, unverifiable or stale item is an error
naming every such item.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from eemini.tdx.chain import Context, VerificationCache, common_name
from eemini.tdx.collateral import Collateral, collateral_to_json
from eemini.tdx.errors import CollateralUnavailable, QuoteError
from eemini.tdx.pcs import items as _items
from eemini.tdx.pcs.cache import DiskCache, EntryUnreadable, default_dir
from eemini.tdx.pcs.http import HttpsClient
from eemini.tdx.pcs.items import Item, ItemInvalid
from eemini.tdx.pcs.service import QE_IDENTITY, ROOT_CA_CRL, ItemId, Kind, Source, fetch
from eemini.tdx.quote import Quote
from eemini.tdx.roots import INTEL_ROOT, TrustAnchor


@dataclass(frozen=True, slots=True)
class Fetched:
    """Collateral for one platform, and where each item came from."""

    collateral: Collateral
    items: tuple[Item, ...]  # TCB info, QE identity, PCK CRL, root CA CRL
    from_cache: tuple[bool, ...]  # per item: read from the cache (True) or fetched now

    def to_json(self) -> str:
        """dcap-qvl's QuoteCollateralV3 JSON."""
        return collateral_to_json(self.collateral)


def platform_of(
    quote: Quote,
    anchors: Sequence[TrustAnchor] = (INTEL_ROOT,),
    cache: VerificationCache | None = None,
) -> tuple[bytes, str]:
    """FMSPC and PCK CA ("platform" / "processor") of the quote's PCK leaf certificate."""
    ctx = Context(0, anchors, cache)
    try:
        certs = ctx.load_chain(quote.signature_data.certification.pck_chain_pem, "PCK certificate chain")
        extension = ctx.cache.pck_extensions.get(certs[0].fingerprint)
        if extension is None:
            extension = ctx.cache.pck_extensions[certs[0].fingerprint] = ctx.pck_extension(certs[0])
        issuer = common_name(certs[0].issuer, "PCK certificate issuer")
    except QuoteError as e:
        raise CollateralUnavailable(
            f"the quote's PCK certificate does not tell its platform: {e}"
        ) from None
    if issuer == "'Intel SGX PCK Platform CA'":
        return extension.fmspc, "platform"
    if issuer == "'Intel SGX PCK Processor CA'":
        return extension.fmspc, "processor"
    raise CollateralUnavailable(
        f"the quote's PCK certificate is issued by {issuer}, neither Intel's platform nor its "
        "processor CA: name the platform (eemini collateral fetch --fmspc HEX --ca platform|processor)"
    )


class CollateralFetcher:
    """Collateral through the cache (see the module's docstring). Not thread-safe: give each thread
    its own fetcher; fetchers and processes share one cache directory safely."""

    def __init__(
        self,
        source: Source | None = None,
        *,
        cache_dir: Path | None = None,
        offline: bool = False,
        trusted_roots: Sequence[TrustAnchor] = (INTEL_ROOT,),
        verification_cache: VerificationCache | None = None,
        client: HttpsClient | None = None,
        refresh_margin: float = 3600.0,
        refetch_interval: float = 600.0,
        lock_timeout: float = 120.0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.source = source or Source.pcs()
        self.disk = DiskCache(cache_dir if cache_dir is not None else default_dir())
        self.offline = offline
        self.anchors = tuple(trusted_roots)
        self.cache = verification_cache if verification_cache is not None else VerificationCache()
        self.client = client or HttpsClient(ca_file=self.source.ca_file)
        self.refresh_margin = datetime.timedelta(seconds=refresh_margin)
        self.refetch_interval = refetch_interval
        self.lock_timeout = lock_timeout
        self.warn = warn or (lambda _: None)
        # item -> (the file's stat key, its verified entry, when the file was last looked at)
        self._memo: dict[ItemId, tuple[tuple[int, int, int, int], Item, float]] = {}
        # Items the service was just asked for and answered with one still stale or too old: not
        # asked again within refetch_interval (monotonic seconds), to spare the service.
        self._fruitless: dict[ItemId, tuple[float, Item]] = {}
        self._assembled: dict[tuple[Item, ...], Collateral] = {}
        self._platforms: dict[bytes, tuple[bytes, str]] = {}  # by PCK chain PEM

    def for_quote(
        self, quote: Quote, now: int | datetime.datetime, *, max_age: int | None = None
    ) -> Fetched:
        pem = quote.signature_data.certification.pck_chain_pem
        platform = self._platforms.get(pem)
        if platform is None:
            if len(self._platforms) >= 1024:
                self._platforms.clear()
            platform = self._platforms[pem] = platform_of(quote, self.anchors, self.cache)
        return self.for_platform(*platform, now, max_age=max_age)

    def for_platform(
        self, fmspc: bytes, ca: str, now: int | datetime.datetime, *, max_age: int | None = None
    ) -> Fetched:
        """The collateral for FMSPC `fmspc` and PCK CA `ca`, current at `now` where it can be."""
        if len(fmspc) != 6:
            raise CollateralUnavailable(f"an FMSPC is 6 bytes, not {len(fmspc)}")
        when = (
            now
            if isinstance(now, datetime.datetime)
            else datetime.datetime.fromtimestamp(now, datetime.UTC)
        )
        ctx = Context(int(when.timestamp()), self.anchors, self.cache)
        wanted = (ItemId.tcb_info(fmspc), QE_IDENTITY, ItemId.pck_crl(ca), ROOT_CA_CRL)
        age = datetime.timedelta(seconds=max_age) if max_age is not None else None
        got: list[Item] = []
        cached: list[bool] = []
        problems: list[str] = []
        for item in wanted:
            try:
                found, from_cache = self._item(ctx, item, when, age)
            except _Missing as e:
                problems.append(str(e))
                continue
            got.append(found)
            cached.append(from_cache)
        if problems:
            raise CollateralUnavailable(
                f"offline, and the cache at {self.disk.root} cannot serve: {'; '.join(problems)}"
            )
        key = tuple(got)
        collateral = self._assembled.get(key)
        if collateral is None:
            if len(self._assembled) >= 64:  # items were refreshed: forget the old combinations
                self._assembled.clear()
            tcb, qe, pck, root = got
            collateral = self._assembled[key] = Collateral(
                pck_crl_issuer_chain=pck.served.issuer_chain,
                root_ca_crl=root.served.body,
                pck_crl=pck.served.body,
                tcb_info_issuer_chain=tcb.served.issuer_chain,
                tcb_info=tcb.signed,
                tcb_info_signature=tcb.signature,
                qe_identity_issuer_chain=qe.served.issuer_chain,
                qe_identity=qe.signed,
                qe_identity_signature=qe.signature,
            )
        return Fetched(collateral, key, tuple(cached))

    # One item ------------------------------------------------------------------------------------

    def _item(
        self, ctx: Context, item: ItemId, when: datetime.datetime, age: datetime.timedelta | None
    ) -> tuple[Item, bool]:
        entry, trouble = self._cached(ctx, item)
        state = self._state(entry, when, age)
        if self.offline:
            if entry is not None and state in ("fresh", "due"):
                return entry, True
            raise _Missing(trouble or _why(item, entry, when, state))
        if entry is not None and self._keep(item, entry, state):
            return entry, True
        with self.disk.lock(item, self.lock_timeout, self.warn):
            # Whoever held the lock may have just fetched it.
            entry, _ = self._cached(ctx, item, quiet=True)
            state = self._state(entry, when, age)
            if entry is not None and self._keep(item, entry, state):
                return entry, True
            try:
                fetched = self._fetch(ctx, item)
            except CollateralUnavailable as e:
                if entry is not None and state == "due":
                    self.warn(
                        f"could not refresh {item} ahead of its nextUpdate, using the cached one: {e}"
                    )
                    return entry, True
                raise
            if self._state(fetched, when, age) in ("stale", "old"):
                self._fruitless[item] = (time.monotonic(), fetched)
            return fetched, False

    def _keep(self, item: ItemId, entry: Item, state: str) -> bool:
        """Whether to use the cached entry without asking the service."""
        if state == "fresh":
            return True
        if state == "due":  # refreshed ahead of time, but not more often than refetch_interval
            return time.time() - entry.fetched_at < self.refetch_interval
        # Stale or too old: asked for again, unless this fetcher just did and got this very entry
        # (the verifier then says what is wrong with it).
        fruitless = self._fruitless.get(item)
        return (
            fruitless is not None
            and fruitless[1] is entry
            and time.monotonic() - fruitless[0] < self.refetch_interval
        )

    def _state(self, entry: Item | None, when: datetime.datetime, age: datetime.timedelta | None) -> str:
        if entry is None:
            return "missing"
        if not entry.usable(when):
            return "stale"
        kind = entry.served.item.kind
        if age is not None and kind != Kind.ROOT_CA_CRL and when - entry.issued > age:
            return "old"
        if when >= entry.next_update - self.refresh_margin:
            return "due"
        return "fresh"

    def _cached(
        self, ctx: Context, item: ItemId, *, quiet: bool = False
    ) -> tuple[Item | None, str | None]:
        """The verified cache entry (or None), and why there is none when there is a file. The
        file is looked at again (stat) at most once a second, and always under the item's lock."""
        memo = self._memo.get(item)
        now = time.monotonic()
        if memo is not None and not quiet and now - memo[2] < 1.0:
            return memo[1], None
        stat = self.disk.stat_key(item)
        if stat is None:
            self._memo.pop(item, None)
            return None, None
        if memo is not None and memo[0] == stat:
            self._memo[item] = (stat, memo[1], now)
            return memo[1], None
        path = self.disk.path(item)
        try:
            read = self.disk.read(item)
            if read is None:
                return None, None
            entry = _items.check(ctx, read[0], read[1])
        except (EntryUnreadable, ItemInvalid) as e:
            why = f"the cache entry {path} for {item} does not verify ({e})"
            if not self.offline and not quiet:
                self.warn(f"{why}: fetching it again")
            return None, why
        self._memo[item] = (stat, entry, now)
        return entry, None

    def _fetch(self, ctx: Context, item: ItemId) -> Item:
        anchor = self.anchors[0]
        served = fetch(self.client, self.source, item, anchor)
        try:
            entry = _items.check(ctx, served, int(time.time()))
        except ItemInvalid as e:
            raise CollateralUnavailable(
                f"GET {served.url}: HTTP 200, but {item} does not verify: {e}"
            ) from None
        try:
            self.disk.write(served, entry.fetched_at)
            stat = self.disk.stat_key(item)
        except CollateralUnavailable as e:  # used all the same; the next verifier fetches again
            self.warn(f"{e}: {item} is not cached")
            return entry
        if stat is not None:
            self._memo[item] = (stat, entry, time.monotonic())
        return entry


class _Missing(Exception):
    """Offline, and the cache cannot serve an item."""


def _why(item: ItemId, entry: Item | None, when: datetime.datetime, state: str) -> str:
    if entry is None:
        return f"{item} is missing"
    if state == "old":
        return f"{item} was issued at {entry.issued.isoformat()}, older than the policy allows"
    return (
        f"{item} is valid from {entry.issued.isoformat()} until {entry.next_update.isoformat()}, "
        f"not at {when.isoformat()}"
    )
