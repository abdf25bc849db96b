"""A node's boot, step by step with real clients, as `bootd status` reports it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import SERVER_IP, DhcpLab, require

pytestmark = pytest.mark.netns

URL = f"http://{SERVER_IP}:8080"


def setup(lab: DhcpLab, api: str | None = None) -> None:
    """A node booty to boot and an idle one, in pool w; `api`: the admin listener."""
    img = lab.tmp / "img"
    img.mkdir()
    for name in ("vmlinuz", "initrd.img", "rootfs"):
        (img / name).write_bytes(os.urandom(256 << 10))
    (lab.tmp / "tftp").mkdir()
    (lab.tmp / "tftp" / "undionly.kpxe").write_bytes(os.urandom(70_000))
    lab.bootd(f"""\
images:
  k8s: {{kernel: {img}/vmlinuz, initrd: {img}/initrd.img, rootfs: {img}/rootfs}}
clusters:
  prod: {{api_server: "https://10.77.0.10:6443", ca_cert_hash: "sha256:{'c' * 64}",
          token: {{value: abcdef.0123456789abcdef}}}}
defaults: {{image: k8s, cluster: prod}}
tftp: {{root: {lab.tmp / 'tftp'}}}
events: {{stall_after: 1h}}
pools:
  - name: w
    nodes:
      - {{name: booty, mac: "02:00:00:00:00:01", ip: 10.77.0.2}}
      - {{name: idle, mac: "02:00:00:00:00:07", ip: 10.77.0.7}}
""", api=api)


def status(lab: DhcpLab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootd", "status", "-c",
                           str(lab.tmp / "bootd.yaml"), *args],
                          capture_output=True, text=True, timeout=60)


def boot_like_a_node(lab: DhcpLab) -> None:
    pxe = lab.udhcpc("-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000")
    assert pxe is not None and pxe["boot_file"] == "undionly.kpxe"
    lab.lab.address(lab.client_ns, "cli0", "10.77.0.2/24")
    run = lab.lab.run
    run(lab.client_ns, ["curl", "-sS", "--max-time", "20", "-o", "/dev/null",
                        f"tftp://{SERVER_IP}/undionly.kpxe"])
    ipxe = lab.udhcpc("-x", "0x4d:" + b"iPXE".hex())
    assert ipxe is not None
    for path in ("/nodes/02-00-00-00-00-01/boot.ipxe", "/images/k8s/kernel",
                 "/images/k8s/initrd", "/nodes/02-00-00-00-00-01/beacon",
                 "/images/k8s/rootfs", "/nodes/02-00-00-00-00-01/join.sh"):
        run(lab.client_ns, ["curl", "-sS", "-f", "--max-time", "20", "-o", "/dev/null",
                            URL + path])
    for stage in ("rootfs-mounted", "scripts-done", "joined"):
        run(lab.client_ns, ["curl", "-sS", "-f", "--max-time", "20", "-d",
                            json.dumps({"stage": stage, "message": f"{stage} ok"}),
                            f"{URL}/api/v1/events"])
        time.sleep(0.25)  # the per-node report rate limit


def test_status_follows_a_boot_and_survives_restart(dhcp_lab: DhcpLab) -> None:
    require("curl")
    setup(dhcp_lab)
    boot_like_a_node(dhcp_lab)

    out = status(dhcp_lab, "-o", "json")
    assert out.returncode == 0, out.stderr
    nodes = {n["node"]: n for n in json.loads(out.stdout)["nodes"]}
    assert nodes["booty"]["stage"] == "joined" and nodes["booty"]["attempts"] == 1
    assert nodes["booty"]["last_boot_time"] > 0 and nodes["booty"]["ip"] == "10.77.0.2"
    assert nodes["idle"]["stage"] == "never-seen"

    detail = json.loads(status(dhcp_lab, "booty", "-o", "json").stdout)
    stages = [s["stage"] for s in detail["history"][0]["steps"]]
    for expected in ("dhcp-discover", "dhcp-offer", "dhcp-ack", "tftp", "ipxe-script",
                     "kernel", "initrd", "kernel-handoff", "rootfs", "join-script",
                     "rootfs-mounted", "scripts-done", "joined"):
        assert expected in stages, (expected, stages)
    assert stages.index("tftp") < stages.index("ipxe-script") < stages.index("joined")
    rootfs = next(s for s in detail["history"][0]["steps"] if s["stage"] == "rootfs")
    assert rootfs["detail"]["bytes"] == 256 << 10
    assert "abcdef.0123456789abcdef" not in json.dumps(detail)

    table = status(dhcp_lab).stdout
    assert "booty" in table and "joined" in table and "never-seen" in table
    timeline = status(dhcp_lab, "02:00:00:00:00:01").stdout
    assert "attempt 1" in timeline and "kernel-handoff" in timeline

    daemon = dhcp_lab.daemons[-1]
    assert daemon.stop(signal.SIGTERM) == 0
    offline = status(dhcp_lab, "-o", "json")
    assert offline.returncode == 0 and "daemon not running" in offline.stderr
    assert {n["node"]: n["stage"] for n in json.loads(offline.stdout)["nodes"]}["booty"] == \
        "joined"
    daemon.start()
    again = json.loads(status(dhcp_lab, "booty", "-o", "json").stdout)
    assert again["stage"] == "joined" and again["history"][0]["steps"] == \
        detail["history"][0]["steps"]


def test_unknown_node_and_filters(dhcp_lab: DhcpLab) -> None:
    setup(dhcp_lab)
    missing = status(dhcp_lab, "nobody")
    assert missing.returncode == 1 and "no boot events" in missing.stderr
    filtered = status(dhcp_lab, "--stage", "never-seen").stdout
    assert "booty" in filtered and "idle" in filtered
    assert "2 nodes: 2 never-seen" in filtered
