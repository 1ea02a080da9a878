"""Byte layouts of TDX DCAP quotes v4 and v5: field names, widths, and the enums of their tag values.

The one description of the quote format: the guest's self-check of every quote
(eemini.guest.attest), the simulator that makes development quotes (eemini.guest.dev.simulated)
and the verifier's parser (eemini.tdx.quote) all read it. It lives in the guest package because
the guest may import nothing else; the host imports it from here.

Source: Intel TDX DCAP Quoting Library API (quote format, appendix A.3 "Version 4 Quote Format" and
A.4 "Version 5"), and the Intel SGX DCAP ECDSA quote library reference for the QE report (SGX
REPORT body) and the certification data types. All integers are little-endian.
Keep the widths in sync with those tables: the sizes and structs below are made from them.
"""

from __future__ import annotations

import enum
import struct


class TeeType(enum.IntEnum):
    SGX = 0x00000000
    TDX = 0x00000081


class AttestationKeyType(enum.IntEnum):
    ECDSA_P256 = 2
    ECDSA_P384 = 3


class BodyType(enum.IntEnum):
    """Quote v5 body descriptor type (A.4): which report follows."""

    SGX_ENCLAVE_REPORT = 1
    TD_REPORT_10 = 2
    TD_REPORT_15 = 3


class CertificationDataType(enum.IntEnum):
    PPID_CLEARTEXT = 1
    PPID_RSA2048_OAEP = 2
    PPID_RSA3072_OAEP = 3
    PCK_CERT = 4
    PCK_CERT_CHAIN = 5
    QE_REPORT_CERTIFICATION_DATA = 6
    PLATFORM_MANIFEST = 7


INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")


def _struct(fields: tuple[tuple[str, int], ...]) -> struct.Struct:
    """The fields in order: those of 2 and 4 bytes as integers (u16, u32), the others as bytes."""
    return struct.Struct("<" + "".join({2: "H", 4: "I"}.get(w, f"{w}s") for _, w in fields))


# (field, width) tables, in order.
HEADER_FIELDS: tuple[tuple[str, int], ...] = (
    ("version", 2),
    ("attestation_key_type", 2),
    ("tee_type", 4),
    # Reserved in TDX quotes (the QE and PCE SVN slots of SGX quotes v3); kept for display.
    ("qe_svn", 2),
    ("pce_svn", 2),
    ("qe_vendor_id", 16),
    ("user_data", 20),
)
HEADER_STRUCT = _struct(HEADER_FIELDS)
HEADER_SIZE = HEADER_STRUCT.size  # 48

REPORT_DATA_SIZE = 64
TD_REPORT_10_FIELDS: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", REPORT_DATA_SIZE),  # last: REPORT_DATA_OFFSET relies on it
)
# TDX 1.5 appends these two to the 1.0 report (quote v5 body type 3).
TD_REPORT_15_EXTRA_FIELDS: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn2", 16),
    ("mr_servicetd", 48),
)
TD_REPORT_10_SIZE = sum(w for _, w in TD_REPORT_10_FIELDS)  # 584
TD_REPORT_15_SIZE = TD_REPORT_10_SIZE + sum(w for _, w in TD_REPORT_15_EXTRA_FIELDS)  # 648
REPORT_DATA_OFFSET = TD_REPORT_10_SIZE - REPORT_DATA_SIZE  # 520, within the body

BODY_DESCRIPTOR_STRUCT = struct.Struct("<HI")  # v5: u16 body type, u32 body size
BODY_DESCRIPTOR_SIZE = BODY_DESCRIPTOR_STRUCT.size
BODY_SIZES = {BodyType.TD_REPORT_10: TD_REPORT_10_SIZE, BodyType.TD_REPORT_15: TD_REPORT_15_SIZE}
SIGNATURE_DATA_LEN_SIZE = 4

# ECDSA-256 signature data (A.3.8): signature r||s, attestation public key x||y, certification data.
ECDSA_SIGNATURE_SIZE = 64
ECDSA_KEY_SIZE = 64
CERTIFICATION_HEADER_STRUCT = struct.Struct("<HI")  # u16 type, u32 size

# SGX REPORT body (the QE report), 384 bytes.
ENCLAVE_REPORT_FIELDS: tuple[tuple[str, int], ...] = (
    ("cpu_svn", 16),
    ("misc_select", 4),
    ("reserved1", 28),
    ("attributes", 16),
    ("mr_enclave", 32),
    ("reserved2", 32),
    ("mr_signer", 32),
    ("reserved3", 96),
    ("isv_prod_id", 2),
    ("isv_svn", 2),
    ("reserved4", 60),
    ("report_data", 64),
)
ENCLAVE_REPORT_STRUCT = _struct(ENCLAVE_REPORT_FIELDS)
ENCLAVE_REPORT_SIZE = ENCLAVE_REPORT_STRUCT.size
QE_AUTH_DATA_LEN_SIZE = 2

# TD attributes (TDX module ABI, TDINFO_STRUCT.ATTRIBUTES, a little-endian u64).
TD_ATTR_DEBUG = 1 << 0  # TUD.DEBUG: the host VMM may read and write the TD's private memory
TD_ATTR_TUD_MASK = 0xFF  # bits 7:0, the "TD under debug" group: any bit set means not production
TD_ATTR_SEC_RESERVED_MASK = 0x0FFFFF00  # bits 27:8, reserved in the SEC group
TD_ATTR_SEPT_VE_DISABLE = 1 << 28  # #VE on pending-page EPT violations is disabled
TD_ATTR_SEC_RESERVED_BIT29 = 1 << 29
TD_ATTR_PKS = 1 << 30
TD_ATTR_KL = 1 << 31
TD_ATTR_OTHER_RESERVED_MASK = 0x7FFFFFFF_00000000  # bits 62:32
TD_ATTR_PERFMON = 1 << 63
