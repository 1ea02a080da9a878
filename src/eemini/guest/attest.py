"""Attestation backends: where TDX quotes come from, and the self-check every quote passes.

`configfs-tsm` follows the kernel ABI (Documentation/ABI/testing/configfs-tsm-report): make a
report entry, check `provider`, write up to 64 bytes to `inblob`, read `outblob`, check that
`generation` moved by exactly our one write, remove the entry. The simulated backend lives in
`eemini.guest.dev.simulated`, which production images do not carry.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable

from eemini.guest import quote_layout as layout
from eemini.guest.quote_layout import REPORT_DATA_SIZE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

TSM_REPORT_ROOT = "/sys/kernel/config/tsm/report"
TDX_PROVIDER = "tdx_guest"
CCEL_PATH = "/sys/firmware/acpi/tables/data/CCEL"


class AttestError(Exception):
    """A quote could not be produced; the message says why and what to check."""

    def __init__(self, message: str, code: str = "attest_failed") -> None:
        super().__init__(message)
        self.code = code


if TYPE_CHECKING:

    class Backend(Protocol):
        """Something that turns 64 bytes of report data into a TDX quote."""

        attestation_type: str  # what the socket reports: "tdx", "azure-tdx-vtpm", "simulated"

        def quote(self, report_data: bytes) -> bytes:
            """A quote whose report data is exactly `report_data` (64 bytes); raises AttestError."""
            ...


def _td_report(quote: bytes) -> tuple[int, int]:
    """Where the TD report body of a TDX quote v4 or v5 starts, and its size; AttestError if the
    bytes are not such a quote."""
    if len(quote) < layout.HEADER_SIZE:
        raise AttestError(
            f"quote is {len(quote)} bytes, shorter than a quote header ({layout.HEADER_SIZE})"
        )
    version, key_type, tee_type, *_ = layout.HEADER_STRUCT.unpack_from(quote)
    if tee_type != layout.TeeType.TDX:
        raise AttestError(f"quote TEE type is {tee_type:#x}, expected {layout.TeeType.TDX:#x} (TDX)")
    if key_type != layout.AttestationKeyType.ECDSA_P256:
        raise AttestError(f"quote attestation key type is {key_type}, expected 2 (ECDSA P-256)")
    if version == 4:
        body, body_size = layout.HEADER_SIZE, layout.TD_REPORT_10_SIZE
    elif version == 5:
        if len(quote) < layout.HEADER_SIZE + layout.BODY_DESCRIPTOR_SIZE:
            raise AttestError("quote v5 is too short for its body descriptor")
        body_type, body_size = layout.BODY_DESCRIPTOR_STRUCT.unpack_from(quote, layout.HEADER_SIZE)
        if layout.BODY_SIZES.get(body_type) != body_size:
            raise AttestError(f"quote v5 body type {body_type} of {body_size} bytes is not a TD report")
        body = layout.HEADER_SIZE + layout.BODY_DESCRIPTOR_SIZE
    else:
        raise AttestError(f"quote version is {version}, expected 4 or 5")
    if len(quote) < body + body_size + layout.SIGNATURE_DATA_LEN_SIZE:
        raise AttestError(f"quote is {len(quote)} bytes, too short for its TD report body")
    return body, body_size


def check_quote(quote: bytes, report_data: bytes) -> None:
    """The self-check every quote passes before it leaves the runtime; raises AttestError."""
    if not quote:
        raise AttestError("the quote is empty")
    body, body_size = _td_report(quote)
    inside = quote[body + layout.REPORT_DATA_OFFSET :][:REPORT_DATA_SIZE]
    if inside != report_data:
        raise AttestError(
            f"the report data inside the quote ({inside.hex()}) differs from the request "
            f"({report_data.hex()})"
        )
    if int.from_bytes(quote[body + body_size :][: layout.SIGNATURE_DATA_LEN_SIZE], "little") == 0:
        raise AttestError("the quote carries no signature data")


def read_ccel(path: str = CCEL_PATH) -> bytes | None:
    """The firmware's CC event log (ACPI CCEL table data), or None when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class ConfigfsTsmBackend:
    """TDX quotes through Linux configfs-tsm, one at a time.

    `root` is the report directory (configurable so tests run against a fake tree); `mkdir`
    and `rmdir` create and remove the report entry (configfs populates the entry's attributes
    inside mkdir(2) itself, which a fake on an ordinary filesystem can only do from this seam).
    """

    attestation_type = "tdx"

    def __init__(
        self,
        root: str = TSM_REPORT_ROOT,
        *,
        mkdir: Callable[[str], None] = os.mkdir,
        rmdir: Callable[[str], None] = os.rmdir,
    ) -> None:
        self.root = root
        self._mkdir = mkdir
        self._rmdir = rmdir
        self._lock = threading.Lock()

    def quote(self, report_data: bytes) -> bytes:
        with self._lock:
            if not os.path.isdir(self.root):
                raise AttestError(
                    f"configfs-tsm is not available: {self.root} does not exist (needs a TDX guest "
                    "whose kernel has the TDX guest driver, and configfs mounted)",
                    "attest_unavailable",
                )
            # A private entry per request (the ABI's way to avoid conflicts); the random part
            # keeps two runtimes (or a leftover entry after a crash) from colliding.
            entry = os.path.join(self.root, f"eemini-{os.getpid()}-{os.urandom(8).hex()}")
            try:
                self._mkdir(entry)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    # configfs-tsm refuses new entries while no provider is registered: what a VM
                    # without TDX shows (the TDX guest driver's init failed with ENODEV).
                    raise AttestError(
                        f"configfs-tsm has no provider (creating a report entry in {self.root} "
                        "failed with ENXIO): no TDX guest driver is registered, so this is not a "
                        "TDX guest or its driver failed to start",
                        "attest_unavailable",
                    ) from None
                msg = f"configfs-tsm: cannot create report entry {entry}: {e.strerror}"
                raise AttestError(msg) from None
            try:
                return self._quote_in(entry, report_data)
            finally:
                try:
                    self._rmdir(entry)
                except OSError as e:
                    os.write(2, f"eemini: warning: cannot remove {entry}: {e.strerror}\n".encode())

    def _quote_in(self, entry: str, report_data: bytes) -> bytes:
        provider = _read_attr(entry, "provider").decode("ascii", "replace").strip()
        if provider != TDX_PROVIDER:
            raise AttestError(
                f"configfs-tsm provider is {provider!r}, expected {TDX_PROVIDER!r} "
                "(this is not a TDX guest, or another TSM driver is loaded)",
                "attest_unavailable",
            )
        before = _read_generation(entry)
        _write_attr(entry, "inblob", report_data)
        quote = _read_attr(entry, "outblob")
        after = _read_generation(entry)
        # ABI: generation increments on every write of inblob or an option; anything but our
        # one write means another writer raced us and outblob may answer their inblob.
        if after != before + 1:
            raise AttestError(
                f"configfs-tsm report entry was written concurrently (generation {before} -> "
                f"{after}, expected {before + 1}); the quote was discarded"
            )
        if not quote:
            raise AttestError(
                "configfs-tsm returned an empty quote (outblob is empty): the host's quote "
                "generation service may be unreachable"
            )
        check_quote(quote, report_data)
        return quote


def _read_attr(entry: str, name: str) -> bytes:
    path = os.path.join(entry, name)
    try:
        with open(path, "rb", buffering=0) as f:
            return f.readall()
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise AttestError(f"configfs-tsm: {path}: report exceeds the kernel's maximum") from None
        if e.errno in (errno.ENXIO, errno.ENOTTY):
            # The provider was unregistered after the entry was made (Linux 6.12 answers an
            # outblob read with ENOTTY, later kernels every attribute with ENXIO).
            raise AttestError(
                f"configfs-tsm: cannot read {path}: the TSM provider is gone "
                f"({errno.errorcode[e.errno]})",
                "attest_unavailable",
            ) from None
        raise AttestError(f"configfs-tsm: cannot read {path}: {e.strerror}") from None


def _write_attr(entry: str, name: str, data: bytes) -> None:
    path = os.path.join(entry, name)
    try:
        # configfs binary attributes take the whole value in one write (unbuffered: one write(2);
        # opened without O_CREAT or O_TRUNC, which open(path, "wb") would add).
        with open(os.open(path, os.O_WRONLY), "wb", buffering=0) as f:
            n = f.write(data)
    except OSError as e:
        raise AttestError(f"configfs-tsm: cannot write {path}: {e.strerror}") from None
    if n != len(data):
        raise AttestError(f"configfs-tsm: short write to {path} ({n} of {len(data)} bytes)")


def _read_generation(entry: str) -> int:
    text = _read_attr(entry, "generation").decode("ascii", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise AttestError(f"configfs-tsm: generation is not a number: {text!r}") from None
