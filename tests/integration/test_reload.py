"""Reload a running daemon: SIGHUP and `bootd reload`; a bad config changes nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import DhcpLab

pytestmark = pytest.mark.netns

ONE = """\
pools:
  - name: w
    nodes: [{name: first, mac: "02:00:00:00:00:01", ip: 10.77.0.21}]
"""
TWO = ONE + """\
  - name: v
    nodes: [{name: second, mac: "02:00:00:00:00:02", ip: 10.77.0.22}]
"""


def wait_for(marker: str, count: int, lab: DhcpLab) -> None:
    deadline = time.monotonic() + 10
    while lab.daemons[-1].log.read_text().count(marker) < count:
        assert time.monotonic() < deadline, lab.daemons[-1].tail()
        time.sleep(0.05)


def test_sighup_applies_a_valid_config(dhcp_lab: DhcpLab) -> None:
    daemon = dhcp_lab.bootd(ONE)
    dhcp_lab.set_client_mac("02:00:00:00:00:02")
    assert dhcp_lab.udhcpc(tries=2) is None  # unknown yet
    config = daemon.config.read_text()
    daemon.config.write_text(config.replace(ONE, TWO))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for('"config reloaded"', 1, dhcp_lab)
    env = dhcp_lab.udhcpc()
    assert env is not None and env["hostname"] == "second" and env["ip"] == "10.77.0.22"


def test_bootd_reload_refuses_a_bad_config_and_keeps_serving(dhcp_lab: DhcpLab) -> None:
    daemon = dhcp_lab.bootd(ONE)
    good = daemon.config.read_text()
    daemon.config.write_text(good.replace('ip: 10.77.0.21', 'ip: 10.99.0.21'))
    api = dhcp_lab.tmp / "state" / "api.sock"
    proc = subprocess.run([sys.executable, "-m", "bootd", "reload", "--api", str(api)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "pools.0.nodes.0.ip: 10.99.0.21 is outside network.subnet" in proc.stderr
    assert "the running config stays" in proc.stderr
    env = dhcp_lab.udhcpc()
    assert env is not None and env["ip"] == "10.77.0.21"  # the old config still answers
    daemon.config.write_text(good.replace("server: {interfaces: [srv0]",
                                          "server: {http_port: 8081, interfaces: [srv0]"))
    proc = subprocess.run([sys.executable, "-m", "bootd", "reload", "--api", str(api)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "server.http_port changed: takes effect after a restart" in proc.stdout
