"""The workload's recent output: a ring buffer bounded in lines and in bytes."""

from __future__ import annotations

import time
from collections import deque

from eemini.guest.record import record

# Defaults: enough to debug a crash loop, small next to the runtime's own RSS.
MAX_LINES = 2000
MAX_BYTES = 512 * 1024
MAX_LINE_BYTES = 4096


@record
class LogLine:
    seq: int
    time: float  # wall clock, seconds since the epoch
    stream: str  # "stdout" | "stderr" | "runtime"
    text: str

    def to_dict(self) -> dict[str, object]:
        return {"seq": self.seq, "time": round(self.time, 3), "stream": self.stream, "text": self.text}


class LogBuffer:
    """Keeps the newest lines; drops the oldest when either bound is exceeded."""

    def __init__(self, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES) -> None:
        if max_lines < 1 or max_bytes < 1:
            raise ValueError("log buffer bounds must be positive")
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._lines: deque[LogLine] = deque()
        self._bytes = 0
        self._seq = 0
        self.dropped = 0

    @property
    def size(self) -> int:
        return self._bytes

    def append(self, stream: str, text: str) -> LogLine:
        # A single line larger than the whole buffer keeps its tail, so the bound always holds.
        encoded = text.encode("utf-8", "replace")
        if len(encoded) > self.max_bytes:
            text = encoded[-self.max_bytes :].decode("utf-8", "ignore")
            encoded = text.encode()
        line = LogLine(self._seq, time.time(), stream, text)
        self._seq += 1
        self._lines.append(line)
        self._bytes += len(encoded)
        while len(self._lines) > self.max_lines or self._bytes > self.max_bytes:
            old = self._lines.popleft()
            self._bytes -= len(old.text.encode("utf-8", "replace"))
            self.dropped += 1
        return line

    def tail(self, n: int | None = None) -> list[LogLine]:
        lines = list(self._lines)
        if n is None:
            return lines
        return lines[-n:] if n > 0 else []


class LineSplitter:
    """Bytes in, complete lines out; a line longer than `max_line` bytes is cut into pieces.

    A line of up to `max_line` bytes (its newline not counted) comes out whole; a longer one comes
    out as pieces of at most `max_line` bytes, cut before a UTF-8 character rather than inside
    one, and nothing is lost: concatenated, the pieces are the line. A trailing carriage return
    is removed only from a line that a newline ends.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        if max_line < 4:
            raise ValueError(f"max_line must be at least 4 bytes (one UTF-8 character), got {max_line}")
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
        if not self._buf:
            return []
        piece = bytes(self._buf)
        self._buf.clear()
        return [piece.decode("utf-8", "replace")]
