"""JSON for PID 1, straight from CPython's own C codec (`_json`), without the `json` package.

`import json` costs PID 1 more than any other module at boot: json.decoder compiles regular
expressions at import, which pulls in `re`, all to serve a pure-Python fallback that never runs
when `_json` is there, as it always is in CPython. Under software emulation that is a sixth of a
second before the workload starts. These functions drive the C scanner and encoder that
`json.loads` and `json.dumps` use, with the same defaults, so they accept and produce exactly
what those do. Text that is not JSON goes to `json.loads` itself, for its error and message:
only then is `json` imported.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

WHITESPACE = " \t\n\r"  # JSON's insignificant whitespace (RFC 8259 section 2)


class _Decoder:
    """What `_json.make_scanner` reads of a json.JSONDecoder: json.loads's defaults."""

    strict, object_hook, object_pairs_hook, parse_float, parse_int = True, None, None, float, int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.get


_scan = _json.make_scanner(_Decoder())  # type: ignore[arg-type]  # typeshed: a JSONDecoder


def loads(text: str | bytes) -> Any:  # as json.loads
    """`json.loads(text)`, bytes taken as UTF-8; a ValueError (json.JSONDecodeError, or
    UnicodeDecodeError) names what is wrong and where."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        value, end = _scan(text, len(text) - len(text.lstrip(WHITESPACE)))
    except (StopIteration, SystemError):  # no value there (3.11's _json: or an error it can't raise)
        end = -1
    if end == len(text.rstrip(WHITESPACE)):  # a value, then only whitespace
        return value
    import json

    return json.loads(text)  # raises json's own JSONDecodeError


def problem(e: ValueError) -> str:
    """What a ValueError from `loads` says: json's message and column, or its own text (an integer
    beyond the interpreter's digit limit)."""
    column = getattr(e, "colno", None)
    return f"{getattr(e, 'msg', e)} at column {column}" if column is not None else str(e)


def _unserializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps(value: object, sort_keys: bool = False) -> str:
    """`json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)`."""
    # markers, default, encoder, indent, key and item separators, sort_keys, skipkeys, allow_nan
    encode = _json.make_encoder(
        {}, _unserializable, _json.encode_basestring, None, ":", ",", sort_keys, False, True
    )
    return "".join(encode(value, 0))
