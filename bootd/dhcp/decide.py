"""DHCP decisions: (request, inventory, leases, now) -> reply or nothing.

Pure logic, no sockets and no clock: every RFC 2131 rule is a named branch with a test.
bootd answers authoritatively for its one subnet (as dnsmasq's `dhcp-authoritative`): a
client asking for an address that is not its own here is NAKed at once, so it falls back
to DISCOVER instead of waiting out a timeout.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bootd.dhcp.bootfile import BootAnswer, Unsupported, boot_answer
from bootd.dhcp.options import Opt
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
from bootd.fleet.inventory import Inventory, NodeProfile
from bootd.state.leases import LeaseTable

BROADCAST = IPv4Address("255.255.255.255")
SERVER_PORT = 67
CLIENT_PORT = 68
MAX_HOPS = 16


@dataclass(frozen=True)
class DhcpSettings:
    """What every reply carries, taken from the config once."""

    server: IPv4Address
    subnet: IPv4Network
    gateway: IPv4Address | None
    dns: tuple[IPv4Address, ...]
    domain: str | None
    lease_time: float
    http_port: int

    @classmethod
    def from_config(cls, config: Config) -> DhcpSettings:
        net = config.network
        return cls(server=config.server.address, subnet=net.subnet, gateway=net.gateway,
                   dns=tuple(net.dns), domain=net.domain, lease_time=net.lease_time,
                   http_port=config.server.http_port)


@dataclass(frozen=True)
class Reply:
    packet: DhcpPacket
    dest: IPv4Address
    port: int
    max_size: int
    # The client has no address yet and did not ask for broadcast: deliver to yiaddr at
    # chaddr (the transport installs an ARP entry, or falls back to broadcast).
    hw_unicast: bool = False


@dataclass(frozen=True)
class Outcome:
    """What happened to one request: the reply (if any) and a record for logs/events."""

    kind: str  # offer | ack | nak | release | decline | inform | ignore | unknown-mac | drop
    reply: Reply | None = None
    node: NodeProfile | None = None
    ip: IPv4Address | None = None
    detail: str = ""
    boot: BootAnswer | None = field(default=None)


@dataclass
class DhcpContext:
    inventory: Inventory
    leases: LeaseTable | None
    settings: DhcpSettings

    def address_of(self, node: NodeProfile, mac: str, now: float) -> IPv4Address | None:
        """The address this node holds through `mac`: its reservation or active lease."""
        if node.ip is not None:
            return node.ip
        lease = self.leases.lookup(mac) if self.leases is not None else None
        return lease.ip if lease is not None and lease.active(now) else None

    def node_for_ip(self, ip: IPv4Address, now: float) -> tuple[NodeProfile, str] | None:
        """The node (and the MAC it booted from) that holds `ip`: reservation or lease."""
        node = self.inventory.by_ip(ip)
        if node is not None:
            return node, node.macs[0]
        if self.leases is not None:
            lease = self.leases.holder(ip)
            if lease is not None and lease.mac and lease.active(now):
                found = self.inventory.resolve(lease.mac)
                if found is not None:
                    return found, lease.mac
        return None


def decide(req: DhcpPacket, ctx: DhcpContext, now: float) -> Outcome:
    """Answer one decoded request (RFC 2131 section 4.3)."""
    if req.op != BOOTREQUEST:
        return Outcome("drop", detail="not a BOOTREQUEST")
    try:
        mac = req.mac
    except DhcpError as exc:
        return Outcome("drop", detail=str(exc))
    mtype = req.message_type
    if mtype is None:
        return Outcome("drop", detail="no or unknown DHCP message type (BOOTP is not served)")
    if req.hops > MAX_HOPS:
        return Outcome("drop", detail=f"relayed through {req.hops} hops")
    if req.giaddr != ZERO and req.giaddr not in ctx.settings.subnet:
        return Outcome("drop", detail=f"relay {req.giaddr} is not on {ctx.settings.subnet}")
    handler = _HANDLERS.get(mtype)
    if handler is None:
        return Outcome("drop", detail=f"{mtype.name} is a server message")
    return handler(req, mac, ctx, now)


# ---------------------------------------------------------------------------- handlers


def _discover(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    node = ctx.inventory.resolve(mac)
    if node is None:
        return Outcome("unknown-mac", detail=f"{mac} is not in the inventory and there is no "
                       "catch-all pool")
    if node.ip is not None:
        ip = node.ip
    else:
        if ctx.leases is None:
            return Outcome("drop", node=node, detail="catch-all pool has no lease table")
        offered = ctx.leases.offer(mac, now, req.requested_ip)
        if offered is None:
            return Outcome("ignore", node=node, detail="dynamic range exhausted")
        ip = offered
    return _answer(req, MessageType.OFFER, node, ip, ctx, "offer")


def _request(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    server_id = req.server_id
    leases = ctx.leases
    if server_id is not None and server_id != ctx.settings.server:
        if leases is not None:
            leases.forget_offer(mac)
        return Outcome("ignore", ip=req.requested_ip,
                       detail=f"client selected server {server_id}")
    node = ctx.inventory.resolve(mac)
    if node is None:
        return Outcome("unknown-mac", detail=f"REQUEST from {mac}, not in the inventory")
    wanted = req.requested_ip if req.ciaddr == ZERO else req.ciaddr
    if wanted is None:
        return Outcome("drop", node=node, detail="REQUEST names no address")
    if server_id is None and req.ciaddr != ZERO and req.requested_ip is None:
        state = "renewing/rebinding"
    elif server_id is None:
        state = "init-reboot"
    else:
        state = "selecting"

    if wanted not in ctx.settings.subnet:
        return _nak(req, node, ctx, f"{state}: {wanted} is not on {ctx.settings.subnet}")
    if node.ip is not None:
        if wanted != node.ip:
            return _nak(req, node, ctx, f"{state}: {wanted} requested, {node.ip} is reserved")
        return _answer(req, MessageType.ACK, node, wanted, ctx, "ack", detail=state)
    if leases is None or not leases.is_free_for(wanted, mac, now):
        return _nak(req, node, ctx, f"{state}: {wanted} is not available to {mac}")
    leases.bind(mac, wanted, now, ctx.settings.lease_time, node.name)
    return _answer(req, MessageType.ACK, node, wanted, ctx, "ack", detail=state)


def _release(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    node = ctx.inventory.resolve(mac)
    if ctx.leases is not None and req.ciaddr in ctx.leases:
        released = ctx.leases.release(mac, req.ciaddr, now)
        return Outcome("release", node=node, ip=req.ciaddr,
                       detail="released" if released else "no such lease")
    return Outcome("release", node=node, ip=req.ciaddr, detail="reserved address, kept")


def _decline(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    node = ctx.inventory.resolve(mac)
    ip = req.requested_ip
    if ip is None:
        return Outcome("drop", node=node, detail="DECLINE without requested address")
    if ctx.leases is not None and ip in ctx.leases:
        quarantined = ctx.leases.decline(mac, ip, now)
        detail = "address quarantined" if quarantined else "not this client's lease"
        return Outcome("decline", node=node, ip=ip, detail=detail)
    return Outcome("decline", node=node, ip=ip,
                   detail="reserved address is in use by another host: address conflict")


def _inform(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    if req.ciaddr == ZERO or req.ciaddr not in ctx.settings.subnet:
        return Outcome("drop", detail=f"INFORM from {req.ciaddr}, not on our subnet")
    node = ctx.inventory.resolve(mac)
    return _answer(req, MessageType.ACK, node, None, ctx, "inform")


_HANDLERS = {
    MessageType.DISCOVER: _discover,
    MessageType.REQUEST: _request,
    MessageType.RELEASE: _release,
    MessageType.DECLINE: _decline,
    MessageType.INFORM: _inform,
}


# ---------------------------------------------------------------------------- replies


def _base_reply(req: DhcpPacket, mtype: MessageType, ctx: DhcpContext) -> DhcpPacket:
    return DhcpPacket(
        op=BOOTREPLY, xid=req.xid, htype=req.htype, hlen=req.hlen, flags=req.flags,
        giaddr=req.giaddr, chaddr=req.chaddr,
        options={Opt.MESSAGE_TYPE: bytes((mtype,)), Opt.SERVER_ID: ctx.settings.server.packed},
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


def _nak(req: DhcpPacket, node: NodeProfile, ctx: DhcpContext, why: str) -> Outcome:
    reply = _base_reply(req, MessageType.NAK, ctx)
    reply.options[Opt.MESSAGE] = why.encode()[:255]
    return Outcome("nak", _destination(req, reply, nak=True), node, req.requested_ip, why)


def _answer(req: DhcpPacket, mtype: MessageType, node: NodeProfile | None,
            ip: IPv4Address | None, ctx: DhcpContext, kind: str, detail: str = "") -> Outcome:
    """OFFER or ACK (ip set) or ACK to INFORM (ip None): addresses, options, boot file."""
    s = ctx.settings
    reply = _base_reply(req, mtype, ctx)
    reply.siaddr = s.server
    opts: dict[int, bytes] = {}
    if ip is not None:
        reply.yiaddr = ip
        lease = int(s.lease_time)
        opts[Opt.LEASE_TIME] = struct.pack("!I", lease)
        opts[Opt.RENEWAL_TIME] = struct.pack("!I", lease // 2)
        opts[Opt.REBINDING_TIME] = struct.pack("!I", lease * 7 // 8)
    else:
        reply.ciaddr = req.ciaddr
    opts[Opt.SUBNET_MASK] = s.subnet.netmask.packed
    if s.gateway is not None:
        opts[Opt.ROUTER] = s.gateway.packed
    if s.dns:
        opts[Opt.DNS] = b"".join(a.packed for a in s.dns)
    if node is not None:
        opts[Opt.HOSTNAME] = node.name.encode()
    if s.domain:
        opts[Opt.DOMAIN_NAME] = s.domain.encode()
    opts[Opt.BROADCAST] = s.subnet.broadcast_address.packed

    boot: BootAnswer | None = None
    if node is not None:
        answer = boot_answer(req, node.boot, str(s.server), s.http_port)
        if isinstance(answer, Unsupported):
            detail = f"{detail}; {answer.reason}".lstrip("; ")
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
    return Outcome(kind, _destination(req, reply, nak=False), node, ip, detail, boot)


def _order(opts: dict[int, bytes], prl: bytes) -> dict[int, bytes]:
    """Requested options first, in the client's order, then the rest: when a small client
    buffer forces the encoder to leave options out, the unrequested ones go first."""
    ordered = {code: opts[code] for code in prl if code in opts}
    for code, value in opts.items():
        ordered.setdefault(code, value)
    return ordered
