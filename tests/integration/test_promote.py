"""`bootd approve` and `bootd promote` against the real daemon: a catch-all machine asks
for its join script and waits, an operator approves it, then makes it a reserved node
through a drop-in file; the daemon reloads and the machine's next DHCP exchange (udhcpc)
gets its reserved address and name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.conftest import SERVER_IP, DhcpLab, require

pytestmark = pytest.mark.netns

MAC = "52:54:00:00:00:77"
NAME = "node-52-54-00-00-00-77"


def bootd_cli(lab: DhcpLab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootd", *args, "-c",
                           str(lab.tmp / "bootd.yaml")], capture_output=True, text=True,
                          timeout=60, check=False)


def test_a_catch_all_machine_is_approved_then_promoted(dhcp_lab: DhcpLab) -> None:
    require("curl")
    lab = dhcp_lab
    lab.set_client_mac(MAC)
    lab.bootd("""\
clusters:
  prod: {api_server: "https://10.77.0.10:6443", ca_cert_hash: "sha256:%s",
         token: {value: abcdef.0123456789abcdef}}
defaults: {cluster: prod}
pools:
  - name: w
    nodes: [{name: n1, mac: "02:00:00:00:00:01", ip: 10.77.0.5}]
  - name: any
    dynamic: {range: 10.77.0.100-10.77.0.149, join: approve}
""" % ("c" * 64))
    lease = lab.udhcpc()
    assert lease is not None and lease["hostname"] == NAME
    lab.lab.address(lab.client_ns, "cli0", f"{lease['ip']}/24")
    wait = lab.lab.run(lab.client_ns, ["curl", "-sS", "-f", "--max-time", "10",
                                       f"http://{SERVER_IP}:8080/nodes/{MAC}/join.sh"])
    assert "# bootd: awaiting approval" in wait.stdout and "abcdef." not in wait.stdout

    refused = bootd_cli(lab, "promote", NAME, "--pool", "w", "--name", "web1",
                        "--ip", "10.77.0.20")
    assert refused.returncode == 1 and f"bootd approve {NAME} first" in refused.stderr
    typo = bootd_cli(lab, "approve", "node-typo")
    assert typo.returncode == 1 and "no catch-all node awaiting approval" in typo.stderr
    approved = bootd_cli(lab, "approve", NAME)
    assert approved.returncode == 0 and f"approved: {NAME}" in approved.stdout

    # an address another node holds: checked as `bootd check` would, and taken back
    clash = bootd_cli(lab, "promote", NAME, "--pool", "w", "--name", "web1",
                      "--ip", "10.77.0.5")
    assert clash.returncode == 1, clash.stdout
    assert "bootd.yaml.d/promoted-web1.yaml" in clash.stderr
    assert not (lab.tmp / "bootd.yaml.d" / "promoted-web1.yaml").exists()

    done = bootd_cli(lab, "promote", NAME, "--pool", "w", "--name", "web1",
                     "--ip", "10.77.0.20")
    assert done.returncode == 0, done.stderr
    assert "the daemon reloaded" in done.stdout
    assert bootd_cli(lab, "check").returncode == 0
    again = lab.udhcpc()
    assert again is not None and again["ip"] == "10.77.0.20" and again["hostname"] == "web1"
    nodes = bootd_cli(lab, "nodes")
    assert "web1" in nodes.stdout
