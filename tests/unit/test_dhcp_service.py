"""The DHCP service: bytes in, bytes out; outcomes become logs, metrics and events by
type; nothing is sent that the store does not have."""

from __future__ import annotations

import textwrap
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bootd.dhcp.decide import DhcpContext, DhcpSettings
from bootd.dhcp.options import Opt
from bootd.dhcp.packet import BOOTREQUEST, DhcpPacket, MessageType, decode, encode
from bootd.dhcp.service import DhcpService
from bootd.fleet.config import parse_config
from bootd.fleet.directory import NodeDirectory
from bootd.fleet.inventory import Inventory
from bootd.fleet.mac import mac_to_bytes
from bootd.ops.metrics import Metrics
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store

CONFIG = textwrap.dedent("""\
    server: {interfaces: [br0], address: 10.0.0.1}
    network: {subnet: 10.0.0.0/24}
    pools:
      - name: w
        nodes: [{name: n1, mac: "02:00:00:00:00:01", ip: 10.0.0.5}]
    """)
CATCH_ALL = CONFIG + "  - name: any\n    dynamic: {range: 10.0.0.100-10.0.0.110}\n"


def context(text: str) -> DhcpContext:
    cfg = parse_config(text)
    inv = Inventory(cfg)
    return DhcpContext(NodeDirectory.build(inv), DhcpSettings.from_config(cfg))


def packet(mtype: MessageType, mac: str, **options: bytes) -> bytes:
    opts = {Opt.MESSAGE_TYPE: bytes((mtype,))}
    opts.update({int(Opt[k]): v for k, v in options.items()})
    return encode(DhcpPacket(op=BOOTREQUEST, xid=1, chaddr=mac_to_bytes(mac), flags=0x8000,
                             options=opts))


def service(tmp: Path, text: str = CONFIG, recorder: Recorder | None = None) -> DhcpService:
    ctx = context(text)
    return DhcpService(lambda: ctx, Store(tmp / "s.sqlite3"), Metrics(), recorder)


def unknown_warnings(logs: list[dict[str, object]]) -> list[object]:
    return [e.get("mac") for e in logs if e["event"] == "dhcp unknown-mac"]


def test_unknown_mac_is_logged_once_a_minute_per_mac(tmp_path: Path) -> None:
    """Every unknown MAC gets its own line (REQUESTs too), each at most once a minute."""
    svc = service(tmp_path)
    a, b = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
    wanted = IPv4Address("10.0.0.50").packed
    with capture_logs() as logs:
        for mac in (a, b, a, b):
            assert svc.handle(packet(MessageType.REQUEST, mac, REQUESTED_IP=wanted),
                              "br0", 100.0) is None
        assert svc.handle(packet(MessageType.DISCOVER, a), "br0", 130.0) is None
        svc.handle(packet(MessageType.REQUEST, a, REQUESTED_IP=wanted), "br0", 161.0)
    assert unknown_warnings(logs) == [a, b, a]


def test_reply_is_encoded_here_and_unicast_by_hardware_address(tmp_path: Path) -> None:
    svc = service(tmp_path)
    raw = encode(DhcpPacket(op=BOOTREQUEST, xid=9, chaddr=mac_to_bytes("02:00:00:00:00:01"),
                            options={Opt.MESSAGE_TYPE: bytes((MessageType.DISCOVER,))}))
    out = svc.handle(raw, "br0", 0.0)
    assert out is not None and out.dest == IPv4Address("10.0.0.5") and out.port == 68
    assert out.hw_unicast_to == mac_to_bytes("02:00:00:00:00:01")
    reply = decode(out.payload)
    assert reply.xid == 9 and reply.message_type is MessageType.OFFER


def test_malformed_is_counted_and_dropped(tmp_path: Path) -> None:
    svc = service(tmp_path)
    assert svc.handle(b"\x01\x01" + b"\x00" * 30, "br0", 0.0) is None
    assert svc.metrics.dhcp_packets.labels("malformed")._value.get() == 1


def test_ack_is_withheld_when_the_store_fails_and_the_lease_is_kept(tmp_path: Path) -> None:
    svc = service(tmp_path, CATCH_ALL)
    mac = "52:54:00:00:00:01"
    offer = svc.handle(packet(MessageType.DISCOVER, mac), "br0", 0.0)
    assert offer is not None
    ip = decode(offer.payload).yiaddr
    request = packet(MessageType.REQUEST, mac, REQUESTED_IP=ip.packed,
                     SERVER_ID=IPv4Address("10.0.0.1").packed)
    real = svc.store
    broken = Store(tmp_path / "s.sqlite3")
    broken.close()  # every write now fails
    svc.store = broken
    with capture_logs() as logs:
        assert svc.handle(request, "br0", 1.0) is None
    assert any(e["event"].startswith("dhcp lease store write failed") for e in logs)
    svc.store = real
    ack = svc.handle(request, "br0", 2.0)  # retried: the queued binding is written first
    assert ack is not None and decode(ack.payload).message_type is MessageType.ACK
    assert [lease.ip for lease in real.load_leases()] == [ip]


@pytest.mark.parametrize("text", [CONFIG, CATCH_ALL])
def test_events_follow_outcome_types(tmp_path: Path, text: str) -> None:
    recorder = Recorder(None, EventPolicy(600, 5))
    svc = service(tmp_path, text, recorder)
    mac = "02:00:00:00:00:01"
    arch = {"CLIENT_ARCH": b"\x00\x07", "VENDOR_CLASS": b"PXEClient:Arch:00007:UNDI:003000"}
    svc.handle(packet(MessageType.DISCOVER, mac, **arch), "br0", 10.0)
    svc.handle(packet(MessageType.REQUEST, mac, REQUESTED_IP=IPv4Address("10.0.0.5").packed,
                      SERVER_ID=IPv4Address("10.0.0.1").packed, **arch), "br0", 11.0)
    svc.handle(packet(MessageType.REQUEST, mac, REQUESTED_IP=IPv4Address("10.0.0.9").packed),
               "br0", 12.0)
    svc.handle(packet(MessageType.DISCOVER, "52:54:00:00:00:99"), "br0", 13.0)
    state = recorder.state("n1")
    assert state is not None
    steps = [(s.stage, s.outcome, s.detail.get("firmware")) for s in state.history[-1].steps]
    assert steps == [("dhcp-discover", "ok", "efi64"), ("dhcp-offer", "ok", "efi64"),
                     ("dhcp-ack", "ok", "efi64"), ("dhcp-nak", "error", None)]
    stranger = recorder.state("node-52-54-00-00-00-99") or recorder.state("52:54:00:00:00:99")
    assert stranger is not None
    expected = "refused" if text == CONFIG else "dhcp-offer"
    assert stranger.stage == expected


def test_inform_to_a_broadcast_address_is_never_answered(tmp_path: Path) -> None:
    svc = service(tmp_path)
    for ciaddr in ("10.0.0.255", "10.0.0.0"):
        data = packet(MessageType.INFORM, "02:00:00:00:00:01")
        raw = bytearray(data)
        raw[12:16] = IPv4Address(ciaddr).packed  # ciaddr
        assert svc.handle(bytes(raw), "br0", 0.0) is None, ciaddr


def test_informs_are_rate_limited_per_client_address(tmp_path: Path) -> None:
    svc = service(tmp_path)
    raw = bytearray(packet(MessageType.INFORM, "02:00:00:00:00:01"))
    raw[12:16] = IPv4Address("10.0.0.5").packed
    with capture_logs() as logs:
        answered = sum(svc.handle(bytes(raw), "br0", 100.0) is not None for _ in range(200))
    assert answered == 5  # the burst, then nothing within the same second
    assert len([e for e in logs if e["event"] == "dhcp inform"]) == 5
    assert svc.metrics.dhcp_packets.labels("rate-limited")._value.get() == 195
    assert svc.handle(bytes(raw), "br0", 102.0) is not None  # refilled


def test_exhaustion_and_store_failures_are_logged_once_a_minute(tmp_path: Path) -> None:
    tiny = CATCH_ALL.replace("10.0.0.100-10.0.0.110", "10.0.0.100-10.0.0.100")
    svc = service(tmp_path, tiny)
    assert svc.handle(packet(MessageType.DISCOVER, "52:54:00:00:01:00"), "br0", 0.0)
    with capture_logs() as logs:
        for i in range(1, 30):
            assert svc.handle(packet(MessageType.DISCOVER, f"52:54:00:00:01:{i:02x}"),
                              "br0", i / 10) is None  # the one address is held 15 s
    assert [e["event"] for e in logs].count("dhcp exhausted") == 1
    assert svc.metrics.dhcp_packets.labels("exhausted")._value.get() == 29
    broken = Store(tmp_path / "b.sqlite3")
    broken.close()
    svc.store = broken
    assert svc.handle(packet(MessageType.DISCOVER, "52:54:00:00:01:00"), "br0", 100.0)
    with capture_logs() as logs:
        for t in range(5):
            request = packet(MessageType.REQUEST, "52:54:00:00:01:00",
                             REQUESTED_IP=IPv4Address("10.0.0.100").packed,
                             SERVER_ID=IPv4Address("10.0.0.1").packed)
            assert svc.handle(request, "br0", 101.0 + t) is None
    assert len([e for e in logs if "store write failed" in e["event"]]) == 1


def test_an_offer_is_held_briefly(tmp_path: Path) -> None:
    """Issue 16, finding 2: offers were held 60 s, so 50 DISCOVERs a minute from random
    MACs kept a 50-address range exhausted. Now 15 s (PXE firmware REQUESTs within 4 s)."""
    tiny = CATCH_ALL.replace("10.0.0.100-10.0.0.110", "10.0.0.100-10.0.0.100")
    svc = service(tmp_path, tiny)
    assert svc.handle(packet(MessageType.DISCOVER, "52:54:00:00:01:00"), "br0", 0.0)
    assert svc.handle(packet(MessageType.DISCOVER, "52:54:00:00:01:01"), "br0", 14.0) is None
    assert svc.handle(packet(MessageType.DISCOVER, "52:54:00:00:01:01"), "br0", 15.5)


def test_known_machines_are_told_apart_from_the_raw_bytes(tmp_path: Path) -> None:
    """What the transport asks of every datagram under a flood: reserved and bound MACs
    are known, an offer alone does not make a machine known, a runt is not."""
    svc = service(tmp_path, CATCH_ALL)
    reserved = packet(MessageType.DISCOVER, "02:00:00:00:00:01")
    assert svc.is_known(reserved)
    stranger = packet(MessageType.DISCOVER, "52:54:00:00:02:00")
    assert not svc.is_known(stranger)
    assert svc.handle(stranger, "br0", 0.0)  # offered, not yet bound
    assert not svc.is_known(stranger)
    request = packet(MessageType.REQUEST, "52:54:00:00:02:00",
                     REQUESTED_IP=IPv4Address("10.0.0.100").packed,
                     SERVER_ID=IPv4Address("10.0.0.1").packed)
    assert svc.handle(request, "br0", 1.0)
    assert svc.is_known(stranger)  # bound: it renews ahead of a flood too
    assert not svc.is_known(reserved[:30])
    svc.shed(5)
    assert svc.metrics.dhcp_packets.labels("shed")._value.get() == 5


def test_a_failing_store_withholds_only_replies_that_need_it(tmp_path: Path) -> None:
    """Issue 16, finding 9: with a full disk, reserved nodes kept booting; they must go on
    doing so while a catch-all change waits to be written."""
    svc = service(tmp_path, CATCH_ALL)
    broken = Store(tmp_path / "b.sqlite3")
    broken.close()
    svc.store = broken
    stranger = "52:54:00:00:03:00"
    assert svc.handle(packet(MessageType.DISCOVER, stranger), "br0", 0.0)  # offers: memory
    request = packet(MessageType.REQUEST, stranger,
                     REQUESTED_IP=IPv4Address("10.0.0.100").packed,
                     SERVER_ID=IPv4Address("10.0.0.1").packed)
    assert svc.handle(request, "br0", 0.1) is None  # its lease is not on disk: no ACK
    reserved = packet(MessageType.REQUEST, "02:00:00:00:00:01",
                      REQUESTED_IP=IPv4Address("10.0.0.5").packed,
                      SERVER_ID=IPv4Address("10.0.0.1").packed)
    assert svc.handle(reserved, "br0", 0.2) is not None  # needs nothing written
    assert svc.context().directory.leases.pending() >= 1  # the stranger's, kept for later


class CountingStore(Store):
    """A real store that notes each lease transaction in `trail`."""

    def __init__(self, path: Path, trail: list[str]) -> None:
        super().__init__(path)
        self.trail = trail

    def apply_lease_changes(self, changes: object) -> None:
        changes = list(changes)  # type: ignore[call-overload]
        super().apply_lease_changes(changes)
        self.trail.append(f"commit {len(changes)}")


def test_a_batch_is_decided_in_order_committed_once_then_encoded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: one transaction for a wakeup's datagrams, and no reply encoded before
    it has committed (the transport sends what handle_batch returns)."""
    import bootd.dhcp.service as service_module

    trail: list[str] = []
    real_encode = service_module.encode

    def noting_encode(*args: object, **kwargs: object) -> bytes:
        trail.append("encode")
        return real_encode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service_module, "encode", noting_encode)
    ctx = context(CATCH_ALL)
    svc = DhcpService(lambda: ctx, CountingStore(tmp_path / "s.sqlite3", trail), Metrics())
    strangers = [f"52:54:00:00:04:0{i}" for i in range(5)]
    offers = svc.handle_batch([packet(MessageType.DISCOVER, m) for m in strangers], "br0", 0.0)
    addresses = [decode(o.payload).yiaddr for o in offers]
    assert len(set(addresses)) == 5  # later decisions saw the earlier ones' offers
    trail.clear()
    requests = [packet(MessageType.REQUEST, m, REQUESTED_IP=ip.packed,
                       SERVER_ID=IPv4Address("10.0.0.1").packed)
                for m, ip in zip(strangers, addresses, strict=True)]
    reserved = packet(MessageType.REQUEST, "02:00:00:00:00:01",
                      REQUESTED_IP=IPv4Address("10.0.0.5").packed,
                      SERVER_ID=IPv4Address("10.0.0.1").packed)
    acks = svc.handle_batch([*requests[:2], reserved, b"junk", *requests[2:]], "br0", 1.0)
    assert trail == ["commit 5"] + ["encode"] * 6
    replies = [decode(a.payload) for a in acks]
    assert all(r.message_type is MessageType.ACK for r in replies)
    assert [r.yiaddr for r in replies] == [*addresses[:2], IPv4Address("10.0.0.5"),
                                           *addresses[2:]]
    on_disk = {lease.ip for lease in Store(tmp_path / "s.sqlite3").load_leases()}
    assert on_disk == set(addresses)


def test_a_failing_store_withholds_the_batch_replies_that_need_it(tmp_path: Path) -> None:
    svc = service(tmp_path, CATCH_ALL)
    strangers = ["52:54:00:00:05:01", "52:54:00:00:05:02"]
    offers = svc.handle_batch([packet(MessageType.DISCOVER, m) for m in strangers], "br0", 0.0)
    broken = Store(tmp_path / "b.sqlite3")
    broken.close()
    svc.store = broken
    batch = [packet(MessageType.REQUEST, m, REQUESTED_IP=decode(o.payload).yiaddr.packed,
                    SERVER_ID=IPv4Address("10.0.0.1").packed)
             for m, o in zip(strangers, offers, strict=True)]
    batch.insert(1, packet(MessageType.REQUEST, "02:00:00:00:00:01",
                           REQUESTED_IP=IPv4Address("10.0.0.5").packed,
                           SERVER_ID=IPv4Address("10.0.0.1").packed))
    replies = svc.handle_batch(batch, "br0", 1.0)
    assert [decode(r.payload).yiaddr for r in replies] == [IPv4Address("10.0.0.5")]
    assert svc.context().directory.leases.pending() >= 2  # both kept for the next write
