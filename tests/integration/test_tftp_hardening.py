"""TFTP against a hostile machine on the boot LAN (issue 16, findings 3 and 4): one address
cannot hold every transfer slot, and an RRQ from a forged address buys no more traffic
than tftpd-hpa gives it, measured side by side in the same namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import SERVER_IP, DhcpLab
from tests.integration.test_tftp_clients import NODE, RAW, raw, sha

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def lab(dhcp_lab: DhcpLab) -> DhcpLab:
    for cidr in ("10.77.0.2/24", "10.77.0.66/24"):  # a node, and a hostile neighbour
        dhcp_lab.lab.address(dhcp_lab.client_ns, "cli0", cidr)
    root = dhcp_lab.tmp / "tftproot"
    root.mkdir()
    (root / "undionly.kpxe").write_bytes(os.urandom(70_000))
    return dhcp_lab


def test_one_address_cannot_take_every_transfer(lab: DhcpLab) -> None:
    lab.bootd(NODE + f"tftp: {{root: {lab.tmp / 'tftproot'}, max_transfers: 8}}\n")
    hostile = raw(lab, "never_ack", {"count": 12, "name": "undionly.kpxe", "listen": 1.5,
                                     "source": "10.77.0.66"})
    assert isinstance(hostile, dict)
    # the default cap: 4 transfers per address; the rest are told why, at once
    assert hostile["errors"].count("too many transfers from this address, try again") == 8
    # while those 4 are held, a node on another address still gets its file; before the
    # cap, 8 slots taken by one address left it "server busy"
    ok = raw(lab, "fetch_from", {"source": "10.77.0.2", "name": "undionly.kpxe"})
    assert ok == {"sha256": sha(lab.tmp / "tftproot" / "undionly.kpxe")}


def in_tftpd() -> Path:
    for candidate in (ROOT / ".cache/incumbents/usr/sbin/in.tftpd", Path("/usr/sbin/in.tftpd")):
        if candidate.exists():
            return candidate
    pytest.skip("needs tftpd-hpa's in.tftpd (scripts/install-deps unpacks it)")


def test_forged_rrqs_are_amplified_no_more_than_by_tftpd_hpa(lab: DhcpLab) -> None:
    """12 RRQs never ACKed, to bootd and to tftpd-hpa at the same time: bytes out per byte
    in over 12 s (longer than bootd's whole give-up time of 1 + 2 + 4 s)."""
    root = lab.tmp / "tftproot"
    lab.bootd(NODE + f"tftp: {{root: {root}, max_transfers_per_client: 100}}\n")
    incumbent = lab.lab.spawn(lab.server_ns, [
        str(in_tftpd()), "--foreground", "--listen", "--address", f"{SERVER_IP}:6969",
        "--secure", "--user", "root", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    assert incumbent.poll() is None, "in.tftpd did not start"
    args = {"count": 12, "name": "undionly.kpxe", "listen": 12}
    runs = {name: subprocess.Popen(
        ["ip", "netns", "exec", lab.client_ns, sys.executable, str(RAW), SERVER_IP,
         "never_ack", json.dumps({**args, "port": port})], stdout=subprocess.PIPE, text=True)
        for name, port in (("bootd", 69), ("tftpd-hpa", 6969))}
    got = {name: json.loads(proc.communicate(timeout=60)[0]) for name, proc in runs.items()}
    ratio = {name: r["bytes_out"] / r["bytes_in"] for name, r in got.items()}
    print("amplification (bytes out / bytes in, 12 forged RRQs, 12 s):",
          json.dumps({n: {"ratio": round(ratio[n], 1), **got[n]} for n in got}))
    assert got["tftpd-hpa"]["data_packets"] > 0, got  # the incumbent really answered
    # bootd: DATA 1 three times per RRQ (first send + 2 retries), then silence
    assert got["bootd"]["data_packets"] == 12 * 3, got
    assert got["bootd"]["last_packet_s"] < 8.0
    assert ratio["bootd"] <= ratio["tftpd-hpa"], ratio
    # and bootd logged each as never answered, not as a failed download
    time.sleep(0.5)
    reasons = [e.get("detail") for e in lab.daemons[-1].events()
               if e.get("event") == "tftp transfer"]
    assert reasons.count("the client never answered (2 retries)") == 12, reasons
