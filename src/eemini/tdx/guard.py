"""The one place where the verifier meets the exceptions of the libraries it parses with.

Rule: every parse of untrusted input (quotes, certificates, CRLs, issuer chains, the PCK
certificate's SGX extension, collateral JSON, policies), and every later access to what a library
parsed lazily (a certificate's key, serial number, validity, signature algorithm and, for the PCK
certificate, extensions; a CRL's dates and entries), runs inside `parsing(error, what)`. There, any
exception of `LIBRARY_ERRORS` (those of `cryptography`, json, binascii, struct and the built-in ones
they raise: ValueError, TypeError, UnicodeError, KeyError, IndexError, OverflowError,
RecursionError) becomes `error(f"{what}: ...")` with the library's message, and an error of ours
(QuoteError) passes through unchanged. So verification raises nothing but eemini.tdx.errors,
whatever the input; nowhere else in eemini.tdx catches library exceptions to convert them. (The
collateral fetcher, eemini.tdx.pcs, parses what services serve and what its cache holds here too;
the I/O errors of its sockets, TLS and files are not parsing, and become CollateralUnavailable
where they happen.)

Names, issuers and the CA flag are read from the DER by our own reader (pck.der_spans), which
raises only our errors. A signature check answering InvalidSignature is a result, not a parse:
chain.py turns it into False and the check raises its own error. Warnings (cryptography's about a
serial number that is not positive, say) are the caller's: `eemini verify` silences them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import TracebackType
from typing import Any

from cryptography import exceptions as crypto_exceptions
from cryptography import x509

from eemini.tdx.errors import QuoteError

LIBRARY_ERRORS: tuple[type[Exception], ...] = (
    ValueError,  # also UnicodeError, json.JSONDecodeError, binascii.Error
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,  # json on deeply nested input
    struct.error,
    crypto_exceptions.UnsupportedAlgorithm,
    crypto_exceptions.InvalidSignature,
    crypto_exceptions.InternalError,
    x509.DuplicateExtension,
    x509.InvalidVersion,
    x509.ExtensionNotFound,
    x509.AttributeNotFound,
    x509.UnsupportedGeneralNameType,
)


def describe(e: BaseException) -> str:
    """The library's message, after its type unless that is a ValueError (which says enough)."""
    text = str(e)
    if isinstance(e, ValueError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Parsing:
    __slots__ = ("_error", "_what")

    def __init__(self, error: Callable[[str], QuoteError], what: str) -> None:
        self._error = error
        self._what = what

    def __enter__(self) -> None:
        pass

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if e is not None and isinstance(e, LIBRARY_ERRORS) and not isinstance(e, QuoteError):
            raise self._error(f"{self._what}: {describe(e)}") from e


def parsing(error: Callable[[str], QuoteError], what: str) -> _Parsing:
    """A context in which a library exception becomes `error(f"{what}: ...")`."""
    return _Parsing(error, what)


def utf8(text: str, error: Callable[[str], QuoteError], what: str) -> bytes:
    """`text` as UTF-8; a str from JSON may hold lone surrogates ("\\ud800"), which have none."""
    if text.isascii():
        return text.encode("ascii")
    with parsing(error, f"{what} is not valid Unicode"):
        return text.encode()


def unique_keys(
    error: Callable[[str], Exception],
) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A `json.loads` object_pairs_hook that raises `error(key)` for a key twice in one object: the
    document says two things, and JSON parsers disagree on which wins."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(key)
            out[key] = value
        return out

    return hook
