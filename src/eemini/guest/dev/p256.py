"""ECDSA over NIST P-256 with SHA-256, standard library only, for the simulated backend.

Not constant-time and not meant to guard secrets: the simulated backend signs with published
development keys. Nonces are deterministic (RFC 6979 section 3.2), so the same key and message
always give the same signature and no randomness source is needed.

Points are kept in Jacobian coordinates (X, Y, Z) ~ (X/Z^2, Y/Z^3) to avoid a modular inverse per
addition; multiples of the generator use a fixed-base table of 4-bit windows built once, so a
signature costs about 64 point additions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from eemini.guest.record import record

# SEC 2 v2, section 2.4.2 (secp256r1).
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
A = P - 3
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5

Jacobian = tuple[int, int, int]
_INFINITY: Jacobian = (1, 1, 0)


def _double(p: Jacobian) -> Jacobian:
    x, y, z = p
    if z == 0 or y == 0:
        return _INFINITY
    # dbl-2001-b (a = -3): https://hyperelliptic.org/EFD/g1p/auto-shortw-jacobian-3.html
    delta = z * z % P
    gamma = y * y % P
    beta = x * gamma % P
    alpha = 3 * (x - delta) * (x + delta) % P
    x3 = (alpha * alpha - 8 * beta) % P
    z3 = ((y + z) ** 2 - gamma - delta) % P
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % P
    return (x3, y3, z3)


def _add(p: Jacobian, q: Jacobian) -> Jacobian:
    x1, y1, z1 = p
    x2, y2, z2 = q
    if z1 == 0:
        return q
    if z2 == 0:
        return p
    z1z1 = z1 * z1 % P
    z2z2 = z2 * z2 % P
    u1 = x1 * z2z2 % P
    u2 = x2 * z1z1 % P
    s1 = y1 * z2 * z2z2 % P
    s2 = y2 * z1 * z1z1 % P
    h = (u2 - u1) % P
    r = (s2 - s1) % P
    if h == 0:
        return _double(p) if r == 0 else _INFINITY
    hh = h * h % P
    hhh = h * hh % P
    v = u1 * hh % P
    x3 = (r * r - hhh - 2 * v) % P
    y3 = (r * (v - x3) - s1 * hhh) % P
    z3 = z1 * z2 * h % P
    return (x3, y3, z3)


def _to_affine(p: Jacobian) -> tuple[int, int]:
    x, y, z = p
    if z == 0:
        raise ValueError("point at infinity has no affine coordinates")
    zi = pow(z, -1, P)
    zi2 = zi * zi % P
    return (x * zi2 % P, y * zi2 * zi % P)


_G_TABLE: list[list[Jacobian]] = []


def _g_table() -> list[list[Jacobian]]:
    # table[i][j] = j * 16**i * G for 64 windows of 4 bits (built on first use, ~1000 additions).
    if not _G_TABLE:
        base: Jacobian = (GX, GY, 1)
        for _ in range(64):
            row = [_INFINITY, base]
            for _ in range(14):
                row.append(_add(row[-1], base))
            _G_TABLE.append(row)
            for _ in range(4):
                base = _double(base)
    return _G_TABLE


def _mul_g(k: int) -> Jacobian:
    table = _g_table()
    acc = _INFINITY
    for i in range(64):
        nibble = (k >> (4 * i)) & 0xF
        if nibble:
            acc = _add(acc, table[i][nibble])
    return acc


def _mul(k: int, point: Jacobian) -> Jacobian:
    # 4-bit fixed window over an arbitrary point (used for verification only).
    row = [_INFINITY, point]
    for _ in range(14):
        row.append(_add(row[-1], point))
    acc = _INFINITY
    for shift in range(252, -1, -4):
        for _ in range(4):
            acc = _double(acc)
        nibble = (k >> shift) & 0xF
        if nibble:
            acc = _add(acc, row[nibble])
    return acc


def _on_curve(x: int, y: int) -> bool:
    return (y * y - (x * x * x + A * x + B)) % P == 0


@record
class PublicKey:
    x: int
    y: int

    def __post_init__(self) -> None:
        if not (0 <= self.x < P and 0 <= self.y < P and _on_curve(self.x, self.y)):
            raise ValueError("not a point on P-256")

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        """From 64 bytes x||y (the TDX quote encoding)."""
        if len(raw) != 64:
            raise ValueError(f"raw P-256 public key must be 64 bytes, got {len(raw)}")
        return cls(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))

    def raw(self) -> bytes:
        """64 bytes x||y, as TDX quotes carry attestation keys."""
        return self.x.to_bytes(32, "big") + self.y.to_bytes(32, "big")

    def sec1(self) -> bytes:
        """Uncompressed SEC 1 encoding 0x04||x||y, as in X.509 SubjectPublicKeyInfo."""
        return b"\x04" + self.raw()

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Check a raw r||s signature over SHA-256(message)."""
        if len(signature) != 64:
            return False
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        if not (1 <= r < N and 1 <= s < N):
            return False
        e = int.from_bytes(hashlib.sha256(message).digest(), "big")
        w = pow(s, -1, N)
        point = _add(_mul_g(e * w % N), _mul(r * w % N, (self.x, self.y, 1)))
        if point[2] == 0:
            return False
        return _to_affine(point)[0] % N == r


@record
class PrivateKey:
    d: int

    def __post_init__(self) -> None:
        if not 1 <= self.d < N:
            raise ValueError("P-256 private key out of range")

    @classmethod
    def from_seed(cls, seed: bytes) -> PrivateKey:
        """A key derived from public seed bytes: d = SHA-256(seed) mod (n - 1) + 1."""
        return cls(int.from_bytes(hashlib.sha256(seed).digest(), "big") % (N - 1) + 1)

    def public_key(self) -> PublicKey:
        x, y = _to_affine(_mul_g(self.d))
        return PublicKey(x, y)

    def sign(self, message: bytes) -> bytes:
        """ECDSA-SHA256 signature as 64 bytes r||s (low-s is not enforced, as in DCAP)."""
        h1 = hashlib.sha256(message).digest()
        e = int.from_bytes(h1, "big")
        for k in _rfc6979_nonces(self.d, h1):
            r = _to_affine(_mul_g(k))[0] % N
            if r == 0:
                continue
            s = pow(k, -1, N) * (e + r * self.d) % N
            if s == 0:
                continue
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        raise AssertionError("unreachable")  # pragma: no cover


# RFC 2104 HMAC over SHA-256 (block size 64 bytes): the same bytes as hmac.new(key, message,
# hashlib.sha256).digest().
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = hashlib.sha256(key.translate(_IPAD) + message).digest()
    return hashlib.sha256(key.translate(_OPAD) + inner).digest()


def _rfc6979_nonces(d: int, h1: bytes) -> Iterator[int]:
    # RFC 6979 section 3.2 with HMAC-SHA256; qlen = hlen = 256 so bits2int is the identity.
    x = d.to_bytes(32, "big")
    h = (int.from_bytes(h1, "big") % N).to_bytes(32, "big")
    v = b"\x01" * 32
    k = b"\x00" * 32
    k = _hmac_sha256(k, v + b"\x00" + x + h)
    v = _hmac_sha256(k, v)
    k = _hmac_sha256(k, v + b"\x01" + x + h)
    v = _hmac_sha256(k, v)
    while True:
        v = _hmac_sha256(k, v)
        candidate = int.from_bytes(v, "big")
        if 1 <= candidate < N:
            yield candidate
        k = _hmac_sha256(k, v + b"\x00")
        v = _hmac_sha256(k, v)


def der_signature(raw: bytes) -> bytes:
    """r||s -> DER Ecdsa-Sig-Value (RFC 3279 section 2.2.3), as X.509 signatures carry it."""
    from eemini.guest.dev import der

    r = int.from_bytes(raw[:32], "big")
    s = int.from_bytes(raw[32:], "big")
    return der.sequence(der.integer(r), der.integer(s))
