"""rtnetlink setup inside a fresh network namespace, checked with iproute2 (an independent reader)."""

from __future__ import annotations

import json
import subprocess
import sys

from eemini.guest import netlink
from netns import namespaces, needs_root, veth

SCRIPT = r"""
import ipaddress, sys
from eemini.guest import netlink
with netlink.Netlink() as nl:
    assert [l.name for l in nl.links() if l.index == netlink.LOOPBACK_IFINDEX] == ["lo"]
    nic = netlink.wait_for_nic(nl, 2.0)
    print(nic.name, bool(nic.flags & netlink.IFF_UP), len(nic.mac))
    nl.set_link(nic.index, up=True)
    # A GCE-style /32 lease with the router outside it.
    netlink.configure(nl, nic, ipaddress.IPv4Interface("10.128.0.7/32"),
                      ipaddress.IPv4Address("10.128.0.1"), mtu=1460, protocol=netlink.RTPROT_DHCP)
    nl.add_address(nic.index, ipaddress.IPv4Interface("10.128.0.7/32"))  # again: a renewal
    (now,) = [l for l in nl.links() if l.index == nic.index]
    print(bool(now.flags & netlink.IFF_UP), now.mtu)
    try:
        nl.add_route(nic.index, ipaddress.IPv4Network("10.9.0.0/16"), ipaddress.IPv4Address("192.0.2.1"),
                     protocol=netlink.RTPROT_STATIC, src=ipaddress.IPv4Address("10.128.0.7"))
    except OSError as e:
        print(e.errno, e.strerror)
"""


@needs_root
def test_configure_in_namespace() -> None:
    with namespaces("a", "b") as (a, b):
        veth(a, "eth0", b, "peer0")
        proc = subprocess.run(
            ["ip", "netns", "exec", a, sys.executable, "-c", SCRIPT],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            "eth0 False 6",
            "True 1460",
            "101 add route 10.9.0.0/16 via 192.0.2.1: Network is unreachable",
        ]
        addrs = json.loads(
            subprocess.run(
                ["ip", "-n", a, "-j", "addr", "show", "eth0"], capture_output=True, check=True
            ).stdout
        )
        assert [
            (i["local"], i["prefixlen"]) for i in addrs[0]["addr_info"] if i["family"] == "inet"
        ] == [("10.128.0.7", 32)]
        routes = json.loads(
            subprocess.run(
                ["ip", "-n", a, "-j", "route", "show"], capture_output=True, check=True
            ).stdout
        )
        assert sorted(
            (r["dst"], r.get("gateway"), r.get("scope"), r.get("prefsrc")) for r in routes
        ) == [
            ("10.128.0.1", None, "link", "10.128.0.7"),
            ("default", "10.128.0.1", None, "10.128.0.7"),
        ]


def test_parse_attrs_stops_at_declared_length() -> None:
    data = netlink.attr(3, b"eth0\0") + netlink.attr(4, b"\xdc\x05\0\0") + b"\x40\x00\x01\x00"
    assert netlink.parse_attrs(data) == {3: b"eth0\0", 4: b"\xdc\x05\0\0"}


def test_first_nic_skips_loopback_and_non_ethernet() -> None:
    links = [
        netlink.Link(1, "lo", 772, 0x8, bytes(6), 65536),  # ARPHRD_LOOPBACK, IFF_LOOPBACK
        netlink.Link(2, "sit0", 776, 0, b"\0\0\0\0", 1480),
        netlink.Link(3, "ens4", netlink.ARPHRD_ETHER, 0, bytes.fromhex("42010a800007"), 1460),
        netlink.Link(4, "ens5", netlink.ARPHRD_ETHER, 0, bytes.fromhex("42010a800008"), 1460),
    ]
    nic = netlink.first_nic(links)
    assert nic is not None and nic.name == "ens4"
    assert netlink.first_nic(links[:2]) is None
