"""rtnetlink, just enough to bring interfaces up and give them an address and routes.

Message layouts follow <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h> and
<linux/if_addr.h> (constants copied from those headers); every request asks for an ACK so a
failure comes back as an errno, raised as OSError naming the operation.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import os
import struct
import time
from collections.abc import Iterator

from eemini.guest.record import record

# <linux/netlink.h>
NETLINK_ROUTE = 0
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3

# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RTPROT_DHCP = 16
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7

# <linux/if_link.h>
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4

# <linux/if_addr.h>
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
IFA_F_PERMANENT = 0x80

# <linux/if.h>
IFF_UP = 0x1

# <linux/if_arp.h>
ARPHRD_ETHER = 1

# include/net/flow.h: drivers/net/loopback.c registers `lo` with this index in every namespace.
LOOPBACK_IFINDEX = 1

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """rtattr list -> {type: payload}; stays inside the lengths the kernel declares."""
    out: dict[int, bytes] = {}
    off = 0
    while off + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size or off + length > len(data):
            break
        out[kind & 0x3FFF] = data[off + _RTATTR.size : off + length]  # strip NLA_F_NESTED etc.
        off += _align(length)
    return out


@record
class Link:
    index: int
    name: str
    kind: int  # ARPHRD_*
    flags: int
    mac: bytes
    mtu: int


class Netlink:
    """One rtnetlink socket; requests are synchronous (send, then read until the ACK/DONE)."""

    def __init__(self) -> None:
        self.sock = _socket.socket(
            _socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self.sock.bind((0, 0))
        self.seq = int(time.monotonic() * 1000) & 0xFFFF

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> list[tuple[int, bytes]]:
        self.seq += 1
        flags |= NLM_F_REQUEST | NLM_F_ACK
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, self.seq, 0) + body)
        return list(self._replies(self.seq, what))

    def _replies(self, seq: int, what: str) -> Iterator[tuple[int, bytes]]:
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EPROTO, f"{what}: malformed netlink message")
                body = data[off + _NLMSGHDR.size : off + length]
                off += _align(length)
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body)
                    if code == 0:
                        return
                    raise OSError(-code, f"{what}: {os.strerror(-code)}")
                yield kind, body

    # --- links ---

    def links(self) -> list[Link]:
        out = []
        for kind, body in self.request(
            RTM_GETLINK, NLM_F_DUMP, _IFINFOMSG.pack(0, 0, 0, 0, 0), "list links"
        ):
            if kind != RTM_NEWLINK:
                continue
            _fam, ltype, index, flags, _change = _IFINFOMSG.unpack_from(body)
            attrs = parse_attrs(body[_IFINFOMSG.size :])
            name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
            mtu = struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0
            out.append(Link(index, name, ltype, flags, attrs.get(IFLA_ADDRESS, b""), mtu))
        return sorted(out, key=lambda link: link.index)

    def set_link(self, index: int, *, up: bool = False, mtu: int | None = None) -> None:
        """Bring the interface up (the change mask touches IFF_UP only then), set its MTU."""
        flags = IFF_UP if up else 0
        attrs = attr(IFLA_MTU, struct.pack("=I", mtu)) if mtu is not None else b""
        body = _IFINFOMSG.pack(_socket.AF_UNSPEC, 0, index, flags, flags) + attrs
        self.request(RTM_NEWLINK, 0, body, f"configure interface {index}")

    # --- addresses ---

    def add_address(self, index: int, iface: ipaddress.IPv4Interface) -> None:
        body = _IFADDRMSG.pack(
            _socket.AF_INET, iface.network.prefixlen, IFA_F_PERMANENT, RT_SCOPE_UNIVERSE, index
        )
        body += attr(IFA_LOCAL, iface.ip.packed) + attr(IFA_ADDRESS, iface.ip.packed)
        if iface.network.prefixlen < 31:
            body += attr(IFA_BROADCAST, iface.network.broadcast_address.packed)
        # REPLACE: a renewed lease re-adds the same address without failing on EEXIST.
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body, f"add address {iface}")

    def delete_address(self, index: int, iface: ipaddress.IPv4Interface) -> None:
        body = _IFADDRMSG.pack(_socket.AF_INET, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_LOCAL, iface.ip.packed)
        self.request(RTM_DELADDR, 0, body, f"delete address {iface}")

    # --- routes ---

    def add_route(
        self,
        index: int,
        dst: ipaddress.IPv4Network,
        gateway: ipaddress.IPv4Address | None,
        *,
        protocol: int,
        src: ipaddress.IPv4Address,
    ) -> None:
        scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
        body = _RTMSG.pack(
            _socket.AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN, protocol, scope, RTN_UNICAST, 0
        )
        if dst.prefixlen:
            body += attr(RTA_DST, dst.network_address.packed)
        if gateway is not None:
            body += attr(RTA_GATEWAY, gateway.packed)
        body += attr(RTA_PREFSRC, src.packed) + attr(RTA_OIF, struct.pack("=i", index))
        via = f" via {gateway}" if gateway else ""
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body, f"add route {dst}{via}")


def first_nic(links: list[Link]) -> Link | None:
    """The first Ethernet interface by index (what the firmware/hypervisor enumerated first)."""
    # Not lo: ARPHRD_LOOPBACK.
    return next((link for link in links if link.kind == ARPHRD_ETHER and len(link.mac) == 6), None)


def wait_for_nic(nl: Netlink, timeout: float) -> Link | None:
    """Drivers probe asynchronously after their module loads: poll briefly for the first NIC."""
    deadline = time.monotonic() + timeout
    while True:
        nic = first_nic(nl.links())
        if nic is not None or time.monotonic() >= deadline:
            return nic
        time.sleep(0.05)


def configure(
    nl: Netlink,
    link: Link,
    iface: ipaddress.IPv4Interface,
    gateway: ipaddress.IPv4Address | None,
    *,
    mtu: int | None = None,
    protocol: int,
) -> None:
    """Address + routes for one interface, including an on-link gateway outside the prefix.

    GCE hands out /32 leases with a router outside them (RFC 3442 style): the gateway then needs
    a link-scope host route before the default route via it can exist.
    """
    if mtu is not None and mtu != link.mtu:
        nl.set_link(link.index, mtu=mtu)
    nl.add_address(link.index, iface)
    if gateway is None:
        return
    if gateway not in iface.network:
        nl.add_route(
            link.index, ipaddress.IPv4Network((gateway, 32)), None, protocol=protocol, src=iface.ip
        )
    nl.add_route(
        link.index, ipaddress.IPv4Network("0.0.0.0/0"), gateway, protocol=protocol, src=iface.ip
    )
