"""DHCP: packet codec against hand-packed bytes, and a real exchange over a veth pair."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eemini.guest import dhcp
from netns import namespaces, needs_root, python_in, start_dhcp_server, veth

MAC = bytes.fromhex("525400123456")


def _hand_packed_ack() -> bytes:
    # Built field by field after RFC 2131 figure 1, independent of dhcp.encode.
    head = bytes([2, 1, 6, 0]) + struct.pack("!I", 0xDEADBEEF) + struct.pack("!HH", 0, 0x8000)
    head += bytes(4) + socket.inet_aton("10.0.2.15") + socket.inet_aton("10.0.2.2") + bytes(4)
    head += MAC + bytes(10) + bytes(64) + bytes(128)
    opts = b"\x63\x82\x53\x63"
    opts += bytes([53, 1, 5, 54, 4, 10, 0, 2, 2, 1, 4, 255, 255, 255, 0, 3, 4, 10, 0, 2, 2])
    opts += bytes([0, 0])  # padding in the middle is legal
    opts += bytes([6, 8, 10, 0, 2, 3, 8, 8, 8, 8, 51, 4, 0, 1, 81, 128])
    opts += bytes([15, 4]) + b"lan\0" + bytes([26, 2, 5, 220, 255])
    return head + opts


def test_decode_hand_packed_ack() -> None:
    p = dhcp.decode(_hand_packed_ack())
    assert p.op == dhcp.BOOTREPLY
    assert p.xid == 0xDEADBEEF
    assert p.flags == dhcp.FLAG_BROADCAST
    assert p.chaddr == MAC
    assert p.message_type == dhcp.MessageType.ACK
    lease = dhcp.Lease.from_ack(p, 100.0)
    assert lease.address == ipaddress.IPv4Interface("10.0.2.15/24")
    assert lease.server == ipaddress.IPv4Address("10.0.2.2")
    assert lease.router == ipaddress.IPv4Address("10.0.2.2")
    assert lease.dns == (ipaddress.IPv4Address("10.0.2.3"), ipaddress.IPv4Address("8.8.8.8"))
    assert lease.lease_time == 86400
    assert (lease.renewal_time, lease.rebinding_time) == (43200, 75600)
    assert lease.mtu == 1500
    assert lease.domain == "lan"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"lan", "lan"),
        (b"c.my-project.internal.", "c.my-project.internal."),
        (b"a" * 63 + b".b", "a" * 63 + ".b"),
        (b"lan\nnameserver 6.6.6.6", None),  # a second resolv.conf line of the server's choosing
        (b"lan options ndots:15", None),
        (b"a" * 64, None),
        (b"-lan", None),
        (b"lan-", None),
        (b"a..b", None),
        (b"", None),
        (b"\xff", None),
        (b"x." * 127, None),  # 254 characters
    ],
)
def test_domain_must_be_a_host_name(raw: bytes, expected: str | None) -> None:
    assert dhcp.host_name(raw) == expected
    ack = _hand_packed_ack().replace(bytes([15, 4]) + b"lan\0", bytes([15, len(raw)]) + raw)
    assert dhcp.Lease.from_ack(dhcp.decode(ack), 0.0).domain == expected


# RFC 1123 host names as a regular expression: the reference the guest's check (written without
# `re`, which PID 1 does not import) is held to.
_LABEL = rb"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
HOST_NAME = re.compile(rb"%s(\.%s)*\.?\Z" % (_LABEL, _LABEL))


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b"Z", b"7", b"-", b".", b"\n", b" ", b"\xff", b"_", b"a" * 60])).map(
        b"".join
    )
)
def test_host_name_is_rfc_1123(raw: bytes) -> None:
    expected = raw.decode() if len(raw) <= 253 and HOST_NAME.match(raw) else None
    assert dhcp.host_name(raw) == expected


def test_encode_discover_layout() -> None:
    client = dhcp.Packet(
        op=dhcp.BOOTREQUEST,
        xid=0x01020304,
        chaddr=MAC,
        flags=dhcp.FLAG_BROADCAST,
        options={dhcp.Option.PARAMETER_LIST: b"\x01\x03", dhcp.Option.MESSAGE_TYPE: b"\x01"},
    )
    raw = dhcp.encode(client)
    assert len(raw) == 300
    assert raw[:4] == bytes([1, 1, 6, 0])
    assert raw[4:8] == bytes([1, 2, 3, 4])
    assert raw[10:12] == b"\x80\x00"
    assert raw[28:34] == MAC
    assert raw[236:240] == b"\x63\x82\x53\x63"
    # message type first, then the rest by code, then END, then zero padding
    assert raw[240:249] == bytes([53, 1, 1, 55, 2, 1, 3, 255, 0])
    assert dhcp.decode(raw) == client


def test_long_option_split_and_joined() -> None:
    packet = dhcp.Packet(op=1, xid=1, chaddr=MAC, options={12: b"a" * 300})  # 12: host name
    raw = dhcp.encode(packet)
    assert raw[240:243] == bytes([12, 255, ord("a")])
    assert dhcp.decode(raw).options[12] == b"a" * 300


def test_option_overload_reads_file_field() -> None:
    raw = bytearray(_hand_packed_ack())
    raw[108:114] = bytes([58, 4, 0, 0, 0, 60])  # T1 = 60 s in the 'file' field
    raw[114] = 255
    raw[-1:] = bytes([52, 1, 1, 255])
    lease = dhcp.Lease.from_ack(dhcp.decode(bytes(raw)), 0.0)
    assert lease.renewal_time == 60


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:200], "DHCP message too short: 200 bytes, need at least 240"),
        (lambda b: b[:236] + b"\x00\x00\x00\x00" + b[240:], "bad DHCP magic cookie 00000000"),
        (lambda b: b[:-1] + bytes([51, 4, 0]), "option 51 declares 4 bytes but only 1 remain"),
        (lambda b: b[:-1] + bytes([51]), "option 51 is cut off at byte"),
        (lambda b: b[:1] + b"\x06" + b[2:], "unsupported hardware type 6/length 6"),
    ],
)
def test_decode_rejects_malformed(mutate: object, message: str) -> None:
    with pytest.raises(dhcp.DhcpError, match=message):
        dhcp.decode(mutate(_hand_packed_ack()))  # type: ignore[operator]


def test_ack_without_mask_is_refused() -> None:
    p = dhcp.decode(_hand_packed_ack())
    options = dict(p.options)
    del options[dhcp.Option.SUBNET_MASK]
    bad = dhcp.Packet(op=p.op, xid=p.xid, chaddr=p.chaddr, options=options, yiaddr=p.yiaddr)
    with pytest.raises(dhcp.DhcpError, match="the DHCP ACK carries no subnet mask"):
        dhcp.Lease.from_ack(bad, 0.0)


def _ack_with_mask(mask: str) -> dhcp.Packet:
    p = dhcp.decode(_hand_packed_ack())
    options = {**p.options, dhcp.Option.SUBNET_MASK: socket.inet_aton(mask)}
    return dhcp.Packet(op=p.op, xid=p.xid, chaddr=p.chaddr, options=options, yiaddr=p.yiaddr)


@pytest.mark.parametrize("mask", ["255.0.255.0", "0.0.0.255", "255.255.255.253", "127.255.255.255"])
def test_ack_with_a_non_contiguous_mask_is_refused(mask: str) -> None:
    with pytest.raises(dhcp.DhcpError) as exc:
        dhcp.Lease.from_ack(_ack_with_mask(mask), 0.0)
    assert str(exc.value) == (
        f"the DHCP ACK for 10.0.2.15 carries the subnet mask {mask}, which is not contiguous "
        "(ones, then zeros)"
    )


@pytest.mark.parametrize(
    ("mask", "address"),
    [("255.255.255.255", "10.0.2.15/32"), ("255.255.254.0", "10.0.2.15/23"), ("0.0.0.0", "10.0.2.15/0")],
)
def test_ack_mask_becomes_the_prefix_length(mask: str, address: str) -> None:
    assert dhcp.Lease.from_ack(_ack_with_mask(mask), 0.0).address == ipaddress.IPv4Interface(address)


CLIENT = r"""
import ipaddress, json, subprocess, sys, time
from eemini.guest import dhcp, netlink
from eemini.guest.loop import EventLoop

def ip(*args):  # iproute2 reads back what netlink configured
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, check=True).stdout)

with netlink.Netlink() as nl:
    nl.set_link(netlink.LOOPBACK_IFINDEX, up=True)
    nic = netlink.wait_for_nic(nl, 2.0)
    nl.set_link(nic.index, up=True)
    client = dhcp.Client(nic.name, nic.mac)
    # One DISCOVER, however slow a loaded machine makes the server: no retransmission before 20 s.
    lease = client.acquire(timeout=30, first_wait=20)
    netlink.configure(nl, nic, lease.address, lease.router, mtu=lease.mtu, protocol=netlink.RTPROT_DHCP)
    print(json.dumps({
        "nic": nic.name, "address": str(lease.address), "router": str(lease.router),
        "dns": [str(d) for d in lease.dns], "lease": lease.lease_time, "t1": lease.renewal_time,
        "mtu": [l.mtu for l in nl.links() if l.index == nic.index][0], "domain": lease.domain,
        "addresses": [f"{a['local']}/{a['prefixlen']}" for i in ip("addr", "show", "dev", nic.name)
                      for a in i["addr_info"] if a["family"] == "inet"],
        "routes": sorted(f"{'0.0.0.0/0' if r['dst'] == 'default' else r['dst']} {r.get('gateway')}"
                         for r in ip("route", "show", "dev", nic.name)),
    }), flush=True)
    renewed = []
    loop = EventLoop()
    r = dhcp.Renewer(client, lease, loop, on_lease=renewed.append, on_expired=lambda l: None, log=print)
    r.start()
    end = time.monotonic() + 8
    while not renewed and time.monotonic() < end:
        loop.call_later(0.1, lambda: None)  # wake up to look at the clock
        loop.run_once()
    print(json.dumps({"renewed": [str(x.address) for x in renewed]}), flush=True)
"""


@needs_root
def test_dhcp_exchange_over_veth() -> None:
    with namespaces("srv", "cli") as (srv, cli):
        veth(srv, "eesrv0", cli, "eth0")
        server = start_dhcp_server(srv, "eesrv0", lease=6, t1=1)
        try:
            client = python_in(cli, ["-c", CLIENT])
            out, err = client.communicate(timeout=60)
            assert client.returncode == 0, err
        finally:
            server.kill()
            seen_raw, _ = server.communicate()
    first, *logs, last = out.splitlines()
    state = json.loads(first)
    assert state == {
        "nic": "eth0",
        "address": "10.77.0.50/24",
        "router": "10.77.0.1",
        "dns": ["10.77.0.53", "10.77.0.54"],
        "lease": 6,
        "t1": 1,
        "mtu": 1400,
        "domain": "test.lan",
        "addresses": ["10.77.0.50/24"],
        "routes": ["0.0.0.0/0 10.77.0.1", "10.77.0.0/24 None"],
    }
    assert logs == ["DHCP lease renewed: 10.77.0.50/24 for 6 s"]
    assert json.loads(last) == {"renewed": ["10.77.0.50/24"]}
    seen = [json.loads(line) for line in seen_raw.splitlines()]
    assert [s["type"] for s in seen[:3]] == [1, 3, 3]
    discover, request, renew = seen[:3]
    assert discover["from"] == "0.0.0.0" and discover["broadcast_flag"]
    assert discover["client_id"].startswith("01") and len(discover["client_id"]) == 14
    assert discover["params"] == [1, 3, 6, 15, 26, 51, 58, 59]
    assert discover["length"] == 300
    assert (request["requested"], request["server_id"], request["ciaddr"]) == (
        "10.77.0.50",
        "10.77.0.1",
        "0.0.0.0",
    )
    # RFC 2131 4.3.2 RENEWING: unicast from the leased address, ciaddr set, no requested-ip/server-id.
    assert (renew["from"], renew["ciaddr"], renew["requested"], renew["server_id"]) == (
        "10.77.0.50",
        "10.77.0.50",
        None,
        None,
    )
    assert not renew["broadcast_flag"]


@needs_root
def test_dhcp_gives_up_with_a_clear_message() -> None:
    script = (
        "from eemini.guest import dhcp, netlink\n"
        "nl = netlink.Netlink(); nic = netlink.wait_for_nic(nl, 2); nl.set_link(nic.index, up=True)\n"
        "try:\n"
        "    dhcp.Client(nic.name, nic.mac).acquire(timeout=2.5, attempts=2)\n"
        "except dhcp.DhcpError as e:\n"
        "    print(e)\n"
    )
    with namespaces("srv", "cli") as (srv, cli):
        veth(srv, "eesrv0", cli, "eth0")
        client = python_in(cli, ["-c", script])
        out, err = client.communicate(timeout=30)
    assert out == "no DHCP lease on eth0 after 2 attempts: no DHCP server answered\n", err
