"""bootd with its state directory on a full disk (issue 16, finding 9: no reply, 20
callback tracebacks, 4 error lines a second). A lease the store cannot keep is not
handed out; nothing raises; each failing store is logged once; reserved nodes keep
booting; when space returns everything resumes without a restart."""

from __future__ import annotations

import errno
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import DhcpLab
from tests.integration.test_dhcp_flood import ONE_NODE_AND_A_RANGE

pytestmark = pytest.mark.netns

RESERVED, STRANGER = "02:00:00:00:00:01", "52:54:00:00:00:42"


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_withholds_leases_cleanly_and_recovers(dhcp_lab: DhcpLab) -> None:
    lab = dhcp_lab
    state = lab.tmp / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)], check=True)
    try:
        daemon = lab.bootd(ONE_NODE_AND_A_RANGE)
        filler = fill(state)
        lab.set_client_mac(STRANGER)
        assert lab.udhcpc(tries=4) is None  # an address the store cannot keep: withheld
        lab.set_client_mac(RESERVED)
        reserved = lab.udhcpc()
        assert reserved is not None and reserved["ip"] == "10.77.0.2"  # still booting
        time.sleep(1.5)  # several event flushes fail meanwhile
        log = daemon.log.read_text()
        assert "Traceback" not in log
        assert log.count("dhcp lease store write failed") == 1
        assert log.count("event store write failed") == 1

        filler.unlink()  # space again: no restart needed
        lab.set_client_mac(STRANGER)
        recovered = lab.udhcpc()
        assert recovered is not None and recovered["ip"].startswith("10.77.0.1")
        assert daemon.stop() == 0
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(state)], check=False,
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
