"""A small TPM 2.0 client over /dev/tpmrm0: the commands Azure attestation needs, nothing else.

Marshaling follows TCG TPM 2.0 Library Part 3 ("Commands"), all integers big-endian: a command is
tag (TPM_ST_NO_SESSIONS 0x8001 or TPM_ST_SESSIONS 0x8002), size u32, command code u32, the
handles, an authorization area when tagged with sessions (its size u32, then one password session
TPM_RS_PW with an empty nonce and an empty password: owner authorization and the attestation key
have none on Azure's vTPM), then the parameters. A response is tag, size, response code, and for
session commands a parameter-size u32 before the parameters.

Commands: NV_DefineSpace, NV_Write, NV_ReadPublic, NV_Read, Quote, PCR_Read, ReadPublic,
GetCapability (the NV buffer size). Response codes become TpmError with the code's name.

The device is any file descriptor that takes one whole command per write and answers with one
response: /dev/tpmrm0 (the kernel's resource manager), or a socket to a TPM simulator in tests.
"""

from __future__ import annotations

import os
import select
import struct
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

TPM_DEVICE = "/dev/tpmrm0"
TPM_ST_NO_SESSIONS = 0x8001
TPM_ST_SESSIONS = 0x8002
TPM_RS_PW = 0x40000009
TPM_RH_OWNER = 0x40000001
TPM_ALG_RSA = 0x0001
TPM_ALG_SHA256 = 0x000B
TPM_ALG_NULL = 0x0010
TPM_ALG_RSASSA = 0x0014
TPM_CAP_TPM_PROPERTIES = 0x00000006
TPM_PT_NV_BUFFER_MAX = 0x0000012C
TPM_ST_ATTEST_QUOTE = 0x8018

CC_NV_DEFINE_SPACE = 0x0000012A
CC_NV_WRITE = 0x00000137
CC_NV_READ = 0x0000014E
CC_QUOTE = 0x00000158
CC_NV_READ_PUBLIC = 0x00000169
CC_GET_CAPABILITY = 0x0000017A
CC_READ_PUBLIC = 0x00000173
CC_PCR_READ = 0x0000017E

# TPMA_NV (Part 2, 13.4)
TPMA_NV_OWNERWRITE = 1 << 1
TPMA_NV_AUTHWRITE = 1 << 2
TPMA_NV_OWNERREAD = 1 << 17
TPMA_NV_AUTHREAD = 1 << 18
TPMA_NV_NO_DA = 1 << 25
TPMA_NV_WRITTEN = 1 << 29

HEADER = struct.Struct(">HII")
MAX_RESPONSE = 8192  # a TPM's largest response is 4096 bytes (MAX_RESPONSE_SIZE in Part 2)
TIMEOUT = 120.0  # seconds for one command (an RSA signature on a slow vTPM takes well under one)
RETRIES = 20  # for the warnings that mean "try again" (RETRY, YIELDED, TESTING, NV_RATE)

# Part 2, 6.6: the response codes worth a name. Format-zero codes (bit 7 clear), warnings have 0x900.
RC_NAMES: dict[int, str] = {
    0x100: "TPM_RC_INITIALIZE (the TPM was not started up)",
    0x101: "TPM_RC_FAILURE (the TPM is in failure mode)",
    0x103: "TPM_RC_SEQUENCE",
    0x10B: "TPM_RC_PRIVATE",
    0x119: "TPM_RC_HMAC",
    0x120: "TPM_RC_DISABLED",
    0x121: "TPM_RC_EXCLUSIVE",
    0x124: "TPM_RC_AUTH_TYPE",
    0x125: "TPM_RC_AUTH_MISSING",
    0x126: "TPM_RC_POLICY",
    0x127: "TPM_RC_PCR",
    0x128: "TPM_RC_PCR_CHANGED",
    0x12D: "TPM_RC_UPGRADE",
    0x12E: "TPM_RC_TOO_MANY_CONTEXTS",
    0x12F: "TPM_RC_AUTH_UNAVAILABLE",
    0x130: "TPM_RC_REBOOT",
    0x131: "TPM_RC_UNBALANCED",
    0x142: "TPM_RC_COMMAND_SIZE",
    0x143: "TPM_RC_COMMAND_CODE (the TPM does not implement this command)",
    0x144: "TPM_RC_AUTHSIZE",
    0x145: "TPM_RC_AUTH_CONTEXT",
    0x146: "TPM_RC_NV_RANGE (offset and size are outside the index)",
    0x147: "TPM_RC_NV_SIZE",
    0x148: "TPM_RC_NV_LOCKED",
    0x149: "TPM_RC_NV_AUTHORIZATION (the index does not allow this authorization)",
    0x14A: "TPM_RC_NV_UNINITIALIZED (the index was never written)",
    0x14B: "TPM_RC_NV_SPACE (no room for another index)",
    0x14C: "TPM_RC_NV_DEFINED (the index already exists)",
    0x150: "TPM_RC_BAD_CONTEXT",
    0x151: "TPM_RC_CPHASH",
    0x152: "TPM_RC_PARENT",
    0x153: "TPM_RC_NEEDS_TEST",
    0x154: "TPM_RC_NO_RESULT",
    0x155: "TPM_RC_SENSITIVE",
    0x901: "TPM_RC_CONTEXT_GAP",
    0x902: "TPM_RC_OBJECT_MEMORY",
    0x903: "TPM_RC_SESSION_MEMORY",
    0x904: "TPM_RC_MEMORY",
    0x905: "TPM_RC_SESSION_HANDLES",
    0x906: "TPM_RC_OBJECT_HANDLES",
    0x907: "TPM_RC_LOCALITY",
    0x908: "TPM_RC_YIELDED",
    0x909: "TPM_RC_CANCELED",
    0x90A: "TPM_RC_TESTING",
    0x920: "TPM_RC_NV_RATE",
    0x921: "TPM_RC_LOCKOUT",
    0x922: "TPM_RC_RETRY",
    0x923: "TPM_RC_NV_UNAVAILABLE",
}
# Format-one codes (bit 7 set): the error number in bits 0..5, the handle, session or parameter
# it concerns in bits 8..11.
RC_FMT1_NAMES: dict[int, str] = {
    0x01: "TPM_RC_ASYMMETRIC",
    0x02: "TPM_RC_ATTRIBUTES",
    0x03: "TPM_RC_HASH",
    0x04: "TPM_RC_VALUE",
    0x05: "TPM_RC_HIERARCHY",
    0x07: "TPM_RC_KEY_SIZE",
    0x08: "TPM_RC_MGF",
    0x09: "TPM_RC_MODE",
    0x0A: "TPM_RC_TYPE",
    0x0B: "TPM_RC_HANDLE",
    0x0C: "TPM_RC_KDF",
    0x0D: "TPM_RC_RANGE",
    0x0E: "TPM_RC_AUTH_FAIL",
    0x0F: "TPM_RC_NONCE",
    0x10: "TPM_RC_PP",
    0x12: "TPM_RC_SCHEME",
    0x15: "TPM_RC_SIZE",
    0x16: "TPM_RC_SYMMETRIC",
    0x17: "TPM_RC_TAG",
    0x18: "TPM_RC_SELECTOR",
    0x1A: "TPM_RC_INSUFFICIENT",
    0x1B: "TPM_RC_SIGNATURE",
    0x1C: "TPM_RC_KEY",
    0x1D: "TPM_RC_POLICY_FAIL",
    0x1F: "TPM_RC_INTEGRITY",
    0x20: "TPM_RC_TICKET",
    0x21: "TPM_RC_RESERVED_BITS",
    0x22: "TPM_RC_BAD_AUTH",
    0x23: "TPM_RC_EXPIRED",
    0x24: "TPM_RC_POLICY_CC",
    0x25: "TPM_RC_BINDING",
    0x26: "TPM_RC_CURVE",
    0x27: "TPM_RC_ECC_POINT",
}
RETRY_CODES = frozenset({0x908, 0x90A, 0x920, 0x922})  # YIELDED, TESTING, NV_RATE, RETRY


def rc_name(rc: int) -> str:
    """A response code as a sentence fragment: its name and, for format-one codes, what it is about."""
    if rc & 0x80:
        name = RC_FMT1_NAMES.get(rc & 0x3F, f"format-one error {rc & 0x3F:#x}")
        n = (rc >> 8) & 0xF
        if rc & 0x40:
            return f"{name} (parameter {n})"
        if rc & 0x800:
            return f"{name} (session {n & 0x7})"
        return f"{name} (handle {n})"
    if rc < 0x100:
        return f"a TPM 1.2 response code {rc:#x} (this is not a TPM 2.0 device)"
    return RC_NAMES.get(rc, f"response code {rc:#x}")


class TpmError(Exception):
    """A TPM command failed; `rc` is the response code (None for transport and format errors)."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


def _b(data: bytes) -> bytes:
    """A TPM2B: u16 size, then the bytes."""
    return struct.pack(">H", len(data)) + data


# One password session, empty nonce, continueSession, empty password (Part 1, 19.8.4).
PASSWORD_SESSION = struct.pack(">I", TPM_RS_PW) + _b(b"") + b"\x01" + _b(b"")


class _Reader:
    """Unmarshaling with a TpmError naming the field when the response is short."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise TpmError(f"{self.what}: response too short for {field}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def sized(self, field: str) -> bytes:
        return self.take(self.u16(f"{field} size"), field)


def pcr_selection(pcrs: range | tuple[int, ...] | list[int], alg: int = TPM_ALG_SHA256) -> bytes:
    """TPML_PCR_SELECTION with one bank: count 1, hash, sizeofSelect 3, the bitmap."""
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">IHB", 1, alg, 3) + bytes(bitmap)


class NvPublic:
    __slots__ = ("attributes", "data_size", "index", "name_alg")

    def __init__(self, index: int, name_alg: int, attributes: int, data_size: int) -> None:
        self.index = index
        self.name_alg = name_alg
        self.attributes = attributes
        self.data_size = data_size


class RsaPublic:
    """An RSA key's public part, from TPM2_ReadPublic."""

    __slots__ = ("attributes", "exponent", "modulus", "scheme", "scheme_hash")

    def __init__(
        self, modulus: int, exponent: int, attributes: int, scheme: int, scheme_hash: int
    ) -> None:
        self.modulus = modulus
        self.exponent = exponent
        self.attributes = attributes
        self.scheme = scheme
        self.scheme_hash = scheme_hash


class Quote:
    """TPM2_Quote's answer: the TPMS_ATTEST message and the raw RSASSA signature over it."""

    __slots__ = ("message", "signature")

    def __init__(self, message: bytes, signature: bytes) -> None:
        self.message = message
        self.signature = signature


class Tpm:
    """One TPM, one command at a time. `fd` is an open device (or socket); `close()` closes it."""

    def __init__(
        self, fd: int, *, timeout: float = TIMEOUT, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.fd = fd
        self.timeout = timeout
        self._sleep = sleep

    @classmethod
    def open(cls, path: str = TPM_DEVICE) -> Tpm:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise TpmError(f"cannot open the TPM {path}: {e.strerror}") from None
        return cls(fd)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ---

    def _read_exactly(self, n: int, what: str) -> bytes:
        chunks: list[bytes] = []
        got = 0
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TpmError(f"{what}: the TPM did not answer within {self.timeout:.0f} s")
            try:
                chunk = os.read(self.fd, MAX_RESPONSE)
            except OSError as e:
                raise TpmError(f"{what}: reading the TPM's answer failed: {e.strerror}") from None
            if not chunk:
                raise TpmError(f"{what}: the TPM closed the connection")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def transact(self, command: bytes, what: str) -> bytes:
        """Send one command, return its whole response (header included)."""
        try:
            sent = os.write(self.fd, command)
        except OSError as e:
            raise TpmError(f"{what}: writing to the TPM failed: {e.strerror}") from None
        if sent != len(command):
            raise TpmError(f"{what}: short write to the TPM ({sent} of {len(command)} bytes)")
        data = self._read_exactly(HEADER.size, what)
        _, size, _ = HEADER.unpack_from(data)
        if size < HEADER.size or size > MAX_RESPONSE:
            raise TpmError(f"{what}: the TPM's answer claims {size} bytes")
        if len(data) < size:
            data += self._read_exactly(size - len(data), what)
        if len(data) != size:
            raise TpmError(f"{what}: the TPM answered {len(data)} bytes, its header says {size}")
        return data

    def command(
        self, code: int, what: str, handles: bytes = b"", params: bytes = b"", *, sessions: bool = False
    ) -> bytes:
        """Run a command (retrying the TPM's "try again" warnings); return its parameters."""
        tag = TPM_ST_SESSIONS if sessions else TPM_ST_NO_SESSIONS
        auth = struct.pack(">I", len(PASSWORD_SESSION)) + PASSWORD_SESSION if sessions else b""
        body = handles + auth + params
        cmd = HEADER.pack(tag, HEADER.size + len(body), code) + body
        for attempt in range(RETRIES + 1):
            resp = self.transact(cmd, what)
            _, _, rc = HEADER.unpack_from(resp)
            if rc == 0:
                break
            if rc in RETRY_CODES and attempt < RETRIES:
                self._sleep(min(0.05 * (attempt + 1), 1.0))
                continue
            raise TpmError(f"{what}: the TPM answered {rc_name(rc)}", rc)
        rest = resp[HEADER.size :]
        if sessions:
            if len(rest) < 4:
                raise TpmError(f"{what}: response too short for its parameter size")
            (size,) = struct.unpack_from(">I", rest)
            if 4 + size > len(rest):
                raise TpmError(f"{what}: parameter size {size} runs past the response")
            return rest[4 : 4 + size]
        return rest

    # --- commands ---

    def nv_buffer_max(self) -> int:
        """TPM_PT_NV_BUFFER_MAX: the most an NV_Read or NV_Write moves at once."""
        params = struct.pack(">III", TPM_CAP_TPM_PROPERTIES, TPM_PT_NV_BUFFER_MAX, 1)
        r = _Reader(
            self.command(CC_GET_CAPABILITY, "TPM2_GetCapability", params=params), "GetCapability"
        )
        r.u8("moreData")
        if r.u32("capability") != TPM_CAP_TPM_PROPERTIES:
            raise TpmError("TPM2_GetCapability answered another capability")
        for _ in range(r.u32("count")):
            prop, value = r.u32("property"), r.u32("value")
            if prop == TPM_PT_NV_BUFFER_MAX:
                return value
        raise TpmError("TPM2_GetCapability: the TPM did not report TPM_PT_NV_BUFFER_MAX")

    def nv_read_public(self, index: int) -> NvPublic:
        what = f"TPM2_NV_ReadPublic({index:#010x})"
        r = _Reader(self.command(CC_NV_READ_PUBLIC, what, struct.pack(">I", index)), what)
        pub = _Reader(r.sized("nvPublic"), what)
        got = NvPublic(pub.u32("nvIndex"), pub.u16("nameAlg"), pub.u32("attributes"), 0)
        pub.sized("authPolicy")
        got.data_size = pub.u16("dataSize")
        if got.index != index:
            raise TpmError(f"{what}: the TPM described index {got.index:#010x}")
        return got

    def nv_define_space(self, index: int, size: int, attributes: int) -> None:
        public = (
            struct.pack(">IHI", index, TPM_ALG_SHA256, attributes) + _b(b"") + struct.pack(">H", size)
        )
        params = _b(b"") + _b(public)
        self.command(
            CC_NV_DEFINE_SPACE, f"TPM2_NV_DefineSpace({index:#010x})",
            struct.pack(">I", TPM_RH_OWNER), params, sessions=True,
        )  # fmt: skip

    def nv_write(self, index: int, data: bytes, chunk: int, *, auth: int = TPM_RH_OWNER) -> None:
        for offset in range(0, len(data), chunk):
            part = data[offset : offset + chunk]
            self.command(
                CC_NV_WRITE, f"TPM2_NV_Write({index:#010x}, offset {offset})",
                struct.pack(">II", auth, index), _b(part) + struct.pack(">H", offset), sessions=True,
            )  # fmt: skip

    def nv_read(self, index: int, size: int, chunk: int, *, auth: int = TPM_RH_OWNER) -> bytes:
        out = bytearray()
        while len(out) < size:
            n = min(chunk, size - len(out))
            what = f"TPM2_NV_Read({index:#010x}, offset {len(out)})"
            params = struct.pack(">HH", n, len(out))
            r = _Reader(
                self.command(CC_NV_READ, what, struct.pack(">II", auth, index), params, sessions=True),
                what,
            )
            data = r.sized("data")
            if len(data) != n:
                raise TpmError(f"{what}: asked for {n} bytes, the TPM returned {len(data)}")
            out += data
        return bytes(out)

    def read_public(self, handle: int) -> RsaPublic:
        """The public part of an RSA key (TPMT_PUBLIC, Part 2 12.2.4)."""
        what = f"TPM2_ReadPublic({handle:#010x})"
        r = _Reader(self.command(CC_READ_PUBLIC, what, struct.pack(">I", handle)), what)
        pub = _Reader(r.sized("outPublic"), what)
        kind = pub.u16("type")
        if kind != TPM_ALG_RSA:
            raise TpmError(f"{what}: the key is of type {kind:#06x}, not RSA")
        pub.u16("nameAlg")
        attributes = pub.u32("objectAttributes")
        pub.sized("authPolicy")
        if pub.u16("symmetric.algorithm") != TPM_ALG_NULL:
            pub.u16("symmetric.keyBits")
            pub.u16("symmetric.mode")
        scheme = pub.u16("scheme")
        scheme_hash = pub.u16("scheme.hashAlg") if scheme != TPM_ALG_NULL else TPM_ALG_NULL
        pub.u16("keyBits")
        exponent = pub.u32("exponent") or 65537  # 0 means the default exponent
        modulus = int.from_bytes(pub.sized("unique"), "big")
        return RsaPublic(modulus, exponent, attributes, scheme, scheme_hash)

    def quote(self, key: int, qualifying_data: bytes, pcrs: range = range(24)) -> Quote:
        """TPM2_Quote with the key's own scheme (which must be RSASSA-SHA256) over SHA-256 `pcrs`."""
        what = f"TPM2_Quote({key:#010x})"
        params = _b(qualifying_data) + struct.pack(">H", TPM_ALG_NULL) + pcr_selection(pcrs)
        r = _Reader(self.command(CC_QUOTE, what, struct.pack(">I", key), params, sessions=True), what)
        message = r.sized("quoted")
        sig_alg = r.u16("signature.sigAlg")
        if sig_alg != TPM_ALG_RSASSA:
            raise TpmError(f"{what}: the signature is of algorithm {sig_alg:#06x}, not RSASSA")
        hash_alg = r.u16("signature.hash")
        if hash_alg != TPM_ALG_SHA256:
            raise TpmError(f"{what}: the signature uses hash {hash_alg:#06x}, not SHA-256")
        return Quote(message, r.sized("signature.sig"))

    def pcr_read(self, pcrs: range = range(24)) -> list[bytes]:
        """SHA-256 PCR values; a TPM answers at most 8 per call, so ask again for the rest."""
        values: dict[int, bytes] = {}
        wanted = list(pcrs)
        for _ in range(len(wanted) + 1):
            left = [i for i in wanted if i not in values]
            if not left:
                break
            r = _Reader(
                self.command(CC_PCR_READ, "TPM2_PCR_Read", params=pcr_selection(left)), "PCR_Read"
            )
            r.u32("pcrUpdateCounter")
            got: list[int] = []
            for _ in range(r.u32("pcrSelectionOut.count")):
                alg = r.u16("hash")
                bitmap = r.take(r.u8("sizeofSelect"), "pcrSelect")
                if alg == TPM_ALG_SHA256:
                    got += [i for i in range(8 * len(bitmap)) if bitmap[i // 8] >> (i % 8) & 1]
            digests = [r.sized("digest") for _ in range(r.u32("pcrValues.count"))]
            if len(digests) != len(got) or not got:
                raise TpmError(
                    "TPM2_PCR_Read: the TPM returned no SHA-256 PCR values (no SHA-256 bank?)"
                )
            for i, d in zip(got, digests, strict=True):
                if len(d) != 32:
                    raise TpmError(f"TPM2_PCR_Read: PCR {i} is {len(d)} bytes, not a SHA-256 value")
                values[i] = d
        if len(values) != len(wanted):
            raise TpmError("TPM2_PCR_Read: the TPM never returned every PCR asked for")
        return [values[i] for i in wanted]
