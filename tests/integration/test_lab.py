"""`bootd lab`, the README's demo command, end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.conftest import require

pytestmark = pytest.mark.netns


def test_lab_demo_shows_every_client_answered() -> None:
    require("udhcpc")
    proc = subprocess.run([sys.executable, "-m", "bootd", "lab", "--dhcp-only"],
                          capture_output=True,
                          text=True, timeout=120, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "BIOS PXE ROM     02:00:00:00:01:01  10.250.0.11   worker-1" in out
    assert "undionly.kpxe" in out and "snponly.efi" in out
    assert "http://10.250.0.1:8080/boot.ipxe" in out
    assert "node-52-54-00-c0-ff-ee" in out
    assert "(no answer)" not in out
    assert "$ bootd status" in out and "dhcp-ack" in out  # the events of those exchanges
    assert "removed namespaces" in out
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    assert "bootdlab-" not in leftovers.stdout
