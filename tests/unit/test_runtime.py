"""The runtime snapshot: a reload builds a new one whole and swaps it; DHCP, TFTP and
HTTP all answer from it at once; work in flight keeps the snapshot it started with; an
invalid config changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bootd.dhcp.options import Opt
from bootd.dhcp.packet import BOOTREQUEST, DhcpPacket, MessageType, decode, encode
from bootd.dhcp.service import DhcpService
from bootd.fleet.config import load_config
from bootd.fleet.mac import mac_to_bytes
from bootd.http.admin import admin_app
from bootd.http.boot import boot_app
from bootd.ops.metrics import Metrics
from bootd.runtime import Runtime, Snapshot
from bootd.state.store import Store
from bootd.tftp.protocol import Opcode, encode_ack, encode_request
from bootd.tftp.server import start_tftp

MAC = "02:00:00:00:00:01"
TOKEN_A, TOKEN_B = "aaaaaa.aaaaaaaaaaaaaaaa", "bbbbbb.bbbbbbbbbbbbbbbb"

# Every setting a snapshot derives, in two versions. The node's address is loopback so
# the HTTP test client's requests come from it (join.sh is served only to the node).
A = dict(address="127.0.0.53", gateway="127.0.0.254", dns="127.0.0.8", domain="a.example",
         lease="1h", root="root-a", blksize=512, transfers=5, attempts=6, interval="10s",
         cmdline="console=ttyS0", api="https://10.0.0.10:6443", token=TOKEN_A,
         stall="10m", keep=10, name="first", ip="127.0.0.1", tag="", extra="")
B = dict(address="127.0.0.54", gateway="127.0.0.253", dns="127.0.0.9", domain="b.example",
         lease="2h", root="root-b", blksize=1024, transfers=7, attempts=3, interval="5s",
         cmdline="console=ttyS1", api="https://10.0.0.11:6443", token=TOKEN_B,
         stall="5m", keep=3, name="renamed", ip="127.0.0.1", tag=", tags: [debug]",
         extra='  - name: any\n    dynamic: {range: 127.0.1.0-127.0.1.9}\n')

CONFIG = """\
server: {{interfaces: [lo], address: {address}, state_dir: {tmp}/state, http_port: {port},
         api: {tmp}/api.sock}}
network: {{subnet: 127.0.0.0/8, gateway: {gateway}, dns: [{dns}], domain: {domain},
          lease_time: {lease}}}
tftp: {{root: {tmp}/{root}, fallback_dirs: [], max_blksize: {blksize},
       max_transfers: {transfers}}}
ipxe: {{attempts: {attempts}, retry_interval: {interval}}}
events: {{stall_after: {stall}, keep_attempts: {keep}}}
images:
  k8s: {{kernel: {tmp}/vmlinuz, initrd: {tmp}/initrd, cmdline: "{cmdline}"}}
clusters:
  prod: {{api_server: "{api}", ca_cert_hash: "sha256:{zeros}", token: {{value: {token}}}}}
defaults: {{image: k8s, cluster: prod}}
tags:
  debug: {{kernel_args: [debug]}}
pools:
  - name: w
    nodes:
      - {{name: {name}, mac: "{mac}", ip: {ip}{tag}}}
{extra}"""


def write(tmp: Path, values: dict[str, object], port: int = 8080) -> Path:
    path = tmp / "bootd.yaml"
    path.write_text(CONFIG.format(tmp=tmp, port=port, zeros="0" * 64, mac=MAC, **values))
    return path


def runtime(tmp: Path, values: dict[str, object] = A) -> tuple[Runtime, Path]:
    cfg = write(tmp, values)
    return Runtime(cfg, load_config(cfg), Store.in_state_dir(tmp / "state"), Metrics()), cfg


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"K" * 1000)
    (tmp_path / "initrd").write_bytes(b"I" * 1000)
    for root, fill in (("root-a", b"a"), ("root-b", b"b")):
        (tmp_path / root).mkdir()
        (tmp_path / root / "boot.bin").write_bytes(fill * 5000)
    return tmp_path


def discover() -> bytes:
    return encode(DhcpPacket(op=BOOTREQUEST, xid=7, chaddr=mac_to_bytes(MAC), flags=0x8000,
                             options={Opt.MESSAGE_TYPE: bytes((MessageType.DISCOVER,))}))


class TftpClient:
    """A lock-step TFTP client on a loopback socket, one packet at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.server = ("127.0.0.1", port)
        self.peer = self.server

    async def recv(self) -> bytes:
        loop = asyncio.get_running_loop()
        data, self.peer = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65536), 5)
        return data

    async def request(self, name: str, blksize: int) -> bytes:
        self.sock.sendto(encode_request(Opcode.RRQ, name, options={"blksize": str(blksize)}),
                         self.server)
        oack = await self.recv()
        assert oack[:2] == struct.pack("!H", Opcode.OACK), oack
        self.sock.sendto(encode_ack(0), self.peer)
        return await self.recv()

    async def finish(self, first: bytes) -> tuple[bytes, int]:
        """ACK block by block until the short one; the data and the block size seen."""
        blocks, size, packet = [first[4:]], len(first) - 4, first
        while len(packet) - 4 == size:
            self.sock.sendto(encode_ack(struct.unpack("!H", packet[2:4])[0]), self.peer)
            packet = await self.recv()
            blocks.append(packet[4:])
        self.sock.sendto(encode_ack(struct.unpack("!H", packet[2:4])[0]), self.peer)
        return b"".join(blocks), size


async def test_one_reload_moves_dhcp_tftp_and_http_to_the_new_snapshot(files: Path) -> None:
    rt, _ = runtime(files)
    old = rt.snapshot
    dhcp = DhcpService(lambda: rt.live.current.dhcp, rt.store, rt.metrics, rt.recorder)
    tftp = await start_tftp(lambda: rt.live.current.tftp, 0, host="127.0.0.1")
    assert tftp.transport is not None
    boot = TestClient(TestServer(boot_app(rt.live.view(lambda s: s.boot), rt.metrics),
                                 host="127.0.0.1"))
    admin = TestClient(TestServer(admin_app(rt.live.view(lambda s: s.admin), rt.metrics,
                                            rt.recorder), host="127.0.0.1"))
    await boot.start_server()
    await admin.start_server()
    port = tftp.transport.get_extra_info("sockname")[1]
    in_flight = TftpClient(port)
    try:
        first = await in_flight.request("boot.bin", 1468)  # started under A
        assert len(first) - 4 == 512

        write(files, B)
        result = rt.reload()
        assert result.ok and result.restart_required == []
        new = rt.snapshot
        for field in dataclasses.fields(Snapshot):  # nothing carried over by accident
            assert getattr(new, field.name) is not getattr(old, field.name), field.name

        # DHCP: the address, gateway, DNS, domain, lease time and siaddr of B
        reply = dhcp.handle(discover(), "lo", 1000.0)
        assert reply is not None
        answer = decode(reply.payload)
        assert answer.yiaddr == IPv4Address("127.0.0.1")
        assert answer.siaddr == IPv4Address("127.0.0.54")
        assert answer.options[Opt.ROUTER] == IPv4Address("127.0.0.253").packed
        assert answer.options[Opt.DNS] == IPv4Address("127.0.0.9").packed
        assert answer.options[Opt.DOMAIN_NAME] == b"b.example"
        assert answer.options[Opt.LEASE_TIME] == struct.pack("!I", 7200)
        assert answer.options[Opt.HOSTNAME] == b"renamed"

        # TFTP: a new request reads root B with B's block size cap ...
        fresh = TftpClient(port)
        data, size = await fresh.finish(await fresh.request("boot.bin", 1468))
        assert data == b"b" * 5000 and size == 1024
        # ... while the transfer started before the reload keeps A's file and limits
        data, size = await in_flight.finish(first)
        assert data == b"a" * 5000 and size == 512

        # HTTP boot network: URL, image cmdline, merged tags, iPXE retries, token of B
        script = await (await boot.get(f"/nodes/{MAC}/boot.ipxe")).text()
        assert "http://127.0.0.54:8080/images/k8s/kernel console=ttyS1 debug" in script
        assert "bootd.node=renamed" in script
        unknown = await (await boot.get("/nodes/52:54:00:00:00:77/boot.ipxe")).text()
        assert "no image is configured" not in unknown and "bootd.node=node-52" in unknown
        join = await (await boot.get(f"/nodes/{MAC}/join.sh")).text()
        assert TOKEN_B in join and "10.0.0.11:6443" in join and TOKEN_A not in join

        # admin API and the recorder's policy
        nodes = await (await admin.get("/api/v1/nodes")).json()
        assert [n["name"] for n in nodes] == ["renamed"]
        assert rt.recorder.policy().keep_attempts == 3
        assert rt.recorder.policy().stall_after == 300
        assert tftp.settings().max_transfers == 7
    finally:
        for client in (in_flight,):
            client.sock.close()
        tftp.close()
        await boot.close()
        await admin.close()
        rt.store.close()


def test_invalid_reload_keeps_running_snapshot(files: Path) -> None:
    rt, cfg = runtime(files)
    before = rt.snapshot
    cfg.write_text(cfg.read_text().replace("127.0.0.0/8", "10.0.0.0/24"))
    result = rt.reload()
    assert not result.ok
    assert any("is outside network.subnet" in e for e in result.errors)
    assert rt.snapshot is before


def test_restart_only_settings_are_reported_and_kept(files: Path) -> None:
    rt, _ = runtime(files)
    write(files, A, port=9090)
    result = rt.reload()
    assert result.ok and result.restart_required == ["server.http_port"]
    assert rt.snapshot.config.server.http_port == 8080
    assert rt.snapshot.boot.url_for(None) == "http://127.0.0.53:8080"


def test_token_providers_survive_a_reload_that_keeps_clusters(files: Path) -> None:
    rt, _ = runtime(files)
    providers = rt.snapshot.boot.tokens
    write(files, {**A, "domain": "c.example"})
    assert rt.reload().ok
    assert rt.snapshot.boot.tokens is not providers
    assert dict(rt.snapshot.boot.tokens) == dict(providers)  # the same provider objects
    write(files, {**A, "token": TOKEN_B})
    assert rt.reload().ok
    assert rt.snapshot.boot.tokens["prod"] is not providers["prod"]
