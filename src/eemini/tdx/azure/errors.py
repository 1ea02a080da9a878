"""The Azure checks' errors: one class per named check (the name is what `eemini verify` prints).

Parse errors of the evidence itself (a field that is missing, the wrong size, not hex) are
`AzureEvidenceError`, a QuoteError that `eemini verify` reports as unreadable input (exit 2).
A part that is bound by a signature or a hash but then does not parse is a rejection of the check
that bound it: its bytes are what the signer vouched for.
"""

from __future__ import annotations

from eemini.tdx.errors import QuoteError, VerificationError


class AzureEvidenceError(QuoteError, ValueError):
    """The evidence is malformed: the message names the part and what is wrong with it."""


class HclTdReportMismatch(VerificationError):
    """The HCL report's TD report is not the one the TD quote carries."""

    check = "hcl-td-report"


class RuntimeDataMismatch(VerificationError):
    """The TD quote's report data is not SHA-256 of the runtime data (or the bound runtime data
    is not the JSON document Azure writes)."""

    check = "runtime-data"


class UserDataMismatch(VerificationError):
    """The runtime data's `user-data` is not the expected report data."""

    check = "user-data"


class VtpmSignatureInvalid(VerificationError):
    """The vTPM quote is not signed by HCLAkPub from the bound runtime data."""

    check = "vtpm-quote-signature"


class VtpmQuoteInvalid(VerificationError):
    """The signed vTPM message is not a TPM-generated quote (TPMS_ATTEST of type QUOTE)."""

    check = "vtpm-quote"


class VtpmNonceMismatch(VerificationError):
    """The vTPM quote's extraData is not the expected nonce."""

    check = "vtpm-nonce"


class VtpmPcrMismatch(VerificationError):
    """The quoted PCR selection is not SHA-256 PCRs 0..23, or the PCR values given with the quote
    do not hash to its PCR digest."""

    check = "vtpm-pcrs"


class TpmEventLogInvalid(VerificationError):
    """The TPM event log does not parse, or does not replay to the quoted PCRs."""

    check = "tpm-event-log"


class ParavisorNotPinned(VerificationError):
    """An Azure policy without accepted paravisor MRTDs: refused, never waived."""

    check = "firmware-pinned"
