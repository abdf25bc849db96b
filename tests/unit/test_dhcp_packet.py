"""DHCP codec: round trips, scapy as an independent peer, malformed input, overload."""

from __future__ import annotations

import struct
import warnings
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootd.dhcp.options import Opt
from bootd.dhcp.packet import (
    BOOTP_MIN_LEN,
    BOOTREPLY,
    BOOTREQUEST,
    MAGIC_COOKIE,
    DhcpError,
    DhcpPacket,
    MessageType,
    decode,
    encode,
    encode_sub_options,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from scapy.layers.dhcp import BOOTP, DHCP, DHCPRevOptions
    from scapy.packet import Raw, raw

MAC = bytes.fromhex("020000000127")


def request(**opts: bytes) -> DhcpPacket:
    options = {Opt.MESSAGE_TYPE: b"\x01", **{int(k[1:]): v for k, v in opts.items()}}
    return DhcpPacket(op=BOOTREQUEST, xid=0xCAFE, chaddr=MAC, options=options)


def header(op: int = BOOTREQUEST, hlen: int = 6, sname: bytes = b"", file: bytes = b"") -> bytes:
    return struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, hlen, 0, 1, 0, 0, b"", b"", b"",
                       b"", MAC, sname, file)


# -- round trips


def test_round_trip_keeps_every_field() -> None:
    pkt = DhcpPacket(
        op=BOOTREPLY, xid=0xDEADBEEF, hops=2, secs=7, flags=0x8000,
        ciaddr=IPv4Address("10.0.0.9"), yiaddr=IPv4Address("10.0.0.5"),
        siaddr=IPv4Address("10.0.0.1"), giaddr=IPv4Address("10.0.0.254"), chaddr=MAC,
        sname=b"bootd", file=b"undionly.kpxe",
        options={53: b"\x05", 54: bytes([10, 0, 0, 1]), 12: b"m1c27", 200: b""},
    )
    back = decode(encode(pkt))
    assert back == DhcpPacket(**{**{f: getattr(pkt, f) for f in pkt.__slots__},
                                 "chaddr": MAC.ljust(16, b"\0")})


def test_reply_padded_to_bootp_minimum() -> None:
    data = encode(DhcpPacket(op=BOOTREPLY, options={53: b"\x02"}))
    assert len(data) == BOOTP_MIN_LEN
    assert data[236:240] == MAGIC_COOKIE


def test_typed_views() -> None:
    pkt = request(
        o55=bytes([1, 3, 6, 67]), o57=struct.pack("!H", 1500), o60=b"PXEClient:Arch:00007",
        o93=b"\x00\x07\x00\x09", o94=b"\x01\x03\x10", o97=b"\x00" + bytes(range(16)),
        o12=b"host", o50=bytes([10, 0, 0, 5]), o54=bytes([10, 0, 0, 1]),
    )
    assert pkt.message_type is MessageType.DISCOVER
    assert pkt.mac == "02:00:00:00:01:27"
    assert pkt.parameter_request_list == bytes([1, 3, 6, 67])
    assert pkt.max_message_size == 1500
    assert pkt.vendor_class == "PXEClient:Arch:00007"
    assert pkt.client_arch == 7
    assert pkt.client_ndi == (1, 3, 16)
    assert pkt.client_uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert pkt.hostname == "host"
    assert pkt.requested_ip == IPv4Address("10.0.0.5")
    assert pkt.server_id == IPv4Address("10.0.0.1")
    assert not pkt.broadcast and not pkt.is_ipxe


def test_typed_views_tolerate_bad_lengths() -> None:
    pkt = request(o53=b"\x01\x02", o57=b"\x01", o93=b"\x07", o94=b"\x01", o97=b"\x01" * 17,
                  o50=b"\x01\x02")
    assert pkt.message_type is None
    assert pkt.max_message_size == 576
    assert pkt.client_arch is None and pkt.client_ndi is None and pkt.client_uuid is None
    assert pkt.requested_ip is None
    assert request(o53=b"\x09").message_type is None
    assert request(o57=struct.pack("!H", 300)).max_message_size == 576


@pytest.mark.parametrize(("raw77", "classes", "ipxe"), [
    (b"iPXE", [b"iPXE"], True),
    (b"\x04iPXE", [b"iPXE"], True),
    (b"\x03abc\x04iPXE", [b"abc", b"iPXE"], True),
    (b"\x05abc", [b"\x05abc"], False),
    (b"\x00abc", [b"\x00abc"], False),
    (b"", [], False),
])
def test_user_class_framing(raw77: bytes, classes: list[bytes], ipxe: bool) -> None:
    pkt = request(o77=raw77)
    assert pkt.user_classes == classes
    assert pkt.is_ipxe is ipxe


def test_ipxe_detected_by_option_175() -> None:
    assert request(o175=b"\xb1\x05\x01\x00\x00\x00\x00").is_ipxe


def test_non_ethernet_hardware_is_an_error() -> None:
    with pytest.raises(DhcpError, match="hardware type"):
        _ = DhcpPacket(op=1, htype=6, hlen=6).mac


# -- malformed input


@pytest.mark.parametrize(("data", "message"), [
    (b"", "too short"),
    (b"\x01" * 239, "too short"),
    (header(op=3) + MAGIC_COOKIE, "bad op"),
    (header(hlen=17) + MAGIC_COOKIE, "hardware address length"),
    (header() + b"\x00\x00\x00\x00", "magic cookie"),
    (header() + MAGIC_COOKIE + b"\x35", "no length byte"),
    (header() + MAGIC_COOKIE + b"\x35\x05\x01", "overruns"),
    (header() + MAGIC_COOKIE + b"\x34\x01\x04\xff", "overload"),
    (header() + MAGIC_COOKIE + b"\x34\x02\x01\x01\xff", "overload"),
    (header(file=b"\x0c\xa0ab") + MAGIC_COOKIE + b"\x34\x01\x01\xff", "in file"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed(data: bytes, message: str) -> None:
    with pytest.raises(DhcpError, match=message):
        decode(data)


def test_options_without_end_and_with_padding_are_accepted() -> None:
    pkt = decode(header() + MAGIC_COOKIE + b"\x00\x00\x35\x01\x03\x00\x0c\x01a")
    assert pkt.options == {53: b"\x03", 12: b"a"}


def test_data_after_end_is_ignored() -> None:
    pkt = decode(header() + MAGIC_COOKIE + b"\x35\x01\x03\xff\x0c\x50garbage")
    assert pkt.options == {53: b"\x03"}


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_only_dhcp_error(tail: bytes) -> None:
    for data in (tail, header() + MAGIC_COOKIE + tail, header(file=tail[:128]) + MAGIC_COOKIE
                 + b"\x34\x01\x03" + tail):
        try:
            pkt = decode(data)
        except DhcpError:
            continue
        # whatever decodes must re-encode without error
        encode(DhcpPacket(**{**{f: getattr(pkt, f) for f in pkt.__slots__},
                             "sname": pkt.sname[:63], "file": pkt.file[:127]}))


# -- RFC 3396 long options, RFC 2132 overload


def test_long_option_split_and_concatenated() -> None:
    value = bytes(range(256)) * 2  # 512 bytes
    data = encode(DhcpPacket(op=BOOTREPLY, options={53: b"\x05", 120: value}), max_size=1500)
    assert data.count(b"\x78\xff") == 2  # two 255-byte chunks and one of 2
    assert decode(data).options[120] == value


def test_decode_overloaded_file_and_sname() -> None:
    file_area = b"\x0c\x04host\x0f\x03lab\xff"
    sname_area = b"\x2a\x04\x0a\x00\x00\x01\xff"
    data = header(sname=sname_area, file=file_area) + MAGIC_COOKIE + b"\x35\x01\x05\x34\x01\x03\xff"
    pkt = decode(data)
    assert pkt.options[12] == b"host" and pkt.options[15] == b"lab"
    assert pkt.options[42] == bytes([10, 0, 0, 1])
    assert pkt.file == b"" and pkt.sname == b""


def test_encode_overloads_when_options_do_not_fit() -> None:
    opts = {53: b"\x05", 54: b"\x0a\x00\x00\x01"}
    opts.update({code: bytes([code]) * 60 for code in range(200, 210)})  # 620 bytes
    pkt = DhcpPacket(op=BOOTREPLY, options=opts)
    data = encode(pkt, max_size=576)
    assert len(data) <= 576 - 28
    back = decode(data)
    assert back.options[52] in (b"\x01", b"\x03")
    kept = [c for c in range(200, 210) if c in back.options]
    assert kept == list(range(200, 200 + len(kept)))  # dropped from the end only
    assert len(kept) >= 6
    for c in kept:
        assert back.options[c] == opts[c]
    assert back.options[53] == b"\x05"


def test_encode_does_not_overload_a_used_file_field() -> None:
    opts = {53: b"\x05"}
    opts.update({code: bytes([code]) * 60 for code in range(200, 210)})
    pkt = DhcpPacket(op=BOOTREPLY, file=b"snponly.efi", options=opts)
    back = decode(encode(pkt, max_size=576))
    assert back.file == b"snponly.efi"
    assert back.options.get(52, b"\x02") == b"\x02"


def test_bigger_max_size_keeps_everything_in_options() -> None:
    opts = {53: b"\x05", **{code: bytes([code]) * 60 for code in range(200, 210)}}
    data = encode(DhcpPacket(op=BOOTREPLY, options=opts), max_size=1500)
    back = decode(data)
    assert 52 not in back.options
    assert all(back.options[c] == v for c, v in opts.items())


def test_sname_file_too_long() -> None:
    with pytest.raises(ValueError):
        encode(DhcpPacket(op=BOOTREPLY, file=b"x" * 128))


def test_sub_options() -> None:
    assert encode_sub_options([(6, b"\x08")]) == b"\x06\x01\x08\xff"
    assert encode_sub_options([(176, b"\x01")], terminate=False) == b"\xb0\x01\x01"


# -- scapy as an independent peer

# options scapy represents losslessly, with value strategies of valid length
_IP = st.binary(min_size=4, max_size=4)
_TEXT = st.binary(min_size=1, max_size=40)


def _exact(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


OPTION_VALUES = {
    1: _IP, 3: _IP, 6: _IP, 12: _TEXT, 15: _TEXT, 43: _TEXT, 50: _IP, 51: _exact(4),
    53: st.integers(1, 8).map(lambda n: bytes([n])), 54: _IP,
    55: st.binary(min_size=1, max_size=20), 57: st.integers(576, 65535).map(
        lambda n: struct.pack("!H", n)), 60: _TEXT, 61: _TEXT, 66: _TEXT, 67: _TEXT, 77: _TEXT,
    82: _TEXT, 93: _exact(2), 97: _exact(17), 210: _TEXT, 224: _TEXT,
}

options_strategy = st.lists(st.sampled_from(sorted(OPTION_VALUES)), unique=True,
                            max_size=10).flatmap(
    lambda codes: st.tuples(*[OPTION_VALUES[c] for c in codes]).map(
        lambda values: dict(zip(codes, values, strict=True))))


def scapy_option_bytes(item: object) -> tuple[int, bytes]:
    """Encode one option as scapy decoded it, with scapy, to compare on the wire level."""
    if isinstance(item, tuple) and isinstance(item[0], int):
        return item[0], bytes(item[1])
    assert isinstance(item, tuple)
    name = item[0]
    code = DHCPRevOptions[name][0]
    wire = raw(DHCP(options=[item, "end"]))
    assert wire[0] == code
    return code, wire[2 : 2 + wire[1]]


packets = st.builds(
    DhcpPacket,
    op=st.sampled_from([BOOTREQUEST, BOOTREPLY]),
    xid=st.integers(0, 2**32 - 1),
    hops=st.integers(0, 255),
    secs=st.integers(0, 65535),
    flags=st.sampled_from([0, 0x8000]),
    ciaddr=st.integers(0, 2**32 - 1).map(IPv4Address),
    yiaddr=st.integers(0, 2**32 - 1).map(IPv4Address),
    siaddr=st.integers(0, 2**32 - 1).map(IPv4Address),
    giaddr=st.integers(0, 2**32 - 1).map(IPv4Address),
    chaddr=st.binary(min_size=6, max_size=6),
    sname=st.binary(max_size=63).map(lambda b: b.replace(b"\0", b"x")),
    file=st.binary(max_size=127).map(lambda b: b.replace(b"\0", b"x")),
    options=options_strategy,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets)
def test_scapy_decodes_what_we_encode(pkt: DhcpPacket) -> None:
    data = encode(pkt, max_size=1500)
    s = BOOTP(data)
    assert (s.op, s.xid, s.hops, s.secs, s.flags) == (pkt.op, pkt.xid, pkt.hops, pkt.secs,
                                                      pkt.flags)
    assert (s.ciaddr, s.yiaddr, s.siaddr, s.giaddr) == tuple(
        str(a) for a in (pkt.ciaddr, pkt.yiaddr, pkt.siaddr, pkt.giaddr))
    assert s.chaddr[:6] == pkt.chaddr
    assert s.sname.rstrip(b"\0") == pkt.sname and s.file.rstrip(b"\0") == pkt.file
    if DHCP not in s:
        assert not pkt.options
        return
    got = [scapy_option_bytes(o) for o in s[DHCP].options if o not in ("end", "pad")]
    assert got == list(pkt.options.items())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets)
def test_we_decode_what_scapy_builds(pkt: DhcpPacket) -> None:
    sc = BOOTP(op=pkt.op, xid=pkt.xid, hops=pkt.hops, secs=pkt.secs, flags=pkt.flags,
               ciaddr=str(pkt.ciaddr), yiaddr=str(pkt.yiaddr), siaddr=str(pkt.siaddr),
               giaddr=str(pkt.giaddr), chaddr=pkt.chaddr, sname=pkt.sname, file=pkt.file)
    sc = sc / DHCP(options=[*[(code, value) for code, value in pkt.options.items()], "end"])
    data = raw(sc)
    ours = decode(data)
    assert (ours.op, ours.xid, ours.hops, ours.secs, ours.flags) == (
        pkt.op, pkt.xid, pkt.hops, pkt.secs, pkt.flags)
    assert (ours.ciaddr, ours.yiaddr, ours.siaddr, ours.giaddr) == (
        pkt.ciaddr, pkt.yiaddr, pkt.siaddr, pkt.giaddr)
    assert ours.chaddr[:6] == pkt.chaddr
    assert ours.sname == pkt.sname and ours.file == pkt.file
    assert ours.options == pkt.options


def test_scapy_reference_discover_decodes() -> None:
    """A PXE DISCOVER as scapy spells it, by option names."""
    sc = BOOTP(chaddr=MAC, xid=42, flags=0x8000) / DHCP(options=[
        ("message-type", "discover"), ("param_req_list", [1, 3, 43, 60, 66, 67]),
        ("max_dhcp_size", 1464), ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
        ("pxe_client_architecture", b"\x00\x00"), ("pxe_client_network_interface", b"\x01\x02\x01"),
        ("pxe_client_machine_identifier", b"\x00" + bytes(16)), "end"])
    pkt = decode(raw(sc) + bytes(Raw(b"\0" * 10)))
    assert pkt.message_type is MessageType.DISCOVER
    assert pkt.broadcast and pkt.max_message_size == 1464
    assert pkt.client_arch == 0 and pkt.client_ndi == (1, 2, 1)
    assert pkt.vendor_class.startswith("PXEClient")
