"""A fake configfs-tsm report directory that reacts to real file operations.

It follows Documentation/ABI/testing/configfs-tsm-report: an entry `$name` holds `provider`
(RO, e.g. "tdx_guest"), `generation` (RO, bumped by every write of `inblob`), `inblob` (WO, up to
64 bytes) and `outblob` (RO, the report for the current inblob). `inblob` and `outblob` are FIFOs
served by one thread per entry, so the backend's plain open/write/close and open/read calls block
and complete the way they do against configfs, and a read of `outblob` returns the quote for what
was just written.

The failure modes it models, as tsm.ko (drivers/virt/coco/tsm.c, since 6.17 guest/report.c)
answers them:
- no provider registered (`provider=None`: tsm.ko is loaded but tdx_guest is not, as on a VM
  without TDX, where tdx_guest's init fails with ENODEV): mkdir(2) of an entry fails with ENXIO
  (`tsm_report_make_item`) and nothing is created;
- the provider goes away while a quote is pending (`withdrawn=True`): the entry was made and
  `provider` read, but reading `outblob` fails with ENXIO (the kernel's answer once `provider.ops`
  is NULL; 6.12 says ENOTTY there). `outblob` is a unix socket then, which open(2) refuses with
  ENXIO, the same errno through the same call;
- an empty provider name (`provider=""`), an empty `outblob` (`empty=True`, e.g. the host's quote
  generation service is unreachable), another writer between our write and read
  (`interloper=True`), and any quote the test's `quote` function makes (wrong report data, not a
  TDX quote).

Limits, because this is an ordinary filesystem and not configfs:
- mkdir(2) cannot populate a directory here, so the backend's `mkdir`/`rmdir` seam calls
  `FakeTsm.mkdir`/`rmdir`, which do what configfs does inside those syscalls (create/remove the
  attribute files).
- A write of more than 64 bytes is not refused with EINVAL, and `outblob` can be read only once
  per `inblob` write (configfs caches the report and serves it again).
- `auxblob`, `privlevel` and `privlevel_floor` are not modelled.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from eemini.guest.attest import ConfigfsTsmBackend
from eemini.guest.dev.simulated import make_quote


class FakeTsm:
    def __init__(
        self,
        root: Path,
        quote: Callable[[bytes], bytes],
        *,
        provider: str | None = "tdx_guest",
        empty: bool = False,
        interloper: bool = False,
        withdrawn: bool = False,
    ) -> None:
        self.root = root
        self.quote = quote
        self.provider = provider  # None: no provider registered (mkdir fails with ENXIO)
        self.empty = empty  # outblob comes back empty (e.g. the host's QGS is unreachable)
        self.interloper = interloper  # another writer hits inblob between our write and read
        self.withdrawn = withdrawn  # the provider goes away before outblob is read (ENXIO)
        self._sockets: dict[str, socket.socket] = {}
        self.created: list[str] = []
        self.removed: list[str] = []
        self.inblobs: list[bytes] = []
        self._threads: dict[str, threading.Thread] = {}
        self._stopping: set[str] = set()
        root.mkdir(parents=True, exist_ok=True)

    def backend(self) -> ConfigfsTsmBackend:
        """The runtime's backend on this tree (with the mkdir/rmdir seam pointing here)."""
        return ConfigfsTsmBackend(os.fspath(self.root), mkdir=self.mkdir, rmdir=self.rmdir)

    def mkdir(self, path: str) -> None:
        if self.provider is None:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), path)
        os.mkdir(path)
        entry = Path(path)
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text("0\n")
        os.mkfifo(entry / "inblob", 0o200)
        if self.withdrawn:
            self._sockets[path] = _unopenable(entry / "outblob")
        else:
            os.mkfifo(entry / "outblob", 0o400)
        self.created.append(path)
        thread = threading.Thread(target=self._serve, args=(entry,), daemon=True)
        self._threads[path] = thread
        thread.start()

    def rmdir(self, path: str) -> None:
        entry = Path(path)
        self._stopping.add(path)
        # Wake the entry's thread wherever it blocks: opening inblob to read or outblob to write
        # (it may not have reached the open yet, so keep knocking until it is gone).
        thread = self._threads.pop(path)
        for _ in range(500):
            for name, flags in (("inblob", os.O_WRONLY), ("outblob", os.O_RDONLY)):
                with contextlib.suppress(OSError):
                    os.close(os.open(entry / name, flags | os.O_NONBLOCK))
            thread.join(0.01)
            if not thread.is_alive():
                break
        if path in self._sockets:
            self._sockets.pop(path).close()
        for name in ("provider", "generation", "inblob", "outblob"):
            (entry / name).unlink()
        os.rmdir(path)
        self.removed.append(path)

    def live_entries(self) -> list[str]:
        return sorted(os.listdir(self.root))

    def _bump(self, entry: Path) -> None:
        gen = int((entry / "generation").read_text())
        tmp = entry / ".generation.tmp"
        tmp.write_text(f"{gen + 1}\n")
        os.replace(tmp, entry / "generation")

    def _serve(self, entry: Path) -> None:
        while True:
            with open(entry / "inblob", "rb") as f:
                data = f.read()
            stopping = os.fspath(entry) in self._stopping
            if stopping and not data:
                return  # rmdir's knock, not a write
            # A write counts even when rmdir follows at once (as after an outblob error).
            self.inblobs.append(data)
            self._bump(entry)
            if self.interloper:
                self._bump(entry)
            if stopping or self.withdrawn:
                return  # no provider left to answer, or nobody left to read
            report = b"" if self.empty else self.quote(data.ljust(64, b"\0"))
            with open(entry / "outblob", "wb") as f:
                if os.fspath(entry) in self._stopping:
                    return
                f.write(report)


def sgx_quote(data: bytes) -> bytes:
    """A quote function for the fake whose quotes are not TDX quotes (TEE type 0, SGX)."""
    quote = bytearray(make_quote(data))
    struct.pack_into("<I", quote, 4, 0)
    return bytes(quote)


def _unopenable(path: Path) -> socket.socket:
    """A unix socket bound at `path`: open(2) of it fails with ENXIO. Bound through the directory's
    /proc/self/fd link, since a socket address holds at most 107 bytes of path."""
    sock = socket.socket(socket.AF_UNIX)
    fd = os.open(path.parent, os.O_PATH)
    try:
        sock.bind(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)
    return sock
