"""Running it in production: sd_notify READY, SIGTERM drains transfers in flight, reload
while large transfers run, kill -9 during a DHCP load keeps every ACKed lease."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootd.lab.netlab import NetLab
from tests.integration.conftest import SERVER_IP, DhcpLab, require

pytestmark = pytest.mark.netns


def big_files(lab: DhcpLab, mib: int) -> tuple[Path, Path]:
    root = lab.tmp / "tftp"
    root.mkdir(exist_ok=True)
    img = lab.tmp / "img"
    img.mkdir(exist_ok=True)
    data = os.urandom(mib << 20)
    (root / "big.bin").write_bytes(data)
    (img / "rootfs").write_bytes(data)
    (img / "vmlinuz").write_bytes(b"k")
    (img / "initrd.img").write_bytes(b"i")
    return root, img


def config(root: Path, img: Path, extra: str = "") -> str:
    return f"""\
tftp: {{root: {root}}}
images: {{k8s: {{kernel: {img}/vmlinuz, initrd: {img}/initrd.img, rootfs: {img}/rootfs}}}}
pools:
  - name: w
    nodes: [{{name: n1, mac: "02:00:00:00:00:01", ip: 10.77.0.2}}]
{extra}"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def slow_downloads(lab: DhcpLab) -> subprocess.Popen[bytes]:
    """A lock-step TFTP read of 24 MiB and a rate-limited HTTP download, in parallel."""
    t, h = lab.tmp / "t.out", lab.tmp / "h.out"
    return lab.lab.spawn(lab.client_ns, ["sh", "-c", (
        f"tftp -m binary {SERVER_IP} -c get big.bin {t} & "
        f"curl -sS --max-time 120 --limit-rate 4M -o {h} http://{SERVER_IP}:8080/images/k8s/rootfs"
        " & wait")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sd_notify_ready_after_listeners_are_bound(dhcp_lab: DhcpLab) -> None:
    notify = dhcp_lab.tmp / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(20)
    cfg = dhcp_lab.tmp / "bootd.yaml"
    cfg.write_text(f"""\
server: {{interfaces: [srv0], address: {SERVER_IP}, state_dir: {dhcp_lab.tmp}/st,
         api: {dhcp_lab.tmp}/st/api.sock}}
network: {{subnet: 10.77.0.0/24}}
pools: [{{name: w, nodes: [{{name: n1, mac: "02:00:00:00:00:01", ip: 10.77.0.21}}]}}]
""")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    proc = dhcp_lab.lab.spawn(dhcp_lab.server_ns, [sys.executable, "-m", "bootd", "serve", "-c",
                                                   str(cfg), "--log-format", "json"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        message = listener.recv(4096).decode()
        assert message.startswith("READY=1\nSTATUS=serving 1 nodes on srv0")
        env_dhcp = dhcp_lab.udhcpc()  # answered the moment READY was sent
        assert env_dhcp is not None and env_dhcp["ip"] == "10.77.0.21"
        proc.send_signal(signal.SIGHUP)
        assert listener.recv(4096) == b"RELOADING=1"
        assert listener.recv(4096).startswith(b"READY=1")
        proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096) == b"STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        listener.close()
        NetLab.stop(proc)


def test_sigterm_drains_transfers_in_flight(dhcp_lab: DhcpLab) -> None:
    require("tftp", "curl")
    dhcp_lab.lab.address(dhcp_lab.client_ns, "cli0", "10.77.0.2/24")
    root, img = big_files(dhcp_lab, 24)
    daemon = dhcp_lab.bootd(config(root, img), drain="30s")
    clients = slow_downloads(dhcp_lab)
    time.sleep(1.5)
    started = time.monotonic()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = dhcp_lab.lab.run(dhcp_lab.client_ns, [
        "curl", "-sS", "--max-time", "5", "-o", "/dev/null", f"tftp://{SERVER_IP}/big.bin"],
        check=False)
    assert refused.returncode != 0  # new work is refused while draining
    assert clients.wait(120) == 0, clients.stderr.read() if clients.stderr else ""
    assert daemon.proc.wait(60) == 0
    assert sha(dhcp_lab.tmp / "t.out") == sha(root / "big.bin")
    assert sha(dhcp_lab.tmp / "h.out") == sha(img / "rootfs")
    log = daemon.log.read_text()
    assert '"bootd draining"' in log and "cut short" not in log
    assert time.monotonic() - started < 35


def test_reload_while_large_transfers_are_in_flight(dhcp_lab: DhcpLab) -> None:
    require("tftp", "curl")
    dhcp_lab.lab.address(dhcp_lab.client_ns, "cli0", "10.77.0.2/24")
    root, img = big_files(dhcp_lab, 24)
    daemon = dhcp_lab.bootd(config(root, img))
    clients = slow_downloads(dhcp_lab)
    time.sleep(1.0)
    good = daemon.config.read_text()
    daemon.config.write_text(good.replace(
        '[{name: n1, mac: "02:00:00:00:00:01", ip: 10.77.0.2}]',
        '[{name: n1, mac: "02:00:00:00:00:01", ip: 10.77.0.2}, '
        '{name: n2, mac: "02:00:00:00:00:02", ip: 10.77.0.22}]'))
    api = dhcp_lab.tmp / "state" / "api.sock"
    reload = subprocess.run([sys.executable, "-m", "bootd", "reload", "--api", str(api)],
                            capture_output=True, text=True, timeout=60)
    assert reload.returncode == 0, reload.stderr
    daemon.config.write_text("pools: [this is: not valid")
    bad = subprocess.run([sys.executable, "-m", "bootd", "reload", "--api", str(api)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "YAML" in bad.stderr
    assert clients.wait(120) == 0, clients.stderr.read() if clients.stderr else ""
    assert sha(dhcp_lab.tmp / "t.out") == sha(root / "big.bin")
    assert sha(dhcp_lab.tmp / "h.out") == sha(img / "rootfs")
    dhcp_lab.set_client_mac("02:00:00:00:00:02")  # added by the good reload, kept after the bad
    env = dhcp_lab.udhcpc()
    assert env is not None and env["hostname"] == "n2"


def test_kill_9_during_dhcp_load_keeps_every_acked_lease(dhcp_lab: DhcpLab) -> None:
    """Every ACK bootd logged before kill -9 (it logs after the commit, before the reply)
    is in the store after a restart with the same client, and no address has two holders."""
    require("perfdhcp")
    daemon = dhcp_lab.bootd("""\
pools:
  - name: any
    dynamic: {range: 10.77.0.10-10.77.0.250}
""")
    dhcp_lab.lab.address(dhcp_lab.client_ns, "cli0", "10.77.0.2/24")
    perfdhcp = shutil.which("perfdhcp")
    assert perfdhcp is not None and daemon.proc is not None
    load = dhcp_lab.lab.spawn(dhcp_lab.client_ns, [
        perfdhcp, "-4", "-l", "cli0", "-r", "100", "-R", "200", "-p", "4", SERVER_IP],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    daemon.stop(signal.SIGKILL)
    acked = {(str(e["mac"]), str(e["ip"])) for e in daemon.events()
             if e.get("event") == "dhcp ack"}
    load.communicate(timeout=60)
    daemon.start()
    import sqlite3

    db = sqlite3.connect(dhcp_lab.tmp / "state" / "bootd.sqlite3")
    rows = db.execute("SELECT ip, mac FROM leases WHERE state = 'bound'").fetchall()
    db.close()
    assert len(acked) > 20, "perfdhcp got too few ACKs before the kill to test anything"
    ips = [ip for ip, _ in rows]
    macs = [mac for _, mac in rows]
    assert len(ips) == len(set(ips)) and len(macs) == len(set(macs))
    held = {(mac, ip) for ip, mac in rows}
    assert acked <= held, sorted(acked - held)[:5]
    # and a held client asking again after the restart gets the same address
    ip, mac = rows[0]
    dhcp_lab.set_client_mac(mac)
    dhcp_lab.lab.run(dhcp_lab.client_ns, ["ip", "addr", "flush", "dev", "cli0"])
    again = dhcp_lab.udhcpc()
    assert again is not None and again["ip"] == ip
