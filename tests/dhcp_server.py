"""A small DHCP server for tests, written independently of eemini.guest.dhcp (own packing).

Run as a script inside a network namespace: `dhcp_server.py IFNAME SERVER_IP OFFER_IP LEASE T1 [MASK]`
(MASK, the subnet mask option, defaults to 255.255.255.0).
It answers DISCOVER with OFFER and REQUEST with ACK (or NAK for a wrong address), replying by
broadcast when the client set the BROADCAST flag and by unicast to ciaddr when renewing, as
RFC 2131 4.1 says. Each message it sees is printed as one JSON line on stdout.
"""

from __future__ import annotations

import json
import socket
import struct
import sys


def options_of(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        code, length = data[i], data[i + 1]
        out[code] = data[i + 2 : i + 2 + length]
        i += 2 + length
    return out


def reply(request: bytes, mtype: int, yiaddr: str, server: str, lease: int, t1: int, mask: str) -> bytes:
    xid, flags, ciaddr, chaddr = request[4:8], request[10:12], request[12:16], request[28:44]
    head = bytes([2, 1, 6, 0]) + xid + b"\0\0" + flags + ciaddr + socket.inet_aton(yiaddr)
    head += socket.inet_aton(server) + b"\0\0\0\0" + chaddr + b"\0" * 192
    opts = b"\x63\x82\x53\x63" + bytes([53, 1, mtype]) + bytes([54, 4]) + socket.inet_aton(server)
    if mtype != 6:
        opts += bytes([1, 4]) + socket.inet_aton(mask)
        opts += bytes([3, 4]) + socket.inet_aton(server)
        opts += bytes([6, 8]) + socket.inet_aton("10.77.0.53") + socket.inet_aton("10.77.0.54")
        opts += bytes([51, 4]) + struct.pack("!I", lease) + bytes([58, 4]) + struct.pack("!I", t1)
        opts += bytes([26, 2]) + struct.pack("!H", 1400)
        opts += bytes([15, 9]) + b"test.lan\0"
    else:
        opts += bytes([56, 13]) + b"wrong address"
    return (head + opts + b"\xff").ljust(300, b"\0")


def main() -> None:
    ifname, server, offer, lease, t1 = sys.argv[1:6]
    mask = sys.argv[6] if len(sys.argv) > 6 else "255.255.255.0"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    sock.bind(("0.0.0.0", 67))
    print(json.dumps({"ready": True}), flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        opts = options_of(data)
        mtype = opts.get(53, b"\0")[0]
        flags = struct.unpack("!H", data[10:12])[0]
        ciaddr = socket.inet_ntoa(data[12:16])
        requested = socket.inet_ntoa(opts[50]) if 50 in opts else None
        print(
            json.dumps(
                {
                    "type": mtype,
                    "from": peer[0],
                    "broadcast_flag": bool(flags & 0x8000),
                    "ciaddr": ciaddr,
                    "requested": requested,
                    "server_id": socket.inet_ntoa(opts[54]) if 54 in opts else None,
                    "client_id": opts.get(61, b"").hex(),
                    "params": list(opts.get(55, b"")),
                    "length": len(data),
                }
            ),
            flush=True,
        )
        if mtype == 1:
            answer = reply(data, 2, offer, server, int(lease), int(t1), mask)
        elif mtype == 3:
            wanted = requested or ciaddr
            answer = reply(data, 5 if wanted == offer else 6, offer, server, int(lease), int(t1), mask)
        else:
            continue
        dest = "255.255.255.255" if flags & 0x8000 or ciaddr == "0.0.0.0" else ciaddr
        sock.sendto(answer, (dest, 68))


if __name__ == "__main__":
    main()
