"""DHCP decisions: (request, node directory, settings, now) -> a typed outcome.

Pure logic, no sockets and no clock: every RFC 2131 rule is a named branch with a test.
Every request is first placed in one of the networks bootd serves: by its relay (giaddr
inside a declared subnet) or, when not relayed, by the network of the interface it came
in on. A relay in no declared network gets nothing (bootd never sends to an address a
packet merely names). Reservations and ranges of other networks are not used for it.
bootd answers authoritatively for its networks (as dnsmasq's `dhcp-authoritative`): a
client asking for an address that is not its own here is NAKed at once, so it falls back
to DISCOVER instead of waiting out a timeout.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType

from bootd.dhcp.bootfile import BootAnswer, Unsupported, boot_answer
from bootd.dhcp.options import Opt
from bootd.dhcp.outcomes import (
    Acked,
    Declined,
    Dropped,
    Exhausted,
    Informed,
    Nakked,
    NotForUs,
    Offered,
    Outcome,
    Released,
    Reply,
    RequestState,
    UnknownMac,
    UnknownRelay,
    WrongNetwork,
)
from bootd.dhcp.packet import (
    BOOTREPLY,
    BOOTREQUEST,
    FLAG_BROADCAST,
    ZERO,
    DhcpError,
    DhcpPacket,
    MessageType,
)
from bootd.fleet.config import Config
from bootd.fleet.directory import NodeDirectory
from bootd.fleet.inventory import NodeProfile, PortId

BROADCAST = IPv4Address("255.255.255.255")
SERVER_PORT = 67
CLIENT_PORT = 68
MAX_HOPS = 16


@dataclass(frozen=True)
class NetworkSettings:
    """What a reply on one network carries."""

    name: str
    subnet: IPv4Network
    gateway: IPv4Address | None
    dns: tuple[IPv4Address, ...]
    domain: str | None
    lease_time: float
    next_server: IPv4Address  # bootd's address as this network reaches it
    # the options every OFFER/ACK on this network carries, made once per snapshot instead
    # of per reply: `leased_head` (with lease times) or `informed_head` (the ACK to an
    # INFORM), then the node's host name, then `tail`; the order they go on the wire
    leased_head: Mapping[int, bytes] = field(init=False, repr=False, compare=False)
    informed_head: Mapping[int, bytes] = field(init=False, repr=False, compare=False)
    tail: Mapping[int, bytes] = field(init=False, repr=False, compare=False)
    server_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lease = int(self.lease_time)
        common: dict[int, bytes] = {Opt.SUBNET_MASK: self.subnet.netmask.packed}
        if self.gateway is not None:
            common[Opt.ROUTER] = self.gateway.packed
        if self.dns:
            common[Opt.DNS] = b"".join(a.packed for a in self.dns)
        tail: dict[int, bytes] = {}
        if self.domain:
            tail[Opt.DOMAIN_NAME] = self.domain.encode()
        tail[Opt.BROADCAST] = self.subnet.broadcast_address.packed
        times = {Opt.LEASE_TIME: struct.pack("!I", lease),
                 Opt.RENEWAL_TIME: struct.pack("!I", lease // 2),
                 Opt.REBINDING_TIME: struct.pack("!I", lease * 7 // 8)}
        set_ = object.__setattr__
        set_(self, "leased_head", MappingProxyType({**times, **common}))
        set_(self, "informed_head", MappingProxyType(common))
        set_(self, "tail", MappingProxyType(tail))
        set_(self, "server_id", self.next_server.packed)


@dataclass(frozen=True)
class DhcpSettings:
    """The networks served and how a request is placed in one, from one config load."""

    server: IPv4Address
    http_port: int
    networks: tuple[NetworkSettings, ...]
    # receiving interface -> its network, for requests that were not relayed
    local: Mapping[str, NetworkSettings] = field(default_factory=lambda: MappingProxyType({}))
    # any other interface: the network of server.address, else the only network
    fallback: NetworkSettings | None = None

    @classmethod
    def from_config(cls, config: Config,
                    interface_addresses: Mapping[str, IPv4Address] | None = None,
                    ) -> DhcpSettings:
        """`interface_addresses`: each DHCP interface's own address. An interface whose
        address is in no network (or unknown) serves the network of server.address,
        else the only network there is."""
        server = config.server.address
        networks = tuple(NetworkSettings(
            name=n.name, subnet=n.subnet, gateway=n.gateway, dns=tuple(n.dns),
            domain=n.domain, lease_time=n.lease_time, next_server=n.next_server or server)
            for n in config.all_networks())
        fallback = next((n for n in networks if server in n.subnet),
                        networks[0] if len(networks) == 1 else None)
        local = {}
        for name in config.server.interfaces:
            address = (interface_addresses or {}).get(name)
            found = next((n for n in networks if address is not None and address in n.subnet),
                         fallback)
            if found is not None:
                local[name] = found
        return cls(server, config.server.http_port, networks, MappingProxyType(local),
                   fallback)

    @functools.cached_property
    def addresses(self) -> frozenset[IPv4Address]:
        """Every address of ours a client may name as server identifier (once per load:
        it is read for every REQUEST)."""
        return frozenset({self.server, *(n.next_server for n in self.networks)})

    def network_of(self, ip: IPv4Address) -> NetworkSettings | None:
        return next((n for n in self.networks if ip in n.subnet), None)


@dataclass(frozen=True)
class Place:
    """Where a request comes from: its network, and the switch port its relay named."""

    network: NetworkSettings
    port: PortId | None


@dataclass(frozen=True)
class DhcpContext:
    """What one decision reads: the node directory and the settings of one config load."""

    directory: NodeDirectory
    settings: DhcpSettings


def decide(req: DhcpPacket, ctx: DhcpContext, now: float, interface: str = "") -> Outcome:
    """Answer one decoded request (RFC 2131 section 4.3) that came in on `interface`.
    Lease changes and learned MACs it makes are queued in the node directory for the
    caller to persist before it sends the reply."""
    if req.op != BOOTREQUEST:
        return Dropped("not a BOOTREQUEST")
    try:
        mac = req.mac
    except DhcpError as exc:
        return Dropped(str(exc))
    mtype = req.message_type
    if mtype is None:
        return Dropped("no or unknown DHCP message type (BOOTP is not served)")
    if req.hops > MAX_HOPS:
        return Dropped(f"relayed through {req.hops} hops")
    handler = _HANDLERS.get(mtype)
    if handler is None:
        return Dropped(f"{mtype.name} is a server message")
    if req.giaddr != ZERO:
        network = ctx.settings.network_of(req.giaddr)
        if network is None or not _is_host(req.giaddr, network):
            # a relay is a host on its network: its broadcast or network address as giaddr
            # would make bootd broadcast to a whole segment
            return UnknownRelay(req.giaddr, mac)
    else:
        network = ctx.settings.local.get(interface, ctx.settings.fallback)
        if network is None:
            return Dropped(f"interface {interface!r} is on none of bootd's networks")
    return handler(req, mac, ctx, now, Place(network, _port_of(req)))


def _is_host(ip: IPv4Address, net: NetworkSettings) -> bool:
    """A unicast host address of the network (not its network or broadcast address)."""
    s = net.subnet
    return ip in s and (s.prefixlen >= 31 or ip not in (s.network_address,
                                                          s.broadcast_address))


def _port_of(req: DhcpPacket) -> PortId | None:
    """The switch port a relay reported (option 82 circuit-id, remote-id), if any."""
    info = req.options.get(Opt.RELAY_AGENT_INFO)
    if req.giaddr == ZERO or not info:
        return None
    subs: dict[int, bytes] = {}
    i = 0
    while i + 2 <= len(info):
        code, length = info[i], info[i + 1]
        subs.setdefault(code, info[i + 2 : i + 2 + length])
        i += 2 + length
    circuit = subs.get(1)
    return PortId(req.giaddr, circuit, subs.get(2)) if circuit else None


def _node(req: DhcpPacket, mac: str, ctx: DhcpContext, place: Place,
          ) -> NodeProfile | WrongNetwork | None:
    """The node asking, if it may be served on this network; learns a ported node's MAC."""
    node = ctx.directory.resolve(mac, place.port)
    if node is None:
        return None
    if node.network is not None and node.network != place.network.name:
        return WrongNetwork(node, mac, place.network.name)
    ctx.directory.learn(node, mac)
    return node


# ---------------------------------------------------------------------------- handlers


def _discover(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float,
              place: Place) -> Outcome:
    node = _node(req, mac, ctx, place)
    if node is None:
        return UnknownMac(mac, MessageType.DISCOVER)
    if isinstance(node, WrongNetwork):
        return node
    if node.ip is not None:
        ip = node.ip
    else:
        leases = ctx.directory.leases
        if leases is None:
            return Dropped("catch-all pool has no lease table", node)
        offered = leases.offer(mac, now, req.requested_ip, place.network.name)
        if offered is None:
            return Exhausted(node, place.network.name)
        ip = offered
    reply, boot, note = _answer(req, MessageType.OFFER, node, ip, place.network, ctx)
    return Offered(reply, node, ip, boot, note)


def _request(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float,
             place: Place) -> Outcome:
    server_id = req.server_id
    leases = ctx.directory.leases
    if server_id is not None and server_id not in ctx.settings.addresses:
        if leases is not None:
            leases.forget_offer(mac)
        return NotForUs(server_id, req.requested_ip)
    node = _node(req, mac, ctx, place)
    if node is None:
        return UnknownMac(mac, MessageType.REQUEST)
    if isinstance(node, WrongNetwork):
        return node
    wanted = req.requested_ip if req.ciaddr == ZERO else req.ciaddr
    if wanted is None:
        return Dropped("REQUEST names no address", node)
    if server_id is None and req.ciaddr != ZERO and req.requested_ip is None:
        state = RequestState.RENEWING
    elif server_id is None:
        state = RequestState.INIT_REBOOT
    else:
        state = RequestState.SELECTING

    net = place.network
    if wanted not in net.subnet:
        return _nak(req, node, net, f"{state}: {wanted} is not on {net.name} ({net.subnet})")
    if node.ip is not None:
        if wanted != node.ip:
            return _nak(req, node, net, f"{state}: {wanted} requested, {node.ip} is reserved")
    elif leases is None or not leases.is_free_for(wanted, mac, now):
        return _nak(req, node, net, f"{state}: {wanted} is not available to {mac}")
    else:
        leases.bind(mac, wanted, now, net.lease_time, node.name)
    reply, boot, note = _answer(req, MessageType.ACK, node, wanted, net, ctx)
    return Acked(reply, node, wanted, state, boot, note)


def _release(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float,
             place: Place) -> Outcome:
    node = ctx.directory.resolve(mac, place.port)
    leases = ctx.directory.leases
    if leases is not None and req.ciaddr in leases:
        released = leases.release(mac, req.ciaddr, now)
        return Released(node, req.ciaddr, released,
                        "released" if released else "no such lease")
    return Released(node, req.ciaddr, False, "reserved address, kept")


def _decline(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float,
             place: Place) -> Outcome:
    node = ctx.directory.resolve(mac, place.port)
    ip = req.requested_ip
    if ip is None:
        return Dropped("DECLINE without requested address", node)
    leases = ctx.directory.leases
    if leases is not None and ip in leases:
        quarantined = leases.decline(mac, ip, now)
        return Declined(node, ip, "address quarantined" if quarantined
                        else "not this client's lease")
    return Declined(node, ip, "reserved address is in use by another host: address conflict")


def _inform(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float,
            place: Place) -> Outcome:
    if not _is_host(req.ciaddr, place.network):
        return Dropped(f"INFORM from {req.ciaddr}, not a host address of "
                       f"{place.network.name}")
    node = ctx.directory.resolve(mac, place.port)
    reply, boot, note = _answer(req, MessageType.ACK, node, None, place.network, ctx)
    return Informed(reply, node, req.ciaddr, boot, note)


_HANDLERS = {
    MessageType.DISCOVER: _discover,
    MessageType.REQUEST: _request,
    MessageType.RELEASE: _release,
    MessageType.DECLINE: _decline,
    MessageType.INFORM: _inform,
}


# ---------------------------------------------------------------------------- replies

_MESSAGE_TYPES = {t: bytes((t,)) for t in MessageType}


def _base_reply(req: DhcpPacket, mtype: MessageType, net: NetworkSettings) -> DhcpPacket:
    return DhcpPacket(
        op=BOOTREPLY, xid=req.xid, htype=req.htype, hlen=req.hlen, flags=req.flags,
        giaddr=req.giaddr, chaddr=req.chaddr,
        options={Opt.MESSAGE_TYPE: _MESSAGE_TYPES[mtype], Opt.SERVER_ID: net.server_id},
    )


def _destination(req: DhcpPacket, reply: DhcpPacket, nak: bool) -> Reply:
    """RFC 2131 4.1: relay, then NAK broadcast, then ciaddr, then broadcast bit, then yiaddr."""
    size = req.max_message_size
    if req.giaddr != ZERO:
        if nak:
            reply.flags |= FLAG_BROADCAST
        return Reply(reply, req.giaddr, SERVER_PORT, size)
    if nak:
        return Reply(reply, BROADCAST, CLIENT_PORT, size)
    if req.ciaddr != ZERO:
        return Reply(reply, req.ciaddr, CLIENT_PORT, size)
    if req.broadcast or reply.yiaddr == ZERO:
        return Reply(reply, BROADCAST, CLIENT_PORT, size)
    return Reply(reply, reply.yiaddr, CLIENT_PORT, size, hw_unicast=True)


def _nak(req: DhcpPacket, node: NodeProfile, net: NetworkSettings, why: str) -> Nakked:
    reply = _base_reply(req, MessageType.NAK, net)
    reply.options[Opt.MESSAGE] = why.encode()[:255]
    return Nakked(_destination(req, reply, nak=True), node, req.requested_ip, why)


def _answer(req: DhcpPacket, mtype: MessageType, node: NodeProfile | None,
            ip: IPv4Address | None, s: NetworkSettings, ctx: DhcpContext,
            ) -> tuple[Reply, BootAnswer | None, str]:
    """OFFER or ACK (ip set) or ACK to INFORM (ip None): addresses, options, boot file.
    Returns the reply, the boot program chosen and a note on why there is none."""
    reply = _base_reply(req, mtype, s)
    reply.siaddr = s.next_server
    if ip is not None:
        reply.yiaddr = ip
    else:
        reply.ciaddr = req.ciaddr
    opts = dict(s.leased_head if ip is not None else s.informed_head)
    if node is not None:
        opts[Opt.HOSTNAME] = node.name.encode()
    opts.update(s.tail)

    boot: BootAnswer | None = None
    note = ""
    if node is not None:
        answer = boot_answer(req, node.boot, str(s.next_server), ctx.settings.http_port)
        if isinstance(answer, Unsupported):
            note = answer.reason
        elif answer is not None:
            boot = answer
            opts.update(answer.options)
            raw = answer.bootfile.encode()
            if len(raw) <= 127:
                reply.file = raw
            opts[Opt.BOOTFILE_NAME] = raw
        for code, value in node.dhcp_options:
            opts[code] = value
    reply.options.update(_order(opts, req.parameter_request_list))
    relay_info = req.options.get(Opt.RELAY_AGENT_INFO)
    if relay_info is not None:
        reply.options[Opt.RELAY_AGENT_INFO] = relay_info  # RFC 3046: echoed, last
    return _destination(req, reply, nak=False), boot, note


def _order(opts: dict[int, bytes], prl: bytes) -> dict[int, bytes]:
    """Requested options first, in the client's order, then the rest: when a small client
    buffer forces the encoder to leave options out, the unrequested ones go first."""
    ordered = {code: opts[code] for code in prl if code in opts}
    for code, value in opts.items():
        ordered.setdefault(code, value)
    return ordered
