"""DHCP decisions: (request, node directory, settings, now) -> a typed outcome.

Pure logic, no sockets and no clock: every RFC 2131 rule is a named branch with a test.
bootd answers authoritatively for its one subnet (as dnsmasq's `dhcp-authoritative`): a
client asking for an address that is not its own here is NAKed at once, so it falls back
to DISCOVER instead of waiting out a timeout.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

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
from bootd.fleet.inventory import NodeProfile

BROADCAST = IPv4Address("255.255.255.255")
SERVER_PORT = 67
CLIENT_PORT = 68
MAX_HOPS = 16


@dataclass(frozen=True)
class DhcpSettings:
    """What every reply carries, taken from the config once per load."""

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
class DhcpContext:
    """What one decision reads: the node directory and the settings of one config load."""

    directory: NodeDirectory
    settings: DhcpSettings


def decide(req: DhcpPacket, ctx: DhcpContext, now: float) -> Outcome:
    """Answer one decoded request (RFC 2131 section 4.3). Lease changes it makes are
    queued in the lease table for the caller to persist before it sends the reply."""
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
    if req.giaddr != ZERO and req.giaddr not in ctx.settings.subnet:
        return Dropped(f"relay {req.giaddr} is not on {ctx.settings.subnet}")
    handler = _HANDLERS.get(mtype)
    if handler is None:
        return Dropped(f"{mtype.name} is a server message")
    return handler(req, mac, ctx, now)


# ---------------------------------------------------------------------------- handlers


def _discover(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    node = ctx.directory.resolve(mac)
    if node is None:
        return UnknownMac(mac, MessageType.DISCOVER)
    if node.ip is not None:
        ip = node.ip
    else:
        leases = ctx.directory.leases
        if leases is None:
            return Dropped("catch-all pool has no lease table", node)
        offered = leases.offer(mac, now, req.requested_ip)
        if offered is None:
            return Exhausted(node)
        ip = offered
    reply, boot, note = _answer(req, MessageType.OFFER, node, ip, ctx)
    return Offered(reply, node, ip, boot, note)


def _request(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    server_id = req.server_id
    leases = ctx.directory.leases
    if server_id is not None and server_id != ctx.settings.server:
        if leases is not None:
            leases.forget_offer(mac)
        return NotForUs(server_id, req.requested_ip)
    node = ctx.directory.resolve(mac)
    if node is None:
        return UnknownMac(mac, MessageType.REQUEST)
    wanted = req.requested_ip if req.ciaddr == ZERO else req.ciaddr
    if wanted is None:
        return Dropped("REQUEST names no address", node)
    if server_id is None and req.ciaddr != ZERO and req.requested_ip is None:
        state = RequestState.RENEWING
    elif server_id is None:
        state = RequestState.INIT_REBOOT
    else:
        state = RequestState.SELECTING

    if wanted not in ctx.settings.subnet:
        return _nak(req, node, ctx, f"{state}: {wanted} is not on {ctx.settings.subnet}")
    if node.ip is not None:
        if wanted != node.ip:
            return _nak(req, node, ctx, f"{state}: {wanted} requested, {node.ip} is reserved")
    elif leases is None or not leases.is_free_for(wanted, mac, now):
        return _nak(req, node, ctx, f"{state}: {wanted} is not available to {mac}")
    else:
        leases.bind(mac, wanted, now, ctx.settings.lease_time, node.name)
    reply, boot, note = _answer(req, MessageType.ACK, node, wanted, ctx)
    return Acked(reply, node, wanted, state, boot, note)


def _release(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    node = ctx.directory.resolve(mac)
    leases = ctx.directory.leases
    if leases is not None and req.ciaddr in leases:
        released = leases.release(mac, req.ciaddr, now)
        return Released(node, req.ciaddr, released,
                        "released" if released else "no such lease")
    return Released(node, req.ciaddr, False, "reserved address, kept")


def _decline(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    node = ctx.directory.resolve(mac)
    ip = req.requested_ip
    if ip is None:
        return Dropped("DECLINE without requested address", node)
    leases = ctx.directory.leases
    if leases is not None and ip in leases:
        quarantined = leases.decline(mac, ip, now)
        return Declined(node, ip, "address quarantined" if quarantined
                        else "not this client's lease")
    return Declined(node, ip, "reserved address is in use by another host: address conflict")


def _inform(req: DhcpPacket, mac: str, ctx: DhcpContext, now: float) -> Outcome:
    if req.ciaddr == ZERO or req.ciaddr not in ctx.settings.subnet:
        return Dropped(f"INFORM from {req.ciaddr}, not on our subnet")
    node = ctx.directory.resolve(mac)
    reply, boot, note = _answer(req, MessageType.ACK, node, None, ctx)
    return Informed(reply, node, req.ciaddr, boot, note)


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


def _nak(req: DhcpPacket, node: NodeProfile, ctx: DhcpContext, why: str) -> Nakked:
    reply = _base_reply(req, MessageType.NAK, ctx)
    reply.options[Opt.MESSAGE] = why.encode()[:255]
    return Nakked(_destination(req, reply, nak=True), node, req.requested_ip, why)


def _answer(req: DhcpPacket, mtype: MessageType, node: NodeProfile | None,
            ip: IPv4Address | None, ctx: DhcpContext,
            ) -> tuple[Reply, BootAnswer | None, str]:
    """OFFER or ACK (ip set) or ACK to INFORM (ip None): addresses, options, boot file.
    Returns the reply, the boot program chosen and a note on why there is none."""
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
    note = ""
    if node is not None:
        answer = boot_answer(req, node.boot, str(s.server), s.http_port)
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
