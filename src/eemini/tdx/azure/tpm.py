"""A vTPM quote: the TPMS_ATTEST message TPM2_Quote signs, its RSASSA signature, the PCR digest.

Layouts from TCG TPM 2.0 Library Part 2 ("Structures"), all integers big-endian:

    TPMS_ATTEST      magic u32 (TPM_GENERATED_VALUE 0xff544347), type u16 (TPM_ST_ATTEST_QUOTE
                     0x8018), qualifiedSigner TPM2B_NAME, extraData TPM2B_DATA, clockInfo
                     (clock u64, resetCount u32, restartCount u32, safe u8), firmwareVersion u64,
                     attested TPMS_QUOTE_INFO
    TPMS_QUOTE_INFO  pcrSelect TPML_PCR_SELECTION (count u32, then per bank: hash u16,
                     sizeofSelect u8, a PCR bitmap, PCR n = bit n%8 of byte n//8), pcrDigest
                     TPM2B_DIGEST = H(the selected PCR values, in bank order then PCR order)

The magic says the TPM generated the message (a restricted key such as the vTPM's attestation key
signs nothing else that starts with it); the type says it is a quote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from eemini.tdx.azure.hcl import RsaKey

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B
PCR_COUNT = 24
PCR_SIZE = 32
ALL_PCRS_SELECT = b"\xff\xff\xff"  # PCRs 0..23


class AttestParseError(ValueError):
    """The message is not a well-formed TPMS_ATTEST quote (says which field, at which offset)."""


@dataclass(frozen=True, slots=True)
class PcrSelection:
    hash_alg: int
    select: bytes

    @property
    def pcrs(self) -> tuple[int, ...]:
        return tuple(i for i in range(8 * len(self.select)) if self.select[i // 8] >> (i % 8) & 1)


@dataclass(frozen=True, slots=True)
class TpmQuote:
    """A parsed TPMS_ATTEST of type QUOTE."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selections: tuple[PcrSelection, ...]
    pcr_digest: bytes


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise AttestParseError(
                f"{field} at offset {self.pos}: needs {n} bytes, {len(self.data) - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, field: str) -> int:
        return int.from_bytes(self.take(n, field), "big")

    def sized(self, field: str) -> bytes:
        return self.take(self.uint(2, f"{field} size"), field)


def parse_attest(message: bytes) -> TpmQuote:
    """Parse a TPMS_ATTEST that must be a quote; raises AttestParseError naming the field."""
    r = _Reader(message)
    magic = r.uint(4, "magic")
    if magic != TPM_GENERATED_VALUE:
        raise AttestParseError(
            f"magic is {magic:#010x}, expected {TPM_GENERATED_VALUE:#010x} (TPM_GENERATED_VALUE): "
            "the TPM did not generate this message"
        )
    kind = r.uint(2, "type")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise AttestParseError(
            f"type is {kind:#06x}, expected {TPM_ST_ATTEST_QUOTE:#06x} (TPM_ST_ATTEST_QUOTE)"
        )
    signer = r.sized("qualifiedSigner")
    extra = r.sized("extraData")
    clock = r.uint(8, "clockInfo.clock")
    resets = r.uint(4, "clockInfo.resetCount")
    restarts = r.uint(4, "clockInfo.restartCount")
    safe = r.uint(1, "clockInfo.safe")
    if safe > 1:
        raise AttestParseError(f"clockInfo.safe is {safe}, not a TPMI_YES_NO")
    firmware = r.uint(8, "firmwareVersion")
    count = r.uint(4, "pcrSelect.count")
    if count > 16:
        raise AttestParseError(f"pcrSelect.count is {count}; a TPM has far fewer banks")
    selections = []
    for i in range(count):
        alg = r.uint(2, f"pcrSelect[{i}].hash")
        size = r.uint(1, f"pcrSelect[{i}].sizeofSelect")
        selections.append(PcrSelection(alg, r.take(size, f"pcrSelect[{i}].pcrSelect")))
    digest = r.sized("pcrDigest")
    if r.pos != len(message):
        raise AttestParseError(
            f"{len(message) - r.pos} bytes follow the TPMS_ATTEST structure (at offset {r.pos})"
        )
    return TpmQuote(
        magic=magic, type=kind, qualified_signer=signer, extra_data=extra, clock=clock,
        reset_count=resets, restart_count=restarts, safe=bool(safe), firmware_version=firmware,
        pcr_selections=tuple(selections), pcr_digest=digest,
    )  # fmt: skip


def rsassa_sha256_verify(key: RsaKey, signature: bytes, message: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 with SHA-256 (TPM_ALG_RSASSA, the vTPM attestation key's scheme)."""
    if len(signature) != (key.bits + 7) // 8:
        return False
    public = rsa.RSAPublicNumbers(key.e, key.n).public_key()
    try:
        public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def pcr_digest(pcrs: Sequence[bytes]) -> bytes:
    """TPMS_QUOTE_INFO.pcrDigest for one SHA-256 bank: SHA-256 over the values in PCR order."""
    return hashlib.sha256(b"".join(pcrs)).digest()
