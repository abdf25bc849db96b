#!/usr/bin/env python3
"""Whole-fleet boot storm: N simulated nodes boot at once, against bootd and against the
kubefarm stack (dnsmasq for DHCP and TFTP, nginx for the static files), same run.

    sudo .venv/bin/python bench/storm.py [--nodes 1000] [--window 10] [--loss 10]
        [--kernel-kib 256] [--initrd-kib 512] [--rootfs-kib 2048] [--stacks bootd,kubefarm]

Every node plays the real sequence from its own MAC and (reserved) address: DHCP as PXE
firmware (option 60 PXEClient, arch 0) -> TFTP of undionly.kpxe (blksize 1432, lock-step)
-> DHCP as iPXE (user class iPXE) -> its per-node iPXE script -> kernel, initrd and rootfs
over HTTP (scaled-down files; the rootfs checked against the script's sha256) -> DHCP as
the booted OS -> its join.sh -> a `joined` report. Arrivals are spread evenly over
--window seconds. The nodes are one asyncio client in a client namespace that is also
their rack's router and DHCP relay: their subnet (10.90.0.0/16) is one routed hop from the
servers' (10.89.0.0/24), DHCP goes through the relay address (giaddr), and each node's TFTP
socket and HTTP connections are bound to its own address. With --loss both ends of the
cable drop that share of what they receive. For the kubefarm stack nginx serves the
same per-node scripts and join.sh files (rendered by bootd's templates) as static files
and answers the report with 204.

Printed per stack: time until all joined, per-node boot time p50/p99, failures,
retransmissions (DHCP, TFTP), server CPU seconds and peak RSS; for bootd also whether
`bootd status` agrees (every node joined, each stage of the boot recorded). Traffic stays
inside the namespaces this script creates; every run is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bootd.dhcp.packet import DhcpPacket, MessageType, decode, encode
from bootd.lab.netlab import NetLab, netns_available

ROOT_DIR = Path(__file__).resolve().parents[1]
SERVER_IP = "10.89.0.1"  # the boot server's own segment (10.89.0.0/24)
CLIENT_IP = "10.89.0.2"  # the client namespace's end of the cable: the nodes' router
RELAY_IP = "10.90.0.254"  # the relay agent (giaddr) of the nodes' subnet 10.90.0.0/16
NETMASK = "255.255.0.0"
RELAY = IPv4Address(RELAY_IP)
TOKEN = "abcdef.0123456789abcdef"
IPXE = Path("/usr/lib/ipxe/undionly.kpxe")
PXE_VENDOR = b"PXEClient:Arch:00000:UNDI:002001"


def node_mac(i: int) -> str:
    return f"02:5a:00:00:{i >> 8:02x}:{i & 0xff:02x}"


def node_ip(i: int) -> str:
    return f"10.90.{1 + i // 250}.{1 + i % 250}"


# ---------------------------------------------------------------------------- the client


@dataclass
class NodeResult:
    name: str
    ok: bool = False
    error: str | None = None
    started: float = 0.0
    joined: float = 0.0
    dhcp_retries: int = 0
    tftp_retries: int = 0
    stages: dict[str, float] = field(default_factory=dict)


class DhcpClient(asyncio.DatagramProtocol):
    """One socket on port 68 for every simulated node; replies matched by xid."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Queue[DhcpPacket]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        try:
            packet = decode(data)
        except ValueError:
            return
        queue = self.waiting.get(packet.xid)
        if queue is not None and packet.op == 2:
            queue.put_nowait(packet)

    async def exchange(self, mac: str, kind: str, result: NodeResult) -> DhcpPacket:
        """DISCOVER/OFFER/REQUEST/ACK as `kind` (pxe, ipxe, os); the ACK."""
        xid = random.getrandbits(32)
        queue: asyncio.Queue[DhcpPacket] = asyncio.Queue()
        self.waiting[xid] = queue
        chaddr = bytes.fromhex(mac.replace(":", "")) + b"\0" * 10
        opts: dict[int, bytes] = {55: bytes([1, 3, 6, 15, 66, 67])}
        if kind in ("pxe", "ipxe"):
            opts[60] = PXE_VENDOR
            opts[93] = b"\0\0"
            opts[94] = b"\x01\x02\x01"
        if kind == "ipxe":
            opts[77] = b"iPXE"
        try:
            offer = await self._ask(DhcpPacket(op=1, xid=xid, hops=1, giaddr=RELAY,
                                               chaddr=chaddr,
                                               options={53: bytes([MessageType.DISCOVER]),
                                                        **opts}),
                                    queue, MessageType.OFFER, result)
            request = {53: bytes([MessageType.REQUEST]), 50: offer.yiaddr.packed,
                       54: offer.options.get(54, b""), **opts}
            return await self._ask(DhcpPacket(op=1, xid=xid, hops=1, giaddr=RELAY,
                                              chaddr=chaddr,
                                              options=request),
                                   queue, MessageType.ACK, result)
        finally:
            del self.waiting[xid]

    async def _ask(self, packet: DhcpPacket, queue: asyncio.Queue[DhcpPacket],
                   want: MessageType, result: NodeResult) -> DhcpPacket:
        data = encode(packet)
        # PXE ROMs wait 4, 8, 16 and 32 s (PXE 2.1); shorter here, but as long in all
        for attempt, wait in enumerate((1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0)):
            if attempt:
                result.dhcp_retries += 1
            assert self.transport is not None
            self.transport.sendto(data, (SERVER_IP, 67))
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                try:
                    reply = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                if reply.options.get(53) == bytes([want]):
                    return reply
        raise RuntimeError(f"no DHCP {want.name}")


async def tftp_get(server: str, ip: str, name: str, result: NodeResult) -> int:
    """Lock-step TFTP with blksize 1432 and tsize, as PXE ROMs ask; returns the size.
    After 4 silent seconds the transfer starts over from a new port (a lost OACK whose
    retransmissions were lost too leaves the server nothing to answer), 3 times at most."""
    for _ in range(3):
        size = await _tftp_once(server, ip, name, result)
        if size is not None:
            return size
    raise RuntimeError("TFTP timed out")


async def _tftp_once(server: str, ip: str, name: str, result: NodeResult) -> int | None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.setblocking(False)
    try:
        rrq = b"\0\1" + name.encode() + b"\0octet\0blksize\x001432\0tsize\x000\0"
        last: bytes = rrq
        peer: tuple[str, int] = (server, 69)
        expected, size, blksize = 1, 0, 512
        retries = 0
        while True:
            await loop.sock_sendto(sock, last, peer)
            try:
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 65536), 1.0)
            except TimeoutError:
                retries += 1
                result.tftp_retries += 1
                if retries >= 4:
                    return None
                continue
            retries = 0
            opcode = int.from_bytes(data[:2], "big")
            if opcode == 6:  # OACK
                peer = addr
                fields = data[2:].split(b"\0")
                opts = dict(zip(fields[0::2], fields[1::2], strict=False))
                blksize = int(opts.get(b"blksize", b"512"))
                last = b"\0\4\0\0"
            elif opcode == 3:
                peer = addr
                block = int.from_bytes(data[2:4], "big")
                if block == expected & 0xFFFF:
                    size += len(data) - 4
                    expected += 1
                    last = b"\0\4" + data[2:4]
                    if len(data) - 4 < blksize:
                        await loop.sock_sendto(sock, last, peer)
                        return size
                else:
                    last = b"\0\4" + ((expected - 1) & 0xFFFF).to_bytes(2, "big")
            elif opcode == 5:
                raise RuntimeError(f"TFTP error {data[4:-1].decode(errors='replace')}")
    finally:
        sock.close()


async def http(server: str, ip: str, method: str, path: str, body: bytes = b"",
               ) -> tuple[int, bytes]:
    """One HTTP/1.1 request from `ip` (a fresh connection, as iPXE and wget make)."""
    for attempt in range(5):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                server, 8080, local_addr=(ip, 0)), 10)
            try:
                head = (f"{method} {path} HTTP/1.1\r\nHost: {server}:8080\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                        + ("Content-Type: application/json\r\n" if body else "") + "\r\n")
                writer.write(head.encode() + body)
                await writer.drain()
                raw = await asyncio.wait_for(reader.read(), 60)
            finally:
                writer.close()
            status = int(raw.split(b" ", 2)[1])
            payload = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
            if status >= 500 and attempt < 4:
                await asyncio.sleep(1)
                continue
            return status, payload
        except (OSError, TimeoutError, IndexError, ValueError):
            if attempt == 4:
                raise
            await asyncio.sleep(1)
    raise RuntimeError("unreachable")


async def boot(i: int, start_at: float, dhcp: DhcpClient, server: str) -> NodeResult:
    mac, ip = node_mac(i), node_ip(i)
    result = NodeResult(f"s{i:04d}")
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    result.started = time.monotonic()

    def mark(stage: str) -> None:
        result.stages[stage] = time.monotonic() - result.started

    try:
        ack = await dhcp.exchange(mac, "pxe", result)
        if str(ack.yiaddr) != ip:
            raise RuntimeError(f"DHCP gave {ack.yiaddr}, not {ip}")
        # the boot file is in `file` or in option 67, the TFTP server in siaddr or 66
        bootfile = (ack.options.get(67) or ack.file).rstrip(b"\0").decode()
        tftp_server = (ack.options.get(66, b"").rstrip(b"\0").decode()
                       or (str(ack.siaddr) if int(ack.siaddr) else server))
        if not bootfile:
            raise RuntimeError("no boot file in the DHCP answer")
        mark("dhcp-pxe")
        await tftp_get(tftp_server, ip, bootfile, result)
        mark("tftp")
        await dhcp.exchange(mac, "ipxe", result)
        mark("dhcp-ipxe")
        status, script = await http(server, ip, "GET", f"/nodes/{mac.replace(':', '-')}/boot.ipxe")
        text = script.decode(errors="replace")
        kernel = re.search(r"kernel --name vmlinuz http://[^/\s]+(\S+)", text)
        initrd = re.search(r"initrd --name initrd http://[^/\s]+(\S+)", text)
        rootfs = re.search(r"bootd\.rootfs=http://[^/\s]+(\S+)", text)
        sha = re.search(r"bootd\.rootfs_sha256=(\w+)", text)
        if status != 200 or not (kernel and initrd and rootfs and sha):
            raise RuntimeError(f"no boot script ({status})")
        mark("script")
        for path in (kernel.group(1), initrd.group(1)):
            status, _ = await http(server, ip, "GET", path)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status}")
        mark("kernel+initrd")
        status, data = await http(server, ip, "GET", rootfs.group(1))
        if status != 200 or hashlib.sha256(data).hexdigest() != sha.group(1):
            raise RuntimeError(f"rootfs: {status}, sha256 mismatch or short")
        mark("rootfs")
        await dhcp.exchange(mac, "os", result)
        mark("dhcp-os")
        status, join = await http(server, ip, "GET", f"/nodes/{mac}/join.sh")
        if status != 200 or b"kubeadm" not in join:
            raise RuntimeError(f"join.sh: {status}")
        mark("join-script")
        status, _ = await http(server, ip, "POST", "/api/v1/events",
                               json.dumps({"stage": "joined", "message": "storm"}).encode())
        if status >= 300:
            raise RuntimeError(f"report: {status}")
        result.joined = time.monotonic()
        result.ok = True
    except Exception as exc:  # a failed node is a result, not a crash of the storm
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result.error = f"{type(exc).__name__}: {exc} (line {where.lineno})"
    return result


async def storm(n: int, window: float, timeout: float, server: str) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((RELAY_IP, 67))  # relayed: the servers answer the relay agent, unicast
    transport, dhcp = await loop.create_datagram_endpoint(DhcpClient, sock=sock)
    t0 = time.monotonic() + 0.5
    tasks = [asyncio.create_task(boot(i, t0 + window * i / n, dhcp, server))
             for i in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=timeout + window)
    for task in pending:
        task.cancel()
    transport.close()
    results = [t.result() for t in done]
    results += [NodeResult(f"pending-{i}", error="timed out") for i in range(len(pending))]
    return {"t0": t0, "nodes": [vars(r) for r in results]}


def client_main(args: argparse.Namespace) -> int:
    out = asyncio.run(storm(args.nodes, args.window, args.timeout, SERVER_IP))
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------- the servers


def server_config(tmp: Path, img: Path, n: int) -> str:
    nodes = "\n".join(f'      - {{name: s{i:04d}, mac: "{node_mac(i)}", ip: {node_ip(i)}}}'
                      for i in range(n))
    return f"""\
server: {{interfaces: [srv0], address: {SERVER_IP}, state_dir: {tmp}/bootd-state,
         api: {tmp}/bootd-state/api.sock}}
networks:
  - {{name: core, subnet: 10.89.0.0/24}}
  - {{name: nodes, subnet: 10.90.0.0/16, gateway: {RELAY_IP}, lease_time: 1h}}
tftp: {{root: {tmp}/tftp, fallback_dirs: [/usr/lib/ipxe]}}
images:
  k8s: {{kernel: {img}/vmlinuz, initrd: {img}/initrd.img, rootfs: {img}/rootfs.squashfs,
        cmdline: "console=ttyS0"}}
clusters:
  prod: {{api_server: "https://10.90.0.10:6443", ca_cert_hash: "sha256:{'c' * 64}",
          token: {{value: {TOKEN}}}}}
defaults: {{image: k8s, cluster: prod}}
pools:
  - name: storm
    nodes:
{nodes}
"""


def start_bootd(lab: NetLab, ns: str, tmp: Path, img: Path, n: int,
                ) -> list[subprocess.Popen[bytes]]:
    shutil.rmtree(tmp / "bootd-state", ignore_errors=True)
    (tmp / "tftp").mkdir(exist_ok=True)
    config = tmp / "bootd.yaml"
    config.write_text(server_config(tmp, img, n))
    return [lab.start_bootd(ns, config, tmp / "bootd.log", timeout=60)]


def start_kubefarm(lab: NetLab, ns: str, tmp: Path, img: Path, n: int,
                   ) -> list[subprocess.Popen[bytes]]:
    """dnsmasq (DHCP with a host entry per node, TFTP) and nginx with the per-node files
    bootd would render, as static files."""
    from bootd.fleet.config import parse_config
    from bootd.fleet.images import BootImage
    from bootd.fleet.inventory import Inventory
    from bootd.fleet.render import ipxe_node, join_script

    config = parse_config(server_config(tmp, img, n))
    www = tmp / "www"
    shutil.rmtree(www, ignore_errors=True)
    (www / "images" / "k8s").mkdir(parents=True)
    for part, name in (("kernel", "vmlinuz"), ("initrd", "initrd.img"),
                       ("rootfs", "rootfs.squashfs")):
        os.link(img / name, www / "images" / "k8s" / part)
    rootfs_sha = hashlib.sha256((img / "rootfs.squashfs").read_bytes()).hexdigest()
    image = BootImage("k8s", None, config.images["k8s"])
    url = f"http://{SERVER_IP}:8080"
    hosts = []
    for node in Inventory(config).nodes:
        mac = node.macs[0]
        d = www / "nodes" / mac.replace(":", "-")
        d.mkdir(parents=True)
        (d / "boot.ipxe").write_text(ipxe_node(node, mac, image, url, rootfs_sha))
        j = www / "nodes" / mac
        j.mkdir(parents=True)
        (j / "join.sh").write_text(join_script(node, mac, url, config.clusters["prod"], TOKEN))
        hosts.append(f"{mac},{node.ip},{node.name}")
    (tmp / "dnsmasq.hosts").write_text("\n".join(hosts) + "\n")
    (tmp / "dnsmasq-tftp").mkdir(exist_ok=True)
    shutil.copy(IPXE, tmp / "dnsmasq-tftp" / "undionly.kpxe")
    leases = tmp / "dnsmasq.leases"
    leases.unlink(missing_ok=True)
    log = tmp / "dnsmasq.log"
    dnsmasq = lab.spawn(ns, [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=srv0",
        "--bind-interfaces", f"--dhcp-range=10.90.0.0,static,{NETMASK},1h",
        f"--dhcp-hostsfile={tmp / 'dnsmasq.hosts'}", f"--dhcp-leasefile={leases}",
        "--dhcp-lease-max=200000", "--no-ping", "--dhcp-authoritative",
        "--dhcp-userclass=set:ipxe,iPXE", "--dhcp-boot=tag:!ipxe,undionly.kpxe",
        f"--dhcp-boot=tag:ipxe,{url}/boot.ipxe", "--enable-tftp",
        f"--tftp-root={tmp / 'dnsmasq-tftp'}", "--tftp-max=2000", "--log-facility=-",
        "--user=root", "--group=root", f"--pid-file={tmp / 'dnsmasq.pid'}"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    prefix = tmp / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
user root; daemon off; worker_processes 2; error_log {prefix}/error.log; pid {prefix}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  sendfile on; tcp_nopush on; access_log off; default_type application/octet-stream;
  client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp;
  fastcgi_temp_path {prefix}/tmp; uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;
  server {{
    listen {SERVER_IP}:8080 backlog=4096;
    root {www};
    location = /api/v1/events {{ return 204; }}
  }}
}}
""")
    nginx = lab.spawn(ns, [str(find_nginx()), "-p", str(prefix), "-c", str(conf)],
                      stdout=(tmp / "nginx.log").open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "DHCP, " not in log.read_text(errors="replace") or not (prefix / "nginx.pid").exists():
        if time.monotonic() > deadline or dnsmasq.poll() is not None or nginx.poll() is not None:
            raise SystemExit("kubefarm stack did not start:\n"
                             + log.read_text(errors="replace")[-1500:])
        time.sleep(0.1)
    return [dnsmasq, nginx]


def find_nginx() -> Path:
    for candidate in (shutil.which("nginx"), ROOT_DIR / ".cache/incumbents/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise SystemExit("needs nginx (scripts/install-deps unpacks it)")


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def cpu_and_rss(procs: list[subprocess.Popen[bytes]]) -> tuple[float, float]:
    """CPU seconds and peak RSS (MiB) of the servers (children of `ip netns exec`)."""
    cpu, rss = 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for proc in procs:
        for p in tree(proc.pid):
            try:
                stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                status = Path(f"/proc/{p}/status").read_text()
            except OSError:
                continue
            cpu += (int(stat[11]) + int(stat[12])) / tick
            m = re.search(r"VmHWM:\s+(\d+) kB", status)
            rss += int(m.group(1)) / 1024 if m else 0
    return cpu, rss


def agreement(tmp: Path, joined_names: list[str]) -> str:
    """Does `bootd status` say what the clients did: every node that joined is `joined`
    there, with each step of its boot recorded (20 sampled)?"""
    out = subprocess.run(["curl", "-sS", "-f", "--unix-socket",
                          str(tmp / "bootd-state" / "api.sock"),
                          "http://bootd/api/v1/status"], capture_output=True, text=True,
                         timeout=60, check=False)
    if out.returncode != 0:
        return f"no status: {out.stderr.strip()}"
    rows = {r["node"]: r for r in json.loads(out.stdout)["nodes"]}
    joined = sum(1 for name in joined_names if rows.get(name, {}).get("stage") == "joined")
    sample = random.sample(joined_names, min(len(joined_names), 20))
    want = {"dhcp-ack", "tftp", "ipxe-script", "kernel", "initrd", "rootfs", "join-script",
            "joined"}
    # a TFTP transfer whose last ACK was lost is recorded when bootd stops waiting for
    # that ACK (its retransmissions), up to ~40 s after the node moved on: wait for it
    deadline = time.monotonic() + 60
    while True:
        missing: dict[str, set[str]] = {}
        for name in sample:
            detail = subprocess.run(["curl", "-sS", "-f", "--unix-socket",
                                     str(tmp / "bootd-state" / "api.sock"),
                                     f"http://bootd/api/v1/status/{name}"],
                                    capture_output=True, text=True, timeout=60, check=False)
            steps = {s["stage"] for a in json.loads(detail.stdout or "{}").get("history", [])
                     for s in a["steps"]} if detail.returncode == 0 else set()
            if want - steps:
                missing[name] = want - steps
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    late = "" if not missing else "; missing " + ", ".join(
        f"{name}: {sorted(stages)}" for name, stages in sorted(missing.items()))
    return (f"{joined} of the {len(joined_names)} nodes that joined are `joined` in bootd "
            f"status; {len(sample)} sampled timelines"
            + (": every stage recorded" if not missing else late))


def run_stack(lab: NetLab, srv: str, cli: str, tmp: Path, img: Path, stack: str,
              args: argparse.Namespace) -> dict[str, Any]:
    start = start_bootd if stack == "bootd" else start_kubefarm
    procs = start(lab, srv, tmp, img, args.nodes)
    before, _ = cpu_and_rss(procs)
    try:
        out = lab.run(cli, [sys.executable, str(Path(__file__).resolve()), "--client",
                            "--nodes", str(args.nodes), "--window", str(args.window),
                            "--timeout", str(args.timeout)],
                      timeout=args.timeout + args.window + 120)
        after, rss = cpu_and_rss(procs)
        data = json.loads(out.stdout)
        agree = (agreement(tmp, [r["name"] for r in data["nodes"] if r["ok"]])
                 if stack == "bootd" else "-")
    finally:
        for proc in procs:
            lab.stop(proc)
        if os.environ.get("STORM_DEBUG"):
            for log in ("dnsmasq.log", "bootd.log"):
                if (tmp / log).exists():
                    lines = [x for x in (tmp / log).read_text().splitlines()
                             if '"warning"' in x or '"error"' in x or "dnsmasq" in log]
                    print(f"--- {log}: {len(lines)} lines\n" + "\n".join(lines[-15:]))
    nodes = data["nodes"]
    ok = [r for r in nodes if r["ok"]]
    times = sorted(r["joined"] - r["started"] for r in ok)
    errors: dict[str, int] = {}
    for r in nodes:
        if not r["ok"]:
            errors[str(r["error"])[:80]] = errors.get(str(r["error"])[:80], 0) + 1
    return {
        "joined": len(ok), "failed": len(nodes) - len(ok),
        "all_joined_s": max(r["joined"] for r in ok) - data["t0"] if ok else float("nan"),
        "p50": statistics.median(times) if times else float("nan"),
        "p99": times[min(len(times) - 1, int(len(times) * 0.99))] if times else float("nan"),
        "dhcp_retries": sum(r["dhcp_retries"] for r in nodes),
        "tftp_retries": sum(r["tftp_retries"] for r in nodes),
        "cpu_s": after - before, "rss_mib": rss, "errors": errors, "status": agree,
        "slowest": max(ok, key=lambda r: r["joined"] - r["started"]) if ok else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--window", type=float, default=10.0, help="arrivals spread (s)")
    parser.add_argument("--loss", type=int, default=0, help="%% lost on the client link")
    parser.add_argument("--kernel-kib", type=int, default=256)
    parser.add_argument("--initrd-kib", type=int, default=512)
    parser.add_argument("--rootfs-kib", type=int, default=2048)
    parser.add_argument("--stacks", default="kubefarm,bootd")
    parser.add_argument("--timeout", type=float, default=300.0, help="per stack (s)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)
    if (why := netns_available()) is not None:
        raise SystemExit(why)
    if not 0 < args.nodes <= 60000:
        raise SystemExit("--nodes: 1 to 60000")
    for tool in ("dnsmasq", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} (scripts/install-deps)")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bootd-bench-storm-") as d, NetLab("bds") as lab:
        tmp = Path(d)
        img = tmp / "img"
        img.mkdir()
        for name, kib in (("vmlinuz", args.kernel_kib), ("initrd.img", args.initrd_kib),
                          ("rootfs.squashfs", args.rootfs_kib)):
            (img / name).write_bytes(os.urandom(kib << 10))
        srv, cli = lab.namespace("s"), lab.namespace("c")
        # The nodes sit one routed hop from the server, behind a relay, as racks do:
        # the server keeps one neighbour (the router) instead of a thousand (the kernel's
        # neighbour table holds 1,024 at most, host-wide: a flat storm lost packets to
        # forgotten neighbours), and DHCP is relayed (giaddr) as in a routed datacenter.
        lab.veth(srv, "srv0", cli, "cli0")
        lab.address(srv, "srv0", f"{SERVER_IP}/24")
        lab.address(cli, "cli0", f"{CLIENT_IP}/24")
        lab.run(srv, ["ip", "route", "add", "10.90.0.0/16", "via", CLIENT_IP])
        batch = tmp / "addresses"
        batch.write_text(f"address add {RELAY_IP}/32 dev lo\n" + "".join(
            f"address add {node_ip(i)}/32 dev lo\n" for i in range(args.nodes)))
        lab.run(cli, ["ip", "-batch", str(batch)], timeout=120)
        for ns in (srv, cli):  # room for a storm's connections, datagrams and neighbours
            # (the default neighbour table holds 1,024 at most: a server with a thousand
            # nodes on one segment drops packets to the ones it must forget, as a real
            # boot server's host would, so both stacks get a bigger one)
            lab.run(ns, ["sysctl", "-q", "-w", "net.core.somaxconn=4096",
                         "net.ipv4.ip_local_port_range=10000 65000",
                         "net.ipv4.neigh.default.gc_thresh1=4096",
                         "net.ipv4.neigh.default.gc_thresh2=8192",
                         "net.ipv4.neigh.default.gc_thresh3=16384"], check=False)
        if args.loss:
            for ns, iface in ((srv, "srv0"), (cli, "cli0")):
                lab.lose_packets(ns, iface, args.loss)
        for stack in args.stacks.split(","):
            print(f"  {stack}: {args.nodes} nodes over {args.window:g}s ...", flush=True)
            results[stack] = run_stack(lab, srv, cli, tmp, img, stack, args)
    print(f"\nstorm: {args.nodes} nodes, arrivals over {args.window:g}s, loss {args.loss}% "
          f"on the client link; kernel {args.kernel_kib} KiB, initrd {args.initrd_kib} KiB, "
          f"rootfs {args.rootfs_kib} KiB; 2 cores shared by client and servers")
    print(f"{'stack':10}{'joined':>8}{'failed':>8}{'all joined s':>14}{'p50 s':>8}"
          f"{'p99 s':>8}{'DHCP rtx':>10}{'TFTP rtx':>10}{'CPU s':>8}{'RSS MiB':>9}")
    for name, r in results.items():
        print(f"{name:10}{r['joined']:>8}{r['failed']:>8}{r['all_joined_s']:>14.1f}"
              f"{r['p50']:>8.2f}{r['p99']:>8.2f}{r['dhcp_retries']:>10}{r['tftp_retries']:>10}"
              f"{r['cpu_s']:>8.1f}{r['rss_mib']:>9.1f}")
        if r["slowest"] is not None:
            slow = r["slowest"]
            marks = ", ".join(f"{k} {v:.1f}" for k, v in slow["stages"].items())
            print(f"    slowest {slow['name']} (DHCP rtx {slow['dhcp_retries']}, TFTP rtx "
                  f"{slow['tftp_retries']}): {marks}")
        for error, count in list(r["errors"].items())[:5]:
            print(f"    {count} x {error}")
    if "bootd" in results:
        print(f"\nbootd status: {results['bootd']['status']}")
    if "bootd" in results and "kubefarm" in results:
        b, k = results["bootd"], results["kubefarm"]
        storm_ratio = float(b["all_joined_s"]) / float(k["all_joined_s"])
        cpu_ratio = float(b["cpu_s"]) / max(0.01, float(k["cpu_s"]))
        print(f"ratio bootd/kubefarm storm time: x{storm_ratio:.2f} (<= 1.0 is the goal), "
              f"CPU x{cpu_ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
