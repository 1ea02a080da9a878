"""The verifier's errors: one parse error with field/offset/expected/found, and one class per check.

Verification raises and never returns False (the cryptography model): every failed check has its own
class, named for the check, and `check` is the short name printed by `eemini verify`.
"""

from __future__ import annotations


class QuoteError(Exception):
    """Base of every error raised by eemini.tdx."""


class QuoteParseError(QuoteError, ValueError):
    """The bytes are not a well-formed TDX quote: says which field, where, expected what, found what."""

    def __init__(self, field: str, offset: int, expected: str, found: str) -> None:
        super().__init__(f"{field} at offset {offset}: expected {expected}, found {found}")
        self.field = field
        self.offset = offset
        self.expected = expected
        self.found = found


class CollateralParseError(QuoteError, ValueError):
    """The collateral is not well-formed QuoteCollateralV3 JSON (or a part of it does not parse)."""


class CollateralUnavailable(QuoteError):
    """Collateral could not be had (eemini.tdx.pcs): an endpoint failed or served something that does
    not verify (the message names the URL and the HTTP status), or the cache alone was to be used
    and lacks an item. Nothing was judged about the quote."""


class VerificationError(QuoteError):
    """A verification check failed; `check` names it."""

    check = "verification"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def one_line(self) -> str:
        return f"{self.check}: {self.message}"


# Signatures and the certificate chain ------------------------------------------------------------


class CertificateParseError(VerificationError):
    check = "certificates"


class UntrustedRoot(VerificationError):
    check = "trusted-root"


class CertificateChainError(VerificationError):
    check = "certificate-chain"


class CertificateExpired(VerificationError):
    check = "certificate-validity"


class CertificateRevoked(VerificationError):
    check = "revocation"


class QeReportSignatureInvalid(VerificationError):
    check = "qe-report-signature"


class QeReportDataMismatch(VerificationError):
    check = "qe-report-data"


class QuoteSignatureInvalid(VerificationError):
    check = "quote-signature"


# Collateral ---------------------------------------------------------------------------------------


class CollateralInvalid(VerificationError):
    check = "collateral"


class CollateralSignatureInvalid(VerificationError):
    check = "collateral-signature"


class CollateralExpired(VerificationError):
    check = "collateral-validity"


class CollateralTooOld(VerificationError):
    """Older than the policy's max_collateral_age (TCB info and QE identity by their issueDate, the
    PCK CRL by its thisUpdate)."""

    check = "collateral-age"


class CrlInvalid(VerificationError):
    check = "crl"


class QeIdentityMismatch(VerificationError):
    check = "qe-identity"


class FmspcMismatch(VerificationError):
    check = "fmspc"


class PceIdMismatch(VerificationError):
    check = "pce-id"


class TcbLevelNotFound(VerificationError):
    check = "tcb-level"


# Policy -------------------------------------------------------------------------------------------


class TcbStatusRejected(VerificationError):
    check = "tcb-status"


class CollateralRequired(VerificationError):
    check = "tcb-evaluation"


class DebugTdRejected(VerificationError):
    check = "debug"


class TdAttributesRejected(VerificationError):
    check = "td-attributes"


class ServiceTdRejected(VerificationError):
    check = "mr-servicetd"


class ReportDataMismatch(VerificationError):
    check = "report-data"


class MeasurementMismatch(VerificationError):
    check = "measurements"


class EventLogRequired(VerificationError):
    check = "event-log"


class FirmwareNotPinned(VerificationError):
    """Measured-boot events were checked, but the policy accepts any MRTD: whatever firmware ran
    extended RTMR1/RTMR2, so unpinned firmware could replay the predicted digests."""

    check = "firmware-pinned"


class RuntimeLogUnbound(VerificationError):
    """The runtime event log is not bound to the quote (RTMR3 never extended, or no log given)."""

    check = "runtime-log"


class PolicyError(QuoteError, ValueError):
    """The policy itself is malformed (bad file, bad value, a field set twice)."""
