"""The kernel command line as boot config: `ee.KEY=VALUE`, and the `ee.dev=1` marker.

Only simulated (local-dev) images read boot config from the command line: a production image runs
only under the UKI's own command line (eemini.guest.pid1.check_cmdline), and the builder refuses
the `cmdline` config source in production profiles, so this parser ships in dev images alone.
"""

from __future__ import annotations

from eemini.guest.bootconfig import KERNEL_SPACES, ConfigError, Setting, make_setting
from eemini.guest.image import ConfigSource
from eemini.guest.record import record


@record
class Cmdline:
    params: tuple[tuple[str, str | None], ...]

    def has(self, key: str, value: str) -> bool:
        return (key, value) in self.params


_QUOTE = ord('"')
_EQUALS = ord("=")


def _c_string(buf: bytearray, start: int) -> bytes:
    return bytes(buf[start : buf.index(0, start)])


def _next_arg(buf: bytearray, args: int) -> tuple[bytes, bytes | None, int, bool]:
    """lib/cmdline.c next_arg() on a NUL-terminated buffer, step for step: (param, value or None,
    where the next argument starts, whether a double quote was left open)."""
    in_quote = quoted = False
    if buf[args] == _QUOTE:
        args += 1
        in_quote = quoted = True
    i = equals = 0
    while buf[args + i]:
        c = buf[args + i]
        if c in KERNEL_SPACES and not in_quote:
            break
        if equals == 0 and c == _EQUALS:
            equals = i
        if c == _QUOTE:
            in_quote = not in_quote
        i += 1
    value = None
    if equals:
        buf[args + equals] = 0
        value = args + equals + 1
        if buf[value] == _QUOTE:  # the value's own quotes are not part of it
            value += 1
            if buf[args + i - 1] == _QUOTE:
                buf[args + i - 1] = 0
    if quoted and buf[args + i - 1] == _QUOTE:
        buf[args + i - 1] = 0
    end = args + i
    following = end
    if buf[end]:
        buf[end] = 0
        following += 1
    param = _c_string(buf, args)
    val = None if value is None else _c_string(buf, value)
    while buf[following] in KERNEL_SPACES:  # skip_spaces()
        following += 1
    return param, val, following, in_quote


def parse_cmdline(text: str | bytes) -> Cmdline:
    """Split like the kernel's parse_args() and next_arg() (lib/cmdline.c), byte for byte, so
    every value is the value the kernel saw: kernel whitespace separates (`KERNEL_SPACES`), double
    quotes group, the quotes around a whole argument or around a value are dropped (others stay),
    the first `=` splits name and value, and a bare `--` ends the kernel's part. A `str` is taken
    as the bytes it was decoded from (UTF-8 with surrogateescape, as `pid1` reads /proc/cmdline);
    names and values are decoded the same way. The kernel would let an unterminated double quote
    run to the end of the line; that is refused here."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    buf = bytearray(raw.split(b"\0", 1)[0]) + b"\0"  # the kernel's copy is a C string
    params: list[tuple[str, str | None]] = []
    pos = 0
    while buf[pos] in KERNEL_SPACES:
        pos += 1
    while buf[pos]:
        param, value, pos, unterminated = _next_arg(buf, pos)
        if unterminated:
            raise ConfigError("the kernel command line has an unterminated double quote")
        if value is None and param == b"--":
            break  # everything after -- belongs to init's argv, not to us
        params.append(
            (
                param.decode("utf-8", "surrogateescape"),
                None if value is None else value.decode("utf-8", "surrogateescape"),
            )
        )
    return Cmdline(tuple(params))


# ee.* names on the cmdline that are image facts, not boot config: ee.dev=1 marks a local-dev
# image in the measured cmdline (set by the builder, checked by PID 1).
RESERVED = frozenset({"ee.dev"})
DEV_MARKER = ("ee.dev", "1")


def cmdline_settings(cmdline: Cmdline) -> list[Setting]:
    out = []
    for key, value in cmdline.params:
        if not key.startswith("ee.") or key in RESERVED:
            continue
        name = key[3:]
        if value is None:
            raise ConfigError(
                f"boot config {key!r} from {ConfigSource.CMDLINE} has no value (expected ee.KEY=VALUE)"
            )
        setting = make_setting(ConfigSource.CMDLINE, name, value, where=key)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 (kept by surrogateescape)
            raise ConfigError(
                f"boot config key {name!r} from {ConfigSource.CMDLINE} ({key}) has a value that "
                "is not UTF-8"
            ) from None
        out.append(setting)
    return out
