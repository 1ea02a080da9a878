"""The network at boot: loopback, then the first NIC with a static address from boot config or a
DHCP lease, and /etc/resolv.conf; afterwards the lease is renewed on PID 1's event loop.

No network is never fatal: a missing NIC or DHCP server is one console line and the boot goes on
(the workload may not need the network, and the console says why it has none).
"""

from __future__ import annotations

import time

from eemini.guest import dhcp, netlink
from eemini.guest.image import Network

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ipaddress
    from collections.abc import Callable

    from eemini.guest.bootconfig import NetworkConfig
    from eemini.guest.loop import EventLoop

NIC_WAIT = 5.0  # drivers probe asynchronously after their module loads


def write_resolv_conf(path: str, dns: tuple[ipaddress.IPv4Address, ...], domain: str | None) -> None:
    # /etc lives in the initramfs, which is the tmpfs root: nothing here reaches a disk.
    lines = ([f"search {domain}"] if domain else []) + [f"nameserver {d}" for d in dns]
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


class Uplink:
    """The image's one network interface: `bring_up()` at boot, `keep(loop)` once the loop runs."""

    def __init__(self, resolv_conf: str, log: Callable[[str], None]) -> None:
        self.resolv_conf = resolv_conf
        self.log = log
        self.dhcp: tuple[netlink.Link, dhcp.Client, dhcp.Lease] | None = None  # the lease to keep

    def bring_up(self, kind: Network, static: NetworkConfig | None) -> None:
        with netlink.Netlink() as nl:
            nl.set_link(netlink.LOOPBACK_IFINDEX, up=True)
            if kind is Network.NONE:
                self.log("network: none (this image has no network)")
                return
            nic = netlink.wait_for_nic(nl, NIC_WAIT)
            if nic is None:
                self.log(
                    f"network: no network interface appeared within {NIC_WAIT:.0f} s; going on without"
                )
                return
            nl.set_link(nic.index, up=True)
            if static is not None:
                netlink.configure(
                    nl, nic, static.address, static.gateway, protocol=netlink.RTPROT_STATIC
                )
                write_resolv_conf(self.resolv_conf, static.dns, None)
                via = f" via {static.gateway}" if static.gateway else ""
                self.log(f"network: {nic.name} {static.address}{via} (static, from boot config)")
                return
            start = time.monotonic()
            client = dhcp.Client(nic.name, nic.mac)
            try:
                lease = client.acquire(timeout=30.0, attempts=5)
            except (dhcp.DhcpError, OSError) as e:
                client.sock.close()
                self.log(f"network: {e}; going on without an address")
                return
            self._apply(nl, nic, lease)
            self.dhcp = nic, client, lease
            via = f"via {lease.router}" if lease.router else "(no router)"
            dns = ",".join(map(str, lease.dns)) or "none"
            self.log(
                f"network: {nic.name} {lease.address} {via} dns {dns} (DHCP from {lease.server}, "
                f"lease {lease.lease_time} s, {time.monotonic() - start:.2f} s)"
            )

    def keep(self, loop: EventLoop) -> None:
        """Renew the DHCP lease on the event loop (a static address or none needs nothing)."""
        if self.dhcp is None:
            return
        _, client, lease = self.dhcp
        renewer = dhcp.Renewer(
            client, lease, loop, on_lease=self._renewed, on_expired=self._expired, log=self.log
        )
        renewer.start()

    def _apply(self, nl: netlink.Netlink, nic: netlink.Link, lease: dhcp.Lease) -> None:
        netlink.configure(
            nl, nic, lease.address, lease.router, mtu=lease.mtu, protocol=netlink.RTPROT_DHCP
        )
        write_resolv_conf(self.resolv_conf, lease.dns, lease.domain)

    def _renewed(self, lease: dhcp.Lease) -> None:
        assert self.dhcp is not None
        try:
            with netlink.Netlink() as nl:
                self._apply(nl, self.dhcp[0], lease)
        except OSError as e:
            self.log(f"network: applying the renewed lease failed: {e}")

    def _expired(self, lease: dhcp.Lease) -> None:
        assert self.dhcp is not None
        try:
            with netlink.Netlink() as nl:
                nl.delete_address(self.dhcp[0].index, lease.address)
        except OSError as e:
            self.log(f"network: removing the expired address failed: {e}")
