"""The one place where the verifier meets the exceptions of the libraries it parses with.

Rule: every parse of untrusted input (quotes, certificates, CRLs, issuer chains, the PCK
certificate's SGX extension, collateral JSON, policies), and every later access to what a library
parsed lazily (a certificate's extensions, names, key, validity, signature algorithm; a CRL's
entries), runs inside `parsing(error, what)`. There, any exception of `LIBRARY_ERRORS` (those of
`cryptography`, json, binascii, struct and the built-in ones they raise: ValueError, TypeError,
UnicodeError, KeyError, IndexError, OverflowError, RecursionError) becomes `error(f"{what}: ...")`
with the library's message, and an error of ours (QuoteError) passes through unchanged. So
verification raises nothing but eemini.tdx.errors, whatever the input; nowhere else in eemini.tdx
catches library exceptions to convert them. (A signature check answering InvalidSignature is a
result, not a parse: chain.py turns it into False, and the check raises its own error.)
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def parsing(error: Callable[[str], QuoteError], what: str) -> Iterator[None]:
    """Run a parse (or a lazy access) so that a library exception becomes `error(f"{what}: ...")`.

    Warnings (cryptography's about a country name's length, say) are silenced: the value parsed,
    and the checks judge it; a warning line would only break the one-line output of the CLI.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except QuoteError:
        raise
    except LIBRARY_ERRORS as e:
        raise error(f"{what}: {describe(e)}") from e


def utf8(text: str, error: Callable[[str], QuoteError], what: str) -> bytes:
    """`text` as UTF-8; a str from JSON may hold lone surrogates ("\\ud800"), which have none."""
    with parsing(error, f"{what} is not valid Unicode"):
        return text.encode()
