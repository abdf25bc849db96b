"""Real TFTP clients (tftp-hpa, atftp, curl, tftpy) against the real daemon."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootd.lab.netlab import LabError
from tests.integration.conftest import SERVER_IP, DhcpLab, require

pytestmark = pytest.mark.netns

NODE = """\
images:
  k8s: {kernel: /i/vmlinuz, initrd: /i/initrd, cmdline: "console=ttyS0"}
pools:
  - name: w
    nodes: [{name: client, mac: "02:00:00:00:00:01", ip: 10.77.0.2, image: k8s}]
"""
RAW = Path(__file__).with_name("tftp_raw_client.py")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tftp_lab(dhcp_lab: DhcpLab) -> DhcpLab:
    dhcp_lab.lab.address(dhcp_lab.client_ns, "cli0", "10.77.0.2/24")
    root = dhcp_lab.tmp / "tftproot"
    (root / "sub").mkdir(parents=True)
    (root / "1m.bin").write_bytes(os.urandom(1 << 20))
    (root / "small.bin").write_bytes(os.urandom(128 << 10))
    (root / "sub" / "hello.txt").write_text("hello\nworld\n")
    (dhcp_lab.tmp / "secret").write_text("SECRET")
    (root / "escape").symlink_to(dhcp_lab.tmp / "secret")
    return dhcp_lab


def serve(lab: DhcpLab, extra: str = "") -> None:
    root = lab.tmp / "tftproot"
    lab.bootd(NODE + f"tftp: {{root: {root}{extra}}}\n")


def run(lab: DhcpLab, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return lab.lab.run(lab.client_ns, cmd, check=False, timeout=timeout)


def raw(lab: DhcpLab, command: str, args: object) -> object:
    proc = run(lab, [sys.executable, str(RAW), SERVER_IP, command, json.dumps(args)])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def transfers(lab: DhcpLab, at_least: int = 1, timeout: float = 5.0,
              ) -> list[dict[str, object]]:
    """bootd's transfer records, once there are `at_least` of them (or the timeout is
    up): a client exits after sending its last ACK, before bootd has logged the end."""
    deadline = time.monotonic() + timeout
    while True:
        done = [e for e in lab.daemons[-1].events() if e.get("event") == "tftp transfer"]
        if len(done) >= at_least or time.monotonic() > deadline:
            return done
        time.sleep(0.05)


def test_tftp_hpa_client(tftp_lab: DhcpLab) -> None:
    require("tftp")
    serve(tftp_lab)
    out = tftp_lab.tmp / "out.bin"
    proc = run(tftp_lab, ["tftp", "-m", "binary", SERVER_IP, "-c", "get", "1m.bin", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert sha(out) == sha(tftp_lab.tmp / "tftproot" / "1m.bin")
    done = transfers(tftp_lab)
    assert done[-1]["outcome"] == "ok" and done[-1]["node"] == "client"
    assert done[-1]["size"] == 1 << 20 and done[-1]["blksize"] == 512


def test_atftp_with_blksize_and_windowsize(tftp_lab: DhcpLab) -> None:
    require("atftp")
    serve(tftp_lab)
    out = tftp_lab.tmp / "out.bin"
    proc = run(tftp_lab, ["atftp", "--get", "-r", "1m.bin", "-l", str(out),
                          "--option", "blksize 1468", "--option", "windowsize 8", SERVER_IP])
    assert proc.returncode == 0, proc.stderr
    assert sha(out) == sha(tftp_lab.tmp / "tftproot" / "1m.bin")
    last = transfers(tftp_lab)[-1]
    assert (last["blksize"], last["windowsize"]) == (1468, 8)


def test_curl_with_blksize(tftp_lab: DhcpLab) -> None:
    require("curl")
    serve(tftp_lab)
    out = tftp_lab.tmp / "out.bin"
    proc = run(tftp_lab, ["curl", "-sS", "--max-time", "30", "--tftp-blksize", "1468",
                          "-o", str(out), f"tftp://{SERVER_IP}/1m.bin"])
    assert proc.returncode == 0, proc.stderr
    assert sha(out) == sha(tftp_lab.tmp / "tftproot" / "1m.bin")


def test_tftpy_client(tftp_lab: DhcpLab) -> None:
    serve(tftp_lab)
    out = tftp_lab.tmp / "out.bin"
    code = ("import logging, tftpy; logging.disable(logging.CRITICAL); "
            f"tftpy.TftpClient({SERVER_IP!r}, 69, options={{'blksize': 1024}})"
            f".download('sub/hello.txt', {str(out)!r}, timeout=5)")
    proc = run(tftp_lab, [sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "hello\nworld\n"


def test_ipxe_binary_falls_back_to_system_directory(tftp_lab: DhcpLab) -> None:
    require("curl")
    system = Path("/usr/lib/ipxe/undionly.kpxe")
    if not system.exists():
        pytest.skip("Debian package ipxe not installed")
    serve(tftp_lab)
    out = tftp_lab.tmp / "undionly.kpxe"
    proc = run(tftp_lab, ["curl", "-sS", "--max-time", "30", "-o", str(out),
                          f"tftp://{SERVER_IP}/undionly.kpxe"])
    assert proc.returncode == 0, proc.stderr
    assert sha(out) == sha(system)


def test_debian_ipxe_efi_symlink_is_served_from_the_fallback_dir(tftp_lab: DhcpLab) -> None:
    """Debian's ipxe package makes /usr/lib/ipxe/ipxe.efi a symlink to /boot/ipxe.efi. The
    default fallback directory is followed wherever its package links point (bootd once
    answered this with an access violation); the root's own escaping link stays refused.
    Over the wire with curl and tftp-hpa, and over HTTP /boot/ for UEFI HTTP boot."""
    require("curl", "tftp")
    link = Path("/usr/lib/ipxe/ipxe.efi")
    if not link.is_symlink() or not link.resolve().is_file():
        pytest.skip("Debian's ipxe package (ipxe.efi -> /boot/ipxe.efi) is not installed")
    assert not link.resolve().is_relative_to("/usr/lib/ipxe")  # the layout under test
    serve(tftp_lab)  # fallback_dirs left at its default, [/usr/lib/ipxe]
    expected = sha(link.resolve())
    out = tftp_lab.tmp / "curl-ipxe.efi"
    proc = run(tftp_lab, ["curl", "-sS", "--max-time", "30", "--tftp-blksize", "1468",
                          "-o", str(out), f"tftp://{SERVER_IP}/ipxe.efi"])
    assert proc.returncode == 0, proc.stderr
    assert sha(out) == expected
    out = tftp_lab.tmp / "hpa-ipxe.efi"
    proc = run(tftp_lab, ["tftp", "-m", "binary", SERVER_IP, "-c", "get", "ipxe.efi", str(out)])
    assert proc.returncode == 0 and sha(out) == expected, proc.stderr
    out = tftp_lab.tmp / "http-ipxe.efi"
    proc = run(tftp_lab, ["curl", "-sS", "--fail", "--max-time", "30", "-o", str(out),
                          f"http://{SERVER_IP}:8080/boot/ipxe.efi"])
    assert proc.returncode == 0 and sha(out) == expected, proc.stderr
    escape = run(tftp_lab, ["curl", "-sS", "--max-time", "10", "-o", "/dev/null",
                            f"tftp://{SERVER_IP}/escape"])
    assert escape.returncode == 69  # curl: TFTP access violation
    done = [(e["file"], e["outcome"]) for e in transfers(tftp_lab, at_least=3)]
    assert done.count(("ipxe.efi", "ok")) == 2 and ("escape", "error") in done


def test_grub_per_mac_config_over_tftp(tftp_lab: DhcpLab) -> None:
    require("curl")
    serve(tftp_lab)
    out = tftp_lab.tmp / "grub.cfg"
    proc = run(tftp_lab, ["curl", "-sS", "--max-time", "30", "-o", str(out),
                          f"tftp://{SERVER_IP}/grub/grub.cfg-01-02-00-00-00-00-01"])
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "linux (http,10.77.0.1:8080)/images/k8s/kernel console=ttyS0" in text
    assert "bootd.node=client" in text


def test_hundred_concurrent_clients(tftp_lab: DhcpLab) -> None:
    require("curl")
    # a hundred machines, played from one address: lift the per-address cap (4)
    serve(tftp_lab, ", max_transfers_per_client: 1000")
    daemon = tftp_lab.daemons[-1]
    assert daemon.proc is not None
    rss_before = _rss_kib(daemon.proc.pid)
    outs = [tftp_lab.tmp / f"c{i}.bin" for i in range(100)]
    script = " & ".join(
        f"curl -sS --max-time 120 --tftp-blksize 1468 -o {o} tftp://{SERVER_IP}/1m.bin"
        for o in outs) + " & wait"
    proc = run(tftp_lab, ["sh", "-c", script], timeout=180)
    assert proc.returncode == 0, proc.stderr
    want = sha(tftp_lab.tmp / "tftproot" / "1m.bin")
    assert [sha(o) for o in outs] == [want] * 100
    ok = [t for t in transfers(tftp_lab, at_least=100)
          if t["outcome"] == "ok" and t["file"] == "1m.bin"]
    assert len(ok) == 100
    # files are read block by block, never held per client: 100 copies would be 100 MiB
    assert _rss_kib(daemon.proc.pid) - rss_before < 20 * 1024


def test_ten_percent_loss_each_way_still_completes(tftp_lab: DhcpLab) -> None:
    """10% of packets lost in each direction; curl negotiates options (OACK path),
    tftp-hpa does not. (atftp aborts on a re-sent OACK when its ACK 0 is lost, whichever
    server it talks to, so it is not used here.)"""
    require("curl", "tftp")
    serve(tftp_lab, ", retries: 4")
    for ns, dev in ((tftp_lab.client_ns, "cli0"), (tftp_lab.server_ns, "srv0")):
        try:
            tftp_lab.lab.lose_packets(ns, dev, 10)
        except LabError as exc:
            pytest.skip(str(exc))
    source = tftp_lab.tmp / "tftproot" / "loss.bin"
    source.write_bytes(os.urandom(64 << 10))
    a, b = tftp_lab.tmp / "lossy-curl.bin", tftp_lab.tmp / "lossy-hpa.bin"
    started = time.monotonic()
    proc = run(tftp_lab, ["sh", "-c",
                          f"curl -sS --max-time 240 --tftp-blksize 1468 -o {a} "
                          f"tftp://{SERVER_IP}/loss.bin & "
                          f"tftp -m binary {SERVER_IP} -c get loss.bin {b} & wait"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sha(a) == sha(source) and sha(b) == sha(source), (
        f"after {time.monotonic() - started:.0f}s")
    # a lost final ACK is only known after the retries: up to 40 s
    done = transfers(tftp_lab, at_least=2, timeout=40)
    assert [t["outcome"] in ("ok", "unconfirmed") for t in done] == [True, True], done
    assert sum(int(str(t.get("retransmits", 0))) for t in done) > 0


def test_block_number_rollover_large_file(tftp_lab: DhcpLab) -> None:
    require("tftp")
    big = tftp_lab.tmp / "tftproot" / "big.bin"
    with big.open("wb") as f:
        for _ in range(33):
            f.write(os.urandom(1 << 20))  # 33 MiB = 67,584 blocks of 512
    serve(tftp_lab)
    out = tftp_lab.tmp / "big.out"
    proc = run(tftp_lab, ["tftp", "-m", "binary", SERVER_IP, "-c", "get", "big.bin", str(out)],
               timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sha(out) == sha(big)
    assert transfers(tftp_lab)[-1]["outcome"] == "ok"


HOSTILE = [
    "../secret", "../../etc/passwd", "/etc/passwd", "//etc/passwd", "/../secret",
    "..\\secret", "\\..\\..\\secret", "sub/../../secret", "....//secret", "%2e%2e/secret",
    "..%2fsecret", "escape", "escape/", "sub", "", ".", "/", "x" * 500, "a/" * 250,
    "file\x01name", "\x1b[31mred", "~/secret", "/proc/self/environ", "/dev/zero",
    "/dev/urandom", "C:\\Windows\\system.ini", "nul", "\udcff\udcfe", "sub/\udc80",
    "/usr/lib/ipxe/../../../etc/shadow",
]


def test_hostile_names_never_leak_and_never_kill(tftp_lab: DhcpLab) -> None:
    serve(tftp_lab)
    results = raw(tftp_lab, "hostile", HOSTILE)
    assert isinstance(results, list) and len(results) == len(HOSTILE)
    for r in results:
        assert r["opcode"] == 5, r  # every one is an ERROR
        assert r["code"] in (1, 2), r
        assert "SECRET" not in str(r)
    # garbage modes and packets
    packets = [
        (b"\x00\x01sub/hello.txt\x00mail\x00").hex(), (b"\x00\x01\x00\x00").hex(),
        (b"\x00\x01noterm").hex(), (b"\x00\x09junk\x00").hex(), "0001", "00",
    ]
    replies = raw(tftp_lab, "raw", packets)
    assert isinstance(replies, list)
    assert replies[0]["opcode"] == 5 and replies[0]["code"] == 4
    # still serving
    ok = raw(tftp_lab, "hostile", ["sub/hello.txt"])
    assert isinstance(ok, list) and ok[0]["opcode"] == 3
    assert ok[0]["payload"] == "hello\nworld\n"
    daemon = tftp_lab.daemons[-1]
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_write_requests_refused(tftp_lab: DhcpLab) -> None:
    serve(tftp_lab)
    replies = raw(tftp_lab, "raw", [(b"\x00\x02upload.bin\x00octet\x00").hex()])
    assert isinstance(replies, list)
    assert (replies[0]["opcode"], replies[0]["code"]) == (5, 2)
    assert not (tftp_lab.tmp / "tftproot" / "upload.bin").exists()


def test_wrong_tid_gets_error_5_and_transfer_continues(tftp_lab: DhcpLab) -> None:
    serve(tftp_lab)
    result = raw(tftp_lab, "wrong_tid", "small.bin")
    assert isinstance(result, dict)
    assert (result["stranger_opcode"], result["stranger_code"]) == (5, 5)
    assert result["sha256"] == sha(tftp_lab.tmp / "tftproot" / "small.bin")
    assert result["tid_port"] != 69


def test_client_refusing_oack_ends_cleanly(tftp_lab: DhcpLab) -> None:
    serve(tftp_lab)
    result = raw(tftp_lab, "refuse_oack", "small.bin")
    assert result == {"opcode": 6}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(t["outcome"] == "refused-options" for t in transfers(tftp_lab)):
            break
        time.sleep(0.1)
    assert any(t["outcome"] == "refused-options" for t in transfers(tftp_lab))


def test_single_port_mode(tftp_lab: DhcpLab) -> None:
    require("curl")
    # five downloads at once from one address, beside the unanswered probe: above the
    # per-address cap of 4 (single-port mode is for NAT, where that is the norm)
    serve(tftp_lab, ", single_port: true, max_transfers_per_client: 100")
    result = raw(tftp_lab, "hostile", ["sub/hello.txt"])
    assert isinstance(result, list) and result[0]["opcode"] == 3
    assert result[0]["port"] == 69  # DATA comes from the well-known port
    outs = [tftp_lab.tmp / f"sp{i}.bin" for i in range(5)]
    script = " & ".join(f"curl -sS --max-time 60 --tftp-blksize 1468 -o {o} "
                        f"tftp://{SERVER_IP}/1m.bin" for o in outs) + " & wait"
    proc = run(tftp_lab, ["sh", "-c", script])
    assert proc.returncode == 0, proc.stderr
    want = sha(tftp_lab.tmp / "tftproot" / "1m.bin")
    assert all(sha(o) == want for o in outs)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
