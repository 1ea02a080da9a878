"""A fake of Azure's paravisor for VM tests: it sits between QEMU's TPM emulator backend and swtpm
and regenerates the HCL report (NV index 0x01400001) whenever the guest writes user data to NV
index 0x01400002, as the paravisor does. A fake, written from what the guest can observe; nothing
here was checked against Azure.

QEMU's `-tpmdev emulator` talks to swtpm over its control channel (a unix socket) and hands swtpm
the data channel as a file descriptor (CMD_SET_DATAFD, SCM_RIGHTS). The fake listens where QEMU
expects swtpm's control socket, relays control messages both ways, and when a descriptor comes
with one it keeps that end itself and gives swtpm one end of a socket pair of its own: every TPM
command then passes through the fake, one command and one response at a time (QEMU waits for each
response). After a successful TPM2_NV_Write to 0x01400002 the fake writes the new HCL report into
0x01400001 with TPM2_NV_Write commands of its own (owner authorization, an empty password), before
the guest sees the response, so the guest's next read finds the fresh report.

The new report is `regenerate(user_data)` (the harness builds it with tests/azure_builder.py: a
runtime-data JSON with the vTPM's AK as HCLAkPub and the user data, a TDREPORT binding it). The
TDREPORT is the tests' own; the quote for it comes from the fake IMDS (tests/fake_metadata.py).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

TPM_CC_NV_WRITE = 0x137
HCL_INDEX = 0x01400001
USER_DATA_INDEX = 0x01400002
TPM_RH_OWNER = 0x40000001
NV_CHUNK = 1024


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


def read_frame(sock: socket.socket) -> bytes | None:
    """One TPM command or response: a 10-byte header whose size field covers the whole frame."""
    header = _read_exactly(sock, 10)
    if header is None:
        return None
    (size,) = struct.unpack_from(">I", header, 2)
    rest = _read_exactly(sock, size - 10) if size > 10 else b""
    return None if rest is None else header + rest


def nv_write_target(cmd: bytes) -> tuple[int, bytes, int] | None:
    """(index, data, offset) of a TPM2_NV_Write command, else None."""
    if len(cmd) < 22 or struct.unpack_from(">I", cmd, 6)[0] != TPM_CC_NV_WRITE:
        return None
    _auth, index, auth_size = struct.unpack_from(">III", cmd, 10)
    at = 22 + auth_size
    (size,) = struct.unpack_from(">H", cmd, at)
    data = cmd[at + 2 : at + 2 + size]
    (offset,) = struct.unpack_from(">H", cmd, at + 2 + size)
    return index, data, offset


def nv_write_command(index: int, data: bytes, offset: int) -> bytes:
    session = struct.pack(">IHBH", 0x40000009, 0, 1, 0)  # TPM_RS_PW, no nonce, continue, no password
    body = (
        struct.pack(">II", TPM_RH_OWNER, index) + struct.pack(">I", len(session)) + session
        + struct.pack(">H", len(data)) + data + struct.pack(">H", offset)
    )  # fmt: skip
    return struct.pack(">HII", 0x8002, 10 + len(body), TPM_CC_NV_WRITE) + body


class Paravisor:
    """Listens at `listen` (QEMU's TPM chardev) and relays to swtpm's control socket `swtpm_ctrl`."""

    def __init__(self, listen: Path, swtpm_ctrl: Path, regenerate: Callable[[bytes], bytes]) -> None:
        self.listen = listen
        self.swtpm_ctrl = swtpm_ctrl
        self.regenerate = regenerate
        self.user_data: list[bytes] = []  # every 64-byte write, in order
        self.errors: list[str] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(os.fspath(listen))
        self._server.listen(1)

    def start(self) -> Paravisor:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def close(self) -> None:
        self._server.close()

    def _serve(self) -> None:
        try:
            qemu, _ = self._server.accept()
        except OSError:
            return
        swtpm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        swtpm.connect(os.fspath(self.swtpm_ctrl))
        with qemu, swtpm:
            self._relay_control(qemu, swtpm)

    def _relay_control(self, qemu: socket.socket, swtpm: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([qemu, swtpm], [], [])
            if qemu in ready:
                msg, fds, _flags, _addr = socket.recv_fds(qemu, 65536, 4)
                if not msg:
                    return
                if fds:
                    # CMD_SET_DATAFD: keep QEMU's end, give swtpm one end of our own pair.
                    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    guest = socket.socket(fileno=fds[0])
                    for extra in fds[1:]:
                        os.close(extra)
                    threading.Thread(target=self._relay_data, args=(guest, ours), daemon=True).start()
                    socket.send_fds(swtpm, [msg], [theirs.fileno()])
                    theirs.close()
                else:
                    swtpm.sendall(msg)
            if swtpm in ready:
                data = swtpm.recv(65536)
                if not data:
                    return
                qemu.sendall(data)

    def _relay_data(self, guest: socket.socket, tpm: socket.socket) -> None:
        with guest, tpm:
            while True:
                cmd = read_frame(guest)
                if cmd is None:
                    return
                tpm.sendall(cmd)
                resp = read_frame(tpm)
                if resp is None:
                    return
                target = nv_write_target(cmd)
                ok = struct.unpack_from(">I", resp, 6)[0] == 0
                if target is not None and target[0] == USER_DATA_INDEX and ok:
                    self._regenerate(tpm, target[1], target[2])
                guest.sendall(resp)

    def _regenerate(self, tpm: socket.socket, data: bytes, offset: int) -> None:
        if offset != 0 or len(data) != 64:
            self.errors.append(f"a partial user-data write ({len(data)} bytes at {offset})")
            return
        self.user_data.append(data)
        report = self.regenerate(data)
        for at in range(0, len(report), NV_CHUNK):
            tpm.sendall(nv_write_command(HCL_INDEX, report[at : at + NV_CHUNK], at))
            resp = read_frame(tpm)
            if resp is None or struct.unpack_from(">I", resp, 6)[0] != 0:
                self.errors.append(f"writing the HCL report at offset {at} failed: {resp!r}")
                return
