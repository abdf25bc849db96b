"""Routed fleets: several networks behind relays, requests placed by giaddr or interface,
node identity by switch port (option 82), and the address plan's validation."""

from __future__ import annotations

import textwrap
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bootd.dhcp.decide import DhcpContext, DhcpSettings, decide
from bootd.dhcp.options import Opt
from bootd.dhcp.outcomes import (
    Acked,
    Exhausted,
    Offered,
    Outcome,
    UnknownRelay,
    WrongNetwork,
)
from bootd.dhcp.packet import BOOTREQUEST, DhcpPacket, MessageType, decode, encode
from bootd.dhcp.service import DhcpService
from bootd.fleet.config import ConfigError, parse_config
from bootd.fleet.directory import NodeDirectory
from bootd.fleet.images import ImageHashes
from bootd.fleet.inventory import Inventory
from bootd.fleet.mac import mac_to_bytes
from bootd.ops.metrics import Metrics
from bootd.runtime import build_snapshot
from bootd.state.store import Store

CONFIG = textwrap.dedent("""\
    server: {interfaces: [up0], address: 10.0.0.1}
    networks:
      - {name: core, subnet: 10.0.0.0/24}
      - {name: rack1, subnet: 10.1.0.0/24, gateway: 10.1.0.1, dns: [10.0.0.53],
         domain: rack1.example, lease_time: 30m}
      - {name: rack2, subnet: 10.2.0.0/24, gateway: 10.2.0.1, dns: [10.0.0.54],
         next_server: 10.0.0.2}
    images:
      k8s: {kernel: /i/vmlinuz, initrd: /i/initrd}
    defaults: {image: k8s}
    pools:
      - name: workers
        nodes:
          - {name: r1n1, mac: "02:00:00:01:00:01", ip: 10.1.0.11}
          - {name: r2n7, port: {relay: 10.2.0.1, circuit_id: Ethernet7}, ip: 10.2.0.17}
          - {name: r2n8, port: {relay: 10.2.0.1, circuit_id: Ethernet8, remote_id: leaf2},
             ip: 10.2.0.18}
      - name: catch-all
        dynamic: {ranges: [10.1.0.100-10.1.0.101, 10.2.0.100-10.2.0.101]}
    """)
RELAY1, RELAY2 = IPv4Address("10.1.0.1"), IPv4Address("10.2.0.1")


def context(text: str = CONFIG, interfaces: dict[str, IPv4Address] | None = None,
            ) -> DhcpContext:
    cfg = parse_config(text)
    return DhcpContext(NodeDirectory.build(Inventory(cfg)),
                       DhcpSettings.from_config(cfg, interfaces))


def agent_info(circuit: bytes, remote: bytes | None = None) -> bytes:
    info = bytes((1, len(circuit))) + circuit
    if remote is not None:
        info += bytes((2, len(remote))) + remote
    return info


def relayed(mtype: MessageType, mac: str, giaddr: IPv4Address | None,
            circuit: bytes | None = None, remote: bytes | None = None,
            **options: bytes) -> DhcpPacket:
    opts: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes((mtype,))}
    opts.update({int(Opt[k]): v for k, v in options.items()})
    if circuit is not None:
        opts[Opt.RELAY_AGENT_INFO] = agent_info(circuit, remote)
    return DhcpPacket(op=BOOTREQUEST, xid=5, chaddr=mac_to_bytes(mac),
                      giaddr=giaddr or IPv4Address(0), hops=1 if giaddr else 0,
                      options=opts)


def reply_of(out: Outcome) -> DhcpPacket:
    assert isinstance(out, Offered | Acked), out
    return decode(encode(out.reply.packet, out.reply.max_size))


def test_relayed_reserved_node_gets_its_networks_options() -> None:
    out = decide(relayed(MessageType.DISCOVER, "02:00:00:01:00:01", RELAY1), context(), 0)
    r = reply_of(out)
    assert r.yiaddr == IPv4Address("10.1.0.11")
    assert r.options[Opt.ROUTER] == RELAY1.packed
    assert r.options[Opt.DNS] == IPv4Address("10.0.0.53").packed
    assert r.options[Opt.DOMAIN_NAME] == b"rack1.example"
    assert r.options[Opt.SUBNET_MASK] == IPv4Address("255.255.255.0").packed
    assert r.options[Opt.LEASE_TIME] == (1800).to_bytes(4, "big")
    assert isinstance(out, Offered) and out.reply.dest == RELAY1 and out.reply.port == 67


def test_next_server_is_bootds_address_on_that_network() -> None:
    pxe = {"CLIENT_ARCH": b"\x00\x00", "VENDOR_CLASS": b"PXEClient:Arch:00000:UNDI:002001",
           "USER_CLASS": b"iPXE"}
    out = decide(relayed(MessageType.DISCOVER, "52:54:00:00:02:01", RELAY2, **pxe),
                 context(), 0)
    r = reply_of(out)
    assert r.siaddr == IPv4Address("10.0.0.2")
    assert r.options[Opt.SERVER_ID] == IPv4Address("10.0.0.2").packed
    assert r.options[Opt.BOOTFILE_NAME] == b"http://10.0.0.2:8080/boot.ipxe"
    ctx = context()
    decide(relayed(MessageType.DISCOVER, "52:54:00:00:02:01", RELAY2, **pxe), ctx, 0)
    request = relayed(MessageType.REQUEST, "52:54:00:00:02:01", RELAY2,
                      REQUESTED_IP=r.yiaddr.packed, SERVER_ID=IPv4Address("10.0.0.2").packed)
    assert isinstance(decide(request, ctx, 0), Acked)  # naming next_server: it is us


def test_catch_all_addresses_come_from_the_requests_network_only() -> None:
    ctx = context()
    got = [reply_of(decide(relayed(MessageType.DISCOVER, f"52:54:00:00:00:{i:02x}", RELAY2),
                           ctx, 0)).yiaddr for i in range(2)]
    assert got == [IPv4Address("10.2.0.100"), IPv4Address("10.2.0.101")]
    full = decide(relayed(MessageType.DISCOVER, "52:54:00:00:00:09", RELAY2), ctx, 0)
    assert isinstance(full, Exhausted) and full.network == "rack2"  # rack1 still has room
    other = decide(relayed(MessageType.DISCOVER, "52:54:00:00:00:09", RELAY1), ctx, 0)
    assert reply_of(other).yiaddr == IPv4Address("10.1.0.100")


def test_request_for_an_address_of_another_network_is_nakked() -> None:
    ctx = context()
    out = decide(relayed(MessageType.REQUEST, "52:54:00:00:00:01", RELAY1,
                         REQUESTED_IP=IPv4Address("10.2.0.100").packed), ctx, 0)
    assert out.kind == "nak" and "not on rack1" in out.reason  # type: ignore[union-attr]


def test_reserved_node_behind_the_wrong_relay_gets_nothing() -> None:
    out = decide(relayed(MessageType.DISCOVER, "02:00:00:01:00:01", RELAY2), context(), 0)
    assert isinstance(out, WrongNetwork) and out.node.name == "r1n1" and out.seen_on == "rack2"
    req = relayed(MessageType.REQUEST, "02:00:00:01:00:01", RELAY2,
                  REQUESTED_IP=IPv4Address("10.1.0.11").packed)
    assert isinstance(decide(req, context(), 0), WrongNetwork)


def test_relay_in_no_declared_network_is_never_answered() -> None:
    for mtype in (MessageType.DISCOVER, MessageType.REQUEST, MessageType.INFORM):
        out = decide(relayed(mtype, "02:00:00:01:00:01", IPv4Address("192.0.2.9")),
                     context(), 0)
        assert isinstance(out, UnknownRelay) and out.giaddr == IPv4Address("192.0.2.9")
    for segment in ("10.1.0.255", "10.1.0.0"):  # rack1's broadcast and network address:
        out = decide(relayed(MessageType.DISCOVER, "02:00:00:01:00:01",  # no relay is there
                             IPv4Address(segment)), context(), 0)
        assert isinstance(out, UnknownRelay), segment  # a reply would flood the segment


def test_switch_port_identity_any_mac_and_learning() -> None:
    ctx = context()
    for mac in ("52:54:00:aa:00:01", "52:54:00:aa:00:02"):  # the NIC was replaced
        out = decide(relayed(MessageType.DISCOVER, mac, RELAY2, b"Ethernet7"), ctx, 0)
        r = reply_of(out)
        assert r.yiaddr == IPv4Address("10.2.0.17") and r.options[Opt.HOSTNAME] == b"r2n7"
        assert r.options[Opt.RELAY_AGENT_INFO] == agent_info(b"Ethernet7")  # echoed
    assert ctx.directory.learned == {"r2n7": "52:54:00:aa:00:02"}
    assert ctx.directory.drain_learned() == [("r2n7", "52:54:00:aa:00:01"),
                                             ("r2n7", "52:54:00:aa:00:02")]
    # TFTP and HTTP see no option 82: they find the node by the learned MAC and address
    node = ctx.directory.resolve("52:54:00:aa:00:02")
    assert node is not None and node.name == "r2n7"
    holder = ctx.directory.holder_of(IPv4Address("10.2.0.17"), 0)
    assert holder is not None and holder.mac == "52:54:00:aa:00:02"
    # the same circuit-id on another relay is another port
    stranger = decide(relayed(MessageType.DISCOVER, "52:54:00:aa:00:03", RELAY1, b"Ethernet7"),
                      ctx, 0)
    assert reply_of(stranger).yiaddr == IPv4Address("10.1.0.100")


def test_remote_id_must_match_when_the_node_names_one() -> None:
    ctx = context()
    ok = decide(relayed(MessageType.DISCOVER, "52:54:00:bb:00:01", RELAY2, b"Ethernet8",
                        b"leaf2"), ctx, 0)
    assert reply_of(ok).yiaddr == IPv4Address("10.2.0.18")
    other = decide(relayed(MessageType.DISCOVER, "52:54:00:bb:00:02", RELAY2, b"Ethernet8",
                           b"leaf3"), ctx, 0)
    assert reply_of(other).yiaddr != IPv4Address("10.2.0.18")


def test_unrelayed_requests_are_placed_by_the_interfaces_address() -> None:
    ctx = context(interfaces={"up0": IPv4Address("10.1.0.2")})
    out = decide(relayed(MessageType.DISCOVER, "02:00:00:01:00:01", None), ctx, 0, "up0")
    assert reply_of(out).yiaddr == IPv4Address("10.1.0.11")
    ctx = context()  # unknown interface address: the network of server.address (core)
    out = decide(relayed(MessageType.DISCOVER, "02:00:00:01:00:01", None), ctx, 0, "up0")
    assert isinstance(out, WrongNetwork) and out.seen_on == "core"


def test_learned_macs_survive_a_restart_and_unknown_relays_are_logged_once(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    snap = build_snapshot(parse_config(CONFIG), store, hashes=ImageHashes())
    svc = DhcpService(lambda: snap.dhcp, store, Metrics())
    port = encode(relayed(MessageType.DISCOVER, "52:54:00:cc:00:01", RELAY2, b"Ethernet7"))
    assert svc.handle(port, "up0", 0.0) is not None
    again = build_snapshot(parse_config(CONFIG), store, hashes=ImageHashes())
    node = again.directory.resolve("52:54:00:cc:00:01")
    assert node is not None and node.name == "r2n7"
    stray = encode(relayed(MessageType.DISCOVER, "52:54:00:cc:00:02", IPv4Address("192.0.2.1")))
    with capture_logs() as logs:
        for t in (1.0, 2.0, 3.0):
            assert svc.handle(stray, "up0", t) is None
    assert [e["event"] for e in logs].count("dhcp unknown-relay") == 1
    assert svc.metrics.dhcp_packets.labels("unknown-relay")._value.get() == 3


def test_boot_urls_use_the_clients_network_address(tmp_path: Path) -> None:
    snap = build_snapshot(parse_config(CONFIG), Store(tmp_path / "s.sqlite3"),
                          hashes=ImageHashes())
    assert snap.boot.url_for(IPv4Address("10.2.0.17")) == "http://10.0.0.2:8080"
    assert snap.boot.url_for(IPv4Address("10.1.0.11")) == "http://10.0.0.1:8080"
    assert snap.boot.url_for(None) == "http://10.0.0.1:8080"


# -- the address plan's validation


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml")
    return [str(i) for i in info.value.issues]


def test_network_or_networks_not_both() -> None:
    both = CONFIG.replace("networks:", "network: {subnet: 10.9.0.0/24}\nnetworks:")
    assert any("give either `network`" in e for e in errors(both))
    assert any("network: Field required" in e
               for e in errors("server: {interfaces: [a], address: 10.0.0.1}\n"))


@pytest.mark.parametrize(("change", "message"), [
    (("10.2.0.0/24, gateway: 10.2.0.1", "10.1.0.128/25, gateway: 10.1.0.129"),
     "networks.2.subnet: 10.1.0.128/25 overlaps network rack1 (10.1.0.0/24)"),
    (("ip: 10.1.0.11", "ip: 10.7.0.11"),
     "pools.0.nodes.0.ip: 10.7.0.11 is in no network of `networks`"),
    (("10.2.0.100-10.2.0.101", "10.1.0.250-10.2.0.5"),
     "range 10.1.0.250-10.2.0.5 crosses networks rack1 and rack2"),
    (("10.2.0.100-10.2.0.101", "10.9.0.1-10.9.0.5"), "leaves the subnet"),
    (("gateway: 10.1.0.1", "gateway: 10.3.0.1"),
     "networks.1.gateway: 10.3.0.1 is outside networks.1.subnet 10.1.0.0/24"),
    (("circuit_id: Ethernet8, remote_id: leaf2", "circuit_id: Ethernet7"),
     "duplicate port identity (also node workers/r2n7)"),
    (("relay: 10.2.0.1, circuit_id: Ethernet7", "relay: 10.1.0.1, circuit_id: Ethernet7"),
     "relay 10.1.0.1 is not on 10.2.0.17's network rack2"),
    (("{name: r2n7, port: {relay: 10.2.0.1, circuit_id: Ethernet7}, ip: 10.2.0.17}",
      "{name: r2n7, ip: 10.2.0.17}"), "a node needs a `mac` or a `port`"),
    (("- {name: core, subnet: 10.0.0.0/24}", "- {name: rack1, subnet: 10.0.0.0/24}"),
     "duplicate network name 'rack1'"),
])
def test_address_plan_errors_name_file_and_line(change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in CONFIG
    out = errors(CONFIG.replace(old, new, 1))
    assert any(message in e and e.startswith("t.yaml:") for e in out), out


def test_one_network_shorthand_is_named_default() -> None:
    cfg = parse_config("server: {interfaces: [br0], address: 10.0.0.1}\n"
                       "network: {subnet: 10.0.0.0/24}\n")
    assert [n.name for n in cfg.all_networks()] == ["default"]


def test_explain_a_relayed_request(tmp_path: Path) -> None:
    from bootd.cli.explain import explain

    cfg = parse_config(CONFIG)
    text = explain(cfg, "52:54:00:dd:00:01", relay=RELAY2, circuit_id="Ethernet7")
    assert "relayed by 10.2.0.1, circuit-id 'Ethernet7'" in text
    assert "node      r2n7" in text and "network   rack2" in text
    assert "address 10.2.0.17" in text and "next-server 10.0.0.2" in text
    wrong = explain(cfg, "02:00:00:01:00:01", relay=RELAY2)
    assert "wrong-network (node r1n1 is on rack1, the request comes from rack2)" in wrong
    stray = explain(cfg, "02:00:00:01:00:01", relay=IPv4Address("192.0.2.1"))
    assert "unknown-relay (relay 192.0.2.1 is in no declared network" in stray


def test_status_table_shows_networks_only_when_routed() -> None:
    from bootd.cli.status import table

    row = {"node": "a", "mac": "m", "ip": "10.1.0.5", "pool": "p", "stage": "joined",
           "stalled": False, "since": 0.0, "first_seen": 0.0, "last_seen": 0.0,
           "attempts": 1, "last_error": None, "last_boot_time": 1.0}
    one = table({"now": 1.0, "nodes": [{**row, "network": "default"}]}, wide=False,
                colour=False)
    assert "NETWORK" not in one
    two = table({"now": 1.0, "nodes": [{**row, "network": "rack1"},
                                      {**row, "node": "b", "network": "rack2"}]},
                wide=False, colour=False)
    assert "NETWORK" in two.splitlines()[0] and "rack2" in two
