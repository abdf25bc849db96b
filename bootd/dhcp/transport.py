"""asyncio shell around the DHCP service: one UDP endpoint per configured interface.

It only moves bytes: a datagram goes to the service with the time it arrived, and what
comes back is sent. The one thing it knows about DHCP is delivery to a client that has
no address yet (RFC 2131 4.1): an ARP entry for yiaddr, or broadcast if that is refused.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import cast

import structlog

from bootd.dhcp.decide import BROADCAST
from bootd.dhcp.service import Datagram

log = structlog.get_logger("bootd.dhcp")

SIOCSARP = 0x8955
ATF_COM = 0x02
ARPHRD_ETHER = 1

# datagram, receiving interface, arrival time -> the reply, if any
Handler = Callable[[bytes, str, float], Datagram | None]


def open_socket(interface: str, port: int) -> socket.socket:
    """A UDP socket on 0.0.0.0:port that only sees `interface` (SO_BINDTODEVICE)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode() + b"\0")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def add_arp_entry(sock: socket.socket, interface: str, ip: IPv4Address, mac: bytes) -> None:
    """Teach the kernel yiaddr -> chaddr so a unicast reply reaches a client with no address
    yet (RFC 2131 4.1); needs CAP_NET_ADMIN, as dnsmasq's equivalent does."""
    pa = struct.pack("=H2s4s8s", socket.AF_INET, b"", ip.packed, b"")
    ha = struct.pack("=H6s8s", ARPHRD_ETHER, mac[:6], b"")
    dev = interface.encode()[:15].ljust(16, b"\0")
    req = pa + ha + struct.pack("=i", ATF_COM) + b"\0" * 16 + dev
    fcntl.ioctl(sock.fileno(), SIOCSARP, req)


class DhcpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, interface: str, handler: Handler) -> None:
        self.interface = interface
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None
        self.arp_works = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.handler(data, self.interface, time.time())
        if reply is not None:
            self.send(reply)

    def send(self, reply: Datagram) -> None:
        if self.transport is None:
            return
        dest = reply.dest
        if reply.hw_unicast_to is not None:
            dest = self._reachable(reply.dest, reply.hw_unicast_to) or BROADCAST
        try:
            self.transport.sendto(reply.payload, (str(dest), reply.port))
        except OSError as exc:
            log.warning("dhcp send failed", interface=self.interface, dest=str(dest),
                        error=str(exc))

    def _reachable(self, ip: IPv4Address, chaddr: bytes) -> IPv4Address | None:
        if not self.arp_works or self.transport is None:
            return None
        sock = self.transport.get_extra_info("socket")
        try:
            add_arp_entry(sock, self.interface, ip, chaddr)
        except OSError as exc:
            self.arp_works = False
            log.info("cannot add ARP entries, answering by broadcast", error=str(exc),
                     interface=self.interface)
            return None
        return ip

    def error_received(self, exc: Exception) -> None:
        log.debug("dhcp socket error", interface=self.interface, error=str(exc))


async def open_endpoints(interfaces: list[str], port: int, handler: Handler,
                         ) -> list[tuple[asyncio.DatagramTransport, DhcpEndpoint]]:
    loop = asyncio.get_running_loop()
    out: list[tuple[asyncio.DatagramTransport, DhcpEndpoint]] = []
    for name in interfaces:
        try:
            sock = open_socket(name, port)
        except OSError as exc:
            for transport, _ in out:
                transport.close()
            raise OSError(exc.errno, f"cannot listen for DHCP on {name}:{port}: "
                          f"{exc.strerror}") from exc
        transport, protocol = await loop.create_datagram_endpoint(
            lambda name=name: DhcpEndpoint(name, handler), sock=sock)  # type: ignore[misc]
        out.append((transport, protocol))
    return out
