"""The workload's recent output: a ring buffer bounded in lines and in bytes."""

from __future__ import annotations

from collections import deque

# Defaults: enough to debug a crash loop, small next to the runtime's own RSS.
MAX_LINES = 2000
MAX_BYTES = 512 * 1024
MAX_LINE_BYTES = 4096


class LogBuffer:
    """Keeps the newest lines; drops the oldest when either bound is exceeded."""

    def __init__(self, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._lines: deque[str] = deque()
        self.size = 0  # bytes of UTF-8 in the buffer
        self.dropped = 0

    def append(self, text: str) -> None:
        # A single line larger than the whole buffer keeps its tail, so the bound always holds.
        encoded = text.encode("utf-8", "replace")
        if len(encoded) > self.max_bytes:
            text = encoded[-self.max_bytes :].decode("utf-8", "ignore")
            encoded = text.encode()
        self._lines.append(text)
        self.size += len(encoded)
        while len(self._lines) > self.max_lines or self.size > self.max_bytes:
            self.size -= len(self._lines.popleft().encode("utf-8", "replace"))
            self.dropped += 1

    def tail(self, n: int) -> list[str]:
        """The newest `n` lines (n >= 1), oldest first."""
        return list(self._lines)[-n:]


class LineSplitter:
    """Bytes in, complete lines out; a line longer than `max_line` bytes is cut into pieces.

    A line of up to `max_line` bytes (its newline not counted) comes out whole; a longer one comes
    out as pieces of at most `max_line` bytes, cut before a UTF-8 character rather than inside
    one, and nothing is lost: concatenated, the pieces are the line. A trailing carriage return
    is removed only from a line that a newline ends.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        out: list[str] = []
        while True:
            nl = self._buf.find(b"\n", 0, self.max_line + 1)
            if nl >= 0:
                piece = bytes(self._buf[:nl]).removesuffix(b"\r")
                del self._buf[: nl + 1]
            elif len(self._buf) > self.max_line:
                # Longer than a line may be, and the byte after the bound is not a newline.
                cut = self.max_line
                # Do not cut a UTF-8 sequence in half: back up over continuation bytes (at most
                # three; invalid input is cut at max_line - 3 bytes).
                while cut > self.max_line - 3 and (self._buf[cut] & 0xC0) == 0x80:
                    cut -= 1
                piece = bytes(self._buf[:cut])
                del self._buf[:cut]
            else:
                # Up to max_line bytes without a newline: the next byte may still end the line.
                break
            out.append(piece.decode("utf-8", "replace"))
        return out

    def flush(self) -> list[str]:
        piece, self._buf = self._buf, bytearray()
        return [piece.decode("utf-8", "replace")] if piece else []
