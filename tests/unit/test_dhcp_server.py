"""DHCP decisions: one test per RFC 2131 branch and per firmware answer."""

from __future__ import annotations

import struct
import textwrap
from ipaddress import IPv4Address

import pytest

from bootd.dhcp.decide import BROADCAST, DhcpContext, DhcpSettings, decide
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
    RequestState,
    UnknownMac,
)
from bootd.dhcp.packet import (
    BOOTREPLY,
    BOOTREQUEST,
    FLAG_BROADCAST,
    DhcpPacket,
    MessageType,
    decode,
    encode,
)
from bootd.fleet.config import parse_config
from bootd.fleet.directory import NodeDirectory
from bootd.fleet.inventory import Inventory
from bootd.state.leases import LeaseState

CONFIG = textwrap.dedent("""\
    server: {interfaces: [br0], address: 10.0.0.1, http_port: 8080}
    network: {subnet: 10.0.0.0/24, gateway: 10.0.0.254, dns: [10.0.0.1, 10.0.0.2],
              domain: lab.example, lease_time: 1h}
    tags:
      ntp: {dhcp_options: {ntp-servers: 10.0.0.3}}
      efi: {boot: {efi64: ipxe.efi}}
      script: {boot: {ipxe_script: "http://10.0.0.9/custom.ipxe"}}
    pools:
      - name: w
        tags: [ntp]
        nodes:
          - {name: n1, mac: ["02:00:00:00:00:01", "02:00:00:00:00:11"], ip: 10.0.0.5}
          - {name: n2, mac: "02:00:00:00:00:02", ip: 10.0.0.6, tags: [efi]}
          - {name: n3, mac: "02:00:00:00:00:03", ip: 10.0.0.7, tags: [script]}
      - name: any
        dynamic: {range: 10.0.0.100-10.0.0.101}
    """)
N1 = "02:00:00:00:00:01"
UNKNOWN = "52:54:00:00:00:99"
SERVER = IPv4Address("10.0.0.1")


def ctx(config: str = CONFIG) -> DhcpContext:
    cfg = parse_config(config)
    inv = Inventory(cfg)
    return DhcpContext(NodeDirectory.build(inv), DhcpSettings.from_config(cfg))


def pkt(mtype: MessageType, mac: str = N1, **kw: object) -> DhcpPacket:
    options: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes((mtype,))}
    extra = kw.pop("options", {})
    assert isinstance(extra, dict)
    options.update(extra)
    return DhcpPacket(op=BOOTREQUEST, xid=0x1234, chaddr=bytes.fromhex(mac.replace(":", "")),
                      options=options, **kw)  # type: ignore[arg-type]


def ip(text: str) -> bytes:
    return IPv4Address(text).packed


def answer(outcome: Outcome) -> DhcpPacket:
    assert isinstance(outcome, Offered | Acked | Informed | Nakked), outcome
    # every reply must survive the wire
    return decode(encode(outcome.reply.packet, outcome.reply.max_size))


# -- DISCOVER


def test_discover_reserved_node_gets_offer_with_network_options() -> None:
    out = decide(pkt(MessageType.DISCOVER), ctx(), 0)
    assert isinstance(out, Offered) and out.node is not None and out.node.name == "n1"
    r = answer(out)
    assert r.op == BOOTREPLY and r.xid == 0x1234
    assert r.message_type is MessageType.OFFER
    assert r.yiaddr == IPv4Address("10.0.0.5") and r.siaddr == SERVER
    o = r.options
    assert o[Opt.SERVER_ID] == ip("10.0.0.1")
    assert o[Opt.SUBNET_MASK] == ip("255.255.255.0")
    assert o[Opt.ROUTER] == ip("10.0.0.254")
    assert o[Opt.DNS] == ip("10.0.0.1") + ip("10.0.0.2")
    assert o[Opt.HOSTNAME] == b"n1" and o[Opt.DOMAIN_NAME] == b"lab.example"
    assert o[Opt.LEASE_TIME] == struct.pack("!I", 3600)
    assert o[Opt.RENEWAL_TIME] == struct.pack("!I", 1800)
    assert o[Opt.REBINDING_TIME] == struct.pack("!I", 3150)
    assert o[Opt.BROADCAST] == ip("10.0.0.255")
    assert o[Opt.NTP_SERVERS] == ip("10.0.0.3")  # from the pool's tag
    assert r.file == b"" and Opt.BOOTFILE_NAME not in o  # a plain OS client


def test_second_mac_of_node_gets_same_address() -> None:
    out = decide(pkt(MessageType.DISCOVER, mac="02:00:00:00:00:11"), ctx(), 0)
    r = answer(out)
    assert r.yiaddr == IPv4Address("10.0.0.5") and r.options[Opt.HOSTNAME] == b"n1"


def test_message_type_then_server_id_then_requested_order() -> None:
    prl = bytes([Opt.HOSTNAME, Opt.DNS, Opt.SUBNET_MASK])
    r = answer(decide(pkt(MessageType.DISCOVER, options={Opt.PARAMETER_REQUEST_LIST: prl}),
                      ctx(), 0))
    codes = list(r.options)
    assert codes[:5] == [Opt.MESSAGE_TYPE, Opt.SERVER_ID, Opt.HOSTNAME, Opt.DNS,
                         Opt.SUBNET_MASK]


def test_unknown_mac_without_catch_all_gets_nothing() -> None:
    config = CONFIG.split("  - name: any")[0]
    out = decide(pkt(MessageType.DISCOVER, mac=UNKNOWN), ctx(config), 0)
    assert isinstance(out, UnknownMac)
    assert out.mac == UNKNOWN and out.message_type is MessageType.DISCOVER
    out = decide(pkt(MessageType.REQUEST, mac=UNKNOWN,
                     options={Opt.REQUESTED_IP: ip("10.0.0.50")}), ctx(config), 0)
    assert isinstance(out, UnknownMac)


def test_catch_all_offers_range_address_and_generated_name() -> None:
    c = ctx()
    r = answer(decide(pkt(MessageType.DISCOVER, mac=UNKNOWN), c, 0))
    assert r.yiaddr == IPv4Address("10.0.0.100")
    assert r.options[Opt.HOSTNAME] == b"node-52-54-00-00-00-99"
    assert Opt.NTP_SERVERS not in r.options  # catch-all pool has no ntp tag


def test_range_exhausted_is_silent() -> None:
    c = ctx()
    decide(pkt(MessageType.DISCOVER, mac="52:54:00:00:00:01"), c, 0)
    decide(pkt(MessageType.DISCOVER, mac="52:54:00:00:00:02"), c, 0)
    out = decide(pkt(MessageType.DISCOVER, mac="52:54:00:00:00:03"), c, 0)
    assert isinstance(out, Exhausted) and out.node.pool == "any"


# -- firmware -> boot answer


def boot(mac: str = N1, **options: bytes) -> DhcpPacket:
    opts = {int(k[1:]): v for k, v in options.items()}
    return answer(decide(pkt(MessageType.DISCOVER, mac=mac, options=opts), ctx(), 0))


@pytest.mark.parametrize(("arch", "expected"), [
    (0, b"undionly.kpxe"), (6, b"snponly-i386.efi"), (7, b"snponly.efi"), (9, b"snponly.efi"),
    (11, b"snponly-arm64.efi"),
])
def test_pxe_arch_selects_ipxe_build(arch: int, expected: bytes) -> None:
    r = boot(o93=struct.pack("!H", arch),
             o60=f"PXEClient:Arch:{arch:05d}:UNDI:003000".encode())
    assert r.file == expected
    assert r.options[Opt.BOOTFILE_NAME] == expected
    assert r.siaddr == SERVER
    assert r.options[Opt.VENDOR_CLASS] == b"PXEClient"
    assert r.options[Opt.VENDOR_SPECIFIC] == b"\x06\x01\x08\xff"
    assert r.options[Opt.TFTP_SERVER_NAME] == b"10.0.0.1"


def test_arch_from_vendor_class_alone() -> None:
    r = boot(o60=b"PXEClient:Arch:00007:UNDI:003000")
    assert r.file == b"snponly.efi"


def test_pxe_without_arch_is_bios() -> None:
    assert boot(o60=b"PXEClient").file == b"undionly.kpxe"


def test_boot_file_override_per_tag() -> None:
    r = boot(mac="02:00:00:00:00:02", o93=b"\x00\x07", o60=b"PXEClient:Arch:00007")
    assert r.file == b"ipxe.efi"


@pytest.mark.parametrize(("arch", "path"), [
    (16, "snponly.efi"), (15, "snponly-i386.efi"), (19, "snponly-arm64.efi")])
def test_uefi_http_boot_gets_url_and_httpclient(arch: int, path: str) -> None:
    r = boot(o93=struct.pack("!H", arch), o60=f"HTTPClient:Arch:{arch:05d}".encode())
    assert r.options[Opt.BOOTFILE_NAME] == f"http://10.0.0.1:8080/boot/{path}".encode()
    assert r.options[Opt.VENDOR_CLASS] == b"HTTPClient"


def test_unsupported_arch_gets_address_without_boot_file() -> None:
    out = decide(pkt(MessageType.DISCOVER, options={Opt.CLIENT_ARCH: b"\x00\x0a"}), ctx(), 0)
    r = answer(out)
    assert r.yiaddr == IPv4Address("10.0.0.5") and r.file == b""
    assert "architecture 10" in out.note


@pytest.mark.parametrize("user_class", [b"iPXE", b"\x04iPXE"])
def test_ipxe_gets_script_url_not_itself(user_class: bytes) -> None:
    r = boot(o77=user_class, o93=b"\x00\x00", o60=b"PXEClient:Arch:00000")
    assert r.options[Opt.BOOTFILE_NAME] == b"http://10.0.0.1:8080/boot.ipxe"
    assert r.file == b"http://10.0.0.1:8080/boot.ipxe"
    assert r.options[Opt.IPXE_ENCAP] == b"\xb0\x01\x01"  # no-pxedhcp
    assert Opt.VENDOR_SPECIFIC not in r.options


def test_ipxe_script_override() -> None:
    r = boot(mac="02:00:00:00:00:03", o77=b"iPXE")
    assert r.options[Opt.BOOTFILE_NAME] == b"http://10.0.0.9/custom.ipxe"


def test_long_boot_url_only_in_option_67() -> None:
    config = CONFIG.replace("http://10.0.0.9/custom.ipxe", "http://10.0.0.9/" + "x" * 150)
    r = answer(decide(pkt(MessageType.DISCOVER, mac="02:00:00:00:00:03",
                          options={Opt.USER_CLASS: b"iPXE"}), ctx(config), 0))
    assert r.file == b""
    assert len(r.options[Opt.BOOTFILE_NAME]) > 150


# -- REQUEST


def test_selecting_our_offer_is_acked() -> None:
    c = ctx()
    out = decide(pkt(MessageType.REQUEST, options={
        Opt.SERVER_ID: ip("10.0.0.1"), Opt.REQUESTED_IP: ip("10.0.0.5")}), c, 0)
    assert isinstance(out, Acked) and out.state is RequestState.SELECTING
    r = answer(out)
    assert r.message_type is MessageType.ACK and r.yiaddr == IPv4Address("10.0.0.5")


def test_selecting_other_server_is_ignored_and_offer_freed() -> None:
    c = ctx()
    decide(pkt(MessageType.DISCOVER, mac=UNKNOWN), c, 0)
    assert c.directory.leases is not None and c.directory.leases.lookup(UNKNOWN) is not None
    out = decide(pkt(MessageType.REQUEST, mac=UNKNOWN, options={
        Opt.SERVER_ID: ip("10.0.0.77"), Opt.REQUESTED_IP: ip("10.0.0.100")}), c, 0)
    assert isinstance(out, NotForUs) and out.server_id == IPv4Address("10.0.0.77")
    assert c.directory.leases.lookup(UNKNOWN) is None


def test_request_for_wrong_reserved_address_is_naked_by_broadcast() -> None:
    out = decide(pkt(MessageType.REQUEST, options={
        Opt.SERVER_ID: ip("10.0.0.1"), Opt.REQUESTED_IP: ip("10.0.0.50")}), ctx(), 0)
    assert isinstance(out, Nakked)
    assert out.reply is not None and out.reply.dest == BROADCAST and out.reply.port == 68
    r = answer(out)
    assert r.message_type is MessageType.NAK and r.yiaddr == IPv4Address(0)
    assert Opt.LEASE_TIME not in r.options and b"10.0.0.5 is reserved" in r.options[Opt.MESSAGE]


def test_init_reboot() -> None:
    c = ctx()
    ok = decide(pkt(MessageType.REQUEST, options={Opt.REQUESTED_IP: ip("10.0.0.5")}), c, 0)
    assert isinstance(ok, Acked) and ok.state is RequestState.INIT_REBOOT
    moved = decide(pkt(MessageType.REQUEST, options={Opt.REQUESTED_IP: ip("192.168.1.5")}), c, 0)
    assert isinstance(moved, Nakked) and "not on default (10.0.0.0/24)" in moved.reason


def test_renewing_unicast_to_ciaddr() -> None:
    out = decide(pkt(MessageType.REQUEST, ciaddr=IPv4Address("10.0.0.5")), ctx(), 0)
    assert isinstance(out, Acked) and out.state is RequestState.RENEWING
    assert out.reply is not None
    assert out.reply.dest == IPv4Address("10.0.0.5") and not out.reply.hw_unicast


def test_request_without_address_is_dropped() -> None:
    out = decide(pkt(MessageType.REQUEST), ctx(), 0)
    assert isinstance(out, Dropped)


def test_dynamic_discover_request_binds_lease() -> None:
    c = ctx()
    decide(pkt(MessageType.DISCOVER, mac=UNKNOWN), c, 0)
    out = decide(pkt(MessageType.REQUEST, mac=UNKNOWN, options={
        Opt.SERVER_ID: ip("10.0.0.1"), Opt.REQUESTED_IP: ip("10.0.0.100")}), c, 5)
    assert isinstance(out, Acked)
    assert c.directory.leases is not None
    lease = c.directory.leases.lookup(UNKNOWN)
    assert lease is not None and lease.state is LeaseState.BOUND and lease.expires == 3605
    assert lease.hostname == "node-52-54-00-00-00-99"
    assert len(c.directory.leases.drain_changes()) == 1


def test_dynamic_request_for_someone_elses_address_is_naked() -> None:
    c = ctx()
    decide(pkt(MessageType.DISCOVER, mac=UNKNOWN), c, 0)
    decide(pkt(MessageType.REQUEST, mac=UNKNOWN,
               options={Opt.REQUESTED_IP: ip("10.0.0.100")}), c, 0)
    out = decide(pkt(MessageType.REQUEST, mac="52:54:00:00:00:98",
                     options={Opt.REQUESTED_IP: ip("10.0.0.100")}), c, 1)
    assert isinstance(out, Nakked)
    out = decide(pkt(MessageType.REQUEST, mac="52:54:00:00:00:98",
                     options={Opt.REQUESTED_IP: ip("10.0.0.5")}), c, 1)  # reserved
    assert isinstance(out, Nakked)


def test_init_reboot_into_free_range_address_is_acked_authoritatively() -> None:
    c = ctx()
    out = decide(pkt(MessageType.REQUEST, mac=UNKNOWN,
                     options={Opt.REQUESTED_IP: ip("10.0.0.101")}), c, 0)
    assert isinstance(out, Acked)


# -- RELEASE, DECLINE, INFORM


def test_release_frees_dynamic_lease_without_reply() -> None:
    c = ctx()
    decide(pkt(MessageType.REQUEST, mac=UNKNOWN,
               options={Opt.REQUESTED_IP: ip("10.0.0.100")}), c, 0)
    out = decide(pkt(MessageType.RELEASE, mac=UNKNOWN, ciaddr=IPv4Address("10.0.0.100")), c, 1)
    assert isinstance(out, Released) and out.released and out.reason == "released"
    assert c.directory.leases is not None
    lease = c.directory.leases.lookup(UNKNOWN)
    assert lease is not None and lease.state is LeaseState.RELEASED
    out = decide(pkt(MessageType.RELEASE, ciaddr=IPv4Address("10.0.0.5")), c, 1)
    assert isinstance(out, Released) and out.reason == "reserved address, kept"


def test_decline_quarantines_address() -> None:
    c = ctx()
    decide(pkt(MessageType.REQUEST, mac=UNKNOWN,
               options={Opt.REQUESTED_IP: ip("10.0.0.100")}), c, 0)
    out = decide(pkt(MessageType.DECLINE, mac=UNKNOWN,
                     options={Opt.REQUESTED_IP: ip("10.0.0.100")}), c, 1)
    assert isinstance(out, Declined) and "quarantined" in out.reason
    r = answer(decide(pkt(MessageType.DISCOVER, mac=UNKNOWN), c, 2))
    assert r.yiaddr == IPv4Address("10.0.0.101")
    out = decide(pkt(MessageType.DECLINE, options={Opt.REQUESTED_IP: ip("10.0.0.5")}), c, 1)
    assert isinstance(out, Declined) and "conflict" in out.reason
    assert isinstance(decide(pkt(MessageType.DECLINE), c, 1), Dropped)


def test_inform_acked_without_lease() -> None:
    out = decide(pkt(MessageType.INFORM, ciaddr=IPv4Address("10.0.0.5")), ctx(), 0)
    assert isinstance(out, Informed)
    assert out.reply is not None and out.reply.dest == IPv4Address("10.0.0.5")
    r = answer(out)
    assert r.message_type is MessageType.ACK
    assert r.yiaddr == IPv4Address(0) and r.ciaddr == IPv4Address("10.0.0.5")
    assert Opt.LEASE_TIME not in r.options and Opt.DNS in r.options
    assert isinstance(decide(pkt(MessageType.INFORM), ctx(), 0), Dropped)


# -- addressing (RFC 2131 4.1), relays, hygiene


def test_broadcast_flag_means_broadcast_reply() -> None:
    out = decide(pkt(MessageType.DISCOVER, flags=FLAG_BROADCAST), ctx(), 0)
    assert out.reply is not None and out.reply.dest == BROADCAST and not out.reply.hw_unicast


def test_no_broadcast_flag_means_unicast_to_new_address() -> None:
    out = decide(pkt(MessageType.DISCOVER), ctx(), 0)
    assert out.reply is not None
    assert out.reply.dest == IPv4Address("10.0.0.5") and out.reply.hw_unicast


def test_relayed_request_answered_to_relay_with_agent_info_echoed_last() -> None:
    out = decide(pkt(MessageType.DISCOVER, giaddr=IPv4Address("10.0.0.250"), hops=1,
                     options={Opt.RELAY_AGENT_INFO: b"\x01\x04port"}), ctx(), 0)
    assert out.reply is not None
    assert out.reply.dest == IPv4Address("10.0.0.250") and out.reply.port == 67
    r = answer(out)
    assert r.giaddr == IPv4Address("10.0.0.250")
    assert list(r.options)[-1] == Opt.RELAY_AGENT_INFO
    assert r.options[Opt.RELAY_AGENT_INFO] == b"\x01\x04port"


def test_relayed_nak_sets_broadcast_bit() -> None:
    out = decide(pkt(MessageType.REQUEST, giaddr=IPv4Address("10.0.0.250"),
                     options={Opt.REQUESTED_IP: ip("10.0.0.9")}), ctx(), 0)
    assert isinstance(out, Nakked) and out.reply is not None
    assert out.reply.dest == IPv4Address("10.0.0.250")
    assert out.reply.packet.flags & FLAG_BROADCAST


@pytest.mark.parametrize(("packet", "why"), [
    (DhcpPacket(op=BOOTREPLY, options={53: b"\x02"}), "BOOTREQUEST"),
    (DhcpPacket(op=BOOTREQUEST, htype=6, options={53: b"\x01"}), "hardware type"),
    (DhcpPacket(op=BOOTREQUEST, chaddr=bytes(6)), "message type"),
    (DhcpPacket(op=BOOTREQUEST, hops=17, chaddr=bytes(6), options={53: b"\x01"}), "hops"),
    (DhcpPacket(op=BOOTREQUEST, chaddr=bytes(6), options={53: b"\x02"}), "server message"),
])
def test_drops(packet: DhcpPacket, why: str) -> None:
    out = decide(packet, ctx(), 0)
    assert isinstance(out, Dropped) and why in out.reason


def test_reply_fits_client_max_message_size() -> None:
    big = {f"{code}": f"hex:{'ab' * 80}" for code in range(200, 210)}
    config = CONFIG.replace("ntp: {dhcp_options: {ntp-servers: 10.0.0.3}}",
                            "ntp: {dhcp_options: " + str(big).replace("'", '"') + "}")
    out = decide(pkt(MessageType.DISCOVER), ctx(config), 0)
    assert out.reply is not None
    data = encode(out.reply.packet, out.reply.max_size)
    assert len(data) <= 576 - 28
    r = decode(data)
    assert r.options[Opt.HOSTNAME] == b"n1"  # essentials kept, extras dropped from the end
    out = decide(pkt(MessageType.DISCOVER, options={Opt.MAX_MESSAGE_SIZE: b"\x05\xdc"}),
                 ctx(config), 0)
    assert out.reply is not None
    assert all(c in decode(encode(out.reply.packet, out.reply.max_size)).options
               for c in range(200, 210))
