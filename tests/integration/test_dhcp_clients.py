"""Real DHCP clients against the real daemon, in namespaces made per test."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess

import pytest

from tests.integration.conftest import SERVER_IP, DhcpLab, require

pytestmark = pytest.mark.netns

RESERVED = """\
pools:
  - name: workers
    nodes:
      - {name: m1c27, mac: ["02:00:00:00:00:01", "02:00:00:00:00:02"], ip: 10.77.0.27}
      - {name: m1c43, mac: "02:00:00:00:00:43", ip: 10.77.0.43}
"""
CATCH_ALL = RESERVED + """\
  - name: any
    dynamic: {range: 10.77.0.100-10.77.0.109, name: "node-{mac}"}
"""


def test_udhcpc_gets_reserved_address_and_options(dhcp_lab: DhcpLab) -> None:
    dhcp_lab.bootd(RESERVED)
    env = dhcp_lab.udhcpc()
    assert env is not None
    assert env["ip"] == "10.77.0.27"
    assert env["hostname"] == "m1c27"
    assert env["router"] == SERVER_IP
    assert env["dns"].split() == [SERVER_IP]
    assert env["domain"] == "lab.example"
    assert env["subnet"] == "255.255.255.0"
    assert env["lease"] == "3600"
    assert env["serverid"] == SERVER_IP
    assert "boot_file" not in env  # not a PXE client


def test_dhclient_gets_reserved_address_and_options(dhcp_lab: DhcpLab) -> None:
    require("dhclient")
    dhcp_lab.bootd(RESERVED)
    env = dhcp_lab.dhclient()
    assert env is not None, "dhclient did not bind"
    assert env["new_ip_address"] == "10.77.0.27"
    assert env["new_host_name"] == "m1c27"
    assert env["new_routers"] == SERVER_IP
    assert env["new_domain_name_servers"] == SERVER_IP
    assert env["new_domain_name"] == "lab.example"
    assert env["new_subnet_mask"] == "255.255.255.0"
    assert env["new_dhcp_server_identifier"] == SERVER_IP


def test_node_with_two_macs_gets_same_name_and_address(dhcp_lab: DhcpLab) -> None:
    dhcp_lab.bootd(RESERVED)
    first = dhcp_lab.udhcpc()
    dhcp_lab.set_client_mac("02-00-00-00-00-02")
    second = dhcp_lab.udhcpc()
    assert first is not None and second is not None
    assert (first["hostname"], first["ip"]) == (second["hostname"], second["ip"])
    assert second["hostname"] == "m1c27"


def test_uefi_pxe_client_gets_snponly_and_next_server(dhcp_lab: DhcpLab) -> None:
    dhcp_lab.bootd(RESERVED)
    env = dhcp_lab.udhcpc("-V", "PXEClient:Arch:00007:UNDI:003000", "-x", "0x5d:0007")
    assert env is not None
    assert env["boot_file"] == "snponly.efi"
    assert env["siaddr"] == SERVER_IP
    assert env["ip"] == "10.77.0.27"


def test_bios_pxe_client_gets_undionly(dhcp_lab: DhcpLab) -> None:
    dhcp_lab.bootd(RESERVED)
    env = dhcp_lab.udhcpc("-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000")
    assert env is not None and env["boot_file"] == "undionly.kpxe"


def test_ipxe_client_gets_script_url(dhcp_lab: DhcpLab) -> None:
    dhcp_lab.bootd(RESERVED)
    env = dhcp_lab.udhcpc("-V", "PXEClient:Arch:00000:UNDI:002001",
                          "-x", "0x4d:" + b"iPXE".hex())
    assert env is not None
    assert env["boot_file"] == f"http://{SERVER_IP}:8080/boot.ipxe"


def test_catch_all_client_gets_range_address_and_generated_name(dhcp_lab: DhcpLab) -> None:
    dhcp_lab.bootd(CATCH_ALL)
    dhcp_lab.set_client_mac("52:54:00:aa:bb:cc")
    env = dhcp_lab.udhcpc()
    assert env is not None
    assert env["ip"] == "10.77.0.100"
    assert env["hostname"] == "node-52-54-00-aa-bb-cc"


def test_unknown_mac_without_catch_all_gets_nothing(dhcp_lab: DhcpLab) -> None:
    daemon = dhcp_lab.bootd(RESERVED)
    dhcp_lab.set_client_mac("52:54:00:aa:bb:cc")
    assert dhcp_lab.udhcpc(tries=2) is None
    unknown = [e for e in daemon.events() if e.get("event") == "dhcp unknown-mac"]
    assert len(unknown) == 1, "unknown MACs are logged once per interval, not per packet"
    assert unknown[0]["mac"] == "52:54:00:aa:bb:cc"
    assert unknown[0]["message"] == "DISCOVER" and "no catch-all pool" in str(
        unknown[0]["detail"])


def test_leases_survive_kill_and_restart(dhcp_lab: DhcpLab) -> None:
    daemon = dhcp_lab.bootd(CATCH_ALL)
    dhcp_lab.set_client_mac("52:54:00:00:00:0a")
    a = dhcp_lab.udhcpc()
    dhcp_lab.set_client_mac("52:54:00:00:00:0b")
    b = dhcp_lab.udhcpc()
    assert a is not None and b is not None
    assert a["ip"] != b["ip"]

    daemon.stop(signal.SIGKILL)
    daemon.start()

    dhcp_lab.set_client_mac("52:54:00:00:00:0c")
    c = dhcp_lab.udhcpc()
    assert c is not None and c["ip"] not in (a["ip"], b["ip"])
    dhcp_lab.set_client_mac("52:54:00:00:00:0a")
    again = dhcp_lab.udhcpc()
    assert again is not None and again["ip"] == a["ip"]
    assert any(e.get("event") == "leases restored" and e.get("count") == 2
               for e in daemon.events())


def test_malformed_packets_are_dropped_and_server_keeps_serving(dhcp_lab: DhcpLab) -> None:
    daemon = dhcp_lab.bootd(RESERVED)
    sender = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'cli0')\n"
        "for junk in (b'', b'x' * 10, b'\\x01' * 300, b'\\x01\\x01\\x06' + bytes(233) + "
        "b'\\x63\\x82\\x53\\x63\\x35\\x09'):\n"
        "    s.sendto(junk, ('255.255.255.255', 67))\n"
    )
    import sys

    dhcp_lab.lab.run(dhcp_lab.client_ns, [sys.executable, "-c", sender])
    env = dhcp_lab.udhcpc()
    assert env is not None and env["ip"] == "10.77.0.27"
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_perfdhcp_relay_exchanges_complete(dhcp_lab: DhcpLab) -> None:
    """perfdhcp acts as a relay (giaddr = its address): replies must go back to it."""
    require("perfdhcp")
    dhcp_lab.bootd(RESERVED + """\
  - name: any
    dynamic: {range: 10.77.0.100-10.77.0.250}
""")
    dhcp_lab.lab.address(dhcp_lab.client_ns, "cli0", "10.77.0.2/24")
    perfdhcp = shutil.which("perfdhcp")
    assert perfdhcp is not None
    proc = dhcp_lab.lab.run(dhcp_lab.client_ns, [
        perfdhcp, "-4", "-l", "cli0", "-r", "50", "-R", "100", "-p", "3", "-t", "1",
        SERVER_IP], check=False, timeout=30)
    out = proc.stdout
    sent = re.search(r"sent packets: (\d+)", out)
    received = re.search(r"received packets: (\d+)", out)
    drops = re.findall(r"drops: (\d+)", out)
    assert sent and received, out
    assert int(sent.group(1)) > 100, out
    assert all(int(d) == 0 for d in drops), out
    assert proc.returncode in (0, 3), out  # 3: perfdhcp's "some drops" exit code


def test_sigterm_exits_cleanly(dhcp_lab: DhcpLab) -> None:
    daemon = dhcp_lab.bootd(RESERVED)
    assert daemon.stop() == 0
    assert any(e.get("event") == "bootd stopped" for e in daemon.events())
    assert daemon.proc is not None
    assert isinstance(daemon.proc, subprocess.Popen)
