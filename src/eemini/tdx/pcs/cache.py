"""The on-disk collateral cache: one file per item, written atomically, one fetcher per item at a time.

Layout (under `default_dir()`, or the directory given):

    v1/tcb-info/<FMSPC>.json       TCB info, one per FMSPC (12 upper-case hex digits)
    v1/qe-identity/TD_QE.json      the TDX QE identity
    v1/pck-crl/platform.json       the PCK CRL of each PCK CA
    v1/pck-crl/processor.json
    v1/root-ca-crl/root.json       the root CA CRL
    v1/locks/<item>-<key>.lock     flock(2) files: whoever holds one is fetching that item

Each entry is a JSON object: `format`, `item`, `key`, `url` (where it came from), `fetched_at`
(Unix seconds), `issuer_chain` (PEM, as the header carried it, URL-decoded), and the body: `body`
for TCB info and QE identity (the served JSON text, byte for byte once UTF-8 encoded) or
`body_hex` for a CRL (DER). Nothing in an entry is trusted: `items.check` verifies it on every
read, and an entry that does not verify is fetched again. Entries are written to a temporary file
in the same directory and renamed over the old one, so a reader sees a whole entry or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from eemini.tdx.errors import CollateralUnavailable, QuoteError
from eemini.tdx.guard import parsing
from eemini.tdx.pcs.service import ItemId, Served

FORMAT = "eemini collateral cache entry 1"
MAX_ENTRY = 32 << 20


def default_dir() -> Path:
    """$EEMINI_COLLATERAL_CACHE, else $XDG_CACHE_HOME/eemini/collateral, else
    ~/.cache/eemini/collateral."""
    explicit = os.environ.get("EEMINI_COLLATERAL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eemini" / "collateral"


class EntryUnreadable(QuoteError):
    """A cache file exists but is not an entry (garbled, truncated, another item's)."""


class DiskCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.base = self.root / "v1"
        self._paths: dict[ItemId, str] = {}

    def path(self, item: ItemId) -> Path:
        return self.base / item.kind.value / f"{item.key}.json"

    def stat_key(self, item: ItemId) -> tuple[int, int, int, int] | None:
        """What changes when an entry is replaced (device, inode, size, mtime); None when absent."""
        path = self._paths.get(item)
        if path is None:
            path = self._paths[item] = os.fspath(self.path(item))
        try:
            st = os.stat(path)
        except OSError:  # none there, or none we may read: fetched (and the write says why)
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self, item: ItemId) -> tuple[Served, int] | None:
        """The entry as (served, fetched_at), None when there is none; EntryUnreadable when it is
        not an entry of this item."""
        path = self.path(item)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_ENTRY + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise EntryUnreadable(f"cannot read it: {e.strerror}") from None
        if len(data) > MAX_ENTRY:
            raise EntryUnreadable(f"it is larger than {MAX_ENTRY} bytes")
        with parsing(EntryUnreadable, "it is not JSON"):
            doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise EntryUnreadable(f"it is not a cache entry ({FORMAT!r})")
        if (doc.get("item"), doc.get("key")) != (item.kind.value, item.key):
            raise EntryUnreadable(f"it holds {doc.get('item')!r} {doc.get('key')!r}, not {item}")
        url, chain, fetched_at = doc.get("url"), doc.get("issuer_chain"), doc.get("fetched_at")
        if not isinstance(url, str) or not isinstance(chain, str) or type(fetched_at) is not int:
            raise EntryUnreadable("its url, issuer_chain or fetched_at is missing or mistyped")
        value = doc.get("body" if item.signed_json else "body_hex")
        if not isinstance(value, str):
            raise EntryUnreadable("its body is missing")
        with parsing(EntryUnreadable, "its body does not decode"):
            body = value.encode() if item.signed_json else bytes.fromhex(value)
        return Served(item, url, body, chain), fetched_at

    def write(self, served: Served, fetched_at: int) -> None:
        item = served.item
        doc: dict[str, object] = {
            "format": FORMAT,
            "item": item.kind.value,
            "key": item.key,
            "url": served.url,
            "fetched_at": fetched_at,
            "issuer_chain": served.issuer_chain,
        }
        if item.signed_json:
            doc["body"] = served.body.decode("utf-8")  # checked as UTF-8 before it is stored
        else:
            doc["body_hex"] = served.body.hex()
        path = self.path(item)
        try:
            _mkdir(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    json.dump(doc, f, indent=1)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            raise CollateralUnavailable(
                f"cannot write the cache entry {path}: {e.strerror or e}"
            ) from None

    @contextlib.contextmanager
    def lock(self, item: ItemId, timeout: float, unlocked: Callable[[str], None]) -> Iterator[None]:
        """Hold the item's lock: one fetcher per item at a time, across processes and threads.
        When the lock file cannot be made (a read-only cache), `unlocked` hears why, and the
        fetch goes ahead without it."""
        path = self.base / "locks" / f"{item.kind.value}-{item.key}.lock"
        try:
            _mkdir(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            unlocked(f"cannot open the cache lock {path}: {e.strerror or e}")
            yield
            return
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise CollateralUnavailable(
                            f"another process has been fetching {item} for over {timeout:g} s "
                            f"(it holds {path})"
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
