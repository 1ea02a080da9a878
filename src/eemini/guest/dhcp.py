"""A DHCPv4 client of our own (RFC 2131 exchange, RFC 2132 options).

The client talks UDP from port 68 on a socket bound to the interface (SO_BINDTODEVICE), so it
works before the interface has an address: the kernel sends limited broadcasts out of the bound
device with source 0.0.0.0, and we set the BROADCAST flag (RFC 2131 4.1) so servers answer by
broadcast too. Renewal (T1, unicast to the server) and rebinding (T2, broadcast) run on the
PID 1 event loop's timers through `Renewer`.
"""

from __future__ import annotations

import _socket
import enum
import ipaddress
import os
import select
import struct
import time
from collections.abc import Callable

from eemini.guest.record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from eemini.guest.loop import EventLoop, Timer

SERVER_PORT = 67
CLIENT_PORT = 68
MAGIC_COOKIE = b"\x63\x82\x53\x63"  # RFC 2131 3, RFC 2132 2
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHER = 1
FLAG_BROADCAST = 0x8000
MIN_PACKET = 300  # RFC 1542 2.1: BOOTP relays/servers may drop anything shorter

# op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file
_FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
assert _FIXED.size == 236


class Option(enum.IntEnum):
    """RFC 2132 option codes we send or read."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS = 6
    DOMAIN_NAME = 15
    MTU = 26
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_LIST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    CLIENT_ID = 61
    END = 255


class MessageType(enum.IntEnum):
    """RFC 2132 9.6 (the ones this client sends or reads)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    ACK = 5
    NAK = 6


class DhcpError(Exception):
    pass


ZERO = ipaddress.IPv4Address(0)


@record
class Packet:
    op: int
    xid: int
    chaddr: bytes
    options: dict[int, bytes] = field(default_factory=dict)
    flags: int = 0
    secs: int = 0
    ciaddr: ipaddress.IPv4Address = ZERO
    yiaddr: ipaddress.IPv4Address = ZERO
    siaddr: ipaddress.IPv4Address = ZERO

    @property
    def message_type(self) -> int | None:
        """Option 53, to compare with MessageType members."""
        raw = self.options.get(Option.MESSAGE_TYPE)
        return raw[0] if raw is not None and len(raw) == 1 else None

    def address_option(self, code: int) -> ipaddress.IPv4Address | None:
        raw = self.options.get(code)
        return ipaddress.IPv4Address(raw[:4]) if raw is not None and len(raw) >= 4 else None

    def addresses_option(self, code: int) -> tuple[ipaddress.IPv4Address, ...]:
        raw = self.options.get(code, b"")
        return tuple(ipaddress.IPv4Address(raw[i : i + 4]) for i in range(0, len(raw) - len(raw) % 4, 4))

    def u32_option(self, code: int) -> int | None:
        raw = self.options.get(code)
        return struct.unpack("!I", raw)[0] if raw is not None and len(raw) == 4 else None


def encode(packet: Packet) -> bytes:
    # In _FIXED's order; hops 0, no relay agent (giaddr), sname and file empty.
    fixed = _FIXED.pack(
        packet.op, HTYPE_ETHER, len(packet.chaddr), 0, packet.xid, packet.secs, packet.flags,
        packet.ciaddr.packed, packet.yiaddr.packed, packet.siaddr.packed, bytes(4),
        packet.chaddr.ljust(16, b"\0"), b"", b"",
    )  # fmt: skip
    opts = bytearray(MAGIC_COOKIE)
    # Message type first (RFC 2131 does not require it, some servers do).
    ordered = sorted(packet.options.items(), key=lambda kv: (kv[0] != Option.MESSAGE_TYPE, kv[0]))
    for code, value in ordered:
        for i in range(0, max(len(value), 1), 255):  # RFC 3396: long options are split
            chunk = value[i : i + 255]
            opts += bytes([code, len(chunk)]) + chunk
    opts.append(Option.END)
    return (fixed + opts).ljust(MIN_PACKET, b"\0")


def _parse_options(data: bytes, into: dict[int, bytes]) -> None:
    i = 0
    while i < len(data):
        code = data[i]
        if code == Option.END:
            return
        if code == Option.PAD:
            i += 1
            continue
        if i + 1 >= len(data):
            raise DhcpError(f"option {code} is cut off at byte {i}")
        length = data[i + 1]
        if i + 2 + length > len(data):
            raise DhcpError(f"option {code} declares {length} bytes but only {len(data) - i - 2} remain")
        into[code] = into.get(code, b"") + data[i + 2 : i + 2 + length]  # RFC 3396 concatenation
        i += 2 + length


def decode(data: bytes) -> Packet:
    """Parse a BOOTP/DHCP message, honouring option overload (RFC 2132 9.3) into sname/file."""
    if len(data) < _FIXED.size + len(MAGIC_COOKIE):
        raise DhcpError(f"DHCP message too short: {len(data)} bytes, need at least {_FIXED.size + 4}")
    op, htype, hlen, _hops, xid, secs, flags, ci, yi, si, _gi, chaddr, sname, bootfile = (
        _FIXED.unpack_from(data)
    )
    if data[_FIXED.size : _FIXED.size + 4] != MAGIC_COOKIE:
        raise DhcpError(f"bad DHCP magic cookie {data[_FIXED.size : _FIXED.size + 4].hex()}")
    if htype != HTYPE_ETHER or hlen > 16:
        raise DhcpError(f"unsupported hardware type {htype}/length {hlen}")
    options: dict[int, bytes] = {}
    _parse_options(data[_FIXED.size + 4 :], options)
    overload = options.get(Option.OVERLOAD, b"\0")[0]
    if overload & 1:
        _parse_options(bootfile, options)
    if overload & 2:
        _parse_options(sname, options)
    addresses = map(ipaddress.IPv4Address, (ci, yi, si))
    return Packet(op, xid, chaddr[:hlen], options, flags, secs, *addresses)


@record
class Lease:
    address: ipaddress.IPv4Interface
    server: ipaddress.IPv4Address
    router: ipaddress.IPv4Address | None
    dns: tuple[ipaddress.IPv4Address, ...]
    lease_time: int
    renewal_time: int
    rebinding_time: int
    mtu: int | None
    domain: str | None
    obtained: float  # time.monotonic() when the ACK arrived

    @classmethod
    def from_ack(cls, ack: Packet, obtained: float) -> Lease:
        mask = ack.address_option(Option.SUBNET_MASK)
        if mask is None:
            raise DhcpError("the DHCP ACK carries no subnet mask")
        server = ack.address_option(Option.SERVER_ID) or ack.siaddr
        lease_time = ack.u32_option(Option.LEASE_TIME)
        if lease_time is None:
            raise DhcpError("the DHCP ACK carries no lease time")
        routers = ack.addresses_option(Option.ROUTER)
        # RFC 2131 4.4.5: T1 defaults to 0.5 and T2 to 0.875 of the lease.
        t1 = ack.u32_option(Option.RENEWAL_TIME) or lease_time // 2
        t2 = ack.u32_option(Option.REBINDING_TIME) or lease_time * 7 // 8
        mtu_raw = ack.options.get(Option.MTU)
        mtu = struct.unpack("!H", mtu_raw)[0] if mtu_raw and len(mtu_raw) == 2 else None
        domain_raw = ack.options.get(Option.DOMAIN_NAME)
        return cls(
            address=ipaddress.IPv4Interface((ack.yiaddr, prefix_length(ack.yiaddr, mask))),
            server=server,
            router=routers[0] if routers else None,
            dns=ack.addresses_option(Option.DNS),
            lease_time=lease_time,
            renewal_time=min(t1, lease_time),
            rebinding_time=min(max(t2, t1), lease_time),
            mtu=mtu if mtu is not None and mtu >= 576 else None,
            domain=host_name(domain_raw.rstrip(b"\0")) if domain_raw else None,
            obtained=obtained,
        )


def prefix_length(address: ipaddress.IPv4Address, mask: ipaddress.IPv4Address) -> int:
    """The prefix length of a subnet mask (option 1), which must be ones then zeros (RFC 950 allowed
    others; the kernel's addresses and routes cannot express them)."""
    host_bits = ~int(mask) & 0xFFFFFFFF
    if host_bits & (host_bits + 1):
        raise DhcpError(
            f"the DHCP ACK for {address} carries the subnet mask {mask}, which is not contiguous "
            "(ones, then zeros)"
        )
    return 32 - host_bits.bit_length()


def host_name(raw: bytes) -> str | None:
    """A DHCP domain name (option 15) when it is a valid host name of 253 characters at most,
    else None: the value goes into /etc/resolv.conf, where a newline would add lines of the
    server's choosing. RFC 1123: dot-separated labels of 1-63 letters, digits and inner hyphens,
    and perhaps a final dot (bytes.isalnum is ASCII only)."""
    labels = (raw[:-1] if raw.endswith(b".") else raw).split(b".")
    valid = all(
        0 < len(label) <= 63
        and b"-" not in (label[:1], label[-1:])
        and label.replace(b"-", b"a").isalnum()
        for label in labels
    )
    return raw.decode("ascii") if len(raw) <= 253 and valid else None


# The options asked for (option 55).
PARAMETERS = bytes((Option.SUBNET_MASK, Option.ROUTER, Option.DNS, Option.DOMAIN_NAME, Option.MTU,
                    Option.LEASE_TIME, Option.RENEWAL_TIME, Option.REBINDING_TIME))  # fmt: skip


class Client:
    """DHCP for one interface. `acquire()` blocks (boot); `Renewer` keeps the lease afterwards."""

    def __init__(self, ifname: str, mac: bytes) -> None:
        self.ifname = ifname
        self.mac = mac
        self.sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_BROADCAST, 1)
        self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_BINDTODEVICE, ifname.encode())
        self.sock.bind(("0.0.0.0", CLIENT_PORT))
        self.xid = 0
        self.started = time.monotonic()

    def _packet(self, mtype: MessageType, **kw: Any) -> Packet:
        options: dict[int, bytes] = {
            Option.MESSAGE_TYPE: bytes([mtype]),
            Option.CLIENT_ID: bytes([HTYPE_ETHER]) + self.mac,
            Option.PARAMETER_LIST: PARAMETERS,
            Option.MAX_MESSAGE_SIZE: struct.pack("!H", 1500),
        }
        options.update(kw.pop("options", {}))
        secs = min(int(time.monotonic() - self.started), 0xFFFF)
        return Packet(op=BOOTREQUEST, xid=self.xid, chaddr=self.mac, options=options, secs=secs, **kw)

    def request_renew(self, lease: Lease, *, broadcast: bool) -> Packet:
        # RFC 2131 4.3.2: RENEWING/REBINDING put the address in ciaddr and omit server id/requested ip.
        return self._packet(
            MessageType.REQUEST, ciaddr=lease.address.ip, flags=FLAG_BROADCAST if broadcast else 0
        )

    def send(self, packet: Packet, to: ipaddress.IPv4Address | None = None) -> None:
        self.sock.sendto(encode(packet), (str(to or "255.255.255.255"), SERVER_PORT))

    def receive(self, deadline: float, accept: Callable[[Packet], bool]) -> Packet | None:
        """The next reply for our xid and MAC that `accept` likes, or None at the deadline."""
        while True:
            ready, _, _ = select.select([self.sock], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                return None
            reply = self.read_reply()
            if reply is not None and accept(reply):
                return reply

    def read_reply(self) -> Packet | None:
        data = self.sock.recv(4096)
        try:
            reply = decode(data)
        except DhcpError:
            return None  # not ours to judge; a broken packet on the wire is skipped
        if reply.op != BOOTREPLY or reply.xid != self.xid or reply.chaddr != self.mac:
            return None
        return reply

    def _new_xid(self) -> None:
        # Uniform over 32 bits, from the kernel CSPRNG.
        self.xid = int.from_bytes(os.urandom(4), "big")

    def acquire(self, timeout: float = 30.0, attempts: int = 4, first_wait: float = 1.0) -> Lease:
        """DISCOVER -> OFFER -> REQUEST -> ACK, retransmitting with doubling waits (RFC 2131 4.1).

        The first wait is 1 s rather than RFC 2131's 4 s: a lost first packet must not cost a
        boot 4 s. (A test that must see exactly one DISCOVER asks for a longer one.)
        """
        deadline = time.monotonic() + timeout
        self.started = time.monotonic()
        wait = first_wait
        last_problem = "no DHCP server answered"
        for _ in range(attempts):
            if time.monotonic() >= deadline:
                break
            self._new_xid()
            self.send(self._packet(MessageType.DISCOVER, flags=FLAG_BROADCAST))
            step = min(time.monotonic() + wait, deadline)
            offer = self.receive(step, lambda p: p.message_type == MessageType.OFFER)
            wait *= 2
            if offer is None:
                continue
            server = offer.address_option(Option.SERVER_ID) or offer.siaddr
            options = {Option.REQUESTED_IP: offer.yiaddr.packed, Option.SERVER_ID: server.packed}
            self.send(self._packet(MessageType.REQUEST, flags=FLAG_BROADCAST, options=options))
            reply = self.receive(
                min(time.monotonic() + wait, deadline),
                lambda p: p.message_type in (MessageType.ACK, MessageType.NAK),
            )
            if reply is None:
                last_problem = f"the server offered {offer.yiaddr} but did not answer the request"
                continue
            if reply.message_type == MessageType.NAK:
                msg = reply.options.get(Option.MESSAGE, b"").decode(errors="replace")
                last_problem = f"the server refused the request ({msg or 'NAK'})"
                continue
            return Lease.from_ack(reply, time.monotonic())
        raise DhcpError(f"no DHCP lease on {self.ifname} after {attempts} attempts: {last_problem}")


class Renewer:
    """Keeps a lease: at T1 unicast REQUEST to the server, at T2 broadcast, at expiry give up.

    `on_lease` gets each renewed lease (to re-apply address/routes); `on_expired` is called once
    if the lease runs out (PID 1 logs it; the address is dropped).
    """

    RETRY = 10.0

    def __init__(
        self,
        client: Client,
        lease: Lease,
        timers: EventLoop,
        *,
        on_lease: Callable[[Lease], None],
        on_expired: Callable[[Lease], None],
        log: Callable[[str], None],
    ) -> None:
        self.client = client
        self.lease = lease
        self.timers = timers
        self.on_lease = on_lease
        self.on_expired = on_expired
        self.log = log
        self.reading = False
        self._timer: Timer | None = None  # the next step: T1, a retry, or the expiry

    def start(self) -> None:
        """Wait for T1 of the lease (again after each renewal, in place of the retry due)."""
        if self._timer is not None:
            self._timer.cancel()
        self._later(self.lease.obtained + self.lease.renewal_time - time.monotonic())

    def _later(self, delay: float) -> None:
        self._timer = self.timers.call_later(delay, self._tick)

    def _tick(self) -> None:
        now_rel = time.monotonic() - self.lease.obtained
        if now_rel >= self.lease.lease_time:  # the end: nothing is scheduled or read any more
            self._stop_reading()
            self.log(f"DHCP lease for {self.lease.address} expired")
            self.on_expired(self.lease)
            return
        rebinding = now_rel >= self.lease.rebinding_time
        self.client._new_xid()
        try:
            packet = self.client.request_renew(self.lease, broadcast=rebinding)
            self.client.send(packet, None if rebinding else self.lease.server)
        except OSError as e:
            self.log(f"DHCP {'rebind' if rebinding else 'renew'} failed to send: {e}")
        if not self.reading:
            self.timers.add_reader(self.client.sock.fileno(), self._readable)
            self.reading = True
        # RFC 2131 4.4.5: retry at half the remaining time, but not more often than every RETRY s.
        remaining = self.lease.lease_time - now_rel
        self._later(max(min(remaining, max(remaining / 2, self.RETRY)), 1.0))

    def _stop_reading(self) -> None:
        if self.reading:
            self.timers.remove_reader(self.client.sock.fileno())
            self.reading = False

    def _readable(self) -> None:
        try:
            reply = self.client.read_reply()
        except OSError:
            return
        if reply is None or reply.message_type not in (MessageType.ACK, MessageType.NAK):
            return
        if reply.message_type == MessageType.NAK:
            self.log("DHCP server refused the renewal (NAK); keeping the lease until it expires")
            return
        try:
            lease = Lease.from_ack(reply, time.monotonic())
        except DhcpError as e:
            self.log(f"DHCP renewal answer unusable: {e}")
            return
        self._stop_reading()
        self.lease = lease
        self.log(f"DHCP lease renewed: {lease.address} for {lease.lease_time} s")
        self.on_lease(lease)
        self.start()
