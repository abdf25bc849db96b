"""A routed lab: racks behind a router running Debian's isc-dhcp-relay (dhcrelay -a, which
adds option 82 with the receiving interface as circuit-id), and bootd one hop away.

    srv (bootd, up0 10.60.0.1) -- core0 10.60.0.254 [rtr: dhcrelay, forwarding]
                                   rack1 10.61.1.1 -- c1 (eth0)
                                   rack2 10.61.2.1 -- c2
                                   rack3 10.61.3.1 -- c3
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bootd.dhcp.options import Opt
from bootd.dhcp.packet import BOOTREQUEST, DhcpPacket, MessageType, decode, encode
from bootd.fleet.mac import mac_to_bytes
from bootd.lab.netlab import NetLab
from tests.integration.conftest import require

pytestmark = pytest.mark.netns

SERVER = "10.60.0.1"
ROUTER = "10.60.0.254"
R1_MAC = "02:00:00:61:01:11"
CONFIG = textwrap.dedent(f"""\
    server: {{interfaces: [up0], address: {SERVER}, state_dir: {{tmp}}/state,
             api: {{tmp}}/state/api.sock, drain_timeout: 2s}}
    networks:
      - {{name: core, subnet: 10.60.0.0/24}}
      - {{name: rack1, subnet: 10.61.1.0/24, gateway: 10.61.1.1, dns: [10.60.0.53],
         domain: rack1.lab}}
      - {{name: rack2, subnet: 10.61.2.0/24, gateway: 10.61.2.1, dns: [10.60.0.54]}}
      - {{name: rack3, subnet: 10.61.3.0/24, gateway: 10.61.3.1, dns: [10.60.0.55]}}
    pools:
      - name: workers
        nodes:
          - {{name: r1n1, mac: "{R1_MAC}", ip: 10.61.1.11}}
          - {{name: r2n7, port: {{relay: 10.61.2.1, circuit_id: rack2}}, ip: 10.61.2.17}}
      - name: catch-all
        dynamic: {{ranges: [10.61.1.100-10.61.1.120, 10.61.3.100-10.61.3.120]}}
    """)


@dataclass
class RoutedLab:
    lab: NetLab
    srv: str
    rtr: str
    racks: dict[str, str]  # rack interface on the router -> client namespace
    tmp: Path
    log: Path

    def udhcpc(self, rack: str, mac: str, tries: int = 3) -> dict[str, str] | None:
        ns = self.racks[rack]
        self.lab.set_mac(ns, "eth0", mac)
        out = self.tmp / f"{rack}-{time.monotonic_ns()}.env"
        script = self.tmp / "udhcpc.sh"
        script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {out}\nexit 0\n')
        script.chmod(0o755)
        self.lab.run(ns, ["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", str(tries), "-T", "1",
                          "-A", "1", "-s", str(script)], check=False, timeout=30)
        if not out.exists():
            return None
        return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)

    def lines(self, event: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if f'"{event}"' in line]


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[RoutedLab]:
    require("udhcpc", "dhcrelay")
    with NetLab("brt") as lab:
        srv, rtr = lab.namespace("srv"), lab.namespace("rtr")
        lab.veth(srv, "up0", rtr, "core0")
        lab.address(srv, "up0", f"{SERVER}/24")
        lab.address(rtr, "core0", f"{ROUTER}/24")
        lab.run(rtr, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        racks = {}
        for n in (1, 2, 3):
            ns = lab.namespace(f"c{n}")
            lab.veth(rtr, f"rack{n}", ns, "eth0")
            lab.address(rtr, f"rack{n}", f"10.61.{n}.1/24")
            racks[f"rack{n}"] = ns
        lab.run(srv, ["ip", "route", "add", "10.61.0.0/16", "via", ROUTER])
        # a prefix no network declares, routed to the router and dropped there: where a
        # reflected reply would go
        lab.run(srv, ["ip", "route", "add", "10.99.0.0/24", "via", ROUTER])
        lab.run(rtr, ["ip", "route", "add", "blackhole", "10.99.0.0/24"])
        lab.spawn(rtr, ["dhcrelay", "-4", "-d", "-a", "-pf", str(tmp_path / "relay.pid"),
                        "-i", "rack1", "-i", "rack2", "-i", "rack3", "-iu", "core0", SERVER],
                  stdout=subprocess.DEVNULL, stderr=(tmp_path / "relay.log").open("wb"))
        config = tmp_path / "bootd.yaml"
        config.write_text(CONFIG.replace("{tmp}", str(tmp_path)))
        log = tmp_path / "bootd.log"
        lab.start_bootd(srv, config, log, extra=["--log-level", "debug"])
        time.sleep(0.5)  # dhcrelay opens its sockets
        yield RoutedLab(lab, srv, rtr, racks, tmp_path, log)


def test_each_rack_gets_its_own_subnet_and_options(routed: RoutedLab) -> None:
    env = routed.udhcpc("rack1", R1_MAC)
    assert env is not None, routed.log.read_text()[-3000:]
    assert (env["ip"], env["router"], env["dns"]) == ("10.61.1.11", "10.61.1.1", "10.60.0.53")
    assert env["hostname"] == "r1n1" and env["domain"] == "rack1.lab"
    assert env["serverid"] == SERVER and env["subnet"] == "255.255.255.0"
    unknown = routed.udhcpc("rack3", "52:54:00:61:03:01")
    assert unknown is not None
    assert (unknown["ip"], unknown["router"]) == ("10.61.3.100", "10.61.3.1")
    assert unknown["hostname"] == "node-52-54-00-61-03-01"


def test_a_switch_port_identity_serves_any_mac(routed: RoutedLab) -> None:
    for mac in ("52:54:00:61:02:01", "52:54:00:61:02:02"):  # a replaced NIC
        env = routed.udhcpc("rack2", mac)
        assert env is not None and env["ip"] == "10.61.2.17" and env["hostname"] == "r2n7"
    acks = routed.lines("dhcp ack")
    last = json.loads(acks[-1])
    assert last["mac"] == "52:54:00:61:02:02" and last["node"] == "r2n7"
    nodes = subprocess.run([sys.executable, "-m", "bootd", "status", "-c",
                            str(routed.tmp / "bootd.yaml"), "-o", "json"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert '"network": "rack2"' in nodes


def test_a_reserved_node_behind_the_wrong_rack_gets_nothing(routed: RoutedLab) -> None:
    assert routed.udhcpc("rack3", R1_MAC, tries=2) is None
    wrong = routed.lines("dhcp wrong-network")
    assert len(wrong) == 1 and "node r1n1 seen on rack3" in wrong[0]


def capture(routed: RoutedLab, pcap: Path) -> subprocess.Popen[bytes]:
    """tcpdump on bootd's side of the router, once it says it is listening."""
    err = pcap.with_suffix(".err")
    # --immediate-mode: otherwise libpcap holds packets in a block until it fills
    proc = routed.lab.spawn(routed.srv, ["tcpdump", "-i", "up0", "-n", "-U", "--immediate-mode",
                                         "-Z", "root", "-w", str(pcap), "udp", "port", "67"],
                            stdout=subprocess.DEVNULL, stderr=err.open("wb"))
    deadline = time.monotonic() + 10
    while b"listening on" not in err.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.05)
    return proc


def replies(pcap: Path) -> list[tuple[str, DhcpPacket]]:
    """(destination, packet) of every DHCP reply bootd sent in the capture."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    out = []
    for frame in rdpcap(str(pcap)):
        if IP in frame and UDP in frame and frame[IP].src == SERVER:
            out.append((frame[IP].dst, decode(bytes(frame[UDP].payload))))
    return out


def test_option_82_from_dhcrelay_is_echoed(routed: RoutedLab) -> None:
    pcap = routed.tmp / "echo.pcap"
    tcpdump = capture(routed, pcap)
    assert routed.udhcpc("rack1", R1_MAC) is not None
    time.sleep(0.5)
    routed.lab.stop(tcpdump)
    sent = replies(pcap)
    assert sent and all(dest == "10.61.1.1" for dest, _ in sent)  # to the relay only
    assert all(p.options[Opt.RELAY_AGENT_INFO][:7] == b"\x01\x05rack1" for _, p in sent)


def test_a_relay_in_no_declared_network_gets_no_reply_anywhere(routed: RoutedLab) -> None:
    pcap = routed.tmp / "reflect.pcap"
    tcpdump = capture(routed, pcap)
    stray = encode(DhcpPacket(op=BOOTREQUEST, xid=0x5EED, hops=1, chaddr=mac_to_bytes(R1_MAC),
                              giaddr=IPv4Address("10.99.0.1"),
                              options={Opt.MESSAGE_TYPE: bytes((MessageType.DISCOVER,))}))
    code = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"[s.sendto(bytes.fromhex(sys.argv[1]), ({SERVER!r}, 67)) for _ in range(5)]")
    routed.lab.run(routed.rtr, [sys.executable, "-c", code, stray.hex()])
    time.sleep(1.0)
    routed.lab.stop(tcpdump)
    assert replies(pcap) == []
    logged = routed.lines("dhcp unknown-relay")
    assert len(logged) == 1 and json.loads(logged[0])["relay"] == "10.99.0.1"
