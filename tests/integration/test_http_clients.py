"""curl against the real daemon's HTTP side, from inside the client namespace."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import SERVER_IP, DhcpLab, require

pytestmark = pytest.mark.netns

URL = f"http://{SERVER_IP}:8080"


def config(tmp: Path, rootfs_size: int = 4 << 20) -> str:
    img = tmp / "img"
    img.mkdir(exist_ok=True)
    (img / "vmlinuz").write_bytes(os.urandom(1 << 20))
    (img / "initrd.img").write_bytes(os.urandom(1 << 20))
    with (img / "rootfs").open("wb") as f:
        for _ in range(rootfs_size >> 20):
            f.write(os.urandom(1 << 20))
    return f"""\
images:
  k8s: {{kernel: {img}/vmlinuz, initrd: {img}/initrd.img, rootfs: {img}/rootfs}}
clusters:
  prod: {{api_server: "https://10.77.0.10:6443", ca_cert_hash: "sha256:{'b' * 64}",
          token: {{value: abcdef.0123456789abcdef}}}}
defaults: {{image: k8s, cluster: prod}}
pools:
  - name: w
    nodes:
      - {{name: me, mac: "02:00:00:00:00:01", ip: 10.77.0.2}}
      - {{name: other, mac: "02:00:00:00:00:09", ip: 10.77.0.9}}
tftp: {{root: {tmp}}}
"""


@pytest.fixture
def http_lab(dhcp_lab: DhcpLab) -> DhcpLab:
    require("curl")
    dhcp_lab.lab.address(dhcp_lab.client_ns, "cli0", "10.77.0.2/24")
    return dhcp_lab


def curl(lab: DhcpLab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return lab.lab.run(lab.client_ns, ["curl", "-sS", "--max-time", str(int(timeout)), *args],
                       check=False, timeout=timeout + 10)


def test_head_range_if_range(http_lab: DhcpLab) -> None:
    http_lab.bootd(config(http_lab.tmp))
    data = (http_lab.tmp / "img" / "rootfs").read_bytes()
    head = curl(http_lab, "-I", f"{URL}/images/k8s/rootfs")
    assert "200 OK" in head.stdout and f"Content-Length: {len(data)}" in head.stdout
    etag = next(line.split(": ", 1)[1].strip() for line in head.stdout.splitlines()
                if line.lower().startswith("etag:"))
    out = http_lab.tmp / "part"
    r = curl(http_lab, "-r", "1000-1999", "-o", str(out), "-w", "%{http_code}",
             f"{URL}/images/k8s/rootfs")
    assert r.stdout == "206" and out.read_bytes() == data[1000:2000]
    r = curl(http_lab, "-r", "0-99", "-H", f"If-Range: {etag}", "-o", str(out), "-w",
             "%{http_code}", f"{URL}/images/k8s/rootfs")
    assert r.stdout == "206" and out.read_bytes() == data[:100]
    r = curl(http_lab, "-r", "0-99", "-H", 'If-Range: "stale"', "-o", str(out), "-w",
             "%{http_code}", f"{URL}/images/k8s/rootfs")
    assert r.stdout == "200" and out.read_bytes() == data
    # resuming a partial download with curl -C gives the whole file
    partial = http_lab.tmp / "resume"
    partial.write_bytes(data[:12345])
    r = curl(http_lab, "-C", "-", "-o", str(partial), f"{URL}/images/k8s/rootfs")
    assert r.returncode == 0 and partial.read_bytes() == data


def test_join_script_403_from_wrong_address(http_lab: DhcpLab) -> None:
    daemon = http_lab.bootd(config(http_lab.tmp))
    ok = curl(http_lab, "-w", "%{http_code}", f"{URL}/nodes/02:00:00:00:00:01/join.sh")
    assert ok.stdout.endswith("200") and "--token abcdef.0123456789abcdef" in ok.stdout
    refused = curl(http_lab, "-w", "%{http_code}", f"{URL}/nodes/02:00:00:00:00:09/join.sh")
    assert refused.stdout.endswith("403") and "abcdef.0123456789abcdef" not in refused.stdout
    log = daemon.log.read_text()
    assert "http join-script refused" in log
    assert "0123456789abcdef" not in log  # tokens never reach the log


def test_ipxe_script_and_events_over_the_wire(http_lab: DhcpLab) -> None:
    daemon = http_lab.bootd(config(http_lab.tmp))
    script = curl(http_lab, f"{URL}/boot.ipxe?mac=02-00-00-00-00-01")
    want = hashlib.sha256((http_lab.tmp / "img" / "rootfs").read_bytes()).hexdigest()
    assert f"bootd.rootfs_sha256={want}" in script.stdout
    event = curl(http_lab, "-w", "%{http_code}", "-H", "Content-Type: application/json",
                 "-d", '{"stage": "joined", "message": "kubeadm ok"}', f"{URL}/api/v1/events")
    assert event.stdout == "204"
    deadline = time.monotonic() + 5
    while '"node joined"' not in daemon.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"node joined"' in daemon.log.read_text()


def test_admin_api_only_on_its_socket(http_lab: DhcpLab) -> None:
    http_lab.bootd(config(http_lab.tmp))
    api = http_lab.tmp / "state" / "api.sock"
    assert api.is_socket()
    local = subprocess.run(["curl", "-sS", "--unix-socket", str(api),
                            "http://bootd/api/v1/nodes/me"], capture_output=True, text=True,
                           timeout=30)
    assert '"name": "me"' in local.stdout and '"ip": "10.77.0.2"' in local.stdout
    metrics = subprocess.run(["curl", "-sS", "--unix-socket", str(api), "http://bootd/metrics"],
                             capture_output=True, text=True, timeout=30)
    assert "bootd_dhcp_packets" in metrics.stdout or "bootd_http" in metrics.stdout
    # and none of it is on the boot network
    for path in ("/api/v1/nodes", "/metrics", "/healthz"):
        r = curl(http_lab, "-w", "%{http_code}", "-o", "/dev/null", f"{URL}{path}")
        assert r.stdout in ("404", "405"), path


def test_twenty_concurrent_rootfs_downloads_with_bounded_memory(http_lab: DhcpLab) -> None:
    size = int(os.environ.get("BOOTD_TEST_ROOTFS_MIB", "512")) << 20
    daemon = http_lab.bootd(config(http_lab.tmp, rootfs_size=size))
    want = hashlib.sha256((http_lab.tmp / "img" / "rootfs").read_bytes()).hexdigest()
    outs = [http_lab.tmp / f"sum{i}" for i in range(20)]
    script = " & ".join(f"curl -sS --max-time 300 {URL}/images/k8s/rootfs | sha256sum > {o}"
                        for o in outs) + " & wait"
    started = time.monotonic()
    proc = http_lab.lab.run(http_lab.client_ns, ["sh", "-c", script], check=False, timeout=400)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert [o.read_text().split()[0] for o in outs] == [want] * 20
    assert daemon.proc is not None
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmHWM:")))
    print(f"20 x {size >> 20} MiB in {elapsed:.1f}s; bootd peak RSS {peak_kib // 1024} MiB")
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib // 1024} MiB"
