"""`bootd probe` against bootd and against dnsmasq, as an operator would run it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import DhcpLab, require

pytestmark = pytest.mark.netns


def probe(lab: DhcpLab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.lab.run(lab.client_ns, [sys.executable, "-m", "bootd", "probe", "-i", "cli0",
                                       "--mac", "52:54:00:00:00:42", "--timeout", "3", *args],
                       check=False, timeout=90)


@pytest.fixture
def probe_lab(dhcp_lab: DhcpLab) -> DhcpLab:
    dhcp_lab.lab.address(dhcp_lab.client_ns, "cli0", "10.77.0.2/24")
    root = dhcp_lab.tmp / "tftp"
    root.mkdir()
    (root / "undionly.kpxe").write_bytes(os.urandom(70_000))
    img = dhcp_lab.tmp / "img"
    img.mkdir()
    for name in ("vmlinuz", "initrd.img"):
        (img / name).write_bytes(os.urandom(1000))
    return dhcp_lab


def test_probe_bootd(probe_lab: DhcpLab) -> None:
    img = probe_lab.tmp / "img"
    probe_lab.bootd(f"""\
tftp: {{root: {probe_lab.tmp / 'tftp'}}}
images: {{k8s: {{kernel: {img}/vmlinuz, initrd: {img}/initrd.img}}}}
defaults: {{image: k8s}}
pools:
  - name: any
    dynamic: {{range: 10.77.0.100-10.77.0.120}}
""")
    bios = probe(probe_lab)
    assert bios.returncode == 0, bios.stdout + bios.stderr
    assert "[OK  ] DHCP DISCOVER -> OFFER" in bios.stdout
    assert "hostname               node-52-54-00-00-00-42" in bios.stdout
    assert "[OK  ] TFTP undionly.kpxe from 10.77.0.1" in bios.stdout
    assert "70000 bytes" in bios.stdout
    ipxe = probe(probe_lab, "--ipxe")
    assert ipxe.returncode == 0, ipxe.stdout + ipxe.stderr
    assert "[OK  ] HTTP GET http://10.77.0.1:8080/boot.ipxe?mac=52:54:00:00:00:42" in ipxe.stdout
    assert "kernel --name vmlinuz http://10.77.0.1:8080/images/k8s/kernel" in ipxe.stdout


def test_probe_dnsmasq(probe_lab: DhcpLab) -> None:
    require("dnsmasq")
    dnsmasq = shutil.which("dnsmasq")
    assert dnsmasq is not None
    proc = probe_lab.lab.spawn(probe_lab.server_ns, [
        dnsmasq, "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=srv0",
        "--bind-interfaces", "--dhcp-range=10.77.0.100,10.77.0.120,255.255.255.0,1h",
        "--dhcp-boot=undionly.kpxe", "--enable-tftp", f"--tftp-root={probe_lab.tmp / 'tftp'}",
        "--user=root", "--group=root", f"--dhcp-leasefile={probe_lab.tmp / 'leases'}",
        "--no-ping", "--log-facility=-"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    result = probe(probe_lab)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bootfile-name          undionly.kpxe" in result.stdout  # NUL-terminated by dnsmasq
    assert "[OK  ] TFTP undionly.kpxe from 10.77.0.1" in result.stdout
    probe_lab.lab.stop(proc)


def test_probe_with_no_server(probe_lab: DhcpLab) -> None:
    result = probe(probe_lab)
    assert result.returncode == 1
    assert "[FAIL] DHCP DISCOVER -> OFFER" in result.stdout and "no offer" in result.stdout
