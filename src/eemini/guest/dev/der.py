"""A small DER encoder (ITU-T X.690), enough for the simulated backend's X.509 certificates."""

from __future__ import annotations


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _length(len(content)) + content


def sequence(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def set_of(*items: bytes) -> bytes:
    # DER sorts SET OF members by their encodings (X.690 section 11.6).
    return tlv(0x31, b"".join(sorted(items)))


def integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative INTEGERs are not needed here")
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # keeps a leading 0 for the sign
    while len(body) > 1 and body[0] == 0 and body[1] < 0x80:
        body = body[1:]
    return tlv(0x02, body)


def enumerated(value: int) -> bytes:
    return b"\x0a" + integer(value)[1:]


def boolean(value: bool) -> bytes:
    return tlv(0x01, b"\xff" if value else b"\x00")


def octet_string(data: bytes) -> bytes:
    return tlv(0x04, data)


def bit_string(data: bytes, unused_bits: int = 0) -> bytes:
    return tlv(0x03, bytes([unused_bits]) + data)


def utf8_string(text: str) -> bytes:
    return tlv(0x0C, text.encode())


def utc_time(text: str) -> bytes:
    """YYMMDDHHMMSSZ (dates before 2050, RFC 5280 section 4.1.2.5.1)."""
    return tlv(0x17, text.encode("ascii"))


def oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([parts[0] * 40 + parts[1]])
    for part in parts[2:]:
        rest = part
        chunk = [rest & 0x7F]
        rest >>= 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


def explicit(tag_number: int, content: bytes) -> bytes:
    """[n] EXPLICIT: a constructed context-specific tag around one encoding."""
    return tlv(0xA0 | tag_number, content)
